"""`ftcluster doctor job.yaml`: check a job against the cluster it targets before submitting.

The report is a table of :class:`~ftcluster.preflight.checks.Check` rows (ok / warn / fail / skip, what
was found, how to fix it): the spec and its launch files, then the backend's own
``preflight(spec)`` rows (the cluster, the machine, the nodes' Python: see
:class:`ftcluster.backends.base.Backend`), then the output storage. This module runs no
process itself. Imports stay light: no torch, no s3fs until the output check needs it.
"""

from __future__ import annotations

import secrets
from typing import Any

from ..errors import FtclusterError
from .checks import Check, failed, within

# --------------------------------------------------------------------------- checks


def check_spec(path: str, overrides: list[str]) -> tuple[Check, Any]:
    """The spec row and the loaded job spec, or pipeline (a file with ``pipeline:``, as ``validate`` reads it)."""
    from ..errors import SpecError
    from ..spec.pipeline import Pipeline, load

    try:
        spec = load(path, overrides)
    except SpecError as err:
        n = len(err.problems)
        return Check("spec", "fail", f"{n} problem(s), first: {err.problems[0]}",
                     f"`ftcluster validate {path}` lists every problem with its fix"), None
    except FtclusterError as err:
        return failed("spec", err), None
    if isinstance(spec, Pipeline):
        stages = ", ".join(s.name for s in spec.stages)
        return Check("spec", "ok", f"pipeline {spec.name}: {len(spec.stages)} stage(s) ({stages}), "
                                   f"backend {spec.backend}"), spec
    return _spec_row(spec), spec


def _spec_row(spec: Any) -> Check:
    return Check("spec", "ok", f"{spec.name} ({spec.method}), world size {spec.world_size}, backend {spec.backend}")


def check_render(spec: Any) -> Check:
    """The launch files build: what `submit --dry-run` shows (`render` for Kubernetes)."""
    from ..backends import entry, get_backend
    from ..render import default_target, render

    try:
        if entry(spec.backend).launch_files == "render":
            files = render(spec, default_target(spec))
        else:
            backend = get_backend(spec.backend)
            files = backend.submit_dryrun(backend.compile(spec)).files
    except FtclusterError as err:
        return failed("launch files", err)
    return Check("launch files", "ok", ", ".join(files))


def check_output(spec: Any, timeout: float = 60.0) -> Check:
    """Write, read back and delete a small probe object at output.uri with this shell's credentials."""
    uri = spec.output.uri.rstrip("/")
    name = f".ftcluster-doctor-{secrets.token_hex(4)}"

    def probe() -> bool:
        from ..storage.uri import fs_and_path, is_local_fs

        fs, path = fs_and_path(uri, spec.output.storage_options)
        created = []
        if is_local_fs(fs):  # object stores need no folders (and makedirs would create a bucket)
            parent = path
            while not fs.exists(parent):
                created.append(parent)
                parent = parent.rsplit("/", 1)[0]
            fs.makedirs(path, exist_ok=True)
        target = f"{path}/{name}"
        fs.pipe_file(target, b"ftcluster doctor probe\n")
        ok = fs.cat_file(target) == b"ftcluster doctor probe\n"
        fs.rm_file(target)
        for folder in created:  # leave the filesystem as it was
            fs.rmdir(folder)
        return ok

    try:
        ok, err = within(probe, timeout)
    except TimeoutError:
        return Check("output", "fail", f"{uri}: no answer within {timeout:.0f}s",
                     "check the endpoint (output.storage_options.client_kwargs.endpoint_url) and the network")
    if err is not None and (isinstance(err, ImportError) or isinstance(err.__cause__, ImportError)):
        return Check("output", "fail", f"{uri}: {err.__cause__ or err}",
                     "pip install 'ftcluster[train]' (it brings s3fs/gcsfs)")
    if err is not None:
        from ..storage.retry import classify

        msg = " ".join(str(err).split()) or type(err).__name__
        permanent = classify(err, uri)  # the storage layer's verdict: what is wrong and how to fix it
        problem = f"{permanent.problem}: " if permanent else ""
        return Check("output", "fail", f"{uri}: cannot write a probe object ({problem}{type(err).__name__}: "
                     f"{msg[:200]})", permanent.fix if permanent else _storage_fix(uri))
    if not ok:
        return Check("output", "fail", f"{uri}: the probe object read back different bytes", "check the storage")
    return Check("output", "ok", f"{uri}: wrote, read and deleted {name}")


