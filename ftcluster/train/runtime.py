"""The training run: set up, resume, loop, checkpoint, evaluate, export.

One function, :func:`run`, drives everything from the resolved payload; the model work
is behind :mod:`.engine` (PlainEngine for LoRA, DeepSpeedEngine for full fine-tuning),
so the loop stays the same for both and open to later speed work (varlen attention via
position_ids, fused CE, torch.compile, selective recompute).

Per optimizer step every rank: takes ``gradient_accumulation_steps`` micro-batches,
all-reduces their label-token count (so the loss is the exact token mean of the global
batch), runs the engine step, then all ranks agree (MAX all-reduce on a CPU/gloo control
group) on "stop" (a SIGUSR2/SIGTERM reached any rank) and "time-based checkpoint due".
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import TrainError
from .distributed import DistContext, init_distributed, setup_logging
from .signals import PREEMPTED_EXIT, StopFlag

log = logging.getLogger("ftcluster.train")


# ----------------------------------------------------------------------------- data


@dataclass
class Data:
    loader: Any  # ShardedBatches for this rank
    eval: list[Any] | None  # this rank's eval batches
    general_eval: list[Any] | None
    batches_per_epoch: int


def build_data(spec: Any, tokenizer: Any, ctx: DistContext) -> Data:
    import torch

    from . import data as D

    ds = spec.data

    def examples(uri: str, fmt: str | None = None):
        recs = D.load_records(uri, ds.file_format, ds.storage_options)
        spec_for = ds if fmt is None else ds.model_copy(update={"format": fmt})
        return D.build_examples(recs, tokenizer, spec_for)

    train = D.PackedDataset(examples(ds.train), ds.seq_len, ds.packing, tokenizer.pad_token_id)
    loader = D.ShardedBatches(train, spec.training.micro_batch_size, ctx.rank, ctx.world_size, spec.training.seed)
    if len(loader) == 0:
        raise TrainError(f"data.train: {ds.train} yields no batch of {spec.training.micro_batch_size} sequences "
                         f"per process for {ctx.world_size} processes; add data or lower training.micro_batch_size")

    def eval_set(uri: str | None, fmt: str | None = None):
        if not uri:
            return None
        blocks = D.PackedDataset(examples(uri, fmt), ds.seq_len, ds.packing, tokenizer.pad_token_id)
        batches = list(D.eval_batches(blocks, spec.training.micro_batch_size))
        if not batches:
            return None
        mine = batches[ctx.rank::ctx.world_size]
        # Every rank runs the same number of forwards (ZeRO-3 gathers weights collectively in
        # forward): a rank with fewer batches adds a copy whose labels are all ignored.
        while len(mine) < math.ceil(len(batches) / ctx.world_size):
            mine.append({**batches[0], "labels": torch.full_like(batches[0]["labels"], -100)})
        return mine

    return Data(loader, eval_set(ds.eval), eval_set(ds.general_eval, "text"), len(loader))


# ----------------------------------------------------------------------------- run


def total_steps_for(spec: Any, batches_per_epoch: int) -> int:
    tr = spec.training
    if tr.max_steps:
        return tr.max_steps
    return max(1, math.ceil(tr.epochs * batches_per_epoch / tr.gradient_accumulation_steps))


class Trainer:
    """State of one training process; :func:`run` is the entry."""

    def __init__(self, payload: dict[str, Any]):
        from ..loader import spec_from_dict

        self.payload = payload
        self.spec = spec_from_dict(payload["spec"])
        self.ds_config = payload.get("deepspeed")
        self.ctx = init_distributed(self.spec)
        setup_logging(self.ctx.rank)
        self.stop = StopFlag().install()
        self.cache_dir = Path(os.environ.get("FTCLUSTER_CACHE") or Path.home() / ".cache" / "ftcluster")

    # -- setup ---------------------------------------------------------------
    def setup(self) -> None:
        from . import model as M
        from .checkpoint import Checkpointer, default_work_dir, seed_everything
        from .storage import CheckpointStore
        from .tokenizer import load_or_train_tokenizer

        spec, ctx = self.spec, self.ctx
        seed_everything(spec.training.seed)
        log.info("ftcluster %s: %s run %r, %d process(es) on %d node(s), device %s", __version__, spec.method,
                 spec.name, ctx.world_size, ctx.nnodes, ctx.device.type)
        self.tokenizer = load_or_train_tokenizer(spec, self.cache_dir / "tokenizers")
        self.data = build_data(spec, self.tokenizer, ctx)
        self.total_steps = total_steps_for(spec, self.data.batches_per_epoch)
        self.dtype = M.compute_dtype(spec.training.precision, ctx.device)
        out = spec.output
        self.store = CheckpointStore(out.uri, out.storage_options, out.keep_last, concurrency=out.upload_concurrency)
        self.work_dir = default_work_dir(spec, ctx.node_rank)
        if ctx.local_rank == 0:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            self.work_dir.mkdir(parents=True, exist_ok=True)
        ctx.barrier()
        self.ckpt = Checkpointer(self.store, ctx, self.work_dir)
        self.engine = self._build_engine()
        self.model_fingerprint = M.config_fingerprint(self.engine.module.config)
        self.step, self.tokens_seen, self.general_before, self.elapsed_before = 0, 0, None, 0.0
        self.resumed_step: int | None = None
        self.resumed = self._resume()

    def _build_engine(self):
        from . import engine as E
        from . import model as M

        spec, ctx = self.spec, self.ctx
        if spec.method == "lora":
            base = M.load_base_model(spec, self.tokenizer, self.dtype, ctx.device, self.cache_dir)
            model = M.apply_lora(base, spec.lora, spec.training.seed)
            return E.PlainEngine(model, spec, ctx.device, self.dtype, self.total_steps, ctx.world_size)
        if self.ds_config is None:
            raise TrainError("payload: a full fine-tune needs the 'deepspeed' config; render the job with ftcluster")
        if ctx.device.type != "cuda":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # skip DeepSpeed's accelerator probe and its warning
        import deepspeed

        cfg = E.prepare_ds_config(self.ds_config, ctx.device)
        zero3 = E.zero_stage(cfg) == 3
        if zero3:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds = HfDeepSpeedConfig(cfg)  # kept alive: transformers builds the model partitioned
        deepspeed.init_distributed(dist_backend="nccl" if ctx.device.type == "cuda" else "gloo")
        model = M.load_base_model(spec, self.tokenizer, self.dtype, ctx.device, self.cache_dir, zero3=zero3)
        return E.DeepSpeedEngine(model, spec, cfg, ctx.device, self.total_steps, ctx.world_size)

    def _resume(self) -> bool:
        found = self.ckpt.restore()
        if found is None:
            return False
        step, folder, state = found
        if state["world_size"] != self.ctx.world_size:
            raise TrainError(
                f"output.uri: checkpoint step {step} was written by {state['world_size']} processes, this run has "
                f"{self.ctx.world_size}; resume with the same resources or write to a new output.uri")
        if state["engine"] != self.engine.kind or state["model_fingerprint"] != self.model_fingerprint:
            raise TrainError(f"output.uri: checkpoint step {step} belongs to another model or method; "
                             "use a new output.uri for a changed spec")
        self.engine.load(folder / "engine")
        rank_state = self.ckpt.load_rank_state(folder)
        self.data.loader.load_state_dict(rank_state["data"])
        self.ckpt.cleanup_restore()
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.resumed_step = self.step
        self.general_before, self.elapsed_before = state.get("general_eval_before"), state.get("elapsed_s", 0.0)
        log.info("resumed from checkpoint step %d (%s tokens seen)", self.step, f"{self.tokens_seen:,}")
        return True

    # -- evaluation ------------------------------------------------------------
    def evaluate(self, batches: list[Any] | None) -> float | None:
        """Mean token loss over an eval set (each rank takes its share; collective)."""
        import torch

        if batches is None:
            return None
        ce = torch.zeros((), device=self.ctx.device, dtype=torch.float64)
        n = torch.zeros((), device=self.ctx.device, dtype=torch.float64)
        for b in batches:
            c, k = self.engine.eval_sums(b)
            ce += c.double()
            n += k.double()
        tot = self.ctx.all_sum_device(torch.stack([ce, n]))
        return float(tot[0] / tot[1]) if float(tot[1]) > 0 else None

    def _eval_record(self, kind: str, loss: float | None, **extra: Any) -> None:
        if loss is None:
            return
        rec = {"kind": kind, "step": self.step, "loss": loss, **extra}
        name = kind if "when" not in extra else f"{kind} ({extra['when']})"
        self.reporter.event(rec, f"{name} loss {loss:.4f} at step {self.step}")

    # -- checkpoints -----------------------------------------------------------
    def _shared_state(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "world_size": self.ctx.world_size,
                "engine": self.engine.kind, "model_fingerprint": self.model_fingerprint,
                "total_steps": self.total_steps, "general_eval_before": self.general_before,
                "elapsed_s": self.elapsed(), "ftcluster_version": __version__}

    def elapsed(self) -> float:
        return self.elapsed_before + (time.monotonic() - self.t0)

    def save_checkpoint(self, final: bool) -> None:
        folder = self.ckpt.snapshot(self.step, self.engine, self._shared_state(),
                                    {"data": self.data.loader.state_dict(), "step": self.step})
        meta = {"step": self.step, "tokens_seen": self.tokens_seen, "world_size": self.ctx.world_size,
                "method": self.spec.method, "last_loss": self.last_loss}
        self.ckpt.commit(self.step, folder, meta, final=final)
        self.reporter.event({"kind": "checkpoint", "step": self.step, "final": final},
                            f"checkpoint step {self.step} saved locally; uploading in the background")
        if self.spec.method == "lora":
            self.publish_adapter(f"adapters/step-{self.step:08d}")

    def artifact_meta(self) -> dict[str, Any]:
        from .model import model_source

        return {"base_model": model_source(self.spec), "base_config_sha256": self.model_fingerprint,
                "step": self.step, "tokens_seen": self.tokens_seen, "train_loss": self.last_loss,
                "eval_loss": self.last_eval, "training": self.spec.model_dump(mode="json"),
                "ftcluster_version": __version__}

    def _export_dir(self, name: str) -> Path:
        folder = self.work_dir / "export" / name.replace("/", "_")
        if self.ctx.local_rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        self.ctx.barrier()
        return folder

    def _publish(self, name: str, folder: Path, meta: dict[str, Any]) -> None:
        if self.ctx.is_main:
            (folder / "ftcluster_meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
            self.tokenizer.save_pretrained(str(folder))
            self.store.publish(name, folder, meta)

    def publish_adapter(self, name: str) -> None:
        folder = self._export_dir(name)
        self.engine.export(folder, self.ctx.rank)
        self._publish(name, folder, self.artifact_meta())

    # -- loop ------------------------------------------------------------------
    def run(self) -> int:
        from .metrics import MetricsReporter

        self.t0 = time.monotonic()
        self.last_loss: float | None = None
        self.last_eval: float | None = None
        try:
            self.setup()
        except BaseException:
            self.stop.uninstall()
            raise
        self.t0 = time.monotonic()
        self.reporter = MetricsReporter(enabled=self.ctx.is_main, total_steps=self.total_steps,
                                        start_step=self.step, log_every=self.spec.training.log_every_steps,
                                        sink=self._metrics_sink())
        try:
            return self._run()
        finally:
            self.reporter.close()
            if self.ctx.is_main:
                self.metrics_writer.close()
            self.stop.uninstall()

    def _metrics_sink(self):
        if not self.ctx.is_main:
            return None
        from .metrics import JsonlSink
        from .storage import MetricsWriter

        self.metrics_writer = MetricsWriter(self.spec.output.uri, self.spec.output.storage_options,
                                            local_dir=self.work_dir, resume_step=self.step)
        return JsonlSink(self.metrics_writer.local_path, on_flush=lambda p: self.metrics_writer.upload())

    def _last_artifact(self) -> str:
        """The artifact published last at the end (uploads commit in order)."""
        if self.spec.method != "lora":
            return "final"
        return "merged" if self.spec.lora.merge_at_end else "adapter"

    def _already_done(self) -> bool:
        """Resumed at the last step with the final artifact committed (e.g. a requeue after the end)."""
        from .storage import MANIFEST

        if self.resumed_step != self.total_steps:
            return False
        name = self._last_artifact()
        flag = [self.store.fs.exists(f"{self.store.root}/{name}/{MANIFEST}") if self.ctx.is_main else False]
        if self.ctx.world_size > 1:
            import torch.distributed as dist

            dist.broadcast_object_list(flag, src=0, group=self.ctx.ctl_group)
        return bool(flag[0])

    def _run(self) -> int:
        spec = self.spec
        if self._already_done():
            log.info("this run already finished: step %d and %s/ are committed under %s; nothing to do",
                     self.step, self._last_artifact(), spec.output.uri)
            self._shutdown()
            return 0
        log.info("training %d optimizer steps from step %d (%d batches of %d per process per epoch, "
                 "gradient accumulation %d)", self.total_steps, self.step, self.data.batches_per_epoch,
                 spec.training.micro_batch_size, spec.training.gradient_accumulation_steps)
        if not self.resumed:
            self._eval_record("eval", self.evaluate(self.data.eval))
            self.general_before = self.evaluate(self.data.general_eval)
            self._eval_record("general_eval", self.general_before, when="before")
        stopped = self._loop()
        if stopped:
            return self._preempted()
        return self._finish()

    def _next_micro_batches(self) -> list[Any]:
        out = []
        for _ in range(self.spec.training.gradient_accumulation_steps):
            out.append(self.data.loader.next_batch())
        return out

    def _loop(self) -> bool:
        from .engine import count_label_tokens
        from .metrics import peak_memory_gb

        spec, ctx = self.spec, self.ctx
        every_steps = spec.output.checkpoint_every_steps
        every_s = spec.output.checkpoint_every_minutes * 60 if spec.output.checkpoint_every_minutes else None
        eval_every = spec.training.eval_every_steps
        last_ckpt = time.monotonic()
        pending: list[tuple[int, Any, Any, float, int, int, float]] = []  # loss/grad norm stay tensors until flush
        window_t, window_tokens = time.monotonic(), 0

        def flush() -> None:
            nonlocal window_t, window_tokens
            if not pending:
                return
            now = time.monotonic()
            rate = window_tokens / max(now - window_t, 1e-9)
            mem = peak_memory_gb(ctx.device)
            for step, loss, gn, lr, tokens, seen, elapsed in pending:
                rec = {"step": step, "loss": float(loss), "lr": lr, "grad_norm": float(gn),
                       "tokens": tokens, "tokens_per_s": rate, "peak_mem_gb": mem,
                       "elapsed_s": elapsed, "tokens_seen": seen}
                if ctx.device.type == "cuda":
                    import torch

                    rec["peak_mem_reserved_gb"] = torch.cuda.max_memory_reserved(ctx.device) / 2**30
                self.last_loss = rec["loss"]
                self.reporter.train_step(rec)
            pending.clear()
            window_t, window_tokens = now, 0

        while self.step < self.total_steps:
            micro = self._next_micro_batches()
            n_labels = sum(count_label_tokens(b) for b in micro)
            n_tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                           for b in micro)
            g_labels, g_tokens = ctx.all_sum([n_labels, n_tokens])
            scale = self.engine.grad_accum_scale / max(g_labels, 1.0)
            lr = self.engine.lr  # the rate this step uses
            ce_sum, grad_norm = self.engine.train_step(micro, scale)
            loss = ctx.all_sum_device(ce_sum) / max(g_labels, 1.0)
            self.step += 1
            self.tokens_seen += int(g_tokens)
            window_tokens += int(g_tokens)
            pending.append((self.step, loss, grad_norm, lr, int(g_tokens), self.tokens_seen, self.elapsed()))
            time_due = 1 if (every_s and time.monotonic() - last_ckpt >= every_s) else 0
            stop, time_due, uploading = self.stop.agree(time_due, self.ckpt.busy(), group=ctx.ctl_group)
            if not uploading:
                self.ckpt.commit_ready()  # multi-node: every node finished its part of a checkpoint
            last = self.step == self.total_steps
            if self.step % spec.training.log_every_steps == 0 or stop or last:
                flush()
            if eval_every and self.step % eval_every == 0 and not last:
                flush()
                self.last_eval = self.evaluate(self.data.eval)
                self._eval_record("eval", self.last_eval)
            if stop:
                flush()
                log.info("stop requested (%s): saving step %d, then exiting", self.stop.signal_name, self.step)
                self.save_checkpoint(final=True)
                return True
            if not last and ((every_steps and self.step % every_steps == 0) or time_due):
                flush()
                self.save_checkpoint(final=False)
                last_ckpt = time.monotonic()
        flush()
        return False

    def _preempted(self) -> int:
        from .launch import mark_preempted

        mark_preempted()
        try:
            self.ckpt.wait()
            self.reporter.event({"kind": "preempted", "step": self.step, "signal": self.stop.signal_name},
                                f"checkpoint step {self.step} committed; exiting with {PREEMPTED_EXIT} "
                                "so the scheduler requeues the job")
        except TrainError as exc:
            log.error("stopping at step %d but its checkpoint did not commit (%s); a rerun resumes from the "
                      "last committed one", self.step, exc)
        self._shutdown()
        return PREEMPTED_EXIT

    def _finish(self) -> int:
        spec = self.spec
        if self.resumed_step != self.step:  # else this very state is committed already
            self.save_checkpoint(final=True)  # resumable: a rerun after a crash below only redoes the exports
        self.last_eval = self.evaluate(self.data.eval)
        self._eval_record("eval", self.last_eval)
        general_after = self.evaluate(self.data.general_eval)
        self._eval_record("general_eval", general_after, when="after")
        if spec.method == "lora":
            self.publish_adapter("adapter")
        else:
            folder = self._export_dir("final")
            self.engine.export(folder, self.ctx.rank)
            self._publish("final", folder, self.artifact_meta())
        if spec.method == "lora" and spec.lora.merge_at_end:
            folder = self._export_dir("merged")
            self.engine.export_merged(folder, self.ctx.rank)
            self._publish("merged", folder, self.artifact_meta())
        summary = {"kind": "summary", "step": self.step, "tokens_seen": self.tokens_seen, "train_loss": self.last_loss,
                   "eval_loss": self.last_eval, "general_eval_before": self.general_before,
                   "general_eval_after": general_after, "elapsed_s": self.elapsed()}
        self.reporter.event(summary, "done: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                          for k, v in summary.items() if k != "kind" and v is not None))
        self.ckpt.wait()
        if self.ctx.is_main:
            log.info("outputs committed under %s", spec.output.uri)
        self._shutdown()
        return 0

    def _shutdown(self) -> None:
        import torch.distributed as dist

        self.stop.uninstall()
        if dist.is_initialized():
            self.ctx.barrier()
            dist.destroy_process_group()


def run(payload: dict[str, Any]) -> int:
    """Train as the payload says; returns the process exit status (0 or 143).

    A payload with variants (a job array) trains the variant this process is assigned
    (``FTCLUSTER_VARIANT`` or ``SLURM_ARRAY_TASK_ID``; :func:`ftcluster.payload.select_payload`).
    """
    from ..payload import select_payload

    return Trainer(select_payload(payload, os.environ)).run()
