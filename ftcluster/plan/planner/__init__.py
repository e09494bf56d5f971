"""The planner: per-GPU memory, step time and cost of a job before it runs (no torch, no GPU).

* :func:`build_plan` - the plan of a job spec (``ftcluster plan``);
* :func:`check_spec` - the problems ``validate``/``submit`` refuse a job for;
* :func:`doctor_checks` - rows for ``ftcluster doctor``.

Modules: ``shape`` (config.json, presets, exact parameter counts), ``memory``, ``speed``,
``gpus`` (GPU facts and prices), ``data`` (tokens in the dataset), ``advise`` (layouts and
the recommendation), ``report`` (table and JSON), ``guard`` (the validate/submit check).
docs/planner.md explains the model, its sources and its limits.
"""

from __future__ import annotations

from typing import Any

from .advise import Plan, build_plan
from .guard import check_spec

__all__ = ["Plan", "build_plan", "check_spec", "doctor_checks"]


COST_WARN_RATIO = 2.0  # the doctor warns when the spec's layout costs more than this times the recommendation's


def doctor_checks(spec: Any) -> list[tuple[str, str, str, str]]:
    """(name, status, detail, fix) rows for ``ftcluster doctor``: status is ok, warn or fail.

    Offline, like validate: it plans with what is known without the network and says so
    when the model's shape is not. ``plan: memory`` fails when the spec's layout does not fit;
    ``plan: recommendation`` warns when the spec's layout costs more than :data:`COST_WARN_RATIO`
    times the recommendation (per run when both have a step count, else per token). Their fix is
    the recommendation as ``--set`` flags."""
    from ...errors import FtclusterError
    from .report import gib, money, recommendation_line

    try:
        p = build_plan(spec, network=False, count_data=True)
    except FtclusterError as exc:
        return [("plan", "warn", str(exc), "")]
    r, rec = p.requested, p.recommendation
    detail = (f"{gib(r.memory.total)} of {gib(r.usable)} GiB usable per {p.gpu.name}"
              f"{' (assumed)' if p.gpu_assumed else ''}, step {r.step_time_s:.2f} s")
    flags = p.change
    fix = f"`ftcluster plan` recommends {rec.layout.describe()}: {flags}" if rec is not None and flags else ""
    rows = [("plan: memory", "ok", detail, "") if r.fits else
            ("plan: memory", "fail", detail, fix or "`ftcluster plan` lists layouts that fit; lower micro_batch_size, "
             "turn on gradient_checkpointing, raise the ZeRO stage or add GPUs")]
    status, line = "ok", recommendation_line(p)
    ratio = cost_ratio(r, rec) if rec is not None and flags else None
    if ratio is not None and ratio > COST_WARN_RATIO:
        spec_cost = money(r.cost_usd) if r.cost_usd is not None and rec is not None and rec.cost_usd is not None \
            else f"${r.usd_per_million_tokens:.2f} per million tokens"
        status, line = "warn", f"the spec's layout costs {ratio:.1f}x the recommendation ({spec_cost}): {line}"
    rows.append(("plan: recommendation", status, line, f"follow it: {flags}" if status == "warn" else ""))
    return rows


def cost_ratio(spec_option: Any, rec: Any) -> float | None:
    """What the spec's layout costs over the recommendation's: per run when both know their steps,
    else per token; None when the spec's layout does not fit (the memory row says so)."""
    if not spec_option.fits:
        return None
    a, b = spec_option.cost_usd, rec.cost_usd
    if a is not None and b:
        return a / b
    if rec.usd_per_million_tokens > 0:
        return spec_option.usd_per_million_tokens / rec.usd_per_million_tokens
    return None
