"""``ftcluster prepare-data``'s worker (ftcluster/train/prepare.py) on local files: the ids it stores are the
tokenizer's, shards are cut at document boundaries, reruns skip committed files and refuse a changed
source or tokenizer, a killed prepare resumes to the same manifest, processes and tasks change no byte.

A ~0.5 MB synthetic corpus (examples/cpt/make_corpus.py) and a 512-token BPE trained on it keep each
test around a second.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ftcluster.corpus.format import MANIFEST, PREPARE, decode_index, done_name, read_manifest
from ftcluster.errors import TrainError
from ftcluster.spec.loader import load_spec_text
from ftcluster.train import prepare as P

ROOT = Path(__file__).resolve().parents[3]
SPEC = """\
name: cpt
method: full
model: {{random_init: {{preset: tiny}}}}
tokenizer: {{train_vocab_size: {vocab}}}
data:
  train: {corpus}
  format: text
  seq_len: 128
  prepare: {{source: {source}, shard_tokens: {shard_tokens}}}
output: {{uri: {corpus}-out}}
"""


def make_spec(source, corpus, vocab=512, shard_tokens=8192):
    return load_spec_text(SPEC.format(source=source, corpus=corpus, vocab=vocab, shard_tokens=shard_tokens))


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("src") / "raw"
    subprocess.run([sys.executable, str(ROOT / "examples/cpt/make_corpus.py"), str(out), "--mb", "0.5", "--files", "4"],
                   check=True, capture_output=True)
    return out


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    """One tokenizer cache for the module: the BPE is trained once per (texts, vocabulary)."""
    monkeypatch.setenv("FTCLUSTER_CACHE", str(tmp_path_factory.getbasetemp() / "ftc-cache"))


def texts_of(folder: Path) -> list[str]:
    out = []
    for f in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(f, "rt") as fh:
            out += [json.loads(line)["text"] for line in fh if line.strip()]
    return out


def shard_arrays(corpus: Path, manifest) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for s in manifest.shards:
        tokens = np.frombuffer((corpus / s.tokens_path).read_bytes(), dtype=np.dtype(manifest.dtype).newbyteorder("<"))
        ends, _ = decode_index((corpus / s.index_path).read_bytes(), s.name)
        out.append((tokens, ends))
    return out


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_ids_are_the_tokenizers_and_shards_cut_at_documents(source, tmp_path):
    """Every document is bos + tokenizer(text, add_special_tokens=False) + eos, in source order; shards hold
    at most shard_tokens and end on a document end, except where one document is longer than a shard."""
    from transformers import AutoTokenizer

    corpus = tmp_path / "corpus"
    m = P.run_task(make_spec(source, corpus, shard_tokens=1024))
    assert m is not None and m == read_manifest(str(corpus))
    tok = AutoTokenizer.from_pretrained(str(corpus / "tokenizer"))  # the saved tokenizer is the one used
    from ftcluster.corpus.format import tokenizer_fingerprint
    from ftcluster.train.tokenizer import load_tokenizer_folder

    # what a run that streams the corpus loads and checks (ftcluster.train.stream.check_tokenizer)
    as_trained = load_tokenizer_folder(corpus / "tokenizer", make_spec(source, corpus), "t")
    assert tokenizer_fingerprint(as_trained) == m.tokenizer_fingerprint and len(tok) == m.vocab_size == 512
    docs = [[tok.bos_token_id, *ids, tok.eos_token_id]
            for ids in tok(texts_of(source), add_special_tokens=False)["input_ids"]]
    arrays = shard_arrays(corpus, m)
    assert np.array_equal(np.concatenate([t for t, _ in arrays]), np.concatenate([np.array(d) for d in docs]))
    assert all(0 < t.size <= 1024 and e[-1] == t.size for t, e in arrays)
    # Documents longer than a shard are split across shards; the others end where a shard's index says.
    ends, total = set(), 0
    for t, e in arrays:
        ends |= {total + int(x) for x in e}
        total += t.size
    assert set(np.cumsum([len(d) for d in docs]).tolist()) <= ends
    assert any(len(d) > 1024 for d in docs) and m.documents > len(docs)
    assert m.tokens == sum(len(d) for d in docs) and m.dtype == "uint16"
    files = sorted(source.glob("*.jsonl.gz"))
    assert [s["path"] for s in m.sources] == [f"file://{p}" for p in files]
    assert [s["sha256"] for s in m.sources] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in files]


def test_rerun_skips_everything_and_keeps_every_byte(source, tmp_path):
    corpus = tmp_path / "corpus"
    spec = make_spec(source, corpus)
    P.run_task(spec)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in corpus.rglob("*") if p.is_file()}
    P.run_task(spec)
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in corpus.rglob("*") if p.is_file()} == before


def test_a_damaged_marker_or_missing_shard_redoes_that_file_only(source, tmp_path):
    corpus = tmp_path / "corpus"
    spec = make_spec(source, corpus)
    P.run_task(spec)
    whole = tree(corpus)
    (corpus / done_name(1)).write_text("{not json")
    (corpus / "shards" / "s000002-0000.tokens").unlink()
    untouched = {p: p.stat().st_mtime_ns for p in (corpus / "shards").glob("s00000[03]-*")}
    P.run_task(spec)
    assert tree(corpus) == whole
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched


def test_killed_prepare_resumes_to_the_same_corpus(source, tmp_path):
    """SIGKILL right after the first source file's marker (the worker process dies, as on a node failure):
    no manifest; the rerun leaves the committed file untouched, redoes the rest and writes the same corpus
    as an uninterrupted run."""
    whole = tmp_path / "whole"
    P.run_task(make_spec(source, whole))
    corpus = tmp_path / "corpus"
    spec = make_spec(source, corpus)
    payload = tmp_path / "payload.json"
    payload.write_text(json.dumps({"spec": spec.model_dump(mode="json")}))
    env = {**os.environ, "FTCLUSTER_TEST_SIGNAL_AT": "prepare-file-committed:SIGKILL", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "ftcluster.train.prepare", "--spec", str(payload), "--workers", "1"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert not (corpus / MANIFEST).exists()
    assert (corpus / done_name(0)).exists() and not (corpus / done_name(1)).exists()
    committed = [corpus / done_name(0), *sorted((corpus / "shards").glob("s000000-*"))]
    stamps = {p: p.stat().st_mtime_ns for p in committed}
    m = P.run_task(spec)
    assert m is not None and {p: p.stat().st_mtime_ns for p in committed} == stamps
    assert tree(corpus) == tree(whole)


def test_a_changed_source_is_refused_in_one_line(source, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in sorted(source.glob("*"))[:2]:
        (src / f.name).write_bytes(f.read_bytes())
    corpus = tmp_path / "corpus"
    P.run_task(make_spec(src, corpus))
    before = tree(corpus)
    extra = src / "part-00009.jsonl"
    extra.write_text('{"text": "one more ruling"}\n')
    with pytest.raises(TrainError, match=rf"refusing to mix corpora: source file://{extra} was added") as err:
        P.run_task(make_spec(src, corpus))
    assert "\n" not in str(err.value) and "prepare into a new output URI" in str(err.value)
    extra.unlink()
    part = src / "part-00001.jsonl.gz"
    size = part.stat().st_size
    part.write_bytes(part.read_bytes() + b"\0")
    with pytest.raises(TrainError, match=rf"source file://{part} changed: size {size} -> {size + 1}"):
        P.run_task(make_spec(src, corpus))
    part.unlink()
    with pytest.raises(TrainError, match=rf"source file://{part} was removed"):
        P.run_task(make_spec(src, corpus))
    assert tree(corpus) == before  # nothing mixed in


def test_a_changed_tokenizer_is_refused_in_one_line(source, tmp_path):
    corpus = tmp_path / "corpus"
    m = P.run_task(make_spec(source, corpus))
    assert m is not None
    before = tree(corpus)
    with pytest.raises(TrainError, match=rf"tokenizer changed: fingerprint {m.tokenizer_fingerprint[:16]} -> "
                                         r"[0-9a-f]{16} \(vocabulary 512 -> 600\)"):
        P.run_task(make_spec(source, corpus, vocab=600))
    assert tree(corpus) == before


def test_processes_and_tasks_change_no_byte(source, tmp_path):
    """workers=2 equals workers=1 byte for byte; two tasks run as separate invocations: the first finds
    the other's files missing and writes no manifest, the second writes the same corpus."""
    serial, parallel, tasks = tmp_path / "serial", tmp_path / "parallel", tmp_path / "tasks"
    P.run_task(make_spec(source, serial), workers=1)
    P.run_task(make_spec(source, parallel), workers=2)
    assert tree(parallel) == tree(serial)
    assert P.run_task(make_spec(source, tasks), task=1, tasks=2) is None
    assert not (tasks / MANIFEST).exists() and sorted(p.name for p in (tasks / "done").iterdir()) == [
        "s000001.json", "s000003.json"]
    assert P.run_task(make_spec(source, tasks), task=0, tasks=2) is not None
    assert tree(tasks) == tree(serial)


