"""``ftcluster prepare-data`` as a user runs it: a spec's data.prepare, or --source/--output with a tokenizer;
the end line (corpus, shards, tokens, documents, the next command); bad input as one line and its exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .test_cli import ROOT, ftc

SPEC = """\
name: cpt
method: full
model: {random_init: {preset: tiny}}
tokenizer: {train_vocab_size: 512}
data:
  train: corpus
  format: text
  seq_len: 128
  prepare: {source: raw, shard_tokens: 65536, workers: 1}
output: {uri: out}
"""


@pytest.fixture
def folder(tmp_path, ftc_home) -> Path:
    subprocess.run([sys.executable, str(ROOT / "examples/cpt/make_corpus.py"), str(tmp_path / "raw"), "--mb", "0.3",
                    "--files", "2"], check=True, capture_output=True)
    (tmp_path / "cpt.yaml").write_text(SPEC)
    return tmp_path


def env(tmp_path: Path) -> dict[str, str]:
    return {"FTCLUSTER_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}


def test_prepare_a_spec_then_rerun(folder):
    """Relative paths are the spec folder's; the end line names the corpus and the next command; a rerun
    skips both files and ends with the same line."""
    first = ftc("prepare-data", "cpt.yaml", cwd=folder, env=env(folder), check=True)
    manifest = json.loads((folder / "corpus" / "manifest.json").read_text())
    line, nxt = first.stdout.strip().splitlines()
    assert line.startswith(f"corpus: {len(manifest['shards'])} shards, {manifest['tokens']:,} tokens, "
                           f"{manifest['documents']:,} documents (tokenizer {manifest['tokenizer_fingerprint'][:12]}")
    assert nxt == "next: ftcluster submit cpt.yaml"
    assert "prepare: file 2/2" in first.stderr and "tokens/s" in first.stderr
    again = ftc("prepare-data", "cpt.yaml", cwd=folder, env=env(folder), check=True)
    assert again.stdout == first.stdout and again.stderr.count("already committed, skipped") == 2


def test_prepare_from_a_uri_and_a_tokenizer(folder):
    out = ftc("prepare-data", "--source", str(folder / "raw"), "--output", f"file://{folder}/c2", "--train-vocab-size",
              "512", env=env(folder), check=True)
    assert out.stdout.splitlines()[-1] == ("next: set data.train: " f"file://{folder}/c2 (data.format: text) in a job "
                                           "spec and `ftcluster submit` it")
    # The same corpus as the spec's (same source files, same tokenizer), so the same tokens.
    ftc("prepare-data", "cpt.yaml", cwd=folder, env=env(folder), check=True)
    a, b = (json.loads((folder / d / "manifest.json").read_text()) for d in ("corpus", "c2"))
    assert a["tokens"] == b["tokens"] and a["tokenizer_fingerprint"] == b["tokenizer_fingerprint"]
    ftc("prepare-data", "--source", str(folder / "raw"), "--output", f"file://{folder}/c3", "--tokenizer",
        str(folder / "corpus" / "tokenizer"), env=env(folder), check=True)
    assert json.loads((folder / "c3" / "manifest.json").read_text())["tokens"] == a["tokens"]


@pytest.mark.parametrize(("args", "code", "message"), [
    (["cpt.yaml", "--set", "data.prepare=null"], 2,
     "error: cpt.yaml: data.prepare: not set; add data.prepare.source (the raw corpus"),
    (["cpt.yaml", "--set", "data.prepare.source=nowhere"], 1, "error: nowhere: no such file or folder"),
    (["cpt.yaml", "--source", "raw"], 2, "error: give a SPEC, or --source/--output with --tokenizer or "
                                         "--train-vocab-size, not both"),
    (["--source", "raw", "--output", "c"], 2, "error: give a SPEC with data.prepare, or --source URI --output URI"),
    ([], 2, "error: give a SPEC with data.prepare"),
    (["cpt.yaml", "--submit"], 1, "error: the local backend runs no prepare-data jobs"),
])
def test_bad_input_is_one_line(folder, args, code, message):
    proc = ftc("prepare-data", *args, cwd=folder, env=env(folder))
    assert proc.returncode == code, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if not x.startswith(("prepare:", "try '"))]
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr


def test_dry_run_prints_the_command_and_runs_nothing(folder):
    out = ftc("prepare-data", "cpt.yaml", "--dry-run", "--workers", "3", cwd=folder, env=env(folder), check=True)
    assert "-m ftcluster.train.prepare --spec-env FTCLUSTER_PAYLOAD --task 0 --tasks 1 --workers 3" in out.stdout
    assert not (folder / "corpus").exists()
    out = ftc("prepare-data", "cpt.yaml", "--dry-run", "--submit", "--backend", "slurm", cwd=folder, env=env(folder),
              check=True)
    assert "$ sbatch --parsable cpt-prepare.sbatch" in out.stdout and "#SBATCH --array=0-0" in out.stdout
