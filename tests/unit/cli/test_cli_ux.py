"""What a new user sees (issue #8): dry-run commands that paste, run ids that print whole at 80
columns, a progress bar on a terminal (plain lines otherwise), the printed run id, --fresh, and
`ftcluster sample`."""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftcluster.backends.base import RunStatus, save_status
from ftcluster.ui.tables import table
from tests.unit.cli.test_cli import ROOT, ftc

# A stand-in for the interpreter that trains 3 steps, writing metrics.jsonl like the runtime does.
METRICS_TRAINER = """#!/bin/bash
echo "args: $*"
for i in 1 2 3; do
  echo "{\\"kind\\": \\"train\\", \\"step\\": $i, \\"loss\\": 2.5, \\"tokens_per_s\\": 1234, \\"eta_s\\": 1}" >> "$FAKE_OUT/metrics.jsonl"
  echo "step $i/3 | loss 2.5000"
  sleep 0.4
done
"""
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


def _metrics_job(tmp_path: Path) -> tuple[Path, Path]:
    shim = tmp_path / "fake-python"
    shim.write_text(METRICS_TRAINER)
    shim.chmod(0o755)
    out = tmp_path / "out"
    spec = (ROOT / "examples" / "quickstart.yaml").read_text().replace("uri: file://../out/quickstart", f"uri: file://{out}")
    spec = spec.replace("data/", f"{ROOT / 'examples' / 'data'}/")  # submit checks the inputs as validate does
    spec += f"local:\n  python: {shim}\n  env:\n    FAKE_OUT: {out}\n"
    (job := tmp_path / "job.yaml").write_text(spec)
    out.mkdir()
    return job, out


def _on_a_pty(args: list[str], env: dict, timeout: float = 60) -> str:
    """Run the CLI with stdout and stderr on a pseudo-terminal; everything it wrote, without ANSI codes."""
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "ftcluster.cli", *args], cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=slave, stderr=slave, env={**os.environ, **env, "TERM": "xterm", "COLUMNS": "100"})
    os.close(slave)
    chunks, deadline = [], time.time() + timeout
    try:
        while time.time() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the other side closed
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        proc.wait(timeout=10)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")
    return ANSI.sub("", b"".join(chunks).decode(errors="replace"))


@pytest.mark.slow
def test_progress_bar_on_a_terminal_and_plain_lines_otherwise(tmp_path):
    env = {"FTCLUSTER_HOME": str(tmp_path / "home")}
    job, out = _metrics_job(tmp_path)
    shown = _on_a_pty(["submit", str(job), "--wait", "--set", "training.max_steps=3"], env)
    assert re.search(r"train\s.*3/3.*loss 2\.5000 \| 1,234 tok/s", shown), shown  # the bar, from metrics.jsonl
    assert "step 2/3 | loss 2.5000" in shown  # the log lines still stream

    (out / "metrics.jsonl").unlink()
    res = ftc("submit", str(job), "--wait", env=env)  # not a terminal: exactly the log, nothing else
    assert res.returncode == 0, res.stderr
    first, rest = res.stdout.split("\n", 1)
    run_id = first.split()[1]
    assert rest == ftc("logs", run_id, env=env, check=True).stdout
    assert "tok/s" not in res.stdout and "\x1b" not in res.stdout

    followed = _on_a_pty(["logs", "-f", run_id], env)  # an ended run: its log, no bar
    assert "step 3/3 | loss 2.5000" in followed and "tok/s" not in followed


def test_submit_prints_the_run_id_that_status_takes(tmp_path):
    env = {"FTCLUSTER_HOME": str(tmp_path / "home")}
    job, _ = _metrics_job(tmp_path)
    res = ftc("submit", str(job), env=env, check=True)
    first = res.stdout.splitlines()[0]
    run_id = first.split()[1]
    assert re.fullmatch(rf"submitted {re.escape(run_id)} \(local\); run folder .*", first)  # no pid as "job"
    assert f"ftcluster logs -f {run_id}" in res.stdout
    st = json.loads(ftc("status", run_id, "--json", env=env, check=True).stdout)
    assert st["run_id"] == run_id and st["job_id"] is None


def _long_runs(home: Path) -> list[tuple[str, str]]:
    runs = []
    for i, name in enumerate(["support-bot-lora-with-a-rather-long-descriptive-name", "q"]):
        run_id = f"{name}-20260101-00000{i}-ab{i}d"
        message = ("the job exited with code 1: see s3://bucket/some/very/long/output/prefix/for/this/run/log.txt "
                   "and rerun with training.micro_batch_size=4 to fit in memory")
        d = home / "runs" / run_id
        d.mkdir(parents=True)
        save_status(d, RunStatus(run_id, "local", name, "FAILED", str(d), message=message))
        runs.append((run_id, message))
    return runs


