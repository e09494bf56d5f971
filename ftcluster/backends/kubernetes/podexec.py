"""Container entry point for Kubernetes pods: ``python3 -m ftcluster.podexec [--env-dir DIR]... -- CMD...``.

The rendered PyTorchJob and TrainJob containers run torchrun through this wrapper, for two reasons:

1. Exit status on preemption. When a pod is stopped (preemption, eviction, node drain) the
   kubelet sends SIGTERM to the container's first process. torchrun answers SIGTERM by stopping
   its workers and exiting with status **1** (an uncaught ``SignalException``), which the
   Training Operator's ``restartPolicy: ExitCode`` treats as a permanent failure (1-127) rather
   than a retryable one (128-255). The wrapper forwards the signal to torchrun, waits for it, and
   then exits with ``128 + signal`` (143 for SIGTERM), so a preempted replica is retried.
2. Faults. torchrun also exits 1 when a worker failed, whatever the cause. The workers record
   their failure in ``FTCLUSTER_EXIT_DIR`` (set here: ``cause-RANK.json``, the job's first failure
   as the ranks agreed it, ftcluster.train.faults); when it is an infrastructure fault (a lost
   rank or node, a hung rank, a collective error) the wrapper exits 170 (FAULT_EXIT), which
   ``restartPolicy: ExitCode`` retries up to ``runPolicy.backoffLimit``, while an error of the
   code or data stays 1: permanent (docs/lifecycle.md, "Faults").
3. ``--env-dir``: TrainJob (``trainer.kubeflow.org/v1alpha1``) has no ``envFrom``; ftcluster
   mounts each Secret named in ``kubernetes.env_from_secrets`` as a read-only volume and this
   wrapper exports every key in it as an environment variable, as ``envFrom`` would. As in
   Kubernetes, variables already set in the container's ``env`` win, and among Secrets the last
   one listed wins.

Standard library only: it runs before anything heavy is imported.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

from ...exitcodes import FAULT_EXIT

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
STOPPING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
USAGE = "usage: python3 -m ftcluster.podexec [--env-dir DIR]... -- COMMAND [ARG]..."


def secret_env(dirs: list[str], keep: set[str]) -> dict[str, str]:
    """Variables from the files in ``dirs`` (a Secret volume: one file per key).

    Hidden entries (the ``..data`` links a Secret volume carries) and names containing ``=``
    are skipped; names in ``keep`` are left alone; a later folder overrides an earlier one.
    """
    env: dict[str, str] = {}
    for d in dirs:
        try:
            names = sorted(os.listdir(d))
        except OSError as exc:
            raise SystemExit(f"ftcluster.podexec: cannot read --env-dir {d}: {exc.strerror}") from None
        for name in names:
            path = os.path.join(d, name)
            if name.startswith(".") or "=" in name or name in keep or not os.path.isfile(path):
                continue
            with open(path, "rb") as fh:
                env[name] = fh.read().decode("utf-8", "surrogateescape")
    return env


def parse_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split ``argv`` into (env dirs, command)."""
    dirs: list[str] = []
    i = 0
    while i < len(argv) and argv[i] != "--":
        if argv[i] == "--env-dir" and i + 1 < len(argv):
            dirs.append(argv[i + 1])
            i += 2
        else:
            raise SystemExit(f"ftcluster.podexec: unexpected argument {argv[i]!r}; {USAGE}")
    command = argv[i + 1:]
    if not command:
        raise SystemExit(f"ftcluster.podexec: no command given; {USAGE}")
    return dirs, command


def exit_status(returncode: int, stop_signal: int | None, fault: bool = False) -> int:
    """The status the pod reports: 0 on success; 128+signal when the pod was told to stop
    (or the command died of a signal); FAULT_EXIT when a worker recorded an infrastructure fault;
    otherwise the command's own status."""
    if returncode == 0:
        return 0
    if stop_signal is not None:
        return 128 + stop_signal
    if returncode < 0:
        return 128 + (-returncode)
    if fault:
        return FAULT_EXIT
    return returncode


def infrastructure_fault(exit_dir: str) -> bool:
    """Whether a worker recorded the job's first failure as an infrastructure fault."""
    try:
        names = os.listdir(exit_dir)
    except OSError:
        return False
    for name in names:
        if name.startswith("cause-") and name.endswith(".json"):
            try:
                with open(os.path.join(exit_dir, name), encoding="utf-8") as fh:
                    if json.load(fh).get("kind") == "infrastructure":
                        return True
            except (OSError, ValueError, AttributeError):
                continue
    return False


def main(argv: list[str] | None = None) -> int:
    dirs, command = parse_args(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ)
    env.update(secret_env(dirs, keep=set(env)))
    own_dir = "FTCLUSTER_EXIT_DIR" not in env
    exit_dir = env.setdefault("FTCLUSTER_EXIT_DIR", tempfile.mkdtemp(prefix="ftcluster-exit-"))
    received: list[int] = []

    def forward(signum, _frame):
        if signum in STOPPING and not received:
            received.append(signum)
        if child.poll() is None:
            child.send_signal(signum)

    try:
        child = subprocess.Popen(command, env=env)
    except OSError as exc:
        print(f"ftcluster.podexec: cannot run {command[0]!r}: {exc.strerror}", file=sys.stderr)
        if own_dir:
            shutil.rmtree(exit_dir, ignore_errors=True)
        return 127
    for sig in FORWARDED:
        signal.signal(sig, forward)
    while True:
        try:
            rc = child.wait()
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for old interpreters
            continue
    fault = infrastructure_fault(exit_dir)
    if own_dir:
        shutil.rmtree(exit_dir, ignore_errors=True)
    return exit_status(rc, received[0] if received else None, fault)


if __name__ == "__main__":
    sys.exit(main())
