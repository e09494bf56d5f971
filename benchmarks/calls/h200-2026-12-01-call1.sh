#!/bin/bash
# session 4, call 1 (one H200): varlen attention check, LoRA with varlen / compile, pinned-ahead first checkpoint
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1
R=/tmp/r1; W=/tmp/w; mkdir -p $R; G=$PWD/.gpu; S=.gpu/repo/benchmarks/speed.py; B=$G/baselines
killgpu() { for p in $(nvidia-smi --query-compute-apps=pid --format=csv,noheader); do kill -9 $p; done; sleep 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; free -g | head -2; df -h /tmp | tail -1
(cd .gpu/repo && PYTHONPATH=$PWD:/tmp/site timeout 90 python3 benchmarks/varlen_check.py) > $R/varlen_check.json 2> $R/varlen_check.err || { echo "VARLEN CHECK FAILED"; tail -20 $R/varlen_check.err; export FTCLUSTER_VARLEN=0; }
cat $R/varlen_check.json; killgpu
COMMON="--baselines $B --warmup 4 --plain-steps 4"
timeout 300 python3 $S $R/l $COMMON --steps 12 --work-dir $W/l --warm-up --cases lora-mb2-gc0 --only plain,ft \
  --ft-variants 'novarlen:env.FTCLUSTER_VARLEN=0,compile:training.compile=true' > $R/l.out 2>&1; killgpu
timeout 200 python3 $S $R/m $COMMON --steps 12 --work-dir $W/m --cases p-lora-z0-g1-mb4-s2048-8b-gc0,p-lora-z0-g1-mb4-s2048-8b-gc0.25 --only ft \
  --ft-variants 'compile:training.compile=true' > $R/m.out 2>&1; killgpu
timeout 150 python3 $S $R/c $COMMON --steps 84 --work-dir $W/c --cases z2-1b-g1-ckpt80 --only ft \
  --ft-variants 'nopin:env.FTCLUSTER_PIN_AHEAD=0' > $R/c.out 2>&1; killgpu
tail -n 25 $R/*.out
grep -h "pinned\|compiled\|variable-length\|Liger\|recompile\|graph break" $R/*/*.log $R/*.log 2>/dev/null | sort | uniq -c | head -30
tar czf $OUT/r1.tgz -C /tmp r1
