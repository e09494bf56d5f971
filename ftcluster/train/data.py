"""Training data: read records from any fsspec filesystem, tokenize with loss masks, pack, shard.

Pipeline: :func:`load_records` (jsonl/parquet; a file, a folder or a glob) ->
:func:`build_examples` (token ids + labels, -100 where no loss is taken) -> :class:`PackedDataset`
(``seq_len`` blocks; ``position_ids`` restart at every example) -> :class:`ShardedBatches`
(a deterministic permutation per epoch from ``(seed, epoch)``, each rank its disjoint share,
resumable from ``state_dict()``; each micro-batch is cut to its longest row rounded up to 64
columns). torch is imported only when a batch is built.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ..errors import TrainError
from ..storage.uri import fs_and_path, one_line

log = logging.getLogger("ftcluster.train")

IGNORE_INDEX = -100
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
TEXT_SUFFIXES = (".txt", ".md")  # plain text: one document per file (ftcluster prepare-data only)
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")

Example = tuple[list[int], list[int]]


# ----------------------------------------------------------------------------- reading


def _strip_compression(path: str) -> str:
    for suf in COMPRESSION_SUFFIXES:
        if path.endswith(suf):
            return path[: -len(suf)]
    return path


def file_format_of(path: str, file_format: str = "auto", text_files: bool = False) -> str:
    """'jsonl', 'parquet' (or, with ``text_files``, 'text') for one file, by extension when file_format is auto."""
    if file_format != "auto":
        return file_format
    base = _strip_compression(path.lower())
    if base.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if base.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if text_files and base.endswith(TEXT_SUFFIXES):
        return "text"
    kinds = ".jsonl, .parquet, .txt or .md" if text_files else ".jsonl or .parquet"
    raise TrainError(f"{path}: cannot tell the file format from the extension; name it {kinds}, "
                     "or set data.file_format")


def _suffixes(file_format: str, text_files: bool) -> tuple[str, ...]:
    by_format = {"jsonl": JSONL_SUFFIXES, "parquet": PARQUET_SUFFIXES, "text": TEXT_SUFFIXES}
    if file_format in by_format:
        return by_format[file_format]
    return JSONL_SUFFIXES + PARQUET_SUFFIXES + (TEXT_SUFFIXES if text_files else ())


def resolve_files(uri: str, file_format: str = "auto", storage_options: dict[str, Any] | None = None,
                  text_files: bool = False) -> tuple[Any, list[str]]:
    """The filesystem and the sorted data files that ``uri`` (a file, a folder or a glob) names.

    ``text_files``: a folder's .txt/.md files count too (``ftcluster prepare-data``; training reads records only).
    """
    fs, path = fs_and_path(uri, storage_options)
    try:
        if any(c in path for c in "*?["):
            files = sorted(p for p, i in fs.glob(path, detail=True).items() if i.get("type") == "file")
        elif fs.isdir(path):
            exts = _suffixes(file_format, text_files)
            files = sorted(p for p in fs.find(path) if _strip_compression(p.lower()).endswith(exts))
        elif fs.isfile(path):
            files = [path]
        else:
            raise TrainError(f"{uri}: no such file or folder")
    except TrainError:
        raise
    except Exception as exc:  # noqa: BLE001 - one line naming the URI instead of a botocore traceback
        raise TrainError(f"{uri}: cannot list the data: {one_line(exc)}; check the URI, endpoint and "
                         "credentials") from exc
    if not files:
        kinds = ".jsonl, .parquet, .txt or .md" if text_files else ".jsonl or .parquet"
        raise TrainError(f"{uri}: no {kinds} files match")
    return fs, files


def load_records(uri: str, file_format: str = "auto",
                 storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every record of every file that ``uri`` names, in file order then line order."""
    return list(iter_records(uri, file_format, storage_options))


def iter_records(uri: str, file_format: str = "auto", storage_options: dict[str, Any] | None = None, *,
                 text_field: str = "text", text_files: bool = False) -> Iterator[dict[str, Any]]:
    """The records of :func:`load_records`, one at a time (one file open at once); with ``text_files`` a
    .txt/.md file is one record ``{text_field: its text}``."""
    fs, files = resolve_files(uri, file_format, storage_options, text_files)
    for path in files:
        shown = fs.unstrip_protocol(path) if "://" in uri else path
        fmt = file_format_of(path, file_format, text_files)
        yield from file_records(fs, path, fmt, shown, text_field)


