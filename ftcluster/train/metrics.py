"""Training metrics: a progress bar on a terminal, plain log lines otherwise, and metrics.jsonl.

Only rank 0 reports. Every optimizer step becomes one JSON line (``kind: "train"``) so a
loss curve can be compared step by step (the resume test does); console output is
throttled to ``log_every_steps``. Evaluation and forgetting measurements are lines of
their own kinds (``eval``, ``general_eval``). Field reference: docs/training.md.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("ftcluster.train")


def peak_memory_gb(device: Any) -> float:
    """Peak memory of this process: GPU memory allocated by torch on CUDA, else max RSS."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return rss_kb / 2**20


def _fmt_s(s: float) -> str:
    s = int(max(0, s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def format_line(rec: dict[str, Any], total: int) -> str:
    """One human log line for a train record."""
    parts = [f"step {rec['step']}/{total}", f"loss {rec['loss']:.4f}", f"lr {rec['lr']:.3g}"]
    if rec.get("grad_norm") is not None and math.isfinite(rec["grad_norm"]):
        parts.append(f"grad_norm {rec['grad_norm']:.3f}")
    parts += [f"tokens/s {rec['tokens_per_s']:,.0f}", f"peak_mem {rec['peak_mem_gb']:.2f} GB",
              f"elapsed {_fmt_s(rec['elapsed_s'])}"]
    if rec.get("eta_s") is not None:
        parts.append(f"eta {_fmt_s(rec['eta_s'])}")
    return " | ".join(parts)


class JsonlSink:
    """Appends records to a local metrics.jsonl; ``on_flush`` publishes the file (best effort)."""

    def __init__(self, path: Path, on_flush: Callable[[Path], None] | None = None):
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(path, "a", encoding="utf-8")
        self._on_flush = on_flush

    def write(self, rec: dict[str, Any]) -> None:
        self._fh.write(json.dumps(rec, sort_keys=True) + "\n")

    def flush(self) -> None:
        self._fh.flush()
        if self._on_flush is not None:
            self._on_flush(self.path)

    def close(self) -> None:
        self.flush()
        self._fh.close()


class MetricsReporter:
    """Rank-0 reporting. ``enabled=False`` (other ranks) makes every call a no-op."""

    def __init__(self, *, enabled: bool, total_steps: int, start_step: int, log_every: int,
                 sink: JsonlSink | None, tty: bool | None = None, on_close: Callable[[], None] | None = None,
                 tracker: Any = None, on_tracker_close: Callable[[Any], None] | None = None):
        self.enabled = enabled
        self.tracker = tracker  # train/tracking.py's Trackers: every record is queued there too
        self.on_tracker_close = on_tracker_close
        self.on_close = on_close  # after the sink's close (the run's: its last upload of metrics.jsonl)
        self.total = total_steps
        self.start_step = start_step
        self.log_every = log_every
        self.sink = sink
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.t0 = time.monotonic()
        self._progress = None
        self._task = None
        if enabled and self.tty:
            self._start_bar()

    def _start_bar(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(), transient=False, refresh_per_second=4,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=self.total, completed=self.start_step, info="")

    def print(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(msg, highlight=False)
        else:
            log.info(msg)

    def train_step(self, rec: dict[str, Any]) -> None:
        """Record one optimizer step; the caller supplies step, loss, lr, grad_norm, tokens, timings."""
        if not self.enabled:
            return
        done = rec["step"] - self.start_step
        elapsed_run = time.monotonic() - self.t0
        rec["eta_s"] = elapsed_run / done * (self.total - rec["step"]) if done > 0 else None
        if self.sink is not None:
            self.sink.write({"kind": "train", **rec})
        if self.tracker is not None:
            self.tracker.record({"kind": "train", **rec})
        if self._progress is not None:
            info = f"loss {rec['loss']:.4f} | {rec['tokens_per_s']:,.0f} tok/s"
            self._progress.update(self._task, completed=rec["step"], info=info)
        if rec["step"] % self.log_every == 0 or rec["step"] == self.total:
            if self._progress is None:
                log.info(format_line(rec, self.total))
            if self.sink is not None:
                self.sink.flush()

    def event(self, rec: dict[str, Any], message: str | None = None) -> None:
        """An eval / general_eval / checkpoint record: written to the JSONL and shown."""
        if not self.enabled:
            return
        if self.sink is not None:
            self.sink.write(rec)
            self.sink.flush()
        if self.tracker is not None:
            self.tracker.record(rec)
        if message:
            self.print(message)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self.sink is not None:
            self.sink.close()
        if self.on_close is not None:
            self.on_close()
        if self.tracker is not None and self.on_tracker_close is not None:
            self.on_tracker_close(self.tracker)
            self.tracker = None


def open_reporter(spec: Any, ctx: Any, work_dir: Path, total_steps: int, start_step: int,
                  group: str | None = None) -> MetricsReporter:
    """The run's reporter: on rank 0, metrics.jsonl in ``work_dir``, published under the output URI
    at each flush (a resumed run continues it from ``start_step``), and the experiment trackers of
    ``spec.tracking`` (``group``: a job array's job name, their shared experiment); a no-op on the
    other ranks."""
    if not ctx.is_main:
        return MetricsReporter(enabled=False, total_steps=total_steps, start_step=start_step,
                               log_every=spec.training.log_every_steps, sink=None)
    from ..storage.metrics import MetricsWriter

    writer = MetricsWriter(spec.output.uri, spec.output.storage_options, local_dir=work_dir, resume_step=start_step)
    sink = JsonlSink(writer.local_path, on_flush=lambda p: writer.upload())
    from .tracking import end_of_run, open_trackers

    trackers = open_trackers(spec, work_dir, start_step, group)
    return MetricsReporter(enabled=True, total_steps=total_steps, start_step=start_step,
                           log_every=spec.training.log_every_steps, sink=sink, on_close=writer.close,
                           tracker=trackers, on_tracker_close=lambda t: t.close(*end_of_run(spec)))
