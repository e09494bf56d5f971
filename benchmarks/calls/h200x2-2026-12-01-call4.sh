#!/bin/bash
# session 4, call 4 (2 x H200): full fine-tuning of the 8B shape with the varlen attention, side by side with plain DeepSpeed
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
R=/tmp/r4; W=/tmp/w; mkdir -p $R; G=$PWD/.gpu; S=.gpu/repo/benchmarks/speed.py; B=$G/baselines
killgpu() { for p in $(nvidia-smi --query-compute-apps=pid --format=csv,noheader); do kill -9 $p; done; sleep 1; }
COMMON="--baselines $B --steps 10 --warmup 3 --plain-steps 4"
timeout 110 python3 $S $R/a $COMMON --work-dir $W/a --warm-up --cases z2-mb4-gc0 --only plain,ft > $R/a.out 2>&1; killgpu
timeout 60 python3 $S $R/b $COMMON --work-dir $W/b --cases z3-mb4-gc0 --only ft > $R/b.out 2>&1; killgpu
timeout 90 python3 $S $R/c $COMMON --work-dir $W/c --cases z2-mb8 --only plain,ft > $R/c.out 2>&1; killgpu
tail -n 12 $R/*.out
tar czf $OUT/r4.tgz -C /tmp r4
