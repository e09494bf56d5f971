"""Which of the runtime's optional speed-ups switch on: the one place that decides (torch-free).

The training runtime (:mod:`ftcluster.train.speedups`, :mod:`ftcluster.train.varlen`) asks these
predicates with what it sees (the device, the loaded model's config, ``os.environ``); the launch
plan asks them with what the spec says (GPUs requested, the plan's environment) and keeps the
answer as :class:`Speedups` (``compile_plan(spec).speedups``); the planner models what the plan
decided. What only the runtime can know (liger-kernel importable, the FlashAttention op in this
torch, the model's dtype and head size, whether a ZeRO-3 model fits gathered) stays a check of the
runtime's on top of these decisions.

Switches (environment variables, ``0``/``off``/``false``/``no`` turn one off; unset is auto):

* ``FTCLUSTER_FUSED_CE`` - Liger's fused linear cross-entropy, on a GPU, for the model types of
  :data:`FUSED_CE_MODEL_TYPES`; its RoPE/SwiGLU/RMSNorm kernels come with it unless
  ``training.compile`` (inductor fuses those);
* ``FTCLUSTER_VARLEN`` - variable-length attention for packed batches, on a GPU, for an SDPA model;
* ``FTCLUSTER_ZERO3_KEEP`` - ZeRO-3 keeps gathered weights from forward to backward when the
  16-bit model plus this rank's shards fit in :data:`KEEP_FRACTION` of the GPU;
* ``training.compile`` (the spec, not the environment; ``auto`` by default) - each decoder layer
  compiled: on a GPU, for the model types of :data:`COMPILE_MODEL_TYPES`, not with DeepSpeed
  ZeRO-3 (:func:`compile_on`);
* ``FTCLUSTER_NCCL_PROTO`` - the NCCL protocol for multi-GPU runs (default ``Simple``; ``auto``
  leaves NCCL's choice; an ``NCCL_PROTO`` already set wins).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

FUSED_CE_MODEL_TYPES = ("llama",)  # Liger's forward for these accepts shift_labels and num_items_in_batch
# training.compile: auto compiles these model types' decoder layers (ftcluster's fidelity check and
# speed runs cover Llama; Mistral and Qwen2/3 share its decoder layer's structure); `true` compiles any.
COMPILE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
KEEP_FRACTION = 0.6  # of GPU memory that the gathered model plus this rank's ZeRO shards may take
OFF = ("0", "off", "false", "no")
FUSED_CE, VARLEN, ZERO3_KEEP, NCCL_PROTO = "FTCLUSTER_FUSED_CE", "FTCLUSTER_VARLEN", "FTCLUSTER_ZERO3_KEEP", "FTCLUSTER_NCCL_PROTO"


def switched_off(name: str, environ: Mapping[str, str]) -> bool:
    """The switch ``name`` says 0/off/false/no in ``environ`` (unset: auto)."""
    return str(environ.get(name, "auto")).strip().lower() in OFF


def fused_ce_on(gpu: bool, model_type: str | None, environ: Mapping[str, str]) -> bool:
    """Liger's fused linear cross-entropy: on a GPU, for a Llama-family model, unless switched off."""
    return gpu and model_type in FUSED_CE_MODEL_TYPES and not switched_off(FUSED_CE, environ)


def compile_on(gpu: bool, setting: bool | str, *, zero3: bool, model_type: str | None = None) -> bool:
    """``training.compile`` as the runtime applies it. ``true``: compiled (a spec with ZeRO-3 is refused
    on load; a DeepSpeed config_file that sets stage 3 runs uncompiled); ``false``: never; ``auto``:
    on a GPU (on a CPU compiling costs more than it gains), not with ZeRO-3, for a model type of
    :data:`COMPILE_MODEL_TYPES` (``model_type`` None: not known yet, as at plan time for a model
    read from a path or hub: assumed one)."""
    if setting is True:
        return not zero3
    if setting is False or setting != "auto":
        return False
    return gpu and not zero3 and (model_type is None or model_type in COMPILE_MODEL_TYPES)


def liger_kernels_on(compile: bool) -> bool:
    """Liger's RoPE/SwiGLU/RMSNorm kernels with the fused loss: not with compiled layers (inductor fuses those)."""
    return not compile


def varlen_on(gpu: bool, attn_implementation: str | None, environ: Mapping[str, str]) -> bool:
    """Variable-length attention: on a GPU for a model computing attention with SDPA, unless switched off."""
    return gpu and attn_implementation == "sdpa" and not switched_off(VARLEN, environ)


