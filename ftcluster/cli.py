"""The `ftcluster` command line.

Only click is imported at start-up; every command imports what it needs, so
`ftcluster --help` and `ftcluster render` stay fast on a login node without torch.
Errors of the FtclusterError family are caught in one place (:class:`_Cli`) and printed
as one line per problem; ``--debug`` shows the traceback instead. Usage errors (click's and
ftcluster's UsageError) are one ``error:`` line too, then ``try 'ftcluster CMD --help'`` (exit 2).

It parses and prints only: every rule (which checks run, what ``--backend`` means, when a
run is finished, where a run's outputs are) is in :mod:`ftcluster.api`, for Python users too.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
from typing import Any

import click

from . import __version__

SET_HELP = "Override a spec field, e.g. --set training.max_steps=10 (repeatable)."
NO_PLAN_CHECK_HELP = "Skip the planner's check that the job fits in its GPUs' memory."
CONTEXT_HELP = "Kubernetes: the kubeconfig context (default: the current one, or the pod's service account)."
NAMESPACE_HELP = "Kubernetes: the namespace (same as --set kubernetes.namespace=NS)."


class _Backends(click.Choice):
    """``--backend`` choices: the backend registry's names (:mod:`ftcluster.spec.registry`), read when used
    (``cluster``: only those that can list their cluster's runs)."""

    def __init__(self, cluster: bool = False):
        super().__init__([])
        self.cluster = cluster

    @property
    def choices(self):  # pyright: ignore[reportIncompatibleVariableOverride]  # computed, not stored
        from .spec.registry import entries

        return tuple(e.name for e in entries() if e.in_spec and (e.lists_cluster or not self.cluster))

    @choices.setter
    def choices(self, value) -> None:
        pass

    def convert(self, value, param, ctx):
        from .spec.registry import lookup

        found = lookup(value) if isinstance(value, str) else None  # a built-in name: no plugin scan
        if found is not None and found.in_spec and (found.lists_cluster or not self.cluster):
            return value
        return super().convert(value, param, ctx)


class _UsageLine(click.UsageError):
    """A usage error (a missing argument, an unknown option, a bad choice, options that do not go together)
    printed as every other error is: one ``error:`` line, then the command whose help to read. Exit status 2."""

    def __init__(self, message: str, ctx: click.Context | None = None, command_path: str | None = None):
        super().__init__(message, ctx)
        self.command_path = command_path or (ctx.command_path if ctx is not None else None)

    def show(self, file: Any = None) -> None:
        for line in self.format_message().splitlines() or ["usage error"]:
            line = line.rstrip(".").replace(". Did you mean", "; did you mean")  # "no such command 'x'; did you mean"
            click.echo(f"error: {_lower_first(line)}", err=True)
        if self.command_path:
            click.echo(f"try '{self.command_path} --help'", err=True)


def _lower_first(text: str) -> str:
    """click's sentences ("Missing argument 'JOB'") in the style of ftcluster's lines ("missing argument 'JOB'");
    a word in capitals or an option stays as it is."""
    return text[0].lower() + text[1:] if len(text) > 1 and text[0].isupper() and text[1].islower() else text


def _one_line(err: click.UsageError) -> click.UsageError:
    """``err`` as a :class:`_UsageLine`; ``ftcluster`` alone still prints the help (click's NoArgsIsHelpError)."""
    if isinstance(err, (_UsageLine, click.exceptions.NoArgsIsHelpError)):
        return err
    return _UsageLine(err.format_message(), err.ctx)


class _Cli(click.Group):
    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The commands and their summaries, whole: click cuts a summary at the width left ("before..."),
        here it wraps under itself instead (and, piped, the width has no limit)."""
        rows = [(name, cmd.get_short_help_str(limit=10_000)) for name in self.list_commands(ctx)
                if (cmd := self.get_command(ctx, name)) is not None and not cmd.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as err:  # ftcluster's own options (`ftcluster --bogus`)
            raise _one_line(err) from None

    def invoke(self, ctx: click.Context):
        from .errors import FtclusterError, UsageError

        try:
            return super().invoke(ctx)
        except UsageError as err:  # options that do not go together: a usage error of the command given
            sub = f"{ctx.command_path} {ctx.invoked_subcommand}" if ctx.invoked_subcommand else None
            raise _UsageLine(str(err), ctx, sub) from None
        except click.UsageError as err:  # a command's arguments and options, as click parses them
            raise _one_line(err) from None
        except FtclusterError as err:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            for line in str(err).splitlines() or [type(err).__name__]:
                click.echo(f"error: {line}", err=True)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


def _help_width() -> int:
    from .ui.tables import terminal_width

    return terminal_width()


def _complete_run(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Shell completion of a RUN argument: the run ids under the runs folder (README: Shell completion)."""
    from click.shell_completion import CompletionItem

    from . import api

    return [CompletionItem(run_id) for run_id in api.run_ids(incomplete)]


def _complete_run_or_uri(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """``sample RUN_OR_URI``: the run ids; a path when none matches."""
    from click.shell_completion import CompletionItem

    return _complete_run(ctx, param, incomplete) or [CompletionItem(incomplete, type="file")]


HELP_WIDTH = _help_width()


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"], "terminal_width": HELP_WIDTH,
                                         "max_content_width": HELP_WIDTH})
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
    from .spec.pipeline import load  # api.load, without importing the backends (render's start-up time)

    with _collector_paused():
        return load(path, list(sets))


