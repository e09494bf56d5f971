#!/bin/bash
# session 3, call 3: sync vs async LoRA checkpoint, 1B ZeRO-3 copy time, padded sharegpt, micro-batches 1 and 8
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
R=/tmp/r6; W=/tmp/w; mkdir -p $R; G=$PWD/.gpu; S=.gpu/repo/benchmarks/speed.py; B=$G/baselines
killgpu() { for p in $(nvidia-smi --query-compute-apps=pid --format=csv,noheader); do kill -9 $p; done; sleep 1; }
C="--baselines $B --warmup 3 --plain-steps 4"
( CUDA_VISIBLE_DEVICES=0 timeout 150 python3 $S $R/c0 $C --steps 16 --work-dir $W/c0 --warm-up --cases lora-mb8-ckpt5 --only ft --ft-env FTCLUSTER_ASYNC_CKPT=0 ) > $R/g0.out 2>&1 &
( CUDA_VISIBLE_DEVICES=1 timeout 150 python3 $S $R/v1 $C --steps 10 --work-dir $W/v1 --warm-up --cases vl-lora-mb8 --only ft ) > $R/g1.out 2>&1 &
wait; killgpu
timeout 100 python3 $S $R/k $C --steps 110 --work-dir $W/k --cases z3-1b-ckpt50 --only ft > $R/k.out 2>&1; killgpu
timeout 150 python3 $S $R/z3 $C --steps 10 --work-dir $W/z3 --cases z3-mb1,z3-mb8 --only plain,ft > $R/z3.out 2>&1; killgpu
timeout 130 python3 $S $R/z2 $C --steps 10 --work-dir $W/z2 --cases z2-mb1,z2-mb8 --only plain,ft > $R/z2.out 2>&1; killgpu
tail -n 8 $R/*.out
grep -h "saved locally\|pinned" $R/*/*.log | cut -c1-200 | head -20
tar czf $OUT/r6.tgz -C /tmp r6
