"""How many tokens the training data holds: counted cheaply for local jsonl, estimated from
the size for everything else. No tokenizer is loaded: ~4 characters per token is the usual
figure for English text with Llama-3/GPT-4-class BPE vocabularies; a small tokenizer trained
by ftcluster (tokenizer.train_vocab_size) splits finer, so fewer characters per token.
"""

from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import dataclass
from typing import Any

from ...storage.uri import is_local, local_path

SAMPLE_BYTES = 4 << 20  # read at most this much of a local jsonl file; extrapolate the rest
JSON_OVERHEAD = 0.9  # share of a jsonl file's bytes that is text (keys, quotes, escapes)
PARQUET_EXPANSION = 2.0  # compressed parquet text expands about this much
TEMPLATE_TOKENS = {"text": 1, "instruction": 8, "chat": 12}  # eos, prompt template, role markers


@dataclass(frozen=True)
class DataEstimate:
    tokens: int | None
    examples: int | None
    how: str  # 'counted', 'estimated from size', or why it is unknown
    shard_tokens: tuple[int, ...] | None = None  # a prepared corpus's shards: its blocks are exact
    # sum over counted examples of tokens^2 and of tokens: their ratio is the token-weighted mean
    # example length, the span a packed token attends over (attention_span)
    length_moments: tuple[float, float] | None = None

    def attention_span(self, seq_len: int) -> float | None:
        """The mean number of positions a packed token's example spans (token-weighted, each example
        cut into seq_len pieces): variable-length attention computes each example's own causal square,
        so its work per token scales with this, not with seq_len. None when no example was counted."""
        if not self.length_moments or self.length_moments[1] <= 0:
            return None
        sq, n = self.length_moments
        return min(float(seq_len), sq / n)


def chars_per_token(train_vocab_size: int | None) -> float:
    """~4.0 for large BPE vocabularies; fewer for a small tokenizer trained on the data."""
    if not train_vocab_size:
        return 4.0
    return max(1.5, min(4.0, 1.0 + 0.3 * math.log2(max(train_vocab_size, 256) / 256)))


def _record_chars(rec: dict[str, Any], fmt: str, fields: Any) -> int:
    if fmt == "text":
        return len(str(rec.get(fields.text, "")))
    if fmt == "instruction":
        return sum(len(str(rec.get(f, "") or "")) for f in (fields.instruction, fields.input, fields.output))
    msgs = rec.get(fields.messages) or []
    return sum(len(str(m.get("content", ""))) + 8 for m in msgs if isinstance(m, dict))


def _local_files(uri: str) -> list[str]:
    path = str(local_path(uri))
    if os.path.isdir(path):
        return sorted(p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(p))
    return sorted(glob.glob(path)) if any(c in path for c in "*?[") else ([path] if os.path.isfile(path) else [])


def estimate_tokens(data: Any, train_vocab_size: int | None = None, *, network: bool = False) -> DataEstimate:
    """Tokens and examples in ``data.train`` (a spec's DataSpec): a prepared corpus's manifest says
    exactly; one not prepared yet is estimated from ``data.prepare.source``."""
    if is_local(data.train) or network:
        found = _manifest_estimate(data)
        if found is not None:
            return found
    if data.prepare is not None:
        source = data.model_copy(update={"train": data.prepare.source, "prepare": None, "streaming": None})
        est = estimate_tokens(source, train_vocab_size, network=network)
        return DataEstimate(est.tokens, est.examples, f"{est.how}, of data.prepare.source (not prepared yet)")
    uri = data.train
    cpt = chars_per_token(train_vocab_size)
    if not is_local(uri):
        if not network:
            return DataEstimate(None, None, "remote data: not read offline")
        return _remote_estimate(data, cpt)
    files = _local_files(uri)
    if not files:
        return DataEstimate(None, None, f"{uri}: no such file")
    tokens = examples = 0
    how = "counted"
    moments = [0.0, 0.0]
    for f in files:
        if f.endswith((".jsonl", ".json")) and not f.endswith(".gz"):
            t, e, sampled = _jsonl_tokens(f, data, cpt, moments)
            how = "estimated from a sample" if sampled and how == "counted" else how
        else:
            t, e = _size_tokens(os.path.getsize(f), f, data, cpt)
            how = "estimated from size"
        tokens += t
        examples += e
    return DataEstimate(tokens, examples, how, length_moments=(moments[0], moments[1]) if moments[1] else None)


def _jsonl_tokens(path: str, data: Any, cpt: float, moments: list[float] | None = None) -> tuple[int, int, bool]:
    """(tokens, examples, sampled) of a local jsonl file; adds each counted example's sum of squared
    piece lengths (pieces of at most data.seq_len) and its tokens to ``moments``."""
    size = os.path.getsize(path)
    chars = n = read = 0
    per = TEMPLATE_TOKENS[data.format]
    seq = int(data.seq_len)
    with open(path, "rb") as fh:
        for line in fh:
            read += len(line)
            if line.strip():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict):
                    c = _record_chars(rec, data.format, data.fields)
                    chars += c
                    n += 1
                    if moments is not None:
                        length = c / cpt + per
                        full, rest = divmod(length, seq)
                        moments[0] += full * seq * seq + rest * rest
                        moments[1] += length
            if read >= SAMPLE_BYTES:
                break
    scale = size / read if read else 1.0
    return int((chars / cpt + per * n) * scale), int(n * scale), read < size


def _size_tokens(size: int, path: str, data: Any, cpt: float) -> tuple[int, int]:
    text_bytes = size * (PARQUET_EXPANSION if path.endswith(".parquet") else JSON_OVERHEAD)
    tokens = int(text_bytes / cpt)
    return tokens, max(1, tokens // min(data.seq_len, 512))  # examples: a guess, used only without packing


def _remote_estimate(data: Any, cpt: float) -> DataEstimate:
    try:
        import fsspec

        fs, _, paths = fsspec.get_fs_token_paths(data.train, storage_options=data.storage_options or {})
        if len(paths) == 1 and fs.isdir(paths[0]):
            paths = [p for p in fs.find(paths[0])]
        sizes = [(p, fs.size(p)) for p in paths]
    except Exception as exc:  # no credentials, no endpoint: the plan goes on without a token count
        return DataEstimate(None, None, f"could not list {data.train}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    tokens = examples = 0
    for p, size in sizes:
        t, e = _size_tokens(size or 0, p, data, cpt)
        tokens += t
        examples += e
    return DataEstimate(tokens, examples, "estimated from size")


def _manifest_estimate(data: Any) -> DataEstimate | None:
    from ...corpus.format import CorpusError, read_manifest

    try:
        m = read_manifest(data.train, data.storage_options)
    except CorpusError as exc:
        return DataEstimate(None, None, str(exc))
    except Exception:  # noqa: BLE001 - no store, no credentials: estimated the other ways
        return None
    if m is None:
        return None
    return DataEstimate(m.tokens, m.documents, "read from the corpus manifest",
                        shard_tokens=tuple(s.tokens for s in m.shards))


def sequences(est: DataEstimate, seq_len: int, packing: bool) -> int | None:
    """Training sequences (blocks) per epoch: packed blocks of seq_len, or one per example; a
    prepared corpus's exact full blocks per shard (ftcluster.train.stream)."""
    if est.shard_tokens is not None:
        return sum(t // seq_len for t in est.shard_tokens)
    if est.tokens is None:
        return None
    if packing:
        return max(1, math.ceil(est.tokens / (seq_len * 0.97)))  # best-fit decreasing leaves ~3 % padding
    return est.examples