def _storage_fix(uri: str) -> str:
    if uri.startswith(("s3://", "s3a://")):
        return ("check the bucket exists and this shell's credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE or an instance role) may write there; endpoint: output.storage_options.client_kwargs")
    if uri.startswith(("gs://", "gcs://")):
        return "check the bucket exists and GOOGLE_APPLICATION_CREDENTIALS (or workload identity) may write there"
    return "check the folder's parent exists and you may write there, or change output.uri"


def check_inputs(spec: Any) -> list[Check]:
    """Every input the runtime reads (data, model.path, tokenizer.path): remote ones read with this shell's
    credentials (exists, one file readable; the storage layer's classifier gives the fix), local ones as
    `validate` checks them."""
    from .paths import (
        INPUTS,
        checks_here,
        input_problem,
        local_path,
        probe_input,
        remote_inputs,
        resolved_note,
    )

    out = []
    for field, uri, opts in remote_inputs(spec):
        status, result, fix = probe_input(uri, opts)
        out.append(Check(field, status, result, fix))
    for path, _ in INPUTS:
        obj: Any = spec
        for part in path:
            obj = getattr(obj, part, None)
        local = local_path(obj) if isinstance(obj, str) else None
        if local is None:
            continue
        field = ".".join(path)
        if not checks_here(spec):
            out.append(Check(field, "skip", f"{local}: a path where the job runs, not here",
                             "check it on the cluster (or the image)"))
            continue
        why = input_problem(local)
        out.append(Check(field, "fail", why + resolved_note(spec, field, local), "fix the path (relative: to the spec file's folder)")
                   if why else Check(field, "ok", f"{local}: exists"))
    return out


def check_backend(spec: Any, remote: bool = False, backend: Any = None, context: str | None = None) -> list[Check]:
    """The backend's own pre-flight rows (``backend``: an instance to use instead of the spec's;
    ``context``: the kubeconfig context for the kubernetes backend)."""
    from ..backends import preflight

    try:
        return preflight(spec, remote, backend, context=context)
    except FtclusterError as err:  # a check that could not even run is a failed row, not a crash
        return [failed("cluster", err)]


def check_plan(spec: Any) -> list[Check]:
    """The planner's verdict (offline): per-GPU memory against the GPU, and its recommendation (warn
    when the spec's layout costs more than twice as much; the fix is the recommendation's ``--set`` flags)."""
    from ..plan.planner import doctor_checks

    return [Check(name, status, detail, fix) for name, status, detail, fix in doctor_checks(spec)]


def diagnose(path: str, overrides: list[str] | None = None, *, remote: bool = False,
             backend: Any = None, context: str | None = None) -> list[Check]:
    """Every check for the job at ``path``; a failed spec check stops the rest. A pipeline: every check
    for each stage's job spec, each row's name prefixed with the stage's (``cpt: output``)."""
    from ..spec.pipeline import Pipeline

    first, spec = check_spec(path, list(overrides or []))
    if spec is None:
        return [first]
    if isinstance(spec, Pipeline):
        out = [first]
        for stage in spec.stages:
            rows = [_spec_row(stage.spec), *_job_checks(stage.spec, remote, backend, context)]
            if stage.model_from:  # the model an earlier stage publishes is not there before the pipeline runs
                rows = [Check(c.name, "skip", f"{stage.spec.model.path}: published by stage {stage.model_from}")
                        if c.name == "model.path" else c for c in rows]
            out += [Check(f"{stage.name}: {c.name}", c.status, c.result, c.fix) for c in rows]
        return out
    return [first, *_job_checks(spec, remote, backend, context)]


def _job_checks(spec: Any, remote: bool, backend: Any, context: str | None) -> list[Check]:
    """Every check after the spec row, for one job spec."""
    out = [check_render(spec), *check_plan(spec)]
    out += check_backend(spec, remote, backend, context)
    out += check_inputs(spec)
    out.append(check_output(spec))
    return out