def test_missing_or_empty_source_is_one_line(tmp_path):
    with pytest.raises(TrainError, match=rf"{tmp_path}/nowhere: no such file or folder"):
        P.run_task(make_spec(tmp_path / "nowhere", tmp_path / "corpus"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainError, match=r"empty: no \.jsonl, \.parquet, \.txt or \.md files match"):
        P.run_task(make_spec(tmp_path / "empty", tmp_path / "corpus"))
    assert not (tmp_path / "corpus" / PREPARE).exists()


def test_text_and_parquet_sources(tmp_path):
    """A .txt/.md file is one document; parquet is read by record batch; a record without the text field is
    one line naming the file and the field."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    src = tmp_path / "src"
    src.mkdir()
    words = " ".join(f"ruling number {k} of the appellate bench" for k in range(400))
    (src / "a.txt").write_text(words)
    (src / "b.md").write_text("# Heading\n\n" + words[:5000])
    pq.write_table(pa.Table.from_pylist([{"text": words[k * 100:(k + 1) * 300]} for k in range(50)]), src / "c.parquet")
    corpus = tmp_path / "corpus"
    m = P.run_task(make_spec(src, corpus, vocab=300))
    assert m is not None
    tok = AutoTokenizer.from_pretrained(str(corpus / "tokenizer"))
    texts = [words, "# Heading\n\n" + words[:5000], *(words[k * 100:(k + 1) * 300] for k in range(50))]
    expected = np.concatenate([[tok.bos_token_id, *ids, tok.eos_token_id]
                               for ids in tok(texts, add_special_tokens=False)["input_ids"]])
    assert np.array_equal(np.concatenate([t for t, _ in shard_arrays(corpus, m)]), expected)
    assert m.documents == 52
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(TrainError, match=r"x\.jsonl: record 1 has no field 'text' \(it has \['body'\]\); set "
                                         r"data\.fields\.text"):
        P.run_task(make_spec(bad, tmp_path / "bad-corpus", vocab=300))


def test_worker_exits_with_one_line(tmp_path):
    payload = tmp_path / "payload.json"
    payload.write_text(json.dumps({"spec": make_spec(tmp_path / "nowhere", tmp_path / "c").model_dump(mode="json")}))
    proc = subprocess.run([sys.executable, "-m", "ftcluster.train.prepare", "--spec", str(payload)],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path}/nowhere: no such file or folder"]
