"""Python API with the CLI's verbs, and every rule the CLI applies: the one door to ftcluster.

Loading (:func:`load`, :func:`with_backend`), checking (:func:`validate`, :func:`check_plan`,
:func:`check_paths`, :func:`check_submit`, :func:`doctor`), rendering for GitOps (:func:`kustomized`), submitting
(:func:`submit` = :func:`schedule` of :func:`submit_dryrun`, :func:`check_submit_options`,
:func:`fresh_uri`, :func:`finished_note`), and the runs (:func:`status`, :func:`wait`, :func:`logs`,
:func:`cancel`, :func:`list_runs`, :func:`run_ids`, :func:`list_cluster`, :func:`run_output`, :func:`sample_source`).
``ftcluster.cli`` parses arguments, calls these and prints; it holds no rule of its own.

``backend=NAME`` (``--backend NAME``) means exactly the override ``backend=NAME`` (``--set backend=NAME``):
the spec is loaded again with it, so it is validated for that backend and rendered for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .backends import entry, get_backend
from .backends.base import (
    EXIT_CODES,
    Backend,
    RunStatus,
    SubmitRequest,
    find_run,
    load_status,
    read_outputs,
    record_outputs,
    runs_root,
)
from .backends.base import list_runs as _run_folders
from .errors import BackendError, FtclusterError, Problem, RunNotFoundError, SpecError, UsageError
from .spec.loader import load_spec

__all__ = ["EXIT_CODES", "load_spec", "load", "backend_overrides", "with_backend", "validate", "summary", "check_plan", "check_paths",
           "check_submit", "render", "kustomized", "backend_for", "check_submit_options", "fresh_uri", "check_lease", "finished_note",
           "submit", "submit_dryrun", "schedule", "check_server", "server_dry_run", "status", "wait", "list_cluster",
           "cluster_backends", "logs", "cancel", "list_runs", "run_ids", "doctor", "run_output", "sample_source",
           "sample_command", "artifact_source", "merge_command", "write_files", "prepare_load", "prepare_command", "prepare_summary", "prepare_dryrun",
           "prepare_schedule",
           "plan", "schema"]


# --------------------------------------------------------------------------- loading


def backend_overrides(overrides: Any, backend: str | None) -> list[str]:
    """``overrides`` with ``backend=NAME`` last when ``backend`` is given: ``--backend X`` is exactly
    ``--set backend=X``, for every verb that takes it."""
    return [*(overrides or ()), *([f"backend={backend}"] if backend else [])]


def load(path: str | Path, overrides: list[str] | None = None, backend: str | None = None):
    """A job spec or a pipeline file (a file with ``pipeline:``), with ``overrides`` (``key.path=value``; a
    pipeline applies them to every stage); ``backend`` is the same as the override ``backend=NAME``."""
    from .spec.pipeline import load as load_any

    return load_any(path, backend_overrides(overrides, backend))


def with_backend(spec: Any, backend: str | None) -> Any:
    """``spec`` (a job spec or pipeline object) as if loaded with the override ``backend=NAME``: validated
    for that backend (a kubernetes job needs kubernetes.image, ...) and rendered for it. The same object
    when ``backend`` is None or already the spec's."""
    from .spec.pipeline import Pipeline

    if backend is None or backend == spec.backend:
        return spec
    if isinstance(spec, Pipeline):
        return load(spec.source, list(spec.overrides), backend)
    source = getattr(spec, "_source_file", None)
    if source and not source.startswith("<") and Path(source).is_file():
        return load_spec(source, backend_overrides(getattr(spec, "_overrides", ()), backend))
    from .spec.loader import spec_from_dict

    return spec_from_dict({**spec.model_dump(mode="json", exclude_unset=True), "backend": backend})


def _spec(spec_or_path: Any, overrides: list[str] | None = None, backend: str | None = None):
    if isinstance(spec_or_path, (str, Path)):
        return load(spec_or_path, overrides, backend)
    return with_backend(spec_or_path, backend)


# --------------------------------------------------------------------------- checking


def check_plan(spec: Any) -> list[Problem]:
    """Raise SpecError if the job (or any stage of a pipeline) will not fit in its GPUs' memory
    (:mod:`ftcluster.plan.planner`); what ``validate``/``submit`` check unless ``--no-plan-check``.
    Returns the warnings: why the check could not run (a GPU type the planner does not know and no
    ``resources.gpu_memory_gb``), one located :class:`~ftcluster.errors.Problem` each, which the CLI
    prints as ``warning: <file:line:col: field: message>``."""
    from .plan.planner.guard import check

    problems, warnings = check(spec)
    if problems:
        raise SpecError(problems)
    return warnings


