#!/bin/bash
# session 4, call 3 (one H200): LoRA mb 8 with compile against the plain stack; variable-length
# instruction data (ShareGPT-like) packed/padded with and without the varlen attention
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1
R=/tmp/r3; W=/tmp/w; mkdir -p $R; G=$PWD/.gpu; S=.gpu/repo/benchmarks/speed.py; B=$G/baselines
killgpu() { for p in $(nvidia-smi --query-compute-apps=pid --format=csv,noheader); do kill -9 $p; done; sleep 1; }
COMMON="--baselines $B --warmup 4 --plain-steps 4 --steps 12"
timeout 170 python3 $S $R/l $COMMON --work-dir $W/l --warm-up --cases lora-mb8-gc05 --only plain,ft \
  --ft-variants 'compile:training.compile=true' > $R/l.out 2>&1; killgpu
timeout 230 python3 $S $R/v $COMMON --work-dir $W/v --cases vl-lora-mb8 --only ft --ft-variants 'novarlen:env.FTCLUSTER_VARLEN=0' > $R/v.out 2>&1; killgpu
tail -n 14 $R/*.out
tar czf $OUT/r3.tgz -C /tmp r3
