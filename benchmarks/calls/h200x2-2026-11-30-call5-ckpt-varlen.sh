#!/bin/bash
# session 3, call 2: async checkpoints, variable-length data (packing vs padding), fused AdamW
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
R=/tmp/r5; W=/tmp/w; mkdir -p $R; G=$PWD/.gpu; S=.gpu/repo/benchmarks/speed.py; B=$G/baselines
killgpu() { for p in $(nvidia-smi --query-compute-apps=pid --format=csv,noheader); do kill -9 $p; done; sleep 1; }
C="--baselines $B --warmup 3 --plain-steps 4"
SYNC='sync:env.FTCLUSTER_ASYNC_CKPT="0"'
( CUDA_VISIBLE_DEVICES=0 timeout 95 python3 $S $R/c0 $C --steps 16 --work-dir $W/c0 --warm-up --cases lora-mb8-ckpt5 --only ft
  CUDA_VISIBLE_DEVICES=0 timeout 100 python3 $S $R/v0 $C --steps 10 --work-dir $W/v0 --cases vl-lora-mb8 --only ft ) > $R/g0.out 2>&1 &
( CUDA_VISIBLE_DEVICES=1 timeout 95 python3 $S $R/c1 $C --steps 16 --work-dir $W/c1 --warm-up --cases lora-mb8-ckpt5 --only ft --ft-variants "$SYNC"
  CUDA_VISIBLE_DEVICES=1 timeout 100 python3 $S $R/v1 $C --steps 10 --work-dir $W/v1 --cases vl-lora-mb8-alpaca --only ft ) > $R/g1.out 2>&1 &
wait; killgpu
timeout 120 python3 $S $R/k $C --steps 16 --work-dir $W/k --cases z3-1b-ckpt5 --only ft --ft-variants "$SYNC" > $R/k.out 2>&1; killgpu
timeout 100 python3 $S $R/vz $C --steps 10 --work-dir $W/vz --cases vl-z3-mb4 --only ft > $R/vz.out 2>&1; killgpu
timeout 110 python3 $S $R/f $C --steps 10 --work-dir $W/f --cases z2-mb4-gc0 --only plain,ft > $R/f.out 2>&1; killgpu
tail -n 12 $R/*.out
tar czf $OUT/r5.tgz -C /tmp r5
