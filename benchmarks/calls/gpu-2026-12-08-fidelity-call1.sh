#!/bin/bash
# session 2026-12-08, call 1: the fidelity check (benchmarks/fidelity.py) on one GPU, the 1B shape, seq 2048,
# micro-batch 2, packed synthetic corpus. Each ftcluster run is replayed through a plain transformers/peft +
# torch AdamW loop from the same initial weights on the same batches (bf16 autocast).
# (a) learning rate 1e-5, 12 steps: DeepSpeed ZeRO-2, FSDP2, and FSDP2 with its fp32 random init rounded to
#     bf16 (PROBE_ROUND_INIT): the engines' GPU curves differed last session (docs/BENCHMARKS.md, FSDP2 table).
# (b) learning rate 2e-4 (it trains), 40 steps: ZeRO-2, FSDP2, FSDP2 + compile.
# NOT RUN YET: prepared in session 2026-12-08, which had 125 s of device time left (status). .whl/ needs
# liger_kernel-0.8.5-py3-none-any.whl beside the others (pip download liger-kernel --no-deps).
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1
R=$OUT/f1; mkdir -p $R
killgpu() { for p in $(nvidia-smi --query-compute-apps=pid --format=csv,noheader); do kill -9 $p; done; sleep 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpu.txt
python3 -c "import liger_kernel, torch, transformers, peft; print('liger', liger_kernel.__file__, torch.__version__, transformers.__version__, peft.__version__)" > $R/versions.txt 2>&1
F="python3 benchmarks/fidelity.py"
C="--shape 1b --seq 2048 --mb 2 --procs 1 --vocab 8000 --records 1200 --words 500 --threads 8 --tol 0.05 --timeout 240"
timeout 250 $F $R/a $C --steps 12 --lr 1e-5 --runs 'z2=deepspeed.zero_stage=2,fsdp=engine="fsdp",fsdp-round=engine="fsdp";env.PROBE_ROUND_INIT=bfloat16' > $R/a.out 2>&1; killgpu
timeout 300 $F $R/b $C --steps 40 --lr 2e-4 --runs 'z2=deepspeed.zero_stage=2,fsdp=engine="fsdp",fsdp-compile=engine="fsdp";training.compile=true' --bad-lr-run fsdp > $R/b.out 2>&1; killgpu
for d in a b; do for w in $R/$d/work/*/; do n=$(basename $w); cp $w/train.log $R/$d/$n.log; cp $w/out/metrics.jsonl $R/$d/$n.metrics.jsonl; done 2>/dev/null; rm -rf $R/$d/work; done
tail -n 8 $R/a.out $R/b.out
cd $OUT && tar czf f1.tgz f1 && rm -rf f1
