"""Local paths of a spec: resolved against the spec file, and checked before launch.

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

Only specs whose paths name this machine's files are rewritten and checked by ``validate``: a
Slurm spec submitted through ``slurm.login`` names paths on the cluster, a Kubernetes one paths in
the container (:func:`runs_here`). Remote URIs are the doctor's: it reads them with this shell's
credentials.
"""

from __future__ import annotations

import glob
import os
import threading
from pathlib import Path
from typing import Any

from .errors import Problem

# (field path, what) of every input the runtime reads.
INPUTS = ((("data", "train"), "training data"), (("data", "eval"), "evaluation data"),
          (("data", "general_eval"), "general evaluation data"), (("model", "path"), "model folder"),
          (("tokenizer", "path"), "tokenizer folder"))


# Every field holding a path on the machine the job runs on, rewritten by rebase_data. local.python
# only when it is a path (has a '/'), not a command looked up on PATH. Not deepspeed.config_file:
# it is read at render time, relative to the spec file (ftcluster.plan).
LOCAL_FIELDS: tuple[tuple[str, ...], ...] = (
    *(path for path, _ in INPUTS), ("output", "uri"), ("deepspeed", "nvme_path"), ("local", "runs_dir"),
    ("local", "python"))


def _value(spec: Any, path: tuple[str, ...]) -> Any:
    obj = spec
    for part in path:
        obj = getattr(obj, part, None)
    return obj


def local_path(uri: str) -> str | None:
    """The filesystem path of a local URI (plain path or file://), or None for a remote one."""
    if uri.startswith("file://"):
        return uri[len("file://"):]
    return None if "://" in uri else uri


def runs_here(backend: Any, login: Any) -> bool:
    """Do local paths of a spec with this backend (and ``slurm.login``) name this machine's files?"""
    if backend == "kubernetes":
        return False
    return not (backend == "slurm" and login)


def checks_here(spec: Any) -> bool:
    """Do the spec's local paths name this machine's files?"""
    return runs_here(spec.backend, spec.slurm.login)


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


