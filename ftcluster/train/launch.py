"""torchrun, with stops and exits made plain: ``python -m ftcluster.train.launch [torchrun args]``.

Plain torchrun turns a worker's exit 143 ("stopped by a signal after a committed checkpoint")
into its own exit 1, and when it is signalled itself it raises ``SignalException`` (a traceback,
exit 1) whatever the workers did. This wrapper runs torchrun's own ``main`` with these changes
(docs/lifecycle.md):

* it handles the stop signals itself (SIGTERM, SIGINT, SIGHUP: forwarded as SIGTERM; SIGUSR2 as
  SIGUSR2) and forwards them to the workers, also to workers started after the signal, while
  torchrun goes on watching them; torchrun is left only SIGQUIT (unless ``--signals-to-handle``
  is given, which restores torchrun's own handling);
* its exit status follows the workers': 0 when they all finished, 143 when they stopped for a
  signal (a worker left the "preempted" marker in ``FTCLUSTER_EXIT_DIR`` after committing a
  checkpoint, or the launcher was signalled and every worker exited 0, 143 or by the signal:
  a stop during start-up has nothing to save yet), else 1 with one line;
* the workers die with it (:mod:`.lifeline`) and it dies with the local supervisor;
* torchrun's own log lines (the OMP_NUM_THREADS banner, "Sending process ... closing signal",
  C++ warnings) stay out of the run's log unless ``FTCLUSTER_DEBUG=1``.
* it exits 0 when a stop reached it after the workers had committed every final output
  (their "finished" marker) even where torchrun itself was signalled (issue #8).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ..exitcodes import FAULT_EXIT, PREEMPTED_EXIT
from .lifeline import name_self_as_parent, tie_to_parent

MARKER = "preempted"
FINISHED = "finished"
# Stop signals the launcher catches, and what it sends the workers for each: the runtime's
# StopFlag knows SIGUSR2 and SIGTERM (an interrupt or hangup means the same: save and stop).
FORWARD = {signal.SIGTERM: signal.SIGTERM, signal.SIGINT: signal.SIGTERM, signal.SIGHUP: signal.SIGTERM,
           signal.SIGUSR2: signal.SIGUSR2}
TORCHRUN_SIGNALS = "SIGQUIT"


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


def preempted_hint() -> str:
    """What a stop after a committed checkpoint leads to, in the words of where the run is."""
    if os.environ.get("FTCLUSTER_BACKEND") == "local":
        return "stopped after this checkpoint; `ftcluster submit` the same spec again to resume from it"
    return f"exiting with {PREEMPTED_EXIT} so the scheduler requeues the job"


def debugging() -> bool:
    return os.environ.get("FTCLUSTER_DEBUG", "") not in ("", "0")


class StopForwarder:
    """Catch the stop signals in the launcher and pass them on to its children (the workers)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._sent: set[int] = set()
        self._lock = threading.Lock()

    def install(self) -> StopForwarder:
        for sig in FORWARD:
            signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: object) -> None:
        first = self.signum is None
        self.signum = signum
        with self._lock:
            self._sent.clear()  # a second signal (TERM after USR2) goes to every worker again
        self._forward()
        if first:  # workers started after the signal (it came during the rendezvous) get it too
            threading.Thread(target=self._keep_forwarding, daemon=True).start()

    def _keep_forwarding(self) -> None:
        while True:
            time.sleep(0.2)
            self._forward()

    def _forward(self) -> None:
        if self.signum is None:
            return
        sig = FORWARD[signal.Signals(self.signum)]
        with self._lock:
            for pid in _children(os.getpid()):
                if pid not in self._sent:
                    self._sent.add(pid)
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a signal"


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc; none elsewhere)."""
    out = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                fields = fh.read().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1] == str(pid) and fields[0] != "Z":
            out.append(int(name))
    return out


class _QuietTorchrun(logging.Filter):
    """Drop torchrun's own log records below CRITICAL (its banners and shutdown notes)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith("torch.distributed") or record.levelno >= logging.CRITICAL


