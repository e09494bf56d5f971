"""Compile a validated spec into a launch plan that every renderer shares.

The plan holds what is the same on every target: world size, the torchrun command
line (minus the target-specific rendezvous endpoint), the environment, the DeepSpeed
config generated from the spec (with a user file merged over it) and the payload the
training entry point reads. Pure: no clocks, no randomness, no cluster look-ups.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import Problem, SpecError
from ..spec.envbuild import build_env
from .payload import json_changes

TRAIN_MODULE = "ftcluster.train"
K8S_MASTER_PORT = 23456  # the Training Operator's default `pytorchjob-port`
PORT_BASE, PORT_SPAN = 20000, 40000  # job-id derived ports, as submitit does (REFERENCE.md)

def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``over`` onto a copy of ``base`` (``over`` wins)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _offload(device: str, nvme_path: str | None) -> dict[str, Any]:
    d: dict[str, Any] = {"device": device, "pin_memory": True}
    if device == "nvme":
        d["nvme_path"] = nvme_path
    return d


def deepspeed_config(spec: Any) -> dict[str, Any]:
    """The DeepSpeed JSON generated from a full fine-tune spec (before the user's file).

    The optimizer and LR schedule stay with the training loop (client optimizer), so the
    same loop serves ZeRO 0-3; a user file that adds `optimizer` takes precedence.
    """
    ds, tr = spec.deepspeed, spec.training
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": True,
        "reduce_bucket_size": ds.reduce_bucket_size,
    }
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(ds.offload_optimizer, ds.nvme_path)
    if ds.zero_stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": ds.reduce_bucket_size // 10,
            "stage3_param_persistence_threshold": 100_000,
            # Consolidated 16-bit weights on save: needed for HF checkpoints and to
            # avoid empty adapters (huggingface/peft #2892).
            "stage3_gather_16bit_weights_on_model_save": True,
        })
        if ds.offload_params != "none":
            zero["offload_param"] = _offload(ds.offload_params, ds.nvme_path)
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": tr.gradient_accumulation_steps,
        "train_batch_size": tr.micro_batch_size * tr.gradient_accumulation_steps * spec.world_size,
        "gradient_clipping": tr.max_grad_norm,
        "bf16": {"enabled": tr.precision == "bf16"},
        "fp16": {"enabled": tr.precision == "fp16"},
        "zero_optimization": zero,
        "steps_per_print": 1_000_000_000,  # the loop logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    return cfg


def _user_ds_file(spec: Any) -> dict[str, Any]:
    path = Path(spec.deepspeed.config_file)
    if not path.is_absolute() and spec._source_file and not spec._source_file.startswith("<"):
        path = Path(spec._source_file).parent / path
    src = spec._source_file or "<spec>"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError([Problem(src, None, None, "deepspeed.config_file", f"{path}: no such file; the path is relative to the spec file")]) from None
    except (OSError, ValueError) as exc:
        raise SpecError([Problem(src, None, None, "deepspeed.config_file", f"{path}: not a readable JSON file ({exc})")]) from None
    if not isinstance(data, dict):
        raise SpecError([Problem(src, None, None, "deepspeed.config_file", f"{path}: must hold a JSON object")])
    return data


def resolved_deepspeed_config(spec: Any) -> dict[str, Any] | None:
    """Generated DeepSpeed config with the user's file merged over it; None for LoRA."""
    if spec.method != "full":
        return None
    cfg = deepspeed_config(spec)
    if spec.deepspeed.config_file:
        cfg = deep_merge(cfg, _user_ds_file(spec))
    return cfg


def spec_hash(spec: Any) -> str:
    """A short stable hash of the resolved spec (recorded in run folders and labels)."""
    blob = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def slurm_output(pattern: str, array: bool) -> str:
    """The sbatch ``--output`` pattern: for a job array each task gets its own log (``%j`` becomes
    ``%A_%a``, array id and task index; a pattern without ``%j`` gets ``_%a`` before its extension)."""
    if not array or "%a" in pattern:
        return pattern
    if "%j" in pattern:
        return pattern.replace("%j", "%A_%a")
    root, dot, ext = pattern.rpartition(".")
    return f"{root}_%a.{ext}" if dot and root and "/" not in ext else f"{pattern}_%a"


def derived_port(job_id: str | int) -> int:
    """A rendezvous port derived from a job id, so two jobs on one node do not collide."""
    try:
        n = int(job_id)
    except (TypeError, ValueError):
        n = int(hashlib.sha256(str(job_id).encode()).hexdigest()[:8], 16)
    return PORT_BASE + n % PORT_SPAN


@dataclass(frozen=True)
class LaunchPlan:
    """Everything a renderer needs, computed once from the spec."""

    spec: Any
    nnodes: int
    nproc_per_node: int
    env: dict[str, str]
    deepspeed: dict[str, Any] | None
    payload: dict[str, Any]
    hash: str
    version: str = __version__
    extra: dict[str, Any] = field(default_factory=dict)
    variants: tuple[str, ...] = ()  # a job array: one task per variant, in this order
    array_parallelism: int | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def array(self) -> str | None:
        """The sbatch ``--array`` value (``0-2%2``) of a job with variants, else None."""
        if not self.variants:
            return None
        throttle = f"%{self.array_parallelism}" if self.array_parallelism else ""
        return f"0-{len(self.variants) - 1}{throttle}"

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    def payload_json(self) -> str:
        """The resolved spec + DeepSpeed config the entry point reads, as stable JSON."""
        return json.dumps(self.payload, sort_keys=True, indent=1)

    def torchrun_args(self, *, rdzv_endpoint: str | None, rdzv_id: str | None, python: str = "python3",
                      spec_arg: list[str] | None = None, launcher: str = "ftcluster.train.launch") -> list[str]:
        """The launch command as argv. With ``rdzv_endpoint`` None, torchrun takes the
        rendezvous from ``PET_*`` variables (set by the Kubeflow operators). ``launcher`` is the
        torchrun module: ``ftcluster.train.launch`` is torchrun that forwards SIGUSR2 and exits 143
        after a checkpoint-and-stop (the Slurm script uses it to decide on requeueing)."""
        argv = [python, "-m", launcher]
        if rdzv_endpoint is not None:
            argv += [
                f"--nnodes={self.nnodes}",
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


def _payload(spec: Any) -> dict[str, Any]:
    return {"ftcluster_version": __version__, "spec": spec.model_dump(mode="json"),
            "deepspeed": resolved_deepspeed_config(spec)}


def _array_payload(spec: Any, resolved: tuple[Any, ...]) -> dict[str, Any]:
    """The payload of a job array: the spec the variants share once, and per variant only what it
    changes (JSON Pointers). Compact on purpose: the payload travels in one environment variable
    (at most 128 KiB on Linux), so hundreds of variants fit. :func:`ftcluster.plan.payload.select_payload` rebuilds a
    variant's full payload from it.
    """
    base = _payload(spec)
    base["spec"].update(variants=[], array_parallelism=None)  # as in every resolved variant
    entries = []
    for v in resolved:
        full = _payload(v)
        changed, removed = json_changes(base["spec"], full["spec"])
        entry: dict[str, Any] = {"variant": v._variant, "set": changed}
        if removed:
            entry["unset"] = removed
        if full["deepspeed"] != base["deepspeed"]:
            entry["deepspeed"] = full["deepspeed"]
        entries.append(entry)
    return {"ftcluster_version": __version__, "base": {"spec": base["spec"], "deepspeed": base["deepspeed"]},
            "variants": entries}


def compile_plan(spec: Any, backend_env: dict[str, str] | None = None) -> LaunchPlan:
    """Compile a validated spec into a :class:`LaunchPlan`.

    A spec with ``variants`` compiles to one plan for a job array: its payload holds the base
    spec and what each resolved variant changes (``{"base": ..., "variants": [...]}``), and each
    task rebuilds its own payload with :func:`ftcluster.plan.payload.select_payload`.
    """
    from ..spec.variants import resolve_variants

    resolved = resolve_variants(spec)
    payload = _array_payload(spec, resolved) if resolved else _payload(spec)
    return LaunchPlan(
        spec=spec,
        nnodes=spec.resources.nodes,
        nproc_per_node=spec.resources.nproc_per_node,
        env=build_env(spec, backend_env),
        deepspeed=resolved_deepspeed_config(spec),
        payload=payload,
        hash=spec_hash(spec),
        variants=tuple(v._variant for v in resolved),
        array_parallelism=spec.array_parallelism if resolved else None,
    )
