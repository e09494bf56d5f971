"""Backends: where `ftcluster submit` runs a job. Only this package touches processes,
`sbatch`/`squeue`, or cluster APIs.

Which backends exist is said by :mod:`ftcluster.spec.registry` (one :class:`BackendEntry` each);
this module is the only place that resolves an entry's ``"module:attr"`` strings into code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..errors import BackendError
from ..spec.registry import BackendEntry, lookup, spec_backends

if TYPE_CHECKING:
    from ..preflight.checks import Check
    from .base import Backend


def names() -> tuple[str, ...]:
    """The backends a job spec may name (``spec.backend``, ``--backend``), in registration order."""
    return spec_backends()


def entry(name: str) -> BackendEntry:
    """The registry entry called ``name``; BackendError naming the choices if there is none."""
    found = lookup(name)
    if found is None:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(names())}")
    return found


def resolve(ref: str) -> Any:
    """The object a ``"module:attr"`` string names."""
    module, _, attr = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj


def get_backend(name: str, **options: Any) -> Backend:
    """Instantiate the backend called ``name``. ``options`` (kubernetes: ``context``, ``namespace``) go to the
    backends whose entry takes them; a None value or an option the backend does not take is dropped."""
    e = entry(name)
    return resolve(e.factory)(**{k: v for k, v in options.items() if v is not None and k in e.options})


def preflight(spec: Any, remote: bool = False, backend: Backend | None = None, **options: Any) -> list[Check]:
    """The doctor's rows of ``spec``'s backend: its entry's ``preflight`` function if it names one, else the
    ``preflight`` method of ``backend`` (default: a new instance, built with ``options``)."""
    e = entry(spec.backend)
    if backend is None and e.preflight:
        return resolve(e.preflight)(spec, remote=remote, **{k: v for k, v in options.items() if k in e.options})
    backend = backend or get_backend(spec.backend, **options)
    return backend.preflight(spec, remote=remote)
