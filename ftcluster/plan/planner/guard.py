"""The check ``validate`` and ``submit`` run: refuse a job that cannot fit on its GPUs.

Offline and quick: the model's shape comes from random_init, a local config.json or a public
model's name; remote data is never listed. A job whose shape or GPU type is unknown is not
checked (nothing is refused on a guess). Problems are spec problems: file:line:column of the
field to change, the numbers, and the cheapest layout that fits.
"""

from __future__ import annotations

from typing import Any

from ...errors import Problem
from .advise import Evaluator, Option, memory_model_of, pick, requested_layout, workload_of
from .gpus import GPUS, load_gpus, normalise
from .report import gib
from .shape import spec_shape

SKIP_HINT = "or pass --no-plan-check"


def check_spec(spec: Any) -> list[Problem]:
    """Problems for a job spec or pipeline (each resolved variant and stage is checked too); []
    when everything fits or cannot be known offline."""
    from .advise import stage_specs

    out: list[Problem] = []
    for job, shape in stage_specs(spec):
        for s in list(getattr(job, "_resolved", None) or ()) or [job]:
            out += _check_one(s, job, shape)
    return out


def _gpu_for(spec: Any):
    raw = spec.resources.gpu_type
    if spec.resources.gpus_per_node == 0:
        return None
    try:
        table = load_gpus()
    except Exception:  # a broken price file is the plan command's business, not validate's
        table = dict(GPUS)
    if raw is None:
        return max(table.values(), key=lambda g: g.memory_bytes)  # refuse only what fits on no GPU
    return table.get(normalise(raw))


def _check_one(spec: Any, root: Any, shape: Any = None) -> list[Problem]:
    gpu = _gpu_for(spec)
    if gpu is None:
        return []
    shape = shape or spec_shape(spec, network=False)
    if shape is None:
        return []
    w = workload_of(spec, shape)
    ev = Evaluator(w, gpu, spec, None, (w.lora_r, w.lora_targets, w.lora_dropout))
    req = ev.evaluate(requested_layout(spec, gpu.name))
    if req.fits:
        return []
    best = pick(ev.options(memory_model_of(spec), req.layout), req.layout)
    return [_problem(spec, root, req, best, gpu.name)]


def _problem(spec: Any, root: Any, req: Option, best: Option | None, gpu: str) -> Problem:
    m = req.memory
    parts = ", ".join(f"{k} {gib(v)}" for k, v in (("weights", m.weights), ("gradients", m.gradients),
                                                   ("optimizer", m.optimizer), ("activations", m.activations),
                                                   ("logits", m.logits), ("buffers", m.overhead)) if v)
    variant = f"variant {spec._variant!r}: " if getattr(spec, "_variant", None) else ""
    msg = (f"{variant}needs {gib(m.total)} GiB per GPU ({parts}) but a {gpu} has {gib(req.usable)} GiB usable; ")
    if best is None:
        msg += f"no {spec.method} layout fits on {gpu}: use a larger GPU type or a shorter data.seq_len, {SKIP_HINT}"
        field = ("resources", "gpu_type")
    else:
        lay = best.layout
        msg += (f"cheapest layout that fits: {lay.describe()} ({gib(best.memory.total)} GiB, "
                f"${best.usd_per_million_tokens:.2f} per million tokens), {SKIP_HINT}")
        same_gpus = (lay.nodes, lay.gpus_per_node) == (req.layout.nodes, req.layout.gpus_per_node)
        field = ("training", "micro_batch_size") if same_gpus and lay.micro_batch_size != req.layout.micro_batch_size \
            else ("training", "gradient_checkpointing") if same_gpus and lay.gradient_checkpointing != req.layout.gradient_checkpointing \
            else ("resources", "gpus_per_node")
    return _locate(root, field, msg)


def _locate(root: Any, path: tuple[str, ...], msg: str) -> Problem:
    """Place the problem at the field in the spec's file (or at --set when it was overridden)."""
    src = getattr(root, "_source_file", None) or "<spec>"
    dotted = ".".join(path)
    overrides = {o.partition("=")[0].strip() for o in getattr(root, "_overrides", ())}
    if dotted in overrides or path[0] in overrides:
        return Problem("--set", None, None, dotted, msg)
    line = col = None
    if not src.startswith("<"):
        try:
            from ...spec.yamlio import load_file

            line, col = load_file(src).locate(path)
        except Exception:  # the spec loaded a moment ago; a vanished file only loses the position
            pass
    return Problem(src, line, col, dotted, msg)