def check_paths(path: str | Path, overrides: list[str] | None = None, spec: Any = None) -> None:
    """Raise SpecError, located in the spec file, if a local input of the job at ``path`` is missing or its
    output folder cannot be created (:func:`ftcluster.preflight.paths.local_problems`); a job whose paths
    are not on this machine (kubernetes, Slurm through ssh) passes. ``spec``: the loaded spec, if at hand."""
    from .preflight.paths import local_problems

    spec = spec if spec is not None else load_spec(path, overrides)
    problems = local_problems(spec, _located_doc(path, overrides))
    if problems:
        raise SpecError(problems)


def _located_doc(path: str | Path, overrides: Any) -> Any:
    """The spec file as loaded with positions, ``overrides`` applied: what problems are located in."""
    from .spec.yamlio import apply_overrides, load_file

    doc = load_file(path)
    if overrides:
        apply_overrides(doc, list(overrides))
    return doc


def validate(path: str | Path, overrides: list[str] | None = None, plan_check: bool = True, backend: str | None = None,
             warn: Callable[[Problem], None] | None = None):
    """What ``ftcluster validate`` checks: load the job spec or pipeline at ``path`` (SpecError with every
    problem located), then the planner's memory check (unless ``plan_check`` is False), then a job's local
    paths, then each ``deepspeed.config_file`` against the spec (:mod:`ftcluster.plan.dsfile`). Returns the spec (or :class:`~ftcluster.spec.pipeline.Pipeline`). The memory check's warnings
    (:func:`check_plan`) go to ``warn``; without one, to :func:`warnings.warn`."""
    from .spec.pipeline import Pipeline

    overrides = backend_overrides(overrides, backend)
    spec = load(path, overrides)
    if plan_check:
        for w in check_plan(spec):
            if warn is not None:
                warn(w)
            else:
                import warnings

                warnings.warn(str(w), stacklevel=2)
    if not isinstance(spec, Pipeline):
        check_paths(path, overrides, spec)
    from .plan.deepspeed import config_file_problems

    problems = config_file_problems(spec)
    if problems:
        raise SpecError(problems)
    return spec


def check_submit(spec: Any, *, plan_check: bool = True, credentials: bool = True) -> list[Problem]:
    """What ``ftcluster submit`` checks before it submits (and writes) anything, raising SpecError with the
    lines ``validate`` prints: the planner's memory check (unless ``plan_check`` is False) and a job's local
    paths (:func:`check_paths`, with the overrides ``spec`` was loaded with); then, when ``credentials`` and
    the job runs with this shell's environment (the local backend), that this shell holds credentials for
    its object-store URIs, as the doctor's storage row classifies them (offline: nothing is read or written;
    :func:`ftcluster.preflight.paths.credential_problem`). :func:`submit` itself checks nothing. Returns the
    memory check's warnings (:func:`check_plan`)."""
    from .spec.pipeline import Pipeline

    warnings = check_plan(spec) if plan_check else []
    source = getattr(spec, "_source_file", None)
    if isinstance(spec, Pipeline) or not source or source.startswith("<") or not Path(source).is_file():
        return warnings
    from .preflight.paths import credential_problems, local_problems

    doc = _located_doc(source, getattr(spec, "_overrides", ()))  # read once for both checks
    problems = local_problems(spec, doc)  # what check_paths refuses, first
    if not problems and credentials and entry(spec.backend).shell_credentials:
        problems = credential_problems(spec, doc, {**spec.env, **dict(getattr(spec.local, "env", None) or {})})
    if problems:
        raise SpecError(problems)
    return warnings


def summary(spec: Any) -> str:
    """The one-line summary ``ftcluster validate`` prints after ``<file>: ok: ``."""
    from .plan.launch import compile_plan
    from .spec.pipeline import Pipeline, describe

    if isinstance(spec, Pipeline):
        return describe(spec)
    plan = compile_plan(spec)
    r = spec.resources
    array = ""
    if plan.variants:
        limit = f", at most {plan.array_parallelism} at once" if plan.array_parallelism else ""
        array = f", {len(plan.variants)} variants ({', '.join(plan.variants)}){limit}"
    return (f"{spec.name} ({spec.method}), {r.nodes} node(s) x {r.nproc_per_node} process(es) = "
            f"world size {plan.world_size}, backend {spec.backend}, output {spec.output.uri}{array}")


