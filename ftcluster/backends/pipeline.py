"""Submit a pipeline to Slurm as one unit, and follow it as one run.

Every stage is submitted held (``sbatch --hold``), waiting for the stages it depends on
(``--dependency=afterok:<ids>``, which for a job array means every task; with
``--kill-on-invalid-dep=yes`` Slurm cancels a stage whose dependency failed instead of
leaving it pending for ever); when all are queued they are released together. If any
sbatch (or the release) fails, the jobs already queued are cancelled and the run folder
removed: a pipeline is submitted whole or not at all.

The pipeline run folder holds ``pipeline.json`` and one ordinary Slurm run folder per
stage (``<run>/<stage>/``), so ``ftcluster status|logs|cancel <run>/<stage>`` work on a
single stage too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BackendError, FtclusterError
from .base import (
    TERMINAL,
    Backend,
    RunStatus,
    load_status,
    new_run_id,
    record_outputs,
    save_status,
    write_atomic,
)
from .slurm.array import aggregate, span
from .slurm.state import first_line

if TYPE_CHECKING:
    from ..preflight.checks import Check


@dataclass
class StageRequest:
    name: str
    after: tuple[str, ...]
    request: Any  # the stage's SubmitRequest


@dataclass
class PipelineRequest:
    """What ``submit`` would do for a pipeline: one sbatch per stage, in order."""

    name: str
    run_id: str
    run_dir: Path
    stages: list[StageRequest] = field(default_factory=list)
    backend: str = "pipeline"

    def describe(self) -> str:
        lines = [f"# pipeline: {self.name}", f"# run id: {self.run_id}", f"# run folder: {self.run_dir}",
                 "# every stage is submitted held, then all are released; if one sbatch fails, the others are "
                 "cancelled"]
        for st in self.stages:
            lines.append(f"\n===== stage {st.name} =====")
            lines.append(st.request.describe().rstrip("\n"))
        return "\n".join(lines) + "\n"


def _sbatch_args(after_ids: list[str]) -> list[str]:
    from ..render.pipeline import dependency_args

    return ["--hold", *dependency_args(after_ids)]


class PipelineBackend(Backend):
    """Submit, query, follow and cancel pipelines (stages on the Slurm backend)."""

    name = "pipeline"

    def __init__(self, root: Path | None = None, slurm: Any = None):
        super().__init__(root)
        self._slurm = slurm

    @property
    def slurm(self):
        if self._slurm is None:
            from .slurm.backend import SlurmBackend

            self._slurm = SlurmBackend(root=self.root)
        return self._slurm

    # -- submit -----------------------------------------------------------------
    def compile(self, spec: Any) -> Any:
        """A pipeline is its own plan: each stage's launch plan is compiled by the Slurm backend below."""
        return spec

    def submit_dryrun(self, pipe: Any, run_id: str | None = None) -> PipelineRequest:
        """Every stage's sbatch command and script (each from its stage's compiled plan), with no side effects."""
        from ..render import header_lines, render_plan
        from ..render.pipeline import pipeline_command

        if pipe.backend != "slurm":
            raise BackendError(
                f"{pipe.source}: pipelines are submitted to Slurm, and these stages use backend {pipe.backend}; "
                f"set backend: slurm (e.g. --set backend=slurm), or render the stages with "
                f"`ftcluster render {pipe.source} -o DIR` and run them in order yourself")
        run_id = run_id or new_run_id(pipe.name)
        run_dir = self.new_run_dir(pipe.stages[0].spec, run_id)
        req = PipelineRequest(pipe.name, run_id, run_dir)
        header = header_lines(None, "slurm", pipeline_command(pipe, "slurm"))
        for stage in pipe.stages:
            if stage.prepares:
                from ..plan.prepare import compile_prepare
                from ..render.pipeline import render_prepare_stage

                sreq = self.slurm.prepare_dryrun(compile_prepare(stage.spec), run_id=f"{run_id}/{stage.name}")
                sreq.run_dir = run_dir / stage.name
                script = sreq.meta["script"]
                sreq.files[script] = render_prepare_stage(stage.spec, "slurm", header)[script]
            else:
                plan = self.slurm.compile(stage.spec)
                sreq = record_outputs(self.slurm.submit_dryrun(plan, run_id=f"{run_id}/{stage.name}"), stage.spec)
                sreq.run_dir = run_dir / stage.name  # its own outputs.json: api.run_output(<run folder>/<stage>)
                script = sreq.meta["script"]
                sreq.files[script] = render_plan(plan, "slurm", header=header)[script]  # names the pipeline file
            sreq.meta["sbatch_args"] = _sbatch_args([f"<job id of {a}>" for a in stage.after])
            sbatch = ["sbatch", "--parsable", *sreq.meta["sbatch_args"]]
            login = sreq.meta["login"]
            sreq.argv = ["ssh", login, *sbatch] if login else [*sbatch, script]
            req.stages.append(StageRequest(stage.name, stage.after, sreq))
        return req

    def schedule(self, req: PipelineRequest) -> RunStatus:
        """Submit every stage, or none: on any failure, cancel what was queued and remove the run folder."""
        ids: dict[str, str] = {}
        current = req.stages[0].name
        try:
            with self.creating_run_folder(req):  # removed again if anything below fails
                for st in req.stages:
                    current = st.name
                    st.request.meta["sbatch_args"] = _sbatch_args([ids[a] for a in st.after])
                    job_id = self.slurm.schedule(st.request).job_id
                    assert job_id is not None  # SlurmBackend.schedule raises unless sbatch gave an id
                    ids[st.name] = job_id
                current = "release"
                for st in req.stages:
                    self._scontrol(st.request.meta["login"], ["release", ids[st.name]])
        except BaseException as exc:
            self._undo(req, ids)
            if not isinstance(exc, FtclusterError):
                raise
            undone = f"; cancelled the jobs already queued ({', '.join(ids.values())})" if ids else ""
            raise BackendError(f"pipeline {req.name} not submitted: stage {current}: {exc}{undone}") from None
        record = {"name": req.name, "stages": [{"name": st.name, "after": list(st.after), "job_id": ids[st.name],
                                                "run_dir": st.name} for st in req.stages]}
        write_atomic(req.run_dir / "pipeline.json", json.dumps(record, indent=1, sort_keys=True))
        status = RunStatus(req.run_id, "pipeline", req.name, "PENDING", str(req.run_dir),
                           job_id=",".join(ids[st.name] for st in req.stages), submitted_at=time.time(),
                           tasks=[{"name": st.name, "job_id": ids[st.name], "state": "PENDING", "message": ""}
                                  for st in req.stages])
        save_status(req.run_dir, status)
        return status

    def _scontrol(self, login: str | None, args: list[str]) -> None:
        proc = self.slurm.runner(login)(["scontrol", *args])
        if proc.returncode != 0:
            raise BackendError(f"scontrol {' '.join(args)} failed: {first_line(proc.stderr or proc.stdout)}")

    def _undo(self, req: PipelineRequest, ids: dict[str, str]) -> None:
        for st in reversed(req.stages):  # dependents first, so none of them starts meanwhile
            if st.name in ids:
                try:
                    self.slurm.runner(st.request.meta["login"])(["scancel", ids[st.name]])
                except FtclusterError:
                    pass

    # -- query ------------------------------------------------------------------
    def _stages(self, run_dir: Path) -> list[dict[str, Any]]:
        try:
            return json.loads((run_dir / "pipeline.json").read_text())["stages"]
        except (OSError, ValueError, KeyError) as exc:
            raise BackendError(f"{run_dir}/pipeline.json is missing or corrupt ({exc}); remove the run folder") from None

    def status(self, run_ref: str) -> RunStatus:
        """The pipeline's state from its stages': one row per stage, and per task of a stage's array."""
        run_dir = self.run_folder(run_ref)
        st = load_status(run_dir)
        if st.terminal:
            return st
        rows = []
        for stage in self._stages(run_dir):
            sst = self.slurm.status(str(run_dir / stage["run_dir"]))
            rows.append({"name": stage["name"], "job_id": sst.job_id, "state": sst.state,
                         "message": sst.message, "returncode": sst.returncode,
                         "started_at": sst.started_at, "ended_at": sst.ended_at})
            rows += [{**t, "name": f"{stage['name']}/{t['name']}"} for t in sst.tasks]
        st.tasks = rows
        stage_rows = [r for r in rows if "/" not in r["name"]]
        st.state, summary = aggregate(stage_rows)
        st.message = _pipeline_message(stage_rows, summary)
        st.started_at, st.ended_at = span(stage_rows, st.started_at)
        if st.terminal:
            st.ended_at = st.ended_at or time.time()
            st.returncode = next((r["returncode"] for r in stage_rows if r.get("returncode")), 0)
        save_status(run_dir, st)
        return st

    def logs(self, run_ref: str, follow: bool = False) -> Iterator[str]:
        """Each stage's log in order (a stage with variants: each task's), following each until it ends."""
        run_dir = self.run_folder(run_ref)
        for stage in self._stages(run_dir):
            yield f"===== stage {stage['name']} (job {stage['job_id']}) =====\n"
            yield from self.slurm.logs(str(run_dir / stage["run_dir"]), follow=follow)

    def cancel(self, run_ref: str) -> RunStatus:
        """Cancel every stage that has not ended, later stages first."""
        run_dir = self.run_folder(run_ref)
        st = self.status(str(run_dir))
        if st.terminal:
            return st
        for stage in reversed(self._stages(run_dir)):
            sdir = run_dir / stage["run_dir"]
            if not load_status(sdir).terminal:
                self.slurm.cancel(str(sdir))
        return st

    # -- checks -----------------------------------------------------------------
    def preflight(self, pipe: Any, remote: bool = False) -> list[Check]:
        """The Slurm checks of every stage, each row named ``<stage>: <check>``."""
        from ..preflight.checks import Check

        rows = []
        for stage in pipe.stages:
            rows += [Check(f"{stage.name}: {c.name}", c.status, c.result, c.fix)
                     for c in self.slurm.preflight(stage.spec, remote)]
        return rows


def _pipeline_message(stages: list[dict[str, Any]], summary: str) -> str:
    bad = next((r for r in stages if r["state"] in ("FAILED", "CANCELLED", "UNKNOWN")), None)
    if bad is not None:
        return f"stage {bad['name']} {bad['state']}" + (f": {bad['message']}" if bad["message"] else "")
    if all(r["state"] in TERMINAL for r in stages):
        return ""
    active = next((r for r in stages if r["state"] != "SUCCEEDED"), None)
    if active is None:
        return ""
    return f"stage {active['name']} {active['state'].lower()}" + (f" ({active['message']})" if active["message"] else "")
