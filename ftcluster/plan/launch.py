"""Compile a validated spec into a launch plan that every renderer shares.

The plan holds what is the same on every target: world size, the torchrun command
line (minus the target-specific rendezvous endpoint), the environment, the DeepSpeed
config generated from the spec (with a user file merged over it) and the payload the
training entry point reads. Pure: no clocks, no randomness, no cluster look-ups.

It is the one currency: :func:`compile_plan` computes each fact once - the Slurm request
(:mod:`.slurm_request`), the engine's recipe and contribution (:mod:`.engines`; DeepSpeed: the
resolved config, once per distinct spec), the global batch (:mod:`.facts`), the artifacts and the
output layout, the speed-ups the runtime switches on (:mod:`.speedups`) - and the planner, the
renderers and the backends read them from the plan instead of deriving them again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from .. import __version__
from ..spec.envbuild import build_env
from ..storage.layout import OutputLayout
from . import speedups as speedup_rules
from .engines import ENGINES, EngineRecipe, engine_for
from .facts import global_batch
from .payload import json_changes
from .slurm_request import SlurmRequest, slurm_request
from .speedups import Speedups

TRAIN_MODULE = "ftcluster.train"
K8S_MASTER_PORT = 23456  # the Training Operator's default `pytorchjob-port`
PORT_BASE, PORT_SPAN = 20000, 40000  # job-id derived ports, as submitit does (REFERENCE.md)

def spec_hash(spec: Any) -> str:
    """A short stable hash of the resolved spec (recorded in run folders and labels)."""
    blob = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def derived_port(job_id: str | int) -> int:
    """A rendezvous port derived from a job id, so two jobs on one node do not collide."""
    try:
        n = int(job_id)
    except (TypeError, ValueError):
        n = int(hashlib.sha256(str(job_id).encode()).hexdigest()[:8], 16)
    return PORT_BASE + n % PORT_SPAN


@dataclass(frozen=True)
class LaunchPlan:
    """Everything a renderer, a backend or the planner needs, computed once from the spec."""

    spec: Any
    nnodes: int
    nproc_per_node: int
    env: dict[str, str]
    deepspeed: dict[str, Any] | None  # the engine's resolved DeepSpeed config (None for LoRA)
    payload: dict[str, Any]
    hash: str
    slurm: SlurmRequest  # the job's Slurm request (sbatch/srun options, setup lines)
    global_batch: int  # sequences per optimizer step (micro-batch x accumulation x world)
    engine: str  # the training engine's recipe name (ftcluster.plan.engines.ENGINES)
    artifacts: tuple[str, ...]  # what the run publishes at its end, in commit order: the last means done
    output: OutputLayout = field(compare=False)  # the run's folders under output.uri
    speedups: Speedups  # the optional speed-ups the runtime switches on
    array: str | None = None  # the sbatch --array value (0-2%2) of a job with variants, else None
    version: str = __version__
    extra: dict[str, Any] = field(default_factory=dict)  # the engine's contribution (EngineRecipe.plan_extra)
    variants: tuple[str, ...] = ()  # a job array: one task per variant, in this order
    array_parallelism: int | None = None
    resolved: tuple[Any, ...] = field(default=(), repr=False)  # the resolved variant specs, in order
    variant_deepspeed: tuple[dict[str, Any] | None, ...] = field(default=(), repr=False)  # their DeepSpeed configs
    backend_env: dict[str, str] | None = field(default=None, repr=False)  # what compile_plan was given (in env already)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @property
    def min_nodes(self) -> int | None:
        """The fewest nodes the job may run on (``resources.min_nodes``) when below :attr:`nnodes`, else None:
        the node count is then known only when the job starts (``NNODES`` in :meth:`torchrun_args`)."""
        m = self.spec.resources.min_nodes
        return m if m is not None and m < self.nnodes else None

    @property
    def recipe(self) -> EngineRecipe:
        """The training engine's recipe."""
        return ENGINES[self.engine]

    @property
    def done_artifact(self) -> str:
        """The artifact committed last at the end of a run: its commit means the run is done."""
        return self.artifacts[-1]

    @property
    def done_uri(self) -> str:
        """Where :attr:`done_artifact` is published (its ``manifest.json`` commits it)."""
        return self.output.artifact(self.done_artifact)  # pyright: ignore[reportArgumentType]  # an Artifact name

    @property
    def output_uri(self) -> str:
        """``output.uri`` as the spec writes it (``output`` is its layout): where the run publishes (a job
        array's variants under ``<uri>/<variant>``)."""
        return self.spec.output.uri

    @property
    def log_pattern(self) -> str:
        """The job's log file pattern as sbatch gets it (``--output``; per-task logs for a job array)."""
        return str(self.slurm.sbatch_value("output"))

    @cached_property
    def variant_plans(self) -> tuple[LaunchPlan, ...]:
        """One plan per variant (Kubernetes has no job arrays: one job each), built from what this
        compile resolved: a variant's DeepSpeed config is not resolved again. The environment is
        this plan's (the variants check refuses a variant that changes it)."""
        return tuple(_compile_one(v, self.env, ds, backend_env=self.backend_env)
                     for v, ds in zip(self.resolved, self.variant_deepspeed, strict=True))

    def payload_json(self) -> str:
        """The resolved spec + DeepSpeed config the entry point reads, as stable JSON."""
        return json.dumps(self.payload, sort_keys=True, indent=1)

    def torchrun_args(self, *, rdzv_endpoint: str | None, rdzv_id: str | None, python: str = "python3",
                      spec_arg: list[str] | None = None, launcher: str = "ftcluster.train.launch") -> list[str]:
        """The launch command as argv. With ``rdzv_endpoint`` None, torchrun takes the
        rendezvous from ``PET_*`` variables (set by the Kubeflow operators). ``launcher`` is the
        torchrun module: ``ftcluster.train.launch`` is torchrun that forwards SIGUSR2 and exits 143
        after a checkpoint-and-stop (the Slurm script uses it to decide on requeueing). With
        :attr:`min_nodes`, ``--nnodes`` is the placeholder ``@NNODES@``: the renderer puts the number of
        nodes the job got there."""
        argv = [python, "-m", launcher]
        if rdzv_endpoint is not None:
            argv += [
                f"--nnodes={'@NNODES@' if self.min_nodes else self.nnodes}",
                f"--nproc-per-node={self.nproc_per_node}",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint={rdzv_endpoint}",
                f"--rdzv-id={rdzv_id}",
            ]
        else:
            argv += [f"--nproc-per-node={self.nproc_per_node}"]
        argv += ["--max-restarts=0", "-m", TRAIN_MODULE]
        argv += spec_arg or []
        return argv


