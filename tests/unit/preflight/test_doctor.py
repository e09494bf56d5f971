"""`ftcluster doctor`: parsing of Slurm's answers, then the checks against the live Slurm, this host
and a moto S3 server, through the CLI as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ftcluster.backends.slurm.preflight import gpus_of_type, memory_mb, parse_gres, slurm_seconds

ROOT = Path(__file__).resolve().parents[3]


def doctor(job: Path, *args: str, env: dict | None = None) -> tuple[int, dict[str, dict]]:
    proc = subprocess.run([sys.executable, "-m", "ftcluster.cli", "doctor", str(job), "--json", *args],
                          capture_output=True, text=True, cwd=job.parent, env={**os.environ, **(env or {})},
                          timeout=300)
    assert proc.returncode in (0, 1), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, {c["name"]: c for c in json.loads(proc.stdout)}


JOB = """\
name: doctor-test
method: lora
backend: {backend}
model: {{random_init: {{preset: tiny}}}}
tokenizer: {{train_vocab_size: 512}}
data: {{train: {root}/examples/data/instruct.jsonl, seq_len: 64}}
training: {{max_steps: 2, precision: fp32}}
resources: {{gpus_per_node: 0}}
"""


def write_job(tmp_path: Path, backend: str, extra: str = "", output: str = "output: {uri: file://./out/run}\n") -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(JOB.format(backend=backend, root=ROOT) + textwrap.dedent(output) + textwrap.dedent(extra))
    return path


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text, seconds", [
    ("UNLIMITED", None), ("infinite", None), ("30", 1800), ("30:15", 1815), ("12:00:00", 43200),
    ("2-00:00:00", 172800), ("1-12", 129600), ("1-00:30", 88200),
])
def test_slurm_time_formats(text, seconds):
    assert slurm_seconds(text) == seconds


def test_gres_parsing():
    assert parse_gres("gpu:2") == {None: 2}
    assert parse_gres("gpu:h100:8(S:0-1)") == {"h100": 8}
    assert parse_gres("gpu:a100:4(S:0,1),gpu:v100:2,shard:8") == {"a100": 4, "v100": 2}
    assert parse_gres("(null)") == {}
    assert gpus_of_type(parse_gres("gpu:a100:4,gpu:v100:2"), None) == 6
    assert gpus_of_type(parse_gres("gpu:A100:4,gpu:v100:2"), "a100") == 4
    assert gpus_of_type(parse_gres("gpu:4"), "h200") == 0  # an untyped gres cannot satisfy a typed request
    assert (memory_mb("128G"), memory_mb("2000"), memory_mb("512M")) == (131072, 2000, 512)


# --------------------------------------------------------------------------- local backend


def test_local_backend_checks_pass_and_clean_up(tmp_path):
    job = write_job(tmp_path, "local", output="output: {uri: file://./out/new/run}\n")
    rc, checks = doctor(job)
    assert rc == 0, checks
    assert {k: v["status"] for k, v in checks.items()} == {
        "spec": "ok", "launch files": "ok", "plan: memory": "ok", "plan: recommendation": "ok", "/dev/shm": "ok",
        "rendezvous port": "ok", "python": "ok", "data.train": "ok", "output": "ok"}
    assert "GiB usable per" in checks["plan: memory"]["result"]


def test_plan_that_does_not_fit_is_a_failed_row(tmp_path):
    """doctor shows the planner's verdict; a job too big for its GPU fails that row with the fix."""
    job = write_job(tmp_path, "local")
    rc, checks = doctor(job, "--set", "model.random_init.preset=llama-3-8b", "--set", "method=full",
                        "--set", "resources.gpu_type=a100-40g", "--set", "resources.gpus_per_node=1")
    assert rc == 1
    assert checks["plan: memory"]["status"] == "fail" and "ftcluster plan" in checks["plan: memory"]["fix"]
    assert not (tmp_path / "out").exists()  # the probe removed the folders it made


def test_local_backend_failures(tmp_path):
    job = write_job(tmp_path, "local", "local:\n  python: /usr/bin/false\n")
    rc, checks = doctor(job, "--set", "output.uri=/proc/ftcluster-no/run")  # /proc takes no new folders
    assert rc == 1
    assert checks["python"]["status"] == "fail" and "/usr/bin/false did not run" in checks["python"]["result"]
    assert checks["output"]["status"] == "fail" and "cannot write a probe object" in checks["output"]["result"]
    assert checks["spec"]["status"] == "ok"


