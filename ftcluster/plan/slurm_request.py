"""The spec as Slurm options: the one mapping from ``resources`` and ``slurm:`` to sbatch and
srun options and setup lines.

Three places ask Slurm for a job: the rendered sbatch script (:mod:`ftcluster.render.slurm`,
the reference), :mod:`ftcluster.backends.slurm.submitit`, and the doctor's one-node probe
(:mod:`ftcluster.backends.slurm.preflight`). They all start from :func:`slurm_request`, so a
partition, constraint, module or mount means the same in each;
:func:`ftcluster.plan.launch.compile_plan` calls it once and keeps it as ``plan.slurm``, which the
renderer and the backends read. Each formats the options its
own way (an ``#SBATCH`` line, a submitit parameter, an ``srun`` argument). Pure: reads the
spec only; values are plain text, quoting is the caller's job.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from .facts import array_value, slurm_output


@dataclass(frozen=True)
class SlurmOption:
    """One long option: ``--name=value``, or ``--name`` when ``value`` is None."""

    name: str  # without the leading dashes, e.g. "partition"
    value: str | None
    field: str  # the spec field it comes from, for error messages


@dataclass(frozen=True)
class SlurmRequest:
    """What a job asks Slurm for."""

    sbatch: tuple[SlurmOption, ...]  # the job's allocation and its one-torchrun-per-node layout
    srun: tuple[SlurmOption, ...]  # the training step's own options (container)
    modules: tuple[str, ...]  # `module load <module>` lines, each module shell-quoted
    setup: tuple[str, ...]  # slurm.setup, verbatim (the user's shell)

    @property
    def setup_lines(self) -> list[str]:
        """Shell lines run before the job starts: module loads, then slurm.setup."""
        return [*self.modules, *self.setup]

    def sbatch_value(self, name: str, default: Any = None) -> Any:
        """The value of sbatch option ``name`` (None for a flag), or ``default`` if absent."""
        return next((o.value for o in self.sbatch if o.name == name), default)

    def srun_args(self) -> list[str]:
        """The srun options as argv words (``--container-image=...``), unquoted."""
        return [f"--{o.name}" if o.value is None else f"--{o.name}={o.value}" for o in self.srun]


# The sbatch options that place a job (which nodes, whose allocation); a probe of the nodes the job
# would get needs exactly these (the doctor's srun).
PLACEMENT = ("partition", "account", "qos", "constraint", "reservation")


def slurm_request(spec: Any) -> SlurmRequest:
    """The Slurm options of ``spec`` (validated, so no value holds a line break)."""
    res, sl = spec.resources, spec.slurm

    def opt(field: str, name: str, value: Any = None) -> SlurmOption:
        return SlurmOption(name, None if value is None else str(value), field)

    sbatch = [
        opt("name", "job-name", spec.name),
        # MIN-MAX: Slurm starts (and restarts a requeued job) with as many as it can give, at least MIN.
        # Not with --ntasks-per-node: that makes Slurm allocate MIN nodes even when MAX are idle (seen on
        # 22.05); without it a job gets one task per node by default, and srun asks for one per node.
        *([opt("resources.nodes", "nodes", f"{res.min_nodes}-{res.nodes}")]
          if res.min_nodes is not None and res.min_nodes < res.nodes else
          [opt("resources.nodes", "nodes", res.nodes),
           opt("resources.nodes", "ntasks-per-node", 1)]),  # one torchrun per node starts every rank of it
        opt("slurm.signal_seconds", "signal", f"B:USR2@{sl.signal_seconds}"),
        opt("slurm.output", "open-mode", "append"),  # a requeued job appends to the same log
        opt("slurm.output", "output", slurm_output(sl.output, bool(spec.variants))),
    ]
    if res.gpus_per_node:
        if res.gpu_type:  # a typed request is a gres; --gpus-per-node has no type
            sbatch.append(opt("resources.gpu_type", "gres", f"gpu:{res.gpu_type}:{res.gpus_per_node}"))
        else:
            sbatch.append(opt("resources.gpus_per_node", "gpus-per-node", res.gpus_per_node))
    optional = [("resources.cpus_per_node", "cpus-per-task", res.cpus_per_node),
                ("resources.memory", "mem", res.memory), ("resources.time_limit", "time", res.time_limit),
                ("slurm.partition", "partition", sl.partition), ("slurm.account", "account", sl.account),
                ("slurm.qos", "qos", sl.qos), ("slurm.constraint", "constraint", sl.constraint),
                ("slurm.reservation", "reservation", sl.reservation), ("variants", "array", array_value(spec))]
    sbatch += [opt(f, name, v) for f, name, v in optional if v is not None]
    if sl.requeue:
        sbatch.append(opt("slurm.requeue", "requeue"))
    sbatch += [opt(f"slurm.extra_directives.{k}", k, v) for k, v in sl.extra_directives.items()]
    srun = []
    if sl.container_image:  # pyxis/enroot
        srun.append(opt("slurm.container_image", "container-image", sl.container_image))
    if sl.container_mounts:
        srun.append(opt("slurm.container_mounts", "container-mounts", ",".join(sl.container_mounts)))
    modules = tuple(f"module load {shlex.quote(m)}" for m in sl.modules)
    return SlurmRequest(tuple(sbatch), tuple(srun), modules, tuple(sl.setup))
