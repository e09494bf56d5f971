"""GPU training on a streamed prepared corpus against the same text read in memory (issue #20).

Two runs of the real runtime on one GPU, same model, tokenizer, text and settings; only the data
path differs:

1. ``memory``: ``data.train`` is the jsonl file: every record read, tokenized and packed before step 1
   (best-fit packing, the path every run took before #20).
2. ``stream``: ``ftcluster prepare-data`` tokenizes the same file once into token shards (timed), then
   the run streams them (concatenate-and-chunk blocks read in a background thread).

The model is the Llama-3.2-1B shape with LoRA r16 all-linear, bf16, seq 2048, micro-batch 8, no
gradient checkpointing: a fast step, so a slow loader would show. Printed per run: tokens/s after
``--warmup`` steps, time from process start to the first step, peak GPU memory, first and last loss.
The two runs see different batches (packing differs), so their losses are compared for sanity, not
equality.

    python benchmarks/gpu_stream.py RESULTS_DIR [--work-dir DIR] [--steps 60] [--warmup 10] [--records 4000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SPEC = """\
name: {name}
method: lora
model:
  random_init: {{preset: {preset}}}
  attn_implementation: sdpa
tokenizer: {{train_vocab_size: {vocab}}}
data:
  train: {train}
  format: text
  seq_len: {seq_len}
{prepare}
training:
  learning_rate: 1.0e-4
  warmup_steps: 2
  max_steps: {steps}
  micro_batch_size: {mb}
  gradient_checkpointing: false
  precision: bf16
  log_every_steps: 1
lora: {{r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear}}
resources: {{gpus_per_node: {gpus}}}
output: {{uri: {out}, checkpoint_every_minutes: 10000, keep_last: 1}}
"""


def env_for(work: Path) -> dict[str, str]:
    return {**os.environ, "FTCLUSTER_CACHE": str(work / "cache"), "FTCLUSTER_HOME": str(work / "home"),
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def write_spec(work: Path, name: str, train: str, prepare: str, args) -> Path:
    path = work / f"{name}.yaml"
    path.write_text(SPEC.format(name=name, train=train, prepare=prepare, steps=args.steps, out=(work / name).as_uri(),
                                preset=args.preset, vocab=args.vocab, seq_len=args.seq_len, mb=args.micro_batch, gpus=args.gpus))
    return path


def train(work: Path, name: str, spec: Path, warmup: int, results: Path) -> dict:
    from ftcluster.plan.launch import compile_plan
    from ftcluster.spec.loader import load_spec

    plan = compile_plan(load_spec(spec))
    payload = work / f"{name}.payload.json"
    payload.write_text(plan.payload_json())
    cmd = [sys.executable, "-m", "ftcluster.train.launch", "--standalone", "--nproc-per-node=1", "-m",
           "ftcluster.train", "--spec", str(payload)]
    log_path = results / f"{name}.log"
    t0 = time.time()
    with log_path.open("w") as log:
        rc = subprocess.run(cmd, env={**env_for(work), **plan.env}, stdout=log, stderr=subprocess.STDOUT,
                            cwd=str(work)).returncode
    res: dict = {"run": name, "exit_code": rc, "wall_s": round(time.time() - t0, 1)}
    metrics = work / name / "metrics.jsonl"
    if rc != 0 or not metrics.exists():
        res["error"] = log_path.read_text()[-3000:]
        return res
    recs = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r for r in recs if r["kind"] == "train"]
    a, b = steps[warmup], steps[-1]
    tps = (b["tokens_seen"] - a["tokens_seen"]) / (b["elapsed_s"] - a["elapsed_s"])
    import re

    text = log_path.read_text()
    ready = re.search(r"data: .*(?:ready|packed) in ([0-9.]+) s", text)
    setup = re.search(r"set-up took ([0-9.]+) s", text)
    res.update({"tokens_per_s": round(tps), "step_time_s": round((b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"]), 4),
                "data_ready_s": float(ready.group(1)) if ready else None,
                "setup_s": float(setup.group(1)) if setup else None,
                "peak_mem_gb": round(max(r["peak_mem_gb"] for r in steps), 1),
                "first_loss": round(steps[0]["loss"], 3), "last_loss": round(steps[-1]["loss"], 3)})
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("results_dir", type=Path)
    ap.add_argument("--work-dir", type=Path, default=None, help="corpus, checkpoints, caches; default RESULTS_DIR/work")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--records", type=int, default=4000, help="jsonl records of ~1,000 words")
    ap.add_argument("--preset", default="llama-3.2-1b", help="model.random_init.preset (tiny: a CPU smoke run)")
    ap.add_argument("--vocab", type=int, default=8000, help="tokenizer.train_vocab_size (512 with --preset tiny)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--gpus", type=int, default=1, help="0: the CPU (a smoke run of the script)")
    args = ap.parse_args()
    from gpu_train import write_corpus

    results = args.results_dir.resolve()
    work = (args.work_dir or results / "work").resolve()
    results.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    text = work / "corpus.jsonl"
    if not text.exists():
        write_corpus(text, records=args.records, words_per_record=1000)
    out: dict = {"runs": []}
    try:
        import torch

        out["device"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        out["device"] = "?"
    memory = write_spec(work, "memory", str(text), "", args)
    corpus = work / "corpus"
    stream = write_spec(work, "stream", str(corpus), f"  prepare: {{source: {text}}}", args)
    t0 = time.time()
    prep = subprocess.run([sys.executable, "-m", "ftcluster.cli", "prepare-data", str(stream)], env=env_for(work),
                          capture_output=True, text=True, cwd=str(work))
    out["prepare"] = {"exit_code": prep.returncode, "wall_s": round(time.time() - t0, 1),
                      "summary": (prep.stdout + prep.stderr).strip().splitlines()[-2:]}
    print(json.dumps(out["prepare"]), flush=True)
    if prep.returncode != 0:
        print(prep.stderr[-3000:], file=sys.stderr)
        return 1
    for name, spec in (("memory", memory), ("stream", stream)):
        res = train(work, name, spec, args.warmup, results)
        print(json.dumps({k: v for k, v in res.items() if k != "error"}), flush=True)
        if "error" in res:
            print(res["error"], file=sys.stderr)
        out["runs"].append(res)
        (results / "results.json").write_text(json.dumps(out, indent=1))
    return 0 if all(r["exit_code"] == 0 for r in out["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
