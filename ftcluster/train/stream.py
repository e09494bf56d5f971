"""Stream a prepared corpus (:mod:`ftcluster.corpus.format`): each rank reads only its own blocks.

The corpus is cut into blocks of ``seq_len`` tokens, shard by shard (a shard's last partial block,
fewer than ``seq_len`` tokens, is left out: at most one block per shard). Documents run across
blocks as they lie in the shard (concatenate-and-chunk, as pre-training does); inside a block the
position ids restart at every document start and the label of a document's first token is -100,
so the variable-length attention keeps documents apart and no loss crosses a document boundary.

**Order.** Epoch ``e`` visits the shards in ``permutation(seed, e)`` and, inside a shard, its
blocks in ``permutation(seed, e, shard)``: one global sequence of blocks per epoch that does not
depend on the number of ranks. Global batch ``b`` of an epoch is blocks ``[b*W*B, (b+1)*W*B)``
of that sequence (W ranks, B micro-batch size) and rank ``r`` takes its ``r``-th slice of ``B``;
the blocks that do not fill a last global batch are left out of that epoch only.

**Position.** The state is ``(epoch, consumed)``: the global blocks used so far in the epoch, the
same number on every rank. A resume on the same ranks continues at the same block, so at the same
token; a resume on a different number of ranks continues at the same global block too, so nothing
is repeated or skipped (ranks only regroup which block goes where).

**Reading.** A background thread reads the blocks of the next micro-batches with one
``fs.cat_ranges`` call (concurrent on object stores; the first call reads one micro-batch, so
the first step waits for one round of reads only), whole crc32 pages at a time, checks every
page, and builds the rows; memory is the prefetch window plus the indexes of the shards in use,
whatever the corpus size. Start-up reads the manifest only.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from ..corpus.format import (
    PAGE_TOKENS,
    CorpusError,
    Manifest,
    check_pages,
    decode_index,
    join,
    read_manifest,
    sha256,
)
from ..storage.uri import fs_and_path, one_line
from .data import IGNORE_INDEX, collate

log = logging.getLogger("ftcluster.train")

PREFETCH_BATCHES = 8  # micro-batches read ahead by the background thread
INDEX_CACHE = 4  # shard indexes kept (a rank moves through the shards in order)


def open_corpus(uri: str, storage_options: dict[str, Any] | None) -> tuple[Any, str, Manifest]:
    fs, root = fs_and_path(uri, storage_options)
    manifest = read_manifest(uri, storage_options, fs=fs, root=root)
    if manifest is None:
        raise CorpusError(f"data.train: {uri} holds no manifest.json, so it is not a finished prepared corpus; "
                          "run `ftcluster prepare-data SPEC` (it resumes an unfinished one), or drop "
                          "data.streaming to read jsonl/parquet records")
    return fs, root, manifest


class _Shards:
    """The corpus's shard table for one ``seq_len``, and the block -> (shard, block) order per epoch."""

    def __init__(self, manifest: Manifest, seq_len: int, seed: int):
        self.manifest, self.seq_len, self.seed = manifest, seq_len, seed
        self.blocks = np.array([s.tokens // seq_len for s in manifest.shards], dtype=np.int64)
        self.total = int(self.blocks.sum())
        self._epoch: int | None = None
        self._order: np.ndarray = np.zeros(0, dtype=np.int64)
        self._starts: np.ndarray = np.zeros(0, dtype=np.int64)
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _set_epoch(self, epoch: int) -> None:
        if self._epoch != epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.blocks))
            self._starts = np.concatenate([[0], np.cumsum(self.blocks[self._order])])
            self._epoch = epoch

    def locate(self, epoch: int, j: int) -> tuple[int, int]:
        """(shard index, block inside the shard) of global block ``j`` of ``epoch``."""
        self._set_epoch(epoch)
        p = int(np.searchsorted(self._starts, j, side="right")) - 1
        shard = int(self._order[p])
        key = (epoch, shard)
        perm = self._perms.get(key)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch, shard]).permutation(int(self.blocks[shard]))
            self._perms[key] = perm
            while len(self._perms) > INDEX_CACHE:
                self._perms.popitem(last=False)
        else:
            self._perms.move_to_end(key)
        return shard, int(perm[j - int(self._starts[p])])