def _sets(sets: tuple[str, ...], backend: str | None = None, namespace: str | None = None) -> tuple[str, ...]:
    """``--backend X`` is ``--set backend=X`` (:func:`ftcluster.api.backend_overrides`); ``--namespace NS`` is
    ``--set kubernetes.namespace=NS``."""
    from .api import backend_overrides

    return (*backend_overrides(sets, backend), *((f"kubernetes.namespace={namespace}",) if namespace else ()))


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


def _warn(problem: object) -> None:
    """One warning line on stderr: ``warning: file:line:col: field: message``."""
    click.echo(f"warning: {problem}", err=True)


@cli.command()
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--no-plan-check", is_flag=True, help=NO_PLAN_CHECK_HELP)
def validate(job: str, sets: tuple[str, ...], no_plan_check: bool) -> None:
    """Check a job spec or pipeline; prints a summary, or every problem with file:line:column."""
    from . import api

    with _collector_paused():
        spec = api.validate(job, list(sets), plan_check=not no_plan_check, warn=_warn)
    click.echo(f"{job}: ok: {api.summary(spec)}")


@cli.command()
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--target", "-t", type=click.Choice(["slurm", "pytorchjob", "trainjob"]), default=None,  # render.TARGETS
              help="Output kind; default from the spec's backend.")
