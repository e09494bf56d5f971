"""ftcluster against the plain stack, side by side, in one call on the same GPUs.

For each case it runs the plain baseline (``ds_baseline.py`` / ``lora_baseline.py`` from
``--baselines``, optionally with Liger-Kernel applied first, as the baseline README says) and
ftcluster (a spec in the shape of ``gpu_train.py``'s, through ``python -m ftcluster.train.launch``),
then prints one table: tokens/s per GPU, MFU against 790 TFLOP/s (the measured bf16 matrix
rate of an H200), peak allocated and reserved GB (10^9 bytes, both stacks), and, for runs
that checkpoint, the seconds a checkpoint blocks training (from metrics.jsonl: the step that
saved, minus the median step) and the slowdown of the steps while the upload runs.

    python benchmarks/speed.py OUT_DIR --baselines DIR [--warm-up] [--cases z3-mb2,lora-mb8] [--steps 14]
    python benchmarks/speed.py OUT_DIR --list                     # the known cases

Every case is ``name: (stack runs..., gpus, shape)``; ``--cases`` picks them, ``--only``
restricts the stacks (``plain``, ``liger``, ``ft``); ``p-METHOD-zSTAGE-gGPUS-mbMB-sSEQ-SHAPE-gcCKPT``
names an ad-hoc ftcluster-only case, and every ftcluster run appends its configuration,
``max_memory_allocated`` and step time to ``OUT_DIR/plan_accuracy.jsonl`` (the planner's
accuracy data). ``--warm-up`` first runs an untimed small job on every GPU (a freshly started
machine ran its first heavy job 1.3-1.4x slower). ftcluster runs go through
``benchmarks/ds_probe.py``, which skips the final checkpoint and exports. Throughput counts real (non-padding)
tokens for ftcluster and all tokens for the baselines (random ids, no padding); the
synthetic corpus packs to about 98 % full blocks, so the two agree to that. Results land in
``OUT_DIR/speed.json`` and one log per run. MFU uses the baselines' formula: 6N (full) or 4N
(LoRA: forward plus activation gradients) plus 12 x layers x seq x hidden per token.

Variable-length cases (``vl-*``, and ``smoke-varlen`` on CPU; issue #10) train ftcluster only,
on instruction data from ``benchmarks/instruct_data.py`` (written into the work dir at run
time; profile per case), twice: ``packing: true`` and ``packing: false``, same micro-batch and
seq_len. Their own table gives real tokens/s per GPU (tokens with attention_mask 1: prompt and
answer, bos and eos; ``tokens_seen`` counts exactly these; the learned share is shown apart),
the fraction of the computed batch that is real (each micro-batch is as wide as its longest
row rounded up to 64, recorded per batch by ``ds_probe.py``), step time, peak memory, and
packing's gain (packed over padded real tokens/s).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PEAK_TFLOPS = 790.0
SHAPES = {  # layers, hidden, intermediate, heads, kv heads, vocab, tied embeddings
    "8b": (32, 4096, 14336, 32, 8, 128256, False),
    "1b": (16, 2048, 8192, 32, 8, 128256, True),
    "8b8": (8, 4096, 14336, 32, 8, 128256, False),  # the 8B shape cut to 8 layers: full fine-tuning on one GPU
    "tiny": (2, 64, 128, 4, 2, 512, False),
}
PRESET = {"8b": "llama-3-8b", "1b": "llama-3.2-1b", "tiny": "tiny", "8b8": "llama-3-8b"}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def n_params(shape: str) -> int:
    layers, h, inter, heads, kv, vocab, tied = SHAPES[shape]
    hd = h // heads
    per_layer = h * h * 2 + 2 * h * kv * hd + 3 * h * inter + 2 * h
    return layers * per_layer + vocab * h * (1 if tied else 2) + h


def flops_per_token(shape: str, seq: int, lora: bool) -> float:
    layers, h = SHAPES[shape][0], SHAPES[shape][1]
    return (4 if lora else 6) * n_params(shape) + 12 * layers * seq * h


# name -> dict(method, stage, gpus, mb, shape, ckpt_every, seq, grad_ckpt)
CASES: dict[str, dict] = {
    "z3-mb1": dict(method="full", stage=3, gpus=2, mb=1),
    "z3-mb2": dict(method="full", stage=3, gpus=2, mb=2),
    "z3-mb4": dict(method="full", stage=3, gpus=2, mb=4),
    "z3-mb8": dict(method="full", stage=3, gpus=2, mb=8),
    "z2-mb2": dict(method="full", stage=2, gpus=2, mb=2),
    "z2-mb1": dict(method="full", stage=2, gpus=2, mb=1),
    "z2-mb4": dict(method="full", stage=2, gpus=2, mb=4),
    "z2-mb8": dict(method="full", stage=2, gpus=2, mb=8),
    "lora-mb8": dict(method="lora", gpus=1, mb=8),
    "lora-mb4-nockpt": dict(method="lora", gpus=1, mb=4, grad_ckpt=False),
    # Without or with selective checkpointing (a share of the layers). The plain stack runs
    # without checkpointing where the case has none (``_wrap --no-ckpt``), and with every
    # layer checkpointed where the case has a share (it has no selective checkpointing).
    "z3-mb2-gc0": dict(method="full", stage=3, gpus=2, mb=2, grad_ckpt=False),
    "z3-mb4-gc05": dict(method="full", stage=3, gpus=2, mb=4, grad_ckpt=0.5),
    "z2-mb2-gc0": dict(method="full", stage=2, gpus=2, mb=2, grad_ckpt=False),
    "z2-mb4-gc05": dict(method="full", stage=2, gpus=2, mb=4, grad_ckpt=0.5),
    "z2-mb4-gc0": dict(method="full", stage=2, gpus=2, mb=4, grad_ckpt=False),
    "z3-mb4-gc0": dict(method="full", stage=3, gpus=2, mb=4, grad_ckpt=False),
    "lora-mb2-gc0": dict(method="lora", gpus=1, mb=2, grad_ckpt=False),
    "lora-mb8-gc05": dict(method="lora", gpus=1, mb=8, grad_ckpt=0.5),
    "lora-mb8-ckpt5": dict(method="lora", gpus=1, mb=8, ckpt_every=5, only=("ft",)),
    "z3-1b-ckpt5": dict(method="full", stage=3, gpus=2, mb=8, shape="1b", ckpt_every=5, only=("ft",)),
    # checkpoints further apart than their writes take: the device-to-host copy alone blocks
    "z3-1b-ckpt50": dict(method="full", stage=3, gpus=2, mb=8, shape="1b", ckpt_every=50, only=("ft",)),
    # one GPU: the first checkpoint with its host buffers pinned ahead (asyncsave.reserve) or not
    # one GPU, full fine-tuning of the 8B shape with 8 layers (plain: ds_baseline --layers 8): compute only, no links
    "z2-8b8-g1-mb4-gc0": dict(method="full", stage=2, gpus=1, mb=4, shape="8b8", grad_ckpt=False),
    "z2-1b-g1-ckpt60": dict(method="full", stage=2, gpus=1, mb=8, shape="1b", ckpt_every=60, only=("ft",)),
    # CPU smoke tests of this script (tiny model, ftcluster only)
    "smoke-lora": dict(method="lora", gpus=1, mb=2, shape="tiny", seq=128, ckpt_every=5, only=("ft",)),
    "smoke-full": dict(method="full", stage=2, gpus=1, mb=2, shape="tiny", seq=128, only=("ft",)),
    # variable-length instruction data, packing vs padding (instruct_data.py profiles; ftcluster only)
    "vl-lora-mb8": dict(method="lora", gpus=1, mb=8, data="sharegpt", only=("ft",)),
    "vl-lora-mb8-alpaca": dict(method="lora", gpus=1, mb=8, data="alpaca", only=("ft",)),
    "vl-z3-mb4": dict(method="full", stage=3, gpus=2, mb=4, data="sharegpt", only=("ft",)),
    "smoke-varlen": dict(method="lora", gpus=1, mb=2, shape="tiny", seq=128, data="smoke", only=("ft",)),
}


def adhoc(name: str) -> dict:
    """``p-METHOD-zSTAGE-gGPUS-mbMB-sSEQ-SHAPE-gcCKPT``, e.g. p-full-z3-g2-mb4-s4096-1b-gc1: ftcluster only.
    CKPT is 1 (every layer), 0 (none) or a share of the layers such as 0.375."""
    _, method, z, g, mb, seq, shape, gc = name.split("-")
    share = float(gc[2:])
    return dict(method=method, stage=int(z[1:]), gpus=int(g[1:]), mb=int(mb[2:]), seq=int(seq[1:]), shape=shape,
                grad_ckpt=share if 0 < share < 1 else share == 1, only=("ft",))


def case(name: str) -> dict:
    c = {"stage": 0, "shape": "8b", "seq": 2048, "grad_ckpt": True, "ckpt_every": None, "only": None, "data": None,
         **(adhoc(name) if name.startswith("p-") else CASES[name])}
    c["name"] = name
    return c


# ----------------------------------------------------------------------------- plain stack


def _mem_line() -> None:
    """At exit of a wrapped baseline, rank 0 prints its peak allocated and reserved bytes."""
    import torch

    if os.environ.get("RANK", "0") == "0" and torch.cuda.is_available():
        print("SPEEDMEM " + json.dumps({"alloc": torch.cuda.max_memory_allocated(),
                                        "reserved": torch.cuda.max_memory_reserved()}), flush=True)


def _apply_liger() -> None:
    """The plain stack with Liger-Kernel, as the baseline README applies it (class-level, before the model exists)."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(rope=True, swiglu=True, rms_norm=True, cross_entropy=False,
                                fused_linear_cross_entropy=True)


