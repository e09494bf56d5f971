"""Optional speed-ups of the training step; each is off on CPU and falls back cleanly.

Why these three (docs/BENCHMARKS.md, "Why ZeRO-3 mb2 was slow", has the profile):

* **Fused linear + cross-entropy** (Liger-Kernel, an optional import): the loss is computed
  from the last hidden states in chunks, so the ``tokens x 128k`` logits (and their fp32
  copies and gradients, ~5 GB at 2 x 2048 tokens) never exist; Liger's RoPE, SwiGLU and
  RMSNorm kernels come with it. Llama-family models only (the loss keyword arguments are
  checked for that model's forward); without liger-kernel, on CPU, or with
  ``FTCLUSTER_FUSED_CE=0`` the plain logits path runs.
* **ZeRO-3 parameters kept between forward and backward**: by default stage 3 gathers every
  weight twice per step (forward, then again for recompute and backward). When the whole
  bf16 model plus this rank's shards fit in 60 % of the GPU, the generated config keeps
  gathered weights until backward (``stage3_max_live_parameters`` and
  ``stage3_max_reuse_distance`` = the parameter count), halving the gathers. Keys the user
  set in ``deepspeed.config_file`` win; ``FTCLUSTER_ZERO3_KEEP=0`` turns it off.
* **NCCL's Simple protocol**: for ZeRO's 20-100 MB gathers NCCL picked the LL protocol,
  which moved ~25 GB/s over NVLink; ``NCCL_PROTO=Simple`` is set unless the environment
  already sets NCCL_PROTO (``FTCLUSTER_NCCL_PROTO=auto`` leaves NCCL's choice).

Whether each switches on is decided in one torch-free place, :mod:`ftcluster.plan.speedups`, which
the launch plan and the planner ask too; this module asks it with what the process sees (device,
model config, ``os.environ``) and adds only what needs torch (liger-kernel importable, the
model's parameter count and the GPU's memory).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ..plan import speedups as decisions

log = logging.getLogger("ftcluster.train")


def nccl_defaults(use_cuda: bool, world_size: int) -> None:
    """Before the process group starts: NCCL's Simple protocol for multi-GPU runs (see above)."""
    proto = decisions.nccl_proto(use_cuda, world_size, os.environ)
    if proto is not None:
        os.environ["NCCL_PROTO"] = proto


class _OptionalBackendNoise(logging.Filter):
    """liger-kernel (0.8.5) warns, once per op and rank, that its optional CuTe-DSL backend cannot
    be imported ("... could not be imported: ImportError: cutedsl backend requires ..."), then
    uses its Triton kernels as always: an ImportError in every GPU job's log that asks for nothing.
    Only those records are dropped; any other backend failure still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (str(record.msg).startswith("Backend impl") and any("_cutedsl" in str(a) for a in args[:1]))


LIGER_REGISTRY_LOGGER = "liger_kernel.backends.registry"


def apply_fused_kernels(model: Any, device: Any, kernels: bool = True) -> bool:
    """Liger-Kernel on this model instance (before LoRA/DeepSpeed wrap it); True if applied.
    ``kernels=False`` (compiled layers, which inductor fuses) applies the fused loss only."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not decisions.fused_ce_on(device.type == "cuda", model_type, os.environ):
        return False
    vocab, out = getattr(model, "ftcluster_vocab", None), model.get_output_embeddings()
    if vocab is not None and out is not None and out.weight.shape[0] > vocab:
        # The fused loss never materialises logits, so the padding rows that round the matrix up to
        # a multiple of 64 (model.mask_padding_logits) would take part in its softmax: another loss.
        log.info("fused linear cross-entropy off: the output layer has %d padding rows above the vocabulary "
                 "(%d tokens) that only the plain loss masks", out.weight.shape[0] - vocab, vocab)
        return False
    noisy = logging.getLogger(LIGER_REGISTRY_LOGGER)
    if not any(isinstance(f, _OptionalBackendNoise) for f in noisy.filters):
        noisy.addFilter(_OptionalBackendNoise())
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        if os.environ.get("FTCLUSTER_FUSED_CE") == "1":
            log.warning("FTCLUSTER_FUSED_CE=1 but liger-kernel is not importable: using the plain loss")
        else:
            log.info("fused linear cross-entropy off: liger-kernel is not installed (pip install 'ftcluster[train,gpu]' "
                     "brings it; the planner assumes it: set FTCLUSTER_FUSED_CE=0 to match); using the plain loss")
        return False
    _apply_liger_kernel_to_instance(model=model, rope=kernels, swiglu=kernels, rms_norm=kernels, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
    log.info("Liger-Kernel: fused linear cross-entropy%s", ", RoPE, SwiGLU and RMSNorm kernels" if kernels else "")
    return True


def zero3_keep_settings(cfg: dict[str, Any], n_params: int, world_size: int, gpu_bytes: int) -> dict[str, int]:
    """The stage-3 keys that keep gathered weights until backward, or {} when they do not fit or are set.

    Static memory per GPU: the whole bf16 model while gathered (2 bytes x N) plus this rank's
    shards of bf16 weights, bf16 gradients and fp32 Adam state (16 bytes x N / world)."""
    zero = cfg.get("zero_optimization", {})
    if int(zero.get("stage", 0)) != 3 or zero.get("offload_param", {}).get("device", "none") != "none":
        return {}
    if "stage3_max_live_parameters" in zero or "stage3_max_reuse_distance" in zero:
        return {}
    if not decisions.zero3_keep_fits(n_params, world_size, gpu_bytes):
        return {}
    n = int(max(n_params, 1_000_000_000))
    return {"stage3_max_live_parameters": n, "stage3_max_reuse_distance": n}


def tune_ds_config(cfg: dict[str, Any], model: Any, device: Any, world_size: int) -> dict[str, Any]:
    """``cfg`` with the stage-3 keep settings merged in when they apply (GPU only)."""
    if not decisions.zero3_keep_on(device.type == "cuda", os.environ):
        return cfg
    import torch

    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    extra = zero3_keep_settings(cfg, n_params, world_size, torch.cuda.get_device_properties(device).total_memory)
    if extra:
        log.info("ZeRO-3: %s parameters fit gathered; keeping them from forward to backward (%s)",
                 f"{n_params:,}", ", ".join(f"{k}={v:,}" for k, v in extra.items()))
        cfg = {**cfg, "zero_optimization": {**cfg["zero_optimization"], **extra}}
    return cfg


def fused_token_ce_sum(model: Any, input_ids: Any, shift_labels: Any, pos: Any, mask: Any, **extra: Any):
    """Sum of token CE through the model's fused loss: shifted labels (boundaries already -100,
    padded with -100 at the end to the input length) and num_items_in_batch=1, so the model's
    "mean over num_items_in_batch" is the sum."""
    import torch.nn.functional as F

    padded = F.pad(shift_labels, (0, 1), value=-100)
    out = model(input_ids=input_ids, position_ids=pos, attention_mask=mask, use_cache=False,
                shift_labels=padded, num_items_in_batch=1, **extra)
    return out.loss
