"""The check ``validate`` and ``submit`` run: refuse a job that cannot fit on its GPUs.

Offline and quick: the model's shape comes from random_init, a local config.json or a public
model's name; remote data is never listed. A job whose shape or GPU type is unknown is not
checked (nothing is refused on a guess); an unknown GPU type is said so in a warning
(:func:`plan_warnings`). Problems are spec problems: file:line:column of the field to change,
the numbers, and ``ftcluster plan``'s recommendation as ``--set`` flags.
"""

from __future__ import annotations

from typing import Any

from ...errors import Problem
from .advise import (
    Evaluator,
    Option,
    flags_text,
    memory_model_of,
    pick,
    requested_layout,
    set_flags,
    workload_of,
)
from .gpus import GPUS, load_gpus, spec_gpu
from .report import gib
from .shape import spec_shape

SKIP_HINT = "or pass --no-plan-check"


def check_spec(spec: Any) -> list[Problem]:
    """Problems for a job spec or pipeline (each resolved variant and stage is checked too); []
    when everything fits or cannot be known offline."""
    return _problems(spec)[0]


def plan_warnings(spec: Any) -> list[Problem]:
    """Why the check could not run, one located line per distinct reason: a GPU type the planner
    does not know, without ``resources.gpu_memory_gb``."""
    return _problems(spec)[1]


def check(spec: Any) -> tuple[list[Problem], list[Problem]]:
    """(problems, warnings) of :func:`check_spec` and :func:`plan_warnings`, computed once."""
    return _problems(spec)


def _problems(spec: Any) -> tuple[list[Problem], list[Problem]]:
    from .advise import stage_specs

    out: list[Problem] = []
    warned: list[Problem] = []
    for job, shape in stage_specs(spec):
        for s in list(getattr(job, "_resolved", None) or ()) or [job]:
            if _gpu_for(s) is None and s.resources.gpus_per_node > 0 and s.resources.gpu_type is not None:
                w = _unknown_gpu(s, job)
                if str(w) not in {str(x) for x in warned}:
                    warned.append(w)
                continue
            out += _check_one(s, job, shape)
    return out, warned


def _table():
    try:
        return load_gpus()
    except Exception:  # a broken price file is the plan command's business, not validate's
        return dict(GPUS)


def _gpu_for(spec: Any):
    r = spec.resources
    if r.gpus_per_node == 0:
        return None
    table = _table()
    if r.gpu_type is None and r.gpu_memory_gb is None:
        return max(table.values(), key=lambda g: g.memory_bytes)  # refuse only what fits on no GPU
    return spec_gpu(r.gpu_type, r.gpu_memory_gb, table)


def _unknown_gpu(spec: Any, root: Any) -> Problem:
    raw = spec.resources.gpu_type
    return _locate(root, ("resources", "gpu_type"),
                   f"{raw!r} is not in the planner's GPU table, so the memory check was skipped; set "
                   "resources.gpu_memory_gb to its memory in GB (e.g. --set resources.gpu_memory_gb=24) or add "
                   f"the type to the price file (docs/planner.md); known: {', '.join(sorted(_table()))}")


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
    best = answer(spec, shape, gpu, ev, req)
    return [_problem(spec, root, req, best, gpu.name)]


def answer(spec: Any, shape: Any, gpu: Any, ev: Evaluator, req: Option) -> Option | None:
    """The layout to propose for a job that does not fit: ``ftcluster plan``'s recommendation for the
    same spec (planned offline, as ``plan --offline``; for the spec's GPU type, or the planner's
    default type when it names none), when ``--set`` can reach it; else (it would change the method
    of a spec with a section of its own method) the cheapest layout of the spec's method, as plan's
    own table lists it."""
    from ..engines import engine_for
    from .advise import build_plan

    named = spec.resources.gpu_type is not None or spec.resources.gpu_memory_gb is not None
    try:
        p = build_plan(spec, gpu=gpu if named else None, network=False, count_data=True, shape=shape)
    except Exception:  # the plan could not be built (an unreadable price file, ...): the guard's own answer
        p = None
    rec = p.recommendation if p is not None else None
    if rec is not None and rec.layout.method != req.layout.method:
        section = engine_for(spec).section
        if section and section in spec.model_fields_set:
            rec = None
    if rec is not None:
        return rec
    return pick(ev.options(memory_model_of(spec), req.layout), req.layout)


def _problem(spec: Any, root: Any, req: Option, best: Option | None, gpu: str) -> Problem:
    m = req.memory
    parts = ", ".join(f"{k} {gib(v)}" for k, v in (("weights", m.weights), ("gradients", m.gradients),
                                                   ("optimizer", m.optimizer), ("activations", m.activations),
                                                   ("logits", m.logits), ("buffers", m.overhead)) if v)
    variant = f"variant {spec._variant!r}: " if getattr(spec, "_variant", None) else ""
    msg = (f"{variant}needs {gib(m.total)} GiB per GPU ({parts}) but a {gpu} has {gib(req.usable)} GiB usable; ")
    flags = set_flags(spec, best.layout) if best is not None else []
    if best is None or not flags:
        msg += f"no {spec.method} layout fits on {gpu}: use a larger GPU type or a shorter data.seq_len, {SKIP_HINT}"
        return _locate(root, ("resources", "gpu_type"), msg)
    lay = best.layout
    msg += (f"`ftcluster plan` recommends {lay.describe()} ({gib(best.memory.total)} GiB, "
            f"${best.usd_per_million_tokens:.2f} per million tokens): {flags_text(flags)} ({SKIP_HINT})")
    keys = [tuple(f.partition("=")[0].split(".")) for f in flags]
    return _locate_first(root, keys, msg)


def _locate_first(root: Any, paths: list[tuple[str, ...]], msg: str) -> Problem:
    """The problem at the first of ``paths`` the spec's file (or --set) has; when it has none, at the
    first one's section, named as the section."""
    doc = _doc(root)
    overrides = {o.partition("=")[0].strip() for o in getattr(root, "_overrides", ())}
    for path in paths:
        if ".".join(path) in overrides or (doc is not None and path in doc.locations):
            return _locate(root, path, msg)
    return _locate(root, paths[0][:1], msg)


def _doc(root: Any):
    src = getattr(root, "_source_file", None) or "<spec>"
    if src.startswith("<"):
        return None
    try:
        from ...spec.yamlio import load_file

        return load_file(src)
    except Exception:  # the spec loaded a moment ago; a vanished file only loses the position
        return None


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

            line, col = load_file(src).locate(path)  # the field, or its nearest section
        except Exception:  # the spec loaded a moment ago; a vanished file only loses the position
            pass
    return Problem(src, line, col, dotted, msg)
