"""The backend registry: one declarative entry per backend, read by every layer that names backends.

A :class:`BackendEntry` says what the layers above the backends need to know about one backend
without importing it: its name (``spec.backend``), the spec section holding its settings, the
render target its jobs get by default, whether the job's local paths name this machine's files,
which keyword options its constructor takes, and where its code lives, as ``"module:attr"``
strings resolved only by :mod:`ftcluster.backends` (the entry-point style of torchx):

* ``factory``: the :class:`~ftcluster.backends.base.Backend` subclass (or any callable returning one);
* ``preflight``: optional, a function ``(spec, remote=False, **options) -> list[Check]`` for
  ``ftcluster doctor``; by default the backend's own ``preflight`` method.

The spec (valid ``backend:`` names, paths, variants), the CLI (``--backend`` choices), the renderers
(:func:`ftcluster.render.default_target`), the doctor and :func:`ftcluster.backends.get_backend`
all read this table, so adding a backend is its folder under ``ftcluster/backends/`` plus one
:func:`register` call (here, or from another package through an entry point of the group
``ftcluster.backends`` whose object is a :class:`BackendEntry`). This module imports nothing of
ftcluster, so the spec layer can read it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

ENTRY_POINT_GROUP = "ftcluster.backends"


@dataclass(frozen=True)
class BackendEntry:
    """One backend as the layers above :mod:`ftcluster.backends` see it."""

    name: str  # spec.backend and the ``backend`` of every run's status.json
    factory: str  # "module:attr" of the Backend class (or a callable taking ``options``)
    section: str | None = None  # the spec section of its settings ("slurm"), if any
    render_target: str = "slurm"  # the render target its jobs get by default
    # A spec field (dotted) whose value, lower-cased, is the default target instead (kubernetes.kind).
    render_target_field: str | None = None
    # Do the job's local paths (data, model, output.uri) name this machine's files?
    paths_here: bool = True
    # ...unless this spec field (dotted) is set: the job then runs on another machine (slurm.login).
    remote_when: str | None = None
    # Do the job's processes run with this shell's environment, so its credentials (AWS_*, profiles) are
    # the job's? ``submit`` then refuses an object-store URI they cannot open, as ``doctor`` reports it.
    shell_credentials: bool = False
    # Keyword options the factory takes (get_backend drops the others): {"context", "namespace"}.
    options: tuple[str, ...] = ()
    # Keyword options its ``logs`` takes ({"rank"}).
    log_options: tuple[str, ...] = ()
    # Can it list the runs the cluster knows (``ftcluster list --backend NAME``)?
    lists_cluster: bool = False
    # Can the cluster validate a job without storing it (``submit --dry-run --server``)?
    server_dry_run: bool = False
    preflight: str | None = None  # "module:attr" of a doctor function; None: the backend's ``preflight``
    # Spec fields (dotted) a job on this backend must set, each with why: checked when a spec is loaded.
    required: tuple[tuple[str, str], ...] = ()
    # Why a variant may not change its section (one array, one backend setup); None: a generic sentence.
    variants_note: str | None = None
    # The doctor's "launch files" row: "submit" (what `submit --dry-run` writes) or "render" (every
    # rendered file: Kubernetes creates only the job of them, and renders variants it does not submit).
    launch_files: str = "submit"
    in_spec: bool = True  # a ``backend:`` value of a job spec (not the pipeline backend)
    description: str = ""


_ENTRIES: dict[str, BackendEntry] = {}
_plugins_loaded = False


def register(entry: BackendEntry) -> BackendEntry:
    """Add a backend; its name must be new."""
    if entry.name in _ENTRIES:
        raise ValueError(f"backend {entry.name!r} is registered twice")
    _ENTRIES[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    """Remove a backend (tests that register one of their own)."""
    _ENTRIES.pop(name, None)


def _load_plugins() -> None:
    """Register the entries other packages declare (entry point group ``ftcluster.backends``), once."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception:  # a broken plugin must not break ftcluster  # noqa: BLE001
            continue
        if isinstance(obj, BackendEntry) and obj.name not in _ENTRIES:
            _ENTRIES[obj.name] = obj


