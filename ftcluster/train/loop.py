"""The optimizer-step loop and evaluation.

:func:`run_steps` sees the run only through a :class:`LoopContext` (the engine, the data source,
the train state, the stop flag, the process group, and callbacks for metrics, evaluation and
checkpoints), never the runtime. Per optimizer step every rank: takes ``gradient_accumulation_steps`` micro-batches,
all-reduces their label-token count (so the loss is the exact token mean of the global
batch), runs the engine step, then all ranks agree (MAX all-reduce on a CPU/gloo control
group) on "stop" (a SIGUSR2/SIGTERM reached any rank), "time-based checkpoint due" and
"a node is still uploading its part of a checkpoint".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..storage.testhook import signal_at
from .datasource import DataSource
from .engines.base import Engine
from .faults import PROGRESS
from .signals import StopFlag
from .state import TrainState

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


class Evaluator:
    """The run's evaluations: measured on every rank (collective), recorded by rank 0's reporter."""

    def __init__(self, engine: Engine, ctx: Any, eval_batches: list[Any] | None, general_batches: list[Any] | None,
                 reporter: Any, state: TrainState):
        self.engine, self.ctx, self.reporter, self.state = engine, ctx, reporter, state
        self.batches, self.general_batches = eval_batches, general_batches
        self.last: float | None = None  # the latest eval loss during/after training (checkpoint and adapter meta)

    def eval(self, remember: bool = True) -> float | None:
        """The eval loss, recorded; ``remember``: as the latest (not the one before the first step)."""
        loss = evaluate(self.engine, self.ctx, self.batches)
        if remember:
            self.last = loss
        self.record("eval", loss)
        return loss

    def general(self, when: str) -> float | None:
        """The general-text loss ``when`` "before" or "after" training (the forgetting check), recorded;
        "after" also says how far it drifted from the baseline (``state.general_eval_before``)."""
        loss = evaluate(self.engine, self.ctx, self.general_batches)
        before = self.state.general_eval_before
        if when == "before" or loss is None:
            self.record("general_eval", loss, "forgetting check on general text: the baseline", when=when)
        elif before is None:
            self.record("general_eval", loss, "forgetting check on general text", when=when)
        else:
            self.record("general_eval", loss, f"forgetting check on general text, {drift(before, loss)} since before "
                        "training", when=when, drift=loss - before)
        return loss

    def record(self, kind: str, loss: float | None, note: str = "", **extra: Any) -> None:
        if loss is None:
            return
        rec = {"kind": kind, "step": self.state.step, "loss": loss, **extra}
        name = kind if "when" not in extra else f"{kind} ({extra['when']})"
        self.reporter.event(rec, f"{name} loss {loss:.4f} at step {self.state.step}" + (f": {note}" if note else ""))


def drift(before: float, after: float) -> str:
    """How far a loss moved, absolute and relative: ``+2.15 (+34%)``."""
    rel = f" ({(after - before) / before:+.0%})" if before else ""
    return f"{after - before:+.2f}{rel}"


class Checkpoints(Protocol):
    """The loop's side of checkpointing (:class:`~.hooks.Checkpointing` in a run)."""

    def flags(self) -> tuple[int, int]:
        """This rank's (time-based checkpoint due, node still uploading); the loop all-reduces them."""
        ...

    def maybe_save(self, *, time_due: bool, uploading: bool, before: Callable[[], None]) -> bool:
        """A periodic checkpoint if one is due (``before`` runs first); True when saved."""
        ...

    def save(self, *, final: bool) -> None:
        """A checkpoint now (a stop's: ``final``)."""
        ...


@dataclass
class LoopContext:
    """What :func:`run_steps` needs, and nothing else."""

    engine: Engine
    data: DataSource  # this rank's training batches (a stream needs no length: max_steps ends it)
    ctx: Any  # the DistContext: device, all_sum, all_sum_device, ctl_group
    stop: StopFlag
    state: TrainState  # step, tokens_seen, last_loss (updated here), the clock
    total_steps: int
    grad_accum: int  # micro-batches per optimizer step
    log_every: int
    eval_every: int | None
    report: Callable[[dict[str, Any]], None]  # one train record (rank 0 writes it)
    evaluate: Callable[[], Any]  # the periodic evaluation, measured and recorded (collective)
    checkpoints: Checkpoints


class MetricsWindow:
    """Per-step records kept as tensors until a flush (a float() per step would sync the device)."""

    def __init__(self, ctx: Any, report: Callable[[dict[str, Any]], None]):
        self.ctx, self.report = ctx, report
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
            self.report(rec)
        self.pending.clear()
        self.t, self.tokens = now, 0


def run_steps(lc: LoopContext) -> bool:
    """Train up to the last step; True when stopped by a signal (checkpointed)."""
    from .engines.base import count_label_tokens
    from .model import compile_report

    ctx, state = lc.ctx, lc.state
    window = MetricsWindow(ctx, lc.report)

    def flush() -> None:
        window.flush()
        state.last_loss = window.last_loss if window.last_loss is not None else state.last_loss

    while state.step < lc.total_steps:
        started = time.monotonic()
        PROGRESS.enter("reading data", state.step + 1)
        signal_at("data-read")  # test-only
        micro = [lc.data.next_batch() for _ in range(lc.grad_accum)]
        PROGRESS.enter("the training step")
        n_labels = sum(count_label_tokens(b) for b in micro)
        n_tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                       for b in micro)
        g_labels, g_tokens = ctx.all_sum([n_labels, n_tokens])
        scale = lc.engine.grad_accum_scale / max(g_labels, 1.0)
        lr = lc.engine.lr  # the rate this step uses
        ce_sum, grad_norm = lc.engine.train_step(micro, scale)
        loss = ctx.all_sum_device(ce_sum) / max(g_labels, 1.0)
        state.step += 1
        compiled = compile_report(state.step)  # None unless training.compile compiled layers
        if compiled:
            log.info("%s", compiled)
        state.tokens_seen += int(g_tokens)
        window.add(state.step, loss, grad_norm, lr, int(g_tokens), state.tokens_seen, state.elapsed(), started)
        stop, time_due, uploading = lc.stop.agree(*lc.checkpoints.flags(), group=ctx.ctl_group)
        last = state.step == lc.total_steps
        if state.step % lc.log_every == 0 or stop or last:
            flush()
        if lc.eval_every and state.step % lc.eval_every == 0 and not last:
            flush()
            PROGRESS.enter("an evaluation")
            lc.evaluate()
        if stop:
            flush()
            log.info("stop requested (%s): saving step %d, then exiting", lc.stop.signal_name, state.step)
            PROGRESS.enter("saving a checkpoint", exempt=True)
            lc.checkpoints.save(final=True)
            return True
        PROGRESS.enter("checkpointing", exempt=True)  # a snapshot; uploads run in the background
        lc.checkpoints.maybe_save(time_due=bool(time_due), uploading=bool(uploading), before=flush)
    flush()
    return False