def doctor(path: str, overrides: list[str] | None = None, remote: bool = False,
           context: str | None = None, backend: str | None = None) -> list[Any]:
    """Every pre-flight check of the job at ``path`` (:class:`~ftcluster.preflight.checks.Check` rows): spec, launch
    files, the planner, the backend's ``preflight``, inputs, output storage (a pipeline: each stage's, named
    ``stage: check``); ``remote`` also probes a compute node; ``context`` is the kubeconfig context for a
    kubernetes job; ``backend`` is the same as the override ``backend=NAME``."""
    from .preflight.doctor import diagnose

    return diagnose(path, backend_overrides(overrides, backend), remote=remote,
                    context=context)


# --------------------------------------------------------------------------- rendering


def render(spec: Any, target: str | None = None, kustomize: bool = False) -> dict[str, str]:
    """``ftcluster render``: the launch files of a job spec or pipeline (object or YAML path) for ``target``
    (default: the spec's backend's), ``{filename: text}``; ``kustomize`` adds :func:`kustomized`'s file."""
    from .render import render as render_job
    from .render.pipeline import render_pipeline
    from .spec.pipeline import Pipeline

    spec = _spec(spec)
    files = render_pipeline(spec, target) if isinstance(spec, Pipeline) else render_job(spec, target)
    return kustomized(spec, target, files) if kustomize else files


def kustomized(spec: Any, target: str | None, files: dict[str, str]) -> dict[str, str]:
    """``files`` (rendered for a Kubernetes ``target``) plus a ``kustomization.yaml`` listing the jobs, a folder
    to commit as it is for Argo CD / Flux (``render --kustomize``); UsageError for a pipeline or Slurm."""
    from .render import command_for, default_target, header_lines
    from .render.kube import with_kustomization
    from .spec.pipeline import Pipeline

    if isinstance(spec, Pipeline) or (target or default_target(spec)) == "slurm":
        raise UsageError("--kustomize applies to one job spec rendered for --target pytorchjob or trainjob")
    target = target or default_target(spec)
    command = command_for(spec._source_file or "job.yaml", getattr(spec, "_overrides", ()), target) + " --kustomize"
    return with_kustomization(files, header_lines(spec, target, command))


def write_files(out_dir: str | Path, files: dict[str, str]) -> None:
    """Write every file or none (``render -o``, ``schema -o``): each goes to a temp name first, then all are
    renamed; a file named ``stage/x`` (a pipeline's) gets its folder."""
    import os

    d = Path(out_dir)
    tmps: list[tuple[Path, Path]] = []
    try:
        d.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            final = d / name
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
            tmp.write_text(text, encoding="utf-8")
            tmps.append((tmp, final))
        for tmp, final in tmps:
            os.replace(tmp, final)
    except OSError as exc:
        for tmp, _ in tmps:
            tmp.unlink(missing_ok=True)
        raise FtclusterError(f"cannot write to {out_dir}: {exc.strerror or exc}") from None


# --------------------------------------------------------------------------- submitting


def plan(spec: Any, overrides: list[str] | None = None, *, gpu: str | None = None, price: float | None = None,
         network: bool = True, fused_ce: bool | None = None) -> list[Any]:
    """The planner's answer (:class:`~ftcluster.plan.planner.Plan`) for a job spec, or one per stage of a
    pipeline, in order: per-GPU memory, step time and cost of the spec's layout and its alternatives, and
    the recommendation. ``network`` False reads no remote config.json or data listing (``--offline``);
    ``fused_ce`` None assumes the runtime's own choice of the fused loss."""
    from .plan.planner import build_plan
    from .plan.planner.advise import stage_specs

    spec = _spec(spec, overrides)
    return [build_plan(s, gpu=gpu, price=price, network=network, shape=shape, fused_ce=fused_ce)
            for s, shape in stage_specs(spec, network=network)]


def schema(pipeline: bool = False) -> dict[str, Any]:
    """The JSON Schema of a job spec (or of a pipeline file), as ``ftcluster schema`` prints it."""
    from .spec.loader import json_schema
    from .spec.pipeline import pipeline_json_schema

    return pipeline_json_schema() if pipeline else json_schema()