def _payload(spec: Any, deepspeed: dict[str, Any] | None) -> dict[str, Any]:
    return {"ftcluster_version": __version__, "spec": spec.model_dump(mode="json"), "deepspeed": deepspeed}


def _array_payload(spec: Any, deepspeed: dict[str, Any] | None, resolved: tuple[Any, ...],
                   variant_deepspeed: tuple[dict[str, Any] | None, ...]) -> dict[str, Any]:
    """The payload of a job array: the spec the variants share once, and per variant only what it
    changes (JSON Pointers). Compact on purpose: the payload travels in one environment variable
    (at most 128 KiB on Linux), so hundreds of variants fit. :func:`ftcluster.plan.payload.select_payload` rebuilds a
    variant's full payload from it.
    """
    base = _payload(spec, deepspeed)
    base["spec"].update(variants=[], array_parallelism=None)  # as in every resolved variant
    entries = []
    for v, ds in zip(resolved, variant_deepspeed, strict=True):
        full = _payload(v, ds)
        changed, removed = json_changes(base["spec"], full["spec"])
        entry: dict[str, Any] = {"variant": v._variant, "set": changed}
        if removed:
            entry["unset"] = removed
        if full["deepspeed"] != base["deepspeed"]:
            entry["deepspeed"] = full["deepspeed"]
        entries.append(entry)
    return {"ftcluster_version": __version__, "base": {"spec": base["spec"], "deepspeed": base["deepspeed"]},
            "variants": entries}


def _engine_extra(spec: Any) -> tuple[EngineRecipe, dict[str, Any]]:
    """The spec's engine and what it adds to the plan: asked once per distinct spec."""
    recipe = engine_for(spec)
    return recipe, recipe.plan_extra(spec)


def processes_env(spec: Any, env: dict[str, str], backend_env: dict[str, str] | None) -> dict[str, str]:
    """The environment the training processes will see, as far as the spec says: the plan's ``env``,
    and when no backend env was given, the spec's own backend's ``env`` section over it (the sbatch
    script exports ``slurm.env``, the pod sets ``kubernetes.env``, the local backend ``local.env``).
    The speed-up decisions read it."""
    return env if backend_env is not None else {**env, **speedup_rules.spec_environ(spec)}


def _compile_one(spec: Any, env: dict[str, str], deepspeed: dict[str, Any] | None,
                 resolved: tuple[Any, ...] = (), variant_deepspeed: tuple[dict[str, Any] | None, ...] = (),
                 extra: dict[str, Any] | None = None, backend_env: dict[str, str] | None = None) -> LaunchPlan:
    recipe = engine_for(spec)
    request = slurm_request(spec)
    payload = _array_payload(spec, deepspeed, resolved, variant_deepspeed) if resolved else _payload(spec, deepspeed)
    return LaunchPlan(
        spec=spec,
        nnodes=spec.resources.nodes,
        nproc_per_node=spec.resources.nproc_per_node,
        env=env,
        deepspeed=deepspeed,
        payload=payload,
        hash=spec_hash(spec),
        slurm=request,
        global_batch=global_batch(spec),
        engine=recipe.name,
        artifacts=recipe.artifacts(spec),
        output=OutputLayout(spec.output.uri),
        speedups=speedup_rules.decide(spec, processes_env(spec, env, backend_env)),
        array=request.sbatch_value("array"),
        extra=dict(extra if extra is not None else {"deepspeed": deepspeed}),
        variants=tuple(v._variant for v in resolved),
        array_parallelism=spec.array_parallelism if resolved else None,
        resolved=resolved,
        variant_deepspeed=variant_deepspeed,
        backend_env=None if backend_env is None else dict(backend_env),
    )


def compile_plan(spec: Any, backend_env: dict[str, str] | None = None) -> LaunchPlan:
    """Compile a validated spec into a :class:`LaunchPlan`.

    A spec with ``variants`` compiles to one plan for a job array: its payload holds the base
    spec and what each resolved variant changes (``{"base": ..., "variants": [...]}``), and each
    task rebuilds its own payload with :func:`ftcluster.plan.payload.select_payload`;
    :attr:`LaunchPlan.variant_plans` are the variants' own plans (one Kubernetes job each).

    Each fact is computed once here: the Slurm request, the engine's contribution (the DeepSpeed
    config, resolved once for the spec and once for each variant), the global batch, the
    artifacts, the output layout and the speed-up decisions.
    """
    from ..spec.variants import resolve_variants

    resolved = tuple(resolve_variants(spec))
    _, extra = _engine_extra(spec)
    variant_ds = tuple(_engine_extra(v)[1].get("deepspeed") for v in resolved)
    return _compile_one(spec, build_env(spec, backend_env), extra.get("deepspeed"), resolved, variant_ds, extra,
                        backend_env)