def quiet_torchrun() -> None:
    for name in ("torch", "torch.distributed", ""):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(_QuietTorchrun())


def main(argv: list[str] | None = None) -> int:
    tie_to_parent()  # the local supervisor: die with it
    name_self_as_parent()  # the workers: die with this launcher
    args = list(sys.argv[1:] if argv is None else argv)
    own_signals = not any(a.split("=")[0] in ("--signals-to-handle", "--signals_to_handle") for a in args)
    if own_signals:
        args.insert(0, f"--signals-to-handle={TORCHRUN_SIGNALS}")
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")
    if not debugging():
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # c10d's C++ warnings, here and in the workers
    exit_dir = Path(tempfile.mkdtemp(prefix="ftcluster-exit-"))
    os.environ["FTCLUSTER_EXIT_DIR"] = str(exit_dir)
    if not any(a.split("=")[0] in ("--log-dir", "--log_dir") for a in args):
        args.insert(0, f"--log-dir={exit_dir / 'torchelastic'}")  # else torchrun leaves $TMPDIR/torchelastic_*
    stop = StopForwarder().install() if own_signals else None
    try:
        from torch.distributed import run as torchrun

        if not debugging():
            quiet_torchrun()
        torchrun.main(args)
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:  # noqa: BLE001 - ChildFailedError, SignalException: mapped below
        if (exit_dir / FINISHED).exists() and not (exit_dir / MARKER).exists():
            return 0  # a stop reached torchrun after the workers finished: the run is done
        code = exit_code_for(exc, stop, (exit_dir / MARKER).exists(), exit_dir)
        if code is None:
            raise
        return code
    finally:
        shutil.rmtree(exit_dir, ignore_errors=True)


def exit_code_for(exc: BaseException, stop: StopForwarder | None, preempted: bool,
                  exit_dir: Path | None = None) -> int | None:
    """The launcher's exit status for torchrun's exception (None: re-raise it, a launcher bug)."""
    kind = type(exc).__name__
    stop_signals = {int(s) for s in FORWARD}
    signalled = stop is not None and stop.signum is not None
    if kind == "SignalException":  # torchrun's own handler: SIGQUIT, or signals the user chose
        sig = int(getattr(exc, "sigval", 0) or 0)
        if preempted or sig in stop_signals:
            return _stopped(f"stopped by {signal.Signals(sig).name if sig else 'a signal'}", preempted)
        print(f"ftcluster: torchrun got {signal.Signals(sig).name if sig else 'a signal'}; stopped the workers",
              file=sys.stderr, flush=True)
        return 128 + sig if sig else 1
    if kind != "ChildFailedError":
        if preempted:
            return PREEMPTED_EXIT
        if isinstance(exc, KeyboardInterrupt):
            return 128 + int(signal.SIGINT)
        if kind.startswith("Rendezvous") or "rendezvous" in kind.lower():  # a node never came, or its store went
            from .faults import INFRA, Fault, read_causes

            # torchrun's agent lost the rendezvous store (hosted by a node now gone): what the workers
            # recorded names that node better than the agent's error does
            causes = read_causes(exit_dir) if exit_dir is not None else {}
            if causes:
                return _report(causes[min(causes)])
            return _report(Fault(INFRA, None, _host(), f"the rendezvous failed ({kind}: "
                                 f"{(str(exc).splitlines() or [''])[0]}): a node did not join or was lost"))
        return None
    codes = [getattr(f, "exitcode", None) for f in (getattr(exc, "failures", None) or {}).values()]
    # Exits that a stop explains: saved and stopped (143), or ended by the forwarded signal (or
    # torchrun's SIGKILL after its shutdown timeout) before the worker could save anything.
    stopped_codes = {PREEMPTED_EXIT, 0} | {-s for s in stop_signals} | {-int(signal.SIGKILL)}
    if preempted or (signalled and all(c in stopped_codes for c in codes)):
        return _stopped(f"stopped by {stop.name}" if signalled and stop else "stopped by a signal", preempted)
    if debugging():
        import traceback

        traceback.print_exception(exc)
    # The failing rank already printed its one-line error; torchrun's traceback adds nothing.
    return _report(first_failure(exc, exit_dir), _failure_summary(exc))


