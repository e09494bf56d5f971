"""``ftcluster prepare-data`` against real services: from and to S3 (the moto server) it writes the corpus a
file:// prepare writes; on the live Slurm (.ci/slurm-up.sh) ``--submit`` runs a job array whose tasks each
prepare their files and finalize, into the corpus a local prepare writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftcluster.corpus.format import read_manifest
from ftcluster.spec.loader import load_spec_text

ROOT = Path(__file__).resolve().parents[2]
SPEC = """\
name: cpt
method: full
model: {{random_init: {{preset: tiny}}}}
tokenizer: {{train_vocab_size: 512}}
data:
  train: {corpus}
  format: text
  seq_len: 128
  prepare: {{source: {source}, shard_tokens: 16384, tasks: 2, workers: 1}}
  storage_options: {options}
output: {{uri: {corpus}-out}}
"""


@pytest.fixture(autouse=True)
def _needs_tokenizers(tmp_path, monkeypatch):
    pytest.importorskip("transformers", reason="needs the [train] extra")
    monkeypatch.setenv("FTCLUSTER_CACHE", str(tmp_path / "cache"))


def make_source(folder: Path, files: int = 4) -> Path:
    subprocess.run([sys.executable, str(ROOT / "examples/cpt/make_corpus.py"), str(folder), "--mb", "0.4", "--files",
                    str(files)], check=True, capture_output=True)
    return folder


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_prepare_from_and_to_s3_gives_the_file_corpus(s3, tmp_path):
    """Sources listed, streamed and hashed from S3 (ETag as the version key), shards and markers written to S3,
    a rerun skips every file: the same shards, tokens and source checksums as from file://."""
    from ftcluster.train.prepare import run_task

    raw = make_source(tmp_path / "raw")
    c = s3.client()
    for f in sorted(raw.iterdir()):
        c.upload_file(str(f), s3.bucket, f"raw/{f.name}")
    options = json.dumps(s3.storage_options)
    local = run_task(load_spec_text(SPEC.format(source=raw, corpus=tmp_path / "corpus", options="{}")))
    spec = load_spec_text(SPEC.format(source=s3.uri("raw/"), corpus=s3.uri("corpus"), options=options))
    remote = run_task(spec, workers=2)
    assert local is not None and remote is not None
    assert remote == read_manifest(s3.uri("corpus"), s3.storage_options)
    assert (remote.tokens, remote.documents, remote.tokenizer_fingerprint) == (
        local.tokens, local.documents, local.tokenizer_fingerprint)
    assert remote.shards == local.shards  # names, sizes and sha256 of every shard
    assert [s["sha256"] for s in remote.sources] == [s["sha256"] for s in local.sources]
    prepare = json.loads(c.get_object(Bucket=s3.bucket, Key="corpus/prepare.json")["Body"].read())
    assert all(s["key"].startswith("ETag:") for s in prepare["sources"])
    before = {k: c.head_object(Bucket=s3.bucket, Key=k)["ETag"] for k in s3.keys("corpus/")}
    assert run_task(spec) == remote
    assert {k: c.head_object(Bucket=s3.bucket, Key=k)["ETag"] for k in s3.keys("corpus/")} == before


@pytest.mark.slurm
@pytest.mark.slow
def test_prepare_data_submit_runs_a_slurm_job_array(live_slurm, tmp_path):
    """Two array tasks (each one process) prepare files 0,2 and 1,3; whichever finishes last writes the
    manifest; the corpus is byte for byte the one a local prepare writes."""
    raw = make_source(tmp_path / "raw")
    spec_file = tmp_path / "cpt.yaml"
    spec_file.write_text(SPEC.format(source=raw, corpus=tmp_path / "corpus", options="{}"))
    env = {**os.environ, "FTCLUSTER_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    sets = {"backend": "slurm", "slurm.python": sys.executable, "slurm.partition": "debug",
            "slurm.output": f"{tmp_path}/slurm-%x-%A_%a.out", "resources.memory": "500M"}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]

    def ftc(*argv: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "ftcluster.cli", *argv], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    script = ftc("prepare-data", "cpt.yaml", *args, "--submit", "--dry-run").stdout
    assert "#SBATCH --array=0-1" in script and "--workers 1" in script
    out = ftc("prepare-data", "cpt.yaml", *args, "--submit").stdout
    run_id = out.split()[1]
    deadline = time.time() + 240
    while True:
        st = json.loads(ftc("status", run_id, "--json").stdout)
        if st["state"] in ("SUCCEEDED", "FAILED", "CANCELLED", "UNKNOWN"):
            break
        assert time.time() < deadline, st
        time.sleep(1)
    logs = {p.name: p.read_text() for p in tmp_path.glob("slurm-cpt-prepare-*.out")}
    assert st["state"] == "SUCCEEDED", (st, logs)
    assert [t["name"] for t in st["tasks"]] == ["task-0", "task-1"]
    text = "\n".join(logs.values())
    assert "prepare: task 0/2: 2 of 4 source file(s)" in text and "prepare: task 1/2: 2 of 4 source file(s)" in text
    assert "manifest.json written" in text
    local = tmp_path / "local"
    ftc("prepare-data", "cpt.yaml", "--set", f"data.train={local}")
    assert tree(tmp_path / "corpus") == tree(local)