class StreamingCorpus:
    """This rank's micro-batches from a prepared corpus: a :class:`~.datasource.DataSource` with epochs."""

    resharding = "global"  # its position means the same on any number of ranks (checkpoint.py)

    def __init__(self, uri: str, storage_options: dict[str, Any] | None, seq_len: int, micro_batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, *, prefetch: int = PREFETCH_BATCHES):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.uri = uri
        self.fs, self.root, self.manifest = open_corpus(uri, storage_options)
        self.seq_len, self.mbs, self.rank, self.world_size, self.seed = seq_len, micro_batch_size, rank, world_size, seed
        self.prefetch = max(1, prefetch)
        self.table = _Shards(self.manifest, seq_len, seed)
        self.dtype = np.dtype(self.manifest.dtype).newbyteorder("<")
        self.epoch, self.consumed = 0, 0
        self._indexes: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue[Any] | None = None
        self._stop = threading.Event()
        per_step = micro_batch_size * world_size
        if self.table.total < per_step:
            raise CorpusError(f"data.train: {uri} holds {self.table.total} blocks of seq_len={seq_len} tokens "
                              f"({self.manifest.tokens:,} tokens), fewer than one global micro-batch of {per_step}; "
                              "prepare more data or lower data.seq_len / training.micro_batch_size")

    # -- the DataSource protocol ------------------------------------------------
    def __len__(self) -> int:
        """Batches per epoch per rank."""
        return self.table.total // (self.mbs * self.world_size)

    def next_batch(self) -> dict[str, Any]:
        if self._queue is None:
            self._start()
        assert self._queue is not None
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        (epoch, consumed), rows = item
        self.epoch, self.consumed = epoch, consumed
        return collate(rows)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "stream", "epoch": self.epoch, "consumed": self.consumed, "seed": self.seed,
                "seq_len": self.seq_len, "micro_batch_size": self.mbs, "world_size": self.world_size,
                "corpus_tokens": self.manifest.tokens, "shards": len(self.manifest.shards)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "stream":
            raise CorpusError("data: the checkpoint was written by a run that read records in memory, this run "
                              "streams a prepared corpus; resume with the same data, or write to a new output.uri")
        mine = self.state_dict()
        for key in ("seed", "seq_len", "corpus_tokens", "shards"):
            if state[key] != mine[key]:
                raise CorpusError(f"data: the checkpoint's data position is for {key}={state[key]}, this run has "
                                  f"{mine[key]}; resume with the same corpus and settings, or write to a new output.uri")
        self.close()
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        if state["world_size"] != self.world_size or state["micro_batch_size"] != self.mbs:
            log.info("data: resuming at global block %d of epoch %d, written by %d process(es) x %d, read by %d x %d: "
                     "the same blocks follow, regrouped", self.consumed, self.epoch, state["world_size"],
                     state["micro_batch_size"], self.world_size, self.mbs)

    def close(self) -> None:
        """Stop the reader thread (the next batch starts a new one at the current position)."""
        thread, q = self._thread, self._queue
        if thread is not None:
            self._stop.set()
            while thread.is_alive():
                if q is not None:
                    try:
                        q.get_nowait()
                    except queue.Empty:
                        pass
                thread.join(0.05)
        self._thread = self._queue = None
        self._stop = threading.Event()

    # -- the order -------------------------------------------------------------
    def _advance(self, epoch: int, consumed: int) -> tuple[int, int, list[tuple[int, int]]]:
        """This rank's blocks of the global batch at (epoch, consumed), and the position after it."""
        per = self.mbs * self.world_size
        if consumed + per > self.table.total:
            epoch, consumed = epoch + 1, 0
        first = consumed + self.rank * self.mbs
        mine = [self.table.locate(epoch, j) for j in range(first, first + self.mbs)]
        return epoch, consumed + per, mine

    def blocks_at(self, epoch: int, consumed: int, batches: int) -> list[list[tuple[int, int]]]:
        """This rank's (shard, block) lists for the next ``batches`` micro-batches (for tests and tools)."""
        out = []
        for _ in range(batches):
            epoch, consumed, mine = self._advance(epoch, consumed)
            out.append(mine)
        return out

    # -- reading ---------------------------------------------------------------
    def _start(self) -> None:
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._reader, args=(self.epoch, self.consumed, self._queue, self._stop),
                                        name="ftcluster-corpus-reader", daemon=True)
        self._thread.start()

    def _reader(self, epoch: int, consumed: int, out: queue.Queue[Any], stop: threading.Event) -> None:
        window = 1  # the first read is one micro-batch: the first step does not wait for the whole window
        try:
            while not stop.is_set():
                plan = []
                for _ in range(window):
                    epoch, consumed, mine = self._advance(epoch, consumed)
                    plan.append(((epoch, consumed), mine))
                rows = self._read([b for _, mine in plan for b in mine])
                for k, (pos, _) in enumerate(plan):
                    batch = rows[k * self.mbs:(k + 1) * self.mbs]
                    while not stop.is_set():
                        try:
                            out.put((pos, batch), timeout=0.1)
                            break
                        except queue.Full:
                            continue
                window = self.prefetch
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread, raised there
            while not stop.is_set():
                try:
                    out.put(exc, timeout=0.1)
                    return
                except queue.Full:
                    continue

    def _index(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """(doc_starts, page_crc) of a shard, checked against the manifest."""
        got = self._indexes.get(shard)
        if got is not None:
            self._indexes.move_to_end(shard)
            return got
        info = self.manifest.shards[shard]
        where = f"{self.uri.rstrip('/')}/{info.index_path}"
        try:
            raw = self.fs.cat_file(join(self.root, info.index_path))
        except FileNotFoundError as exc:
            raise CorpusError(f"{where}: missing; the corpus is damaged: prepare it again") from exc
        except Exception as exc:  # noqa: BLE001
            raise CorpusError(f"{where}: cannot read: {one_line(exc)}") from exc
        if sha256(raw) != info.index_sha256:
            raise CorpusError(f"{where}: its sha256 differs from the manifest's: the shard's index is corrupted; "
                              "nothing from it was trained on. Prepare the corpus again")
        ends, crcs = decode_index(raw, where)
        starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
        self._indexes[shard] = (starts, crcs)
        while len(self._indexes) > INDEX_CACHE:
            self._indexes.popitem(last=False)
        return starts, crcs

    def _read(self, blocks: list[tuple[int, int]]) -> list[dict[str, np.ndarray]]:
        L, isz = self.seq_len, self.dtype.itemsize
        page_bytes = PAGE_TOKENS * isz
        paths, starts, ends, spans = [], [], [], []
        for shard, b in blocks:
            info = self.manifest.shards[shard]
            a = b * L
            p0, p1 = a // PAGE_TOKENS, (a + L - 1) // PAGE_TOKENS
            lo, hi = p0 * page_bytes, min((p1 + 1) * PAGE_TOKENS, info.tokens) * isz
            paths.append(join(self.root, info.tokens_path))
            starts.append(lo)
            ends.append(hi)
            spans.append((shard, a, p0, hi - lo))
        try:
            datas = self.fs.cat_ranges(paths, starts, ends, on_error="return")
        except Exception as exc:  # noqa: BLE001
            raise CorpusError(f"data.train: cannot read {self.uri}: {one_line(exc)}") from exc
        rows = []
        for (shard, a, p0, size), data in zip(spans, datas, strict=True):
            info = self.manifest.shards[shard]
            where = f"{self.uri.rstrip('/')}/{info.tokens_path}"
            if isinstance(data, BaseException):
                what = "missing" if isinstance(data, FileNotFoundError) else f"cannot be read ({one_line(data)})"
                raise CorpusError(f"{where}: {what}; the corpus is damaged, nothing from this shard was trained "
                                  "on: prepare it again") from data
            if len(data) != size:
                raise CorpusError(f"{where}: shorter than the manifest says ({info.tokens:,} tokens): the shard is "
                                  "truncated; nothing from it was trained on. Prepare the corpus again")
            doc_starts, crcs = self._index(shard)
            check_pages(data, isz, p0, crcs, where)
            off = a - p0 * PAGE_TOKENS
            ids = np.frombuffer(data, dtype=self.dtype, count=L, offset=off * isz).astype(np.int64)
            rows.append(self._row(ids, a, doc_starts))
        return rows

    def _row(self, ids: np.ndarray, a: int, doc_starts: np.ndarray) -> dict[str, np.ndarray]:
        L = self.seq_len
        lo, hi = np.searchsorted(doc_starts, [a, a + L])
        starts = doc_starts[lo:hi] - a  # the documents starting in the block (0: one starts with it)
        marks = np.zeros(L, dtype=np.int64)
        marks[starts] = starts
        pos = np.arange(L, dtype=np.int64) - np.maximum.accumulate(marks)  # 0 at the block and document starts
        labels = ids.copy()
        labels[starts] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels, "position_ids": pos, "attention_mask": np.ones(L, dtype=np.int64)}