@click.option("--output", "-o", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Write files into this folder instead of printing them.")
@click.option("--kustomize", is_flag=True, help="Kubernetes targets: add a kustomization.yaml listing the jobs "
              "(a folder to commit as it is for Argo CD / Flux).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def render(job: str, target: str | None, out_dir: str | None, kustomize: bool, sets: tuple[str, ...]) -> None:
    """Render launch files. Pure: contacts nothing, same spec gives the same bytes."""
    from . import api

    spec = _load(job, sets)
    with _collector_paused():  # the template engine or YAML emitter it imports lives until exit too
        files = api.render(spec, target, kustomize=kustomize)
    if out_dir is None:
        for i, (name, text) in enumerate(files.items()):
            if len(files) > 1:
                click.echo(f"{'' if i == 0 else chr(10)}# ----- {name} -----")
            click.echo(text, nl=False)
        return
    api.write_files(out_dir, files)
    for name in files:
        click.echo(f"wrote {out_dir.rstrip('/')}/{name}")


@cli.command()
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--backend", "-b", type=_Backends(), default=None,
              help="Override the spec's backend (the same as --set backend=NAME).")
@click.option("--dry-run", is_flag=True, help="Print exactly what would be submitted; submit nothing.")
@click.option("--wait", "-w", is_flag=True, help="Block until the job ends, showing its log; exit with its status.")
@click.option("--server", is_flag=True, help="With --dry-run (kubernetes): also have the API server validate the job "
              "(dryRun=All); nothing is stored.")
@click.option("--context", default=None, help=CONTEXT_HELP)
@click.option("--namespace", "-n", default=None, help=NAMESPACE_HELP)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--no-plan-check", is_flag=True, help=NO_PLAN_CHECK_HELP)
@click.option("--fresh", is_flag=True, help="Train from scratch in a new output folder (output.uri + '-<UTC time>') "
              "instead of resuming from output.uri; nothing is moved or deleted.")
def submit(job: str, backend: str | None, dry_run: bool, wait: bool, server: bool, context: str | None,
           namespace: str | None, sets: tuple[str, ...], no_plan_check: bool, fresh: bool) -> None:
    """Submit a job (local, slurm, kubernetes) or a pipeline (slurm) to its backend."""
    from . import api

    sets = _sets(sets, backend, namespace)
    spec = _load(job, sets)
    if fresh:
        uri = api.fresh_uri(spec)
        sets = (*sets, f"output.uri={uri}")  # a --set: the rendered header reproduces it
        spec = _load(job, sets)
        click.echo(f"--fresh: output.uri is {uri}", err=True)
    # What validate refuses (the plan, local paths), and this shell's credentials for a local run: before
    # anything is written; the memory check's warnings (a GPU it does not know) on stderr.
    for w in api.check_submit(spec, plan_check=not no_plan_check, credentials=not dry_run):
        _warn(w)
    api.check_submit_options(spec, dry_run=dry_run, server=server, context=context)
    options = {"context": context}
    req = api.submit_dryrun(spec, **options)
    if dry_run:
        if server:  # no kubeconfig: the one error line, not the request before it
            api.check_server(req, **options)
        click.echo(req.describe(), nl=False)
        if server:
            click.echo(api.server_dry_run(req, **options))
        return
    note = api.finished_note(spec, job)
    if note:  # a run would find nothing to do: submit nothing
        click.echo(note, err=True)
        return
    api.check_lease(spec)  # another run writes output.uri now: one line, nothing submitted
    st = api.schedule(req, **options)
    click.echo(f"submitted {st.run_id} ({st.backend}{', job ' + st.job_id if st.job_id else ''}); run folder {st.run_dir}")
    if wait:
        sys.exit(_wait(st.run_id, st.run_dir))
    click.echo(f"follow it: ftcluster logs -f {st.run_id}   state: ftcluster status {st.run_id}")


@cli.command(name="prepare-data")
@click.argument("job", type=click.Path(dir_okay=False), required=False)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Tokenizing processes per machine (default: data.prepare.workers, else its CPU cores).")
@click.option("--submit", is_flag=True, help="Run it on the spec's cluster instead (data.prepare.tasks tasks: a Slurm "
              "job array, a Kubernetes indexed Job).")
@click.option("--dry-run", is_flag=True, help="Print what would run (with --submit: the script or Job); run nothing.")
@click.option("--backend", "-b", type=_Backends(), default=None,
              help="Override the spec's backend (the same as --set backend=NAME).")
@click.option("--context", default=None, help=CONTEXT_HELP)
@click.option("--source", default=None, metavar="URI", help="Without a SPEC: the raw corpus (jsonl/parquet/.txt; a "
              "file, folder or glob on any fsspec store).")
@click.option("--output", default=None, metavar="URI", help="Without a SPEC: where the prepared corpus goes.")
@click.option("--tokenizer", default=None, metavar="PATH", help="Without a SPEC: the tokenizer folder.")
@click.option("--train-vocab-size", type=click.IntRange(min=1), default=None, metavar="N",
              help="Without a SPEC: train a byte-level BPE of N tokens on the source instead.")
@click.option("--text-field", default=None, metavar="F", help="Without a SPEC: the records' text field (default text).")
def prepare_data(job: str | None, sets: tuple[str, ...], workers: int | None, submit: bool, dry_run: bool,
                 backend: str | None, context: str | None, source: str | None, output: str | None,
                 tokenizer: str | None, train_vocab_size: int | None, text_field: str | None) -> None:
    """Tokenize a raw corpus once into token shards and a manifest (data.prepare -> data.train), resumably."""
    import shlex
    import subprocess

    from . import api

    with _collector_paused():
        spec = api.prepare_load(job, list(sets), backend, source=source, output=output, tokenizer=tokenizer,
                                train_vocab_size=train_vocab_size, text_field=text_field)
    if submit:
        req = api.prepare_dryrun(spec, workers, context=context)
        if dry_run:
            click.echo(req.describe(), nl=False)
            return
        st = api.prepare_schedule(req, context=context)
        click.echo(f"submitted {st.run_id} ({st.backend}{', job ' + st.job_id if st.job_id else ''})"
                   + (f"; run folder {st.run_dir}" if st.run_dir else ""))
        click.echo(st.message or f"follow it: ftcluster logs -f {st.run_id}   state: ftcluster status {st.run_id}")
        return
    argv, env = api.prepare_command(spec, workers)
    if dry_run:
        click.echo(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(argv))
        return
    rc = subprocess.run(argv, env={**os.environ, **env}, stdout=subprocess.DEVNULL).returncode
    if rc != 0:  # the worker printed its one error line
        sys.exit(rc)
    click.echo(api.prepare_summary(spec))


@cli.command()
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (docs/plan.schema.json).")
@click.option("--gpu", default=None, metavar="TYPE", help="Plan for this GPU type (h200, h100, a100-80g, ...) instead of resources.gpu_type.")
@click.option("--price", type=float, default=None, metavar="USD", help="Price per GPU-hour (overrides the price table).")
@click.option("--offline", is_flag=True, help="Do not read a remote config.json or list remote data.")
@click.option("--fused-ce", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Assume the runtime's fused linear cross-entropy (liger-kernel); auto: on for Llama models "
                   "unless env FTCLUSTER_FUSED_CE=0 (docs/planner.md).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def plan(job: str, as_json: bool, gpu: str | None, price: float | None, offline: bool, fused_ce: str,
         sets: tuple[str, ...]) -> None:
    """Predict per-GPU memory, step time and cost, compare layouts and recommend one."""
    from . import api
    from .plan.planner.report import plan_dict, print_plan
    from .spec.pipeline import Pipeline

    spec = _load(job, sets)
    fused = {"auto": None, "on": True, "off": False}[fused_ce]
    plans = api.plan(spec, gpu=gpu, price=price, network=not offline, fused_ce=fused)
    if as_json:
        out = [plan_dict(p) for p in plans]
        click.echo(json.dumps(out if isinstance(spec, Pipeline) else out[0], indent=1))
        return
    for p in plans:
        print_plan(p, _console())


def _console():
    """rich's console for the plan table: on a terminal its width; piped, no limit, so no cell is cut
    (rich would otherwise fit the table to 80 columns and elide "GiB/GPU" and method cells)."""
    from rich.console import Console

    from .ui.tables import UNBOUNDED, terminal_width

    width = terminal_width()
    return Console(width=width, soft_wrap=True) if width == UNBOUNDED or os.environ.get("COLUMNS") else Console()


def _follow(run_ref: str, **options) -> None:
    """The run's log until it ends; on a terminal with a live progress bar under it (ftcluster.ui.progress)."""
    from . import api
    from .storage.layout import OutputLayout
    from .ui.progress import ProgressBar, show

    lines = api.logs(run_ref, follow=True, **options)
    bar = None
    if sys.stdout.isatty() and not api.status(run_ref).terminal:
        out = api.run_output(run_ref)
        if out["single"]:
            bar = ProgressBar(OutputLayout(out["uri"]).metrics, out["storage_options"], out["max_steps"])
    show(lines, lambda line: click.echo(line, nl=False), bar)


def _wait(run_id: str, run_ref: str) -> int:
    """``submit --wait``: the run's log, then its end; Ctrl-C stops the waiting only, and says so."""
    from . import api
    from .errors import BackendError

    try:
        try:
            _follow(run_ref)
        except BackendError as err:  # e.g. not allowed to read pod logs: still wait for the job's end
            click.echo(f"warning: no log: {err}", err=True)
        st = api.wait(run_ref)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: stopped waiting; run {run_id} keeps running\n"
                   f"follow it: ftcluster logs -f {run_id}   stop it: ftcluster cancel {run_id}", err=True)
        return 130
    click.echo(f"{st.run_id}: {st.state}{' - ' + st.message if st.message else ''}", err=True)
    _plot_hint(st)
    return api.EXIT_CODES.get(st.state, 1)


