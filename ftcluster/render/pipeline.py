"""Pipelines rendered: every stage's launch files under ``<stage>/``, and for Slurm a script that
submits the stages in order (``submit-pipeline.sh``). Pure, like every renderer; loading and the
links between stages are :mod:`ftcluster.spec.pipeline`'s."""

from __future__ import annotations

import shlex

from ..spec.pipeline import Pipeline

SUBMIT_SCRIPT = "submit-pipeline.sh"


def pipeline_command(pipe: Pipeline, target: str) -> str:
    from . import command_for

    return command_for(pipe.source, pipe.overrides, target)


def render_pipeline(pipe: Pipeline, target: str | None = None) -> dict[str, str]:
    """Every stage's launch files under ``<stage>/``; for Slurm also ``submit-pipeline.sh``, which
    submits the stages with their dependencies (what ``ftcluster submit`` does, without ftcluster)."""
    from . import default_target, header_lines, render

    target = target or default_target(pipe.stages[0].spec)
    files: dict[str, str] = {}
    scripts: dict[str, str] = {}
    for stage in pipe.stages:
        header = header_lines(stage.spec, target, pipeline_command(pipe, target))
        rendered = render_prepare_stage(stage.spec, target, header) if stage.prepares else \
            render(stage.spec, target, header=header)
        for name, text in rendered.items():
            files[f"{stage.name}/{name}"] = text
            scripts[stage.name] = f"{stage.name}/{name}"
    if target == "slurm":
        files[SUBMIT_SCRIPT] = submit_script(pipe, scripts, header_lines(None, target, pipeline_command(pipe, target)))
    return files


def render_prepare_stage(spec, target: str, header: list[str]) -> dict[str, str]:
    """A ``run: prepare-data`` stage's job: a Slurm job array script or a Kubernetes indexed Job."""
    from ..plan.prepare import compile_prepare
    from . import render_prepare

    return render_prepare(compile_prepare(spec), target, header=header)


def dependency_args(after_ids: list[str]) -> list[str]:
    """sbatch options for a stage that waits for jobs ``after_ids`` (afterok covers every array task); a
    failed dependency cancels the stage instead of leaving it pending forever."""
    if not after_ids:
        return []
    return [f"--dependency=afterok:{':'.join(after_ids)}", "--kill-on-invalid-dep=yes"]


def submit_script(pipe: Pipeline, scripts: dict[str, str], header: list[str]) -> str:
    """A bash script that submits the rendered stages held, chained with afterok, then releases them;
    if any sbatch fails it cancels what it queued, so nothing is left half-submitted."""
    index = {s.name: i for i, s in enumerate(pipe.stages)}
    lines = ["#!/bin/bash", *(f"# {h}" for h in header),
             f"# Pipeline {pipe.name}: {' -> '.join(s.name for s in pipe.stages)}. Run from anywhere: bash {SUBMIT_SCRIPT}",
             "set -euo pipefail", 'cd "$(dirname "$0")"', "queued=()",
             "undo() { if [ ${#queued[@]} -gt 0 ]; then scancel \"${queued[@]}\" || true; fi; "
             "echo \"pipeline not submitted; cancelled: ${queued[*]:-nothing}\" >&2; }",
             "trap undo ERR"]
    for i, stage in enumerate(pipe.stages):
        deps = [f'"{d}"' if "$" in d else d for d in dependency_args([f"${{id{index[a]}}}" for a in stage.after])]
        argv = " ".join(["sbatch", "--parsable", "--hold", *deps, shlex.quote(scripts[stage.name])])
        lines += [f"id{i}=$({argv})", f"id{i}=${{id{i}%%;*}}", f'queued+=("$id{i}")']
    lines += ['scontrol release "${queued[@]}"', "trap - ERR"]
    lines.append("echo " + shlex.quote(f"submitted pipeline {pipe.name}:") + " "
                 + " ".join(f"{shlex.quote(s.name)}=\"$id{i}\"" for i, s in enumerate(pipe.stages)))
    return "\n".join(lines) + "\n"
