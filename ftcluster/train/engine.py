"""Two engines behind one interface (:class:`Engine`): the training loop never knows which one it drives.

* :class:`PlainEngine` - LoRA (or any small trainable subset): torch AdamW, DDP when
  there is more than one process, autocast on GPU.
* :class:`DeepSpeedEngine` - full fine-tuning with DeepSpeed ZeRO 0-3 (client torch AdamW,
  DeepSpeedCPUAdam with optimizer offload on GPU, or the optimizer of a user config).

Both take one optimizer step from a list of micro-batches (:meth:`train_step`), measure
loss (:meth:`eval_sums`), snapshot/restore their state to/from a local folder
(:meth:`save` / :meth:`load`, collective) and export the final artifact (:meth:`export`).

Loss normalisation: every micro-batch contributes ``sum(token CE) * scale`` where the
loop picks ``scale`` so the gradient equals that of the mean over all label tokens of
the global batch (all ranks, all micro-batches), however tokens are spread over them.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any, Protocol

from .asyncsave import CheckpointWriter

log = logging.getLogger("ftcluster.train")


class Engine(Protocol):
    """What the loop, the checkpoint manager and the exports call; a new engine (e.g. FSDP2) implements it."""

    kind: str  # recorded in checkpoints: a checkpoint resumes only into the same kind
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
        from .varlen import varlen_kwargs

        extra = varlen_kwargs(host_pos, device)
    shift_labels = labels[:, 1:].clone()
    if pos is not None:
        shift_labels[pos[:, 1:] == 0] = -100
    if fused and model.training:
        from .speedups import fused_token_ce_sum

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


class PlainEngine:
    """LoRA / small trainable subsets: torch AdamW, DDP across processes when world_size > 1."""

    kind = "plain"

    def __init__(self, model: Any, spec: Any, device: Any, dtype: Any, total_steps: int, world_size: int):
        import torch

        self.module = model
        self.device = device
        self.world_size = world_size
        tr = spec.training
        self.model = model
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=tr.learning_rate, betas=(tr.adam_beta1, tr.adam_beta2),
                                           weight_decay=tr.weight_decay, fused=device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, LrLambda(tr.lr_schedule, tr.warmup_steps, total_steps))
        self.max_grad_norm = tr.max_grad_norm
        self.autocast_dtype = dtype if (device.type == "cuda" and dtype != torch.float32) else None
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        self.fused_ce = bool(getattr(model, "ftcluster_fused_ce", False))
        self.varlen = bool(getattr(model, "ftcluster_varlen", False))
        self._captured: dict[str, Any] | None = None  # the last deferred save's host copy of the weights

    # ------------------------------------------------------------------ step
    @property
    def grad_accum_scale(self) -> int:
        """DDP averages gradients over ranks: the loop multiplies the loss scale by this."""
        return self.world_size

    def _autocast(self):
        import torch

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.autocast_dtype)

    def train_step(self, micro_batches: list[dict[str, Any]], scale: float):
        """One optimizer step; returns (sum of token CE as a detached tensor, grad norm tensor)."""
        import torch

        total = torch.zeros((), device=self.device)
        n = len(micro_batches)
        for i, mb in enumerate(micro_batches):
            sync = contextlib.nullcontext() if (self.model is self.module or i == n - 1) else self.model.no_sync()
            with sync:
                with self._autocast():
                    ce, _ = token_ce_sum(self.model, mb, self.device, fused=self.fused_ce, varlen=self.varlen)
                loss = ce * scale
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += ce.detach()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        clip = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, grad_norm.detach()

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def eval_sums(self, batch: dict[str, Any]):
        import torch

        self.module.eval()
        with torch.no_grad(), self._autocast():
            ce, n = token_ce_sum(self.module, batch, self.device, varlen=self.varlen)
        self.module.train()
        return ce, n

    # ------------------------------------------------------------------ state
    def checkpoint_bytes(self, rank: int) -> int:
        return 0  # the trainable subset and its Adam state: pinned fast enough at the first capture

    def save(self, folder: Path, rank: int, writer: CheckpointWriter | None = None) -> None:
        """Rank 0 writes trainable weights, optimizer, scheduler (DDP replicas are identical)."""
        import torch
        from safetensors.torch import save_file

        if rank != 0:
            return
        writer = writer or CheckpointWriter(deferred=False)
        named = writer.capture({n: p.detach() for n, p in self.module.named_parameters() if p.requires_grad})
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.scaler:
            state["scaler"] = self.scaler.state_dict()
        state = writer.capture(state)
        # The host copy of the adapter weights at this step: the step's adapter export (next) writes
        # from it too, instead of reading the live weights on the training thread.
        self._captured = named if writer.deferred else None
        weights, opt = folder / "trainable.safetensors", folder / "optimizer.pt"
        writer.write(weights.name, lambda: save_file({n: t.contiguous().cpu() for n, t in named.items()},
                                                     str(weights)))
        writer.write(opt.name, lambda: torch.save(state, opt))

    def load(self, folder: Path) -> None:
        import torch
        from safetensors.torch import load_file

        saved = load_file(str(folder / "trainable.safetensors"))
        params = {n: p for n, p in self.module.named_parameters() if p.requires_grad}
        if set(saved) != set(params):
            from ..errors import TrainError

            raise TrainError(f"{folder}: checkpoint holds other trainable parameters than this model "
                             "(was the spec's lora/model section changed?); use a new output.uri")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n].to(p.device))
        state = torch.load(folder / "optimizer.pt", map_location=self.device, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    # ------------------------------------------------------------------ export
    def export(self, folder: Path, rank: int, writer: CheckpointWriter | None = None) -> None:
        """The adapter (adapter_model.safetensors + adapter_config.json), rank 0. With a deferred
        ``writer`` right after :meth:`save`, peft writes the weights that save captured, on the
        writer thread (training goes on); otherwise now, from the live weights."""
        if rank != 0:
            return
        # Whole embedding matrices go into the adapter only if the tokenizer grew them;
        # a LoRA on lm_head leaves the base weights untouched (peft would save them anyway).
        resized = getattr(self.module.get_base_model(), "ftcluster_resized_embeddings", False)
        captured, self._captured = self._captured, None
        if writer is not None and writer.deferred and captured is not None and not resized:
            # peft picks the adapter's entries (lora_*, modules_to_save) from the state_dict given
            writer.write("adapter", lambda: self.module.save_pretrained(
                str(folder), safe_serialization=True, save_embedding_layers=False, state_dict=captured))
            return
        self.module.save_pretrained(str(folder), safe_serialization=True, save_embedding_layers=resized)

    def export_merged(self, folder: Path, rank: int) -> None:
        """Base weights with the adapter merged in (a plain HF model). Call last: it merges in place."""
        if rank == 0:
            merged = self.module.merge_and_unload()
            merged.save_pretrained(str(folder), safe_serialization=True)


def prepare_ds_config(ds_config: dict[str, Any], device: Any) -> dict[str, Any]:
    """The payload's DeepSpeed config, adjusted for a CPU-only host: fp32 compute (no bf16
    kernels to gain from on gloo) and torch AdamW allowed with optimizer offload."""
    import copy

    cfg = copy.deepcopy(ds_config)
    if device.type != "cuda":
        cfg["bf16"] = {"enabled": False}
        cfg["fp16"] = {"enabled": False}
        cfg["zero_force_ds_cpu_optimizer"] = False
    return cfg


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


class DeepSpeedEngine:
    """Full fine-tuning with DeepSpeed ZeRO, configured by :func:`prepare_ds_config`'s output."""

    kind = "deepspeed"

    def __init__(self, model: Any, spec: Any, ds_config: dict[str, Any], device: Any, total_steps: int,
                 world_size: int):
        import deepspeed
        import torch

        tr, dss = spec.training, spec.deepspeed
        cfg = ds_config
        self.device = device
        self.world_size = world_size
        self.zero_stage = zero_stage(cfg)
        self.offloaded = dss.offload_optimizer != "none"
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = None
        if "optimizer" not in cfg:
            kw = dict(lr=tr.learning_rate, betas=(tr.adam_beta1, tr.adam_beta2), weight_decay=tr.weight_decay)
            if dss.offload_optimizer != "none" and device.type == "cuda":
                from deepspeed.ops.adam import DeepSpeedCPUAdam

                optimizer = DeepSpeedCPUAdam(params, adamw_mode=True, **kw)
            else:
                # fused: one kernel over ZeRO's flat fp32 partition instead of ~8 foreach passes
                # (the 8B step on 2 GPUs spends ~0.1 s in the optimizer: docs/BENCHMARKS.md)
                optimizer = torch.optim.AdamW(params, fused=device.type == "cuda", **kw)
        sched = None
        if "scheduler" not in cfg:
            lam = LrLambda(tr.lr_schedule, tr.warmup_steps, total_steps)

            def sched(opt):
                return torch.optim.lr_scheduler.LambdaLR(opt, lam)

        from .speedups import tune_ds_config

        self.fused_ce = bool(getattr(model, "ftcluster_fused_ce", False))
        self.varlen = bool(getattr(model, "ftcluster_varlen", False))
        cfg = tune_ds_config(cfg, model, device, world_size)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=params if optimizer is None else None, optimizer=optimizer,
            lr_scheduler=sched, config=cfg, dist_init_required=False)
        self.module = self.engine.module

    @property
    def grad_accum_scale(self) -> int:
        """DeepSpeed averages over ranks and divides by gradient_accumulation_steps in backward."""
        return self.world_size * self.engine.gradient_accumulation_steps()

    def train_step(self, micro_batches: list[dict[str, Any]], scale: float):
        import torch

        total = torch.zeros((), device=self.device)
        for mb in micro_batches:
            ce, _ = token_ce_sum(self.engine, mb, self.device, fused=self.fused_ce, varlen=self.varlen)
            self.engine.backward(ce * scale)
            self.engine.step()  # applies the optimizer only at the accumulation boundary
            total += ce.detach()
        gn = self.engine.get_global_grad_norm()
        gn = torch.tensor(float("nan") if gn is None else float(gn))
        return total, gn

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def eval_sums(self, batch: dict[str, Any]):
        import torch

        self.engine.eval()
        with torch.no_grad():
            ce, n = token_ce_sum(self.engine, batch, self.device, varlen=self.varlen)
        self.engine.train()
        return ce, n

    def checkpoint_bytes(self, rank: int) -> int:
        """ZeRO's fp32 master weights and two Adam moments (12 bytes a parameter), partitioned from
        stage 1 on, and on rank 0 below stage 3 the 16-bit module (2 bytes a parameter); nothing
        when the optimizer state lives on the host (offload)."""
        if self.offloaded:
            return 0
        n = sum(getattr(p, "ds_numel", p.numel()) for p in self.module.parameters())
        opt = 12 * n // (self.world_size if self.zero_stage >= 1 else 1)
        return opt + (2 * n if self.zero_stage < 3 and rank == 0 else 0)

    def save(self, folder: Path, rank: int, writer: CheckpointWriter | None = None) -> None:
        """Every rank writes its own ZeRO shards under folder/ds (collective).

        A deferring ``writer`` stands in for DeepSpeed's torch.save for this one call (every file
        of ``save_checkpoint`` goes through ``checkpoint_engine.save``); another checkpoint engine
        chosen in the DeepSpeed config (its own asynchronous ones) is left to itself.
        """
        from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

        inner = self.engine.checkpoint_engine
        if writer is None or not writer.deferred or type(inner) is not TorchCheckpointEngine:
            self.engine.save_checkpoint(str(folder), tag="ds", client_state={}, save_latest=False)
            return
        from .asyncsave import deferred_ds_checkpoint_engine

        self.engine.checkpoint_engine = deferred_ds_checkpoint_engine(inner, writer)
        try:
            self.engine.save_checkpoint(str(folder), tag="ds", client_state={}, save_latest=False)
        finally:
            self.engine.checkpoint_engine = inner

    def load(self, folder: Path) -> None:
        from ..errors import TrainError

        path, _ = self.engine.load_checkpoint(str(folder), tag="ds", load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise TrainError(f"{folder}: DeepSpeed could not load the checkpoint (see the log above)")

    def export(self, folder: Path, rank: int, writer: CheckpointWriter | None = None) -> None:
        """A consolidated Hugging Face checkpoint (16-bit on GPU, safetensors shards); collective."""
        if self.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()  # gathers shards onto rank 0
        else:
            state = self.module.state_dict() if rank == 0 else None
        if rank == 0:
            self.module.save_pretrained(str(folder), state_dict=state, safe_serialization=True,
                                        max_shard_size="5GB")

    def export_merged(self, folder: Path, rank: int) -> None:  # pragma: no cover - not a LoRA engine
        raise NotImplementedError