def _plot_hint(st: Any) -> None:
    """After a run that trained (``submit --wait``, ``logs -f``): how to look at its curves."""
    if st.terminal and st.output_uri:
        click.echo(f"curves: ftcluster plot {st.run_id} -o {st.name or 'run'}.png", err=True)


@cli.command()
@click.argument("run", required=False, shell_complete=_complete_run)
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
@click.option("--backend", "-b", type=_Backends(cluster=True), default=None,
              help="Ask the cluster instead: ftcluster's jobs in the namespace, wherever they were submitted from.")
@click.option("--context", default=None, help=CONTEXT_HELP)
@click.option("--namespace", "-n", default=None, help="Kubernetes: the namespace (default: the context's).")
def list_cmd(as_json: bool, backend: str | None, context: str | None, namespace: str | None) -> None:
    """List runs recorded in the run folders (or, with --backend kubernetes, the jobs on the cluster)."""
    if backend:
        from . import api

        runs = api.list_cluster(backend, context=context, namespace=namespace)
        if as_json:
            click.echo(json.dumps([r.to_dict() for r in runs], indent=1, sort_keys=True))
        else:
            _table(runs)
        return
    _list(as_json)


def _list(as_json: bool) -> None:
    from . import api

    runs = api.list_runs()
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in runs], indent=1, sort_keys=True))
    else:
        _table(runs)


