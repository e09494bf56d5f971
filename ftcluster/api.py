"""Python API with the CLI's verbs: load_spec, submit (submit_dryrun + schedule), status, logs,
cancel, list_runs, doctor. The CLI uses only this module to reach the backends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .backends import get_backend
from .backends.base import EXIT_CODES, Backend, RunStatus, SubmitRequest, find_run, load_status
from .backends.base import list_runs as _run_folders
from .spec.loader import load_spec

__all__ = ["EXIT_CODES", "load_spec", "backend_for", "submit", "submit_dryrun", "schedule", "server_dry_run",
           "status", "wait", "list_cluster", "logs", "cancel", "list_runs", "doctor", "run_output"]


def _spec(spec_or_path: Any, overrides: list[str] | None = None):
    if isinstance(spec_or_path, (str, Path)):
        from .spec.pipeline import load

        return load(spec_or_path, overrides)  # a job spec or a pipeline file
    return spec_or_path


def backend_for(spec: Any, backend: str | None = None, **options: Any) -> Backend:
    """The backend that runs ``spec``: ``backend`` if given, else the spec's (a pipeline: the pipeline backend).
    ``options`` go to the kubernetes backend (``context``)."""
    from .spec.pipeline import Pipeline

    return get_backend("pipeline" if isinstance(spec, Pipeline) else backend or spec.backend, **options)


def submit_dryrun(spec: Any, backend: str | None = None, **options: Any) -> SubmitRequest:
    """What :func:`submit` would do, with no side effects; ``.describe()`` prints it."""
    from .spec.pipeline import Pipeline, precedence

    spec = _spec(spec)
    req = backend_for(spec, backend, **options).submit_dryrun(spec)
    if isinstance(spec, Pipeline):
        for st in req.stages:
            st.request.notes = precedence(spec.stage(st.name).spec, spec.stage(st.name), spec.source)
    else:
        req.notes = precedence(spec)
    return req


def schedule(request: Any, **options: Any) -> RunStatus:
    """Carry out a request from :func:`submit_dryrun` on the backend that built it (same ``options``)."""
    return get_backend(request.backend, **options).schedule(request)


def server_dry_run(request: Any, **options: Any) -> str:
    """Kubernetes: have the API server validate the request's job (``dryRun=All``); nothing is stored."""
    from .backends.kubernetes.backend import KubernetesBackend
    from .errors import BackendError

    b = get_backend(request.backend, **options)
    if not isinstance(b, KubernetesBackend):
        raise BackendError(f"a server-side dry run applies to the kubernetes backend only, not {request.backend}")
    return b.server_dry_run(request)


def submit(spec: Any, backend: str | None = None, overrides: list[str] | None = None) -> RunStatus:
    """Submit a spec or pipeline (object or YAML path) to its backend (or ``backend``)."""
    spec = _spec(spec, overrides)
    return backend_for(spec, backend).submit(spec)


def _backend_of(run_ref: str):
    st = load_status(find_run(run_ref))
    return get_backend(st.backend)


def status(run_ref: str) -> RunStatus:
    """Current status of a run (id, unique prefix or run folder)."""
    return _backend_of(run_ref).status(run_ref)


def wait(run_ref: str, poll: float = 1.0) -> RunStatus:
    """Block until the run ends and return its final status: the backend polls its status every
    ``poll`` seconds (Kubernetes follows the job with a watch, and also ends when the job is deleted)."""
    return _backend_of(run_ref).wait(run_ref, poll=poll)


def list_cluster(backend: str, **options: Any) -> list[RunStatus]:
    """The runs a cluster knows (kubernetes: ftcluster's jobs in the namespace, by label)."""
    return get_backend(backend, **options).list()


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


def run_output(run_ref: str) -> dict[str, Any]:
    """Where a run writes its outputs: ``{"uri", "storage_options", "max_steps", "single"}``.

    ``uri`` is absolute for a local run whose output.uri was relative (resolved against the folder
    it was launched from, as the runtime resolved it); ``single`` is False for a run with several
    outputs (variants, pipeline stages), whose ``uri`` is then only their common root.
    """
    import json

    from .storage.uri import is_local, local_path

    run_dir = find_run(run_ref)
    st = load_status(run_dir)
    spec: dict[str, Any] = {}
    payload: dict[str, Any] = {}
    try:
        payload = json.loads((run_dir / "payload.json").read_text(encoding="utf-8"))
        spec = payload.get("spec") or {}
    except (OSError, ValueError):
        pass
    uri = st.output_uri
    rest = uri.removeprefix("file://") if uri and is_local(uri) else None
    if rest is not None and not rest.startswith(("/", "~")):
        try:
            cwd = json.loads((run_dir / "launch.json").read_text(encoding="utf-8"))["cwd"]
            uri = "file://" + str(local_path(str(Path(cwd) / rest)))
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return {"uri": uri, "storage_options": (spec.get("output") or {}).get("storage_options") or {},
            "max_steps": (spec.get("training") or {}).get("max_steps"),
            "single": bool(uri) and not st.tasks and "variants" not in payload}


def list_runs() -> list[RunStatus]:
    """The current status of every run under the runs folder, oldest first; a broken run folder is skipped."""
    runs = []
    for d in _run_folders():
        try:
            runs.append(get_backend(load_status(d).backend).status(str(d)))
        except Exception:  # one broken folder must not hide the others
            continue
    return runs


def doctor(path: str, overrides: list[str] | None = None, remote: bool = False,
           context: str | None = None) -> list[Any]:
    """Every pre-flight check of the job at ``path`` (:class:`~ftcluster.preflight.checks.Check` rows): spec, launch
    files, the planner, the backend's ``preflight``, inputs, output storage; ``remote`` also probes a
    compute node; ``context`` is the kubeconfig context for a kubernetes job."""
    from .preflight.doctor import diagnose

    return diagnose(path, overrides, remote=remote, context=context)