def zero3_keep_on(gpu: bool, environ: Mapping[str, str]) -> bool:
    """Whether ZeRO-3 may keep gathered weights (it then does when :func:`zero3_keep_fits`)."""
    return gpu and not switched_off(ZERO3_KEEP, environ)


def zero3_keep_fits(n_params: int, world_size: int, gpu_bytes: int) -> bool:
    """The whole 16-bit model while gathered (2 bytes x N) plus this rank's shards of 16-bit weights,
    16-bit gradients and fp32 Adam state (16 bytes x N / world) fit in :data:`KEEP_FRACTION` of the GPU."""
    return 2 * n_params + 16 * n_params / max(world_size, 1) <= KEEP_FRACTION * gpu_bytes


def nccl_proto(gpu: bool, world_size: int, environ: Mapping[str, str]) -> str | None:
    """The ``NCCL_PROTO`` to set before the process group starts, or None to leave NCCL alone."""
    choice = str(environ.get(NCCL_PROTO, "Simple")).strip()
    if gpu and world_size > 1 and choice.lower() != "auto" and "NCCL_PROTO" not in environ:
        return choice
    return None


@dataclass(frozen=True)
class Speedups:
    """The speed-ups a job's runtime switches on, as decided from its spec (:func:`decide`).

    ``fused_ce`` holds for a model of :data:`FUSED_CE_MODEL_TYPES`: the spec does not say the model
    type (config.json does), so ask :meth:`fused_ce_for` with it."""

    fused_ce: bool  # the fused linear cross-entropy, for a Llama-family model (and liger-kernel installed)
    liger_kernels: bool  # Liger's RoPE/SwiGLU/RMSNorm kernels with it
    varlen: bool  # variable-length attention (FlashAttention-2's varlen kernel) for packed batches
    zero3_keep: bool  # ZeRO-3 keeps gathered weights when they fit; off too when the user's DeepSpeed file is given
    compile: bool  # training.compile as decided for this spec's GPUs (compile_on; the model type unknown)
    nccl_proto: str | None  # NCCL_PROTO the runtime sets, or None

    def fused_ce_for(self, model_type: str | None) -> bool:
        return self.fused_ce and model_type in FUSED_CE_MODEL_TYPES

    def compile_for(self, model_type: str | None, setting: bool | str = "auto") -> bool:
        """Compiled layers for a model of ``model_type`` (``auto`` compiles only the tested families)."""
        return self.compile and (setting is True or model_type is None or model_type in COMPILE_MODEL_TYPES)

    def to_dict(self) -> dict[str, Any]:
        return {"fused_ce": self.fused_ce, "liger_kernels": self.liger_kernels, "varlen": self.varlen,
                "zero3_keep": self.zero3_keep, "compile": self.compile, "nccl_proto": self.nccl_proto}


def spec_environ(spec: Any) -> dict[str, str]:
    """The switches the spec sets for its processes: ``env``, with its backend's ``env`` section over it
    (what the launch files export; ``compile_plan`` passes the plan's environment instead)."""
    section = getattr(spec, str(getattr(spec, "backend", "")), None)
    return {**(getattr(spec, "env", None) or {}), **(getattr(section, "env", None) or {})}


def decide(spec: Any, environ: Mapping[str, str] | None = None) -> Speedups:
    """The speed-ups of ``spec``: on its GPUs (``resources.gpus_per_node``), with ``environ`` (the
    launch plan's environment; default :func:`spec_environ`) as the processes' environment.
    ``compile_plan`` calls it once; read ``plan.speedups``."""
    env = spec_environ(spec) if environ is None else environ
    gpu = spec.resources.gpus_per_node > 0
    ds = getattr(spec, "deepspeed", None)
    # FSDP2 keeps or frees gathered parameters by fsdp.reshard_after_forward itself: DeepSpeed's keep
    # does not apply (and the planner, which models an fsdp job as ZeRO-3, must not count it).
    fsdp = getattr(spec, "engine", None) == "fsdp"
    zero3 = not fsdp and ds is not None and getattr(spec, "method", None) == "full" and ds.zero_stage == 3
    compile = compile_on(gpu, getattr(spec.training, "compile", False), zero3=zero3)
    return Speedups(
        fused_ce=fused_ce_on(gpu, FUSED_CE_MODEL_TYPES[0], env),
        liger_kernels=liger_kernels_on(compile),
        varlen=varlen_on(gpu, spec.model.attn_implementation, env),
        zero3_keep=zero3_keep_on(gpu, env) and not fsdp and not (ds is not None and ds.config_file),
        compile=compile,
        nccl_proto=nccl_proto(gpu, spec.world_size, env),
    )
