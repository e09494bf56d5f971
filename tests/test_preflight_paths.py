"""`ftcluster validate` checks the local paths a run will read and write, as the runtime resolves them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JOB = """\
name: paths
method: lora
backend: {backend}
model: {{random_init: {{preset: tiny}}}}
data:
  train: data/train.jsonl
  eval: {eval}
  seq_len: 64
output:
  uri: {out}
"""


def validate(cwd: Path, job: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "ftcluster.cli", "validate", str(job), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def write(tmp_path: Path, backend: str = "local", eval: str = "data/*.jsonl", out: str = "file://./out/run") -> Path:
    job = tmp_path / "specs" / "job.yaml"
    job.parent.mkdir(exist_ok=True)
    job.write_text(JOB.format(backend=backend, eval=eval, out=out))
    return job


def test_relative_paths_resolve_against_the_submission_directory(tmp_path):
    job = write(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("{}\n")
    ok = validate(tmp_path, job)
    assert ok.returncode == 0, ok.stderr
    assert not (tmp_path / "out").exists()  # validate creates nothing
    elsewhere = validate(job.parent, job)  # the same spec submitted from its own folder: no data there
    assert elsewhere.returncode == 2
    lines = elsewhere.stderr.strip().splitlines()
    assert len(lines) == 2, lines
    assert f"{job}:6:3: data.train: data/train.jsonl: no such file or folder; check the path of the training " \
           f"data (a relative path is resolved against the directory you submit from, {job.parent})" in lines[0]
    assert f"{job}:7:3: data.eval: data/*.jsonl: no file matches this pattern" in lines[1]


def test_output_folder_that_cannot_be_created(tmp_path):
    (tmp_path / "a-file").write_text("x")
    job = write(tmp_path, eval=str(ROOT / "examples/data/instruct_eval.jsonl"), out=f"{tmp_path}/a-file/run")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("{}\n")
    res = validate(tmp_path, job)
    assert res.returncode == 2
    assert f"job.yaml:10:3: output.uri: {tmp_path}/a-file/run: cannot be created ({tmp_path}/a-file is not a " \
           "writable folder); pick a folder you may write to" in res.stderr


def test_paths_on_the_cluster_are_not_checked_here(tmp_path):
    job = write(tmp_path, backend="slurm")
    job.write_text(job.read_text() + "slurm: {login: user@hpc-login}\n")
    res = validate(tmp_path, job, "--no-plan-check")
    assert res.returncode == 0, res.stderr
    res = validate(tmp_path, job, "--no-plan-check", "--set", "slurm.login=null")  # submitted from here: checked
    assert res.returncode == 2 and "data.train" in res.stderr