def file_records(fs: Any, path: str, fmt: str, shown: str, text_field: str = "text",
                 fh: Any = None) -> Iterator[dict[str, Any]]:
    """The records of one file, streamed (a parquet file by record batch); ``fh``: an open binary file to
    read instead of opening ``path`` (already decompressed for jsonl and text)."""
    try:
        if fmt == "parquet":
            yield from _read_parquet(fs, path, shown, fh)
        elif fmt == "text":
            yield {text_field: _read_text(fs, path, shown, fh)}
        else:
            yield from _read_jsonl(fs, path, shown, fh)
    except TrainError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise TrainError(f"{shown}: cannot read as {fmt}: {one_line(exc)}") from exc


def _opened(fs: Any, path: str, fh: Any, **how: Any) -> Any:
    """``fh`` as a context that leaves it open (its owner closes it), else ``path`` opened ``how``."""
    return contextlib.nullcontext(fh) if fh is not None else fs.open(path, "rb", **how)


def _read_jsonl(fs: Any, path: str, shown: str, fh: Any = None) -> Iterator[dict[str, Any]]:
    with _opened(fs, path, fh, compression="infer") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = raw.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise TrainError(f"{shown}:{lineno}: not valid JSON ({exc}); write one JSON object per line") from exc
            if not isinstance(rec, dict):
                raise TrainError(f"{shown}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            yield rec


def _read_parquet(fs: Any, path: str, shown: str, fh: Any = None) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    with _opened(fs, path, fh) as fh:
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=1024):
            yield from batch.to_pylist()


def _read_text(fs: Any, path: str, shown: str, fh: Any = None) -> str:
    with _opened(fs, path, fh, compression="infer") as fh:
        data = fh.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TrainError(f"{shown}: not UTF-8 text (byte {exc.start}); convert it to UTF-8") from exc


# ----------------------------------------------------------------------------- examples


def instruction_prompt(instruction: str, inp: str = "") -> str:
    """The prompt for format instruction (Alpaca style); the answer follows it."""
    text = f"### Instruction:\n{instruction}\n\n"
    if inp:
        text += f"### Input:\n{inp}\n\n"
    return text + "### Response:\n"


def _field(rec: dict[str, Any], name: str, option: str, i: int, required: bool = True) -> Any:
    if name not in rec or rec[name] is None:
        if not required:
            return ""
        raise TrainError(f"data.fields.{option}: record {i} has no field {name!r} (it has {sorted(rec)}); "
                         f"set data.fields.{option} to the field that holds it")
    return rec[name]