def wrap_main(argv: list[str]) -> int:
    """``speed.py _wrap [--no-ckpt] [--liger] SCRIPT args``: run a baseline unchanged and report reserved memory too."""
    import atexit
    import runpy

    if argv[0] == "--no-ckpt":  # the baseline always enables checkpointing: make that a no-op
        import transformers

        transformers.PreTrainedModel.gradient_checkpointing_enable = lambda *a, **k: None
        argv = argv[1:]
    if argv[0] == "--liger":
        _apply_liger()
        argv = argv[1:]
    atexit.register(_mem_line)
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")
    return 0


def lora_main(argv: list[str]) -> int:
    """``speed.py _lora [--liger] BASELINES MB CKPT SEQ STEPS``: one lora_baseline.run configuration."""
    if argv[0] == "--liger":
        _apply_liger()
        argv = argv[1:]
    base, mb, ckpt, seq, steps = argv[0], int(argv[1]), argv[2] == "1", int(argv[3]), int(argv[4])
    sys.path.insert(0, base)
    import lora_baseline as lb
    import torch

    layers, h, inter, heads, kv, vocab, _ = SHAPES["8b"]
    r = lb.run("lora", layers=layers, hidden=h, inter=inter, heads=heads, kv=kv, vocab=vocab, seq=seq, bs=mb,
               ckpt=ckpt, targets=ALL_LINEAR, steps=steps)
    r["reserved"] = torch.cuda.max_memory_reserved()
    print("RESULT " + json.dumps(r), flush=True)
    return 0