def _table(runs) -> None:
    """Runs as a table whose run ids are never cut (ftcluster.ui.tables)."""
    from .ui.tables import table

    rows = []
    for r in runs:
        rows.append([r.run_id, r.backend, r.job_id or "-", r.state, r.message])
        for task in r.tasks:  # the variants of a job array, the stages of a pipeline
            rows.append([f"  {task['name']}", "", task.get("job_id") or "-", task["state"], task.get("message", "")])
        for f in r.faults:  # each failed attempt's cause (docs/lifecycle.md, "Faults")
            who = f"rank {f['rank']} on {f.get('host', '?')}: " if f.get("rank") is not None else ""
            kind = "FAULT" if f.get("kind") == "infrastructure" else "ERROR"
            rows.append([f"  attempt {f.get('attempt', '?')}", "", "-", kind, f"{who}{f.get('what', '')}"])
    click.echo(table(["RUN", "BACKEND", "JOB", "STATE", "MESSAGE"], rows), nl=False)


@cli.command()
@click.argument("run", shell_complete=_complete_run)
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the run ends.")
@click.option("--rank", type=click.IntRange(min=0), default=None,
              help="Kubernetes: the log of node rank N's pod (default 0, the master).")
def logs(run: str, follow: bool, rank: int | None) -> None:
    """Print a run's log."""
    from . import api

    # Keyword options for the run's backend (only kubernetes takes rank); Any: they are not `follow`.
    options: dict[str, Any] = {"rank": rank} if rank is not None else {}
    if follow:
        _follow(run, **options)
        _plot_hint(api.status(run))
        return
    for line in api.logs(run, **options):
        click.echo(line, nl=False)


@cli.command()
@click.argument("run", shell_complete=_complete_run)
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
@click.option("--backend", "-b", type=_Backends(), default=None,
              help="Override the spec's backend (the same as --set backend=NAME).")
@click.option("--context", default=None, help=CONTEXT_HELP)
@click.option("--namespace", "-n", default=None, help=NAMESPACE_HELP)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def doctor(job: str, remote: bool, as_json: bool, backend: str | None, context: str | None, namespace: str | None,
           sets: tuple[str, ...]) -> None:
    """Check a job against its cluster and storage before submitting; exit 1 if any check fails."""
    import logging

    from . import api

    # s3fs/aiohttp report a dropped connection again as "Task exception was never retrieved" with a
    # traceback when the loop is collected; the output check already shows it as one row.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    checks = api.doctor(job, list(_sets(sets, backend, namespace)), remote=remote, context=context)
    if as_json:
        click.echo(json.dumps([c.to_dict() for c in checks], indent=1))
    else:
        _report(checks)
    sys.exit(1 if any(c.status == "fail" for c in checks) else 0)