def _text(value: Any, option: str, i: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise TrainError(f"data.fields.{option}: record {i} holds a {type(value).__name__}, expected text")


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return list(tokenizer(texts, add_special_tokens=False)["input_ids"])


def build_examples(records: Sequence[dict[str, Any]], tokenizer: Any, data_spec: Any) -> list[Example]:
    """Token ids and labels per record (labels -100 where no loss is taken).

    text: every token is learned; instruction: the prompt is masked, the answer and eos are
    learned; chat: only the assistant turns (as the chat template renders them) are learned.
    Text longer than ``seq_len`` is cut into ``seq_len`` pieces; an instruction or chat example
    is truncated, and dropped if nothing learnable is left.
    """
    if tokenizer.eos_token_id is None:
        raise TrainError("tokenizer: it has no eos token; use a tokenizer with one (or tokenizer.train_vocab_size)")
    fmt, f, seq_len = data_spec.format, data_spec.fields, data_spec.seq_len
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id]
    out: list[Example] = []
    if fmt == "text":
        ids = _encode(tokenizer, [_text(_field(r, f.text, "text", i), "text", i) for i, r in enumerate(records)])
        for x in ids:
            seq = bos + x + eos
            lab = [IGNORE_INDEX] * len(bos) + x + eos
            out.extend((seq[k:k + seq_len], lab[k:k + seq_len]) for k in range(0, len(seq), seq_len))
        return [e for e in out if any(t != IGNORE_INDEX for t in e[1][1:])]
    if fmt == "instruction":
        prompts, answers = [], []
        for i, r in enumerate(records):
            ins = _text(_field(r, f.instruction, "instruction", i), "instruction", i)
            inp = _text(_field(r, f.input, "input", i, required=False), "input", i)
            prompts.append(instruction_prompt(ins, inp))
            answers.append(_text(_field(r, f.output, "output", i), "output", i))
        for p, a in zip(_encode(tokenizer, prompts), _encode(tokenizer, answers), strict=True):
            out.append((bos + p + a + eos, [IGNORE_INDEX] * (len(bos) + len(p)) + a + eos))
    elif fmt == "chat":
        pieces = [chat_pieces(_field(r, f.messages, "messages", i), tokenizer, i) for i, r in enumerate(records)]
        flat = _encode(tokenizer, [text for ps in pieces for text, _ in ps])
        k = 0
        for ps in pieces:
            ids: list[int] = []
            lab: list[int] = []
            for _, learn in ps:
                ids += flat[k]
                lab += flat[k] if learn else [IGNORE_INDEX] * len(flat[k])
                k += 1
            out.append((ids, lab))
    else:
        raise TrainError(f"data.format: unknown format {fmt!r}; use text, instruction or chat")
    return _truncate(out, seq_len)


def _truncate(examples: list[Example], seq_len: int) -> list[Example]:
    kept, cut, dropped = [], 0, 0
    for ids, lab in examples:
        if len(ids) > seq_len:
            ids, lab, cut = ids[:seq_len], lab[:seq_len], cut + 1
        if any(t != IGNORE_INDEX for t in lab[1:]):
            kept.append((ids, lab))
        else:
            dropped += 1
    if cut or dropped:
        log.warning("data: %d example(s) longer than data.seq_len=%d were truncated, %d dropped (no answer tokens "
                    "left); raise data.seq_len to keep them whole", cut, seq_len, dropped)
    return kept


def chat_pieces(messages: Any, tokenizer: Any, i: int = 0) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, learned) pieces: assistant turns learned, the rest not.

    Renders prefixes with the tokenizer's chat template: the text between the prompt for turn k
    (``add_generation_prompt=True``) and the conversation through turn k is the assistant's part.
    """
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in messages):
        raise TrainError(f"data.fields.messages: record {i} must hold a list of {{role, content}} objects")
    if not any(m["role"] == "assistant" for m in messages):
        raise TrainError(f"data.fields.messages: record {i} has no assistant turn to learn")

    def render(msgs: list[dict[str, Any]], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    pieces: list[tuple[str, bool]] = []
    done = ""
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(messages[:k], True)
        full = render(messages[: k + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise TrainError(f"data.fields.messages: record {i}: the tokenizer's chat template does not render "
                             "conversations prefix by prefix, so assistant turns cannot be located; use a "
                             "tokenizer with a standard chat template")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    tail = render(messages, False)[len(done):]
    if tail:
        pieces.append((tail, False))
    return [(t, learn) for t, learn in pieces if t]


# ----------------------------------------------------------------------------- packing


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of example indices, each summing to <= capacity; longest first, deterministic."""
    order = sorted(range(len(lengths)), key=lambda k: (-lengths[k], k))
    bins: list[list[int]] = []
    caps: list[int] = []  # distinct remaining capacities that have a bin, ascending
    by_cap: dict[int, list[int]] = {}
    for k in order:
        n = lengths[k]
        j = bisect.bisect_left(caps, n)
        if j < len(caps):
            c = caps[j]
            b = by_cap[c].pop()
            if not by_cap[c]:
                del by_cap[c], caps[j]
        else:
            c, b = capacity, len(bins)
            bins.append([])
        bins[b].append(k)
        rest = c - n
        if rest > 0:
            if rest not in by_cap:
                by_cap[rest] = []
                bisect.insort(caps, rest)
            by_cap[rest].append(b)
    return bins