FSDP_STACKS = {"fsdp": [], "fsdp-liger": ["--liger"], "fsdp-compile": ["--compile"]}  # fsdp_baseline.py's flags


def run_plain(c: dict, stack: str, args, results: Path) -> dict:
    """A baseline: ``plain``/``liger`` (ds_baseline.py or lora_baseline.py, Liger applied first) or an
    ``fsdp*`` stack (fsdp_baseline.py: plain FSDP2, torchtitan's recipe, with its own --liger/--compile)."""
    liger = stack == "liger"
    tag = f"{c['name']}.{stack}"
    me = str(Path(__file__).resolve())
    lig = ["--liger"] if liger else []
    if stack in FSDP_STACKS:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={c['gpus']}", me,
               "_wrap", str(args.baselines / "fsdp_baseline.py"), *FSDP_STACKS[stack],
               *(["--no-ckpt"] if c["grad_ckpt"] is False else []), "--bs", str(c["mb"]), "--seq", str(c["seq"]),
               "--layers", str(SHAPES[c["shape"]][0]), "--steps", str(args.plain_steps)]
    elif c["method"] == "lora":
        cmd = [sys.executable, me, "_lora", *lig, str(args.baselines), str(c["mb"]), "0" if c["grad_ckpt"] is False else "1",
               str(c["seq"]), str(args.plain_steps)]
    else:
        layers = SHAPES[c["shape"]][0]
        probe = ["-m", "benchmarks.ds_probe"] if args.probe else []
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={c['gpus']}",
               *probe, me, "_wrap", *(["--no-ckpt"] if c["grad_ckpt"] is False else []), *lig,
               str(args.baselines / "ds_baseline.py"), "--stage", str(c["stage"]),
               "--bs", str(c["mb"]), "--seq", str(c["seq"]), "--layers", str(layers), "--steps", str(args.plain_steps)]
    env = {**os.environ, "OUT": str(results), "PROBE_TAG": tag, "PROBE_OUT": str(results),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    t0 = time.monotonic()
    log = results / f"{tag}.log"
    with log.open("w") as fh:
        rc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=args.timeout).returncode
    text = log.read_text()
    res = {"case": c["name"], "stack": "plain+liger" if liger else stack, "exit_code": rc,
           "wall_s": round(time.monotonic() - t0, 1)}
    m = re.findall(r"^RESULT (\{.*\})$", text, re.M)
    if rc != 0 or not m:
        res["error"] = text[-2000:]
        return res
    r = json.loads(m[-1])
    tok = r.get("tok_s_per_gpu", r.get("tok_s"))
    mem = re.findall(r"^SPEEDMEM (\{.*\})$", text, re.M)
    alloc = json.loads(mem[-1])["alloc"] / 1e9 if mem else r["peak_mem_GB"]
    reserved = json.loads(mem[-1])["reserved"] / 1e9 if mem else r.get("reserved", 0) / 1e9
    res.update(tok_s_per_gpu=tok, step_s=r["step_s"], peak_alloc_gb=round(alloc, 1),
               peak_reserved_gb=round(reserved, 1), raw=r)
    return res


