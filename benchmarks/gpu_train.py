"""GPU training benchmark of the real runtime (``python -m ftcluster.train``), on this machine's GPUs.

Runs, each as a normal ftcluster job through the launcher (payload from a spec, torchrun,
metrics.jsonl), and prints one JSON object per run plus writes ``results.json``:

1. ``lora-8b``: Llama-3-8B shape (random init, preset llama-3-8b), LoRA r16 all-linear, bf16,
   SDPA, seq 2048, gradient checkpointing, micro-batch 8, 1 GPU (REFERENCE.md baseline:
   6,552 tokens/s, 50.6 GB peak).
2. ``zero3-1b``: full fine-tune of the Llama-3.2-1B shape with DeepSpeed ZeRO-3 on every
   visible GPU, bf16, seq 2048, gradient checkpointing, micro-batch 8 per GPU.

Self-contained: it writes its own synthetic text corpus and trains the byte-level BPE
tokenizer on it (tokenizer.train_vocab_size), so nothing is downloaded. Throughput is
measured between the end of step ``--warmup`` and the last step from the per-step
metrics (tokens per second over all GPUs, and per GPU); peak memory is the largest
``torch.cuda.max_memory_allocated`` of rank 0.

    python benchmarks/gpu_train.py RESULTS_DIR [--work-dir /scratch/x] [--steps 20] [--warmup 5]
                                   [--only lora-8b,zero3-1b] [--gpus N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue "
         "side kind head house service friend father power hour game line end member law car city community name "
         "president team minute idea kid body information back parent face others level office door health person "
         "art war history party result change morning reason research girl guy moment air teacher force education").split()


def write_corpus(path: Path, records: int, words_per_record: int, seed: int = 0) -> None:
    """Deterministic synthetic text (enough tokens for every GPU to get full micro-batches)."""
    rng = random.Random(seed)
    with path.open("w") as fh:
        for _ in range(records):
            sent = []
            for _ in range(words_per_record // 10):
                s = " ".join(rng.choice(WORDS) for _ in range(9))
                sent.append(s.capitalize() + ".")
            fh.write(json.dumps({"text": " ".join(sent)}) + "\n")


def spec_text(name: str, method: str, data: Path, out: Path, steps: int, gpus: int, args) -> str:
    common = f"""
name: {name}
method: {method}
model:
  random_init: {{preset: {'llama-3-8b' if method == 'lora' else 'llama-3.2-1b'}}}
  attn_implementation: sdpa
tokenizer: {{train_vocab_size: 8000}}
data: {{train: {data}, format: text, seq_len: {args.seq_len}, packing: true}}
training:
  learning_rate: 1.0e-4
  warmup_steps: 2
  max_steps: {steps}
  micro_batch_size: {args.lora_micro_batch if method == 'lora' else args.full_micro_batch}
  gradient_checkpointing: {str(not args.no_grad_ckpt).lower()}
  precision: bf16
  log_every_steps: 1
resources: {{gpus_per_node: {gpus}}}
output: {{uri: {out.as_uri()}, checkpoint_every_minutes: 10000, keep_last: 1}}
"""
    if method == "lora":
        return common + "lora: {r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear}\n"
    return common + "deepspeed: {zero_stage: 3}\n"


def run_job(name: str, method: str, gpus: int, steps: int, work: Path, data: Path, args, results: Path) -> dict:
    from ftcluster.plan.launch import compile_plan
    from ftcluster.spec.loader import load_spec_text

    out = work / name
    spec = load_spec_text(spec_text(name, method, data, out, steps, gpus, args), f"<{name}>")
    plan = compile_plan(spec)
    payload = work / f"{name}.payload.json"
    payload.write_text(plan.payload_json())
    env = {**os.environ, **plan.env, "FTCLUSTER_CACHE": str(work / "cache"), "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "ftcluster.train.launch", "--standalone", f"--nproc-per-node={gpus}",
           "-m", "ftcluster.train", "--spec", str(payload)]
    t0 = time.monotonic()
    log_path = results / f"{name}.log"
    with log_path.open("w") as log:
        rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(work)).returncode
    wall = time.monotonic() - t0
    res = {"run": name, "method": method, "gpus": gpus, "steps": steps, "exit_code": rc, "wall_s": round(wall, 1),
           "seq_len": args.seq_len, "log": str(log_path)}
    metrics = out / "metrics.jsonl"
    if rc != 0 or not metrics.exists():
        res["error"] = log_path.read_text()[-3000:]
        return res
    recs = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    w = min(args.warmup, len(train) - 2)
    a, b = train[w], train[-1]
    tps = (b["tokens_seen"] - a["tokens_seen"]) / (b["elapsed_s"] - a["elapsed_s"])
    res.update({
        "tokens_per_s": round(tps), "tokens_per_s_per_gpu": round(tps / gpus),
        "step_time_s": round((b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"]), 3),
        "peak_mem_gb": round(max(r["peak_mem_gb"] for r in train), 1),
        "peak_mem_reserved_gb": round(max(r.get("peak_mem_reserved_gb", 0) for r in train), 1),
        "micro_batch_size": spec.training.micro_batch_size, "gradient_checkpointing": spec.training.gradient_checkpointing,
        "first_loss": train[0]["loss"], "last_loss": train[-1]["loss"],
    })
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results_dir", type=Path, help="results.json and the run logs go here")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="checkpoints, models, caches (tens of GB for zero3-1b); default RESULTS_DIR/work")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5, help="steps excluded from the throughput")
    ap.add_argument("--only", default="lora-8b,zero3-1b")
    ap.add_argument("--gpus", type=int, default=None, help="GPUs for zero3-1b (default: all visible)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--lora-micro-batch", type=int, default=8)
    ap.add_argument("--full-micro-batch", type=int, default=8)
    ap.add_argument("--no-grad-ckpt", action="store_true")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("error: no CUDA GPU visible; this benchmark measures GPU training", file=sys.stderr)
        return 1
    gpus = args.gpus or torch.cuda.device_count()
    results_dir = args.results_dir.resolve()
    work = (args.work_dir or results_dir / "work").resolve()
    results_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "corpus.jsonl"
    if not data.exists():  # ~1M words: every GPU gets full 2048-token micro-batches; epochs repeat
        write_corpus(data, records=1000, words_per_record=1000)
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "runs": []}
    plan = {"lora-8b": ("lora", 1), "zero3-1b": ("full", gpus)}
    for name in [n.strip() for n in args.only.split(",") if n.strip()]:
        method, g = plan[name]
        res = run_job(name, method, g, args.steps, work, data, args, results_dir)
        print(json.dumps({k: v for k, v in res.items() if k != "error"}), flush=True)
        if "error" in res:
            print(res["error"], file=sys.stderr)
        results["runs"].append(res)
        (results_dir / "results.json").write_text(json.dumps(results, indent=1))
    return 0 if all(r["exit_code"] == 0 for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