class PackedDataset:
    """Fixed-length blocks of ``seq_len`` tokens built from examples.

    ``packing=True`` puts several examples in one block (best-fit decreasing; every example kept
    whole, exactly once); ``packing=False`` gives one example per block. Padding has
    ``pad_id``, label -100 and attention_mask 0. ``position_ids`` restart at 0 for every example
    (and for the padding run), so varlen attention can separate packed examples; the first label
    of every example is -100 so no loss crosses an example boundary.
    """

    def __init__(self, examples: Sequence[Example], seq_len: int, packing: bool = True, pad_id: int | None = 0):
        self.seq_len = seq_len
        self.pad_id = 0 if pad_id is None else int(pad_id)
        lengths = [len(ids) for ids, _ in examples]
        if any(n > seq_len for n in lengths):
            raise TrainError(f"data.seq_len: an example has {max(lengths)} tokens, more than seq_len={seq_len}")
        self._offsets = np.zeros(len(examples) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self._offsets[1:])
        self._ids = np.fromiter((t for ids, _ in examples for t in ids), dtype=np.int64, count=int(self._offsets[-1]))
        labels = np.fromiter((t for _, lab in examples for t in lab), dtype=np.int64, count=int(self._offsets[-1]))
        labels[self._offsets[:-1][np.asarray(lengths) > 0]] = IGNORE_INDEX
        self._labels = labels
        nonempty = [k for k, n in enumerate(lengths) if n > 0]
        if packing:
            sub = best_fit_decreasing([lengths[k] for k in nonempty], seq_len)
            self.blocks = [[nonempty[k] for k in b] for b in sub]
        else:
            self.blocks = [[k] for k in nonempty]
        self.num_tokens = int(self._offsets[-1])
        self.num_label_tokens = int((labels != IGNORE_INDEX).sum())

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        s = self.seq_len
        ids = np.full(s, self.pad_id, dtype=np.int64)
        lab = np.full(s, IGNORE_INDEX, dtype=np.int64)
        pos = np.zeros(s, dtype=np.int64)
        mask = np.zeros(s, dtype=np.int64)
        at = 0
        for k in self.blocks[i]:
            a, b = int(self._offsets[k]), int(self._offsets[k + 1])
            n = b - a
            ids[at:at + n] = self._ids[a:b]
            lab[at:at + n] = self._labels[a:b]
            pos[at:at + n] = np.arange(n)
            mask[at:at + n] = 1
            at += n
        pos[at:] = np.arange(s - at)
        return {"input_ids": ids, "labels": lab, "position_ids": pos, "attention_mask": mask}


PAD_MULTIPLE = 64  # batch widths round up to this, so a run sees few distinct shapes


