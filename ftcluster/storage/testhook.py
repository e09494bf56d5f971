"""TEST-ONLY: deliver a signal at a named moment of a training run, so the stop and crash tests
need no timing-based sleeps. Unset in production (nothing happens then).

``FTCLUSTER_TEST_SIGNAL_AT=BOUNDARY[@N]:SIGNAL[:RANK]``, e.g. ``checkpoint-files:SIGKILL`` or
``startup:SIGTERM:1``. The first (or ``N``-th) time the process of rank ``RANK`` (default 0) reaches
``BOUNDARY`` it sends ``SIGNAL``; only in a run's first attempt (a restart after a fault, with
``FTCLUSTER_RESTART_COUNT`` or ``SLURM_RESTART_COUNT`` above 0, runs clean):

* ``SIGKILL`` to itself: a crashed worker (the OOM killer, a lost node);
* ``SIGSTOP`` to itself: a frozen rank (every thread stops, the heartbeat too);
* ``HANG`` (no signal): the main thread blocks for good, as a data read that never returns, while
  the process and its heartbeat thread live on;
* ``RAISE`` (no signal): a ``ValueError``, as a bad record or a bug in the loss would raise;
* any other signal (a stop: SIGUSR2, SIGTERM) to its parent, the launcher (torchrun's agent),
  as a scheduler or ``ftcluster cancel`` would, and to itself, so the stop is seen at this very
  moment rather than after the agent's forwarding delay (the agent forwards it too; a second
  delivery only sets the same flag again).

The boundaries (docs/training.md, "Stops and crashes"), in the order a run meets them:

``startup``              the worker entry, right after its stop handlers are installed
``setup``                start-up done (model, tokenizer, data, engine, resume), before the first step
``checkpoint-files``     every file of a checkpoint is uploaded, its manifest not yet written
``checkpoint-committed`` a checkpoint's manifest is written, its LoRA adapter not yet published
``final-export``         after the last step's checkpoint and the final evaluation, before the exports
``final-committed``      every final output committed (the last manifest written), before exit
``data-read``            each optimizer step, before its batches are read (``data-read@3``: step 3)

and for ``python -m ftcluster.train.prepare``: ``prepare-file-committed``, a source file's done/ marker written.
"""

from __future__ import annotations

import os
import signal

ENV = "FTCLUSTER_TEST_SIGNAL_AT"
BOUNDARIES = ("startup", "setup", "checkpoint-files", "checkpoint-committed", "final-export", "final-committed",
              "data-read", "prepare-file-committed")
_fired: set[str] = set()
_reached: dict[str, int] = {}


def signal_at(boundary: str) -> None:
    """Send the configured signal if ``boundary`` is the one named in ``$FTCLUSTER_TEST_SIGNAL_AT``."""
    value = os.environ.get(ENV)
    if not value:
        return
    where, _, rest = value.partition(":")
    name, _, nth = where.partition("@")
    sig_name, _, rank = rest.partition(":")
    if name not in BOUNDARIES:
        raise ValueError(f"{ENV}={value}: unknown boundary {name!r}; one of {', '.join(BOUNDARIES)}")
    if name != boundary or boundary in _fired or os.environ.get("RANK", "0") != (rank or "0"):
        return
    if any(os.environ.get(v, "0") not in ("", "0") for v in ("FTCLUSTER_RESTART_COUNT", "SLURM_RESTART_COUNT")):
        return
    _reached[boundary] = _reached.get(boundary, 0) + 1
    if _reached[boundary] < int(nth or 1):
        return
    _fired.add(boundary)
    if sig_name == "HANG":
        import threading

        threading.Event().wait()
    if sig_name == "RAISE":
        raise ValueError(f"{ENV}={value}: a test's error in the training code")
    sig = signal.Signals[sig_name]
    if sig not in (signal.SIGKILL, signal.SIGSTOP):
        os.kill(os.getppid(), sig)
    os.kill(os.getpid(), sig)
