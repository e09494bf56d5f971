"""Preemption signals: SIGUSR2 / SIGTERM on any rank stop every rank at the same step.

A handler only sets a flag (nothing else is safe inside a signal handler). The training
loop calls :meth:`StopFlag.agree` once per optimizer step; it all-reduces the flag with
MAX over the control group so every rank sees the stop at the same step, even when the
scheduler signalled only rank 0 (submitit #9) or only one node.

Slurm sends ``--signal=B:USR2@T`` to the batch shell, which forwards it; Kubernetes and
``ftcluster cancel`` send SIGTERM. torchrun forwards SIGTERM (and SIGUSR2 when it is in
``--signals-to-handle``; :mod:`ftcluster.train.launch` adds it) to the workers.

The worker entry (:mod:`ftcluster.train.__main__`) installs the handlers first thing and keeps
them until the process exits: a stop that lands during start-up, or a second forwarded copy
that lands while the run shuts down, must set the flag, never kill the process with the
signal's default action (issue #8: that gave torchrun's traceback and exit 1).
"""

from __future__ import annotations

import signal
from typing import Any

from ..exitcodes import PREEMPTED_EXIT  # noqa: F401 - the runtime imports it from here

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class Stopped(Exception):
    """A stop signal arrived before the first step: nothing new to save, the worker exits 143."""


class StopFlag:
    """A process-wide "please stop after a checkpoint" flag set by signals."""

    def __init__(self) -> None:
        # A plain attribute, not a threading.Event: Event.set() takes a non-reentrant lock, and a
        # second signal landing inside the first handler's set() (TERM then USR2 on preemption)
        # deadlocked the process. Assigning a bool is atomic under the GIL and needs no lock.
        self._stopped = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopFlag:
        """Install the handlers (main thread only); returns self."""
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
        self._stopped = True

    def set(self, reason: str = "request") -> None:
        """Raise the flag from code (tests, a deadline)."""
        self.signal_name = self.signal_name or reason
        self._stopped = True

    @property
    def local(self) -> bool:
        """Whether this process received a stop signal."""
        return self._stopped

    def agree(self, *others: int, group: Any = None) -> tuple[bool, ...]:
        """All ranks agree on the stop flag and on any ``others`` flags (MAX over ranks).

        A collective: every rank calls it at the same point. Returns ``(stop, *others)``.
        """
        out = all_max([1 if self.local else 0, *others], group)
        if out[0] and not self.local:
            self.signal_name = "peer"
            self._stopped = True
        return tuple(bool(v) for v in out)


def all_max(values: list[int], group: Any = None) -> list[int]:
    """Element-wise MAX of small integers over all ranks (identity without a process group)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    from .faults import PROGRESS

    t = torch.tensor(values, dtype=torch.int64)
    with PROGRESS.waiting_in("the step's agreement"):
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [int(v) for v in t.tolist()]
