"""Submitting over SSH, for real: a local sshd (tests/support/sshd_fixture.py) in front of the live Slurm.

The CLI runs with SLURM_CONF *unset*, so no Slurm command can work locally: everything that
reaches the cluster goes through `ssh ftc-login` (an alias in the config given by
FTCLUSTER_SSH_CONFIG, which also forwards SLURM_CONF to the remote shell). The training program
is a shell shim standing in for python, as in tests/unit/cli/test_cli.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.sshd_fixture import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slurm

SHIM = """#!/bin/bash
# Stands in for python on the compute node: prints progress, then exits or waits for a signal.
echo "args: $*"
echo "passthrough=${FTC_SSH_PASS:-unset}"
trap 'echo "got TERM, saving"; exit 143' TERM
trap 'echo "got USR2, saving"; exit 143' USR2
for i in $(seq 1 "${FAKE_STEPS:-3}"); do echo "step $i"; sleep 0.2; done
if [ -n "${FAKE_HANG:-}" ]; then while true; do sleep 0.1; done; fi
exit "${FAKE_RC:-0}"
"""


@pytest.fixture
def slurm(live_slurm):
    """The live Slurm (see conftest.live_slurm)."""


def write_job(tmp_path: Path, login: str, env: dict[str, str], requeue: bool = True) -> Path:
    shim = tmp_path / "fake-python"
    shim.write_text(SHIM)
    shim.chmod(0o755)
    text = (ROOT / "examples" / "quickstart.yaml").read_text().replace("backend: local", "backend: slurm")
    text += "slurm:\n" + "\n".join([
        "  partition: debug",
        f"  login: {login}",
        f"  python: {shim}",
        f"  output: {tmp_path}/logs/slurm-%x-%j.out",
        f"  requeue: {str(requeue).lower()}",
        "  env_passthrough: [FTC_SSH_PASS]",
        "  env: {" + ", ".join(f"{k}: '{v}'" for k, v in env.items()) + "}",
    ]) + "\n"
    (tmp_path / "logs").mkdir(exist_ok=True)
    job = tmp_path / "job.yaml"
    job.write_text(text)
    return job


def ftc(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftcluster.cli", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


@pytest.fixture
def remote_env(sshd, tmp_path):  # noqa: F811
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}  # local Slurm commands cannot work
    env.update({"FTCLUSTER_HOME": str(tmp_path / "home"), "FTCLUSTER_SSH_CONFIG": str(sshd.config),
                "FTC_SSH_PASS": "from-the-laptop"})
    return env


def wait_state(run_id: str, env: dict, states: set[str], timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    while True:
        st = json.loads(ftc("status", run_id, "--json", env=env).stdout)
        if st["state"] in states:
            return st
        if time.time() > deadline:
            raise AssertionError(f"{run_id} never reached {states}: {st}")
        time.sleep(0.5)


def test_submit_wait_status_logs_over_ssh(slurm, sshd, remote_env, tmp_path):  # noqa: F811
    job = write_job(tmp_path, sshd.alias, {"FAKE_STEPS": "4"})
    res = ftc("submit", str(job), "--wait", env=remote_env)
    assert res.returncode == 0, res.stderr
    assert "SUCCEEDED" in res.stderr
    for line in ("step 4", "passthrough=from-the-laptop", "args: -m ftcluster.train.launch"):
        assert line in res.stdout, res.stdout  # streamed from the login node with `tail` over ssh
    run_id = res.stdout.split()[1]
    st = json.loads(ftc("status", run_id, "--json", env=remote_env).stdout)
    assert st["state"] == "SUCCEEDED" and st["job_id"]
    extra = json.loads((Path(st["run_dir"]) / "slurm.json").read_text())
    assert extra["login"] == sshd.alias
    assert extra["log"] == f"{tmp_path}/logs/slurm-quickstart-{st['job_id']}.out"  # Slurm's own StdOut=
    logs = ftc("logs", run_id, env=remote_env)
    assert logs.returncode == 0 and "step 4" in logs.stdout
    # One master connection serves every call (ControlPersist): it is still up after the CLI exited.
    check = subprocess.run(["ssh", "-F", str(sshd.config), "-o", f"ControlPath=/tmp/ftcluster-ssh-{os.getuid()}/%C",
                            "-O", "check", sshd.alias], capture_output=True, text=True, timeout=20)
    assert check.returncode == 0 and "Master running" in check.stderr, check.stderr


def test_cancel_over_ssh(slurm, sshd, remote_env, tmp_path, request):  # noqa: F811
    job = write_job(tmp_path, sshd.alias, {"FAKE_HANG": "1"}, requeue=False)
    res = ftc("submit", str(job), env=remote_env)
    assert res.returncode == 0, res.stderr
    run_id = res.stdout.split()[1]
    request.addfinalizer(lambda: ftc("cancel", run_id, env=remote_env))  # no job left behind on failure
    wait_state(run_id, remote_env, {"RUNNING"})
    time.sleep(1.0)
    assert "cancel requested" in ftc("cancel", run_id, env=remote_env).stdout
    st = wait_state(run_id, remote_env, {"CANCELLED", "FAILED", "SUCCEEDED"})
    assert st["state"] == "CANCELLED", st
    log = ftc("logs", run_id, env=remote_env).stdout
    assert "got TERM, saving" in log, log


@pytest.mark.skipif(shutil.which("ssh") is None, reason="no ssh client: apt-get install -y openssh-client")
def test_ssh_failure_is_one_line_with_the_fix(tmp_path):
    port = free_port()  # nothing listens there
    job = write_job(tmp_path, f"root@127.0.0.1:{port}", {})
    env = {**os.environ, "FTCLUSTER_HOME": str(tmp_path / "home")}
    env.pop("FTCLUSTER_SSH_CONFIG", None)
    res = ftc("submit", str(job), env=env)
    assert res.returncode == 1 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"error: ssh to root@127.0.0.1:{port} failed (")
    assert "Connection refused" in lines[0]
    assert f"`ssh -p {port} root@127.0.0.1 true` works without any prompt" in lines[0]
    assert not list((tmp_path / "home" / "runs").glob("*"))  # no half-submitted run folder


def test_bad_login_and_missing_config_are_one_line(tmp_path):
    env = {**os.environ, "FTCLUSTER_HOME": str(tmp_path / "home")}
    res = ftc("submit", str(write_job(tmp_path, "root@host:port", {})), env=env)
    assert res.returncode == 1 and "slurm.login: 'root@host:port' is not user@host" in res.stderr
    env["FTCLUSTER_SSH_CONFIG"] = str(tmp_path / "nope")
    res = ftc("submit", str(write_job(tmp_path, "ftc-login", {})), env=env)
    assert res.returncode == 1 and f"FTCLUSTER_SSH_CONFIG={tmp_path}/nope: no such file" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_doctor_over_ssh(slurm, sshd, remote_env, tmp_path):  # noqa: F811
    job = write_job(tmp_path, sshd.alias, {})
    res = ftc("doctor", str(job), "--json", "--remote", "--set", f"slurm.python={sys.executable}",
              "--set", "resources.time_limit=00:30:00", env=remote_env)
    checks = {c["name"]: c for c in json.loads(res.stdout)}
    assert res.returncode == 0, checks
    assert checks["slurm"]["result"].endswith("UP") and f"via ssh {sshd.alias}" in checks["slurm"]["result"]
    assert checks["nodes"]["status"] == checks["python"]["status"] == checks["/dev/shm"]["status"] == "ok"
    assert checks["env passthrough"]["status"] == "ok"
    port = free_port()
    res = ftc("doctor", str(job), "--json", "--set", f"slurm.login=root@127.0.0.1:{port}", env=remote_env)
    checks = {c["name"]: c for c in json.loads(res.stdout)}
    assert res.returncode == 1
    assert checks["slurm"]["status"] == "fail" and "Connection refused" in checks["slurm"]["result"]
    assert f"ssh -F {sshd.config} -p {port} root@127.0.0.1 true" in checks["slurm"]["fix"]
    assert checks["partition"]["status"] == "skip"
