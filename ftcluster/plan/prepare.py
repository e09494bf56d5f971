"""The plan of a ``ftcluster prepare-data`` job on a cluster: ``data.prepare.tasks`` tasks (a Slurm job
array, a Kubernetes indexed Job), each one worker (``python -m ftcluster.train.prepare``) on one machine
with ``workers`` processes, owning source files ``task, task + tasks, ...``.

No final job: every task writes ``manifest.json`` when it finds every source file committed, so the
last task to finish writes it (they write the same bytes). Computed once here, read by the renderers
(:func:`ftcluster.render.slurm.render_prepare_slurm`, :func:`ftcluster.render.kube.prepare_job`) and the
backends, like :class:`~ftcluster.plan.launch.LaunchPlan` for training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from .. import __version__
from ..spec.envbuild import PAYLOAD_VAR, build_env
from .facts import slurm_output
from .launch import spec_hash
from .slurm_request import SlurmOption, SlurmRequest, slurm_request

PREPARE_MODULE = "ftcluster.train.prepare"
# Training-only sbatch options: the prepare script has no checkpoint to take on USR2 and nothing to requeue.
TRAINING_ONLY = ("signal", "requeue", "array", "gres", "gpus-per-node")


@dataclass(frozen=True)
class PreparePlan:
    spec: Any  # the job spec as the user wrote it (the payload carries it)
    job: Any  # the spec as the prepare job requests resources (:func:`job_spec`)
    name: str  # <name>-prepare
    tasks: int
    workers: int | None  # None: the worker uses the CPUs it is given
    env: dict[str, str]
    slurm: SlurmRequest
    payload: dict[str, Any]
    hash: str

    def payload_json(self) -> str:
        return json.dumps(self.payload, sort_keys=True, indent=1)

    def worker_args(self, python: str, task: str | None) -> list[str]:
        """The worker's command line; ``task`` is the task index as the scheduler names it (a placeholder the
        Slurm renderer turns into ``"${SLURM_ARRAY_TASK_ID}"``); None: the worker reads ``JOB_COMPLETION_INDEX``
        (a Kubernetes indexed Job sets it) or ``SLURM_ARRAY_TASK_ID`` itself."""
        argv = [python, "-m", PREPARE_MODULE, "--spec-env", PAYLOAD_VAR, *(["--task", task] if task else []),
                "--tasks", str(self.tasks)]
        return argv + (["--workers", str(self.workers)] if self.workers else [])

    @property
    def log_pattern(self) -> str:
        return str(self.slurm.sbatch_value("output"))


def job_spec(spec: Any, workers: int | None) -> Any:
    """``spec`` as the prepare job asks for resources: one node per task, no GPU, ``workers`` CPUs, its own
    name. Only the requests are derived from it; the workers read the spec itself."""
    res = spec.resources.model_copy(update={"nodes": 1, "gpus_per_node": 0, "gpu_type": None, "procs_per_node": None,
                                            "cpus_per_node": workers or spec.resources.cpus_per_node})
    return spec.model_copy(update={"name": f"{spec.name}-prepare", "resources": res, "variants": []})


def _slurm(job: Any, tasks: int) -> SlurmRequest:
    request = slurm_request(job)
    kept = [o for o in request.sbatch if o.name not in TRAINING_ONLY and o.name != "output"]
    kept += [SlurmOption("output", slurm_output(job.slurm.output, True), "slurm.output"),
             SlurmOption("array", f"0-{tasks - 1}", "data.prepare.tasks")]
    return replace(request, sbatch=tuple(kept))


def compile_prepare(spec: Any, workers: int | None = None) -> PreparePlan:
    """The prepare job of ``spec`` (which has ``data.prepare``); ``workers`` overrides data.prepare.workers."""
    p = spec.data.prepare
    workers = workers or p.workers
    job = job_spec(spec, workers)
    # One thread per tokenizing process: the processes are the parallelism.
    env = {**build_env(job), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    payload = {"ftcluster_version": __version__, "spec": spec.model_dump(mode="json")}
    return PreparePlan(spec=spec, job=job, name=job.name, tasks=p.tasks, workers=workers, env=dict(sorted(env.items())),
                       slurm=_slurm(job, p.tasks), payload=payload, hash=spec_hash(spec))
