#!/bin/bash
# session 2026-12-07b, call 3 (one GPU): a two-step torch.profiler window (ds_probe PROBE_STEP_PROFILE) of the
# plain compiled FSDP2 baseline and of ftcluster FSDP2 + compile (with and without gradient clipping), same shape
# as calls 1-2 (8B cut to 8 layers, mb 4, seq 2048, no checkpointing): where does ftcluster's step lose 8 %?
# And the DeepSpeed ZeRO-2 curve that fell behind FSDP2's in calls 1-2 (12.56 vs 12.41 at step 2 from the same
# 12.595): does torch's AdamW update every element of ZeRO's 2.8-billion-element flat partition
# (fused_adam_check.py), and does the ZeRO-2 run with the single-tensor AdamW on it follow FSDP2's curve?
# (Run with commit 73d3e5d's code where the engine switched such groups to the single-tensor AdamW; the check
# showed the fused kernel is correct, so that switch was reverted.)
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1
R=/tmp/r3; W=/tmp/w3; mkdir -p $R; S=benchmarks/speed.py; B=$PWD/.gpu/baselines
killgpu() { for p in $(nvidia-smi --query-compute-apps=pid --format=csv,noheader); do kill -9 $p; done; sleep 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpu.txt
timeout 120 python3 benchmarks/fused_adam_check.py > $R/adam.out 2>&1; killgpu
cat $R/adam.out
PROBE_PHASES=0 PROBE_STEP_PROFILE=1 PROBE_OUT=$R PROBE_TAG=plain-compile timeout 150 python3 -m torch.distributed.run \
  --standalone --nproc-per-node=1 -m benchmarks.ds_probe $B/fsdp_baseline.py --compile --no-ckpt --bs 4 --seq 2048 \
  --layers 8 --steps 8 > $R/plain.out 2>&1; killgpu
timeout 300 python3 $S $R/a --baselines $B --steps 10 --warmup 4 --timeout 200 --work-dir $W --cases z2-8b8-g1-mb4-gc0 \
  --only ft --no-ft-base --ft-env PROBE_STEP_PROFILE=1 \
  --ft-variants 'c:engine="fsdp";training.compile=true,z2:engine="deepspeed"' \
  > $R/a.out 2>&1; killgpu
for f in $W/*/metrics.jsonl; do d=$(basename $(dirname $f)); cp $f $R/$d.metrics.jsonl; done
grep -h "step profile\|RESULT" $R/plain.out $R/a/*.log; cat $R/*_stepprof.json $R/a/*_stepprof.json 2>/dev/null
tail -n 6 $R/a.out
tar czf $OUT/r3.tgz -C /tmp r3
