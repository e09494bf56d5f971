"""The streaming corpus reader: order, rows, exact resume (same and other world sizes), damage, S3."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ftcluster.corpus.format import PAGE_TOKENS, CorpusError, read_manifest
from ftcluster.corpus.synthetic import write_synthetic
from ftcluster.train.stream import StreamingCorpus

L, B = 128, 2


@pytest.fixture
def corpus(tmp_path: Path) -> str:
    uri = str(tmp_path / "corpus")
    # shards of uneven sizes whose lengths are not multiples of L or of a page
    write_synthetic(uri, 3 * 20_000 + 7_777, vocab=1000, shard_tokens=20_000, mean_doc=90, seed=3)
    return uri


def shard_arrays(uri: str) -> list[tuple[np.ndarray, np.ndarray]]:
    m = read_manifest(uri)
    assert m is not None
    out = []
    for s in m.shards:
        ids = np.fromfile(Path(uri) / s.tokens_path, dtype=np.dtype(m.dtype).newbyteorder("<")).astype(np.int64)
        with np.load(Path(uri) / s.index_path) as z:
            out.append((ids, z["doc_ends"]))
    return out


def rows_of(batch) -> list[tuple[int, ...]]:
    return [tuple(r.tolist()) for r in batch["input_ids"]]


def take(src: StreamingCorpus, n: int) -> list[dict]:
    out = [src.next_batch() for _ in range(n)]
    return out


def test_an_epoch_visits_every_full_block_once_across_ranks(corpus):
    shards = shard_arrays(corpus)
    expected = sorted(tuple(ids[k * L:(k + 1) * L].tolist()) for ids, _ in shards for k in range(len(ids) // L))
    ranks = [StreamingCorpus(corpus, None, L, B, r, 2, seed=5) for r in range(2)]
    n = len(ranks[0])
    assert n == len(expected) // (2 * B)
    seen = [row for src in ranks for b in take(src, n) for row in rows_of(b)]
    for src in ranks:
        src.close()
    assert len(seen) == len(set(seen)) == n * 2 * B  # disjoint across ranks and batches
    assert set(seen) <= set(expected)
    assert len(expected) - len(seen) < 2 * B  # only the last partial global batch is left out


def test_rows_restart_positions_and_mask_labels_at_document_starts(corpus):
    shards = shard_arrays(corpus)
    src = StreamingCorpus(corpus, None, L, B, 0, 1, seed=0)
    batch = src.next_batch()
    src.close()
    for r in range(B):
        ids = batch["input_ids"][r].numpy()
        # find the block in the shards
        found = [(ids_s, ends, k) for ids_s, ends in shards for k in range(len(ids_s) // L)
                 if np.array_equal(ids_s[k * L:(k + 1) * L], ids)]
        assert len(found) == 1
        _, ends, k = found[0]
        starts = set(np.concatenate([[0], ends[:-1]]).tolist())
        a = k * L
        pos, lab = batch["position_ids"][r].numpy(), batch["labels"][r].numpy()
        want_pos, p = [], None
        for t in range(a, a + L):
            p = 0 if (t in starts or p is None) else p + 1
            want_pos.append(p)
        assert pos.tolist() == want_pos
        for t in range(L):
            assert (lab[t] == -100) == ((a + t) in starts)
            if lab[t] != -100:
                assert lab[t] == ids[t]
        assert batch["attention_mask"][r].sum() == L


@pytest.mark.parametrize("stop_at", [1, 7, 40])
def test_resume_continues_with_the_same_batches(corpus, stop_at):
    full = StreamingCorpus(corpus, None, L, B, 1, 2, seed=9)
    want = [rows_of(b) for b in take(full, stop_at + 12)]  # crosses into the next epoch for stop_at=40
    full.close()
    first = StreamingCorpus(corpus, None, L, B, 1, 2, seed=9)
    take(first, stop_at)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint keeps
    first.close()
    again = StreamingCorpus(corpus, None, L, B, 1, 2, seed=9)
    again.load_state_dict(state)
    got = [rows_of(b) for b in take(again, 12)]
    again.close()
    assert got == want[stop_at:]


def test_resume_on_fewer_ranks_neither_repeats_nor_skips(corpus):
    """2 ranks run 5 global batches; 1 rank resumes: the union is exactly the 1-rank-free global sequence."""
    two = [StreamingCorpus(corpus, None, L, B, r, 2, seed=4) for r in range(2)]
    before = [rows_of(b) for src in two for b in take(src, 5)]
    state = two[0].state_dict()
    assert state == {**two[1].state_dict()}  # the position is the same on every rank
    for src in two:
        src.close()
    one = StreamingCorpus(corpus, None, L, B, 0, 1, seed=4)
    one.load_state_dict(state)
    after = [rows_of(b) for b in take(one, 6)]
    one.close()
    # The global order a single rank reads from the start, with micro-batch 2*B... is blocks 0.. in order:
    ref = StreamingCorpus(corpus, None, L, 1, 0, 1, seed=4)
    order = [rows_of(b)[0] for b in take(ref, 5 * 2 * B + 6 * B)]
    ref.close()
    got_before = sorted(r for rows in before for r in rows)
    assert got_before == sorted(order[:5 * 2 * B])
    assert [r for rows in after for r in rows] == order[5 * 2 * B:]


def test_a_changed_corpus_or_seq_len_is_refused(corpus):
    src = StreamingCorpus(corpus, None, L, B, 0, 1, seed=1)
    take(src, 2)
    state = src.state_dict()
    src.close()
    other = StreamingCorpus(corpus, None, 2 * L, B, 0, 1, seed=1)
    with pytest.raises(CorpusError, match="seq_len=128, this run has 256"):
        other.load_state_dict(state)
    with pytest.raises(CorpusError, match="read records in memory"):
        other.load_state_dict({"epoch": 0, "index": 3})


def _first_shard_read(corpus: str) -> tuple[Path, int]:
    """The .tokens file the first batch of rank 0 (seed 2) reads and a byte inside its first block."""
    src = StreamingCorpus(corpus, None, L, B, 0, 1, seed=2)
    (shard, block), *_ = src.blocks_at(0, 0, 1)[0]
    m = src.manifest
    return Path(corpus) / m.shards[shard].tokens_path, block * L * 2 + 10


def test_a_corrupted_shard_stops_before_any_bad_token_is_used(corpus):
    path, at = _first_shard_read(corpus)
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    src = StreamingCorpus(corpus, None, L, B, 0, 1, seed=2)
    with pytest.raises(CorpusError, match=rf"{path.name}: tokens .* fail their crc32 check"):
        src.next_batch()
    src.close()


def test_a_missing_or_truncated_shard_is_named(corpus):
    path, _ = _first_shard_read(corpus)
    data = path.read_bytes()
    path.write_bytes(data[: PAGE_TOKENS])  # a partial file
    src = StreamingCorpus(corpus, None, L, B, 0, 1, seed=2)
    with pytest.raises(CorpusError, match=rf"{path.name}: (shorter than the manifest|tokens .* fail)"):
        src.next_batch()
    src.close()
    path.unlink()
    src = StreamingCorpus(corpus, None, L, B, 0, 1, seed=2)
    with pytest.raises(CorpusError, match=rf"{path.name}: missing"):
        src.next_batch()
    src.close()


def test_an_unfinished_corpus_is_not_trained_on(corpus):
    (Path(corpus) / "manifest.json").unlink()
    with pytest.raises(CorpusError, match="no manifest.json.*ftcluster prepare-data"):
        StreamingCorpus(corpus, None, L, B, 0, 1)


def test_too_small_a_corpus_for_one_global_batch(tmp_path):
    uri = str(tmp_path / "c")
    write_synthetic(uri, 3 * L, vocab=500, shard_tokens=10_000)
    with pytest.raises(CorpusError, match="fewer than one global micro-batch of 4"):
        StreamingCorpus(uri, None, L, 2, 0, 2)


def test_s3_reads_the_same_batches_as_a_local_copy(corpus, s3):
    import s3fs

    fs = s3fs.S3FileSystem(**s3.storage_options)
    fs.put(corpus + "/", f"{s3.bucket}/corpus/", recursive=True)
    local = StreamingCorpus(corpus, None, L, B, 1, 2, seed=8)
    remote = StreamingCorpus(s3.uri("corpus"), s3.storage_options, L, B, 1, 2, seed=8)
    assert [rows_of(b) for b in take(remote, 10)] == [rows_of(b) for b in take(local, 10)]
    local.close()
    remote.close()


def test_a_corpus_of_another_tokenizer_is_refused_naming_both(tmp_path):
    pytest.importorskip("transformers")
    from types import SimpleNamespace

    from ftcluster.corpus.format import tokenizer_fingerprint
    from ftcluster.train import tokenizer as T
    from ftcluster.train.stream import check_tokenizer
    from tests.support.corpora import tokenized_corpus

    docs = [f"document {i} about res judicata and the Varnholt rule, case {i * 7}." for i in range(300)]
    uri = tmp_path / "corpus"
    tokenized_corpus(uri, docs, vocab=400, shard_tokens=5_000)
    spec = SimpleNamespace(data=SimpleNamespace(format="text"))
    same = T.load_tokenizer_folder(uri / "tokenizer", spec, "t")
    m = read_manifest(str(uri))
    assert m is not None
    check_tokenizer(m, same, str(uri))  # the corpus's own tokenizer: accepted
    other_dir = tmp_path / "other"
    T._train_into(other_dir, docs[:100], 420, [T.PAD, T.BOS, T.EOS])
    other = T.load_tokenizer_folder(other_dir, spec, "t")
    with pytest.raises(CorpusError) as err:
        check_tokenizer(m, other, str(uri))
    msg = str(err.value)
    assert "\n" not in msg and m.tokenizer_fingerprint[:12] in msg and tokenizer_fingerprint(other)[:12] in msg
    assert "was prepared with tokenizer" in msg and "(vocab 420)" in msg
    same.add_tokens(["res judicata"])  # the same tokenizer extended is another tokenizer
    with pytest.raises(CorpusError, match="was prepared with tokenizer"):
        check_tokenizer(m, same, str(uri))