def _get(data: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        data = data.get(part) if isinstance(data, dict) else None
    return data


def rebase_data(data: Any, folder_of: Any) -> dict[str, str]:
    """Rewrite in ``data`` (a spec as plain data) every relative path of :data:`LOCAL_FIELDS` that
    ``folder_of(field path)`` says was written relative to a folder (None: relative to the cwd
    already), when the spec's paths are on this machine. Returns {dotted field: that folder}."""
    if not isinstance(data, dict) or not runs_here(data.get("backend", "local"), _get(data, ("slurm", "login"))):
        return {}
    done = {}
    for path in LOCAL_FIELDS:
        value = _get(data, path)
        if not isinstance(value, str) or (path == ("local", "python") and "/" not in value):
            continue
        folder = folder_of(path)
        if folder and is_relative(value):
            _get(data, path[:-1])[path[-1]] = rebase(value, folder)
            done[".".join(path)] = folder
    return done


def rebase_doc(doc: Any, folder_of: Any = None) -> dict[str, str]:
    """:func:`rebase_data` on a loaded spec file; by default every field not set with ``--set`` is
    relative to the file's folder."""
    folder = spec_folder(doc.source)
    if folder_of is None:
        if folder is None:
            return {}

        def folder_of(path: tuple[str, ...]) -> str | None:
            return None if doc.is_overridden(path) else folder

    return rebase_data(doc.data, folder_of)


def input_problem(path: str, shown: str | None = None) -> str | None:
    """Why the local input ``path`` cannot be read (named ``shown``, default ``path``), or None."""
    full = os.path.abspath(path)
    shown = shown or path
    if glob.has_magic(path):
        return None if glob.glob(full) else f"{shown}: no file matches this pattern"
    if not os.path.exists(full):
        return f"{shown}: no such file or folder"
    if not os.access(full, os.R_OK):
        return f"{shown}: not readable by this user"
    return None


def _output_problem(path: str, shown: str) -> str | None:
    full = Path(os.path.abspath(path))
    if full.exists():
        if not full.is_dir():
            return f"{shown}: exists and is not a folder"
        return None if os.access(full, os.W_OK | os.X_OK) else f"{shown}: the folder is not writable by this user"
    parent = full.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return f"{shown}: cannot be created ({parent} is not a writable folder)"
    return None


def resolved_note(spec: Any, field: str, local: str) -> str:
    """Where a relative path was resolved, with the result: " (resolved against the spec file's folder:
    /abs/path)"; "" for an absolute path."""
    full = os.path.abspath(local)
    if field in getattr(spec, "_path_folders", {}):  # rewritten: relative to the cwd now, or absolute
        return f" (resolved against the spec file's folder: {full})"
    if os.path.isabs(local) or local.startswith("~"):
        return ""
    return f" (a path given with --set is resolved against the current directory: {full})"


def local_problems(spec: Any, doc: Any) -> list[Problem]:
    """Missing local inputs and an output folder that cannot be created, at their file:line:col.

    ``doc`` is the spec file as written (with the ``--set`` overrides): problems quote its values."""
    if not checks_here(spec):
        return []
    found: list[tuple[tuple[str, ...], str]] = []
    for path, what in (*INPUTS, (("output", "uri"), "")):
        uri = _value(spec, path)
        local = local_path(uri) if isinstance(uri, str) else None
        if not local:
            continue
        written = _get(doc.data, path)
        shown = (local_path(written) if isinstance(written, str) else None) or local
        if path == ("output", "uri"):
            why = _output_problem(local, shown)
            fix = "pick a folder you may write to"
        else:
            why = input_problem(local, shown)
            fix = f"check the path of the {what}"
        if why:
            found.append((path, f"{why}; {fix}{resolved_note(spec, '.'.join(path), local)}"))
    from .problems import problem_at

    return [problem_at(doc, path, msg) for path, msg in found]


def remote_inputs(spec: Any) -> list[tuple[str, str, dict[str, Any]]]:
    """(field, uri, storage_options) of every input on a remote filesystem."""
    out = []
    for path, _ in INPUTS:
        uri = _value(spec, path)
        if isinstance(uri, str) and local_path(uri) is None:
            opts = spec.data.storage_options if path[0] == "data" else spec.model.storage_options
            out.append((".".join(path), uri, opts))
    return out


def probe_input(uri: str, storage_options: dict[str, Any], timeout: float = 60.0) -> tuple[str, str, str]:
    """(status, result, fix) of reading ``uri`` with this shell's credentials: exists, and one file is readable."""
    result: dict[str, Any] = {}

    def probe() -> None:
        try:
            from .storage.uri import fs_and_path

            fs, path = fs_and_path(uri, storage_options)
            files = fs.glob(path) if glob.has_magic(path) else [path]
            if not files:
                raise FileNotFoundError(f"{uri}: no file matches this pattern")
            first = files[0]
            # info, not exists(): its error says why (a missing bucket, no credentials), exists() only False.
            if fs.info(first).get("type") == "directory":
                inside = [p for p in fs.find(first)][:1]
                if not inside:
                    raise FileNotFoundError(f"{uri}: the folder is empty")
                first = inside[0]
            with fs.open(first, "rb") as f:
                f.read(1)
            result["ok"] = first
        except BaseException as exc:  # reported as the check's result
            result["error"] = exc

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        return "fail", f"{uri}: no answer within {timeout:.0f}s", "check the endpoint (storage_options.client_kwargs.endpoint_url) and the network"
    err = result.get("error")
    if err is None:
        return "ok", f"{uri}: exists, read {result['ok'].rsplit('/', 1)[-1]}", ""
    from .storage.retry import classify

    perm = classify(err, uri)
    msg = " ".join(str(err).split())[:200] or type(err).__name__
    if perm is None:
        return "fail", f"{uri}: cannot read ({type(err).__name__}: {msg})", "check the endpoint, bucket and credentials"
    return "fail", f"{uri}: {perm.problem} ({type(err).__name__}: {msg})", perm.fix
