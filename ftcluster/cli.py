"""The `ftcluster` command line.

Only click is imported at start-up; every command imports what it needs, so
`ftcluster --help` and `ftcluster render` stay fast on a login node without torch.
Errors of the FtclusterError family are caught in one place (:class:`_Cli`) and printed
as one line per problem; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import gc
import json
import sys
import time

import click

from . import __version__

SET_HELP = "Override a spec field, e.g. --set training.max_steps=10 (repeatable)."
CONTEXT_HELP = "Kubernetes: the kubeconfig context (default: the current one, or the pod's service account)."
NAMESPACE_HELP = "Kubernetes: the namespace (same as --set kubernetes.namespace=NS)."


class _Cli(click.Group):
    def invoke(self, ctx: click.Context):
        from .errors import FtclusterError

        try:
            return super().invoke(ctx)
        except FtclusterError as err:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            for line in str(err).splitlines() or [type(err).__name__]:
                click.echo(f"error: {line}", err=True)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(__version__, prog_name="ftcluster")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Compile one fine-tuning job spec into Slurm or Kubernetes launch files, and run it."""
    ctx.obj = {"debug": debug}


def _load(path: str, sets: tuple[str, ...]):
    """A job spec, or a pipeline (a file with `pipeline:`); `--set` applies to every stage of a pipeline."""
    from .pipeline import load

    with _collector_paused():
        return load(path, list(sets))


@contextlib.contextmanager
def _collector_paused():
    """Run a block without the cyclic garbage collector, then freeze what it left (start-up speed).

    Loading the first spec imports pydantic and ruamel.yaml and builds the spec models: objects
    that live until the process exits, so the collector's passes over them find nothing, and the
    full collection at interpreter exit walks them once more. Paused and frozen, `ftcluster render`
    takes about 15% less time (benchmarks/render_speed.py). Frozen objects are still freed by
    reference counting; the collector just no longer scans them.
    """
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


@cli.command()
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def validate(job: str, sets: tuple[str, ...]) -> None:
    """Check a job spec or pipeline; prints a summary, or every problem with file:line:column."""
    spec = _load(job, sets)
    from .pipeline import Pipeline, describe
    from .plan import compile_plan

    if isinstance(spec, Pipeline):
        click.echo(f"{job}: ok: {describe(spec)}")
        return
    plan = compile_plan(spec)
    r = spec.resources
    array = ""
    if plan.variants:
        limit = f", at most {plan.array_parallelism} at once" if plan.array_parallelism else ""
        array = f", {len(plan.variants)} variants ({', '.join(plan.variants)}){limit}"
    click.echo(
        f"{job}: ok: {spec.name} ({spec.method}), {r.nodes} node(s) x {r.nproc_per_node} process(es) = "
        f"world size {plan.world_size}, backend {spec.backend}, output {spec.output.uri}{array}"
    )


@cli.command()
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--target", "-t", type=click.Choice(["slurm", "pytorchjob", "trainjob"]), default=None,
              help="Output kind; default from the spec's backend.")
