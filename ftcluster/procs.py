"""Process liveness on this host (standard library only).

Shared by the local backend (which finds and stops a run's processes) and the training
launcher's workers (which die with their parent): neither layer may import the other.
"""

from __future__ import annotations

import os


def alive(pid: int | None) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True
