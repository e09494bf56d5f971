"""Backends: where `ftcluster submit` runs a job. Only this package touches processes,
`sbatch`/`squeue`, or cluster APIs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import BackendError

if TYPE_CHECKING:
    from .base import Backend

BACKENDS = ("local", "slurm", "kubernetes")


def get_backend(name: str) -> Backend:
    """Instantiate the backend called ``name``."""
    if name == "local":
        from .local import LocalBackend

        return LocalBackend()
    if name == "slurm":
        from .slurm import SlurmBackend

        return SlurmBackend()
    if name == "pipeline":  # not a spec's backend: the runs of `ftcluster submit pipeline.yaml`
        from .pipeline import PipelineBackend

        return PipelineBackend()
    if name == "kubernetes":
        raise BackendError(
            "the kubernetes backend (submit/status through the API) is not available yet; render the manifests with "
            "`ftcluster render job.yaml --target pytorchjob -o out/` and `kubectl apply -f out/`"
        )
    raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
