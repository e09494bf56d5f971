"""Python API with the CLI's verbs: load_spec, render, submit, status, logs, cancel."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .backends import get_backend
from .backends.base import RunStatus, SubmitRequest, find_run, load_status
from .loader import load_spec

__all__ = ["load_spec", "submit", "submit_dryrun", "status", "logs", "cancel"]


def _spec(spec_or_path: Any, overrides: list[str] | None = None):
    if isinstance(spec_or_path, (str, Path)):
        from .pipeline import load

        return load(spec_or_path, overrides)  # a job spec or a pipeline file
    return spec_or_path


def _backend_for(spec: Any, backend: str | None):
    from .pipeline import Pipeline

    return get_backend("pipeline" if isinstance(spec, Pipeline) else backend or spec.backend)


def submit_dryrun(spec: Any, backend: str | None = None) -> SubmitRequest:
    """What :func:`submit` would do, with no side effects; ``.describe()`` prints it."""
    spec = _spec(spec)
    return _backend_for(spec, backend).submit_dryrun(spec)


def submit(spec: Any, backend: str | None = None, overrides: list[str] | None = None) -> RunStatus:
    """Submit a spec or pipeline (object or YAML path) to its backend (or ``backend``)."""
    spec = _spec(spec, overrides)
    b = _backend_for(spec, backend)
    return b.schedule(b.submit_dryrun(spec))


def _backend_of(run_ref: str):
    st = load_status(find_run(run_ref))
    return get_backend(st.backend)


def status(run_ref: str) -> RunStatus:
    """Current status of a run (id, unique prefix or run folder)."""
    return _backend_of(run_ref).status(run_ref)


def logs(run_ref: str, follow: bool = False, **options: Any) -> Iterator[str]:
    """Log lines of a run; ``follow`` keeps reading until it ends. Kubernetes runs take ``rank=N``
    (node rank N's pod; default 0, the master)."""
    b = _backend_of(run_ref)
    if options and b.name != "kubernetes":
        from .errors import BackendError

        raise BackendError(f"{', '.join(sorted(options))}: applies to kubernetes runs only ({run_ref} is a {b.name} run)")
    return b.logs(run_ref, follow=follow, **options)


def cancel(run_ref: str) -> RunStatus:
    """Ask a run to stop (it checkpoints first when it can)."""
    return _backend_of(run_ref).cancel(run_ref)
