"""Data pipeline: records -> masked examples -> packed blocks -> sharded, resumable batches."""

from __future__ import annotations

import gzip
import json
import random
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("tokenizers")

from ftcluster.errors import TrainError  # noqa: E402
from ftcluster.spec.loader import load_spec  # noqa: E402
from ftcluster.train import data as D  # noqa: E402
from ftcluster.train.tokenizer import load_or_train_tokenizer  # noqa: E402

pytestmark = pytest.mark.train

ROOT = Path(__file__).resolve().parents[3]
DATA = ROOT / "examples" / "data"


@pytest.fixture(scope="module")
def spec():
    return load_spec(ROOT / "examples" / "quickstart.yaml", overrides=[f"data.train={DATA / 'instruct.jsonl'}"])


@pytest.fixture(scope="module")
def tok(spec, tmp_path_factory):
    return load_or_train_tokenizer(spec, tmp_path_factory.mktemp("cache") / "tokenizers")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def learned(ex) -> list[int]:
    return [t for t in ex[1] if t != D.IGNORE_INDEX]


def runs(labels: list[int]) -> list[list[int]]:
    """Contiguous runs of learned labels."""
    out, cur = [], []
    for t in labels:
        if t == D.IGNORE_INDEX:
            if cur:
                out.append(cur)
            cur = []
        else:
            cur.append(t)
    return out + ([cur] if cur else [])


# ----------------------------------------------------------------------------- example data


def test_example_data_is_what_make_data_generates(tmp_path):
    sys.path.insert(0, str(DATA))
    try:
        import make_data
    finally:
        sys.path.remove(str(DATA))
    assert make_data.main(["--check"]) == 0, "run python examples/data/make_data.py"
    assert make_data.main(["--out", str(tmp_path)]) == 0
    assert (tmp_path / "instruct.jsonl").read_bytes() == (DATA / "instruct.jsonl").read_bytes()
    train = {json.dumps(r, sort_keys=True) for r in read_jsonl(DATA / "instruct.jsonl")}
    ev = [json.dumps(r, sort_keys=True) for r in read_jsonl(DATA / "instruct_eval.jsonl")]
    assert len(train) == 1600 and len(ev) == 200 and not train.intersection(ev)
    assert sum(p.stat().st_size for p in DATA.glob("*.jsonl")) < 2_000_000


# ----------------------------------------------------------------------------- tokenizer


