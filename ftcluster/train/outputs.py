"""The run's published folders: the LoRA adapter of each checkpoint and the end-of-run artifacts.

Each is exported into a node-local folder (collective: ZeRO-3 gathers its shards), then rank 0
adds ``ftcluster_meta.json`` and the tokenizer and publishes it through the checkpoint manager,
whose store commits it like a checkpoint (manifest last).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from .. import __version__
from ..plan.engines import engine_for
from ..storage.layout import Artifact, artifact_name, step_adapter_name
from .checkpoint import CheckpointManager
from .engines.base import Engine
from .state import TrainState

log = logging.getLogger("ftcluster.train")


def last_artifact(spec: Any) -> Artifact:
    """The artifact published last at the end (uploads commit in order): its commit means "done"."""
    return cast(Artifact, engine_for(spec).last_artifact(spec))


class Outputs:
    def __init__(self, spec: Any, ctx: Any, engine: Engine, tokenizer: Any, ckpt: CheckpointManager,
                 work_dir: Path, model_fingerprint: str):
        self.spec, self.ctx, self.engine, self.tokenizer, self.ckpt = spec, ctx, engine, tokenizer, ckpt
        self.work_dir, self.model_fingerprint = work_dir, model_fingerprint
        self._tokenizer_meta: dict[str, Any] | None = None

    def meta(self, state: TrainState, eval_loss: float | None) -> dict[str, Any]:
        from .model import model_source

        return {"base_model": model_source(self.spec), "base_config_sha256": self.model_fingerprint,
                "tokenizer": self.tokenizer_meta(),
                "step": state.step, "tokens_seen": state.tokens_seen, "train_loss": state.last_loss,
                "eval_loss": eval_loss, "training": self.spec.model_dump(mode="json"),
                "ftcluster_version": __version__}

    def tokenizer_meta(self) -> dict[str, Any]:
        """The vocabulary the artifacts were trained with: its size, the size before the spec's added
        tokens (``ftcluster sample`` rebuilds the base's rows from it), those tokens and the fingerprint."""
        if self._tokenizer_meta is None:
            from ..corpus.format import tokenizer_fingerprint

            tok = self.tokenizer
            base = getattr(tok, "ftcluster_base_vocab", len(tok))
            added = [t for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]) if i >= base]
            self._tokenizer_meta = {"vocab": len(tok), "base_vocab": base, "added": added,
                                    "sha256": tokenizer_fingerprint(tok)}
        return self._tokenizer_meta

    def after_checkpoint(self, state: TrainState, eval_loss: float | None) -> None:
        """LoRA: publish the adapter of the checkpoint just saved (collective)."""
        if self.spec.method == "lora":
            writer = self.ckpt.writer

            def export(folder: Path, rank: int) -> None:
                self.engine.export(folder, rank, writer=writer)

            self._export(step_adapter_name(state.step), export, self.meta(state, eval_loss), background=True)

    def ensure_step_adapter(self, state: TrainState) -> None:
        """LoRA, on resume: publish ``adapters/step-N`` of the checkpoint resumed from if it is missing
        (collective; the engine must hold that checkpoint's weights).

        A crash between the commit of ``checkpoints/step-N`` and that of its adapter leaves exactly
        this gap, and only for the newest committed checkpoint: the store commits in submission
        order, so every older checkpoint's adapter committed before it.
        """
        if self.spec.method != "lora":
            return
        name = step_adapter_name(state.step)
        if not self.ckpt.is_published(name):
            log.info("checkpoint step %d has no %s/ (the run stopped before it was committed); exporting it "
                     "again", state.step, name)
            self._export(name, self.engine.export, self.meta(state, None))

    def publish_final(self, state: TrainState, eval_loss: float | None,
                      stop: Callable[[], bool] = lambda: False, general_after: float | None = None) -> bool:
        """The end-of-run artifacts: the adapter (and the merged model) or the consolidated model (collective).

        Their metadata add the forgetting check (``general_eval_before``/``general_eval_after``: the
        general-text loss before and after training; None without ``data.general_eval``).
        ``stop`` is asked (collectively) before each export; False when it said stop: the exports
        already submitted still commit, the rest are left to a rerun.
        """
        meta = {**self.meta(state, eval_loss), "general_eval_before": state.general_eval_before,
                "general_eval_after": general_after}
        exports = {"merged": self.engine.export_merged}  # "adapter", "final": the engine's export
        for name in engine_for(self.spec).artifacts(self.spec):  # the engine's recipe, in commit order
            if stop():
                return False
            self._export(artifact_name(cast(Artifact, name)), exports.get(name, self.engine.export), meta)
        return True

    def _export(self, name: str, export: Any, meta: dict[str, Any], background: bool = False) -> None:
        """``background`` (a step's adapter, asynchronous checkpoints): the tokenizer and the
        weights the export queued are written on the checkpoint writer's thread, then published."""
        folder = self.work_dir / "export" / name.replace("/", "_")
        if self.ctx.local_rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        self.ctx.barrier()
        export(folder, self.ctx.rank)
        if self.ctx.is_main:
            (folder / "ftcluster_meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
            if background and self.ckpt.writer.deferred:
                self.ckpt.writer.write("tokenizer", lambda: self.tokenizer.save_pretrained(str(folder)))
            else:
                self.tokenizer.save_pretrained(str(folder))
            self.ckpt.publish(name, folder, meta)
