"""The optimizer-step loop and evaluation.

Per optimizer step every rank: takes ``gradient_accumulation_steps`` micro-batches,
all-reduces their label-token count (so the loss is the exact token mean of the global
batch), runs the engine step, then all ranks agree (MAX all-reduce on a CPU/gloo control
group) on "stop" (a SIGUSR2/SIGTERM reached any rank), "time-based checkpoint due" and
"a node is still uploading its part of a checkpoint".
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("ftcluster.train")


def evaluate(engine: Any, ctx: Any, batches: list[Any] | None) -> float | None:
    """Mean token loss over an eval set (each rank takes its share; collective)."""
    import torch

    if batches is None:
        return None
    ce = torch.zeros((), device=ctx.device, dtype=torch.float64)
    n = torch.zeros((), device=ctx.device, dtype=torch.float64)
    for b in batches:
        c, k = engine.eval_sums(b)
        ce += c.double()
        n += k.double()
    tot = ctx.all_sum_device(torch.stack([ce, n]))
    return float(tot[0] / tot[1]) if float(tot[1]) > 0 else None


class MetricsWindow:
    """Per-step records kept as tensors until a flush (a float() per step would sync the device)."""

    def __init__(self, ctx: Any, reporter: Any):
        self.ctx, self.reporter = ctx, reporter
        self.pending: list[tuple[int, Any, Any, float, int, int, float, float]] = []
        self.t, self.tokens = time.monotonic(), 0
        self.last_loss: float | None = None

    def add(self, step: int, loss: Any, grad_norm: Any, lr: float, tokens: int, seen: int, elapsed: float,
            started: float) -> None:
        """``started``: time.monotonic() when the step began (its batches fetched next)."""
        self.tokens += tokens
        self.pending.append((step, loss, grad_norm, lr, tokens, seen, elapsed, started))

    def flush(self) -> None:
        from .metrics import peak_memory_gb

        if not self.pending:
            return
        losses = [float(p[1]) for p in self.pending]  # waits for the device: the last step is done now
        now = time.monotonic()
        rate = self.tokens / max(now - self.t, 1e-9)
        mem = peak_memory_gb(self.ctx.device)
        # A step's wall time runs to the next step's start, the last one's to now; so it leaves out
        # the evaluations and checkpoint saves that follow a flush (checkpoint records carry those).
        ends = [p[7] for p in self.pending[1:]] + [now]
        for (step, _, gn, lr, tokens, seen, elapsed, started), loss, end in zip(self.pending, losses, ends,
                                                                               strict=True):
            rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": float(gn), "tokens": tokens,
                   "tokens_per_s": rate, "peak_mem_gb": mem, "elapsed_s": elapsed, "tokens_seen": seen,
                   "step_s": round(end - started, 4)}
            if self.ctx.device.type == "cuda":
                import torch

                rec["peak_mem_reserved_gb"] = torch.cuda.max_memory_reserved(self.ctx.device) / 2**30
            self.last_loss = rec["loss"]
            self.reporter.train_step(rec)
        self.pending.clear()
        self.t, self.tokens = now, 0


def run_steps(t: Any) -> bool:
    """Train ``t`` (a runtime.Trainer) up to its last step; True when stopped by a signal (checkpointed)."""
    from .engine import count_label_tokens

    spec, ctx, state = t.spec, t.ctx, t.state
    eval_every = spec.training.eval_every_steps
    window = MetricsWindow(ctx, t.reporter)

    def flush() -> None:
        window.flush()
        state.last_loss = window.last_loss if window.last_loss is not None else state.last_loss

    while state.step < t.total_steps:
        started = time.monotonic()
        micro = [t.data.loader.next_batch() for _ in range(spec.training.gradient_accumulation_steps)]
        n_labels = sum(count_label_tokens(b) for b in micro)
        n_tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                       for b in micro)
        g_labels, g_tokens = ctx.all_sum([n_labels, n_tokens])
        scale = t.engine.grad_accum_scale / max(g_labels, 1.0)
        lr = t.engine.lr  # the rate this step uses
        ce_sum, grad_norm = t.engine.train_step(micro, scale)
        loss = ctx.all_sum_device(ce_sum) / max(g_labels, 1.0)
        state.step += 1
        state.tokens_seen += int(g_tokens)
        window.add(state.step, loss, grad_norm, lr, int(g_tokens), state.tokens_seen, t.elapsed(), started)
        stop, time_due, uploading = t.stop.agree(t.ckpt.time_due(), t.ckpt.busy(), group=ctx.ctl_group)
        last = state.step == t.total_steps
        if state.step % spec.training.log_every_steps == 0 or stop or last:
            flush()
        if eval_every and state.step % eval_every == 0 and not last:
            flush()
            t.last_eval = evaluate(t.engine, ctx, t.data.eval)
            t.eval_record("eval", t.last_eval)
        if stop:
            flush()
            log.info("stop requested (%s): saving step %d, then exiting", t.stop.signal_name, state.step)
            t.checkpoint(final=True)
            return True
        def before_save() -> None:
            flush()
            t.sync_state()

        if t.ckpt.maybe_save(state, time_due=bool(time_due), uploading=bool(uploading), before=before_save):
            t.after_checkpoint(final=False)
    flush()
    return False
