"""Planner accuracy: predicted against measured peak memory and step time.

    python benchmarks/plan_accuracy.py RESULTS [RESULTS ...] [--json] [--markdown]

RESULTS is either

* a ``plan_accuracy.jsonl`` written by ``benchmarks/speed.py`` (one run per line: the
  configuration, ``max_memory_allocated_bytes``, ``step_s``, ``overrides`` and ``runtime``), or
* a ``results.json`` written by ``benchmarks/gpu_train.py`` (``{"runs": [...]}``) or a plain list
  of runs with ``peak_mem_gb`` (GiB) and ``step_time_s`` (or ``tokens_per_s_per_gpu``).

Needed per run: ``method``, ``gpus``, ``seq_len``, ``micro_batch_size``,
``gradient_checkpointing``. Optional, with gpu_train.py's settings as defaults: ``preset``
(lora: llama-3-8b, full: llama-3.2-1b), ``zero_stage`` (3), ``nodes`` (1),
``gradient_accumulation_steps`` (1), ``lora_r`` (16), ``lora_targets`` (all-linear),
``lora_dropout`` (0.0), ``gpu_type`` or ``device`` (h200), ``attn_implementation`` (sdpa),
``precision`` (bf16).

Which runtime a run measured, and so how the planner is asked (docs/planner.md, "Speed-ups"):

* ``current``: train/speedups.py on (``runtime`` starts with "train/speedups.py on") and no
  overrides: the planner's default for a Llama model (fused loss, ZeRO-3 keep, NCCL Simple);
* ``plain``: the plain path, which the runtime still takes without liger-kernel, for a
  non-Llama model or with ``FTCLUSTER_FUSED_CE=0``/``FTCLUSTER_ZERO3_KEEP=0``: runs from
  before speedups.py (and results.json files) and runs with exactly those switches off. Their
  step time is compared only on one GPU: on two, NCCL chose its LL protocol (``auto``), which
  the planner does not model (it models the Simple protocol the runtime now sets);
* ``probe``: any other override (a hand-written DeepSpeed config, NCCL_PROTO, a probe
  variable): shown for reference, never counted.

The issue's targets: memory within +-10 % and step time within +-20 % of measured. Exit status
1 when a counted run misses either target.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ftcluster.plan.planner.gpus import load_gpus, normalise  # noqa: E402
from ftcluster.plan.planner.layout import Layout, Workload  # noqa: E402
from ftcluster.plan.planner.memory import per_gpu_memory, zero3_keeps  # noqa: E402
from ftcluster.plan.planner.shape import PRESET_SHAPES, count_lora, shape_from_config  # noqa: E402
from ftcluster.plan.planner.speed import step_seconds  # noqa: E402

MEM_TOL, TIME_TOL = 0.10, 0.20
OFF_SWITCHES = {"env.FTCLUSTER_FUSED_CE", "env.FTCLUSTER_ZERO3_KEEP", "env.FTCLUSTER_NCCL_PROTO", "env.FTCLUSTER_VARLEN"}
# The runtime runs the varlen attention (train/varlen.py) for SDPA models on a GPU since this
# date's runs (commit 2a06129); later runs say so in their ``runtime`` note.
VARLEN_SINCE = "2026-12-01"


def varlen_of(run: dict) -> bool:
    """Whether a measured run computed attention with the varlen kernel (the planner then models
    flash_attention_2, as advise.varlen_of does for a spec)."""
    if str((run.get("overrides") or {}).get("env.FTCLUSTER_VARLEN", "auto")).lower() in ("0", "off"):
        return False
    if run.get("attn_implementation", "sdpa") != "sdpa" or str(run.get("device", "")).lower() == "cpu":
        return False
    return "varlen" in str(run.get("runtime", "")) or str(run.get("date", "")) >= VARLEN_SINCE


def runtime_of(run: dict) -> str:
    """'current', 'plain' or 'probe' (see the module docstring)."""
    # The varlen switch is modelled on its own (varlen_of); it leaves the other speed-ups on.
    # The engine is modelled too (engine_of), and compiled layers (compiled_of, since 2026-12-08).
    over = {k: v for k, v in (run.get("overrides") or {}).items()
            if k not in ("env.FTCLUSTER_VARLEN", "engine", "fsdp.reshard_after_forward", "training.compile")}
    rt = str(run.get("runtime", ""))
    if over and not set(over) <= OFF_SWITCHES:
        return "probe"
    if over:
        return "plain" if all(str(v).lower() in ("0", "off", "auto") for v in over.values()) else "probe"
    return "current" if rt.startswith("train/speedups.py on") else "plain"


def compiled_of(run: dict) -> bool:
    """The run compiled its decoder layers: ``training.compile: true`` (every measured run before
    2026-12-08 left it at false, the default then; a GPU run's ``auto`` is on, as the planner models it)."""
    v = (run.get("overrides") or {}).get("training.compile", run.get("compile", False))
    return v is True or (v == "auto" and str(run.get("device", "")).lower() != "cpu")


def engine_of(run: dict) -> tuple[str, int | None]:
    """(engine, the ZeRO stage the planner models it with): FSDP2 resharding after forward is
    stage 3's memory, without it stage 2's (planner.layout.Layout.engine_label)."""
    over = run.get("overrides") or {}
    if over.get("engine") == "fsdp":
        return "fsdp", 3 if over.get("fsdp.reshard_after_forward", True) else 2
    return "deepspeed", None if run["method"] == "lora" else int(run.get("zero_stage") or 3)


def predict(run: dict) -> tuple[float, float]:
    """(peak GiB, step seconds) the planner predicts for one measured run."""
    method = run["method"]
    preset = run.get("preset") or ("llama-3-8b" if method == "lora" else "llama-3.2-1b")
    cfg = {"model_type": "llama", **PRESET_SHAPES[preset]}
    layers = (run.get("model") or {}).get("layers")
    if layers:  # a preset cut to fewer layers (speed.py's 8b8)
        cfg["num_hidden_layers"] = int(layers)
    shape = shape_from_config(cfg, preset)
    targets = run.get("lora_targets", "all-linear")
    on = runtime_of(run) == "current"
    attn = "flash_attention_2" if varlen_of(run) else run.get("attn_implementation", "sdpa")
    w = Workload(shape, int(run["seq_len"]), precision=run.get("precision", "bf16"),
                 attn_implementation=attn, lora_r=int(run.get("lora_r", 16)),
                 lora_targets=targets if isinstance(targets, str) else tuple(targets),
                 lora_dropout=float(run.get("lora_dropout", 0.0)), fused_ce=on, zero3_keep=on,
                 compiled=compiled_of(run),
                 # the planner's estimate of the corpus's packed example span (speed.py records it since
                 # 2026-12-08; earlier records: the whole row, as the planner assumed then)
                 attention_span=run.get("attention_span") if run.get("packing", True) else None)
    nodes = int(run.get("nodes", 1))
    lay = Layout(method, nodes, int(run["gpus"]) // nodes, int(run["micro_batch_size"]),
                 int(run.get("gradient_accumulation_steps", 1)), float(run["gradient_checkpointing"]),
                 engine_of(run)[1],
                 gpu=normalise(run.get("gpu_type") or run.get("device") or "h200"), engine=engine_of(run)[0])
    gpu = load_gpus()[lay.gpu]
    total = shape.total_params()
    if method == "lora":
        c = count_lora(shape, w.lora_r, targets if isinstance(targets, str) else list(targets))
        mem = per_gpu_memory(w, lay, total + c.trainable, c.trainable, c.adapter)
        step = step_seconds(w, lay, gpu, total + c.trainable, c.trainable)
    else:
        keep = zero3_keeps(w, lay, total, gpu.memory_bytes)
        mem = per_gpu_memory(w, lay, total, total, keep=keep)
        step = step_seconds(w, lay, gpu, total, total, keep=keep)
    return mem.total / 2**30, step


def measured_step(run: dict) -> float | None:
    """Measured seconds per step, or None where the planner's step time does not apply."""
    if runtime_of(run) == "plain" and int(run["gpus"]) > 1:
        return None  # NCCL protocol auto (LL): not the communication the planner models
    for key in ("step_s", "step_time_s"):
        if run.get(key):
            return float(run[key])
    if run.get("tokens_per_s_per_gpu"):
        tokens = run["micro_batch_size"] * run.get("gradient_accumulation_steps", 1) * run["seq_len"]
        return tokens / float(run["tokens_per_s_per_gpu"])
    return None


def _normalise_record(r: dict) -> dict:
    """A plan_accuracy.jsonl record in the results.json vocabulary (GiB, lora_* keys)."""
    out = dict(r)
    if "max_memory_allocated_bytes" in r:
        out["peak_mem_gb"] = r["max_memory_allocated_bytes"] / 2**30
    if isinstance(r.get("lora"), dict):
        out.setdefault("lora_r", r["lora"].get("r", 16))
        out.setdefault("lora_targets", r["lora"].get("target_modules", "all-linear"))
        out.setdefault("lora_dropout", r["lora"].get("dropout", 0.0))
    return out


def load_runs(paths: list[Path]) -> list[dict]:
    """Every successful measured run in ``paths`` (jsonl or json), numbered in file order."""
    runs = []
    for p in paths:
        text = p.read_text()
        if p.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
            records = data["runs"] if isinstance(data, dict) else data
        for i, r in enumerate(records):
            r = _normalise_record(r)
            if r.get("exit_code", 0) == 0 and "peak_mem_gb" in r:
                runs.append({**r, "file": str(p), "line": i + 1})
    return runs


def describe(r: dict) -> str:
    """'8B full Z3 2g mb2 2k ckpt' - the configuration in a table cell."""
    size = {"llama-3-8b": "8B", "llama-3.2-1b": "1B"}.get(r.get("preset") or "", r.get("preset") or "?")
    engine, stage = engine_of(r)
    how = "LoRA" if r["method"] == "lora" else (
        ("full FSDP2" if stage == 3 else "full FSDP2 no-reshard") if engine == "fsdp" else f"full Z{stage}")
    seq = f"{r['seq_len'] // 1024}k" if r["seq_len"] % 1024 == 0 else str(r["seq_len"])
    return (f"{size} {how} {r['gpus']}g mb{r['micro_batch_size']} {seq} "
            f"{_ckpt(r['gradient_checkpointing'])}" + (" compiled" if compiled_of(r) else ""))


def _ckpt(share: bool | float) -> str:
    return "ckpt" if share is True or share == 1 else "no-ckpt" if not share else f"ckpt {share:g}"


def evaluate(runs: list[dict]) -> list[dict]:
    rows = []
    for r in runs:
        mem, step = predict(r)
        ms = measured_step(r)
        mem_err = mem / r["peak_mem_gb"] - 1
        step_err = None if ms is None else step / ms - 1
        group = runtime_of(r)
        hit = abs(mem_err) <= MEM_TOL and (step_err is None or abs(step_err) <= TIME_TOL)
        rows.append({"run": r.get("run") or f"#{r['line']}", "config": describe(r),
                     "runtime": group, "overrides": r.get("overrides") or {},
                     "measured_gib": round(r["peak_mem_gb"], 2), "predicted_gib": round(mem, 2),
                     "mem_error": round(mem_err, 4), "measured_step_s": ms, "predicted_step_s": round(step, 3),
                     "step_error": None if step_err is None else round(step_err, 4), "within_targets": hit})
    return rows


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def print_table(rows: list[dict], markdown: bool) -> None:
    head = ["run", "runtime", "configuration", "GiB meas", "pred", "err", "step s meas", "pred", "err", ""]
    if markdown:
        print("| " + " | ".join(head[:-1]) + " | verdict |")
        print("|" + "---|" * len(head))
    for x in rows:
        ms = "-" if x["measured_step_s"] is None else f"{x['measured_step_s']:.3f}"
        verdict = "probe" if x["runtime"] == "probe" else ("ok" if x["within_targets"] else "MISS")
        cells = [x["run"], x["runtime"], x["config"], f"{x['measured_gib']:.1f}", f"{x['predicted_gib']:.1f}",
                 _pct(x["mem_error"]), ms, f"{x['predicted_step_s']:.3f}", _pct(x["step_error"]), verdict]
        if markdown:
            print("| " + " | ".join(cells) + " |")
        else:
            print(f"{cells[0]:<10} {cells[1]:<7} {cells[2]:<28} {cells[3]:>8} {cells[4]:>6} {cells[5]:>7}  "
                  f"{cells[6]:>11} {cells[7]:>6} {cells[8]:>7}  {cells[9]}")
    counted = [x for x in rows if x["runtime"] != "probe"]
    if counted:
        mem_ok = sum(abs(x["mem_error"]) <= MEM_TOL for x in counted)
        timed = [x for x in counted if x["step_error"] is not None]
        step_ok = sum(abs(x["step_error"]) <= TIME_TOL for x in timed)
        configs = {(x["config"], x["runtime"]) for x in counted}
        print(f"\n{len(counted)} runs counted ({len(configs)} distinct configuration/runtime pairs), "
              f"{len(rows) - len(counted)} probes: memory within +-10 % in {mem_ok}/{len(counted)}, "
              f"step time within +-20 % in {step_ok}/{len(timed)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--json", action="store_true", help="one JSON object per run instead of the table")
    ap.add_argument("--markdown", action="store_true", help="the table as Markdown (docs/BENCHMARKS.md)")
    args = ap.parse_args()
    rows = evaluate(load_runs(args.results))
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print_table(rows, args.markdown)
    return 0 if all(x["within_targets"] for x in rows if x["runtime"] != "probe") else 1


if __name__ == "__main__":
    sys.exit(main())
