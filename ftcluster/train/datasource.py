"""The training data as the loop sees it, and the run's data built from its spec.

A :class:`DataSource` hands this rank its next micro-batch and saves/restores its position (a
checkpoint part, :mod:`.state`); one with a length (``__len__``: batches per epoch per rank)
has epochs, one without is a stream, trained for ``training.max_steps``. :class:`~.data.ShardedBatches`
(packed blocks, a permutation per epoch) is the one :func:`build_data` makes today.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sized
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ..errors import TrainError
from .distributed import DistContext

log = logging.getLogger("ftcluster.train")


@runtime_checkable
class DataSource(Protocol):
    """This rank's training batches, resumable; optionally ``__len__`` (batches per epoch per rank)."""

    def next_batch(self) -> dict[str, Any]:
        """The next micro-batch of this rank (a source with epochs rolls over into the next one)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The position, to resume from (saved per rank in each checkpoint)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position :meth:`state_dict` gave (raises TrainError when it cannot)."""
        ...


def epoch_length(source: DataSource) -> int | None:
    """Batches per epoch per rank of ``source``; None for a stream (no ``__len__``)."""
    return len(source) if isinstance(source, Sized) else None


@dataclass
class Data:
    train: DataSource  # this rank's training batches
    eval: list[Any] | None  # this rank's eval batches
    general_eval: list[Any] | None

    @property
    def batches_per_epoch(self) -> int | None:
        return epoch_length(self.train)

    def close(self) -> None:
        """Stop what the training source runs in the background (a stream's reader thread)."""
        close = getattr(self.train, "close", None)
        if close is not None:
            close()


def build_data(spec: Any, tokenizer: Any, ctx: DistContext, streamed: bool = False) -> Data:
    """The run's data: a prepared corpus streamed (``streamed``), else records read, tokenized and packed."""
    import torch

    from . import data as D

    ds = spec.data

    def examples(uri: str, fmt: str | None = None):
        recs = D.load_records(uri, ds.file_format, ds.storage_options)
        spec_for = ds if fmt is None else ds.model_copy(update={"format": fmt})
        return D.build_examples(recs, tokenizer, spec_for)

    if streamed:
        loader: Any = streamed_source(spec, tokenizer, ctx)
    else:
        train = D.PackedDataset(examples(ds.train), ds.seq_len, ds.packing, tokenizer.pad_token_id)
        loader = D.ShardedBatches(train, spec.training.micro_batch_size, ctx.rank, ctx.world_size,
                                  spec.training.seed)
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

    return Data(loader, eval_set(ds.eval), eval_set(ds.general_eval, "text"))


def streamed_source(spec: Any, tokenizer: Any, ctx: DistContext) -> DataSource:
    """This rank's share of the prepared corpus ``data.train``, checked against the run's tokenizer."""
    from .stream import StreamingCorpus, check_tokenizer

    ds = spec.data
    source = StreamingCorpus(ds.train, ds.storage_options, ds.seq_len, spec.training.micro_batch_size, ctx.rank,
                             ctx.world_size, spec.training.seed)
    check_tokenizer(source.manifest, tokenizer, ds.train)
    log.info("data: streaming %s: %s tokens in %d shards", ds.train, f"{source.manifest.tokens:,}",
             len(source.manifest.shards))
    return source


def total_steps_for(spec: Any, batches_per_epoch: int | None) -> int:
    """``training.max_steps``, else the optimizer steps of ``training.epochs`` (a stream has no epochs)."""
    tr = spec.training
    if tr.max_steps:
        return tr.max_steps
    if batches_per_epoch is None:
        raise TrainError("training.max_steps: the training data is a stream (no epochs); set max_steps")
    return max(1, math.ceil(tr.epochs * batches_per_epoch / tr.gradient_accumulation_steps))