def test_trained_tokenizer_has_specials_template_and_is_deterministic(spec, tok, tmp_path):
    assert len(tok) == 512
    assert None not in (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3
    assert tok.chat_template
    text = "What is 12 plus 30? 12 plus 30 is 42. ünïcode ✓"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    # Many ranks at once: one training under the lock, one cache folder, identical ids everywhere.
    results = []
    threads = [threading.Thread(target=lambda: results.append(load_or_train_tokenizer(spec, tmp_path)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [next(p.name for p in tmp_path.iterdir()
                                                                       if p.is_dir())]
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    for other in results:
        assert other.get_vocab() == tok.get_vocab()
    # A cache from another place holds byte-identical files: training is deterministic.
    other_dir = tmp_path.parent / (tmp_path.name + "-again")
    load_or_train_tokenizer(spec, other_dir)
    assert (other_dir / folder.name / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    shutil.rmtree(other_dir)


def test_tokenizer_cache_key_follows_the_data(spec, tmp_path):
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(DATA / "instruct.jsonl")[:300]))
    load_or_train_tokenizer(spec, tmp_path / "c")
    load_or_train_tokenizer(spec.model_copy(update={"data": spec.data.model_copy(update={"train": str(small)})}),
                            tmp_path / "c")
    assert len([p for p in (tmp_path / "c").iterdir() if p.is_dir()]) == 2


# ----------------------------------------------------------------------------- masking


def test_instruction_masking_learns_exactly_answer_and_eos(spec, tok):
    records = read_jsonl(DATA / "instruct.jsonl")[:200]
    records.append({"instruction": "Reverse the word.", "input": "lamp", "output": ""})  # empty answer: only eos
    examples = D.build_examples(records, tok, spec.data)
    assert len(examples) == len(records)
    for rec, (ids, labels) in zip(records, examples, strict=True):
        assert len(ids) == len(labels)
        assert tok.decode(learned((ids, labels))) == rec["output"] + tok.eos_token
        assert len(runs(labels)) == 1 and labels[-1] == tok.eos_token_id  # one contiguous answer at the end
        n = len(learned((ids, labels)))
        assert labels[-n:] == ids[-n:]
        prompt = D.instruction_prompt(rec["instruction"], rec["input"])
        assert tok.decode(ids) == tok.bos_token + prompt + rec["output"] + tok.eos_token


def test_instruction_custom_field_names_and_missing_field(spec, tok):
    fields = spec.data.fields.model_copy(update={"instruction": "q", "output": "a"})
    ds = spec.data.model_copy(update={"fields": fields})
    (ex,) = D.build_examples([{"q": "What is 2 plus 2?", "a": "4"}], tok, ds)
    assert tok.decode(learned(ex)) == "4" + tok.eos_token
    with pytest.raises(TrainError, match=r"data\.fields\.output: record 1 has no field 'a'"):
        D.build_examples([{"q": "x", "a": "y"}, {"q": "x", "answer": "y"}], tok, ds)


def test_chat_masking_learns_exactly_the_assistant_turns(spec, tok):
    ds = spec.data.model_copy(update={"format": "chat"})
    records = read_jsonl(DATA / "chat.jsonl")[:100]
    assert any(r["messages"][0]["role"] == "system" for r in records)
    assert any(len(r["messages"]) >= 6 for r in records)
    examples = D.build_examples(records, tok, ds)
    for rec, (ids, labels) in zip(records, examples, strict=True):
        answers = [m["content"] + tok.eos_token for m in rec["messages"] if m["role"] == "assistant"]
        assert [tok.decode(r) for r in runs(labels)] == answers
        assert tok.decode(ids) == tok.apply_chat_template(rec["messages"], tokenize=False)
        for m in rec["messages"]:
            if m["role"] != "assistant":  # user and system text is never a target
                assert m["content"] not in tok.decode(learned((ids, labels)))


def test_chat_without_assistant_turn_is_an_error(spec, tok):
    ds = spec.data.model_copy(update={"format": "chat"})
    with pytest.raises(TrainError, match="record 0 has no assistant turn"):
        D.build_examples([{"messages": [{"role": "user", "content": "hi"}]}], tok, ds)


def test_text_learns_everything_and_long_documents_are_split(spec, tok):
    ds = spec.data.model_copy(update={"format": "text", "seq_len": 32})
    records = read_jsonl(DATA / "text.jsonl")[:50] + [{"text": " ".join(["river stone cloud"] * 40)}]
    examples = D.build_examples(records, tok, ds)
    assert all(len(ids) <= 32 for ids, _ in examples)
    whole = [tok.bos_token_id] + tok(records[-1]["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    tail = examples[-((len(whole) + 31) // 32):]
    assert [t for ids, _ in tail for t in ids] == whole  # the pieces of the long one, in order
    for ids, labels in examples:
        assert [t for t in labels if t != D.IGNORE_INDEX] == [t for t in ids if t != tok.bos_token_id]


def test_overlong_instruction_is_truncated_or_dropped(spec, tok):
    ds = spec.data.model_copy(update={"seq_len": 24})
    long_prompt = {"instruction": "word " * 50, "input": "", "output": "yes"}
    fits = {"instruction": "What is 1 plus 1?", "input": "", "output": "1 plus 1 is 2."}
    examples = D.build_examples([long_prompt, fits], tok, ds)
    assert len(examples) == 1 and tok.decode(learned(examples[0])) == fits["output"] + tok.eos_token


# ----------------------------------------------------------------------------- packing


def synthetic_examples(n: int, max_len: int, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for k in range(n):
        length = rng.randint(1, max_len)
        ids = [1000 + k] * length  # every token names its example
        labels = [D.IGNORE_INDEX] * (length // 3) + ids[length // 3:]
        out.append((ids, labels))
    return out


def segments(row):
    """(ids, labels) of each example in a block, split where position_ids restart."""
    pos, mask = row["position_ids"].tolist(), row["attention_mask"].tolist()
    ids, labels = row["input_ids"].tolist(), row["labels"].tolist()
    real = sum(mask)
    assert mask == [1] * real + [0] * (len(mask) - real)
    starts = [i for i in range(real) if pos[i] == 0]
    assert starts[:1] == [0]
    out = []
    for a, b in zip(starts, starts[1:] + [real], strict=True):
        assert pos[a:b] == list(range(b - a))
        out.append((ids[a:b], labels[a:b]))
    return out


@pytest.mark.parametrize("packing", [True, False])
def test_packing_keeps_every_token_once_and_positions_restart(packing):
    examples = synthetic_examples(500, 60)
    pk = D.PackedDataset(examples, 64, packing, pad_id=7)
    seen = []
    for i in range(len(pk)):
        row = pk[i]
        assert all(len(v) == 64 for v in row.values())
        segs = segments(row)
        assert len(segs) == 1 or packing
        pad = row["attention_mask"].tolist().count(0)
        assert row["input_ids"].tolist()[64 - pad:] == [7] * pad
        assert row["labels"].tolist()[64 - pad:] == [D.IGNORE_INDEX] * pad
        seen.extend(segs)
    assert sorted(s[0][0] for s in seen) == [ids[0] for ids, _ in examples]  # each example exactly once
    for ids, labels in seen:
        orig_ids, orig_labels = examples[ids[0] - 1000]
        assert ids == orig_ids
        # no loss across an example boundary: the first label is always masked
        assert labels == [D.IGNORE_INDEX] + orig_labels[1:]
    total = sum(len(ids) for ids, _ in examples)
    assert pk.num_tokens == total
    if packing:  # best-fit decreasing: within 11/9 of the lower bound (+1)
        assert len(pk) <= int(11 / 9 * -(-total // 64)) + 1
    else:
        assert len(pk) == len(examples)


def test_packing_is_deterministic():
    a = D.PackedDataset(synthetic_examples(300, 50, seed=3), 128)
    b = D.PackedDataset(synthetic_examples(300, 50, seed=3), 128)
    assert a.blocks == b.blocks and all((a[i]["input_ids"] == b[i]["input_ids"]).all() for i in range(len(a)))


def test_example_longer_than_seq_len_is_rejected_by_packing():
    with pytest.raises(TrainError, match="data.seq_len"):
        D.PackedDataset([([1] * 10, [1] * 10)], 8)


# ----------------------------------------------------------------------------- batches


@pytest.fixture(scope="module")
def packed():
    return D.PackedDataset(synthetic_examples(400, 30, seed=1), 32, packing=False)


def block_ids(batch) -> list[int]:
    return [int(row[0]) for row in batch["input_ids"]]


def test_batches_are_long_tensors_with_the_four_keys(packed):
    import torch

    batch = D.ShardedBatches(packed, 4, 0, 1, seed=0).next_batch()
    assert set(batch) == {"input_ids", "labels", "position_ids", "attention_mask"}
    assert all(v.dtype == torch.long and tuple(v.shape) == (4, 32) for v in batch.values())


@pytest.mark.parametrize("packing", [True, False])
def test_a_micro_batch_is_as_wide_as_its_longest_row_rounded_to_64(packing):
    """Without packing, rows of at most 130 tokens in 512-token blocks: the batch is 192 wide
    (130 rounded up to 64), not 512, and only padding columns were cut."""
    rng = random.Random(4)
    examples = [([1000 + k] * n, [1000 + k] * n) for k, n in enumerate(rng.randint(2, 130) for _ in range(40))]
    examples[7] = ([5] * 130, [5] * 130)
    pk = D.PackedDataset(examples, 512, packing, pad_id=3)
    rows = [pk[i] for i in range(len(pk))]
    batch = D.collate(rows)
    real = max(int(r["attention_mask"].sum()) for r in rows)
    width = 512 if real > 448 else -(-real // 64) * 64
    assert batch["input_ids"].shape == (len(rows), width) and (width == 192 or packing)
    for key, col in batch.items():
        assert (col.numpy() == np.stack([r[key][:width] for r in rows])).all()
    assert int(batch["attention_mask"].sum()) == pk.num_tokens  # nothing real was cut
    one = D.collate(rows[:1])["labels"]  # a single row too: its own length, rounded up
    assert one.shape[1] == min(512, max(64, -(-int(rows[0]["attention_mask"].sum()) // 64) * 64))


def test_permutation_is_deterministic_per_seed_and_epoch(packed):
    def epochs(seed, n=2):
        sb = D.ShardedBatches(packed, 5, 0, 1, seed=seed)
        return [[i for b in (sb.next_batch() for _ in range(len(sb))) for i in block_ids(b)] for _ in range(n)]

    first = epochs(11)
    assert first == epochs(11)
    assert first != epochs(12)
    assert first[0] != first[1]  # a new order every epoch
    for ep in first:
        assert len(ep) == len(set(ep)) == (len(packed) // 5) * 5  # no block twice within an epoch


def test_ranks_take_disjoint_equal_shards(packed):
    world, mbs = 3, 4
    loaders = [D.ShardedBatches(packed, mbs, r, world, seed=5) for r in range(world)]
    assert len({len(sb) for sb in loaders}) == 1 and len(loaders[0]) == len(packed) // (world * mbs)
    for _epoch in range(2):
        per_rank = [[i for _ in range(len(sb)) for i in block_ids(sb.next_batch())] for sb in loaders]
        flat = [i for r in per_rank for i in r]
        assert len(flat) == len(set(flat)) == len(loaders[0]) * world * mbs
    # The global order does not depend on how it is split: rank r's batch b is a slice of it.
    single = D.ShardedBatches(packed, world * mbs, 0, 1, seed=5)
    whole = single.indices(0, 2).tolist()
    assert [loaders[r].indices(0, 2).tolist() for r in range(world)] == [whole[r * mbs:(r + 1) * mbs]
                                                                          for r in range(world)]


@pytest.mark.parametrize("stop_after", [1, 7, 16, 17, 30])
def test_resumed_loader_yields_exactly_the_remaining_batches(packed, stop_after):
    mbs, world, rank, total = 12, 2, 1, 45  # 16 batches per epoch: crosses two epoch boundaries
    straight = D.ShardedBatches(packed, mbs, rank, world, seed=9)
    assert len(straight) == 16
    expected = [straight.next_batch() for _ in range(total)]
    first = D.ShardedBatches(packed, mbs, rank, world, seed=9)
    for _ in range(stop_after):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # as it travels in a checkpoint
    resumed = D.ShardedBatches(packed, mbs, rank, world, seed=9)
    resumed.load_state_dict(state)
    got = [resumed.next_batch() for _ in range(total - stop_after)]
    for a, b in zip(expected[stop_after:], got, strict=True):
        for key in a:
            assert (a[key] == b[key]).all()


def test_resume_with_other_data_or_an_unreachable_position_is_refused(packed):
    state = D.ShardedBatches(packed, 4, 0, 2, seed=1).state_dict()
    smaller = D.PackedDataset(synthetic_examples(100, 30), 32, packing=False)
    with pytest.raises(TrainError, match="num_blocks"):
        D.ShardedBatches(smaller, 4, 0, 2, seed=1).load_state_dict(state)
    with pytest.raises(TrainError, match="seed=1, this run 2"):
        D.ShardedBatches(packed, 4, 0, 2, seed=2).load_state_dict(state)
    one = D.ShardedBatches(packed, 4, 0, 1, seed=1)
    one.next_batch()  # 4 blocks in: 2 processes x 4 cannot continue there
    with pytest.raises(TrainError, match=r"block 4 of epoch 0 \(written by 1 process\(es\) x micro-batch 4\), "
                                         r"is not a multiple of this run's 2 x 4; keep the global batch"):
        D.ShardedBatches(packed, 4, 1, 2, seed=1).load_state_dict(one.state_dict())


def global_steps(loaders: list[D.ShardedBatches], micro_steps: int, count: int) -> list[list[int]]:
    """The blocks of ``count`` optimizer steps (``micro_steps`` micro-batches on every rank), in order."""
    steps = []
    for _ in range(count):
        batches = [[block_ids(sb.next_batch()) for sb in loaders] for _ in range(micro_steps)]
        steps.append([i for micro in batches for rank in micro for i in rank])
    return steps


@pytest.mark.parametrize("stop_after", [3, 21, 49, 50])
def test_a_position_resumes_on_another_number_of_processes_at_the_same_block(packed, stop_after):
    """2 processes x micro-batch 4 (8 blocks an optimizer step), stopped after ``stop_after`` steps,
    resumed on 1 process x 4 x 2 accumulation steps, then on 4 processes x 2: every optimizer step
    holds the blocks of the uninterrupted 2-process run's, in its epoch; from the epoch after the
    one resumed in, the left-out tail differs (num_blocks mod W·B), so the steps do too (stated in
    ShardedBatches.load_state_dict)."""
    n = len(packed)
    assert n == 400  # no tail left out, for 8 blocks a micro-step as for 4: epochs line up (50 steps each)
    two = [D.ShardedBatches(packed, 4, r, 2, seed=3) for r in range(2)]
    ref = global_steps(two, 1, 70)  # into the second epoch
    run = [D.ShardedBatches(packed, 4, r, 2, seed=3) for r in range(2)]
    got = global_steps(run, 1, stop_after)
    state = json.loads(json.dumps(run[0].state_dict()))
    assert run[1].state_dict() == run[0].state_dict()  # "global": every rank holds the same position
    one = D.ShardedBatches(packed, 4, 0, 1, seed=3)
    one.load_state_dict(state)
    got += global_steps([one], 2, 5)
    four = [D.ShardedBatches(packed, 2, r, 4, seed=3) for r in range(4)]
    state = json.loads(json.dumps(one.state_dict()))
    for sb in four:
        sb.load_state_dict(state)
    got += global_steps(four, 1, 70 - len(got))
    assert got == ref


def test_too_little_data_for_one_batch_is_an_error():
    tiny = D.PackedDataset(synthetic_examples(3, 5), 8, packing=False)
    sb = D.ShardedBatches(tiny, 2, 0, 2, seed=0)
    assert len(sb) == 0
    with pytest.raises(TrainError, match="cannot fill one micro-batch"):
        sb.next_batch()


def test_eval_batches_cover_every_block_in_order(packed):
    batches = list(D.eval_batches(packed, 64))
    assert [len(b["input_ids"]) for b in batches] == [64] * (len(packed) // 64) + (
        [len(packed) % 64] if len(packed) % 64 else [])
    assert [i for b in batches for i in block_ids(b)] == [int(packed[i]["input_ids"][0]) for i in range(len(packed))]


# ----------------------------------------------------------------------------- reading


def test_jsonl_parquet_folder_glob_and_gzip_load_the_same_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = read_jsonl(DATA / "instruct.jsonl")[:120]
    (tmp_path / "one.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "one.parquet")
    assert D.load_records(str(tmp_path / "one.jsonl")) == records
    assert D.load_records(str(tmp_path / "one.parquet")) == records
    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(3):
        part = records[k * 40:(k + 1) * 40]
        if k == 1:
            pq.write_table(pa.Table.from_pylist(part), shards / f"part-{k}.parquet")
        elif k == 2:
            with gzip.open(shards / f"part-{k}.jsonl.gz", "wt") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in part)
        else:
            (shards / f"part-{k}.jsonl").write_text("\n".join(json.dumps(r) for r in part) + "\n\n")
    (shards / "README.md").write_text("not data")
    assert D.load_records(str(shards)) == records  # file order, then line order; README ignored
    assert D.load_records(str(shards / "part-*")) == records
    assert D.load_records(f"file://{shards}/part-1.parquet") == records[40:80]


def test_memory_and_relative_file_uris(tmp_path, monkeypatch):
    import fsspec

    records = [{"text": f"document {k}"} for k in range(5)]
    mem = fsspec.filesystem("memory")
    mem.pipe("/ftc-test/train.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
    try:
        assert D.load_records("memory://ftc-test/train.jsonl") == records
        assert D.load_records("memory://ftc-test/") == records
    finally:
        mem.rm("/ftc-test", recursive=True)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "t.jsonl").write_text(json.dumps(records[0]) + "\n")
    monkeypatch.chdir(tmp_path)
    assert D.load_records("file://./d/t.jsonl") == records[:1]
    assert D.load_records("d/t.jsonl", "jsonl") == records[:1]


def test_read_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(TrainError, match=r"bad\.jsonl:2: not valid JSON"):
        D.load_records(str(bad))
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    with pytest.raises(TrainError, match=r"list\.jsonl:1: expected a JSON object, got list"):
        D.load_records(str(tmp_path / "list.jsonl"))
    with pytest.raises(TrainError, match="no such file or folder"):
        D.load_records(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainError, match="no .jsonl or .parquet files"):
        D.load_records(str(tmp_path / "empty"))
    (tmp_path / "data.txt").write_text("{}\n")
    with pytest.raises(TrainError, match="set data.file_format"):
        D.load_records(str(tmp_path / "data.txt"))
    assert D.load_records(str(tmp_path / "data.txt"), "jsonl") == [{}]
