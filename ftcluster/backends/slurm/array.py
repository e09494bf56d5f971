"""Slurm job arrays (a spec with variants): the state of every task, and every task's log.

A job array is one job id; each task is ``<id>_<index>`` and trains variant ``index``.
Task states come from ``scontrol show job -o <id>`` (one record per started task, one
record for the still-pending rest, e.g. ``ArrayTaskId=2-3%2``) and, once the controller
has forgotten the job (MinJobAge), from ``sacct`` when accounting is on (parsed in
:mod:`.slurm_state`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..base import TERMINAL, RunStatus, save_status
from .state import STATE_MAP, TaskRecord, query_tasks


def array_log_pattern(meta: dict[str, Any], job_id: str, cwd: str | None) -> str:
    """The log path of an array with ``%a`` (and ``%j``, a task's own job id) left for each task."""
    log = meta["output_pattern"].replace("%x", meta["name"]).replace("%A", job_id)
    return log if meta.get("login") or log.startswith("/") else str(Path(cwd or ".") / log)


def task_log(pattern: str, index: int, task_job_id: str | None) -> str:
    log = pattern.replace("%a", str(index))
    return log.replace("%j", task_job_id) if task_job_id else log


def task_rows(names: list[str], array_id: str, records: list[TaskRecord],
              previous: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant: {name, job_id, state, message, returncode, slurm_job_id}."""
    by_index = {i: r for r in records for i in r.indexes}
    old = {row.get("name"): row for row in previous}
    rows = []
    for index, name in enumerate(names):
        rec = by_index.get(index)
        if rec is None:  # forgotten by the controller: keep what we saw last
            rows.append(old.get(name) or {"name": name, "job_id": f"{array_id}_{index}", "state": "UNKNOWN",
                                          "message": "Slurm no longer knows this task", "returncode": None})
            continue
        state = STATE_MAP.get(rec.raw_state, "RUNNING")
        message = rec.reason if state == "PENDING" and rec.reason not in ("None", "") else ""
        if state == "FAILED":
            message = rec.raw_state + (f", exit code {rec.exit_code}" if rec.exit_code else "")
        rows.append({"name": name, "job_id": f"{array_id}_{index}", "state": state, "message": message,
                     "returncode": rec.exit_code if state in TERMINAL else None,
                     "slurm_job_id": rec.job_id if len(rec.indexes) == 1 else None,
                     "started_at": (old.get(name) or {}).get("started_at") or rec.started_at, "ended_at": rec.ended_at})
    return rows


def aggregate(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """The state of a whole array (or pipeline) from its parts' states, and a one-line summary."""
    states = [r["state"] for r in rows]
    counts: dict[str, int] = {}
    for s in states:
        counts[s] = counts.get(s, 0) + 1
    summary = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
    if all(s in TERMINAL for s in states):
        for s in ("FAILED", "CANCELLED"):
            if s in states:
                return s, summary
        return "SUCCEEDED", ""
    if "UNKNOWN" in states and all(s in TERMINAL or s == "UNKNOWN" for s in states):
        return "UNKNOWN", summary
    started = any(s == "RUNNING" or s in TERMINAL for s in states)
    return ("RUNNING" if started else "PENDING"), summary


def span(rows: list[dict[str, Any]], started_at: float | None) -> tuple[float | None, float | None]:
    """(first start, last end) of an array or pipeline from its parts' rows; the end once every part has one."""
    starts = [r["started_at"] for r in rows if r.get("started_at")] + ([started_at] if started_at else [])
    ends = [r.get("ended_at") for r in rows]
    return (min(starts) if starts else None), (max(ends) if ends and all(ends) else None)  # type: ignore[type-var]


def refresh_array(st: RunStatus, run_dir: Path, extra: dict[str, Any], run: Callable[..., Any]) -> RunStatus:
    """Query every task of the array run ``st``, save and return the updated status."""
    if not st.job_id:
        return st
    records = query_tasks(run, st.job_id)
    if not records and not st.tasks:
        st.state = "UNKNOWN"
        st.message = f"Slurm no longer knows job {st.job_id} (no accounting, past MinJobAge)"
        return st
    st.tasks = task_rows(extra["variants"], st.job_id, records, st.tasks)
    st.state, st.message = aggregate(st.tasks)
    codes = [t["returncode"] for t in st.tasks if t.get("returncode")]
    st.returncode = codes[0] if codes else (0 if st.state == "SUCCEEDED" else None)
    st.started_at, st.ended_at = span(st.tasks, st.started_at)
    if st.terminal:
        st.ended_at = st.ended_at or time.time()
    save_status(run_dir, st)
    return st


def array_logs(extra: dict[str, Any], follow: bool, status: Callable[[], RunStatus],
               tail: Callable[[str, bool, Callable[[], bool]], Iterator[str]]) -> Iterator[str]:
    """Every task's log in variant order, each after a ``==> <variant> (task <id>) <==`` line; with
    ``follow``, each task's log is followed until that task ends."""
    tasks = status().tasks
    for index, name in enumerate(extra["variants"]):
        row = tasks[index] if index < len(tasks) else {}

        def task_done(index: int = index) -> bool:
            tasks = status().tasks
            return index >= len(tasks) or tasks[index]["state"] in TERMINAL | {"UNKNOWN"}

        yield f"==> {name} (task {row.get('job_id') or index}) <==\n"
        yield from tail(task_log(extra["log"], index, row.get("slurm_job_id")), follow, task_done)
