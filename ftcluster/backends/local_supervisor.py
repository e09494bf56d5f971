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

from .base import load_status, save_status

GRACE_S = float(os.environ.get("FTCLUSTER_CANCEL_GRACE_S", "60"))
PREEMPTED_EXIT = 143


def main(run_dir_arg: str) -> int:
    run_dir = Path(run_dir_arg)
    launch = json.loads((run_dir / "launch.json").read_text())
    env = {**os.environ, **launch["env"], "FTCLUSTER_RUN_DIR": str(run_dir)}
    status = load_status(run_dir)
    with open(run_dir / "log.txt", "ab", buffering=0) as log:
        try:
            proc = subprocess.Popen(launch["argv"], cwd=launch["cwd"], env=env, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            status.state, status.message, status.ended_at = "FAILED", f"could not start: {exc}", time.time()
            save_status(run_dir, status)
            return 1
        status.state, status.started_at = "RUNNING", time.time()
        (run_dir / "job.pid").write_text(str(proc.pid))
        save_status(run_dir, status)
        _install_cancel(proc)
        rc = proc.wait()
    status = load_status(run_dir)
    status.returncode, status.ended_at = rc, time.time()
    if (run_dir / "cancel-requested").exists():
        status.state, status.message = "CANCELLED", "cancelled by the user"
    elif rc == 0:
        status.state, status.message = "SUCCEEDED", ""
    elif rc == PREEMPTED_EXIT:
        status.state = "FAILED"
        status.message = "stopped by a signal after saving a checkpoint (exit 143); resubmit to resume"
    else:
        status.state, status.message = "FAILED", f"exit code {rc}; see `ftcluster logs {status.run_id}`"
    save_status(run_dir, status)
    return 0


def _install_cancel(proc: subprocess.Popen) -> None:
    def on_term(signum, frame):
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
