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
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

from .. import __version__
from ..plan.engines import engine_for
from ..storage.layout import META, Artifact, artifact_name, step_adapter_name
from .checkpoint import CheckpointManager
from .engines.base import Engine
from .state import TrainState

log = logging.getLogger("ftcluster.train")


def last_artifact(spec: Any) -> Artifact:
    """The artifact published last at the end (uploads commit in order): its commit means "done"."""
    return cast(Artifact, engine_for(spec).last_artifact(spec))


class Outputs:
    def __init__(self, spec: Any, ctx: Any, engine: Engine, tokenizer: Any, ckpt: CheckpointManager,
                 work_dir: Path, model_fingerprint: str, cache_dir: Path):
        self.spec, self.ctx, self.engine, self.tokenizer, self.ckpt = spec, ctx, engine, tokenizer, ckpt
        self.work_dir, self.model_fingerprint, self.cache_dir = work_dir, model_fingerprint, cache_dir
        self._tokenizer_meta: dict[str, Any] | None = None
        self._trainable_params: int | None = None
        # The base's and the data's fingerprints (rank 0): hashing a base's weight files that ftcluster did not
        # commit reads them once (tens of seconds for an 8B model, then remembered per node), so it runs beside
        # training from the start instead of stalling every rank at the first checkpoint.
        self._identities: Future[tuple[dict[str, Any], dict[str, Any]]] | None = None
        if ctx.is_main:
            pool = ThreadPoolExecutor(1, thread_name_prefix="ftcluster-fingerprint")
            self._identities = pool.submit(self._fingerprints)
            pool.shutdown(wait=False)

    def meta(self, state: TrainState, eval_loss: float | None, kind: str = "step_adapter",
             general_after: float | None = None) -> dict[str, Any]:
        """The artifact's record (:mod:`ftcluster.artifacts.record`), without its size (:meth:`_export` adds it
        where the files are complete). Rank 0 (the base's and data's fingerprints: computed in the background
        since set-up, waited for here)."""
        from ..artifacts.record import build_record, lora_section, public_uri

        lora = None
        if self.spec.method == "lora":
            peft_config = getattr(self.engine.module, "peft_config", {}).get("default")
            lora = lora_section(peft_config.to_dict()) if peft_config is not None else None
        state_d = {"step": state.step, "tokens_seen": state.tokens_seen, "train_loss": state.last_loss,
                   "eval_loss": eval_loss, "general_eval_before": state.general_eval_before,
                   "general_eval_after": general_after}
        merged_from = {"artifact": "adapter", "step": state.step} if kind == "merged" else None
        return build_record(kind=kind, spec=self.spec, run={"uid": state.run_uid,
                                                            "output_uri": public_uri(self.spec.output.uri)},
                            base=self._base(), tokenizer=self.tokenizer_meta(), state=state_d, data=self._data(),
                            trainable_params=self._trainable(), lora=lora, size_bytes=None, version=__version__,
                            merged_from=merged_from)

    def _fingerprints(self) -> tuple[dict[str, Any], dict[str, Any]]:
        from ..artifacts.record import data_identity
        from .lineage import base_of_spec

        try:
            base = base_of_spec(self.spec, self.tokenizer, self.cache_dir)
        except Exception as exc:  # noqa: BLE001 - as above: the artifact commits, its lineage says unknown
            from ..artifacts.record import path_label
            from .model import model_source

            log.warning("artifact record: could not fingerprint the base model (%s); its lineage is recorded as "
                        "unknown", exc)
            m = self.spec.model
            base = {"source": path_label(m.path) if m.path else model_source(self.spec), "fingerprint": None,
                    "config_sha256": None}
        try:
            data = data_identity(self.spec)
        except Exception as exc:  # noqa: BLE001 - a record without the data's checksum beats a failed commit
            log.warning("artifact record: could not fingerprint the training data (%s); recorded as unknown", exc)
            data = {"kind": "unknown", "sha256": None}
        return base, data

    def _base(self) -> dict[str, Any]:
        assert self._identities is not None, "records are made on rank 0"
        return self._identities.result()[0]

    def _data(self) -> dict[str, Any]:
        assert self._identities is not None, "records are made on rank 0"
        return self._identities.result()[1]

    def _trainable(self) -> int:
        if self._trainable_params is None:
            self._trainable_params = sum(int(getattr(p, "ds_numel", p.numel()))
                                         for p in self.engine.module.parameters() if p.requires_grad)
        return self._trainable_params

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

            self._export(step_adapter_name(state.step), export, lambda: self.meta(state, eval_loss), background=True)

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
            self._export(name, self.engine.export, lambda: self.meta(state, None))

    def publish_final(self, state: TrainState, eval_loss: float | None,
                      stop: Callable[[], bool] = lambda: False, general_after: float | None = None) -> bool:
        """The end-of-run artifacts: the adapter (and the merged model) or the consolidated model (collective).

        Their metadata add the forgetting check (``general_eval_before``/``general_eval_after``: the
        general-text loss before and after training; None without ``data.general_eval``).
        ``stop`` is asked (collectively) before each export; False when it said stop: the exports
        already submitted still commit, the rest are left to a rerun.
        """
        exports = {"merged": self.engine.export_merged}  # "adapter", "final": the engine's export
        for name in engine_for(self.spec).artifacts(self.spec):  # the engine's recipe, in commit order
            if stop():
                return False
            self._export(artifact_name(cast(Artifact, name)), exports.get(name, self.engine.export),
                         lambda name=name: self.meta(state, eval_loss, kind=name, general_after=general_after))
        return True

    def _export(self, name: str, export: Any, meta: Callable[[], dict[str, Any]], background: bool = False) -> None:
        """``meta`` makes the record (rank 0 only). ``background`` (a step's adapter, asynchronous
        checkpoints): the tokenizer and the weights the export queued are written on the checkpoint
        writer's thread, then published; the record's size is then the manifest's to tell."""
        folder = self.work_dir / "export" / name.replace("/", "_")
        if self.ctx.local_rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        self.ctx.barrier()
        export(folder, self.ctx.rank)
        if self.ctx.is_main:
            record = meta()
            deferred = background and self.ckpt.writer.deferred
            if deferred:
                self.ckpt.writer.write("tokenizer", lambda: self.tokenizer.save_pretrained(str(folder)))
            else:
                self.tokenizer.save_pretrained(str(folder))
                record["size_bytes"] = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            (folder / META).write_text(json.dumps(record, indent=1, sort_keys=True, default=str))
            self.ckpt.publish(name, folder, record)
