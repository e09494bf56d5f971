#!/bin/bash
# session 4, call 2 (one H200): first checkpoint with buffers pinned ahead vs pinned at capture (1B ZeRO-2);
# full fine-tuning of the 8B shape cut to 8 layers, plain DeepSpeed vs ftcluster (varlen, compile)
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1
R=/tmp/r2; W=/tmp/w; mkdir -p $R; G=$PWD/.gpu; S=.gpu/repo/benchmarks/speed.py; B=$G/baselines
killgpu() { for p in $(nvidia-smi --query-compute-apps=pid --format=csv,noheader); do kill -9 $p; done; sleep 1; }
clean() { rm -rf /tmp/ftcluster $W; df -h /tmp | tail -1; }
COMMON="--baselines $B --warmup 4 --plain-steps 4"
timeout 110 python3 $S $R/pin $COMMON --steps 64 --work-dir $W/pin --warm-up --cases z2-1b-g1-ckpt60 --only ft > $R/pin.out 2>&1; killgpu; clean
FTCLUSTER_PIN_AHEAD=0 timeout 110 python3 $S $R/nopin $COMMON --steps 64 --work-dir $W/nopin --cases z2-1b-g1-ckpt60 --only ft > $R/nopin.out 2>&1; killgpu; clean
timeout 230 python3 $S $R/f $COMMON --steps 12 --work-dir $W/f --cases z2-8b8-g1-mb4-gc0 --only plain,ft \
  --ft-variants 'compile:training.compile=true,novarlen:env.FTCLUSTER_VARLEN=0' > $R/f.out 2>&1; killgpu
tail -n 12 $R/*.out
grep -h "pinned\|saved locally\|compiled\|recompile\|graph break" $R/*/*.log 2>/dev/null | head -20
tar czf $OUT/r2.tgz -C /tmp r2
