"""Small prepared corpora with a real tokenizer, written directly in the corpus format (for tests
of the streaming path that do not exercise prepare-data itself)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def documents(folder: Path, mb: float = 0.6, files: int = 2) -> list[str]:
    """The synthetic case-law documents of examples/cpt/make_corpus.py (written to ``folder``)."""
    subprocess.run([sys.executable, str(ROOT / "examples" / "cpt" / "make_corpus.py"), str(folder), "--mb", str(mb),
                    "--files", str(files)], check=True, capture_output=True)
    docs = []
    for p in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(p, "rt") as fh:
            docs += [json.loads(line)["text"] for line in fh]
    return docs


def tokenized_corpus(uri: Path, docs: list[str], vocab: int = 512, shard_tokens: int = 60_000) -> int:
    """Train a BPE on ``docs``, tokenize them and write a prepared corpus at ``uri`` with its
    tokenizer; returns the number of tokens."""
    from ftcluster.corpus.format import (
        MANIFEST,
        TOKENIZER_DIR,
        Manifest,
        dtype_for,
        shard_name,
        tokenizer_fingerprint,
        write_shard,
    )
    from ftcluster.storage.uri import fs_and_path, put_bytes
    from ftcluster.train import tokenizer as T

    tok_dir = uri / TOKENIZER_DIR
    specials = [T.PAD, T.BOS, T.EOS] + [f"<|{r}|>" for r in T.ROLES]
    T._train_into(tok_dir, docs[:200], vocab, specials)
    spec = SimpleNamespace(data=SimpleNamespace(format="text"))
    tok = T.load_tokenizer_folder(tok_dir, spec, "test")
    ids = tok(docs, add_special_tokens=False)["input_ids"]
    fs, root = fs_and_path(str(uri))
    dtype = dtype_for(len(tok))
    shards, cur, k = [], [], 0

    def flush():
        nonlocal cur, k
        if cur:
            flat = np.concatenate(cur).astype(dtype)
            ends = np.cumsum([len(c) for c in cur])
            shards.append(write_shard(fs, root, shard_name(k, 0), flat, ends, source=k))
            k += 1
            cur = []

    for x in ids:
        cur.append(np.array([tok.bos_token_id, *x, tok.eos_token_id], dtype=np.int64))
        if sum(len(c) for c in cur) >= shard_tokens:
            flush()
    flush()
    m = Manifest(dtype=dtype, vocab_size=len(tok), tokenizer_fingerprint=tokenizer_fingerprint(tok), shards=shards,
                 sources=[], created_by="tests.support.corpora")
    put_bytes(fs, f"{root}/{MANIFEST}", m.to_json())
    return m.tokens


def prepared_stand_in(example: Path, tmp: Path) -> list[str]:
    """``--set`` arguments that let an example validate here: a local streamed corpus must be prepared
    before submission (the refusal itself: tests/unit/preflight/test_preflight_paths.py), so one that
    streams from a local corpus gets a synthetic prepared corpus in ``tmp``; any other example none."""
    text = example.read_text()
    if "prepare:" not in text or "backend: local" not in text:
        return []
    from ftcluster.corpus.format import has_manifest
    from ftcluster.corpus.synthetic import write_synthetic

    corpus = tmp / "corpus"
    if not has_manifest(str(corpus)):
        write_synthetic(str(corpus), 100_000, vocab=512)
    return ["--set", f"data.train={corpus}"]