def test_invalid_spec_is_one_failed_check(tmp_path):
    job = write_job(tmp_path, "local")
    rc, checks = doctor(job, "--set", "training.learning_rate=-1")
    assert rc == 1 and list(checks) == ["spec"]
    assert "training.learning_rate" in checks["spec"]["result"] and "ftcluster validate" in checks["spec"]["fix"]


def test_pipeline_checks_each_stage(tmp_path):
    """A pipeline file (which `validate` accepts) gets every row for each stage, named after the stage."""
    write_job(tmp_path, "local", output="output: {uri: file://./out/base}\n")
    (tmp_path / "job.yaml").rename(tmp_path / "base.yaml")
    write_job(tmp_path, "local", output="output: {uri: file://./out/tuned}\n")
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text("pipeline: two\nstages:\n  - {name: base, spec: base.yaml}\n"
                    "  - {name: tuned, spec: job.yaml, after: [base]}\n")
    rc, checks = doctor(pipe)
    assert rc == 0, checks
    assert checks["spec"]["status"] == "ok" and "2 stage(s) (base, tuned)" in checks["spec"]["result"]
    for stage in ("base", "tuned"):
        for row in ("spec", "launch files", "plan: memory", "python", "data.train", "output"):
            assert checks[f"{stage}: {row}"]["status"] == "ok", (stage, row, checks)
    assert "out/tuned" in checks["tuned: output"]["result"]


def test_table_output(tmp_path):
    job = write_job(tmp_path, "local", "local:\n  python: /usr/bin/false\n")
    proc = subprocess.run([sys.executable, "-m", "ftcluster.cli", "doctor", str(job)], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "COLUMNS": "200"}, timeout=120)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["CHECK", "RESULT"]
    row = next(i for i, line in enumerate(lines) if line.split()[:2] == ["python", "fail"])
    assert lines[row + 1].startswith("    fix: ") and "ftcluster[train]" in lines[row + 1]  # its fix, under it


# --------------------------------------------------------------------------- live Slurm


@pytest.fixture
def slurm(live_slurm):
    """The live Slurm (see conftest.live_slurm)."""


SLURM_JOB = f"""
slurm:
  partition: debug
  python: {sys.executable}
"""


@pytest.mark.slurm
def test_slurm_good_spec_passes_with_remote_probe(slurm, tmp_path):
    job = write_job(tmp_path, "slurm", SLURM_JOB)
    rc, checks = doctor(job, "--remote", "--set", "resources.gpus_per_node=2", "--set", "resources.time_limit=00:20:00")
    assert rc == 0, checks
    assert {k: v["status"] for k, v in checks.items()} == {
        "spec": "ok", "launch files": "ok", "slurm": "ok", "partition": "ok", "nodes": "ok", "time limit": "ok",
        "/dev/shm": "ok", "rendezvous port": "ok", "python": "ok", "env passthrough": "skip", "output": "ok",
        "fused loss": "warn",  # the test nodes have no liger-kernel: the plan assumed it on GPUs
        "plan: memory": "ok", "plan: recommendation": "ok", "data.train": "ok"}
    assert "2 of 2 nodes in debug fit 2 x gpu" in checks["nodes"]["result"]
    assert "ftcluster" in checks["python"]["result"]


@pytest.mark.slurm
def test_slurm_unknown_partition(slurm, tmp_path):
    job = write_job(tmp_path, "slurm", SLURM_JOB)
    rc, checks = doctor(job, "--set", "slurm.partition=gpu-nope")
    assert rc == 1
    assert checks["partition"]["status"] == "fail" and "'gpu-nope' not found" in checks["partition"]["result"]
    assert checks["partition"]["fix"].endswith("one of: debug")
    assert "nodes" not in checks  # nothing to check against


@pytest.mark.slurm
def test_slurm_too_many_gpus_nodes_and_bad_python(slurm, tmp_path):
    job = write_job(tmp_path, "slurm", SLURM_JOB)
    rc, checks = doctor(job, "--set", "resources.gpus_per_node=4", "--set", "resources.time_limit=00:01:00")
    assert rc == 1
    nodes = checks["nodes"]
    assert nodes["status"] == "fail" and "fit 4 x gpu" in nodes["result"] and "gpu:2" in nodes["result"]
    assert "lower resources.gpus_per_node to 2" in nodes["fix"]
    assert checks["time limit"]["status"] == "fail" and "signal_seconds" in checks["time limit"]["result"]
    rc, checks = doctor(job, "--set", "resources.nodes=3", "--set", "resources.gpus_per_node=1",
                        "--set", "resources.gpu_type=h200")
    assert rc == 1 and "fit 1 x gpu:h200" in checks["nodes"]["result"]
    rc, checks = doctor(job, "--remote", "--set", "slurm.python=/nonexistent/python3",
                        "--set", "slurm.env_passthrough=[FTC_DOCTOR_UNSET_KEY]")
    assert rc == 1
    assert checks["python"]["status"] == "fail" and "did not run on a node of debug" in checks["python"]["result"]
    assert checks["env passthrough"]["status"] == "fail" and "FTC_DOCTOR_UNSET_KEY" in checks["env passthrough"]["result"]


