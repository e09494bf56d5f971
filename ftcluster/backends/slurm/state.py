"""What Slurm's client commands say about jobs: states, exit codes, job ids, error lines.

Parsing only, shared by :mod:`.slurm` (single jobs), :mod:`.slurm_array` (job arrays) and
:mod:`.pipeline`; the queries take the runner that executes commands (see
:class:`.slurm.Runner`), so this module imports neither of them.
"""

from __future__ import annotations

import calendar
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from ...errors import BackendError

Run = Callable[..., subprocess.CompletedProcess]

# Slurm job states -> ftcluster states.
STATE_MAP = {
    "PENDING": "PENDING", "CONFIGURING": "PENDING", "REQUEUED": "PENDING", "REQUEUE_HOLD": "PENDING",
    "REQUEUE_FED": "PENDING", "RESV_DEL_HOLD": "PENDING", "SUSPENDED": "PENDING", "RESIZING": "RUNNING",
    "RUNNING": "RUNNING", "COMPLETING": "RUNNING", "STAGE_OUT": "RUNNING", "SIGNALING": "RUNNING",
    "COMPLETED": "SUCCEEDED", "CANCELLED": "CANCELLED", "FAILED": "FAILED", "TIMEOUT": "FAILED",
    "NODE_FAIL": "FAILED", "OUT_OF_MEMORY": "FAILED", "BOOT_FAIL": "FAILED", "DEADLINE": "FAILED",
    "PREEMPTED": "PENDING", "REVOKED": "FAILED", "SPECIAL_EXIT": "FAILED",
}

_FIELD = {k: re.compile(rf"(?:^|\s){k}=(\S*)") for k in ("JobId", "ArrayTaskId", "JobState", "Reason", "ExitCode",
                                                           "StartTime", "EndTime")}
# Slurm prints times in the client's local time zone: ask for UTC, so that a login node's zone does not matter.
UTC = {"TZ": "UTC"}


def first_line(text: str) -> str:
    """The first non-empty line of a Slurm command's output, without its ``error:`` prefix."""
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line.removeprefix("sbatch: error: ").removeprefix("error: ")
    return "no output"


# What a Slurm client prints when it finds no controller: no slurm.conf and no DNS SRV record
# (configless Slurm), or a controller that does not answer.
_UNREACHABLE = ("Unable to contact slurm controller", "resolve_ctls_from_dns_srv", "fetch_config: DNS SRV lookup failed",
                "Could not establish a configuration source", "Unable to establish controller machine")


def controller_unreachable(text: str) -> str | None:
    """The line that says no Slurm controller answered (without the command's ``error:`` prefix), or None."""
    lines = [ln.strip() for ln in text.splitlines() if any(m in ln for m in _UNREACHABLE)]
    if not lines:
        return None
    best = next((ln for ln in lines if "Unable to contact" in ln), lines[0])
    return re.sub(r"^\w+: error: ", "", best)


def sbatch_job_id(stdout: str) -> str:
    """The job id from `sbatch --parsable` (``id`` or ``id;cluster``), ignoring any banner lines before it."""
    for line in reversed(stdout.strip().splitlines()):
        job_id = line.strip().split(";")[0]
        if job_id.isdigit():
            return job_id
    raise BackendError(f"sbatch printed no job id ({first_line(stdout)!r})")


def exit_code(text: str) -> int | None:
    """``2:0`` (exit code:signal) -> 2; None when unknown."""
    code = text.split(":")[0]
    return int(code) if code.isdigit() else None


