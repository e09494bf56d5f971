"""benchmarks/instruct_data.py: deterministic, the intended length spread, and lengths that come
out in tokens as intended through ftcluster's own tokenizer training and build_examples."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
import instruct_data as I  # noqa: E402

TEMPLATE = 12  # bos + "### Instruction:\n" ... "### Response:\n" + eos, in tokens of the trained BPE


def test_same_seed_same_records_other_seed_other_records():
    assert I.records("sharegpt", 50, seed=1) == I.records("sharegpt", 50, seed=1)
    assert I.records("sharegpt", 50, seed=1) != I.records("sharegpt", 50, seed=2)


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["alpaca", "sharegpt"])
def test_lengths_follow_the_documented_log_normals(profile):
    recs = I.records(profile, 20000)
    for key, (mean, sigma) in zip(("prompt_tokens", "answer_tokens"), I.PROFILES[profile], strict=True):
        xs = [r[key] for r in recs]
        assert statistics.mean(xs) == pytest.approx(mean, rel=0.05)
        assert statistics.stdev(math.log(x) for x in xs) == pytest.approx(sigma, rel=0.05)
    over = sum(r["prompt_tokens"] + r["answer_tokens"] + TEMPLATE > 2048 for r in recs) / len(recs)
    assert over == (pytest.approx(0.18, abs=0.02) if profile == "sharegpt" else 0.0)


def test_words_text_has_exactly_the_intended_number_of_pieces():
    import random

    for n in (1, 9, 10, 11, 57):
        text = I.words_text(random.Random(n), n)
        assert len(text.split()) + text.count(".") == n


@pytest.mark.train
def test_token_lengths_through_ftcluster_tokenizer_are_as_intended(tmp_path):
    pytest.importorskip("tokenizers")
    from ftcluster.spec.loader import load_spec_text
    from ftcluster.train import data as D
    from ftcluster.train.tokenizer import load_or_train_tokenizer

    path = tmp_path / "d.jsonl"
    recs = I.records("sharegpt", 80) + I.records("alpaca", 120)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    spec = load_spec_text(f"""name: t
method: lora
model: {{random_init: {{preset: llama-3-8b}}}}
tokenizer: {{train_vocab_size: 8000}}
data: {{train: {path}, format: instruction, seq_len: 2048}}
training: {{max_steps: 1}}
output: {{uri: {tmp_path.as_uri()}/out}}
""", "t.yaml")
    tok = load_or_train_tokenizer(spec, tmp_path / "tokenizers")
    examples = D.build_examples(D.load_records(str(path)), tok, spec.data)
    assert len(examples) == len(recs)
    whole = 0
    for (ids, labels), r in zip(examples, recs, strict=True):
        want = r["prompt_tokens"] + r["answer_tokens"] + TEMPLATE
        if want <= 2048:
            whole += 1
            assert len(ids) == want
            assert sum(t != D.IGNORE_INDEX for t in labels) == r["answer_tokens"] + 1
        else:
            assert len(ids) == 2048  # truncated
    assert whole >= len(recs) - 30


@pytest.mark.slow
@pytest.mark.train
def test_speed_script_smoke_varlen_runs_packed_and_padded_on_cpu(tmp_path):
    """benchmarks/speed.py's variable-length data path end to end on CPU (tiny model)."""
    import os
    import subprocess

    pytest.importorskip("torch")
    out = tmp_path / "r"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")]), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), str(out), "--cases", "smoke-varlen",
                           "--only", "ft", "--steps", "4", "--warmup", "1", "--instruct-records", "200"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((out / "speed.json").read_text())
    assert [(r["stack"], r["packing"]) for r in rows] == [("ftcluster packed", True), ("ftcluster padded", False)]
    for r in rows:
        assert r["tok_s_per_gpu"] > 0 and 0 < r["learned_fraction"] < 1 and 0 < r["real_fraction"] <= 1
    batches = [json.loads(x) for x in (out / "smoke-varlen.ft.padded_batches.r0.jsonl").read_text().splitlines()]
    assert len(batches) == 4 and {b["width"] for b in batches} <= {64, 128}  # cut to the longest row, in 64s
    assert "packing gain" in (out / "table.md").read_text()
