#!/bin/bash
# session 2026-12-07b, call 4 (one GPU, 184 s of budget left): ftcluster FSDP2 + compile on documents longer than
# seq_len (--words 2500: every 2048-token block is one document, so attention is plain causal as in the baseline's
# random ids; call 3's profile put most of the gap in cuDNN's masked attention backward for 4-document blocks).
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1
R=$OUT/r4; W=/tmp/w4; mkdir -p $R; B=$PWD/.gpu/baselines
timeout 140 python3 benchmarks/speed.py $R/a --baselines $B --steps 10 --warmup 4 --timeout 130 --work-dir $W \
  --cases z2-8b8-g1-mb4-gc0 --only ft --no-ft-base --words 2500 --records 300 \
  --ft-variants 'c-long:engine="fsdp";training.compile=true' > $R/a.out 2>&1
tail -n 3 $R/a.out