def test_status_and_list_keep_run_ids_and_words_whole_at_80_columns(tmp_path):
    env = {"FTCLUSTER_HOME": str(tmp_path / "home"), "COLUMNS": "80"}
    runs = _long_runs(tmp_path / "home")
    for args in (["list"], ["status"], ["status", runs[0][0]]):
        text = ftc(*args, env=env, check=True).stdout
        lines = text.splitlines()
        for run_id, message in runs if len(args) < 2 else runs[:1]:
            assert any(run_id in ln.split() for ln in lines), text  # whole, on one line, copy-pasteable
            words = text.split()
            assert all(w in words for w in message.split()), text  # wrapped between words, never inside one
        assert all(len(ln) <= 80 or any(r in ln for r, _ in runs) or "s3://" in ln for ln in lines), text


def test_status_lists_each_failed_attempt_s_cause(tmp_path):
    home = tmp_path / "home"
    d = home / "runs" / "q-20260101-000000-ab0d"
    d.mkdir(parents=True)
    save_status(d, RunStatus("q-20260101-000000-ab0d", "local", "q", "SUCCEEDED", str(d), restarts=1,
                             message="restarted 1 time(s) after infrastructure faults",
                             faults=[{"attempt": 1, "code": 170, "kind": "infrastructure", "rank": 1, "host": "n2",
                                      "what": "killed by SIGKILL"}]))
    text = ftc("status", "q-20260101-000000-ab0d", env={"FTCLUSTER_HOME": str(home), "COLUMNS": "120"},
               check=True).stdout
    row = next(ln for ln in text.splitlines() if "attempt 1" in ln)
    assert "FAULT" in row and "rank 1 on n2: killed by SIGKILL" in row, text


def test_table_moves_a_narrow_column_to_detail_lines():
    rows = [["a" * 70, "ok", "all good and more words here"]]
    text = table(["CHECK", "", "RESULT"], rows, width=80, details=[["fix: set output.uri to a folder you can write"]])
    lines = text.splitlines()
    assert lines[1].split() == ["a" * 70, "ok"] and lines[2].strip() == "all good and more words here"
    assert lines[3].strip() == "fix: set output.uri to a folder you can write"


def test_dry_run_commands_paste_and_name_no_run_folder_files(tmp_path):
    env = {"FTCLUSTER_HOME": str(tmp_path / "home")}
    res = ftc("submit", "examples/lora-slurm.yaml", "--dry-run", env=env, check=True)
    assert "\n$ sbatch --parsable support-bot-lora.sbatch\n" in res.stdout
    assert "'<" not in res.stdout
    assert "\n----- support-bot-lora.sbatch (would be written to the run folder) -----\n" in res.stdout
    ssh = ftc("submit", "examples/lora-slurm.yaml", "--dry-run", "--set", "slurm.login=hpc", env=env, check=True)
    assert "\n$ ssh hpc sbatch --parsable < support-bot-lora.sbatch\n" in ssh.stdout
    local = ftc("submit", "examples/quickstart.yaml", "--dry-run", env=env, check=True)
    headers = [ln for ln in local.stdout.splitlines() if ln.startswith("----- ")]
    assert headers == [f"----- {n} (would be written to the run folder) -----"
                       for n in ("payload.json", "launch.sh")]
    assert not (tmp_path / "home").exists()


def test_a_finished_output_says_how_to_start_afresh(tmp_path):
    env = {"FTCLUSTER_HOME": str(tmp_path / "home")}
    job, out = _metrics_job(tmp_path)
    (out / "adapter").mkdir()
    (out / "adapter" / "manifest.json").write_text("{}")
    res = ftc("submit", str(job), env=env, check=True)
    assert "already holds a finished run (adapter/ is committed)" in res.stderr and "--fresh" in res.stderr
    fresh = ftc("submit", str(job), "--fresh", env=env, check=True)
    new_uri = re.search(r"--fresh: output.uri is (\S+)", fresh.stderr).group(1)
    assert re.fullmatch(rf"file://{re.escape(str(out))}-\d{{8}}-\d{{6}}", new_uri) and "already" not in fresh.stderr
    run_id = fresh.stdout.split()[1]
    st = json.loads(ftc("status", run_id, "--json", env=env, check=True).stdout)
    assert st["output_uri"] == new_uri and (out / "adapter" / "manifest.json").exists()  # nothing deleted


