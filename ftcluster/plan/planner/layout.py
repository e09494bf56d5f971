"""What the planner plans: the workload (model, sequence, precision) and one layout of it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .shape import ModelShape


@dataclass(frozen=True)
class Workload:
    """What stays the same across layouts: the model, the data shape and the numerics."""

    shape: ModelShape
    seq_len: int
    precision: str = "bf16"  # bf16 | fp16 | fp32
    attn_implementation: str = "sdpa"  # sdpa | flash_attention_2 | eager
    global_batch: int = 1  # sequences per optimizer step (micro-batch x accumulation x world)
    # LoRA settings (used by method='lora' layouts)
    lora_r: int = 16
    lora_targets: str | tuple[str, ...] = "all-linear"
    lora_dropout: float = 0.05
    modules_to_save: tuple[str, ...] = ()
    added_tokens: int = 0  # tokenizer.add_tokens + add_special_tokens: LoRA trains their rows
    # DeepSpeed settings (used by method='full' layouts)
    reduce_bucket_size: int = 500_000_000
    overlap_comm: bool = True
    # The runtime's speed-ups (train/speedups.py): Liger's fused linear cross-entropy and kernels,
    # and ZeRO-3 keeping gathered weights from forward to backward when they fit. False models
    # the plain path (no liger-kernel, a non-Llama model, or FTCLUSTER_FUSED_CE=0 / _ZERO3_KEEP=0).
    fused_ce: bool = False
    zero3_keep: bool = False
    # training.compile as the runtime decides it (plan/speedups.py compile_on): inductor fuses each
    # decoder layer's norms, SwiGLU and RoPE (Liger's kernels are then off; the fused loss stays).
    compiled: bool = False
    # variable-length attention over packed examples: the token-weighted mean example length
    # (DataEstimate.attention_span), the span each token attends over; None: the whole row
    attention_span: float | None = None

    def on(self, lay: Layout) -> Workload:
        """This workload as the runtime runs it on ``lay``: compiled layers are off with DeepSpeed ZeRO-3
        (its parameter gathers hook every module)."""
        if self.compiled and lay.method == "full" and lay.engine == "deepspeed" and (lay.zero_stage or 0) == 3:
            return replace(self, compiled=False)
        return self

    @property
    def act_bytes(self) -> int:
        """Bytes of one activation element: the compute dtype."""
        return 4 if self.precision == "fp32" else 2


@dataclass(frozen=True)
class Layout:
    """One way to run the workload: method, ZeRO stage, GPUs, batch split, recompute."""

    method: str  # lora | full
    nodes: int
    gpus_per_node: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: float  # share of decoder layers recomputed: 0 (off) .. 1 (every layer)
    zero_stage: int | None = None  # full only
    offload_optimizer: bool = False
    offload_params: bool = False
    gpu: str = "h200"
    engine: str = "deepspeed"  # full only: which engine moves the shards (speed.zero3_gbps): deepspeed | fsdp

    @property
    def world(self) -> int:
        return self.nodes * max(self.gpus_per_node, 1)

    def with_(self, **kw: Any) -> Layout:
        return replace(self, **kw)

    def engine_label(self) -> str:
        """How the full fine-tuning engine shards: ``ZeRO-3`` (DeepSpeed), ``FSDP2`` (resharding after forward,
        ZeRO-3's memory) or ``FSDP2 no-reshard`` (ZeRO-2's)."""
        if self.engine == "fsdp":
            return "FSDP2" if (self.zero_stage or 0) == 3 else "FSDP2 no-reshard"
        return f"ZeRO-{self.zero_stage}"

    def describe(self) -> str:
        """'full ZeRO-3, 2x8 h200, micro-batch 2 x accumulation 4, checkpointing on'."""
        how = "LoRA" if self.method == "lora" else f"full {self.engine_label()}"
        if self.offload_optimizer or self.offload_params:
            how += " + CPU offload (" + ", ".join(
                n for n, on in (("optimizer", self.offload_optimizer), ("params", self.offload_params)) if on) + ")"
        where = f"{self.nodes}x{self.gpus_per_node} {self.gpu}" if self.nodes > 1 else f"{self.gpus_per_node} x {self.gpu}"
        return (f"{how} on {where}, micro-batch {self.micro_batch_size} x accumulation "
                f"{self.gradient_accumulation_steps}, checkpointing {checkpointing_label(self.gradient_checkpointing)}")


def spec_value(fraction: float) -> bool | float:
    """``training.gradient_checkpointing`` as a spec writes it: true, false or the share."""
    return bool(fraction) if fraction in (0, 1) else float(fraction)


def checkpointing_label(fraction: float, short: bool = False) -> str:
    """'on', 'off', or the share of layers recomputed ('0.375 of layers'; short: '0.375'), as the
    spec writes it."""
    return "on" if fraction >= 1 else "off" if fraction <= 0 else f"{fraction:g}" + ("" if short else " of layers")