def backend_for(spec: Any, backend: str | None = None, **options: Any) -> Backend:
    """The backend that runs ``spec`` (a pipeline: the pipeline backend); ``backend`` names one, as the
    override ``backend=NAME`` would (pass the spec through :func:`with_backend` first to have it validated
    for it). ``options`` go to backends that take them (kubernetes: ``context``)."""
    from .spec.pipeline import Pipeline

    return get_backend("pipeline" if isinstance(spec, Pipeline) else backend or spec.backend, **options)


def check_submit_options(spec: Any, *, dry_run: bool = False, server: bool = False, context: str | None = None) -> None:
    """UsageError when ``server`` (a server-side dry run) or ``context`` (a kubeconfig context) do not apply to
    ``spec``'s backend, or ``server`` comes without ``dry_run``."""
    from .spec.pipeline import Pipeline
    from .spec.registry import entries

    e = None if isinstance(spec, Pipeline) else entry(spec.backend)
    if (server and not (e and e.server_dry_run)) or (context and not (e and "context" in e.options)):
        takers = [x.name for x in entries() if x.server_dry_run or "context" in x.options]
        raise UsageError(f"--server and --context apply to the {' and '.join(takers)} backend only")
    if server and not dry_run:
        raise UsageError("--server goes with --dry-run (a server-side dry run)")


def fresh_uri(uri: Any) -> str:
    """A new output folder beside ``uri`` (a URI, or a job spec's output.uri): ``<uri>-<UTC time>``
    (``submit --fresh``; the old outputs stay). UsageError for a pipeline (each stage has its own)."""
    from .spec.pipeline import Pipeline

    if isinstance(uri, Pipeline):
        raise UsageError("--fresh does not apply to a pipeline; set each stage's output.uri")
    uri = uri if isinstance(uri, str) else uri.output.uri
    return f"{uri.rstrip('/')}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def finished_note(spec: Any, path: str | None = None) -> str | None:
    """The note ``submit`` prints, instead of submitting, when a local ``output.uri`` already holds this job's
    end (its engine's last artifact is committed, :meth:`ftcluster.storage.catalog.Catalog.done`): a run would
    resume there and find nothing to do, so ``submit`` submits nothing, writes no run folder and exits 0.
    None otherwise, and for a remote store (the run itself looks, and logs the same)."""
    from .plan.engines import engine_for
    from .spec.pipeline import Pipeline
    from .storage.catalog import Catalog
    from .storage.uri import is_local

    if isinstance(spec, Pipeline) or not is_local(spec.output.uri):
        return None
    last = engine_for(spec).last_artifact(spec)
    if not Catalog(spec.output.uri, spec.output.storage_options).done(last):
        return None
    job = path or spec._source_file or "job.yaml"
    return (f"note: {spec.output.uri} already holds a finished run ({last}/ is committed): already complete, "
            f"nothing to do, nothing submitted. To train again: ftcluster submit {job} --fresh "
            "(a new output folder), or --set output.uri=<another folder>")


def check_lease(spec: Any) -> None:
    """Refuse, before anything is submitted, a job whose ``output.uri`` (or a variant's) holds the live lease of
    another run (:mod:`ftcluster.storage.lease`): raises :class:`~ftcluster.storage.lease.LeaseHeld`, whose
    message is the one line naming that run, its host and what to do. A free or expired lease passes, and so
    does a store this machine cannot read (no credentials here, endpoint down: one short attempt): the run
    itself takes the lease and refuses then. A pipeline's stages write one after another: not checked."""
    from .backends.base import outputs_record
    from .plan.launch import compile_plan
    from .spec.pipeline import Pipeline
    from .spec.relpaths import runs_here
    from .storage.lease import LeaseHeld, read_lease, refusal
    from .storage.uri import is_local

    if isinstance(spec, Pipeline):
        return
    for one in compile_plan(spec).resolved if spec.variants else (spec,):
        uri = outputs_record(one)["uri"]
        if is_local(uri) and not (runs_here(one.backend, one) and Path(uri.removeprefix("file://")).is_absolute()):
            continue  # a path on the cluster (behind slurm.login), not this machine's
        options = dict(one.output.storage_options or {})
        if uri.startswith(("s3://", "s3a://")):  # one quick attempt: the run retries, submit must not hang
            options["config_kwargs"] = {"connect_timeout": 5, "read_timeout": 10, "retries": {"max_attempts": 1},
                                        **options.get("config_kwargs", {})}
        try:
            rec = read_lease(uri, options)
        except Exception:  # noqa: BLE001 - unreadable from here: the run decides
            continue
        now = time.time()
        if rec is not None and not rec.expired(now):
            raise LeaseHeld(refusal(uri, rec, now))