def test_sample_without_torch_is_one_line_with_the_fix(tmp_path, monkeypatch):
    import importlib.util

    from click.testing import CliRunner

    from ftcluster.cli import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    res = CliRunner().invoke(cli, ["sample", f"file://{tmp_path}", "--prompt", "hi"])
    assert res.exit_code == 1 and res.output.strip().splitlines() == [
        "error: ftcluster sample runs the model here and needs torch: pip install 'ftcluster[train]'"]


def test_merge_without_torch_and_sample_given_both_or_neither(tmp_path, monkeypatch):
    import importlib.util

    from click.testing import CliRunner

    from ftcluster.cli import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    res = CliRunner().invoke(cli, ["merge", f"file://{tmp_path}", "-o", f"file://{tmp_path}/merged"])
    assert res.exit_code == 1 and res.output.strip().splitlines() == [
        "error: ftcluster merge runs here and needs torch: pip install 'ftcluster[train]'"]
    for args in (["sample", "-p", "hi"], ["sample", f"file://{tmp_path}", "-p", "hi", "--adapter", str(tmp_path)]):
        res = CliRunner().invoke(cli, args, prog_name="ftcluster")
        assert res.exit_code == 2 and res.output.strip().splitlines() == [
            "error: give a RUN_OR_URI to sample, or one --adapter or more to compare (not both)",
            "try 'ftcluster sample --help'"], res.output


@pytest.mark.train
@pytest.mark.slow
def test_sample_a_tiny_quickstart_run(tmp_path):
    pytest.importorskip("peft")
    env = {"FTCLUSTER_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1", "FTCLUSTER_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "qs"
    res = ftc("submit", "examples/quickstart.yaml", "--wait", "--set", "training.max_steps=4",
              "--set", f"output.uri=file://{out}", "--set", "output.checkpoint_every_steps=4", env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
    run_id = res.stdout.split()[1]
    for ref in (run_id, f"file://{out}"):
        s = ftc("sample", ref, "--prompt", "What is the capital of Garovia?", "-n", "8", env=env)
        assert s.returncode == 0, s.stderr
        assert s.stdout.strip() and f"sampling from file://{out}/adapter" in s.stderr
    none = ftc("sample", f"file://{tmp_path}", "--prompt", "hi", env=env)
    assert none.returncode == 1 and none.stderr.strip().splitlines()[-1].startswith(f"error: file://{tmp_path}: no trained")


FAKE_SBATCH_NO_CONTROLLER = """#!/bin/sh
cat > /dev/null
echo "sbatch: error: resolve_ctls_from_dns_srv: res_nsearch error: Unknown host" >&2
echo "sbatch: error: fetch_config: DNS SRV lookup failed" >&2
echo "sbatch: error: Unable to contact slurm controller (connect failure)" >&2
exit 1
"""


def test_submit_without_a_reachable_slurm_says_so_in_one_line(tmp_path):
    """sbatch's resolver noise becomes the doctor's verdict and the command that explains it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH_NO_CONTROLLER)
    (bin_dir / "sbatch").chmod(0o755)
    env = {"FTCLUSTER_HOME": str(tmp_path / "home"), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    res = ftc("submit", "examples/lora-slurm.yaml", "--set", f"output.uri={(tmp_path / 'out').as_uri()}", env=env)
    assert res.returncode != 0
    assert res.stderr.splitlines() == [
        "error: no Slurm controller reachable from this machine (sbatch: Unable to contact slurm controller "
        "(connect failure)); run ftcluster doctor examples/lora-slurm.yaml"], res.stderr
    assert "res_nsearch" not in res.stdout + res.stderr
    assert not list((tmp_path / "home").rglob("*.sbatch"))  # no run folder left behind


def test_server_dry_run_without_a_kubeconfig_is_one_line(tmp_path):
    """`submit --dry-run --server` connects first: no kubeconfig is the one error line, not the manifest
    followed by it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}  # not "inside a cluster"
    env.update(FTCLUSTER_HOME=str(tmp_path / "home"), KUBECONFIG=str(tmp_path / "no-such-kubeconfig"))
    res = subprocess.run([sys.executable, "-m", "ftcluster.cli", "submit", "examples/lora-pytorchjob.yaml", "--dry-run",
                          "--server"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no kubeconfig") and "no-such-kubeconfig" in lines[0], lines
