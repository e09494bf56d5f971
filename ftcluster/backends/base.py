"""The backend contract shared by local, Slurm and (later) Kubernetes.

Following torchx: ``submit(spec) == schedule(submit_dryrun(spec))``. The dry run builds
a :class:`SubmitRequest` whose ``describe()`` is exactly what would be run (command and
file contents); ``schedule`` is the only step with side effects.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BackendError, RunNotFoundError

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

    def describe(self) -> str:
        """Human-readable: the command, then every file's full contents."""
        import shlex

        lines = [f"# backend: {self.backend}", f"# run id: {self.run_id}", f"# run folder: {self.run_dir}"]
        if self.cwd:
            lines.append(f"# working directory: {self.cwd}")
        for k, v in sorted(self.env.items()):
            lines.append(f"# env {k}={v}")
        lines.append("$ " + shlex.join(self.argv))
        for name, text in self.files.items():
            lines.append(f"\n----- {self.run_dir / name} -----")
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
