"""The plan for people (a rich table) and for machines (JSON, docs/plan.schema.json)."""

from __future__ import annotations

from typing import Any

from .advise import Option, Plan
from .layout import checkpointing_label, spec_value

SCHEMA_VERSION = 1


def option_dict(o: Option) -> dict[str, Any]:
    lay = o.layout
    return {
        "method": lay.method, "zero_stage": lay.zero_stage, "offload_optimizer": lay.offload_optimizer,
        "offload_params": lay.offload_params, "nodes": lay.nodes, "gpus_per_node": lay.gpus_per_node,
        "gpu_type": lay.gpu, "micro_batch_size": lay.micro_batch_size,
        "gradient_accumulation_steps": lay.gradient_accumulation_steps,
        "gradient_checkpointing": spec_value(lay.gradient_checkpointing), "params_total": o.params_total,
        "params_trainable": o.params_trainable, "per_gpu_memory_bytes": o.memory.to_dict(),
        "gpu_memory_bytes": o.gpu_memory, "usable_memory_bytes": o.usable, "fits": o.fits,
        "host_memory_bytes_per_node": o.host_bytes_per_node, "step_time_s": round(o.step_time_s, 4),
        "tokens_per_step": o.tokens_per_step, "steps": o.steps,
        "run_time_s": None if o.run_time_s is None else round(o.run_time_s, 1),
        "cost_usd": None if o.cost_usd is None else round(o.cost_usd, 2),
        "usd_per_million_tokens": round(o.usd_per_million_tokens, 4), "summary": lay.describe(),
    }


def plan_dict(p: Plan) -> dict[str, Any]:
    s = p.shape
    return {
        "schema_version": SCHEMA_VERSION,
        "job": p.name,
        "model": {"source": s.source, "hidden_size": s.hidden_size, "intermediate_size": s.intermediate_size,
                  "num_hidden_layers": s.num_hidden_layers, "num_attention_heads": s.num_attention_heads,
                  "num_key_value_heads": s.num_key_value_heads, "vocab_size": s.vocab_size,
                  "tie_word_embeddings": s.tie_word_embeddings},
        "params_total": p.requested.params_total,
        "params_trainable": p.requested.params_trainable,
        "gpu": {"type": p.gpu.name, "assumed": p.gpu_assumed, "memory_bytes": p.gpu.memory_bytes,
                "bf16_tflops": p.gpu.bf16_tflops, "price_per_hour": p.gpu.price_per_hour},
        "data": {"tokens": p.data.tokens, "examples": p.data.examples, "how": p.data.how},
        "requested": option_dict(p.requested),
        "alternatives": [option_dict(o) for o in p.alternatives],
        "recommendation": None if p.recommendation is None else {
            **option_dict(p.recommendation), "reason": p.reason, "line": recommendation_line(p), "change": p.change},
        "notes": p.notes,
    }


def gib(n: float) -> str:
    return f"{n / 2**30:.1f}"


def duration(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def money(x: float | None) -> str:
    return "-" if x is None else (f"${x:,.0f}" if x >= 100 else f"${x:,.2f}")


def recommendation_line(p: Plan) -> str:
    r = p.recommendation
    if r is None:
        return f"nothing fits on {p.gpu.name}: try a larger GPU (--gpu) or a shorter data.seq_len"
    cost = f", {duration(r.run_time_s)}, {money(r.cost_usd)}" if r.run_time_s is not None else ""
    return f"{r.layout.describe()} ({gib(r.memory.total)} of {gib(r.usable)} GiB usable{cost}): {p.reason}"


def print_plan(p: Plan, console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    con = console or Console()
    s = p.shape
    con.print(f"[bold]{p.name}[/bold]: {s.source}: {s.num_hidden_layers} layers, hidden {s.hidden_size}, "
              f"{s.num_attention_heads}/{s.num_key_value_heads} heads, vocab {s.vocab_size:,}; "
              f"{p.requested.params_total:,} parameters, {p.requested.params_trainable:,} trainable "
              f"({p.requested.layout.method})")
    tok = f"{p.data.tokens:,} tokens ({p.data.how})" if p.data.tokens is not None else p.data.how
    con.print(f"data: {tok}; GPU: {p.gpu.name}{' (assumed)' if p.gpu_assumed else ''}, "
              f"{gib(p.gpu.memory_bytes)} GiB, ${p.gpu.price_per_hour:.2f}/GPU-hour")
    m = p.requested.memory
    con.print("spec's layout per GPU (GiB): " + ", ".join(
        f"{k} {gib(v)}" for k, v in (("weights", m.weights), ("gradients", m.gradients), ("optimizer", m.optimizer),
                                     ("activations", m.activations), ("logits", m.logits), ("buffers", m.overhead))))
    t = Table(box=None, header_style="bold")
    for col in ("", "method", "GPUs", "mb x acc", "ckpt", "GiB/GPU", "fits", "step", "run", "cost"):
        t.add_column(col, justify="left" if col in ("", "method") else "right")
    for i, o in enumerate(p.alternatives or [p.requested]):
        lay = o.layout
        how = "LoRA" if lay.method == "lora" else lay.engine_label() + ("+off" if lay.offload_optimizer else "")
        mark = "spec" if i == 0 else ("best" if p.recommendation is not None and lay == p.recommendation.layout else "")
        t.add_row(mark, how, f"{lay.nodes}x{lay.gpus_per_node}", f"{lay.micro_batch_size}x{lay.gradient_accumulation_steps}",
                  checkpointing_label(lay.gradient_checkpointing, short=True), f"{gib(o.memory.total)}/{gib(o.usable)}",
                  "[green]yes[/green]" if o.fits else "[red]no[/red]", f"{o.step_time_s:.2f}s",
                  duration(o.run_time_s), money(o.cost_usd))
    con.print(t)
    if p.recommendation is not None or p.reason:
        con.print(f"[bold]recommendation:[/bold] {recommendation_line(p)}")
    if p.change:
        con.print(f"to follow it: {p.change}", soft_wrap=True)
    for n in p.notes:
        con.print(f"note: {n}")
