#!/bin/bash
# session 2026-12-07b, call 1 (one GPU): issue #22's table. The 8B shape cut to 8 layers, micro-batch 4,
# seq 2048, no activation checkpointing: plain FSDP2 (fsdp_baseline.py: plain, + Liger, + per-layer compile)
# beside ftcluster DeepSpeed ZeRO-2, ftcluster FSDP2 and ftcluster FSDP2 + training.compile, in one call.
# Every ftcluster run trains on the same corpus with the same seed, so their loss curves are compared
# step by step (metrics.jsonl of each run comes back too).
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1
R=$OUT/r1; W=/tmp/w1; mkdir -p $R; S=benchmarks/speed.py; B=$PWD/.gpu/baselines
killgpu() { for p in $(nvidia-smi --query-compute-apps=pid --format=csv,noheader); do kill -9 $p; done; sleep 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpu.txt
COMMON="--baselines $B --steps 12 --warmup 4 --plain-steps 6 --timeout 200"
timeout ${T1:-540} python3 $S $R/a $COMMON --work-dir $W --warm-up --cases z2-8b8-g1-mb4-gc0 \
  --only fsdp,fsdp-liger,fsdp-compile,ft \
  --ft-variants 'fsdp:engine="fsdp",fsdp-c:engine="fsdp";training.compile=true' > $R/a.out 2>&1; killgpu
for f in $W/*/metrics.jsonl; do d=$(basename $(dirname $f)); cp $f $R/$d.metrics.jsonl; done
tail -n 12 $R/a.out