def batch_width(rows: Sequence[dict[str, np.ndarray]]) -> int:
    """Columns a micro-batch needs: its longest row's real tokens rounded up to PAD_MULTIPLE, at
    most the block length. Rows hold their real tokens first (PackedDataset), so the columns
    cut off are padding only; without this, ``packing: false`` computed every row at seq_len."""
    full = len(rows[0]["attention_mask"])
    real = max(int(np.flatnonzero(r["attention_mask"])[-1]) + 1 if r["attention_mask"].any() else 0 for r in rows)
    return min(full, max(PAD_MULTIPLE, -(-real // PAD_MULTIPLE) * PAD_MULTIPLE))


def collate(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Stack rows into torch LongTensor batches, as wide as :func:`batch_width`."""
    import torch

    w = batch_width(rows)
    return {k: torch.from_numpy(np.stack([r[k][:w] for r in rows])) for k in rows[0]}


# ----------------------------------------------------------------------------- batches


class ShardedBatches:
    """This rank's micro-batches, epoch after epoch, resumable.

    Epoch ``e`` visits the blocks in ``permutation(seed, e)``; global batch ``b`` of an epoch is
    ``perm[b*W*B:(b+1)*W*B]`` and rank ``r`` takes its ``r``-th slice of ``B`` (``W`` world size,
    ``B`` micro-batch size), so ranks are disjoint and the blocks that do not fill a global batch
    are left out of that epoch only. ``len()`` is the number of batches per epoch per rank.
    Its position resumes on another number of processes (:meth:`load_state_dict`).
    """

    resharding = "global"  # its position (epoch, index) is the same on every rank (checkpoint.py)

    def __init__(self, dataset: PackedDataset, micro_batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.dataset, self.mbs, self.rank, self.world_size, self.seed = dataset, micro_batch_size, rank, world_size, seed
        self.batches_per_epoch = len(dataset) // (micro_batch_size * world_size)
        self.epoch, self.index = 0, 0
        self._perm_epoch: int | None = None
        self._perm: np.ndarray | None = None

    def __len__(self) -> int:
        return self.batches_per_epoch

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def indices(self, epoch: int, index: int) -> np.ndarray:
        """Block indices of this rank's batch ``index`` in ``epoch``."""
        start = (index * self.world_size + self.rank) * self.mbs
        return self.permutation(epoch)[start:start + self.mbs]

    def next_batch(self) -> dict[str, Any]:
        """The next batch (rolls over into the next epoch)."""
        if self.batches_per_epoch == 0:
            raise TrainError(f"data.train: {len(self.dataset)} sequences cannot fill one micro-batch of "
                             f"{self.mbs} on each of {self.world_size} processes")
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        idx = self.indices(self.epoch, self.index)
        self.index += 1
        return collate([self.dataset[int(i)] for i in idx])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The remaining batches of the current epoch."""
        while self.index < self.batches_per_epoch:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "world_size": self.world_size,
                "micro_batch_size": self.mbs, "num_blocks": len(self.dataset)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the checkpoint's position. Written by another number of processes or micro-batch
        size (W·B blocks a micro-step, now W'·B'): the position is a global one, ``index·W·B`` blocks of
        this epoch's permutation consumed, so the run continues at that block, regrouped (the same
        blocks follow in the same order, W'·B' at a time), provided W'·B' divides it: always when
        W'·B' divides W·B (e.g. 16 -> 8 processes, the same micro-batch), and when the global
        batch W·B·accumulation is kept and the epoch began on an optimizer step (checkpoints fall
        on optimizer steps; an epoch whose micro-batches per rank are not a multiple of the
        accumulation ends mid-step). An epoch the old grouping had used up rolls over as it would
        have. What differs from an
        uninterrupted run on W processes: the epoch's end leaves out ``num_blocks mod W'·B'``
        blocks instead of ``num_blocks mod W·B``, so from the next epoch on the micro-batches
        hold other blocks (the permutation per epoch is the same)."""
        mine = self.state_dict()
        for key in ("seed", "num_blocks"):
            if key in state and state[key] != mine[key]:
                raise TrainError(f"data: the checkpoint's data order has {key}={state[key]}, this run {mine[key]}; "
                                 "resume with the same data and settings, or write to a new output.uri")
        epoch, index = int(state["epoch"]), int(state["index"])
        world, mbs = int(state.get("world_size", self.world_size)), int(state.get("micro_batch_size", self.mbs))
        if (world, mbs) != (self.world_size, self.mbs):
            per_old, per_new = world * mbs, self.world_size * self.mbs
            if index >= len(self.dataset) // per_old:  # the old grouping's epoch is used up
                epoch, consumed = epoch + 1, 0
            else:
                consumed = index * per_old
            if consumed % per_new:
                raise TrainError(f"data: the checkpoint's position, block {consumed} of epoch {epoch} (written by "
                                 f"{world} process(es) x micro-batch {mbs}), is not a multiple of this run's "
                                 f"{self.world_size} x {self.mbs}; keep the global batch (training."
                                 "gradient_accumulation_steps) or write to a new output.uri")
            index = consumed // per_new
            log.info("data: resuming at block %d of epoch %d, written by %d process(es) x %d, read by %d x %d: the "
                     "same blocks follow, regrouped", consumed, epoch, world, mbs, self.world_size, self.mbs)
        self.epoch, self.index = epoch, index


def eval_batches(dataset: PackedDataset, micro_batch_size: int) -> Iterator[dict[str, Any]]:
    """Every block in dataset order, ``micro_batch_size`` at a time (the last batch may be smaller)."""
    for start in range(0, len(dataset), micro_batch_size):
        yield collate([dataset[i] for i in range(start, min(len(dataset), start + micro_batch_size))])
