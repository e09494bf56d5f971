#!/bin/bash
# session 3, call 1: no / selective checkpointing on 2 x H200, side by side with the plain stack
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
R=/tmp/r4; W=/tmp/w; mkdir -p $R; G=$PWD/.gpu; S=.gpu/repo/benchmarks/speed.py; B=$G/baselines
killgpu() { for p in $(nvidia-smi --query-compute-apps=pid --format=csv,noheader); do kill -9 $p; done; sleep 1; }
COMMON="--baselines $B --steps 10 --warmup 3 --plain-steps 4"
# LoRA on one GPU each, two at once (GPU 0 and GPU 1)
CUDA_VISIBLE_DEVICES=0 timeout 170 python3 $S $R/l0 $COMMON --work-dir $W/l0 --warm-up --cases lora-mb2-gc0,p-lora-z0-g1-mb1-s2048-8b-gc0,p-lora-z0-g1-mb2-s2048-8b-gc0.125 --only plain,ft > $R/l0.out 2>&1 &
CUDA_VISIBLE_DEVICES=1 timeout 170 python3 $S $R/l1 $COMMON --work-dir $W/l1 --warm-up --cases lora-mb4-nockpt,lora-mb8-gc05 --only plain,ft > $R/l1.out 2>&1 &
wait; killgpu
timeout 330 python3 $S $R/f $COMMON --work-dir $W/f --cases z2-mb4-gc0,z2-mb2-gc0,z3-mb4-gc0,z3-mb2-gc0,z3-mb4 --only plain,ft > $R/f.out 2>&1; killgpu
tail -n 30 $R/*.out
grep -h "decoder layers\|Liger\|ZeRO-3:" $R/*/*.log | sort | uniq -c | head
tar czf $OUT/r4.tgz -C /tmp r4
