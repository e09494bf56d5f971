"""Supervisor for one local run: start the launch command, record status, handle cancel.

Started detached by :class:`~ftcluster.backends.local.backend.LocalBackend`; lives as long as
the job. On SIGTERM (``ftcluster cancel``) it forwards SIGTERM to the launcher, which
forwards it to the workers, so the training runtime checkpoints and exits; after a grace
period it SIGKILLs every process of the run (:mod:`.proctree`). It records a run as ended
only once no other process of the run is alive, and the launcher it starts dies with it
(:mod:`ftcluster.train.lifeline`). See docs/lifecycle.md.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ...exitcodes import FAULT_EXIT, PREEMPTED_EXIT
from ..base import load_status, save_status
from .proctree import RUN_ENV, cancel_grace_s, run_key, run_pids, signal_all, stop_all, wait_gone

GRACE_S = cancel_grace_s()
# After the launcher exits, what is left of the run (a worker whose lifeline was not tied yet, a
# grandchild) gets this long after SIGTERM before SIGKILL.
LEFTOVER_GRACE_S = 5.0
LIFELINE_ENV = "FTCLUSTER_LIFELINE_PID"  # ftcluster.train.lifeline.LIFELINE_ENV (not imported: core)


def main(run_dir_arg: str) -> int:
    run_dir = Path(run_key(run_dir_arg))
    launch = json.loads((run_dir / "launch.json").read_text())
    # FTCLUSTER_BACKEND=local: the runtime's messages speak of resubmitting, not of a scheduler.
    env = {**os.environ, **launch["env"], RUN_ENV: str(run_dir), "FTCLUSTER_BACKEND": "local",
           LIFELINE_ENV: str(os.getpid())}
    # A spec with variants has one step per variant, run one after another; a failure stops the rest.
    steps = launch.get("steps") or [{}]
    current: list[subprocess.Popen] = []
    _install_cancel(current, run_dir)
    rc = 0
    with open(run_dir / "log.txt", "ab", buffering=0) as log:
        for n, step in enumerate(steps):
            if (run_dir / "cancel-requested").exists():
                break
            if step.get("name"):
                log.write(f"==> {step['name']} (variant {n + 1}/{len(steps)}) <==\n".encode())
            rc = _attempts(launch, env, step, n, run_dir, log, current)
            if rc is None:
                return 1
            _record(run_dir, n, "SUCCEEDED" if rc == 0 else "FAILED", rc)
            if rc != 0:
                break
    status = load_status(run_dir)
    status.returncode, status.ended_at = rc, time.time()
    failed = next((t["name"] for t in status.tasks if t["state"] == "FAILED"), None)
    which = f"variant {failed}: " if failed else ""
    if (run_dir / "cancel-requested").exists():
        status.state, status.message = "CANCELLED", "cancelled by the user"
    elif rc == 0:
        status.state, status.message = "SUCCEEDED", ""
    elif rc == FAULT_EXIT:
        status.state = "FAILED"
        status.message = (f"{which}an infrastructure fault, after {status.restarts} restart(s) "
                          f"(resources.max_restarts): {_fault_line(status.faults[-1]) if status.faults else ''}")
    elif rc == PREEMPTED_EXIT:
        status.state = "FAILED"
        status.message = f"{which}stopped by a signal after saving a checkpoint (exit {PREEMPTED_EXIT}); resubmit to resume"
    else:
        how = f"killed by {signal.Signals(-rc).name}" if rc < 0 and -rc in signal.valid_signals() else f"exit code {rc}"
        try:
            fault = json.loads((run_dir / f"fault-{status.restarts}.json").read_text())
        except (OSError, ValueError):
            fault = None
        if rc == 1 and fault:  # the launcher's verdict: an error of the code or data
            how = f"{_fault_line(fault)}: an error in the training code, data or settings (exit 1), not retried"
        status.state, status.message = "FAILED", f"{which}{how}; see `ftcluster logs {status.run_id}`"
    if status.restarts and status.state != "FAILED":
        status.message = (f"{status.message}; " if status.message else "") + (
            f"restarted {status.restarts} time(s) after infrastructure faults, first: "
            f"{_fault_line(status.faults[0])}")
    elif status.state == "FAILED" and rc == 1 and status.faults:
        status.message += f" (after {status.restarts} restart(s) for infrastructure faults)"
    for task in status.tasks:
        if task["state"] == "PENDING":
            task["state"] = "CANCELLED"
            task["message"] = "not run: an earlier variant failed" if status.state == "FAILED" else "not run"
    save_status(run_dir, status)
    return 0


def _attempts(launch: dict, env: dict[str, str], step: dict, n: int, run_dir: Path, log,
              current: list[subprocess.Popen]) -> int | None:
    """Run one step; after an infrastructure fault (the launcher's FAULT_EXIT) start it again, up to
    ``resources.max_restarts`` times in the run: it resumes from the last committed checkpoint.
    Returns the last attempt's status (None: it could not start)."""
    budget = int(launch.get("max_restarts", 0))
    while True:
        status = load_status(run_dir)
        attempt = status.restarts
        fault_file = run_dir / f"fault-{attempt}.json"
        fault_file.unlink(missing_ok=True)
        if attempt:
            log.write(f"==> attempt {attempt + 1} (restart {attempt} of at most {budget} after an infrastructure "
                      f"fault; resuming from the last committed checkpoint) <==\n".encode())
        step_env = {**env, **step.get("env", {}), "FTCLUSTER_RESTART_COUNT": str(attempt),
                    "FTCLUSTER_FAULT_FILE": str(fault_file)}
        try:
            proc = subprocess.Popen(launch["argv"], cwd=launch["cwd"], env=step_env, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            status.state, status.message, status.ended_at = "FAILED", f"could not start: {exc}", time.time()
            save_status(run_dir, status)
            return None
        current[:] = [proc]
        (run_dir / "job.pid").write_text(str(proc.pid))
        if (run_dir / "cancel-requested").exists():  # the cancel came while it was starting
            _forward_cancel(current, run_dir)
        _record(run_dir, n, "RUNNING", None)
        rc = proc.wait()
        _stop_leftovers(run_dir, log)
        if rc != FAULT_EXIT:
            return rc
        status = load_status(run_dir)
        try:
            fault = json.loads(fault_file.read_text())
        except (OSError, ValueError):
            fault = {"kind": "infrastructure", "what": f"exit code {rc}"}
        status.faults.append({"attempt": attempt + 1, "code": rc, **fault})
        if attempt >= budget or (run_dir / "cancel-requested").exists():
            save_status(run_dir, status)
            if attempt >= budget:
                log.write(f"ftcluster: not restarting: resources.max_restarts={budget} restart(s) spent\n".encode())
            return rc
        status.restarts = attempt + 1
        save_status(run_dir, status)


def _fault_line(fault: dict) -> str:
    who = f"rank {fault['rank']} on {fault.get('host', '?')}: " if fault.get("rank") is not None else ""
    return f"{who}{fault.get('what', '')}"


def _record(run_dir: Path, n: int, state: str, rc: int | None) -> None:
    """Note the run's start, and each variant's, in status.json."""
    status = load_status(run_dir)
    if status.state == "PENDING":
        status.state, status.started_at = "RUNNING", time.time()
    if n < len(status.tasks):
        status.tasks[n].update(state=state, returncode=rc, message="" if rc in (None, 0) else f"exit code {rc}")
    save_status(run_dir, status)


def _stop_leftovers(run_dir: Path, log) -> None:
    """Stop what is left of the run once the launcher has exited; the run has not ended before."""
    left = stop_all(lambda: run_pids(run_dir, exclude=(os.getpid(),)), LEFTOVER_GRACE_S)
    if left:  # `ftcluster status` keeps saying STOPPING while they live
        log.write(f"ftcluster: could not stop pid(s) {', '.join(map(str, left))} of this run\n".encode())


def _install_cancel(current: list[subprocess.Popen], run_dir: Path) -> None:
    """On SIGTERM/SIGINT, forward SIGTERM to the launcher (it forwards to the workers), then
    SIGKILL every process of the run that is still alive after GRACE_S."""
    def on_term(signum, frame):
        if current:
            _forward_cancel(current, run_dir)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)


def _forward_cancel(current: list[subprocess.Popen], run_dir: Path) -> None:
    proc = current[0]
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the launcher's group: the workers have sessions of their own
    except ProcessLookupError:
        return

    def others() -> list[int]:
        return run_pids(run_dir, exclude=(os.getpid(),))

    def escalate():
        # Workers too: one may be stuck (an upload retrying) while the launcher waits for it.
        signal_all(wait_gone(others, GRACE_S, poll=0.2), signal.SIGKILL)

    threading.Thread(target=escalate, daemon=True).start()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
