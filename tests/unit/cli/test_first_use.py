"""First-use problems of issue #19: `submit` refuses what `validate` refuses (and, for a local run, an
object store this shell has no credentials for) before it writes anything; a finished output submits
nothing; Ctrl-C during `submit --wait` says the run goes on and how to follow or stop it; usage errors
are one `error:` line; the shell completes run ids."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from ftcluster import api
from ftcluster.backends.base import RunStatus, save_status
from ftcluster.cli import cli
from ftcluster.spec.loader import load_spec
from tests.unit.cli.test_cli import ROOT, _fake_job, _wait_state, ftc

EX = ROOT / "examples"


def _no_aws_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This process's environment without any AWS credentials (no variables, no config or credentials file)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**env, "AWS_CONFIG_FILE": str(tmp_path / "no-config"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-creds"),
            "FTCLUSTER_HOME": str(tmp_path / "home"), **extra}


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftcluster.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=120)


# --------------------------------------------------------------------------- item 2: submit checks what validate checks


def test_submit_refuses_a_missing_data_file_with_validates_line_and_writes_nothing(tmp_path):
    home = tmp_path / "home"
    job = _fake_job(tmp_path)  # a stand-in interpreter: were it submitted, nothing would train
    sets = ["--set", "data.train=no-such.jsonl", "--set", f"output.uri=file://{tmp_path / 'out'}"]
    val = ftc("validate", str(job), *sets)
    assert val.returncode == 2 and "data.train: no-such.jsonl: no such file or folder" in val.stderr, val.stderr
    for extra in ([], ["--wait"], ["--dry-run"]):
        sub = ftc("submit", str(job), *sets, *extra, env={"FTCLUSTER_HOME": str(home)})
        assert (sub.returncode, sub.stderr, sub.stdout) == (2, val.stderr, ""), (extra, sub.stderr, sub.stdout)
    assert not home.exists() and not (tmp_path / "out").exists()


def _s3_job(tmp_path: Path, backend_lines: str = "") -> Path:
    job = _fake_job(tmp_path, backend_lines)
    text = job.read_text().replace("uri: file://../out/quickstart", "uri: s3://bucket/x")
    job.write_text(text)
    return job


def test_local_submit_refuses_an_s3_output_this_shell_has_no_credentials_for(tmp_path):
    pytest.importorskip("botocore")
    job = _s3_job(tmp_path)
    env = _no_aws_env(tmp_path)
    line = next(i for i, ln in enumerate(job.read_text().splitlines(), 1) if "uri: s3://bucket/x" in ln)
    started = time.monotonic()
    res = _run(["submit", str(job), "--wait"], env)
    assert time.monotonic() - started < 60  # offline: no bucket is contacted
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and res.stdout == "" and len(lines) == 1, res.stderr
    assert lines[0].startswith(f"error: {job}:{line}:") and "output.uri: s3://bucket/x: no valid credentials" in lines[0]
    assert "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role" in lines[0]
    assert not (tmp_path / "home").exists()
    dry = _run(["submit", str(job), "--dry-run"], env)  # a dry run contacts nothing and checks no credentials
    assert dry.returncode == 0, dry.stderr


def test_check_submit_credentials_only_where_the_shells_are_the_jobs(tmp_path, monkeypatch):
    pytest.importorskip("botocore")
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-creds"))
    job = _s3_job(tmp_path)
    from ftcluster.errors import SpecError

    with pytest.raises(SpecError, match="output.uri: s3://bucket/x: no valid credentials"):
        api.check_submit(load_spec(job))
    api.check_submit(load_spec(job), credentials=False)
    api.check_submit(load_spec(job, ["output.storage_options={anon: true}"]))  # a public bucket needs none
    api.check_submit(load_spec(job, ["local.env={AWS_PROFILE: other}"]))  # the job's are not this shell's
    kube = load_spec(job, ["backend=kubernetes", "kubernetes.image=i:1"])
    api.check_submit(kube)  # the pods have credentials of their own
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "example")
    api.check_submit(load_spec(job))  # they resolve: nothing is said (and nothing is contacted)


# --------------------------------------------------------------------------- item 7: a finished output submits nothing


def test_submit_wait_on_a_finished_output_stops_after_the_note(tmp_path):
    home = tmp_path / "home"
    out = tmp_path / "out"
    job = _fake_job(tmp_path)
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "manifest.json").write_text("{}")
    sets = ["--set", f"output.uri=file://{out}"]
    for extra in (["--wait"], []):
        res = ftc("submit", str(job), *sets, *extra, env={"FTCLUSTER_HOME": str(home)})
        assert res.returncode == 0 and res.stdout == "", (res.stdout, res.stderr)
        assert "already holds a finished run (adapter/ is committed): already complete" in res.stderr
        assert "nothing submitted" in res.stderr and "--fresh" in res.stderr
        assert not (home / "runs").exists() or not any((home / "runs").iterdir())
    fresh = ftc("submit", str(job), *sets, "--fresh", "--wait", env={"FTCLUSTER_HOME": str(home)})
    assert fresh.returncode == 0 and fresh.stdout.startswith("submitted ") and "step 3" in fresh.stdout, fresh.stderr
    assert len(list((home / "runs").iterdir())) == 1


# --------------------------------------------------------------------------- item 11: Ctrl-C during submit --wait


def test_ctrl_c_during_submit_wait_says_the_run_goes_on_and_how_to_follow_or_stop_it(tmp_path):
    env = {"FTCLUSTER_HOME": str(tmp_path / "home")}
    job = _fake_job(tmp_path, "  env:\n    FAKE_HANG: '1'\n")
    proc = subprocess.Popen([sys.executable, "-m", "ftcluster.cli", "submit", str(job), "--wait"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
    run_id = None
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        run_id = first.split()[1]
        while "step 1" not in (line := proc.stdout.readline()):
            assert line, f"the log ended before step 1: {proc.stderr.read() if proc.stderr else ''}"
        proc.send_signal(signal.SIGINT)  # the CLI alone, as a terminal's Ctrl-C reaches it (the run has its own session)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert "keeps running" in err and f"ftcluster logs -f {run_id}" in err and f"ftcluster cancel {run_id}" in err
        assert _wait_state(run_id, env, {"RUNNING"})["state"] == "RUNNING"
    finally:
        if proc.poll() is None:
            proc.kill()
        if run_id:
            ftc("cancel", run_id, env=env)


# --------------------------------------------------------------------------- item 15: usage errors are one line


@pytest.mark.parametrize(("args", "lines"), [
    (["submit"], ["error: missing argument 'JOB'", "try 'ftcluster submit --help'"]),
    (["submit", "job.yaml", "--bogus"], ["error: no such option '--bogus'", "try 'ftcluster submit --help'"]),
    (["render", "job.yaml", "-t", "helm"], ["error: invalid value for '--target' / '-t': 'helm' is not one of "
                                            "'slurm', 'pytorchjob', 'trainjob'", "try 'ftcluster render --help'"]),
    (["subm"], ["error: no such command 'subm'; did you mean 'submit'?", "try 'ftcluster --help'"]),
    (["--bogus"], ["error: no such option '--bogus'", "try 'ftcluster --help'"]),
    (["submit", "examples/quickstart.yaml", "--dry-run", "--server"],
     ["error: --server and --context apply to the kubernetes backend only", "try 'ftcluster submit --help'"]),
])
def test_usage_errors_are_one_error_line_and_a_hint(args, lines):
    res = CliRunner().invoke(cli, args, prog_name="ftcluster")
    assert res.exit_code == 2 and res.stdout == "" and res.stderr.splitlines() == lines, res.output


def test_no_arguments_still_print_the_help():
    res = CliRunner().invoke(cli, [], prog_name="ftcluster")
    assert "Commands:" in res.output and "error:" not in res.output


# --------------------------------------------------------------------------- item 18: shell completion of run ids


def _complete(words: str, env: dict[str, str]) -> list[str]:
    cword = str(len(words.split()) - (0 if words.endswith(" ") else 1))
    res = subprocess.run([sys.executable, "-m", "ftcluster.cli"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, **env, "_FTCLUSTER_COMPLETE": "bash_complete", "COMP_WORDS": words,
                              "COMP_CWORD": cword})
    assert res.returncode == 0 and res.stderr == "", res.stderr
    return [ln for ln in res.stdout.splitlines() if ln]


def test_the_shell_completes_run_ids(tmp_path):
    runs = tmp_path / "home" / "runs"
    ids = ["quickstart-20260101-000000-ab12", "quickstart-20260102-000000-cd34", "other-20260101-000000-ef56"]
    for run_id in ids:
        (runs / run_id).mkdir(parents=True)
        save_status(runs / run_id, RunStatus(run_id, "local", "q", "SUCCEEDED", str(runs / run_id)))
    (runs / "quickstart-not-a-run").mkdir()  # no status.json
    env = {"FTCLUSTER_HOME": str(tmp_path / "home")}
    for cmd in ("status", "logs", "cancel", "sample", "logs -f"):
        assert _complete(f"ftcluster {cmd} quick", env) == [f"plain,{i}" for i in ids[:2]], cmd
    assert _complete("ftcluster status ", env) == [f"plain,{i}" for i in sorted(ids)]
    assert _complete("ftcluster sample ./out", env) == ["file,./out"]  # not a run: a path
    assert _complete("ftcluster status quick", {"FTCLUSTER_HOME": str(tmp_path / "nowhere")}) == []
    (tmp_path / "file").write_text("")
    assert _complete("ftcluster status q", {"FTCLUSTER_HOME": str(tmp_path / "file")}) == []


def test_readme_documents_shell_completion():
    readme = (ROOT / "README.md").read_text()
    for shell in ("bash", "zsh", "fish"):
        assert f"_FTCLUSTER_COMPLETE={shell}_source ftcluster" in readme