def _report(checks) -> None:
    """The doctor's report: check / status / result, each fix on a line of its own under its row."""
    from .ui.tables import table

    colours = {"ok": {"fg": "green"}, "warn": {"fg": "yellow"}, "fail": {"fg": "red", "bold": True},
               "skip": {"dim": True}}
    tty = sys.stdout.isatty()

    def style(col: int, cell: str) -> str:
        return click.style(cell, **colours.get(cell.strip(), {})) if tty and col == 1 else cell

    rows = [[c.name, c.status, c.result] for c in checks]
    details = [[f"fix: {c.fix}" if c.fix else ""] for c in checks]
    click.echo(table(["CHECK", "", "RESULT"], rows, details=details, style=style), nl=False)


@cli.command()
@click.argument("run_or_uri", metavar="[RUN_OR_URI]", required=False, shell_complete=_complete_run_or_uri)
@click.option("--prompt", "-p", required=True, help="What to ask, written as in the training data.")
@click.option("--adapter", "-a", "adapters", multiple=True, metavar="[NAME=]REF",
              help="Compare adapters instead (repeatable): each answers on one base loaded once. REF: a run id, "
                   "RUN/path inside its output, a path or a URI.")
@click.option("--base", default=None, metavar="REF", help="Load the adapter(s) on this model folder instead of "
              "the base their record names (checked: see --force).")
@click.option("--force", is_flag=True, help="Load an adapter on a base it was not trained on (skips the lineage check).")
@click.option("--input", "input_text", default="", help="data.format instruction: the record's input field.")
@click.option("--max-new-tokens", "-n", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 picks the likeliest token.")
def sample(run_or_uri: str | None, prompt: str, adapters: tuple[str, ...], base: str | None, force: bool,
           input_text: str, max_new_tokens: int, temperature: float) -> None:
    """Try a trained model: complete PROMPT with a run's adapter or final model, or compare adapters (needs
    ftcluster[train])."""
    import subprocess

    from . import api

    argv = api.sample_command(run_or_uri, prompt, input_text, max_new_tokens, temperature, list(adapters), base,
                              force)
    sys.exit(subprocess.run(argv).returncode)  # the core never imports torch: the train layer runs apart


@cli.command()
@click.argument("targets", metavar="RUN_OR_URI...", nargs=-1, required=True, shell_complete=_complete_run_or_uri)
@click.option("--output", "-o", type=click.Path(dir_okay=False), default="ftcluster-plot.png", show_default=True,
              help="The picture to write (PNG; another suffix matplotlib knows, e.g. .svg or .pdf, picks that format).")
def plot(targets: tuple[str, ...], output: str) -> None:
    """Compare runs in one picture: loss and eval loss against tokens seen, forgetting (general eval before and
    after), tokens/s with checkpoint stalls and memory per step against the planner's figures. RUN_OR_URI: a run id
    (a job array's variants and a pipeline's stages are under it), RUN/path, or an output URI or path."""
    from .ui import plot as P

    series = P.collect(list(targets))
    click.echo(P.table(series))
    P.draw(series, output)
    click.echo(f"wrote {output} ({len(series)} run(s))")


@cli.command()
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None, help="Write to a file.")
@click.option("--pipeline", is_flag=True, help="The schema of a pipeline file instead of a job spec.")
def schema(output: str | None, pipeline: bool) -> None:
    """Print the JSON Schema of the job spec (for editors)."""
    from pathlib import Path

    from . import api

    text = json.dumps(api.schema(pipeline), indent=2, sort_keys=True) + "\n"
    if output:
        api.write_files(str(Path(output).parent or "."), {Path(output).name: text})
    else:
        click.echo(text, nl=False)


from .ui.artifacts import adapters as _adapters_group  # noqa: E402 - commands of their own module
from .ui.artifacts import merge as _merge_command  # noqa: E402

cli.add_command(_adapters_group)
cli.add_command(_merge_command)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="ftcluster")


if __name__ == "__main__":
    main()
