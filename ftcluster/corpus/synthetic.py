"""A prepared corpus of synthetic token ids, written fast (for tests and the start-up/memory benchmarks).

    python -m ftcluster.corpus.synthetic URI --tokens 1e9 [--vocab 32000] [--shard-tokens 4194304]

Documents have lengths drawn from a geometric distribution (mean ``mean_doc`` tokens) and ids
drawn uniformly from ``[3, vocab)``; each document starts with id 1 (bos) and ends with id 2 (eos).
Deterministic from ``seed``. No tokenizer is written: the manifest's fingerprint is ``synthetic``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from ..storage.uri import fs_and_path, put_bytes
from .format import MANIFEST, Manifest, dtype_for, join, shard_name, write_shard

FINGERPRINT = "synthetic"


def synthetic_shard(rng: np.random.Generator, tokens: int, vocab: int, mean_doc: int,
                    dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, doc_ends) of one shard of exactly ``tokens`` ids."""
    lengths = rng.geometric(1 / mean_doc, size=tokens // max(1, mean_doc // 2) + 16).astype(np.int64) + 2
    ends = np.cumsum(lengths)
    n = int(np.searchsorted(ends, tokens)) + 1
    ends = ends[:n]
    ends[-1] = tokens
    ends = ends[np.concatenate([[True], np.diff(ends) > 0])]
    ids = rng.integers(3, vocab, size=tokens, dtype=np.int64).astype(dtype)
    starts = np.concatenate([[0], ends[:-1]])
    ids[starts] = 1
    ids[ends - 1] = 2
    return ids, ends


def write_synthetic(uri: str, tokens: int, *, vocab: int = 32000, shard_tokens: int = 1 << 22, mean_doc: int = 700,
                    seed: int = 0, storage_options: dict[str, Any] | None = None) -> Manifest:
    fs, root = fs_and_path(uri, storage_options)
    dtype = dtype_for(vocab)
    rng = np.random.default_rng(seed)
    shards, k, left = [], 0, int(tokens)
    while left > 0:
        n = min(shard_tokens, left)
        ids, ends = synthetic_shard(rng, n, vocab, mean_doc, dtype)
        shards.append(write_shard(fs, root, shard_name(k, 0), ids, ends, source=k))
        left -= n
        k += 1
    manifest = Manifest(dtype=dtype, vocab_size=vocab, tokenizer_fingerprint=FINGERPRINT, shards=shards,
                        sources=[{"path": f"synthetic-{i}", "size": s.tokens, "sha256": s.sha256}
                                 for i, s in enumerate(shards)], created_by="ftcluster.corpus.synthetic")
    put_bytes(fs, join(root, MANIFEST), manifest.to_json())  # last: the corpus is complete
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("uri")
    ap.add_argument("--tokens", type=float, required=True)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-tokens", type=int, default=1 << 22)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    m = write_synthetic(args.uri, int(args.tokens), vocab=args.vocab, shard_tokens=args.shard_tokens, seed=args.seed)
    print(f"{args.uri}: {len(m.shards)} shards, {m.tokens:,} tokens, {m.documents:,} documents", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
