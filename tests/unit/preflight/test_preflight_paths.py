"""`ftcluster validate` checks the local paths a run will read and write; a spec file's relative paths are relative
to its folder, rewritten at load time for the runtime, which starts in the submission directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
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


def test_relative_paths_resolve_against_the_spec_folder(tmp_path):
    job = write(tmp_path)
    (job.parent / "data").mkdir()
    (job.parent / "data" / "train.jsonl").write_text("{}\n")
    for cwd in (tmp_path, job.parent, tmp_path / "elsewhere"):  # wherever it is validated from
        cwd.mkdir(exist_ok=True)
        ok = validate(cwd, job)
        assert ok.returncode == 0, ok.stderr
    assert not (tmp_path / "out").exists() and not (job.parent / "out").exists()  # validate creates nothing
    (job.parent / "data" / "train.jsonl").unlink()
    (tmp_path / "data").mkdir()  # beside the submission directory: not where the spec means
    (tmp_path / "data" / "train.jsonl").write_text("{}\n")
    missing = validate(tmp_path, job)
    assert missing.returncode == 2
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 2, lines
    assert lines[0] == (f"error: {job}:6:3: data.train: data/train.jsonl: no such file or folder; check the path of the "
                        f"training data (resolved against the spec file's folder: {job.parent}/data/train.jsonl)")
    assert f"{job}:7:3: data.eval: data/*.jsonl: no file matches this pattern; check the path of the evaluation data " \
           f"(resolved against the spec file's folder: {job.parent}/data/*.jsonl)" in lines[1]


def test_set_paths_are_relative_to_the_current_directory(tmp_path):
    job = write(tmp_path, eval=str(ROOT / "examples/data/instruct_eval.jsonl"))
    (tmp_path / "mine.jsonl").write_text("{}\n")
    ok = validate(tmp_path, job, "--set", "data.train=mine.jsonl")
    assert ok.returncode == 0, ok.stderr
    res = validate(job.parent, job, "--set", "data.train=mine.jsonl")
    assert res.returncode == 2
    assert res.stderr.strip() == (f"error: --set: data.train: mine.jsonl: no such file or folder; "
                                  f"check the path of the training data (a path given with --set is resolved against the "
                                  f"current directory: {job.parent}/mine.jsonl)")


def test_submit_ships_paths_relative_to_the_submission_directory(tmp_path):
    """The runtime starts in the submission directory: the payload names the spec's files from there."""
    job = write(tmp_path, out="file://../out/run")
    (job.parent / "data").mkdir()
    (job.parent / "data" / "train.jsonl").write_text("{}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FTCLUSTER_HOME": str(tmp_path / "home")}
    res = subprocess.run([sys.executable, "-m", "ftcluster.cli", "submit", "specs/job.yaml", "--dry-run"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert '"train": "specs/data/train.jsonl"' in res.stdout
    assert '"eval": "specs/data/*.jsonl"' in res.stdout  # a glob stays a glob
    assert '"uri": "file://./out/run"' in res.stdout  # file://out/run would name host "out"


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


def test_variants_and_pipeline_stages_resolve_against_their_own_files(tmp_path, monkeypatch):
    from ftcluster.spec.loader import load_spec
    from ftcluster.spec.pipeline import load_pipeline, model_source
    from ftcluster.spec.variants import resolve_variants

    job = write(tmp_path)
    job.write_text(job.read_text() + "variants:\n  - {name: a, set: {data.train: other/a.jsonl}}\n  - {name: b}\n")
    monkeypatch.chdir(tmp_path)
    a, b = resolve_variants(load_spec(job))
    assert (a.data.train, b.data.train, b.data.eval) == ("specs/other/a.jsonl", "specs/data/train.jsonl", "specs/data/*.jsonl")
    assert a.output.uri == "file://./specs/out/run/a"
    a, _ = resolve_variants(load_spec(job, ["variants[0].data.train=mine.jsonl"]))  # --set: relative to the cwd
    assert a.data.train == "mine.jsonl"

    pipe = tmp_path / "pipes" / "pipe.yaml"
    pipe.parent.mkdir()
    pipe.write_text("pipeline: two\nstages:\n"
                    "  - {name: one, spec: ../specs/job.yaml, set: {data.eval: evals/e.jsonl, lora.merge_at_end: true}}\n"
                    "  - {name: two, spec: ../specs/job.yaml, model_from: one, set: {output.uri: file://../out/two}}\n")
    job.write_text(write(tmp_path).read_text().replace("{random_init: {preset: tiny}}", "{hub_id: org/base}"))
    one, two = load_pipeline(pipe).stages
    assert (one.spec.data.train, one.spec.data.eval) == ("specs/data/train.jsonl", "pipes/evals/e.jsonl")
    assert two.spec.output.uri == "file://./out/two"
    assert two.spec.model.path == model_source(one.spec)[0] == "file://./specs/out/run/merged"  # rewritten once


def test_paths_elsewhere_are_not_rewritten(tmp_path, monkeypatch):
    from ftcluster.spec.loader import load_spec, load_spec_text

    job = write(tmp_path, backend="slurm")
    monkeypatch.chdir(tmp_path)
    assert load_spec(job).data.train == "specs/data/train.jsonl"  # sbatch from here: the cluster shares this folder
    assert load_spec(job, ["slurm.login=user@hpc"]).data.train == "data/train.jsonl"  # a path on the cluster
    kube = load_spec(job, ["backend=kubernetes", "kubernetes.image=r.example/t:1"])
    assert (kube.data.train, kube.output.uri) == ("data/train.jsonl", "file://./out/run")  # paths in the container
    assert load_spec_text(job.read_text()).data.train == "data/train.jsonl"  # no file: relative to the cwd
    absolute = load_spec(job, [f"data.train={tmp_path}/x.jsonl", "output.uri=s3://b/run"])
    assert (absolute.data.train, absolute.output.uri) == (f"{tmp_path}/x.jsonl", "s3://b/run")


def test_deepspeed_config_file_stays_relative_to_the_spec_file(tmp_path, monkeypatch):
    """Read at render time against the spec file (ftcluster.plan.launch): not rewritten with the other paths."""
    from ftcluster.plan.deepspeed import resolved_deepspeed_config
    from ftcluster.spec.loader import load_spec

    job = write(tmp_path, eval="data/e.jsonl")
    job.write_text(job.read_text().replace("method: lora", "method: full").replace("  seq_len: 64", "  format: text\n  seq_len: 64")
                   + "deepspeed: {config_file: ds.json, nvme_path: nvme, offload_optimizer: nvme}\n")
    (job.parent / "ds.json").write_text('{"gradient_clipping": 0.5}')
    monkeypatch.chdir(tmp_path)
    spec = load_spec(job)
    assert (spec.deepspeed.config_file, spec.deepspeed.nvme_path) == ("ds.json", "specs/nvme")
    cfg = resolved_deepspeed_config(spec)
    assert cfg["gradient_clipping"] == 0.5 and cfg["zero_optimization"]["offload_optimizer"]["nvme_path"] == "specs/nvme"


def test_a_streamed_corpus_must_be_prepared_before_submission(tmp_path):
    from ftcluster.corpus.synthetic import write_synthetic

    job = tmp_path / "cpt.yaml"
    job.write_text("name: cpt\nmethod: full\nmodel: {random_init: {preset: tiny}}\n"
                   "data: {train: ./corpus, format: text, seq_len: 64, prepare: {source: ./raw}}\n"
                   "resources: {gpus_per_node: 0}\noutput: {uri: ./out}\n")
    res = validate(tmp_path, job)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert f"{job}:4:8: data.train: ./corpus is not a prepared corpus yet (no manifest.json); run `ftcluster " \
           "prepare-data` on this spec first" in res.stderr
    write_synthetic(str(tmp_path / "corpus"), 10_000, vocab=512)
    ok = validate(tmp_path, job)
    assert ok.returncode == 0, ok.stderr
