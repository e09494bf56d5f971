"""The processes of one local run, found and stopped as a whole (docs/lifecycle.md).

Every process of a local run (supervisor, launcher, workers, anything they start) carries
``FTCLUSTER_RUN_DIR=<run folder>`` in its environment, inherited from the supervisor. That, not a
process group, is what identifies them: torchrun starts each worker in a session of its own, and
a worker whose launcher died is re-parented to PID 1, but its environment still names the run.
``/proc/PID/environ`` is the environment a process was started with, so a reused pid never
matches. Off Linux (no /proc) the recorded pids (supervisor.pid, job.pid) are used instead.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from ...procs import alive

RUN_ENV = "FTCLUSTER_RUN_DIR"


def cancel_grace_s() -> float:
    """Seconds between the stop signal (TERM: checkpoint and exit) and SIGKILL on cancel."""
    return float(os.environ.get("FTCLUSTER_CANCEL_GRACE_S", "60"))


def run_key(run_dir: Path | str) -> str:
    """The value of ``FTCLUSTER_RUN_DIR`` for a run folder (absolute, so any cwd agrees)."""
    return str(Path(run_dir).expanduser().resolve())


def run_pids(run_dir: Path | str, exclude: tuple[int, ...] = ()) -> list[int]:
    """Live (not zombie) processes of the run, sorted; ``exclude``: pids to leave out (oneself)."""
    key = run_key(run_dir)
    proc = Path("/proc")
    if not (proc / "self" / "environ").exists():
        recorded = [_read_int(Path(key) / n) for n in ("supervisor.pid", "job.pid")]
        return sorted(p for p in recorded if p and p not in exclude and alive(p))
    needle = f"{RUN_ENV}={key}".encode()
    out = []
    for entry in os.scandir(proc):
        if not entry.name.isdigit() or int(entry.name) in exclude:
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as fh:
                env = fh.read()
        except OSError:  # gone meanwhile, or another user's
            continue
        if needle in env.split(b"\0") and alive(int(entry.name)):
            out.append(int(entry.name))
    return sorted(out)


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def wait_gone(find: Callable[[], list[int]], timeout: float, poll: float = 0.1) -> list[int]:
    """Poll ``find()`` until it is empty or ``timeout`` passes; returns what is left."""
    deadline = time.monotonic() + timeout
    left = find()
    while left and time.monotonic() < deadline:
        time.sleep(poll)
        left = find()
    return left


def stop_all(find: Callable[[], list[int]], grace: float, kill_wait: float = 10.0) -> list[int]:
    """SIGTERM every process ``find()`` returns, SIGKILL what is left after ``grace`` seconds, and
    return the pids still alive ``kill_wait`` seconds later (stuck in the kernel: say which)."""
    pids = find()
    if not pids:
        return []
    signal_all(pids, signal.SIGTERM)
    left = wait_gone(find, grace)
    if left:
        signal_all(left, signal.SIGKILL)
        left = wait_gone(find, kill_wait)
    return left


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None
