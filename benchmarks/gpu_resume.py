"""Preempt-and-resume on a GPU with the real launcher, compared with an uninterrupted run.

Three runs of the same spec (Llama-3.2-1B shape, random init, bf16, LoRA or ZeRO-3 full FT):

1. ``straight``: uninterrupted, ``--steps`` optimizer steps;
2. ``preempted``: the same spec into a fresh output; when the log shows step ``--kill-at``,
   SIGUSR2 goes to the launcher (as the Slurm script's trap forwards it); the run must exit
   143 after committing a checkpoint;
3. ``resumed``: the same command again; it must resume from the committed step and finish.

It then compares the per-step training loss of straight vs preempted+resumed and writes
``resume.json`` (max absolute and relative difference per step; steps after the resume point
are what matter). bf16 on GPU is not bitwise deterministic (atomics in SDPA/cuBLAS), so the
figure is reported, not asserted; the CPU test (tests/e2e/test_train_runtime.py) asserts 1e-5.

    python benchmarks/gpu_resume.py RESULTS_DIR [--method lora|full] [--steps 40] [--kill-at 17]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def spec_text(name: str, method: str, data: Path, out: Path, steps: int, preset: str, seq_len: int,
              vocab: int, ckpt_every: int) -> str:
    model = f"{{preset: {preset}}}" if preset != "small" else (
        "{hidden_size: 1024, intermediate_size: 2816, num_hidden_layers: 8, num_attention_heads: 16, "
        "num_key_value_heads: 8, vocab_size: " + str(vocab) + ", max_position_embeddings: 4096}")
    text = f"""
name: {name}
method: {method}
model: {{random_init: {model}, attn_implementation: sdpa}}
tokenizer: {{train_vocab_size: {vocab}}}
data: {{train: {data}, format: text, seq_len: {seq_len}, packing: true}}
training:
  learning_rate: 1.0e-4
  warmup_steps: 2
  max_steps: {steps}
  micro_batch_size: 4
  gradient_checkpointing: true
  precision: bf16
  log_every_steps: 1
  seed: 7
resources: {{gpus_per_node: 1}}
output: {{uri: {out.as_uri()}, checkpoint_every_steps: {ckpt_every}, keep_last: 1}}
"""
    if method == "lora":
        return text + "lora: {r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear}\n"
    return text + "deepspeed: {zero_stage: 3}\n"


def launch(payload: Path, env: dict, log: Path, kill_at: int | None) -> tuple[int, float]:
    cmd = [sys.executable, "-m", "ftcluster.train.launch", "--standalone", "--nproc-per-node=1",
           "-m", "ftcluster.train", "--spec", str(payload)]
    t0 = time.monotonic()
    with log.open("a") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sent = False
        for line in proc.stdout:
            fh.write(line)
            if kill_at is not None and not sent and f"step {kill_at}/" in line:
                proc.send_signal(signal.SIGUSR2)
                fh.write(f"### benchmark: sent SIGUSR2 to the launcher after step {kill_at}\n")
                sent = True
        return proc.wait(), time.monotonic() - t0


def losses(out: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in recs if r.get("kind") == "train"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results_dir", type=Path)
    ap.add_argument("--work-dir", type=Path, default=None)
    ap.add_argument("--method", choices=("lora", "full"), default="lora")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--kill-at", type=int, default=17)
    ap.add_argument("--preset", default="llama-3.2-1b", help="a preset, or small (~110M params: ZeRO-3 checkpoints that fit a small disk); tiny checks the script on a CPU")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--ckpt-every", type=int, default=5, help="periodic checkpoint interval in steps")
    ap.add_argument("--vocab", type=int, default=8000, help="trained tokenizer size (512 for --preset tiny)")
    args = ap.parse_args()
    from gpu_train import write_corpus

    from ftcluster.plan.launch import compile_plan
    from ftcluster.spec.loader import load_spec_text

    res_dir = args.results_dir.resolve()
    work = (args.work_dir or res_dir / "work").resolve()
    res_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "corpus.jsonl"
    if not data.exists():
        write_corpus(data, records=1000, words_per_record=1000)
    env = {**os.environ, "FTCLUSTER_CACHE": str(work / "cache"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result: dict = {"method": args.method, "steps": args.steps, "kill_at": args.kill_at}
    outs = {}
    for name in ("straight", "preempted"):
        out = work / f"{args.method}-{name}"
        outs[name] = out
        spec = load_spec_text(spec_text(f"resume-{name}", args.method, data, out, args.steps,
                                          args.preset, args.seq_len, args.vocab, args.ckpt_every), f"<{name}>")
        plan = compile_plan(spec)
        env.update(plan.env)
        payload = work / f"{name}.payload.json"
        payload.write_text(plan.payload_json())
        log = res_dir / f"resume-{args.method}-{name}.log"
        if name == "straight":
            rc, wall = launch(payload, env, log, None)
            result["straight"] = {"exit_code": rc, "wall_s": round(wall, 1)}
        else:
            rc, wall = launch(payload, env, log, args.kill_at)
            result["preempted"] = {"exit_code": rc, "wall_s": round(wall, 1)}
            rc2, wall2 = launch(payload, env, log, None)
            result["resumed"] = {"exit_code": rc2, "wall_s": round(wall2, 1)}
            text = log.read_text()
            result["resumed"]["resumed_line"] = next((ln for ln in text.splitlines() if "resumed from checkpoint" in ln), None)
    a, b = losses(outs["straight"]), losses(outs["preempted"])
    common = sorted(set(a) & set(b))
    diffs = {s: abs(a[s] - b[s]) for s in common}
    result.update({
        "steps_straight": max(a) if a else None, "steps_preempted_resumed": max(b) if b else None,
        "max_abs_loss_diff": max(diffs.values()) if diffs else None,
        "max_rel_loss_diff": max(diffs[s] / abs(a[s]) for s in common) if common else None,
        "loss_straight": [a[s] for s in common], "loss_resumed": [b[s] for s in common],
    })
    (res_dir / f"resume-{args.method}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("loss_")}))
    ok = (result["straight"]["exit_code"] == 0 and result["preempted"]["exit_code"] == 143
          and result["resumed"]["exit_code"] == 0 and result["steps_preempted_resumed"] == args.steps)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