# ----------------------------------------------------------------------------- ftcluster


def spec_dict(c: dict, data: Path, out: Path, steps: int, overrides: dict) -> dict:
    spec = {
        "name": c["name"].replace(".", "-"),
        "method": c["method"],
        "model": {"random_init": {"preset": PRESET[c["shape"]],
                                  **({"num_hidden_layers": SHAPES[c["shape"]][0]} if c["shape"] == "8b8" else {})},
                  "attn_implementation": "sdpa"},
        "tokenizer": {"train_vocab_size": 8000 if c["shape"] != "tiny" else 400},
        "data": {"train": str(data), "format": "instruction" if c["data"] else "text", "seq_len": c["seq"],
                 "packing": True},
        # a rate that trains (issue #24: 1e-5 hid differences between set-ups); runs before 2026-12-08 used 1e-5
        "training": {"learning_rate": 2.0e-4, "warmup_steps": 2, "max_steps": steps, "micro_batch_size": c["mb"],
                     "gradient_checkpointing": c["grad_ckpt"], "precision": "bf16", "log_every_steps": 1},
        "resources": {"gpus_per_node": c["gpus"]},
        "output": {"uri": out.as_uri(), "keep_last": 1},
    }
    if c["ckpt_every"]:
        spec["output"]["checkpoint_every_steps"] = c["ckpt_every"]
    else:
        spec["output"]["checkpoint_every_minutes"] = 10000
    if c["method"] == "lora":
        spec["lora"] = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
    else:
        spec["deepspeed"] = {"zero_stage": c["stage"]}
    if overrides.get("engine", "deepspeed") != "deepspeed":
        spec.pop("deepspeed", None)  # another engine's section would be refused
    for dotted, value in overrides.items():
        node = spec
        *path, last = dotted.split(".")
        for k in path:
            node = node.setdefault(k, {})
        node[last] = value
    return spec