def submit_dryrun(spec: Any, backend: str | None = None, **options: Any) -> SubmitRequest:
    """What :func:`submit` would do, with no side effects; ``.describe()`` prints it. ``spec``: an object or a
    YAML path; ``backend``: as the override ``backend=NAME``."""
    from .spec.pipeline import Pipeline, precedence

    spec = _spec(spec, backend=backend)
    b = backend_for(spec, **options)
    req = b.submit_dryrun(b.compile(spec))
    if isinstance(spec, Pipeline):
        for st in req.stages:
            st.request.notes = precedence(spec.stage(st.name).spec, spec.stage(st.name), spec.source)
    else:
        req.notes = precedence(spec)
        record_outputs(req, spec)  # outputs.json in the run folder: run_output() for every backend
    return req


def schedule(request: Any, **options: Any) -> RunStatus:
    """Carry out a request from :func:`submit_dryrun` on the backend that built it (same ``options``)."""
    return get_backend(request.backend, **options).schedule(request)


def _dry_run_backend(request: Any, **options: Any) -> Any:
    from .spec.registry import entries

    b = get_backend(request.backend, **options)
    if not entry(request.backend).server_dry_run or not hasattr(b, "server_dry_run"):
        takers = " and ".join(e.name for e in entries() if e.server_dry_run)
        raise BackendError(f"a server-side dry run applies to the {takers} backend only, not {request.backend}")
    return b


def check_server(request: Any, **options: Any) -> None:
    """Reach the cluster a server-side dry run of ``request`` would ask (kubernetes: the kubeconfig and its
    context), contacting nothing else: BackendError (no kubeconfig, unknown context) before anything is
    printed (``submit --dry-run --server``)."""
    connect = getattr(_dry_run_backend(request, **options), "connect", None)
    if connect is not None:
        connect()


def server_dry_run(request: Any, **options: Any) -> str:
    """Have the cluster validate the request's job without storing it (kubernetes: ``dryRun=All``)."""
    return _dry_run_backend(request, **options).server_dry_run(request)


def submit(spec: Any, backend: str | None = None, overrides: list[str] | None = None, **options: Any) -> RunStatus:
    """Submit a spec or pipeline (object or YAML path) to its backend; ``backend`` as the override
    ``backend=NAME``; ``overrides`` apply to a YAML path. It checks nothing first: ``ftcluster submit`` calls
    :func:`check_submit` before it, and :func:`check_lease` (the output is free) right before scheduling."""
    spec = _spec(spec, overrides, backend)
    return schedule(submit_dryrun(spec, **options), **options)


# --------------------------------------------------------------------------- prepare-data

PREPARE_HOW = ("add data.prepare.source (the raw corpus: jsonl/parquet/.txt files, a file, folder or glob) and let "
               "data.train name the prepared corpus it writes (docs/data.md)")


def prepare_load(path: str | Path | None = None, overrides: list[str] | None = None, backend: str | None = None, *,
                 source: str | None = None, output: str | None = None, tokenizer: str | None = None,
                 train_vocab_size: int | None = None, text_field: str | None = None) -> Any:
    """The spec ``ftcluster prepare-data`` prepares: the job spec at ``path`` (which must have ``data.prepare``),
    or, without one, a spec built from ``source`` (the raw corpus), ``output`` (the prepared corpus) and a
    tokenizer (a folder, or ``train_vocab_size`` for a BPE trained on the source)."""
    from .spec.pipeline import Pipeline

    direct = any(v is not None for v in (source, output, tokenizer, train_vocab_size, text_field))
    if path is not None and direct:
        raise UsageError("give a SPEC, or --source/--output with --tokenizer or --train-vocab-size, not both")
    if path is None:
        if not (source and output) or (tokenizer is None) == (train_vocab_size is None):
            raise UsageError("give a SPEC with data.prepare, or --source URI --output URI with --tokenizer PATH or "
                             "--train-vocab-size N (one of the two)")
        return _direct_prepare_spec(source, output, tokenizer, train_vocab_size, text_field)
    spec = load(path, overrides, backend)
    if isinstance(spec, Pipeline):
        raise UsageError(f"{path}: a pipeline; prepare-data takes the job spec of the stage that trains on the corpus")
    if spec.data.prepare is None:
        raise SpecError([Problem(str(path), None, None, "data.prepare",
                                 f"not set; {PREPARE_HOW}, or run `ftcluster prepare-data --source URI --output URI "
                                 "--tokenizer PATH`")])
    return spec