@click.option("--output", "-o", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Write files into this folder instead of printing them.")
@click.option("--kustomize", is_flag=True, help="Kubernetes targets: add a kustomization.yaml listing the jobs "
              "(a folder to commit as it is for Argo CD / Flux).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def render(job: str, target: str | None, out_dir: str | None, kustomize: bool, sets: tuple[str, ...]) -> None:
    """Render launch files. Pure: contacts nothing, same spec gives the same bytes."""
    from .pipeline import Pipeline, render_pipeline
    from .render import render as do_render

    spec = _load(job, sets)
    with _collector_paused():  # the template engine or YAML emitter it imports lives until exit too
        files = render_pipeline(spec, target) if isinstance(spec, Pipeline) else do_render(spec, target)
    if kustomize:
        files = _kustomized(spec, target, files)
    if out_dir is None:
        for i, (name, text) in enumerate(files.items()):
            if len(files) > 1:
                click.echo(f"{'' if i == 0 else chr(10)}# ----- {name} -----")
            click.echo(text, nl=False)
        return
    _write_files(out_dir, files)
    for name in files:
        click.echo(f"wrote {out_dir.rstrip('/')}/{name}")


def _kustomized(spec, target: str | None, files: dict[str, str]) -> dict[str, str]:
    from .pipeline import Pipeline
    from .render import command_for, default_target, header_lines
    from .render.kube import with_kustomization

    if isinstance(spec, Pipeline) or (target or default_target(spec)) == "slurm":
        raise click.UsageError("--kustomize applies to one job spec rendered for --target pytorchjob or trainjob")
    target = target or default_target(spec)
    command = command_for(spec._source_file or "job.yaml", getattr(spec, "_overrides", ()), target) + " --kustomize"
    return with_kustomization(files, header_lines(spec, target, command))


def _write_files(out_dir: str, files: dict[str, str]) -> None:
    """Write every file or none: each goes to a temp name first, then all are renamed."""
    import os
    from pathlib import Path

    from .errors import FtclusterError

    d = Path(out_dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
        tmps = []
        for name, text in files.items():
            final = d / name  # a pipeline's files sit in one folder per stage
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
            tmp.write_text(text, encoding="utf-8")
            tmps.append((tmp, final))
        for tmp, final in tmps:
            os.replace(tmp, final)
    except OSError as exc:
        for tmp, _ in locals().get("tmps", []):
            tmp.unlink(missing_ok=True)
        raise FtclusterError(f"cannot write to {out_dir}: {exc.strerror or exc}") from None


@cli.command()
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--backend", "-b", type=click.Choice(["local", "slurm", "kubernetes"]), default=None,
              help="Override the spec's backend.")
@click.option("--dry-run", is_flag=True, help="Print exactly what would be submitted; submit nothing.")
@click.option("--wait", "-w", is_flag=True, help="Block until the job ends, showing its log; exit with its status.")
@click.option("--server", is_flag=True, help="With --dry-run (kubernetes): also have the API server validate the job "
              "(dryRun=All); nothing is stored.")
@click.option("--context", default=None, help=CONTEXT_HELP)
@click.option("--namespace", "-n", default=None, help=NAMESPACE_HELP)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def submit(job: str, backend: str | None, dry_run: bool, wait: bool, server: bool, context: str | None,
           namespace: str | None, sets: tuple[str, ...]) -> None:
    """Submit a job (local, slurm, kubernetes) or a pipeline (slurm) to its backend."""
    from .backends import get_backend
    from .pipeline import Pipeline

    spec = _load(job, sets + ((f"kubernetes.namespace={namespace}",) if namespace else ()))
    if isinstance(spec, Pipeline):
        if backend:
            raise click.UsageError("--backend does not apply to a pipeline; use --set backend=slurm (every stage)")
        b = get_backend("pipeline")
    else:
        b = get_backend(backend or spec.backend, context=context)
    if (server or context) and b.name != "kubernetes":
        raise click.UsageError("--server and --context apply to the kubernetes backend only")
    if server and not dry_run:
        raise click.UsageError("--server goes with --dry-run (a server-side dry run)")
    req = b.submit_dryrun(spec)
    if dry_run:
        click.echo(req.describe(), nl=False)
        if server:
            click.echo(b.server_dry_run(req))
        return
    st = b.schedule(req)
    click.echo(f"submitted {st.run_id} ({st.backend}{', job ' + st.job_id if st.job_id else ''}); run folder {st.run_dir}")
    if wait:
        sys.exit(_wait(b, st.run_dir))


def _wait(backend, run_ref: str) -> int:
    from .backends.base import EXIT_CODES
    from .errors import BackendError

    try:
        for line in backend.logs(run_ref, follow=True):
            click.echo(line, nl=False)
    except BackendError as err:  # e.g. not allowed to read pod logs: still wait for the job's end
        click.echo(f"warning: no log: {err}", err=True)
    if hasattr(backend, "wait"):  # Kubernetes follows the job with a watch (and stops if it is deleted)
        st = backend.wait(run_ref)
    else:
        st = backend.status(run_ref)
        while not st.terminal:
            time.sleep(1)
            st = backend.status(run_ref)
    click.echo(f"{st.run_id}: {st.state}{' - ' + st.message if st.message else ''}", err=True)
    return EXIT_CODES.get(st.state, 1)


@cli.command()
@click.argument("run", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(run: str | None, as_json: bool) -> None:
    """Show a run's state (or all runs)."""
    from . import api

    if run is None:
        return _list(as_json)
    st = api.status(run)
    if as_json:
        click.echo(json.dumps(st.to_dict(), indent=1, sort_keys=True))
        return
    _table([st])


@cli.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--backend", "-b", type=click.Choice(["kubernetes"]), default=None,
              help="Ask the cluster instead: ftcluster's jobs in the namespace, wherever they were submitted from.")
@click.option("--context", default=None, help=CONTEXT_HELP)
@click.option("--namespace", "-n", default=None, help="Kubernetes: the namespace (default: the context's).")
def list_cmd(as_json: bool, backend: str | None, context: str | None, namespace: str | None) -> None:
    """List runs recorded in the run folders (or, with --backend kubernetes, the jobs on the cluster)."""
    if backend:
        from .backends import get_backend

        runs = get_backend(backend, context=context, namespace=namespace).list()
        if as_json:
            click.echo(json.dumps([r.to_dict() for r in runs], indent=1, sort_keys=True))
        else:
            _table(runs)
        return
    _list(as_json)


def _list(as_json: bool) -> None:
    from .backends import get_backend
    from .backends.base import list_runs, load_status

    runs = []
    for d in list_runs():
        try:
            st = load_status(d)
            runs.append(get_backend(st.backend).status(str(d)))
        except Exception:  # one broken folder must not hide the others
            continue
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in runs], indent=1, sort_keys=True))
    else:
        _table(runs)


