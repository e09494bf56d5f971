"""Small facts of a spec that several parts of the plan derive: each has one function here.

* :func:`global_batch` - sequences per optimizer step (the DeepSpeed config's
  ``train_batch_size``, the planner's workload, the launch plan);
* :func:`array_value` - the sbatch ``--array`` value of a job with variants;
* :func:`slurm_output` - the sbatch ``--output`` pattern (per-task logs for a job array).

:func:`ftcluster.plan.launch.compile_plan` computes each of them once and keeps it in the
:class:`~ftcluster.plan.launch.LaunchPlan`; the renderers and the planner read it there. Pure: reads
the spec only. Its own module, below :mod:`.launch`, :mod:`.slurm_request` and :mod:`.deepspeed`,
so that those can all use it without importing one another.
"""

from __future__ import annotations

from typing import Any


def global_batch(spec: Any) -> int:
    """Sequences per optimizer step: micro-batch x gradient accumulation x world size."""
    tr = spec.training
    return tr.micro_batch_size * tr.gradient_accumulation_steps * spec.world_size


def array_value(spec: Any) -> str | None:
    """The sbatch ``--array`` value (``0-2%2``) of a job with variants, else None."""
    if not spec.variants:
        return None
    throttle = f"%{spec.array_parallelism}" if spec.array_parallelism else ""
    return f"0-{len(spec.variants) - 1}{throttle}"


def slurm_output(pattern: str, array: bool) -> str:
    """The sbatch ``--output`` pattern: for a job array each task gets its own log (``%j`` becomes
    ``%A_%a``, array id and task index; a pattern without ``%j`` gets ``_%a`` before its extension)."""
    if not array or "%a" in pattern:
        return pattern
    if "%j" in pattern:
        return pattern.replace("%j", "%A_%a")
    root, dot, ext = pattern.rpartition(".")
    return f"{root}_%a.{ext}" if dot and root and "/" not in ext else f"{pattern}_%a"