def _direct_prepare_spec(source: str, output: str, tokenizer: str | None, vocab: int | None,
                         text_field: str | None) -> Any:
    from .spec.loader import spec_from_dict

    doc = {"name": "prepare-data", "method": "full", "model": {"random_init": {"preset": "tiny"}},
           "tokenizer": {"path": tokenizer} if tokenizer else {"train_vocab_size": vocab},
           "data": {"train": output, "format": "text", "seq_len": 128, "fields": {"text": text_field or "text"},
                    "prepare": {"source": source}},
           "output": {"uri": f"{output.rstrip('/')}-unused"}}  # required by the spec; prepare writes nothing there
    return spec_from_dict(doc)


def prepare_command(spec: Any, workers: int | None = None) -> tuple[list[str], dict[str, str]]:
    """The command ``ftcluster prepare-data`` runs here and the environment it adds: the worker
    (``python -m ftcluster.train.prepare``, in a process of its own: the core never imports the tokenizer
    libraries) as one task over this machine's CPUs (``data.prepare.tasks`` applies to ``--submit``)."""
    import importlib.util
    import sys

    from .plan.prepare import compile_prepare
    from .spec.envbuild import PAYLOAD_VAR

    missing = [m for m in ("transformers", "tokenizers") if importlib.util.find_spec(m) is None]
    if missing:
        raise FtclusterError(f"ftcluster prepare-data tokenizes here and needs {', '.join(missing)}: "
                             "pip install 'ftcluster[train]' (or run it on the cluster with --submit)")
    pp = compile_prepare(spec, workers)
    argv = [sys.executable, "-m", "ftcluster.train.prepare", "--spec-env", PAYLOAD_VAR, "--task", "0", "--tasks", "1",
            *(["--workers", str(pp.workers)] if pp.workers else [])]
    return argv, {PAYLOAD_VAR: pp.payload_json(), "TOKENIZERS_PARALLELISM": "false"}


def prepare_summary(spec: Any) -> str:
    """The line ``ftcluster prepare-data`` ends with: the corpus, its shards, tokens and documents, and what
    to run next; FtclusterError when the corpus has no manifest (not finished)."""
    from .corpus.format import read_manifest

    uri = spec.data.train
    m = read_manifest(uri, spec.data.storage_options)
    if m is None:
        raise FtclusterError(f"{uri}: no manifest.json: the corpus is not complete; run `ftcluster prepare-data` again "
                             "(it resumes: committed source files are skipped)")
    source = spec._source_file
    nxt = (f"ftcluster submit {source}" if source and not source.startswith("<") else
           f"set data.train: {uri} (data.format: text) in a job spec and `ftcluster submit` it")
    return (f"{uri}: {len(m.shards)} shards, {m.tokens:,} tokens, {m.documents:,} documents "
            f"(tokenizer {m.tokenizer_fingerprint[:12]}, vocabulary {m.vocab_size:,})\nnext: {nxt}")


def prepare_dryrun(spec: Any, workers: int | None = None, **options: Any) -> SubmitRequest:
    """The job ``ftcluster prepare-data --submit`` would submit to the spec's backend (a Slurm job array, a
    Kubernetes indexed Job of ``data.prepare.tasks`` tasks), with no side effects; ``.describe()`` prints it."""
    from .plan.prepare import compile_prepare

    return backend_for(spec, **options).prepare_dryrun(compile_prepare(spec, workers))


def prepare_schedule(request: Any, **options: Any) -> RunStatus:
    """Submit a request from :func:`prepare_dryrun` (Slurm: a run folder ``ftcluster status`` follows)."""
    return get_backend(request.backend, **options).schedule_prepare(request)


# --------------------------------------------------------------------------- runs


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