def slurm_time(text: str) -> float | None:
    """``2026-11-30T21:20:31`` (UTC, see :data:`UTC`) -> seconds since the epoch; None for Unknown, None, N/A."""
    try:
        return float(calendar.timegm(time.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S")))
    except ValueError:
        return None


def run_times(raw_state: str, start: str, end: str) -> tuple[float | None, float | None]:
    """(started, ended) of a job in ``raw_state``: a pending job's StartTime/EndTime are Slurm's forecast, and a
    running job's EndTime its time limit, so they count only once the job has started or ended."""
    state = STATE_MAP.get(raw_state, "RUNNING")
    started = slurm_time(start) if state != "PENDING" else None
    return started, (slurm_time(end) if state in ("SUCCEEDED", "FAILED", "CANCELLED") else None)


@dataclass
class JobInfo:
    """What Slurm says about one job: its raw state, exit code, and when it started and ended."""

    raw_state: str | None
    exit_code: int | None = None
    started_at: float | None = None
    ended_at: float | None = None


def query_state(run: Run, job_id: str) -> JobInfo:
    """One job's state, exit code and times from squeue, then sacct, then scontrol (state None if unknown)."""
    q = run(["squeue", "-h", "-j", job_id, "-o", "%T|%S"], env=UTC)
    if q.returncode == 0 and q.stdout.strip():
        state, _, start = q.stdout.strip().splitlines()[0].partition("|")
        return JobInfo(state, None, *run_times(state, start, ""))
    a = run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,ExitCode,Start,End"], env=UTC)
    if a.returncode == 0 and a.stdout.strip():
        state, code, start, end = (a.stdout.strip().splitlines()[0].split("|") + ["", "", ""])[:4]
        state = state.split()[0]
        return JobInfo(state, exit_code(code), *run_times(state, start, end))
    s = run(["scontrol", "show", "job", "-o", job_id], env=UTC)
    if s.returncode == 0 and "JobState=" in s.stdout:
        fields = dict(kv.split("=", 1) for kv in s.stdout.split() if "=" in kv)
        state = fields["JobState"]
        return JobInfo(state, exit_code(fields.get("ExitCode", "")),
                       *run_times(state, fields.get("StartTime", ""), fields.get("EndTime", "")))
    return JobInfo(None)


# --------------------------------------------------------------------------- job arrays


@dataclass
class TaskRecord:
    """What Slurm says about some tasks of an array."""

    indexes: list[int]
    job_id: str  # the task's own job id (equals the array id for the first or pending tasks)
    raw_state: str
    reason: str
    exit_code: int | None
    started_at: float | None = None
    ended_at: float | None = None


def expand_indexes(text: str) -> list[int]:
    """``0``, ``1-3%2``, ``[0,2-3]``, ``0-6:2`` -> task indexes."""
    out: list[int] = []
    for part in text.strip("[]").split("%")[0].split(","):
        rng, _, step = part.partition(":")
        lo, _, hi = rng.partition("-")
        if lo.isdigit():
            out += range(int(lo), int(hi or lo) + 1, int(step) if step.isdigit() else 1)
    return out


def scontrol_records(text: str) -> list[TaskRecord]:
    """Parse ``scontrol show job -o <array id>`` output."""
    records = []
    for line in text.splitlines():
        got = {k: (m.group(1) if (m := rx.search(line)) else "") for k, rx in _FIELD.items()}
        if got["JobState"] and got["ArrayTaskId"]:
            records.append(TaskRecord(expand_indexes(got["ArrayTaskId"]), got["JobId"], got["JobState"],
                                      got["Reason"], exit_code(got["ExitCode"]),
                                      *run_times(got["JobState"], got["StartTime"], got["EndTime"])))
    return records


def sacct_records(text: str) -> list[TaskRecord]:
    """Parse ``sacct -n -P -X -o JobID,State,ExitCode,Start,End -j <array id>`` output
    (``5_0|COMPLETED|0:0|2026-11-30T21:20:31|2026-11-30T21:20:36``)."""
    records = []
    for line in text.splitlines():
        parts = line.strip().split("|") + ["", ""]
        if len(parts) >= 5 and "_" in parts[0]:
            state = parts[1].split()[0]
            records.append(TaskRecord(expand_indexes(parts[0].split("_", 1)[1]), parts[0], state, "",
                                      exit_code(parts[2]), *run_times(state, parts[3], parts[4])))
    return records


def query_tasks(run: Run, job_id: str) -> list[TaskRecord]:
    """Every task's record, from scontrol, else sacct; empty when Slurm no longer knows the job."""
    proc = run(["scontrol", "show", "job", "-o", job_id], env=UTC)
    records = scontrol_records(proc.stdout) if proc.returncode == 0 else []
    if not records:
        proc = run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "JobID,State,ExitCode,Start,End"], env=UTC)
        records = sacct_records(proc.stdout) if proc.returncode == 0 else []
    return records


# --------------------------------------------------------------------------- faults (docs/lifecycle.md)

FAULT_COMMENT = re.compile(r"(?:^|\s)Comment=ftcluster-fault-restarts=(\d+)")
ATTEMPT_LINE = "==> ftcluster: job "
FAILED_LINE = re.compile(r"^ftcluster: training failed: (.*?)(?: \[[^\]]*\])?; (an infrastructure fault|an error in the "
                         r"training code)")


def fault_restarts(run: Run, job_id: str) -> int | None:
    """The requeues after infrastructure faults the sbatch script counted in the job's Comment."""
    s = run(["scontrol", "show", "job", "-o", job_id], env=UTC)
    if s.returncode != 0 or "JobState=" not in s.stdout:
        return None
    m = FAULT_COMMENT.search(s.stdout)
    return int(m.group(1)) if m else 0


def faults_in_log(text: str) -> list[dict[str, object]]:
    """Each attempt's first failure as its log names it (the output file is appended across requeues)."""
    attempt, found = 0, {}
    for line in text.splitlines():
        if line.startswith(ATTEMPT_LINE):
            attempt += 1
            continue
        m = FAILED_LINE.match(line)
        if m and attempt not in found:
            kind = "infrastructure" if m.group(2).startswith("an infrastructure") else "user"
            found[attempt] = {"attempt": attempt, "kind": kind, "what": m.group(1)}
    return list(found.values())
