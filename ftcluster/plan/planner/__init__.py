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


def doctor_checks(spec: Any) -> list[tuple[str, str, str]]:
    """(name, status, detail) rows for ``ftcluster doctor``: status is ok, warn or fail.

    Offline, like validate: it plans with what is known without the network and says so
    when the model's shape is not."""
    from ...errors import FtclusterError
    from .report import gib, recommendation_line

    try:
        p = build_plan(spec, network=False, count_data=True)
    except FtclusterError as exc:
        return [("plan", "warn", str(exc))]
    r = p.requested
    detail = (f"{gib(r.memory.total)} of {gib(r.usable)} GiB usable per {p.gpu.name}"
              f"{' (assumed)' if p.gpu_assumed else ''}, step {r.step_time_s:.2f} s")
    rows = [("plan: memory", "ok" if r.fits else "fail", detail)]
    rows.append(("plan: recommendation", "ok", recommendation_line(p)))
    return rows