def _table(runs) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(box=None)
    for col in ("RUN", "BACKEND", "JOB", "STATE", "MESSAGE"):
        t.add_column(col)
    for r in runs:
        t.add_row(r.run_id, r.backend, r.job_id or "-", r.state, r.message)
        for task in r.tasks:  # the variants of a job array, the stages of a pipeline
            t.add_row(f"  {task['name']}", "", task.get("job_id") or "-", task["state"], task.get("message", ""))
    Console().print(t)


@cli.command()
@click.argument("run")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the run ends.")
@click.option("--rank", type=click.IntRange(min=0), default=None,
              help="Kubernetes: the log of node rank N's pod (default 0, the master).")
def logs(run: str, follow: bool, rank: int | None) -> None:
    """Print a run's log."""
    from . import api

    for line in api.logs(run, follow=follow, **({"rank": rank} if rank is not None else {})):
        click.echo(line, nl=False)


@cli.command()
@click.argument("run")
def cancel(run: str) -> None:
    """Stop a run; the training runtime checkpoints before it exits."""
    from . import api

    st = api.cancel(run)
    click.echo(f"{st.run_id}: {'already ' + st.state if st.terminal else 'cancel requested'}")


@cli.command()
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--remote", is_flag=True, help="Also probe a compute node (/dev/shm, port, python); queues a 1-node job.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--backend", "-b", type=click.Choice(["local", "slurm", "kubernetes"]), default=None,
              help="Override the spec's backend.")
@click.option("--context", default=None, help=CONTEXT_HELP)
@click.option("--namespace", "-n", default=None, help=NAMESPACE_HELP)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def doctor(job: str, remote: bool, as_json: bool, backend: str | None, context: str | None, namespace: str | None,
           sets: tuple[str, ...]) -> None:
    """Check a job against its cluster and storage before submitting; exit 1 if any check fails."""
    import logging

    from .doctor import diagnose, print_report

    # s3fs/aiohttp report a dropped connection again as "Task exception was never retrieved" with a
    # traceback when the loop is collected; the output check already shows it as one row.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    sets += ((f"backend={backend}",) if backend else ()) + ((f"kubernetes.namespace={namespace}",) if namespace else ())
    checks = diagnose(job, list(sets), remote=remote, context=context)
    if as_json:
        click.echo(json.dumps([c.to_dict() for c in checks], indent=1))
    else:
        print_report(checks)
    sys.exit(1 if any(c.status == "fail" for c in checks) else 0)


@cli.command()
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None, help="Write to a file.")
@click.option("--pipeline", is_flag=True, help="The schema of a pipeline file instead of a job spec.")
def schema(output: str | None, pipeline: bool) -> None:
    """Print the JSON Schema of the job spec (for editors)."""
    from .loader import json_schema
    from .pipeline import pipeline_json_schema

    text = json.dumps(pipeline_json_schema() if pipeline else json_schema(), indent=2, sort_keys=True) + "\n"
    if output:
        _write_files(str(__import__("pathlib").Path(output).parent or "."), {__import__("pathlib").Path(output).name: text})
    else:
        click.echo(text, nl=False)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="ftcluster")


if __name__ == "__main__":
    main()