def metrics_summary(recs: list[dict], warmup: int, gpus: int) -> dict:
    train = [r for r in recs if r["kind"] == "train"]
    saves = {r["step"]: r for r in recs if r["kind"] == "checkpoint" and not r.get("final")}
    ckpts = sorted(saves)
    if all("step_s" in r for r in train[1:]):  # the runtime's own per-step wall time (saves left out)
        times = {r["step"]: r["step_s"] for r in train[1:]}
        stall_steps: set[int] = set()
    else:  # older runtimes: from elapsed_s, where the step after a save carries the save's blocking time
        times = {b["step"]: b["elapsed_s"] - a["elapsed_s"] for a, b in zip(train, train[1:], strict=False)}
        stall_steps = {s + 1 for s in ckpts}
    steady = [t for s, t in times.items() if s > warmup and s not in stall_steps]
    med = sorted(steady)[len(steady) // 2] if steady else float("nan")
    w = min(warmup, len(train) - 2)
    a, b = train[w], train[-1]
    out = {"tok_s_per_gpu": round((b["tokens_seen"] - a["tokens_seen"]) / (b["elapsed_s"] - a["elapsed_s"]) / gpus),
           "step_s": round(med, 3), "peak_alloc_gb": round(max(r["peak_mem_gb"] for r in train) * 2**30 / 1e9, 1),
           "peak_reserved_gb": round(max(r.get("peak_mem_reserved_gb", 0) for r in train) * 2**30 / 1e9, 1),
           "peak_alloc_bytes": round(max(r["peak_mem_gb"] for r in train) * 2**30),
           "peak_reserved_bytes": round(max(r.get("peak_mem_reserved_gb", 0) for r in train) * 2**30),
           "first_loss": train[0]["loss"], "last_loss": train[-1]["loss"],
           "step_times": [round(times[s], 3) for s in sorted(times)]}
    if ckpts:
        if all("ckpt_blocked_s" in r for r in saves.values()):  # measured by the runtime
            blocked = [saves[s]["ckpt_blocked_s"] for s in ckpts]
        else:
            blocked = [times[s + 1] - med for s in ckpts if s + 1 in times]
        # The steps right after a save run while its files are written and uploaded in the background.
        during = [times[s] for k in ckpts for s in (k + 1, k + 2, k + 3) if s in times and s not in stall_steps]
        out["ckpt_blocked_s"] = round(max(blocked), 2) if blocked else None
        if all("ckpt_wait_s" in r for r in saves.values()):  # the copy alone: blocked minus the wait
            copy = [saves[s]["ckpt_blocked_s"] - saves[s]["ckpt_wait_s"] for s in ckpts]
            out["ckpt_copy_s"] = [round(x, 2) for x in copy]
            out["ckpt_wait_s"] = [round(saves[s]["ckpt_wait_s"], 2) for s in ckpts]
        out["upload_step_slowdown"] = round(max(during) / med - 1, 3) if during else None
    return out


def batch_fill(files: list[Path], warmup: int) -> dict:
    """From ds_probe's per-batch records (one file per rank, one line per micro-batch), the
    batches after ``warmup``: real tokens over computed (rows x width), learned over real."""
    rows = [json.loads(x) for f in files for x in f.read_text().splitlines()[warmup:]]
    computed = sum(r["rows"] * r["width"] for r in rows)
    real = sum(r["real"] for r in rows)
    if not computed:
        return {}
    return {"real_fraction": round(real / computed, 4), "learned_fraction": round(sum(r["labels"] for r in rows) /
            max(real, 1), 4), "mean_width": round(sum(r["width"] for r in rows) / len(rows), 1)}


def run_ft(c: dict, args, work: Path, data: Path, results: Path, overrides: dict, tag: str) -> dict:
    from ftcluster.plan.launch import compile_plan
    from ftcluster.spec.loader import load_spec_text

    out = work / tag
    if out.exists():
        import shutil

        shutil.rmtree(out)
    steps = args.steps + (6 if c["ckpt_every"] else 0)
    spec_ov = {k: v for k, v in overrides.items() if not k.startswith("env.")}
    spec = load_spec_text(json.dumps(spec_dict(c, data, out, steps, spec_ov)), f"<{tag}>")
    plan = compile_plan(spec)
    payload = work / f"{tag}.payload.json"
    payload.write_text(plan.payload_json())
    env = {**os.environ, **plan.env, "FTCLUSTER_CACHE": str(work / "cache"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.update(dict(kv.split("=", 1) for kv in args.ft_env))
    env.update({k[4:]: str(v) for k, v in overrides.items() if k.startswith("env.")})
    # The shim skips the final checkpoint and exports (checkpoint cases measure saves); --probe
    # also times the phases of full fine-tuning steps and profiles two of them.
    probe = ["-m", "benchmarks.ds_probe"]
    env.update(PROBE_SKIP_FINISH="1", PROBE_TAG=tag, PROBE_OUT=str(results), PROBE_BATCHES="1",
               PROBE_PHASES="1" if args.probe and c["method"] == "full" else "0")
    cmd = [sys.executable, "-m", "ftcluster.train.launch", "--standalone", f"--nproc-per-node={c['gpus']}",
           *probe, "-m", "ftcluster.train", "--spec", str(payload)]
    t0 = time.monotonic()
    log = results / f"{tag}.log"
    with log.open("w") as fh:
        rc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=str(work),
                            timeout=args.timeout).returncode
    from ftcluster.plan.planner.data import estimate_tokens

    span = estimate_tokens(spec.data, spec.tokenizer.train_vocab_size).attention_span(spec.data.seq_len)
    res = {"case": c["name"], "stack": "ftcluster" + (f" {tag.split('.', 2)[-1]}" if tag.count(".") > 1 else ""),
           "exit_code": rc, "wall_s": round(time.monotonic() - t0, 1), "overrides": overrides,
           "packing": spec.data.packing, "data": c["data"] or "text", "attention_span": span}
    metrics = out / "metrics.jsonl"
    if rc != 0 or not metrics.exists():
        res["error"] = log.read_text()[-2500:]
        return res
    res.update(metrics_summary([json.loads(x) for x in metrics.read_text().splitlines()], args.warmup, c["gpus"]))
    res.update(batch_fill(sorted(results.glob(f"{tag}_batches.r*.jsonl")), args.warmup))
    return res


def plan_record(c: dict, res: dict, overrides: dict, env_note: dict) -> dict:
    """One line of plan_accuracy.jsonl: the full configuration and what the run measured
    (rank 0's torch.cuda.max_memory_allocated / reserved in bytes, median step seconds)."""
    layers, h, inter, heads, kv, vocab, tied = SHAPES[c["shape"]]
    rec = {"method": c["method"], "zero_stage": c["stage"] if c["method"] == "full" else None,
           "gpus": c["gpus"], "micro_batch_size": c["mb"], "seq_len": c["seq"], "gradient_checkpointing": c["grad_ckpt"],
           "preset": PRESET[c["shape"]], "params": n_params(c["shape"]),
           "model": dict(layers=layers, hidden=h, intermediate=inter, heads=heads, kv_heads=kv, vocab=vocab, tied=tied),
           "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"} if c["method"] == "lora" else None,
           "precision": "bf16", "attn_implementation": "sdpa", "packing": res.get("packing", True),
           "data": c["data"] or "text", "overrides": overrides, "attention_span": res.get("attention_span"),
           "exit_code": res["exit_code"], **env_note}
    if "error" in res:
        rec["error_tail"] = res["error"][-400:]
        rec["oom"] = "OutOfMemoryError" in res["error"] or "CUDA out of memory" in res["error"]
    else:
        rec.update(max_memory_allocated_bytes=res["peak_alloc_bytes"], max_memory_reserved_bytes=res["peak_reserved_bytes"],
                   step_s=res["step_s"], tok_s_per_gpu=res["tok_s_per_gpu"])
    return rec


def warm_up(args, results: Path) -> None:
    """An untimed small DeepSpeed job on every GPU first: on a freshly started machine the first
    heavy job ran 1.3-1.4x slower (host memory growing on first use, NCCL and cuDNN start-up),
    which biased whichever stack ran first (docs/BENCHMARKS.md)."""
    import torch

    n = torch.cuda.device_count()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           str(args.baselines / "ds_baseline.py"), "--stage", "3", "--bs", "2", "--layers", "4", "--steps", "2"]
    t0 = time.monotonic()
    with (results / "warm_up.log").open("w") as fh:
        rc = subprocess.run(cmd, env={**os.environ, "OUT": str(results)}, stdout=fh, stderr=subprocess.STDOUT,
                            timeout=args.timeout).returncode
    print(json.dumps({"warm_up": "ds_baseline 4 layers", "exit_code": rc, "wall_s": round(time.monotonic() - t0, 1)}),
          flush=True)


