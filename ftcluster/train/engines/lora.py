"""The LoRA engine: :class:`PlainEngine` (peft adapters, or any small trainable subset, on a frozen
base; torch AdamW, fused on GPU; DDP when there is more than one process; autocast on GPU) and its
``build``. Recipe: ``lora`` in :mod:`ftcluster.plan.engines` (checkpoint kind "plain")."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from ...errors import TrainError
from ...plan.engines import ENGINES
from ..asyncsave import CheckpointWriter
from . import base  # base.token_ce_sum through the module: a probe may wrap it (benchmarks/ds_probe.py)
from .base import EngineInputs, LrLambda, model_flags

RECIPE = ENGINES["lora"]


def build(inputs: EngineInputs) -> tuple[PlainEngine, None]:
    """The base model with LoRA adapters (compiled layers when ``training.compile``); nothing to keep alive."""
    from .. import model as M

    spec, ctx = inputs.spec, inputs.ctx
    model = M.load_base_model(spec, inputs.tokenizer, inputs.dtype, ctx.device, inputs.cache_dir)
    compiled = model.ftcluster_compile  # load_base_model decided (training.compile)
    model = M.apply_lora(model, spec.lora, spec.training.seed)
    if compiled:
        M.compile_layers(model)
    return PlainEngine(model, spec, ctx.device, inputs.dtype, inputs.total_steps, ctx.world_size), None


class PlainEngine:
    """LoRA / small trainable subsets: torch AdamW, DDP across processes when world_size > 1."""

    kind = RECIPE.checkpoint_kind  # "plain"
    resharding = "global"  # rank 0 saves the trainable weights and optimizer, identical on every rank

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
        self.fused_ce, self.varlen = model_flags(model)
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
                    ce, _ = base.token_ce_sum(self.model, mb, self.device, fused=self.fused_ce, varlen=self.varlen)
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
            ce, n = base.token_ce_sum(self.module, batch, self.device, varlen=self.varlen)
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
        # New tokens' rows are in the adapter (peft's token adapter), and modules_to_save in full; the
        # whole embedding matrices never are: that would be gigabytes, and the base they load on is
        # resized and mean-initialised the same way (model.fit_embeddings).
        captured, self._captured = self._captured, None
        if writer is not None and writer.deferred and captured is not None:
            # peft picks the adapter's entries (lora_*, token rows, modules_to_save) from the state_dict given
            writer.write("adapter", lambda: self.module.save_pretrained(
                str(folder), safe_serialization=True, save_embedding_layers=False, state_dict=captured))
            return
        self.module.save_pretrained(str(folder), safe_serialization=True, save_embedding_layers=False)

    def export_merged(self, folder: Path, rank: int) -> None:
        """Base weights with the adapter merged in (a plain HF model). Call last: it merges in place."""
        if rank == 0:
            merged = self.module.merge_and_unload()
            merged.save_pretrained(str(folder), safe_serialization=True)