# --------------------------------------------------------------------------- S3 (moto)


@pytest.mark.s3
def test_output_on_s3(s3, tmp_path):  # noqa: F811
    job = write_job(tmp_path, "local", output=f"""
        output:
          uri: {s3.uri("doctor/run1")}
          storage_options: {{client_kwargs: {{endpoint_url: "{s3.endpoint_url}"}}}}
        """)
    rc, checks = doctor(job)
    assert checks["output"]["status"] == "ok", checks["output"]
    assert s3.keys() == []  # the probe object was written and deleted
    rc, checks = doctor(job, "--set", "output.uri=s3://ftc-no-such-bucket/x")
    assert rc == 1 and checks["output"]["status"] == "fail" and "ftc-no-such-bucket" in checks["output"]["result"]
    names = [b["Name"] for b in s3.client().list_buckets()["Buckets"]]
    assert "ftc-no-such-bucket" not in names  # doctor never creates buckets
    rc, checks = doctor(job, env={"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "",
                                  "AWS_SHARED_CREDENTIALS_FILE": "/dev/null", "AWS_CONFIG_FILE": "/dev/null"})
    assert checks["output"]["status"] == "fail" and "AWS_ACCESS_KEY_ID" in checks["output"]["fix"]
    s3.stop()  # the endpoint goes down
    rc, checks = doctor(job)
    assert rc == 1 and checks["output"]["status"] == "fail", checks["output"]
    assert "endpoint" in checks["output"]["fix"]


@pytest.mark.s3
def test_remote_data_is_read_with_the_classifiers_fix(s3, tmp_path):  # noqa: F811
    s3.client().put_object(Bucket=s3.bucket, Key="data/train.jsonl", Body=b'{"text": "hi"}\n')
    opts = f'{{client_kwargs: {{endpoint_url: "{s3.endpoint_url}"}}}}'
    job = write_job(tmp_path, "local")
    base = ["--set", f"data.storage_options={opts}"]
    rc, checks = doctor(job, *base, "--set", f"data.train={s3.uri('data/train.jsonl')}",
                        "--set", f"data.eval={s3.uri('data/')}")
    assert checks["data.train"]["status"] == "ok" and "exists, read train.jsonl" in checks["data.train"]["result"]
    assert checks["data.eval"]["status"] == "ok", checks["data.eval"]  # a folder: one file inside is read
    rc, checks = doctor(job, *base, "--set", f"data.train={s3.uri('data/missing.jsonl')}")
    assert rc == 1 and checks["data.train"]["status"] == "fail" and "not found" in checks["data.train"]["result"]
    assert "check the bucket and path exist" in checks["data.train"]["fix"]
    rc, checks = doctor(job, *base, "--set", "data.train=s3://ftc-no-such-bucket/train.jsonl")
    assert checks["data.train"]["status"] == "fail" and "bucket does not exist" in checks["data.train"]["result"]
    rc, checks = doctor(job, *base, "--set", f"data.train={s3.uri('data/train.jsonl')}",
                        env={"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "",
                             "AWS_SHARED_CREDENTIALS_FILE": "/dev/null", "AWS_CONFIG_FILE": "/dev/null"})
    assert checks["data.train"]["status"] == "fail" and "no valid credentials" in checks["data.train"]["result"]
    assert "AWS_ACCESS_KEY_ID" in checks["data.train"]["fix"]


def test_within_bounds_a_probe_that_never_answers():
    """The doctor's storage probes run through checks.within: a hung store is a failed row, not a hang."""
    import threading
    import time

    from ftcluster.preflight.checks import within

    assert within(lambda: 42, 5) == (42, None)
    value, err = within(lambda: 1 / 0, 5)
    assert value is None and isinstance(err, ZeroDivisionError)
    release = threading.Event()
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="no answer within 0s"):
        within(lambda: release.wait(30), 0.2)
    assert time.monotonic() - start < 5
    release.set()
