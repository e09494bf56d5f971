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
import os
import sys
import time

import click

from . import __version__

SET_HELP = "Override a spec field, e.g. --set training.max_steps=10 (repeatable)."
NO_PLAN_CHECK_HELP = "Skip the planner's check that the job fits in its GPUs' memory."


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
    if debug:  # runs started from here show torchrun's own lines and tracebacks too (docs/lifecycle.md)
        os.environ["FTCLUSTER_DEBUG"] = "1"


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
@click.option("--no-plan-check", is_flag=True, help=NO_PLAN_CHECK_HELP)
def validate(job: str, sets: tuple[str, ...], no_plan_check: bool) -> None:
    """Check a job spec or pipeline; prints a summary, or every problem with file:line:column."""
    spec = _load(job, sets)
    from .pipeline import Pipeline, describe
    from .plan import compile_plan

    if not no_plan_check:
        _plan_check(spec)
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
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def render(job: str, target: str | None, out_dir: str | None, sets: tuple[str, ...]) -> None:
    """Render launch files. Pure: contacts nothing, same spec gives the same bytes."""
    from .pipeline import Pipeline, render_pipeline
    from .render import render as do_render

    spec = _load(job, sets)
    with _collector_paused():  # the template engine or YAML emitter it imports lives until exit too
        files = render_pipeline(spec, target) if isinstance(spec, Pipeline) else do_render(spec, target)
    if out_dir is None:
        for i, (name, text) in enumerate(files.items()):
            if len(files) > 1:
                click.echo(f"{'' if i == 0 else chr(10)}# ----- {name} -----")
            click.echo(text, nl=False)
        return
    _write_files(out_dir, files)
    for name in files:
        click.echo(f"wrote {out_dir.rstrip('/')}/{name}")


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
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--no-plan-check", is_flag=True, help=NO_PLAN_CHECK_HELP)
def submit(job: str, backend: str | None, dry_run: bool, wait: bool, sets: tuple[str, ...], no_plan_check: bool) -> None:
    """Submit a job (local, slurm) or a pipeline (slurm) to its backend."""
    from . import api
    from .pipeline import Pipeline

    spec = _load(job, sets)
    if not no_plan_check:
        _plan_check(spec)
    if isinstance(spec, Pipeline) and backend:
        raise click.UsageError("--backend does not apply to a pipeline; use --set backend=slurm (every stage)")
    req = api.submit_dryrun(spec, backend)
    if dry_run:
        click.echo(req.describe(), nl=False)
        return
    st = api.schedule(req)
    click.echo(f"submitted {st.run_id} ({st.backend}{', job ' + st.job_id if st.job_id else ''}); run folder {st.run_dir}")
    if wait:
        sys.exit(_wait(st.run_dir))


def _plan_check(spec) -> None:
    """Refuse a job (or any stage of a pipeline) that will not fit in its GPUs' memory (ftcluster.planner)."""
    from .errors import SpecError
    from .planner import check_spec

    problems = check_spec(spec)
    if problems:
        raise SpecError(problems)


@cli.command()
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (docs/plan.schema.json).")
@click.option("--gpu", default=None, metavar="TYPE", help="Plan for this GPU type (h200, h100, a100-80g, ...) instead of resources.gpu_type.")
@click.option("--price", type=float, default=None, metavar="USD", help="Price per GPU-hour (overrides the price table).")
@click.option("--offline", is_flag=True, help="Do not read a remote config.json or list remote data.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def plan(job: str, as_json: bool, gpu: str | None, price: float | None, offline: bool, sets: tuple[str, ...]) -> None:
    """Predict per-GPU memory, step time and cost, compare layouts and recommend one."""
    from .pipeline import Pipeline
    from .planner import build_plan
    from .planner.advise import stage_specs
    from .planner.report import plan_dict, print_plan

    spec = _load(job, sets)
    plans = [build_plan(s, gpu=gpu, price=price, network=not offline, shape=shape)
             for s, shape in stage_specs(spec, network=not offline)]
    if as_json:
        out = [plan_dict(p) for p in plans]
        click.echo(json.dumps(out if isinstance(spec, Pipeline) else out[0], indent=1))
        return
    for p in plans:
        print_plan(p)


def _wait(run_ref: str) -> int:
    from . import api

    for line in api.logs(run_ref, follow=True):
        click.echo(line, nl=False)
    st = api.status(run_ref)
    while not st.terminal:
        time.sleep(1)
        st = api.status(run_ref)
    click.echo(f"{st.run_id}: {st.state}{' - ' + st.message if st.message else ''}", err=True)
    return api.EXIT_CODES.get(st.state, 1)


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
def list_cmd(as_json: bool) -> None:
    """List runs recorded in the run folders."""
    _list(as_json)


def _list(as_json: bool) -> None:
    from . import api

    runs = api.list_runs()
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
def logs(run: str, follow: bool) -> None:
    """Print a run's log."""
    from . import api

    for line in api.logs(run, follow=follow):
        click.echo(line, nl=False)


@cli.command()
@click.argument("run")
def cancel(run: str) -> None:
    """Stop a run; the training runtime checkpoints before it exits."""
    from . import api

    before = api.status(run)
    if before.terminal:
        click.echo(f"{before.run_id}: already {before.state}")
        return
    st = api.cancel(run)  # local runs: returns once every process of the run has exited
    click.echo(f"{st.run_id}: cancel requested" + (f"; {st.state}, no process of the run is left" if st.terminal else ""))


@cli.command()
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--remote", is_flag=True, help="Also probe a compute node (/dev/shm, port, python); queues a 1-node job.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def doctor(job: str, remote: bool, as_json: bool, sets: tuple[str, ...]) -> None:
    """Check a job against its cluster and storage before submitting; exit 1 if any check fails."""
    import logging

    from . import api

    # s3fs/aiohttp report a dropped connection again as "Task exception was never retrieved" with a
    # traceback when the loop is collected; the output check already shows it as one row.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    checks = api.doctor(job, list(sets), remote=remote)
    if as_json:
        click.echo(json.dumps([c.to_dict() for c in checks], indent=1))
    else:
        _report(checks)
    sys.exit(1 if any(c.status == "fail" for c in checks) else 0)


def _report(checks) -> None:
    """The doctor's report as a rich table: check / result / how to fix."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    style = {"ok": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}
    t = Table(box=None, show_lines=False, pad_edge=False)
    for col in ("CHECK", "", "RESULT", "HOW TO FIX"):
        t.add_column(col, overflow="fold")
    for c in checks:
        t.add_row(escape(c.name), f"[{style[c.status]}]{c.status}[/]", escape(c.result), escape(c.fix))
    Console().print(t)


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
