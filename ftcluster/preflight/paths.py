"""Preflight of a spec's local paths (``ftcluster validate``) and remote data URIs (``ftcluster doctor``).

A relative local path in a spec file is relative to that file's folder; the loader has rewritten
it against the current directory already (:mod:`ftcluster.spec.relpaths`), so it is checked as the
runtime, started in the submission directory, will open it. Only paths on this machine are checked
by ``validate``: a Slurm spec submitted through ``slurm.login`` names paths on the cluster, a
Kubernetes one paths in the container. Remote URIs (s3://, gs://, ...) are the doctor's: it reads
them with this shell's credentials.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

from ..errors import Problem
from ..spec.relpaths import INPUTS, field_value, local_path, runs_here
from .checks import within


def _value(spec: Any, path: tuple[str, ...]) -> Any:
    obj = spec
    for part in path:
        obj = getattr(obj, part, None)
    return obj


def checks_here(spec: Any) -> bool:
    """Do the spec's local paths name this machine's files?"""
    return runs_here(spec.backend, spec)


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
        written = field_value(doc.data, path)
        shown = (local_path(written) if isinstance(written, str) else None) or local
        if path == ("output", "uri"):
            why = _output_problem(local, shown)
            fix = "pick a folder you may write to"
        else:
            why = input_problem(local, shown)
            fix = f"check the path of the {what}"
            if path == ("data", "train") and (spec.data.prepare is not None or spec.data.streaming) \
                    and spec._corpus_from is None:  # a pipeline stage prepares it first
                why, fix = _corpus_problem(local, shown, spec)
        if why:
            found.append((path, f"{why}; {fix}{resolved_note(spec, '.'.join(path), local)}"))
    from ..spec.problems import problem_at

    return [problem_at(doc, path, msg) for path, msg in found]


def _corpus_problem(local: str, shown: str, spec: Any) -> tuple[str | None, str]:
    """A streamed data.train must be a finished prepared corpus (its manifest.json is written last)."""
    from ..corpus.format import MANIFEST

    if os.path.isfile(os.path.join(local, MANIFEST)):
        return None, ""
    how = ("run `ftcluster prepare-data` on this spec first (it tokenizes data.prepare.source into it; a "
           "stopped one resumes)" if spec.data.prepare is not None else
           "point it at a folder `ftcluster prepare-data` wrote, or drop data.streaming")
    return f"{shown} is not a prepared corpus yet (no {MANIFEST})", how


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
    def probe() -> str:
        from ..storage.uri import fs_and_path

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
        return first

    try:
        first, err = within(probe, timeout)
    except TimeoutError:
        return "fail", f"{uri}: no answer within {timeout:.0f}s", "check the endpoint (storage_options.client_kwargs.endpoint_url) and the network"
    if err is None:
        return "ok", f"{uri}: exists, read {first.rsplit('/', 1)[-1]}", ""
    from ..storage.retry import classify

    perm = classify(err, uri)
    msg = " ".join(str(err).split())[:200] or type(err).__name__
    if perm is None:
        return "fail", f"{uri}: cannot read ({type(err).__name__}: {msg})", "check the endpoint, bucket and credentials"
    return "fail", f"{uri}: {perm.problem} ({type(err).__name__}: {msg})", perm.fix


CREDENTIALS_TIMEOUT_S = 5.0  # the resolver's one network step (EC2's metadata service) takes about 1 s when absent


def credential_problem(uri: str, storage_options: dict[str, Any], env: dict[str, str] | None = None,
                       timeout: float = CREDENTIALS_TIMEOUT_S) -> tuple[str, str] | None:
    """(problem, fix) when this shell holds no credentials for the object store at ``uri``, as the doctor's
    storage row classifies it (:func:`ftcluster.storage.retry.classify`); None when they resolve, when none are
    needed or looked up here, or when the answer is unknown. Offline: only s3:// is checked, with botocore's own
    credential chain (environment, profiles, SSO, web identity, an instance role) and without reading or writing
    the bucket; deferred credentials are never fetched. ``env``: the variables the job's environment adds to
    this shell's: if it sets an ``AWS_*`` one, the job's credentials are not this shell's and nothing is said.
    Never raises: a missing botocore, an unknown error or no answer within ``timeout`` seconds is None."""
    if not uri.startswith(("s3://", "s3a://")) or any(k.startswith("AWS_") for k in env or {}):
        return None
    opts = storage_options or {}
    if opts.get("anon") or opts.get("key") or opts.get("secret") or opts.get("token"):
        return None

    def resolve() -> None:
        import botocore.session
        from botocore.exceptions import NoCredentialsError

        if botocore.session.Session(profile=opts.get("profile")).get_credentials() is None:
            raise NoCredentialsError()

    try:
        _, err = within(resolve, timeout)
    except TimeoutError:
        return None
    if err is None or not isinstance(err, Exception):
        return None
    from ..storage.retry import classify

    perm = classify(err, uri)
    if perm is None or perm.problem != "no valid credentials":
        return None
    msg = " ".join(str(err).split())[:200] or type(err).__name__
    return f"{perm.problem} in this shell ({type(err).__name__}: {msg})", perm.fix


def credential_problems(spec: Any, doc: Any, env: dict[str, str] | None = None) -> list[Problem]:
    """The output and remote inputs of ``spec`` that this shell has no credentials for
    (:func:`credential_problem`), at their file:line:col in ``doc``."""
    from ..spec.problems import problem_at

    fields = [(("output", "uri"), spec.output.uri, spec.output.storage_options)]
    fields += [(tuple(field.split(".")), uri, opts) for field, uri, opts in remote_inputs(spec)]
    out, seen = [], {}
    for path, uri, opts in fields:
        if not isinstance(uri, str):
            continue
        key = (uri.split("://", 1)[0], repr(sorted((opts or {}).items())))
        if key not in seen:  # one lookup per store and options: the answer is the same
            seen[key] = credential_problem(uri, opts, env)
        found = seen[key]
        if found:
            out.append(problem_at(doc, path, f"{uri}: {found[0]}; {found[1]}"))
    return out
