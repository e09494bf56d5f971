"""The backend contract shared by local, Slurm, pipelines and (later) Kubernetes.

Following torchx: ``submit(spec) == schedule(submit_dryrun(compile(spec)))``: the backend is handed
the compiled launch plan, not the spec to compile again. The dry run builds
a :class:`SubmitRequest` whose ``describe()`` is exactly what would be run (command and
file contents); ``schedule`` is the only step with side effects.

A new backend subclasses :class:`Backend`, fills its abstract hooks and registers one entry in
:mod:`ftcluster.spec.registry` (its factory as a ``"module:attr"`` string). Run folders (one per submitted run, holding
``status.json`` and whatever the backend writes beside it) are handled here once.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BackendError, RunNotFoundError

if TYPE_CHECKING:
    from ..preflight.checks import Check

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "CANCELLED": 3, "PREEMPTED": 4}


@dataclass
class SubmitRequest:
    """What a backend would submit: argv, files written beside it, environment."""

    backend: str
    run_id: str
    run_dir: Path
    argv: list[str]
    files: dict[str, str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    #: A file of ``files`` that the command reads on its stdin (``ssh login sbatch < job.sbatch``).
    stdin_file: str | None = None
    notes: list[str] = field(default_factory=list)  # comment lines for describe() (which overrides apply)

    def command(self) -> str:
        """The command as a shell line that can be pasted (a stdin file as an unquoted ``<`` redirect)."""
        import shlex

        line = shlex.join(self.argv)
        return f"{line} < {shlex.quote(self.stdin_file)}" if self.stdin_file else line

    def describe(self) -> str:
        """Human-readable: the command, then every file's full contents.

        A dry run writes nothing, so the files are named relative to the run folder and their
        headers say that ``submit`` would write them there.
        """
        lines = [f"# backend: {self.backend}", f"# run id: {self.run_id}",
                 f"# run folder: {self.run_dir} (created by submit, with the files below; a dry run writes nothing)"]
        if self.cwd:
            lines.append(f"# working directory: {self.cwd}")
        lines += [f"# {n}" for n in self.notes]
        for k, v in sorted(self.env.items()):
            lines.append(f"# env {k}={v}")
        lines.append("$ " + self.command())
        for name, text in self.files.items():
            lines.append(f"\n----- {name} (would be written to the run folder) -----")
            lines.append(text.rstrip("\n"))
        return "\n".join(lines) + "\n"


@dataclass
class RunStatus:
    """State of one run, as recorded in its run folder and refreshed from the backend."""

    run_id: str
    backend: str
    name: str
    state: str
    run_dir: str
    job_id: str | None = None
    returncode: int | None = None
    submitted_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    message: str = ""
    spec_hash: str = ""
    output_uri: str = ""
    # Parts of the run: the tasks of a job array (one per variant) or the stages of a pipeline,
    # each {"name", "job_id", "state", "message"} (docs/pipelines.md).
    tasks: list[dict[str, Any]] = field(default_factory=list)
    # Restarts after infrastructure faults (resources.max_restarts) and each failed attempt's cause,
    # {"attempt", "code", "kind", "rank", "host", "what"} (docs/lifecycle.md, "Faults").
    restarts: int = 0
    faults: list[dict[str, Any]] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ftcluster_home() -> Path:
    """Root for run folders: $FTCLUSTER_HOME or ~/.ftcluster."""
    return Path(os.environ.get("FTCLUSTER_HOME") or Path.home() / ".ftcluster")


def runs_root(spec: Any | None = None) -> Path:
    """Where run folders live for this spec (spec.local.runs_dir overrides)."""
    if spec is not None and getattr(spec.local, "runs_dir", None):
        return Path(spec.local.runs_dir).expanduser()
    return ftcluster_home() / "runs"


def new_run_id(name: str) -> str:
    """A unique, sortable run id: <name>-<UTC time>-<4 hex>."""
    import secrets  # here: it imports random and hashlib, which `ftcluster render` never needs
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def write_atomic(path: Path, text: str) -> None:
    """Write a file so readers never see half of it."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_status(run_dir: Path, status: RunStatus) -> None:
    write_atomic(run_dir / "status.json", json.dumps(status.to_dict(), indent=1, sort_keys=True))


