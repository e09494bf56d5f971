"""A run's processes live and die together: a child dies with the process that started it.

The local supervisor starts the launcher and the launcher (torchrun) starts the workers, each in
a new session, so a signal to one process group never reaches the next level. When a parent is
SIGKILLed (an OOM killer, a crashed agent, ``kill -9``) its children used to live on, re-parented
to PID 1, holding GPU memory and writing to the run's log. Each parent therefore names itself in
``FTCLUSTER_LIFELINE_PID`` and each child calls :func:`tie_to_parent` first thing: the kernel
SIGKILLs the child when that parent dies (``PR_SET_PDEATHSIG``), and a child whose parent died
before the call exits at once. Standard library only (the launcher calls it before importing torch).
"""

from __future__ import annotations

import os
import signal
import sys

from ..procs import alive

LIFELINE_ENV = "FTCLUSTER_LIFELINE_PID"
_PR_SET_PDEATHSIG = 1


def tie_to_parent() -> bool:
    """Die (SIGKILL) with the parent named in ``$FTCLUSTER_LIFELINE_PID``; returns whether tied.

    A no-op when the variable is unset (started by hand, srun, a pod) or off Linux. When the named
    process is alive but is not our parent (a process that merely inherited the variable), the
    tie is undone and nothing else happens. When it is gone already, this process exits 1.
    """
    try:
        parent = int(os.environ.get(LIFELINE_ENV, ""))
    except ValueError:
        return False
    if not sys.platform.startswith("linux") or parent <= 1:
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        return False
    # Checked after prctl: a parent that dies after this line kills us; one that died before it
    # has already re-parented us, which getppid() shows.
    if os.getppid() == parent:
        return True
    if alive(parent):  # not our parent: the variable was inherited, not meant for us
        libc.prctl(_PR_SET_PDEATHSIG, 0, 0, 0, 0)
        return False
    print(f"ftcluster: the process that started this one (pid {parent}) is gone; exiting", file=sys.stderr,
          flush=True)
    os._exit(1)


def name_self_as_parent() -> None:
    """Make the children started from now on tie themselves to this process."""
    os.environ[LIFELINE_ENV] = str(os.getpid())
