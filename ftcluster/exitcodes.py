"""Process exit statuses every part of ftcluster agrees on (standard library only: the launcher,
the pod entry point and the backends all read it without importing torch)."""

from __future__ import annotations

# "Stopped by a signal after committing a checkpoint; resubmit to resume": 128 + SIGTERM. The
# training runtime and launcher exit with it, the sbatch script requeues on it (a literal 143 in
# templates/sbatch.sh.j2, tested equal), Kubernetes' restartPolicy ExitCode retries it, and the
# local and submitit backends report it as preempted.
PREEMPTED_EXIT = 143
