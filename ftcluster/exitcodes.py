"""Process exit statuses every part of ftcluster agrees on (standard library only: the launcher,
the pod entry point and the backends all read it without importing torch)."""

from __future__ import annotations

# "Stopped by a signal after committing a checkpoint; resubmit to resume": 128 + SIGTERM. The
# training runtime and launcher exit with it, the sbatch script requeues on it (a literal 143 in
# templates/sbatch.sh.j2, tested equal), Kubernetes' restartPolicy ExitCode retries it, and the
# local and submitit backends report it as preempted.
PREEMPTED_EXIT = 143

# "An infrastructure fault ended the run: a rank or node lost, a hung rank, a collective or
# rendezvous error, a worker killed by a signal (the OOM killer)": a restart from the last
# committed checkpoint can help, up to resources.max_restarts (docs/lifecycle.md, "Faults").
# Above 128 so Kubernetes' restartPolicy ExitCode retries it (1-127 are permanent there), above
# 143 and 137 because srun returns the highest status of its tasks (a node whose launcher was
# stopped or killed because of another node's fault must not hide it), and no 128+signal of a
# signal a job meets. A user-code error (a bad data file, an exception in the loss) exits 1 and
# is never retried.
FAULT_EXIT = 170
