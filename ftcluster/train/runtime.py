"""The training run: set up, resume, loop, checkpoint, evaluate, export.

One function, :func:`run`, drives everything from the resolved payload. The parts live beside
it: :mod:`.build` (data, engine), :mod:`.loop` (the optimizer steps and evaluation),
:mod:`.checkpoint` (save and resume, behind :class:`~.checkpoint.CheckpointManager`),
:mod:`.outputs` (the published adapter/model folders). The model work is behind
:class:`~.engine.Engine` (PlainEngine for LoRA, DeepSpeedEngine for full fine-tuning), so the
loop stays the same for both and open to later speed work.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import TrainError
from ..storage.testhook import signal_at
from .checkpoint import TrainState
from .distributed import init_distributed, setup_logging
from .signals import PREEMPTED_EXIT, StopFlag, Stopped

log = logging.getLogger("ftcluster.train")


class Trainer:
    """State of one training process; :func:`run` is the entry."""

    def __init__(self, payload: dict[str, Any], stop: StopFlag):
        from ..spec.loader import spec_from_dict

        self.stop = stop
        self.payload = payload
        self.spec = spec_from_dict(payload["spec"])
        self.ds_config = payload.get("deepspeed")
        if stop.local:
            raise Stopped("before the process group was set up")
        self.ctx = init_distributed(self.spec)
        setup_logging(self.ctx.rank)
        self.cache_dir = Path(os.environ.get("FTCLUSTER_CACHE") or Path.home() / ".cache" / "ftcluster")
        self.state = TrainState()
        self.last_eval: float | None = None
        self.resumed_step: int | None = None
        self.elapsed_before = 0.0

    # -- setup ---------------------------------------------------------------
    def setup(self) -> None:
        from . import model as M
        from .build import build_data, build_engine, total_steps_for
        from .checkpoint import CheckpointManager, RunIdentity, default_work_dir, seed_everything
        from .outputs import Outputs
        from .tokenizer import load_or_train_tokenizer

        spec, ctx = self.spec, self.ctx
        self.startup_boundary("joining the other processes")
        seed_everything(spec.training.seed)
        log.info("ftcluster %s: %s run %r, %d process(es) on %d node(s), device %s", __version__, spec.method,
                 spec.name, ctx.world_size, ctx.nnodes, ctx.device.type)
        self.tokenizer = load_or_train_tokenizer(spec, self.cache_dir / "tokenizers")
        self.startup_boundary("loading the tokenizer")
        self.data = build_data(spec, self.tokenizer, ctx)
        self.startup_boundary("loading the data")
        self.total_steps = total_steps_for(spec, self.data.batches_per_epoch)
        dtype = M.compute_dtype(spec.training.precision, ctx.device)
        self.work_dir = default_work_dir(spec, ctx.node_rank)
        if ctx.local_rank == 0:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            self.work_dir.mkdir(parents=True, exist_ok=True)
        ctx.barrier()
        self.engine, self._keep_alive = build_engine(spec, self.ds_config, self.tokenizer, dtype, ctx, self.cache_dir,
                                                     self.total_steps)
        self.startup_boundary("building the model and engine")
        fingerprint = M.config_fingerprint(self.engine.module.config)
        out = spec.output
        every_s = out.checkpoint_every_minutes * 60 if out.checkpoint_every_minutes else None
        self.ckpt = CheckpointManager(spec, ctx, self.engine, self.work_dir, RunIdentity(
            engine=self.engine.kind, model_fingerprint=fingerprint, method=spec.method, total_steps=self.total_steps,
            every_steps=out.checkpoint_every_steps, every_s=every_s))
        self.outputs = Outputs(spec, ctx, self.engine, self.tokenizer, self.ckpt, self.work_dir, fingerprint)
        loaded = self.ckpt.load()
        self.resumed = loaded is not None
        if loaded is not None:
            self.data.loader.load_state_dict(loaded.data)
            self.state, self.resumed_step, self.elapsed_before = loaded, loaded.step, loaded.elapsed_s
            log.info("resumed from checkpoint step %d (%s tokens seen)", loaded.step, f"{loaded.tokens_seen:,}")
            # A crash between a checkpoint's commit and its adapter's leaves the adapter missing;
            # the engine now holds exactly that checkpoint's weights, so export it again here.
            self.outputs.ensure_step_adapter(self.state)
        signal_at("setup")  # test-only; a no-op unless FTCLUSTER_TEST_SIGNAL_AT is set
        self.startup_boundary("resuming" if loaded is not None else "setting up")

    def startup_boundary(self, what: str) -> None:
        """Before the first step: all ranks agree on the stop flag; a stop ends the run with nothing to save."""
        if self.stop.agree(group=self.ctx.ctl_group)[0]:
            raise Stopped(f"while {what}")

    def stop_agreed(self) -> bool:
        """After the last step (collective): whether a stop signal reached any rank."""
        return self.stop.agree(group=self.ctx.ctl_group)[0]

    # -- state and checkpoints -----------------------------------------------------
    def elapsed(self) -> float:
        return self.elapsed_before + (time.monotonic() - self.t0)

    def sync_state(self) -> None:
        """Bring the saved-with-a-checkpoint fields of ``state`` up to date (data position, time)."""
        self.state.data = self.data.loader.state_dict()
        self.state.elapsed_s = self.elapsed()

    def checkpoint(self, final: bool) -> None:
        self.sync_state()
        self.ckpt.save(self.state, final=final)
        self.after_checkpoint(final)

    def after_checkpoint(self, final: bool) -> None:
        """After ``ckpt.save``: the LoRA step adapter, then the checkpoint record with the seconds
        training waited for both (``ckpt_blocked_s``)."""
        step, t0 = self.state.step, time.monotonic()
        self.outputs.after_checkpoint(self.state, self.last_eval)
        blocked, wait = self.ckpt.last_blocked_s + time.monotonic() - t0, self.ckpt.last_wait_s
        # Checkpoints closer together than their writes take wait for the previous one's writes.
        waited = f", {wait:.2f} s of it waiting for the previous checkpoint's writes" if wait >= 0.01 else ""
        self.reporter.event({"kind": "checkpoint", "step": step, "final": final, "ckpt_blocked_s": round(blocked, 4),
                             "ckpt_wait_s": round(wait, 4)},
                            f"checkpoint step {step} saved locally ({blocked:.2f} s{waited}); uploading in the background")

    def eval_record(self, kind: str, loss: float | None, **extra: Any) -> None:
        if loss is None:
            return
        rec = {"kind": kind, "step": self.state.step, "loss": loss, **extra}
        name = kind if "when" not in extra else f"{kind} ({extra['when']})"
        self.reporter.event(rec, f"{name} loss {loss:.4f} at step {self.state.step}")

    # -- run -------------------------------------------------------------------
    def run(self) -> int:
        from .metrics import MetricsReporter

        self.t0 = time.monotonic()
        try:
            self.setup()
        except Stopped:
            if hasattr(self, "ckpt"):
                self.ckpt.wait()  # a resume may have queued a missing adapter: let it commit
            self._shutdown()
            raise
        self.t0 = time.monotonic()
        self.reporter = MetricsReporter(enabled=self.ctx.is_main, total_steps=self.total_steps,
                                        start_step=self.state.step, log_every=self.spec.training.log_every_steps,
                                        sink=self._metrics_sink())
        try:
            return self._run()
        finally:
            self.reporter.close()
            if self.ctx.is_main:
                self.metrics_writer.close()

    def _metrics_sink(self):
        if not self.ctx.is_main:
            return None
        from ..storage.metrics import MetricsWriter
        from .metrics import JsonlSink

        self.metrics_writer = MetricsWriter(self.spec.output.uri, self.spec.output.storage_options,
                                            local_dir=self.work_dir, resume_step=self.state.step)
        return JsonlSink(self.metrics_writer.local_path, on_flush=lambda p: self.metrics_writer.upload())

    def _run(self) -> int:
        from .launch import mark_finished
        from .loop import evaluate, run_steps
        from .outputs import last_artifact

        spec, state = self.spec, self.state
        # Resumed at the last step with the final artifact committed (e.g. a requeue after the end).
        if self.resumed_step == self.total_steps and self.ckpt.finished(last_artifact(spec)):
            log.info("already complete: step %d and %s/ are committed under %s; nothing to do. To train again, "
                     "submit with --fresh (a new output folder beside it) or --set output.uri=<another folder>",
                     state.step, last_artifact(spec), spec.output.uri)
            self.ckpt.wait()
            self._shutdown()
            mark_finished()
            return 0
        log.info("training %d optimizer steps from step %d (%d batches of %d per process per epoch, "
                 "gradient accumulation %d)", self.total_steps, state.step, self.data.batches_per_epoch,
                 spec.training.micro_batch_size, spec.training.gradient_accumulation_steps)
        if not self.resumed:
            self.eval_record("eval", evaluate(self.engine, self.ctx, self.data.eval))
            state.general_eval_before = evaluate(self.engine, self.ctx, self.data.general_eval)
            self.eval_record("general_eval", state.general_eval_before, when="before")
        if run_steps(self):
            return self._preempted()
        return self._finish()

    def _preempted(self) -> int:
        from .launch import mark_preempted, preempted_hint

        mark_preempted()
        step = self.state.step
        try:
            self.ckpt.wait()
            self.reporter.event({"kind": "preempted", "step": step, "signal": self.stop.signal_name},
                                f"checkpoint step {step} committed; {preempted_hint()}")
        except TrainError as exc:
            log.error("stopping at step %d but its checkpoint did not commit (%s); a rerun resumes from the "
                      "last committed one", step, exc)
        self._shutdown()
        return PREEMPTED_EXIT

    def _finish(self) -> int:
        from .launch import mark_finished
        from .loop import evaluate

        # A stop during the finish is honoured at the boundaries below: what was submitted is
        # committed, then exit 143 and a rerun (resumed at the last step) redoes the exports.
        # Past the last boundary the finish completes and exits 0 (docs/training.md).
        state = self.state
        if self.resumed_step != state.step:  # else this very state is committed already
            self.checkpoint(final=True)  # resumable: a rerun after a crash below only redoes the exports
        if self.stop_agreed():
            return self._preempted()
        self.last_eval = evaluate(self.engine, self.ctx, self.data.eval)
        self.eval_record("eval", self.last_eval)
        general_after = evaluate(self.engine, self.ctx, self.data.general_eval)
        self.eval_record("general_eval", general_after, when="after")
        signal_at("final-export")  # test-only
        if not self.outputs.publish_final(state, self.last_eval, self.stop_agreed):
            return self._preempted()
        summary = {"kind": "summary", "step": state.step, "tokens_seen": state.tokens_seen,
                   "train_loss": state.last_loss, "eval_loss": self.last_eval,
                   "general_eval_before": state.general_eval_before, "general_eval_after": general_after,
                   "elapsed_s": self.elapsed()}
        self.reporter.event(summary, "done: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                          for k, v in summary.items() if k != "kind" and v is not None))
        self.ckpt.wait()
        if self.ctx.is_main:
            log.info("outputs committed under %s", self.spec.output.uri)
        signal_at("final-committed")  # test-only
        self._shutdown()
        mark_finished()  # after the barrier: rank 0 committed everything (a stop now still means "done")
        return 0

    def _shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            self.ctx.barrier()
            dist.destroy_process_group()


def run(payload: dict[str, Any], stop: StopFlag | None = None) -> int:
    """Train as the payload says; returns the process exit status (0 or 143).

    ``stop``: the flag whose handlers the caller installed (the worker entry does, first thing);
    without one, handlers are installed here and removed on return.

    A payload with variants (a job array) trains the variant this process is assigned
    (``FTCLUSTER_VARIANT`` or ``SLURM_ARRAY_TASK_ID``; :func:`ftcluster.plan.payload.select_payload`).
    """
    from ..plan.payload import select_payload
    from .launch import mark_preempted

    owned = stop is None
    stop = StopFlag().install() if stop is None else stop
    try:
        return Trainer(select_payload(payload, os.environ), stop).run()
    except Stopped as exc:
        mark_preempted()
        log.warning("stopped by %s %s, before the first step: nothing to save; exiting with %d",
                    stop.signal_name, exc, PREEMPTED_EXIT)
        return PREEMPTED_EXIT
    finally:
        if owned:
            stop.uninstall()