def cluster_backends() -> tuple[str, ...]:
    """The backends that can list the runs their cluster knows (``ftcluster list --backend``)."""
    from .spec.registry import entries

    return tuple(e.name for e in entries() if e.lists_cluster)


def list_cluster(backend: str, **options: Any) -> list[RunStatus]:
    """The runs a cluster knows (kubernetes: ftcluster's jobs in the namespace, by label)."""
    return get_backend(backend, **options).list()


def logs(run_ref: str, follow: bool = False, **options: Any) -> Iterator[str]:
    """Log lines of a run; ``follow`` keeps reading until it ends. Kubernetes runs take ``rank=N``
    (node rank N's pod; default 0, the master)."""
    from .spec.registry import entries

    b = _backend_of(run_ref)
    if set(options) - set(entry(b.name).log_options):
        takers = " and ".join(e.name for e in entries() if set(options) <= set(e.log_options)) or "no"
        raise BackendError(f"{', '.join(sorted(options))}: applies to {takers} runs only ({run_ref} is a {b.name} run)")
    return b.logs(run_ref, follow=follow, **options)


def cancel(run_ref: str) -> RunStatus:
    """Ask a run to stop (it checkpoints first when it can)."""
    return _backend_of(run_ref).cancel(run_ref)


def run_output(run_ref: str) -> dict[str, Any]:
    """Where a run writes its outputs: ``{"uri", "storage_options", "max_steps", "single"}``.

    Read from what every backend records in the run folder at schedule time (``outputs.json``,
    :func:`ftcluster.backends.base.outputs_record`), else from ``status.json`` alone. ``uri`` is absolute
    for a run whose processes started here with a relative output.uri (resolved against the folder it was
    submitted from, as the runtime resolves it); ``single`` is False for a run with several outputs
    (variants, pipeline stages), whose ``uri`` is then only their common root.
    """
    run_dir = find_run(run_ref)
    st = load_status(run_dir)
    rec = read_outputs(run_dir) or _stages_outputs(run_dir) or {}
    uri = rec.get("uri") or st.output_uri
    return {"uri": uri, "storage_options": rec.get("storage_options") or {}, "max_steps": rec.get("max_steps"),
            "single": bool(uri) and not st.tasks and rec.get("single", True) is not False}


def _stages_outputs(run_dir: Path) -> dict[str, Any] | None:
    """A pipeline's outputs: its stages record theirs in their own folders (``<run folder>/<stage>``);
    ``uri`` is their common root (None when they share no store), ``single`` False."""
    import posixpath
    from urllib.parse import urlsplit

    stages = [r for d in sorted(Path(run_dir).iterdir()) if d.is_dir() and (r := read_outputs(d)) and r.get("uri")]
    if not stages:
        return None
    parts = [urlsplit(r["uri"]) for r in stages]
    where = {(p.scheme, p.netloc) for p in parts}
    root = None
    if len(where) == 1:
        (scheme, netloc), = where
        path = posixpath.commonpath([p.path or "/" for p in parts])
        root = f"{scheme}://{netloc}{path}" if scheme else path
    return {"uri": root, "storage_options": stages[0].get("storage_options") or {}, "max_steps": None,
            "single": False}


def sample_command(run_or_uri: str | None, prompt: str, input_text: str = "", max_new_tokens: int = 64,
                   temperature: float = 0.0, adapters: list[str] | None = None, base: str | None = None,
                   force: bool = False) -> list[str]:
    """The command ``ftcluster sample`` runs (``python -m ftcluster.train.sample URI ...``: the core never
    imports torch, so the model runs in a process of its own); FtclusterError naming the fix when this
    Python lacks the training extra. ``adapters`` (``NAME=REF`` or ``REF``, REF a run id, path or URI):
    compare them on one base instead of sampling ``run_or_uri``."""
    import importlib.util
    import json
    import sys

    if bool(run_or_uri) == bool(adapters):
        raise UsageError("give a RUN_OR_URI to sample, or one --adapter or more to compare (not both)")
    options: dict[str, Any] = {}
    target: list[str] = []
    if adapters:
        for ref in adapters:
            name, sep, where = ref.partition("=")
            named = bool(sep) and "/" not in name and ":" not in name
            uri, opts = artifact_source(where if named else ref)
            options = options or opts
            target += ["--adapter", f"{name}={uri}" if named else uri]
    if run_or_uri:
        uri, options = sample_source(run_or_uri)
        target.insert(0, uri)
    missing = [m for m in ("torch", "transformers", "peft") if importlib.util.find_spec(m) is None]
    if missing:
        raise FtclusterError(f"ftcluster sample runs the model here and needs {', '.join(missing)}: "
                             "pip install 'ftcluster[train]'")
    extra = (["--base", artifact_source(base)[0]] if base else []) + (["--force"] if force else [])
    return [sys.executable, "-m", "ftcluster.train.sample", *target, "--prompt", prompt, "--input", input_text,
            "--max-new-tokens", str(max_new_tokens), "--temperature", str(temperature),
            "--storage-options", json.dumps(options), *extra]