# ----------------------------------------------------------------------------- table


def table(rows: list[dict]) -> str:
    head = ("case", "stack", "tok/s/GPU", "MFU", "step s", "alloc GB", "resv GB", "ckpt block s", "upload slow")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['case']} | {r['stack']} | FAILED (exit {r['exit_code']}) | | | | | |")
            continue
        c = case(r["case"])
        mfu = r["tok_s_per_gpu"] * flops_per_token(c["shape"], c["seq"], c["method"] == "lora") / 1e12 / PEAK_TFLOPS
        r["mfu"] = round(mfu, 3)
        cells = [r["case"], r["stack"], f"{r['tok_s_per_gpu']:,}", f"{mfu:.3f}", f"{r['step_s']:.3f}",
                 f"{r['peak_alloc_gb']:.1f}", f"{r['peak_reserved_gb']:.1f}",
                 "" if r.get("ckpt_blocked_s") is None else f"{r['ckpt_blocked_s']:.2f}",
                 "" if r.get("upload_step_slowdown") is None else f"{100 * r['upload_step_slowdown']:+.0f}%"]
        lines.append(" | ".join(cells))
    return "\n".join("| " + x + " |" for x in lines)


def varlen_table(rows: list[dict]) -> str:
    """The variable-length cases: real tokens/s per GPU, how full the computed batch was, and
    packing's gain (packed over padded real tokens/s of the same case and variant)."""
    vl = [r for r in rows if r.get("data") not in (None, "text")]
    if not vl:
        return ""
    head = ("case", "data", "stack", "packing", "real tok/s/GPU", "real/computed", "learned/real", "mean width",
            "step s", "alloc GB", "resv GB", "packing gain")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    def base(r: dict) -> tuple:
        return r["case"], re.sub(r"[ .]?(packed|padded)$", "", r["stack"])

    ok = {(*base(r), r["packing"]): r for r in vl if "error" not in r}
    for r in vl:
        pre = [r["case"], r["data"], r["stack"], "true" if r.get("packing") else "false"]
        if "error" in r:
            lines.append(" | ".join(pre + [f"FAILED (exit {r['exit_code']})"] + [""] * 7))
            continue
        other = ok.get((*base(r), False))
        gain = f"{r['tok_s_per_gpu'] / other['tok_s_per_gpu']:.2f}x" if r["packing"] and other else ""
        lines.append(" | ".join(pre + [f"{r['tok_s_per_gpu']:,}", f"{r.get('real_fraction', float('nan')):.3f}",
                                       f"{r.get('learned_fraction', float('nan')):.3f}", f"{r.get('mean_width', 0):.0f}",
                                       f"{r['step_s']:.3f}", f"{r['peak_alloc_gb']:.1f}", f"{r['peak_reserved_gb']:.1f}",
                                       gain]))
    note = ("\nreal = tokens with attention_mask 1 (prompt, answer, bos, eos; as tokens_seen counts them); "
            "learned = those with a label; computed = rows x batch width (longest row rounded up to 64).")
    return "\n".join("| " + x + " |" for x in lines) + note


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_wrap":
        return wrap_main(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "_lora":
        return lora_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results_dir", type=Path)
    ap.add_argument("--baselines", type=Path, default=ROOT.parent / "shared" / "baselines")
    ap.add_argument("--cases", default="z3-mb2,lora-mb8")
    ap.add_argument("--only", default="plain,liger,ft",
                    help="stacks to run: plain, liger, fsdp, fsdp-liger, fsdp-compile (fsdp_baseline.py), ft")
    ap.add_argument("--steps", type=int, default=14, help="ftcluster optimizer steps (checkpoint cases add 6)")
    ap.add_argument("--warmup", type=int, default=4, help="ftcluster steps left out of the throughput")
    ap.add_argument("--plain-steps", type=int, default=6, help="timed steps of a baseline (after its 2-3 warm-ups)")
    ap.add_argument("--ft-variants", default="", help="extra ftcluster runs per case: NAME:key=json;key=json,... (spec keys "
                    "dotted, e.g. data.packing=false; env.NAME=value sets an environment variable)")
    ap.add_argument("--no-ft-base", action="store_true", help="run only the --ft-variants, not the case's own ftcluster run")
    ap.add_argument("--ft-env", action="append", default=[], help="KEY=VALUE for the ftcluster runs")
    ap.add_argument("--probe", action="store_true", help="ftcluster full runs under benchmarks/ds_probe.py")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--work-dir", type=Path, default=None)
    ap.add_argument("--records", type=int, default=1200, help="synthetic corpus records")
    ap.add_argument("--words", type=int, default=500, help="words per record (~1.1 tokens each)")
    ap.add_argument("--instruct-records", type=int, default=3000, help="records of a vl-* case's instruction data")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--warm-up", action="store_true", help="run an untimed small job on every GPU first")
    args = ap.parse_args()
    if args.list:
        for k, v in CASES.items():
            print(k, json.dumps(v))
        return 0
    results = args.results_dir.resolve()
    work = (args.work_dir or results / "work").resolve()
    results.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    import instruct_data  # noqa: E402 - benchmarks/ is on sys.path when run as a script
    from gpu_train import write_corpus  # noqa: E402

    def data_for(c: dict) -> Path:
        if c["data"]:
            path = work / f"instruct-{c['data']}-{args.instruct_records}.jsonl"
            return path if path.exists() else instruct_data.write(path, c["data"], args.instruct_records)
        path = work / "corpus.jsonl"
        if not path.exists():
            write_corpus(path, records=args.records, words_per_record=args.words)
        return path
    variants = [] if args.no_ft_base else [("", {})]
    for v in filter(None, args.ft_variants.split(",")):
        name, _, kvs = v.partition(":")
        variants.append((name, {k: json.loads(x) for k, _, x in (p.partition("=") for p in kvs.split(";") if p)}))
    if args.warm_up:
        warm_up(args, results)
    stacks = set(args.only.split(","))
    import torch

    env_note = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                # plan_accuracy.py asks the planner for this runtime (its overrides mark probes)
                "runtime": "train/speedups.py on (Liger fused CE for llama, ZeRO-3 keep when it fits, "
                           "NCCL_PROTO=Simple on >1 GPU; train/varlen.py's varlen attention for SDPA)"}
    rows: list[dict] = []
    for name in [n for n in args.cases.split(",") if n]:
        c = case(name)
        todo = [s for s in ("plain", "liger", *FSDP_STACKS, "ft") if s in stacks and (c["only"] is None or s in c["only"])]
        for s in todo:
            if s == "ft":
                runs = [(v, ov) for v, ov in variants] if not c["data"] else [
                    (".".join(filter(None, (v, kind))), {**ov, "data.packing": kind == "packed"})
                    for v, ov in variants for kind in ("packed", "padded")]
                for vname, ov in runs:
                    rows.append(run_ft(c, args, work, data_for(c), results, ov,
                                       f"{name}.ft" + (f".{vname}" if vname else "")))
                    with (results / "plan_accuracy.jsonl").open("a") as fh:
                        fh.write(json.dumps(plan_record(c, rows[-1], ov, env_note)) + "\n")
                    print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("error", "step_times")}), flush=True)
            else:
                rows.append(run_plain(c, s, args, results))
                print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("error", "raw")}), flush=True)
            if "error" in rows[-1]:
                print(rows[-1]["error"], file=sys.stderr, flush=True)
            (results / "speed.json").write_text(json.dumps(rows, indent=1))
    fixed = [r for r in rows if r.get("data") in (None, "text")]
    text = "\n\n".join(filter(None, (table(fixed) if fixed else "", varlen_table(rows))))
    print(text, flush=True)
    (results / "speed.json").write_text(json.dumps(rows, indent=1))
    (results / "table.md").write_text(text + "\n")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
