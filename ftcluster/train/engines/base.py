"""What every training engine shares: the :class:`Engine` protocol the loop, the checkpoint
manager and the exports call, what a builder is given (:class:`EngineInputs`), the learning-rate
schedule and the token cross entropy.

An engine is a module under ``ftcluster/train/engines/`` named after its torch-free recipe in
:mod:`ftcluster.plan.engines`, with a ``build(inputs) -> (engine, keep_alive)`` function
(:func:`ftcluster.train.engines.build_engine` imports it): :mod:`.lora` (``PlainEngine``: LoRA or
any small trainable subset, torch AdamW, DDP across processes), :mod:`.deepspeed`
(``DeepSpeedEngine``: full fine-tuning with DeepSpeed ZeRO 0-3) and :mod:`.fsdp` (``FsdpEngine``:
full fine-tuning with PyTorch FSDP2). The loop never knows which one it drives.

Each takes one optimizer step from a list of micro-batches (:meth:`Engine.train_step`), measures
loss (:meth:`Engine.eval_sums`), snapshots/restores its state to/from a local folder
(:meth:`Engine.save` / :meth:`Engine.load`, collective) and exports the final artifact
(:meth:`Engine.export`).

Loss normalisation: every micro-batch contributes ``sum(token CE) * scale`` where the
loop picks ``scale`` so the gradient equals that of the mean over all label tokens of
the global batch (all ranks, all micro-batches), however tokens are spread over them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..asyncsave import CheckpointWriter

log = logging.getLogger("ftcluster.train")


class Engine(Protocol):
    """What the loop, the checkpoint manager and the exports call; every engine implements it."""

    kind: str  # its recipe's checkpoint_kind, recorded in checkpoints: a checkpoint resumes only into the same kind
    module: Any  # the underlying Hugging Face model (its config fingerprints checkpoints)

    @property
    def grad_accum_scale(self) -> int:
        """The factor by which the engine divides the loss (ranks x accumulation); the loop multiplies it back."""
        ...

    @property
    def lr(self) -> float:
        """The learning rate the next step uses."""
        ...

    def train_step(self, micro_batches: list[dict[str, Any]], scale: float) -> tuple[Any, Any]:
        """One optimizer step; (sum of token CE, grad norm) as detached tensors."""
        ...

    def eval_sums(self, batch: dict[str, Any]) -> tuple[Any, Any]:
        """(sum of token CE, number of label tokens) of one batch, without gradients."""
        ...

    def save(self, folder: Path, rank: int, writer: CheckpointWriter | None = None) -> None:
        """Write this rank's share of the state into ``folder`` (collective): captured through
        ``writer`` and written by it (in the background when it defers; None: synchronously)."""
        ...

    def load(self, folder: Path) -> None:
        """Restore what :meth:`save` wrote (collective)."""
        ...

    def checkpoint_bytes(self, rank: int) -> int:
        """About how many bytes of GPU state :meth:`save` copies on ``rank`` (to pin ahead; 0: small)."""
        ...

    def export(self, folder: Path, rank: int, writer: CheckpointWriter | None = None) -> None:
        """The end-of-run artifact: an adapter (LoRA) or a consolidated model (collective). A LoRA
        engine given a deferred ``writer`` right after :meth:`save` writes the adapter from that
        save's capture, in the background."""
        ...

    def export_merged(self, folder: Path, rank: int) -> None:
        """LoRA: base weights with the adapter merged in."""
        ...


@dataclass(frozen=True)
class EngineInputs:
    """What :func:`ftcluster.train.engines.build_engine` hands an engine's ``build``."""

    spec: Any  # the validated JobSpec
    payload: dict[str, Any]  # the resolved payload: what the recipe's plan_extra added is read back from it
    tokenizer: Any
    dtype: Any  # the compute dtype (model.compute_dtype)
    ctx: Any  # the DistContext of this process
    cache_dir: Path  # FTCLUSTER_CACHE: downloaded/created models
    total_steps: int  # optimizer steps of the run (the learning-rate schedule's length)


def model_flags(model: Any) -> tuple[bool, bool]:
    """(fused cross entropy, variable-length attention): what :mod:`..model` switched on for ``model``."""
    return bool(getattr(model, "ftcluster_fused_ce", False)), bool(getattr(model, "ftcluster_varlen", False))


class LrLambda:
    """Warmup then cosine/linear/constant decay to 0; picklable (it lands in checkpoints)."""

    def __init__(self, schedule: str, warmup: int, total: int):
        self.schedule, self.warmup, self.total = schedule, warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        if self.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def _right_padded(mask: Any) -> bool:
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def eval_ce_sum(module: Any, batch: dict[str, Any], device: Any, varlen: bool = False) -> tuple[Any, Any]:
    """:meth:`Engine.eval_sums` of an engine that needs no autocast: ``module`` in eval mode, no
    gradients, (sum of token CE, label tokens), then back to train mode."""
    import torch

    module.eval()
    with torch.no_grad():
        ce, n = token_ce_sum(module, batch, device, varlen=varlen)
    module.train()
    return ce, n


def token_ce_sum(model: Any, batch: dict[str, Any], device: Any, fused: bool = False, varlen: bool = False):
    """Sum of next-token cross entropy over label tokens, and the number of those tokens.

    Labels are aligned with inputs (Hugging Face convention) and shifted here. With
    packing, a token never learns to predict the first token of the next example
    (position_ids restart there). The attention mask is dropped for right padding so
    transformers derives a block-diagonal causal mask from position_ids (packed examples
    do not attend to each other); padding positions carry label -100. ``fused`` (training
    with :func:`.speedups.apply_fused_kernels` applied) lets the model compute the sum from
    its hidden states without materialising the logits. ``varlen`` (the model runs
    :mod:`.varlen`'s attention) passes the examples' boundaries instead of leaving transformers
    to build the mask.
    """
    import torch.nn.functional as F

    input_ids = batch["input_ids"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    host_pos = batch.get("position_ids")
    pos = host_pos.to(device, non_blocking=True) if host_pos is not None else None
    mask = batch.get("attention_mask")
    if mask is not None and (bool(mask.all()) or (pos is not None and _right_padded(mask))):
        mask = None
    elif mask is not None:
        mask = mask.to(device, non_blocking=True)
    extra: dict[str, Any] = {}
    if varlen and mask is None and host_pos is not None:
        from ..varlen import varlen_kwargs

        extra = varlen_kwargs(host_pos, device)
    shift_labels = labels[:, 1:].clone()
    if pos is not None:
        shift_labels[pos[:, 1:] == 0] = -100
    if fused and model.training:
        from ..speedups import fused_token_ce_sum

        return fused_token_ce_sum(model, input_ids, shift_labels, pos, mask, **extra), (shift_labels != -100).sum()
    logits = model(input_ids=input_ids, position_ids=pos, attention_mask=mask, use_cache=False, **extra).logits
    ce = F.cross_entropy(logits[:, :-1, :].float().reshape(-1, logits.shape[-1]), shift_labels.reshape(-1),
                         ignore_index=-100, reduction="sum")
    return ce, (shift_labels != -100).sum()


def count_label_tokens(batch: dict[str, Any]) -> int:
    """Label tokens ``token_ce_sum`` will count for this batch (computed on CPU, before the step)."""
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    pos = batch.get("position_ids")
    if pos is not None:
        keep &= pos[:, 1:] != 0
    return int(keep.sum())