def sample_source(run_or_uri: str) -> tuple[str, dict[str, Any]]:
    """The output URI (and its storage options) that ``ftcluster sample RUN_OR_URI`` reads: a run id or run
    folder's (:func:`run_output`), or a URI/path given as it is."""
    if "://" in run_or_uri or (Path(run_or_uri).is_dir() and not (Path(run_or_uri) / "status.json").exists()):
        return run_or_uri, {}
    try:
        out = run_output(run_or_uri)
    except RunNotFoundError as err:
        raise FtclusterError(f"{err}; or give an output URI (output.uri)") from None
    if not out["single"]:
        raise FtclusterError(f"run {run_or_uri} has several outputs (variants or stages); give one of their output "
                             f"URIs, e.g. {out['uri'] or '<output.uri>'}/<variant name>")
    return out["uri"], out["storage_options"]


def artifact_source(ref: str) -> tuple[str, dict[str, Any]]:
    """Where ``ref`` points, as (URI, storage options): a URI or path as it is, or a run id (its output
    root: every variant's and stage's outputs are under it), optionally followed by ``/path`` inside it
    (``RUN/qa/adapter``)."""
    if "://" in ref or Path(ref).exists():
        return (ref if "://" in ref else str(Path(ref).resolve())), {}
    if ref.startswith(("/", ".", "~")):
        raise FtclusterError(f"{ref}: no such file or folder")
    run, _, rest = ref.partition("/")
    try:
        out = run_output(run)
    except RunNotFoundError as err:
        raise FtclusterError(f"{ref}: no such path, and {err}; give a URI, a path, or a run id") from None
    if not out["uri"]:
        raise FtclusterError(f"run {run} has no recorded output URI; give the output URI itself")
    return (out["uri"].rstrip("/") + (f"/{rest}" if rest else "")), out["storage_options"]


def merge_command(ref: str, output: str, base: str | None = None, force: bool = False, overwrite: bool = False,
                  dtype: str | None = None) -> list[str]:
    """The command ``ftcluster merge`` runs (``python -m ftcluster.train.merge_cmd``, a process of its own)."""
    import importlib.util
    import json
    import sys

    uri, options = artifact_source(ref)
    missing = [m for m in ("torch", "transformers", "peft") if importlib.util.find_spec(m) is None]
    if missing:
        raise FtclusterError(f"ftcluster merge runs here and needs {', '.join(missing)}: pip install 'ftcluster[train]'")
    out = output if "://" in output else str(Path(output).resolve())
    argv = [sys.executable, "-m", "ftcluster.train.merge_cmd", uri, "-o", out, "--storage-options",
            json.dumps(options)]
    if base:
        argv += ["--base", artifact_source(base)[0]]
    return argv + (["--force"] if force else []) + (["--overwrite"] if overwrite else []) + (
        ["--dtype", dtype] if dtype else [])


def run_ids(prefix: str = "") -> list[str]:
    """The ids of the runs under the runs folder that start with ``prefix``, sorted (shell completion of
    ``status``, ``logs``, ``cancel`` and ``sample``): folder names only, no status is read or refreshed, and
    never an error (an unreadable folder gives [])."""
    try:
        return sorted(d.name for d in runs_root().iterdir()
                      if d.name.startswith(prefix) and (d / "status.json").is_file())
    except Exception:  # noqa: BLE001 - completion must never fail the shell
        return []


def list_runs() -> list[RunStatus]:
    """The current status of every run under the runs folder, oldest first; a broken run folder is skipped."""
    runs = []
    for d in _run_folders():
        try:
            runs.append(get_backend(load_status(d).backend).status(str(d)))
        except Exception:  # one broken folder must not hide the others
            continue
    return runs
