"""Supervisor for one local run: start the launch command, record status, handle cancel.

Started detached by :class:`~ftcluster.backends.local.LocalBackend`; lives as long as
the job. On SIGTERM (``ftcluster cancel``) it forwards SIGTERM to the job's process
group, so the training runtime checkpoints and exits, then SIGKILLs after a grace period.
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

from ..exitcodes import PREEMPTED_EXIT
from .base import load_status, save_status

GRACE_S = float(os.environ.get("FTCLUSTER_CANCEL_GRACE_S", "60"))


def main(run_dir_arg: str) -> int:
    run_dir = Path(run_dir_arg)
    launch = json.loads((run_dir / "launch.json").read_text())
    env = {**os.environ, **launch["env"], "FTCLUSTER_RUN_DIR": str(run_dir)}
    # A spec with variants has one step per variant, run one after another; a failure stops the rest.
    steps = launch.get("steps") or [{}]
    current: list[subprocess.Popen] = []
    _install_cancel(current)
    rc = 0
    with open(run_dir / "log.txt", "ab", buffering=0) as log:
        for n, step in enumerate(steps):
            if (run_dir / "cancel-requested").exists():
                break
            if step.get("name"):
                log.write(f"==> {step['name']} (variant {n + 1}/{len(steps)}) <==\n".encode())
            try:
                proc = subprocess.Popen(launch["argv"], cwd=launch["cwd"], env={**env, **step.get("env", {})},
                                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            except OSError as exc:
                status = load_status(run_dir)
                status.state, status.message, status.ended_at = "FAILED", f"could not start: {exc}", time.time()
                save_status(run_dir, status)
                return 1
            current[:] = [proc]
            (run_dir / "job.pid").write_text(str(proc.pid))
            _record(run_dir, n, "RUNNING", None)
            rc = proc.wait()
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
    elif rc == PREEMPTED_EXIT:
        status.state = "FAILED"
        status.message = f"{which}stopped by a signal after saving a checkpoint (exit {PREEMPTED_EXIT}); resubmit to resume"
    else:
        status.state, status.message = "FAILED", f"{which}exit code {rc}; see `ftcluster logs {status.run_id}`"
    for task in status.tasks:
        if task["state"] == "PENDING":
            task["state"] = "CANCELLED"
            task["message"] = "not run: an earlier variant failed" if status.state == "FAILED" else "not run"
    save_status(run_dir, status)
    return 0


def _record(run_dir: Path, n: int, state: str, rc: int | None) -> None:
    """Note the run's start, and each variant's, in status.json."""
    status = load_status(run_dir)
    if status.state == "PENDING":
        status.state, status.started_at = "RUNNING", time.time()
    if n < len(status.tasks):
        status.tasks[n].update(state=state, returncode=rc, message="" if rc in (None, 0) else f"exit code {rc}")
    save_status(run_dir, status)


def _install_cancel(current: list[subprocess.Popen]) -> None:
    """On SIGTERM/SIGINT, forward SIGTERM to the running step's process group, then SIGKILL after GRACE_S."""
    def on_term(signum, frame):
        if not current:
            return
        proc = current[0]
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return

        def escalate():
            deadline = time.time() + GRACE_S
            while time.time() < deadline and proc.poll() is None:
                time.sleep(0.2)
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

        threading.Thread(target=escalate, daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