def _host() -> str:
    from .faults import host_name

    return host_name()


def first_failure(exc: BaseException, exit_dir: Path | None) -> Any:
    """The job's first failure as this node saw it: what its workers recorded (their cause files: the
    first failure of the whole job, agreed through the store), else the earliest of torchrun's
    failures: a worker killed by a signal is an infrastructure fault (the OOM killer, a lost node, a
    kill), any other exit an error of the code or data."""
    from .faults import INFRA, USER, Fault, read_causes

    failures = sorted((getattr(f, "timestamp", 0), rank, f) for rank, f in
                      (getattr(exc, "failures", None) or {}).items())
    causes = read_causes(exit_dir) if exit_dir is not None else {}
    # torchrun records the failures it saw first, then (same list, later timestamps) the workers it
    # stopped because of them: only the first are candidates for the job's first failure.
    first = [(rank, f) for ts, rank, f in failures if ts == failures[0][0]] if failures else []
    recorded = next((causes[rank] for rank, _f in first if rank in causes), None)
    recorded = recorded or next((causes[rank] for _, rank, _f in failures if rank in causes),
                                causes[min(causes)] if causes else None)
    # A rank of this node killed by a signal is seen here directly; its peers only inferred its loss.
    killed = [(rank, f.exitcode) for rank, f in first
              if isinstance(getattr(f, "exitcode", None), int) and f.exitcode < 0 and rank not in causes]
    if recorded is not None and (recorded.kind == USER or not killed):
        return recorded
    if killed:
        rank, code = killed[0]
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        return Fault(INFRA, rank, _host(), f"killed by {name} (the OOM killer, a node failure or a kill)")
    if not failures:
        return Fault(USER, None, _host(), "a worker failed")
    _, rank, f = failures[0]
    code = getattr(f, "exitcode", None)
    if code == FAULT_EXIT:
        return Fault(INFRA, rank, _host(), f"exit code {code}")
    return Fault(USER, rank, _host(), f"exit code {code}")


def _report(fault: Any, summary: str = "") -> int:
    """One line naming the first failure and what follows; the status, recorded for the supervisor."""
    from .faults import INFRA, verdict

    code = FAULT_EXIT if fault.kind == INFRA else 1
    also = f" [{summary}]" if summary else ""
    print(f"ftcluster: training failed: {fault.describe()}{also}; {verdict(fault.kind)} "
          "(the failing rank's own error is above; FTCLUSTER_DEBUG=1 shows torchrun's report)",
          file=sys.stderr, flush=True)
    where = os.environ.get("FTCLUSTER_FAULT_FILE")
    if where:
        try:
            Path(where).write_text(json.dumps({"code": code, "kind": fault.kind, "rank": fault.rank,
                                               "host": fault.host, "what": fault.what}))
        except OSError:
            pass
    return code


def _stopped(what: str, saved: bool) -> int:
    if not saved:  # the workers said nothing: they were stopped before a checkpoint of this attempt
        print(f"ftcluster: {what} before a checkpoint of this attempt; nothing new to save (exit {PREEMPTED_EXIT}); "
              "the next start resumes from the last committed checkpoint, if any", file=sys.stderr, flush=True)
    return PREEMPTED_EXIT


def _failure_summary(exc: BaseException) -> str:
    failures = getattr(exc, "failures", None) or {}
    parts = [f"rank {rank} exit code {getattr(f, 'exitcode', '?')}" for rank, f in sorted(failures.items())]
    return ", ".join(parts) or "a worker failed"


if __name__ == "__main__":
    sys.exit(main())