def load_status(run_dir: Path) -> RunStatus:
    try:
        data = json.loads((run_dir / "status.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunNotFoundError(f"{run_dir}: not a run folder (no status.json)") from None
    except ValueError as exc:
        raise BackendError(f"{run_dir}/status.json is corrupt ({exc}); remove the run folder") from None
    return RunStatus(**data)


def find_run(run_ref: str, roots: list[Path] | None = None) -> Path:
    """Resolve a run id, unique prefix or run-folder path to its folder."""
    p = Path(run_ref).expanduser()
    if (p / "status.json").exists():
        return p
    roots = roots or [runs_root()]
    matches: list[Path] = []
    for root in roots:
        if not root.is_dir():
            continue
        exact = root / run_ref
        if (exact / "status.json").exists():
            return exact
        matches += sorted(d for d in root.iterdir() if d.name.startswith(run_ref) and (d / "status.json").exists())
    if not matches:
        raise RunNotFoundError(f"no run matches {run_ref!r}; `ftcluster list` shows the runs under {roots[0]}")
    if len(matches) > 1:
        names = ", ".join(m.name for m in matches[:5])
        raise RunNotFoundError(f"{run_ref!r} matches several runs ({names}); give more of the id")
    return matches[0]


def list_runs(root: Path | None = None) -> list[Path]:
    root = root or runs_root()
    if not root.is_dir():
        return []
    return sorted((d for d in root.iterdir() if (d / "status.json").exists()), key=lambda d: d.name)


OUTPUTS_FILE = "outputs.json"


def outputs_record(spec: Any, cwd: str | None = None) -> dict[str, Any]:
    """Where a run of ``spec`` writes, for readers of its run folder whatever its backend
    (``ftcluster sample``, the progress bar: :func:`ftcluster.api.run_output`): ``{"uri", "storage_options",
    "max_steps", "single"}``. A relative local ``output.uri`` on a backend whose processes start here (from
    ``cwd``, default the current directory) is made absolute, as the runtime will resolve it; ``single`` is
    False for a spec with variants (``uri`` is then their common root)."""
    from ..spec.registry import runs_here
    from ..spec.relpaths import is_relative, local_path

    uri = spec.output.uri
    if is_relative(uri) and runs_here(spec.backend, spec):
        uri = "file://" + os.path.normpath(os.path.join(cwd or os.getcwd(), local_path(uri) or ""))
    return {"uri": uri, "storage_options": dict(spec.output.storage_options or {}),
            "max_steps": spec.training.max_steps, "single": not spec.variants}


def record_outputs(request: Any, spec: Any) -> Any:
    """Have ``request`` (of a job spec) record :func:`outputs_record` in its run folder at schedule time
    (:meth:`Backend.creating_run_folder` writes it as ``outputs.json``, for every backend); returns it."""
    meta = getattr(request, "meta", None)
    if isinstance(meta, dict) and hasattr(spec, "output"):
        meta.setdefault("outputs", outputs_record(spec, getattr(request, "cwd", None)))
    return request


def read_outputs(run_dir: Path) -> dict[str, Any] | None:
    """The run folder's :func:`outputs_record`, or None (a folder written before it was recorded, a pipeline)."""
    try:
        data = json.loads((Path(run_dir) / OUTPUTS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def tail_file(path: Path, follow: bool, is_done, poll: float = 0.5) -> Iterator[str]:
    """Yield lines of ``path``; with ``follow``, keep going until ``is_done()``."""
    pos = 0
    while True:
        if path.exists():
            with path.open("r", encoding="utf-8", errors="replace") as fh:
                fh.seek(pos)
                chunk = fh.read()
                pos = fh.tell()
            if chunk:
                yield from chunk.splitlines(keepends=True)
        if not follow:
            return
        if is_done():
            follow = False  # one more read to flush what was written last
            continue
        time.sleep(poll)


class Backend(abc.ABC):
    """Where runs go: the hooks every backend fills, and the run-folder code they share.

    Every run has a folder (``<root>/<run id>/``, root from :func:`runs_root` unless given)
    holding ``status.json`` (a :class:`RunStatus`); its ``backend`` field names the backend
    that manages the run, so ``ftcluster status|logs|cancel <run>`` find it again. A run is
    referred to by ``run_ref``: its id, a unique prefix of it, or its folder's path.
    """

    #: The name in ``spec.backend`` and in every run's ``status.json``.
    name: str = ""

    def __init__(self, root: Path | None = None):
        self.root = root  # None: run folders under runs_root(spec) (spec.local.runs_dir or $FTCLUSTER_HOME/runs)

    # -- hooks ------------------------------------------------------------------
    @abc.abstractmethod
    def submit_dryrun(self, plan: Any, run_id: str | None = None) -> Any:
        """Build the request :meth:`schedule` would carry out from a compiled plan (:meth:`compile`), with
        no side effects at all (no cluster call, no file written, no second compile: every fact it needs is
        in the plan). It has ``run_id``, ``run_dir`` and ``describe()``: text that shows exactly what
        would run (commands, full file contents). ``run_id`` None: a new one from :func:`new_run_id`."""

    def compile(self, spec: Any) -> Any:
        """The launch plan this backend runs ``spec`` with (:func:`~ftcluster.plan.launch.compile_plan`);
        a backend whose own spec section adds to the environment the plan decides on (local) passes it."""
        from ..plan.launch import compile_plan

        return compile_plan(spec)

    def prepare_dryrun(self, pp: Any, run_id: str | None = None) -> Any:
        """The request that runs ``ftcluster prepare-data`` on this backend's cluster (a
        :class:`~ftcluster.plan.prepare.PreparePlan`: a job array of tasks), like :meth:`submit_dryrun`:
        no side effects. A backend that has no such job refuses."""
        raise BackendError(f"the {self.name} backend runs no prepare-data jobs; run `ftcluster prepare-data` here "
                           "without --submit (it uses this machine's CPUs), or submit it with a slurm or "
                           "kubernetes spec")

    def schedule_prepare(self, request: Any) -> RunStatus:
        """Carry out a request from :meth:`prepare_dryrun` (default: as any request, :meth:`schedule`)."""
        return self.schedule(request)

    @abc.abstractmethod
    def schedule(self, request: Any) -> RunStatus:
        """Carry out a request from :meth:`submit_dryrun`: create the run folder (see
        :meth:`creating_run_folder`), start the run, save and return its first status. On any
        failure nothing is left behind: no run folder, nothing queued."""

    @abc.abstractmethod
    def status(self, run_ref: str) -> RunStatus:
        """The run's status refreshed from the backend (saved back when it changed)."""

    @abc.abstractmethod
    def logs(self, run_ref: str, follow: bool = False) -> Iterator[str]:
        """The run's log lines (with line ends); ``follow`` keeps yielding until the run ends."""

    @abc.abstractmethod
    def cancel(self, run_ref: str) -> RunStatus:
        """Ask the run to stop (it checkpoints first when it can) and return its status; a run
        that has already ended is returned as it is."""

    @abc.abstractmethod
    def preflight(self, spec: Any, remote: bool = False) -> list[Check]:
        """Check that ``spec`` can run on this backend, one :class:`~ftcluster.preflight.checks.Check`
        row per fact (cluster reachable, resources exist, ...); never raise for a failed check,
        return a ``fail`` row with its fix. ``remote`` allows checks that start work on the
        cluster (a one-node probe job). The doctor adds the spec and storage rows itself."""

    # -- shared -----------------------------------------------------------------
    def submit(self, spec: Any) -> RunStatus:
        """Submit ``spec``: ``schedule(submit_dryrun(compile(spec)))`` (the request records where the run
        writes, :func:`record_outputs`)."""
        return self.schedule(record_outputs(self.submit_dryrun(self.compile(spec)), spec))

    def wait(self, run_ref: str, timeout: float | None = None, poll: float = 1.0) -> RunStatus:
        """Block until the run ends and return its final status (or the last one seen at ``timeout``
        seconds). Here: :meth:`status` every ``poll`` seconds; a backend that can be told of changes
        (Kubernetes: a watch) overrides it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        st = self.status(run_ref)
        while not st.terminal and (deadline is None or time.monotonic() < deadline):
            time.sleep(poll)
            st = self.status(run_ref)
        return st

    def list(self) -> list[RunStatus]:
        """The status of every run of this backend under this backend's root."""
        out = []
        for d in list_runs(self.root):
            try:
                if load_status(d).backend == self.name:
                    out.append(self.status(str(d)))
            except BackendError:  # one broken folder must not hide the others
                continue
        return out

    def run_folder(self, run_ref: str) -> Path:
        """The folder of run ``run_ref`` (id, unique prefix or path) under this backend's root."""
        return find_run(run_ref, [self.root] if self.root else None)

    def new_run_dir(self, spec: Any, run_id: str) -> Path:
        """Where a new run of ``spec`` called ``run_id`` gets its folder (nothing is created)."""
        return (self.root or runs_root(spec)) / run_id

    @contextlib.contextmanager
    def creating_run_folder(self, request: Any) -> Iterator[Path]:
        """Create ``request.run_dir`` with ``request.files`` in it (and ``outputs.json`` when the request
        carries :func:`record_outputs`); if the block raises, remove the folder again, so a failed
        submission leaves nothing behind."""
        run_dir = Path(request.run_dir)
        run_dir.mkdir(parents=True, exist_ok=False)
        try:
            for name, text in getattr(request, "files", {}).items():
                write_atomic(run_dir / name, text)
            outputs = (getattr(request, "meta", None) or {}).get("outputs")
            if outputs is not None:
                write_atomic(run_dir / OUTPUTS_FILE, json.dumps(outputs, indent=1, sort_keys=True))
            yield run_dir
        except BaseException:
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
            raise
