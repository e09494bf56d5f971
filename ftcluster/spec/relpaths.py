"""Relative local paths of a spec file: relative to its folder, rewritten at load time for the runtime.

A relative local path in a spec file is relative to that file's folder (like
``deepspeed.config_file``, a pipeline's stage files, kustomize and docker compose). The runtime's
processes start in the directory the job is submitted from (the local backend's cwd; sbatch's
default working directory), so at load time :func:`rebase_doc` rewrites each such path to the
same file relative to the current directory: ``examples/quickstart.yaml`` saying
``data/instruct.jsonl`` becomes ``examples/data/instruct.jsonl`` when loaded from the repository
root. The rewritten spec is what is rendered and shipped, so the same spec rendered from the same
directory gives the same bytes. Values given with ``--set`` are relative to the current directory
already (a shell user's expectation), and so are specs loaded from text or a dict; absolute paths,
``~`` and remote URIs (s3://, gs://, ...) are left alone.

Only specs whose paths name this machine's files are rewritten: a Slurm spec submitted through
``slurm.login`` names paths on the cluster, a Kubernetes one paths in the container
(:func:`runs_here`). The loader (``validate_doc``), variants and pipeline stages call this module;
``ftcluster.preflight.paths`` checks the result.
"""

from __future__ import annotations

import os
from typing import Any

from ..storage.uri import is_local
from . import registry

# (field path, what) of every input the runtime reads.
INPUTS = ((("data", "train"), "training data"), (("data", "eval"), "evaluation data"),
          (("data", "general_eval"), "general evaluation data"), (("model", "path"), "model folder"),
          (("tokenizer", "path"), "tokenizer folder"))
# Every field holding a path on the machine the job runs on, rewritten by rebase_data. local.python
# only when it is a path (has a '/'), not a command looked up on PATH. Not deepspeed.config_file:
# it is read at render time, relative to the spec file (ftcluster.plan.launch).
LOCAL_FIELDS: tuple[tuple[str, ...], ...] = (
    *(path for path, _ in INPUTS), ("output", "uri"), ("deepspeed", "nvme_path"), ("local", "runs_dir"),
    ("local", "python"), ("data", "prepare", "source"), ("tokenizer", "add_tokens"))


def local_path(uri: str) -> str | None:
    """The filesystem path of a local URI (plain path or file://), or None for a remote one."""
    return uri.removeprefix("file://") if is_local(uri) else None


def runs_here(backend: Any, spec: Any) -> bool:
    """Do local paths of ``spec`` (an object or plain data) with this backend name this machine's files?
    The backend's registry entry says (:func:`ftcluster.spec.registry.runs_here`)."""
    return registry.runs_here(backend, spec)


def spec_folder(source: str) -> str | None:
    """The folder of the spec file ``source``; None for a spec from text or a dict (``<string>``)."""
    return None if not source or source.startswith("<") else os.path.dirname(os.path.abspath(source))


def is_relative(value: str) -> bool:
    """Is ``value`` a relative local path (plain or ``file://``)? Not ``~/x``: that is the home folder."""
    rest = local_path(value)
    return bool(rest) and not rest.startswith("~") and not os.path.isabs(rest)


def rebase(value: str, folder: str, cwd: str | None = None) -> str:
    """``value``, a path written relative to ``folder``, as the same file relative to ``cwd`` (default
    the current directory). Keeps a ``file://`` prefix, glob patterns and a trailing '/'; absolute
    paths, ``~`` and remote URIs come back unchanged, and so does everything when ``folder`` is ``cwd``."""
    if not is_relative(value):
        return value
    prefix = "file://" if value.startswith("file://") else ""
    rest = value[len(prefix):]
    cwd = os.path.abspath(cwd or os.getcwd())
    folder = os.path.abspath(folder)
    if folder == cwd:
        return value
    full = os.path.normpath(os.path.join(folder, rest))
    # Sharing only / with the cwd, ../../x would climb to the root: the absolute path reads better.
    out = full if os.path.commonpath([full, cwd]) == os.sep else os.path.relpath(full, cwd)
    if rest.endswith("/") and not out.endswith("/"):
        out += "/"
    if prefix and not out.startswith((".", os.sep)):
        out = "./" + out  # file://data/x would read as host "data"
    return prefix + out


def field_value(data: Any, path: tuple[str, ...]) -> Any:
    """The value at ``path`` in a spec as plain data, or None."""
    for part in path:
        data = data.get(part) if isinstance(data, dict) else None
    return data


def rebase_data(data: Any, folder_of: Any) -> dict[str, str]:
    """Rewrite in ``data`` (a spec as plain data) every relative path of :data:`LOCAL_FIELDS` that
    ``folder_of(field path)`` says was written relative to a folder (None: relative to the cwd
    already), when the spec's paths are on this machine. Returns {dotted field: that folder}."""
    if not isinstance(data, dict) or not runs_here(data.get("backend", "local"), data):
        return {}
    done = {}
    for path in LOCAL_FIELDS:
        value = field_value(data, path)
        if not isinstance(value, str) or (path == ("local", "python") and "/" not in value):
            continue
        folder = folder_of(path)
        if folder and is_relative(value):
            field_value(data, path[:-1])[path[-1]] = rebase(value, folder)
            done[".".join(path)] = folder
    return done


def rebase_doc(doc: Any, folder_of: Any = None) -> dict[str, str]:
    """:func:`rebase_data` on a loaded spec file; by default every field not set with ``--set`` is
    relative to the file's folder."""
    folder = spec_folder(doc.source)

    def of_file(path: tuple[str, ...]) -> str | None:
        return None if doc.is_overridden(path) else folder

    return rebase_data(doc.data, folder_of or of_file)
