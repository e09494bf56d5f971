"""Backends: where `ftcluster submit` runs a job. Only this package touches processes,
`sbatch`/`squeue`, or cluster APIs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import BackendError

if TYPE_CHECKING:
    from .base import Backend

BACKENDS = ("local", "slurm", "kubernetes")


def get_backend(name: str, **options: Any) -> Backend:
    """Instantiate the backend called ``name``; ``options`` go to the kubernetes backend (context, namespace)."""
    if name == "local":
        from .local.backend import LocalBackend

        return LocalBackend()
    if name == "slurm":
        from .slurm.backend import SlurmBackend

        return SlurmBackend()
    if name == "pipeline":  # not a spec's backend: the runs of `ftcluster submit pipeline.yaml`
        from .pipeline import PipelineBackend

        return PipelineBackend()
    if name == "kubernetes":
        from .kubernetes.backend import KubernetesBackend

        return KubernetesBackend(**{k: v for k, v in options.items() if v is not None})
    raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