def lookup(name: str) -> BackendEntry | None:
    """The entry called ``name``, or None (plugins are looked for only when it is not built in)."""
    found = _ENTRIES.get(name)
    if found is None and not _plugins_loaded:
        _load_plugins()
        found = _ENTRIES.get(name)
    return found


def entries(plugins: bool = True) -> Iterator[BackendEntry]:
    """Every registered backend, built-in ones first, in registration order. ``plugins=False``: without
    looking for entry points first (that scan of the installed packages costs start-up time)."""
    if plugins:
        _load_plugins()
    return iter(list(_ENTRIES.values()))


def spec_backends() -> tuple[str, ...]:
    """The valid values of a job spec's ``backend:``."""
    return tuple(e.name for e in entries() if e.in_spec)


def is_spec_backend(name: object) -> bool:
    entry = lookup(name) if isinstance(name, str) else None
    return entry is not None and entry.in_spec


def sections() -> tuple[str, ...]:
    """The spec sections of the registered backends ("slurm", "kubernetes", "local")."""
    return tuple(e.section for e in entries() if e.section)


def field_of(obj: object, dotted: str) -> object:
    """The value at ``dotted`` ("slurm.login") of a spec object or of a spec as plain data."""
    for part in dotted.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part, None)
    return obj


def runs_here(backend: object, spec: object) -> bool:
    """Do the local paths of ``spec`` (an object or plain data) on ``backend`` name this machine's files?
    An unknown backend counts as here (the spec's own check reports the name)."""
    entry = lookup(backend) if isinstance(backend, str) else None
    if entry is None:
        return True
    if not entry.paths_here:
        return False
    return not (entry.remote_when and field_of(spec, entry.remote_when))


def default_target(spec: object) -> str:
    """The render target a spec's backend implies."""
    backend = getattr(spec, "backend", None)
    entry = lookup(backend) if isinstance(backend, str) else None
    if entry is None:
        return "slurm"
    if entry.render_target_field:
        value = field_of(spec, entry.render_target_field)
        if isinstance(value, str) and value:
            return value.lower()
    return entry.render_target


# --------------------------------------------------------------------------- the built-in backends

register(BackendEntry(
    name="local", section="local", factory="ftcluster.backends.local.backend:LocalBackend", shell_credentials=True,
    variants_note="all variants run in one local run; set local at the top level",
    description="this machine: torchrun under a supervisor process"))
register(BackendEntry(
    name="slurm", section="slurm", factory="ftcluster.backends.slurm.backend:SlurmBackend", remote_when="slurm.login",
    variants_note="the sbatch script (partition, directives, setup) is shared by every task; set slurm at the top level",
    description="sbatch, here or through ssh to a login node (slurm.login)"))
register(BackendEntry(
    name="kubernetes", section="kubernetes", factory="ftcluster.backends.kubernetes.backend:KubernetesBackend",
    render_target="pytorchjob", render_target_field="kubernetes.kind", paths_here=False,
    options=("context", "namespace"), log_options=("rank",), lists_cluster=True, server_dry_run=True,
    launch_files="render",
    required=(("kubernetes.image", "the kubernetes backend needs an image with ftcluster[train]; set kubernetes.image "
                                   "to a pinned tag"),),
    variants_note="image, queue and pod settings are the same for every variant; set kubernetes at the top level",
    description="a Kubeflow PyTorchJob or TrainJob through the Kubernetes API"))
register(BackendEntry(
    name="pipeline", factory="ftcluster.backends.pipeline:PipelineBackend", in_spec=False,
    description="the runs of `ftcluster submit pipeline.yaml` (stages on Slurm)"))
