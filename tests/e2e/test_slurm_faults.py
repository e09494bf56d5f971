"""Faults on the live two-node Slurm (.ci/slurm-up.sh) with the real runtime on CPU (issue #23).

* a rank of node n2 SIGKILLed mid-training (the OOM killer), and node n2's whole step killed (the
  node gone): the job leaves RUNNING within a minute (not a collective timeout), the log names the
  rank and host that went first, the sbatch script requeues it as fault restart 1 of
  resources.max_restarts (the job's Comment), and once released it resumes from the last committed
  checkpoint and finishes with the planned step count;
* an error in the data is not requeued: the job fails, its Comment holds no fault restart, and the
  log says why.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.e2e.test_slurm_e2e import (
    committed,
    ftc,
    job_of,
    lab_sets,
    log_text,
    release_and_wait,
    scontrol,
    wait_until,
    zero3_job,
)

pytestmark = [pytest.mark.slurm, pytest.mark.train, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _needs_slurm_and_runtime(live_slurm):
    pytest.importorskip("deepspeed", reason="needs the [train] extra")


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def step_pids(job: str, node: str, what: str) -> list[int]:
    """This job's processes on ``node`` (the lab's nodes share this host) whose command runs ``what``."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and what in _cmdline(int(name)):
            env = _environ(int(name))
            if env.get("SLURM_JOB_ID") == job and env.get("SLURMD_NODENAME") == node:
                out.append(int(name))
    return out


@pytest.mark.parametrize("lost", ["rank", "node"])
def test_lost_rank_or_node_ends_fast_named_then_requeues_and_resumes(tmp_path, lost):
    home = tmp_path / "home"
    steps = 200  # about 10 steps a second here: the kill lands well before the end
    spec = zero3_job(tmp_path, steps)
    spec.write_text(spec.read_text().replace("checkpoint_every_steps: 20", "checkpoint_every_steps: 10"))
    run, job = job_of(ftc("submit", str(spec), *lab_sets(tmp_path, output_uri=False), "--set",
                          "training.log_every_steps=1", home=home))
    wait_until("step 12", lambda: re.search(r"step (1[2-9]|[2-9]\d|1\d\d)/200 ", log_text(tmp_path)), timeout=180)
    ckpts = tmp_path / "out" / "checkpoints"
    wait_until("step 10 committed", lambda: (ckpts / "step-00000010" / "manifest.json").is_file(), timeout=60)
    victims = step_pids(job, "n2", "ftcluster.train")  # the node: its launcher and its worker
    if lost == "rank":
        victims = [p for p in victims if "ftcluster.train.launch" not in _cmdline(p)]
    assert victims, "no process of the step on n2"
    killed_at = time.monotonic()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    info = wait_until("the fault requeue", lambda: (lambda i: i if i.get("Restarts") == "1" else None)(scontrol(job)),
                      timeout=120)
    took = time.monotonic() - killed_at
    log = log_text(tmp_path)
    assert took < 60, f"the job took {took:.0f} s to end after the fault\n{log[-3000:]}"
    named = re.search(r"ftcluster: training failed: rank (\d) on (n\d): (.*)", log)
    assert named, log[-4000:]
    assert named.group(2) == "n2" and ("killed by SIGKILL" in named.group(3) or "lost" in named.group(3)), named[0]
    assert "fault restart 1 of at most 2 (resources.max_restarts)" in log, log[-3000:]
    assert info.get("Comment") == "ftcluster-fault-restarts=1", info
    # what the failed attempt left: committed checkpoints are complete; a folder without a manifest is
    # not committed, and the resume below starts from the newest committed one
    committed_steps = []
    for d in sorted(ckpts.glob("step-*")):
        if (d / "manifest.json").is_file():
            files = json.loads((d / "manifest.json").read_text())["files"]
            assert all((d / rel).stat().st_size == info["size"] for rel, info in files.items()), d
            committed_steps.append(int(d.name[5:]))
    st = release_and_wait(job, run, home, timeout=180)
    log = log_text(tmp_path)
    assert st["state"] == "SUCCEEDED", log[-3000:]
    resumed = re.findall(r"resumed from checkpoint step (\d+)", log)
    assert resumed and int(resumed[-1]) == max(committed_steps), (resumed, committed_steps, log[-3000:])
    after = log.split(f"resumed from checkpoint step {resumed[-1]}", 1)[1]
    logged = [int(s) for s in re.findall(r"step (\d+)/200 \|", after)]
    assert logged and logged[0] == int(resumed[-1]) + 1 and logged[-1] == steps
    assert "==> ftcluster: job" in log and "attempt 2 (restart 1)" in log
    # the steps trained again after the resume have the losses the first attempt logged for them
    first, second = log.split("attempt 2 (restart 1)", 1)
    before = {int(k): float(v) for k, v in re.findall(r"step (\d+)/200 \| loss ([\d.]+)", first)}
    again = {int(k): float(v) for k, v in re.findall(r"step (\d+)/200 \| loss ([\d.]+)", second)}
    common = sorted(set(before) & set(again))
    assert common and common[0] == int(resumed[-1]) + 1, (before, again)
    assert all(again[k] == pytest.approx(before[k], rel=1e-3) for k in common), (before, again)
    assert st["restarts"] == 1 and st["faults"] and "n2" in st["faults"][0]["what"], st
    assert "restarted 1 time(s) after infrastructure faults" in st["message"], st
    committed(tmp_path / "out", "final")


def test_data_error_is_not_requeued(tmp_path):
    home = tmp_path / "home"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops\n')
    spec = zero3_job(tmp_path, 20)
    spec.write_text(re.sub(r"train: [^,]+,", f"train: {bad},", spec.read_text()))
    run, job = job_of(ftc("submit", str(spec), *lab_sets(tmp_path, output_uri=False), home=home))
    st = wait_until("the job to fail", lambda: (lambda s: s if s["state"] in ("SUCCEEDED", "FAILED", "CANCELLED")
                                                else None)(json.loads(
                                                    ftc("status", run, "--json", home=home).stdout)), timeout=180)
    log = log_text(tmp_path)
    assert st["state"] == "FAILED", log[-3000:]
    info = scontrol(job)
    assert info.get("Restarts") == "0" and "ftcluster-fault-restarts" not in info.get("Comment", ""), info
    assert "an error in the training code, data or settings (exit 1): not retried" in log, log[-3000:]
    assert "not requeued" in log
