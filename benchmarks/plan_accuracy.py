"""Planner accuracy: predicted against measured peak memory and step time.

    python benchmarks/plan_accuracy.py RESULTS.json [RESULTS.json ...] [--json]

Each file is a ``results.json`` written by ``benchmarks/gpu_train.py`` (``{"runs": [...]}``) or a
plain list of runs. A run needs ``method``, ``gpus``, ``seq_len``, ``micro_batch_size``,
``gradient_checkpointing`` and the measurements ``peak_mem_gb`` (GiB, from
``torch.cuda.max_memory_allocated``) and ``step_time_s`` (or ``tokens_per_s_per_gpu``).
Optional keys, with gpu_train.py's own settings as defaults: ``preset`` (lora: llama-3-8b,
full: llama-3.2-1b), ``zero_stage`` (3), ``nodes`` (1), ``gradient_accumulation_steps`` (1),
``lora_r`` (16), ``lora_targets`` (all-linear), ``lora_dropout`` (0.0), ``gpu_type`` (h200),
``attn_implementation`` (sdpa), ``precision`` (bf16), ``source`` (free text).

The issue's targets: memory within +-10 % and step time within +-20 % of measured.
Exit status 1 when a run misses either target.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ftcluster.planner.gpus import load_gpus, normalise  # noqa: E402
from ftcluster.planner.layout import Layout, Workload  # noqa: E402
from ftcluster.planner.memory import per_gpu_memory  # noqa: E402
from ftcluster.planner.shape import PRESET_SHAPES, count_lora, shape_from_config  # noqa: E402
from ftcluster.planner.speed import step_seconds  # noqa: E402

MEM_TOL, TIME_TOL = 0.10, 0.20


def predict(run: dict) -> tuple[float, float]:
    """(peak GiB, step seconds) the planner predicts for one measured run."""
    method = run["method"]
    preset = run.get("preset") or ("llama-3-8b" if method == "lora" else "llama-3.2-1b")
    shape = shape_from_config({"model_type": "llama", **PRESET_SHAPES[preset]}, preset)
    targets = run.get("lora_targets", "all-linear")
    w = Workload(shape, int(run["seq_len"]), precision=run.get("precision", "bf16"),
                 attn_implementation=run.get("attn_implementation", "sdpa"), lora_r=int(run.get("lora_r", 16)),
                 lora_targets=targets if isinstance(targets, str) else tuple(targets),
                 lora_dropout=float(run.get("lora_dropout", 0.0)))
    nodes = int(run.get("nodes", 1))
    lay = Layout(method, nodes, int(run["gpus"]) // nodes, int(run["micro_batch_size"]),
                 int(run.get("gradient_accumulation_steps", 1)), bool(run["gradient_checkpointing"]),
                 None if method == "lora" else int(run.get("zero_stage", 3)), gpu=normalise(run.get("gpu_type", "h200")))
    gpu = load_gpus()[lay.gpu]
    total = shape.total_params()
    if method == "lora":
        c = count_lora(shape, w.lora_r, targets if isinstance(targets, str) else list(targets))
        mem = per_gpu_memory(w, lay, total + c.trainable, c.trainable, c.adapter)
        step = step_seconds(w, lay, gpu, total + c.trainable, c.trainable)
    else:
        mem = per_gpu_memory(w, lay, total, total)
        step = step_seconds(w, lay, gpu, total, total)
    return mem.total / 2**30, step


def measured_step(run: dict) -> float | None:
    if run.get("step_time_s"):
        return float(run["step_time_s"])
    if run.get("tokens_per_s_per_gpu"):
        tokens = run["micro_batch_size"] * run.get("gradient_accumulation_steps", 1) * run["seq_len"]
        return tokens / float(run["tokens_per_s_per_gpu"])
    return None


def load_runs(paths: list[Path]) -> list[dict]:
    runs = []
    for p in paths:
        data = json.loads(p.read_text())
        for r in data["runs"] if isinstance(data, dict) else data:
            if r.get("exit_code", 0) == 0 and "peak_mem_gb" in r:
                runs.append({**r, "file": str(p)})
    return runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--json", action="store_true", help="one JSON object per run instead of the table")
    args = ap.parse_args()
    ok = True
    rows = []
    for r in load_runs(args.results):
        mem, step = predict(r)
        ms = measured_step(r)
        mem_err = mem / r["peak_mem_gb"] - 1
        step_err = None if ms is None else step / ms - 1
        hit = abs(mem_err) <= MEM_TOL and (step_err is None or abs(step_err) <= TIME_TOL)
        ok &= hit
        rows.append({"run": r.get("run", "?"), "method": r["method"], "preset": r.get("preset"), "gpus": r["gpus"],
                     "zero_stage": r.get("zero_stage"), "seq_len": r["seq_len"], "micro_batch_size": r["micro_batch_size"],
                     "gradient_checkpointing": r["gradient_checkpointing"], "measured_gib": r["peak_mem_gb"],
                     "predicted_gib": round(mem, 2), "mem_error": round(mem_err, 4), "measured_step_s": ms,
                     "predicted_step_s": round(step, 3), "step_error": None if step_err is None else round(step_err, 4),
                     "within_targets": hit})
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0 if ok else 1
    print(f"{'run':<28} {'gpus':>4} {'mb':>3} {'ckpt':>4} {'seq':>5}  {'GiB meas':>8} {'pred':>6} {'err':>6}  "
          f"{'step meas':>9} {'pred':>6} {'err':>6}")
    for x in rows:
        se = "-" if x["step_error"] is None else f"{100 * x['step_error']:+.1f}%"
        ms = "-" if x["measured_step_s"] is None else f"{x['measured_step_s']:.3f}"
        print(f"{x['run']:<28} {x['gpus']:>4} {x['micro_batch_size']:>3} {'on' if x['gradient_checkpointing'] else 'off':>4} "
              f"{x['seq_len']:>5}  {x['measured_gib']:>8.1f} {x['predicted_gib']:>6.1f} {100 * x['mem_error']:>+5.1f}%  "
              f"{ms:>9} {x['predicted_step_s']:>6.3f} {se:>6}{'' if x['within_targets'] else '  MISS'}")
    mem_errs = [abs(x["mem_error"]) for x in rows]
    step_errs = [abs(x["step_error"]) for x in rows if x["step_error"] is not None]
    if rows:
        print(f"{len(rows)} runs; memory max |error| {100 * max(mem_errs):.1f}%"
              + (f", step time max |error| {100 * max(step_errs):.1f}%" if step_errs else ""))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
