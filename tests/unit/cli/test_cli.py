"""The CLI end to end, in subprocesses, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
HEAVY = ("torch", "transformers", "deepspeed", "kubernetes", "peft", "s3fs", "submitit")


def ftc(*args: str, env: dict | None = None, cwd: Path = ROOT, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "ftcluster.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_help_and_render_import_no_heavy_library():
    code = (
        "import sys\nfrom ftcluster.cli import cli\n"
        "for args in (['--help'], ['render', 'examples/full-slurm-2node.yaml', '--target', 'slurm'],"
        " ['render', 'examples/full-trainjob.yaml', '--target', 'trainjob'], ['validate', 'examples/quickstart.yaml']):\n"
        "    try: cli(args, prog_name='ftcluster')\n"
        "    except SystemExit as e: assert not e.code, e.code\n"
        f"print('HEAVY=' + ','.join(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "HEAVY="


def test_validate_ok_and_bad(tmp_path):
    ok = ftc("validate", "examples/full-slurm-2node.yaml", check=True)
    assert "world size 16" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmethod: full\nmodel: {random_init: {preset: tiny}}\ndata: {train: a.jsonl}\n"
                   "output: {uri: file:///tmp/o}\ntraining: {epochs: zero, lr: 1}\n")
    res = ftc("validate", str(bad))
    assert res.returncode == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert lines[0].startswith(f"error: {bad}:6:") and "training.epochs" in lines[0]
    assert "training.lr: unknown field 'lr'" in lines[1]
    dbg = ftc("--debug", "validate", str(bad))
    assert dbg.returncode != 0 and "Traceback" in dbg.stderr


def test_set_override_on_cli():
    res = ftc("validate", "examples/quickstart.yaml", "--set", "resources.procs_per_node=2", check=True)
    assert "world size 2" in res.stdout
    res = ftc("validate", "examples/quickstart.yaml", "--set", "training.seed=minus")
    assert res.returncode == 2 and res.stderr.startswith("error: --set: training.seed:")


def test_render_writes_all_files_and_is_stable(tmp_path):
    out = tmp_path / "out"
    ftc("render", "examples/lora-pytorchjob.yaml", "--target", "pytorchjob", "-o", str(out), check=True)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["legal-style-lora.yaml"]
    first = (out / files[0]).read_text()
    ftc("render", "examples/lora-pytorchjob.yaml", "--target", "pytorchjob", "-o", str(out), check=True)
    assert (out / files[0]).read_text() == first
    printed = ftc("render", "examples/lora-pytorchjob.yaml", "--target", "pytorchjob", check=True).stdout
    assert printed == first


def test_render_bad_spec_writes_nothing(tmp_path):
    out = tmp_path / "out"
    res = ftc("render", "examples/lora-slurm.yaml", "--set", "resources.nodes=0", "-o", str(out))
    assert res.returncode == 2 and not out.exists()


def test_submit_dry_run_submits_nothing(tmp_path):
    home = tmp_path / "home"
    res = ftc("submit", "examples/quickstart.yaml", "--dry-run", env={"FTCLUSTER_HOME": str(home)}, check=True)
    assert "-m ftcluster.train.launch" in res.stdout and "-m ftcluster.train --spec" in res.stdout
    assert '"name": "quickstart"' in res.stdout  # the payload's full contents
    assert not home.exists()


@pytest.mark.slow
def test_kubernetes_submit_without_a_cluster_is_one_line(tmp_path):
    """No kubeconfig and not in a pod: one line with the fix; the dry run still works (it contacts nothing)."""
    env = {"KUBECONFIG": str(tmp_path / "none"), "KUBERNETES_SERVICE_HOST": "", "FTCLUSTER_HOME": str(tmp_path / "h")}
    res = ftc("submit", "examples/lora-pytorchjob.yaml", env=env)
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1 and "no kubeconfig" in res.stderr
    dry = ftc("submit", "examples/lora-pytorchjob.yaml", "--dry-run", env=env, check=True)
    assert "$ kubectl create --validate=strict -f legal-style-lora.yaml" in dry.stdout
    assert "kind: PyTorchJob" in dry.stdout and not (tmp_path / "h").exists()
    bad = ftc("submit", "examples/quickstart.yaml", "--dry-run", "--server", env=env)
    assert bad.returncode == 2 and "kubernetes backend only" in bad.stderr


def test_render_kustomize_matches_the_committed_example(tmp_path):
    """`ftcluster render --kustomize -o DIR` writes what manifests/examples holds, byte for byte."""
    for example, folder in (("lora-pytorchjob", "lora-pytorchjob"), ("full-trainjob", "full-trainjob")):
        ftc("render", f"examples/{example}.yaml", "--kustomize", "-o", str(tmp_path / folder), check=True)
        committed = ROOT / "manifests" / "examples" / folder
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == sorted(p.name for p in committed.iterdir())
        for p in committed.iterdir():
            assert (tmp_path / folder / p.name).read_text() == p.read_text(), p
    slurm = ftc("render", "examples/lora-slurm.yaml", "--kustomize")
    assert slurm.returncode == 2 and "--kustomize applies to" in slurm.stderr


def test_schema_matches_committed_file():
    res = ftc("schema", check=True)
    schema = json.loads(res.stdout)
    assert set(schema["discriminator"]["mapping"]) == {"lora", "full"}
    committed = (ROOT / "docs" / "ftcluster.schema.json").read_text()
    assert res.stdout == committed, "docs/ftcluster.schema.json is stale: run `ftcluster schema -o docs/ftcluster.schema.json`"


FAKE_TRAINER = """#!/bin/bash
# Stands in for the interpreter: prints progress, then exits or waits for a signal.
echo "args: $*"
trap 'echo "got TERM, saving"; exit 143' TERM
for i in $(seq 1 "${FAKE_STEPS:-3}"); do echo "step $i"; sleep 0.2; done
if [ -n "${FAKE_HANG:-}" ]; then while true; do sleep 0.1; done; fi
exit "${FAKE_RC:-0}"
"""


def _fake_job(tmp_path: Path, extra: str = "") -> Path:
    shim = tmp_path / "fake-python"
    shim.write_text(FAKE_TRAINER)
    shim.chmod(0o755)
    # The examples' data, absolute: submit checks the local inputs as validate does.
    spec = (ROOT / "examples" / "quickstart.yaml").read_text().replace("data/", f"{ROOT / 'examples' / 'data'}/")
    spec += f"local:\n  python: {shim}\n{extra}"
    path = tmp_path / "job.yaml"
    path.write_text(spec)
    return path


def _wait_state(run_id: str, env: dict, states: set[str], timeout: float = 30) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = json.loads(ftc("status", run_id, "--json", env=env, check=True).stdout)
        if st["state"] in states:
            return st
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} never reached {states}: {st}")


def _wait_log(run_id: str, env: dict, text: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    log = ""
    while time.time() < deadline:
        log = ftc("logs", run_id, env=env, check=True).stdout
        if text in log:
            return
        time.sleep(0.1)
    raise AssertionError(f"run {run_id} never logged {text!r}: {log[-500:]!r}")


@pytest.mark.slow
def test_local_backend_lifecycle(tmp_path):
    env = {"FTCLUSTER_HOME": str(tmp_path / "home")}
    job = _fake_job(tmp_path, "  env:\n    FAKE_STEPS: '3'\n")
    res = ftc("submit", str(job), "--wait", env=env)
    assert res.returncode == 0, res.stderr
    assert "step 3" in res.stdout and "SUCCEEDED" in res.stderr
    run_id = res.stdout.split()[1]
    listing = json.loads(ftc("list", "--json", env=env, check=True).stdout)
    assert [r["run_id"] for r in listing] == [run_id] and listing[0]["state"] == "SUCCEEDED"
    log = ftc("logs", run_id[:-2], env=env, check=True).stdout
    assert "args: -m ftcluster.train.launch" in log and "--spec" in log
    run_dir = Path(listing[0]["run_dir"])
    assert json.loads((run_dir / "payload.json").read_text())["spec"]["name"] == "quickstart"


@pytest.mark.slow
def test_local_backend_failure_exit_code(tmp_path):
    env = {"FTCLUSTER_HOME": str(tmp_path / "home")}
    job = _fake_job(tmp_path, "  env:\n    FAKE_RC: '7'\n")
    res = ftc("submit", str(job), "--wait", env=env)
    assert res.returncode == 1 and "FAILED" in res.stderr and "exit code 7" in res.stderr


@pytest.mark.slow
def test_local_backend_cancel(tmp_path):
    env = {"FTCLUSTER_HOME": str(tmp_path / "home")}
    job = _fake_job(tmp_path, "  env:\n    FAKE_HANG: '1'\n")
    res = ftc("submit", str(job), env=env, check=True)
    run_id = res.stdout.split()[1]
    _wait_state(run_id, env, {"RUNNING"})
    _wait_log(run_id, env, "step 1")  # printed after the fake trainer's TERM trap is installed
    assert "cancel requested" in ftc("cancel", run_id, env=env, check=True).stdout
    st = _wait_state(run_id, env, {"CANCELLED", "FAILED", "SUCCEEDED"})
    assert st["state"] == "CANCELLED" and st["returncode"] == 143
    assert "got TERM, saving" in ftc("logs", run_id, env=env, check=True).stdout


def test_unknown_run_is_one_line(tmp_path):
    res = ftc("status", "nope", env={"FTCLUSTER_HOME": str(tmp_path)})
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "no run matches 'nope'" in res.stderr


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.yaml")))
def test_examples_validate(example, tmp_path):
    from tests.support.corpora import prepared_stand_in

    ftc("validate", f"examples/{example}", *prepared_stand_in(ROOT / "examples" / example, tmp_path), check=True)


def test_spec_reference_doc_in_sync():
    from ftcluster.spec.docgen import render_markdown

    assert (ROOT / "docs" / "spec.md").read_text() == render_markdown(), (
        "docs/spec.md is stale: run `python -m ftcluster.spec.docgen > docs/spec.md`")