# ----------------------------------------------------------------------------- the run's tokenizer


def trains_own_tokenizer(spec: Any) -> bool:
    """Would the run train its tokenizer (no tokenizer folder/hub id, none with the model)?"""
    t, m = spec.tokenizer, spec.model
    return not (t.path or t.hub_id or m.path or m.hub_id)


def load_corpus_tokenizer(spec: Any, cache_dir: Any) -> Any:
    """The tokenizer saved with the prepared corpus (``<data.train>/tokenizer``): a run that would
    train its own tokenizer uses the one prepare-data trained, on the raw source, instead."""
    from pathlib import Path

    from ..corpus.format import TOKENIZER_DIR
    from ..storage.fetch import fetch_dir
    from . import tokenizer as T

    ds = spec.data
    uri = f"{ds.train.rstrip('/')}/{TOKENIZER_DIR}"
    try:
        folder = fetch_dir(uri, ds.storage_options, Path(cache_dir).parent / "models")
    except Exception as exc:  # noqa: BLE001
        raise CorpusError(f"data.train: the corpus has no tokenizer/ folder ({one_line(exc)}); set tokenizer.path "
                          "to the tokenizer it was prepared with, or prepare it again") from exc
    return T.load_tokenizer_folder(folder, spec, "data.train tokenizer/")


def check_tokenizer(manifest: Manifest, tokenizer: Any, uri: str) -> None:
    """Refuse a corpus whose ids come from another tokenizer than the run's."""
    from ..corpus.format import tokenizer_fingerprint
    from ..corpus.synthetic import FINGERPRINT as SYNTHETIC

    if manifest.tokenizer_fingerprint == SYNTHETIC:  # random ids (benchmarks): only the id range matters
        if manifest.vocab_size > len(tokenizer):
            raise CorpusError(f"data.train: {uri} holds ids up to {manifest.vocab_size - 1}, the tokenizer has "
                              f"{len(tokenizer)}; use a model and tokenizer with at least {manifest.vocab_size}")
        return
    mine = tokenizer_fingerprint(tokenizer)
    if mine != manifest.tokenizer_fingerprint:
        raise CorpusError(f"data.train: {uri} was prepared with tokenizer {manifest.tokenizer_fingerprint[:12]} "
                          f"(vocab {manifest.vocab_size}), this run's is {mine[:12]} (vocab {len(tokenizer)}); "
                          "train with the corpus's own tokenizer (<corpus>/tokenizer, or leave tokenizer unset), "
                          "or prepare the corpus again with this one")
