"""What ``ftcluster plan`` says about full fine-tuning a 70B Llama on 1, 2 and 4 nodes of 8 GPUs (issue #22).

    .venv/bin/python benchmarks/plan_70b.py [--markdown]

No 70B run is possible here: these are the planner's predictions (docs/planner.md says how it models
memory, compute and communication, and which constants are measured). For each GPU type (A100-80GB,
H100, H200) and node count it evaluates every layout the planner tries for the job of
``examples/full-70b-slurm.yaml`` (Llama-3.1-70B shape, seq 4096, 2M tokens per step, bf16), keeps the
global batch, and prints the fastest layout that fits and, per ZeRO stage, the best one of that stage
with why it does or does not fit. Then one layout beside a published multi-node figure: torchtitan's
Llama 3 70B on 64 A100-80GB with FSDP2 (docs/performance.md of pytorch/torchtitan: local batch 1,
seq 8192, full activation checkpointing, 331 tokens/s per GPU, i.e. 24.7 s per step).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ftcluster.plan.launch import compile_plan  # noqa: E402
from ftcluster.plan.planner.advise import Evaluator, requested_layout, workload_of  # noqa: E402
from ftcluster.plan.planner.gpus import load_gpus  # noqa: E402
from ftcluster.plan.planner.layout import checkpointing_label  # noqa: E402
from ftcluster.plan.planner.shape import spec_shape  # noqa: E402
from ftcluster.spec.loader import load_spec, load_spec_text  # noqa: E402

EXAMPLE = ROOT / "examples" / "full-70b-slurm.yaml"
ENGINES = ("deepspeed", "fsdp")


def load(engine: str, overrides: list[str]):
    """The example's spec on ``engine``: the FSDP2 one without the deepspeed section (each engine has its own)."""
    if engine == "deepspeed":
        return load_spec(EXAMPLE, overrides=overrides)
    import json

    import yaml

    doc = yaml.safe_load(EXAMPLE.read_text())
    doc.pop("deepspeed", None)
    doc["engine"] = "fsdp"
    return load_spec_text(json.dumps(doc), str(EXAMPLE), overrides=overrides)
GPUS = ("a100-80g", "h100", "h200")
NODES = (1, 2, 4)
GiB = 2**30


def how(o) -> str:
    lay = o.layout
    off = "+offload(" + ",".join(n for n, on in (("opt", lay.offload_optimizer), ("params", lay.offload_params))
                                 if on) + ")" if lay.offload_optimizer or lay.offload_params else ""
    return lay.engine_label() + ("+cpu-offload" if off and lay.engine == "fsdp" else off if off else "")


def row(gpu: str, nodes: int, o, label: str) -> str:
    lay = o.layout
    tps = o.tokens_per_step / o.step_time_s / lay.world
    fits = "fits" if o.fits else f"no: needs {o.memory.total / GiB:.0f} of {o.usable / GiB:.0f} GiB"
    return (f"| {gpu} | {nodes}x8 | {label} | {how(o)} | {lay.micro_batch_size}x{lay.gradient_accumulation_steps} | "
            f"{checkpointing_label(lay.gradient_checkpointing, short=True)} | {o.memory.total / GiB:.1f} | "
            f"{o.step_time_s:.1f} | {tps:,.0f} | {o.usd_per_million_tokens:.2f} | {fits} |")


def evaluator(spec, gpu: str):
    launch = compile_plan(spec)
    shape = spec_shape(spec, network=False)
    w = workload_of(spec, shape, None, launch)
    g = load_gpus()[gpu]
    return Evaluator(w, g, spec, None, (w.lora_r, w.lora_targets, w.lora_dropout)), launch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", action="store_true")
    ap.parse_args()
    print("| GPU | nodes | what | layout | mb x acc | ckpt | GiB/GPU | step s | tok/s/GPU | $/1M tok | fits |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for gpu in GPUS:
        for nodes in NODES:
            for engine in ENGINES:
                spec = load(engine, [f"resources.gpu_type={gpu}", f"resources.nodes={nodes}"])
                ev, launch = evaluator(spec, gpu)
                req = requested_layout(spec, gpu, launch.recipe.planner_model)
                opts = [o for o in ev.options("full", req) if o.layout.nodes == nodes and o.layout.gpus_per_node == 8]
                if engine == "fsdp":  # FSDP2 has two layouts: resharding after forward (ZeRO-3's memory) or not
                    opts = [o for o in opts if o.layout.zero_stage in (2, 3)]
                fitting = [o for o in opts if o.fits]
                if fitting:
                    print(row(gpu, nodes, min(fitting, key=lambda o: o.step_time_s), f"**{engine}: fastest**"))
                else:
                    print(f"| {gpu} | {nodes}x8 | **{engine}: nothing fits** | | | | | | | | |")
                if engine == "fsdp":
                    continue
                for stage in (0, 1, 2):
                    same = [o for o in opts if o.layout.zero_stage == stage]
                    fit = [o for o in same if o.fits]
                    best = min(fit, key=lambda o: o.step_time_s) if fit else min(same, key=lambda o: o.memory.total)
                    print(row(gpu, nodes, best, f"best ZeRO-{stage}" if fit else f"ZeRO-{stage}, smallest"))
    # Beside torchtitan's published run: 64 A100, local batch 1, seq 8192, full AC (their FSDP2; here ZeRO-3).
    print()
    print("torchtitan, Llama 3 70B, 64 A100-80GB, FSDP2, mb 1, seq 8192, full AC: 331 tok/s/GPU, 24.7 s/step "
          "(published); the planner in that layout:")
    for engine in ENGINES:
        spec = load(engine, ["resources.gpu_type=a100-80g", "resources.nodes=8", "data.seq_len=8192",
                             "training.micro_batch_size=1", "training.gradient_accumulation_steps=1",
                             "training.gradient_checkpointing=true", "model.attn_implementation=flash_attention_2"])
        ev, launch = evaluator(spec, "a100-80g")
        o = ev.evaluate(requested_layout(spec, "a100-80g", launch.recipe.planner_model))
        print(f"  {engine}: {o.step_time_s:.1f} s/step, {o.tokens_per_step / o.step_time_s / 64:,.0f} tok/s/GPU, "
              f"{o.memory.total / GiB:.1f} GiB/GPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
