"""Building a run's parts from its spec: the data of this rank, the number of steps, the engine."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

from ..errors import TrainError
from .distributed import DistContext
from .engine import Engine

log = logging.getLogger("ftcluster.train")


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


def total_steps_for(spec: Any, batches_per_epoch: int) -> int:
    tr = spec.training
    if tr.max_steps:
        return tr.max_steps
    return max(1, math.ceil(tr.epochs * batches_per_epoch / tr.gradient_accumulation_steps))


def build_engine(spec: Any, ds_config: dict[str, Any] | None, tokenizer: Any, dtype: Any, ctx: DistContext,
                 cache_dir: Any, total_steps: int) -> tuple[Engine, Any]:
    """The engine for ``spec.method``, and an object to keep alive as long as it (ZeRO-3's HF config)."""
    from . import engine as E
    from . import model as M

    if spec.method == "lora":
        base = M.load_base_model(spec, tokenizer, dtype, ctx.device, cache_dir)
        model = M.apply_lora(base, spec.lora, spec.training.seed)
        if spec.training.compile:
            M.compile_layers(model)
        return E.PlainEngine(model, spec, ctx.device, dtype, total_steps, ctx.world_size), None
    if ds_config is None:
        raise TrainError("payload: a full fine-tune needs the 'deepspeed' config; render the job with ftcluster")
    if ctx.device.type != "cuda":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # skip DeepSpeed's accelerator probe and its warning
    import deepspeed

    cfg = E.prepare_ds_config(ds_config, ctx.device)
    zero3 = E.zero_stage(cfg) == 3
    keep = None
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(cfg)  # kept alive: transformers builds the model partitioned
    deepspeed.init_distributed(dist_backend="nccl" if ctx.device.type == "cuda" else "gloo")
    model = M.load_base_model(spec, tokenizer, dtype, ctx.device, cache_dir, zero3=zero3)
    if spec.training.compile:
        if zero3:  # a config_file that sets stage 3 (the spec's own zero_stage 3 is refused on load)
            log.warning("training.compile: not with ZeRO-3 (deepspeed.config_file sets stage 3); running uncompiled")
        else:
            M.compile_layers(model)
    return E.DeepSpeedEngine(model, spec, cfg, ctx.device, total_steps, ctx.world_size), keep
