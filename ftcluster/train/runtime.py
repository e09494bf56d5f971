"""The training run: set up, resume, loop, checkpoint, evaluate, export.

One function, :func:`run`, drives everything from the resolved payload. The parts live beside
it: :mod:`.datasource` (the data source and eval sets), :mod:`.engines` (the engine its recipe
names), :mod:`.state` (the train state and RNGs), :mod:`.checkpoint` (save and resume of those
parts, behind :class:`~.checkpoint.CheckpointManager`), :mod:`.loop` (the optimizer steps, given
a narrow :class:`~.loop.LoopContext`, and evaluation), :mod:`.hooks` (a checkpoint's step
adapter and record), :mod:`.outputs` (the published adapter/model folders). The model work is
behind :class:`~.engines.base.Engine` (PlainEngine for LoRA, DeepSpeedEngine for full
fine-tuning), so the loop stays the same for both and open to later speed work.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import TrainError
from ..storage.testhook import signal_at
from .distributed import init_distributed, setup_logging
from .faults import PROGRESS, start_watchdog
from .signals import PREEMPTED_EXIT, StopFlag, Stopped
from .state import TrainState

log = logging.getLogger("ftcluster.train")


class Trainer:
    """State of one training process; :func:`run` is the entry."""

    def __init__(self, payload: dict[str, Any], stop: StopFlag):
        from ..plan.payload import fit_to_world
        from ..spec.loader import spec_from_dict

        self.stop = stop
        # resources.min_nodes: the job may have got fewer nodes than the spec asks for (Slurm MIN-MAX)
        payload, fitted = fit_to_world(payload, int(os.environ.get("WORLD_SIZE") or 0))
        self.payload = payload
        self.spec = spec_from_dict(payload["spec"])
        if stop.local:
            raise Stopped("before the process group was set up")
        self.ctx = init_distributed(self.spec)
        setup_logging(self.ctx.rank)
        if fitted:
            (log.warning if "CHANGES" in fitted else log.info)("%s", fitted)
        # Names a silent or stuck peer after training.hang_timeout (set-up is exempt while beating).
        PROGRESS.enter("setting up", exempt=True)
        self.watchdog = start_watchdog(self.ctx.rank, self.ctx.world_size, self.spec.training.hang_timeout)
        self.cache_dir = Path(os.environ.get("FTCLUSTER_CACHE") or Path.home() / ".cache" / "ftcluster")
        self.state = TrainState()
        self.resumed_step: int | None = None  # the step of the checkpoint resumed from
        self.started = time.monotonic()  # the process's set-up starts

    # -- setup ---------------------------------------------------------------
    def setup(self) -> None:
        from . import model as M
        from .checkpoint import CheckpointManager, RunIdentity, default_work_dir
        from .datasource import build_data, total_steps_for
        from .engines import build_engine
        from .outputs import Outputs
        from .state import RngState, seed_everything
        from .tokenizer import TokenizerPart, load_or_train_tokenizer

        spec, ctx = self.spec, self.ctx
        self.lease = self._take_lease()  # first: a second writer of output.uri stops here (rank 0)
        self.startup_boundary("joining the other processes")
        seed_everything(spec.training.seed)
        log.info("ftcluster %s: %s run %r, %d process(es) on %d node(s), device %s", __version__, spec.method,
                 spec.name, ctx.world_size, ctx.nnodes, ctx.device.type)
        from ..corpus.format import streamed
        from .stream import load_corpus_tokenizer, trains_own_tokenizer

        streams = streamed(spec.data)
        if streams and trains_own_tokenizer(spec):
            self.tokenizer = load_corpus_tokenizer(spec, self.cache_dir / "tokenizers")
        else:
            self.tokenizer = load_or_train_tokenizer(spec, self.cache_dir / "tokenizers")
        self.startup_boundary("loading the tokenizer")
        began = time.monotonic()
        self.data = build_data(spec, self.tokenizer, ctx, streams)
        log.info("data: %s in %.2f s", "ready" if streams else "read, tokenized and packed", time.monotonic() - began)
        self.startup_boundary("loading the data")
        self.total_steps = total_steps_for(spec, self.data.batches_per_epoch)
        dtype = M.compute_dtype(spec.training.precision, ctx.device)
        self.work_dir = default_work_dir(spec, ctx.node_rank)
        if ctx.local_rank == 0:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            self.work_dir.mkdir(parents=True, exist_ok=True)
        ctx.barrier()
        self.engine, self._keep_alive = build_engine(spec, self.payload, self.tokenizer, dtype, ctx, self.cache_dir,
                                                     self.total_steps)
        self.startup_boundary("building the model and engine")
        fingerprint = M.config_fingerprint(self.engine.module.config)
        out = spec.output
        every_s = out.checkpoint_every_minutes * 60 if out.checkpoint_every_minutes else None
        identity = RunIdentity(engine=self.engine.kind, model_fingerprint=fingerprint, method=spec.method,
                               total_steps=self.total_steps, every_steps=out.checkpoint_every_steps, every_s=every_s)
        self.ckpt = CheckpointManager(spec, ctx, self.work_dir, identity, parts={
            "train": self.state, "tokenizer": TokenizerPart(self.tokenizer), "engine": self.engine,
            "data": self.data.train, "rng": RngState(ctx.device)}, lease=self.lease)
        self.outputs = Outputs(spec, ctx, self.engine, self.tokenizer, self.ckpt, self.work_dir, fingerprint,
                               self.cache_dir)
        if self.ckpt.load():
            self.resumed_step = self.state.step
            log.info("resumed from checkpoint step %d (%s tokens seen)", self.state.step, f"{self.state.tokens_seen:,}")
            # A crash between a checkpoint's commit and its adapter's leaves the adapter missing;
            # the engine now holds exactly that checkpoint's weights, so export it again here.
            self.outputs.ensure_step_adapter(self.state)
        signal_at("setup")  # test-only; a no-op unless FTCLUSTER_TEST_SIGNAL_AT is set
        self.startup_boundary("resuming" if self.resumed else "setting up")

    # -- one writer per output.uri (storage/lease.py; docs/storage.md, "One writer per output") --------------
    # Rank 0 holds the lease: it is the process that commits, it runs the same way under every backend
    # (local, Slurm, Kubernetes), and it dies with the run, so a crashed run stops renewing.
    def _take_lease(self) -> Any:
        """Rank 0: take the output's lease (LeaseHeld: the one-line refusal) and keep it renewed."""
        if self.ctx.rank != 0:
            return None
        from ..storage.lease import Lease

        out = self.spec.output
        lease = Lease(out.uri, out.storage_options, retry_max_s=out.final_upload_timeout)
        lease.acquire()
        lease.keep_renewed(_lease_lost)
        return lease

    def release_lease(self) -> None:
        """After the run's last commit (finished, stopped or failed with an error): let the next run in now."""
        lease = getattr(self, "lease", None)
        if lease is not None:
            lease.release()

    @property
    def resumed(self) -> bool:
        return self.resumed_step is not None

    def startup_boundary(self, what: str) -> None:
        """Before the first step: all ranks agree on the stop flag; a stop ends the run with nothing to save."""
        if self.stop.agree(group=self.ctx.ctl_group)[0]:
            raise Stopped(f"while {what}")

    def stop_agreed(self) -> bool:
        """After the last step (collective): whether a stop signal reached any rank."""
        return self.stop.agree(group=self.ctx.ctl_group)[0]

    # -- run -------------------------------------------------------------------
    def run(self) -> int:
        from .hooks import Checkpointing
        from .loop import Evaluator
        from .metrics import open_reporter

        try:
            self.setup()
        except Stopped:
            if hasattr(self, "ckpt"):
                self.ckpt.wait()  # a resume may have queued a missing adapter: let it commit
            self._shutdown()
            self._remove_work_dir()
            raise
        self.state.start_clock()
        self.reporter = open_reporter(self.spec, self.ctx, self.work_dir, self.total_steps, self.state.step,
                                      group=self.payload.get("group"))
        self.evals = Evaluator(self.engine, self.ctx, self.data.eval, self.data.general_eval, self.reporter,
                               self.state)
        self.saves = Checkpointing(self.ckpt, self.outputs, self.reporter, lambda: self.evals.last)
        try:
            code = self._run()
        finally:
            self.reporter.close()
        self._remove_work_dir()  # success or stop: everything is committed (metrics.jsonl with the close)
        return code

    def _remove_work_dir(self) -> None:
        from .checkpoint import remove_work_dir

        if hasattr(self, "work_dir") and self.ctx.local_rank == 0:  # after _shutdown's barrier: the node is done
            remove_work_dir(self.work_dir)

    def _run(self) -> int:
        from .launch import mark_finished
        from .loop import LoopContext, run_steps
        from .outputs import last_artifact

        spec, state, tr = self.spec, self.state, self.spec.training
        # Resumed at the last step with the final artifact committed (e.g. a requeue after the end).
        if self.resumed_step == self.total_steps and self.ckpt.finished(last_artifact(spec)):
            log.info("already complete: step %d and %s/ are committed under %s; nothing to do. To train again, "
                     "submit with --fresh (a new output folder beside it) or --set output.uri=<another folder>",
                     state.step, last_artifact(spec), spec.output.uri)
            self.ckpt.wait()
            self._shutdown()
            mark_finished()
            return 0
        per_epoch = self.data.batches_per_epoch
        log.info("training %d optimizer steps from step %d (%s of %d per process%s, gradient accumulation %d); "
                 "set-up took %.1f s", self.total_steps, state.step,
                 "a stream of batches" if per_epoch is None else f"{per_epoch} batches", tr.micro_batch_size,
                 "" if per_epoch is None else " per epoch", tr.gradient_accumulation_steps,
                 time.monotonic() - self.started)
        if not self.resumed:
            self.evals.eval(remember=False)  # the baseline; checkpoints' metadata carry evals from step 1 on
            state.general_eval_before = self.evals.general("before")
        if run_steps(LoopContext(
                engine=self.engine, data=self.data.train, ctx=self.ctx, stop=self.stop, state=state,
                total_steps=self.total_steps, grad_accum=tr.gradient_accumulation_steps, log_every=tr.log_every_steps,
                eval_every=tr.eval_every_steps, report=self.reporter.train_step, evaluate=self.evals.eval,
                checkpoints=self.saves)):
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

        # A stop during the finish is honoured at the boundaries below: what was submitted is
        # committed, then exit 143 and a rerun (resumed at the last step) redoes the exports.
        # Past the last boundary the finish completes and exits 0 (docs/training.md).
        state = self.state
        PROGRESS.enter("finishing (final checkpoint, evaluation, exports)", state.step, exempt=True)
        if self.resumed_step != state.step:  # else this very state is committed already
            self.saves.save(final=True)  # resumable: a rerun after a crash below only redoes the exports
        if self.stop_agreed():
            return self._preempted()
        last_eval = self.evals.eval()
        general_after = self.evals.general("after")
        signal_at("final-export")  # test-only
        if not self.outputs.publish_final(state, last_eval, self.stop_agreed, general_after):
            return self._preempted()
        summary = {"kind": "summary", "step": state.step, "tokens_seen": state.tokens_seen,
                   "train_loss": state.last_loss, "eval_loss": last_eval,
                   "general_eval_before": state.general_eval_before, "general_eval_after": general_after,
                   "elapsed_s": state.elapsed()}
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

        PROGRESS.enter("shutting down", exempt=True)
        if hasattr(self, "data"):
            self.data.close()
        if dist.is_initialized():
            self.ctx.barrier()
            if self.watchdog is not None:
                self.watchdog.stop()
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
    trainer: Trainer | None = None
    try:
        trainer = Trainer(select_payload(payload, os.environ), stop)
        return trainer.run()
    except Stopped as exc:
        mark_preempted()
        log.warning("stopped by %s %s, before the first step: nothing to save; exiting with %d",
                    stop.signal_name, exc, PREEMPTED_EXIT)
        return PREEMPTED_EXIT
    finally:
        if trainer is not None:
            trainer.release_lease()
        if owned:
            stop.uninstall()


def _lease_lost(message: str) -> None:
    """The renewing thread found the output's lease taken by another run: stop now, exit 1, commit nothing
    more (a stop with a checkpoint would try to commit, and exit 143 would requeue on Slurm)."""
    print(f"error (rank 0): {message}", file=sys.stderr, flush=True)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(1)
