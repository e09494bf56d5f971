"""torchrun, with preemption made visible: ``python -m ftcluster.train.launch [torchrun args]``.

Plain torchrun turns a worker's exit 143 ("stopped by a signal after a committed
checkpoint") into its own exit 1, and dies on SIGUSR2 without telling the workers. This
wrapper runs torchrun's own ``main`` with two changes:

* SIGUSR2 joins ``--signals-to-handle`` (unless given), so torchrun forwards it to the
  workers and gives them ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds (default here 600)
  to checkpoint before SIGKILL;
* it exits 143 when the workers stopped because of a signal (they leave a marker file
  in ``FTCLUSTER_EXIT_DIR``, which this wrapper creates), so the Slurm script requeues
  and Kubernetes' ExitCode policy retries; other failures keep torchrun's status;
* it exits 0 when a stop signal reached it after the workers had committed every final
  output (their "finished" marker), where torchrun raises its SignalException (issue #8).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..exitcodes import PREEMPTED_EXIT

SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2"
MARKER = "preempted"
FINISHED = "finished"


def mark_preempted() -> None:
    """Called by a worker that exits 143 (no-op outside this launcher)."""
    _mark(MARKER)


def mark_finished() -> None:
    """Called by a worker that exits 0 with every final output committed (no-op outside this launcher)."""
    _mark(FINISHED)


def _mark(name: str) -> None:
    d = os.environ.get("FTCLUSTER_EXIT_DIR")
    if d:
        try:
            (Path(d) / name).touch()
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a.split("=")[0] in ("--signals-to-handle", "--signals_to_handle") for a in args):
        args.insert(0, f"--signals-to-handle={SIGNALS}")
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")
    exit_dir = Path(tempfile.mkdtemp(prefix="ftcluster-exit-"))
    os.environ["FTCLUSTER_EXIT_DIR"] = str(exit_dir)
    from torch.distributed import run as torchrun

    code = 0
    try:
        torchrun.main(args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:  # noqa: BLE001 - ChildFailedError, SignalException: decided by the marker
        code = 1
        if (exit_dir / FINISHED).exists() and not (exit_dir / MARKER).exists():
            code = 0  # a stop reached torchrun after the workers finished: the run is done
        elif not (exit_dir / MARKER).exists():
            shutil.rmtree(exit_dir, ignore_errors=True)
            if type(exc).__name__ != "ChildFailedError" or os.environ.get("FTCLUSTER_DEBUG") == "1":
                raise
            # The failing rank already printed its one-line error; torchrun's traceback adds nothing.
            print(f"ftcluster: training failed ({_failure_summary(exc)}); the rank's error is above "
                  "(FTCLUSTER_DEBUG=1 shows torchrun's report)", file=sys.stderr, flush=True)
            return 1
    if (exit_dir / MARKER).exists():
        code = PREEMPTED_EXIT
    shutil.rmtree(exit_dir, ignore_errors=True)
    return code


def _failure_summary(exc: BaseException) -> str:
    failures = getattr(exc, "failures", None) or {}
    parts = [f"rank {rank} exit code {getattr(f, 'exitcode', '?')}" for rank, f in sorted(failures.items())]
    return ", ".join(parts) or "a worker failed"


if __name__ == "__main__":
    sys.exit(main())
