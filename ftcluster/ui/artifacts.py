"""``ftcluster adapters list|show|check`` and ``ftcluster merge``: trained artifacts as things to keep,
compare, merge and serve (docs/adapters.md).

``list``, ``show`` and ``check`` read only the small records, adapter configs and safetensors headers
(torch-free, seconds on S3); ``merge`` runs the model code in a process of its own, like ``sample``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import click


@click.group()
def adapters() -> None:
    """List, inspect and check trained adapters and models (their lineage and metrics)."""


@adapters.command(name="list")
@click.argument("ref", metavar="RUN_OR_URI")
@click.option("--steps", is_flag=True, help="Also each checkpoint's adapter (adapters/step-N).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable: every entry with its whole record.")
def list_cmd(ref: str, steps: bool, as_json: bool) -> None:
    """Every adapter, merged and final model under a run's output or any prefix (a pipeline's, an array's, a
    bucket folder of many runs), with its base, rank, step, tokens, eval loss, forgetting and size."""
    from .. import api
    from ..artifacts.registry import scan, table_rows
    from .tables import table

    uri, options = api.artifact_source(ref)
    entries = scan(uri, options, steps=steps)
    if as_json:
        click.echo(json.dumps([e.row() for e in entries], indent=1, sort_keys=True, default=str))
        return
    if not entries:
        click.echo(f"no committed adapter or model under {uri}" + ("" if steps else " (--steps: checkpoints' too)"),
                   err=True)
        return
    headers, rows, legend = table_rows(entries)
    click.echo(table(headers, rows), nl=False)
    for line in legend:
        click.echo(line)


@adapters.command()
@click.argument("ref", metavar="RUN_OR_URI")
@click.option("--json", "as_json", is_flag=True, help="The record as it is stored.")
def show(ref: str, as_json: bool) -> None:
    """One artifact's record: its base and lineage, tokenizer, LoRA config, data, metrics. RUN_OR_URI: an
    artifact folder, a run's output (its adapter, else its newest model) or RUN/path inside it."""
    from .. import api
    from ..artifacts.registry import read_one, scan, show_lines
    from ..errors import FtclusterError

    uri, options = api.artifact_source(ref)
    try:
        entry = read_one(uri, options)
    except FtclusterError:
        found = [e for e in scan(uri, options) if e.kind in ("adapter", "merged", "final")]
        if len(found) != 1:
            raise
        entry = found[0]  # a run's output with one artifact: that one
    if as_json:
        click.echo(json.dumps(entry.record, indent=1, sort_keys=True, default=str))
        return
    for line in show_lines(entry):
        click.echo(line)


@adapters.command()
@click.argument("ref", metavar="RUN_OR_URI")
@click.option("--for", "engines", multiple=True, type=click.Choice(["vllm", "lorax"]), default=("vllm",),
              show_default=True, help="The serving engine (repeatable).")
@click.option("--max-lora-rank", type=int, default=None,
              help="vLLM: the server's --max-lora-rank, when known (a higher rank is then an error).")
def check(ref: str, engines: tuple[str, ...], max_lora_rank: int | None) -> None:
    """Whether an adapter loads in a serving engine as it is, and if not why and what to do (rules read from
    vLLM's and LoRAX's source; docs/adapters.md). RUN_OR_URI: an adapter folder, or a run's output (its
    adapter/, or every adapter under it). Exit 1 when one will not load."""
    from .. import api
    from ..artifacts.registry import read_one, scan
    from ..artifacts.serving import check_adapter_uri
    from ..errors import FtclusterError

    uri, options = api.artifact_source(ref)
    try:
        targets = [read_one(uri, options).uri]
    except FtclusterError:
        targets = [e.uri for e in scan(uri, options) if e.kind == "adapter"]
        if not targets:
            raise
    bad = False
    for target in targets:
        if len(targets) > 1:
            click.echo(f"{target}:")
        for engine in engines:
            verdict = check_adapter_uri(target, engine, storage_options=options, max_lora_rank=max_lora_rank)
            bad |= not verdict.loads
            for line in verdict.lines():
                click.echo(("  " if len(targets) > 1 else "") + line)
    sys.exit(1 if bad else 0)


@click.command()
@click.argument("ref", metavar="RUN_OR_URI")
@click.option("--output", "-o", required=True, metavar="URI", help="Where to write the merged model (any fsspec store).")
@click.option("--base", default=None, metavar="REF", help="The base model folder (default: the one the adapter's "
              "record names; checked against its fingerprint).")
@click.option("--force", is_flag=True, help="Merge into a base the adapter was not trained on (skips the lineage check).")
@click.option("--overwrite", is_flag=True, help="Replace a merged model already committed at --output.")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
              help="The merged weights' dtype (default: the base's).")
def merge(ref: str, output: str, base: str | None, force: bool, overwrite: bool, dtype: str | None) -> None:
    """Merge an adapter into its base tensor by tensor (memory: about one tensor) and commit the merged model to
    --output (needs ftcluster[train]).

    The output holds safetensors in the base's shard layout, the config, the adapter's tokenizer and the record;
    it is committed with its manifest last, so a reader never sees half a model."""
    from .. import api

    argv = api.merge_command(ref, output, base, force, overwrite, dtype)
    sys.exit(subprocess.run(argv).returncode)  # the core never imports torch: the train layer runs apart
