"""One writer per output.uri (issue #23), end to end on the local backend: the real CLI, supervisor,
launcher and training runtime.

Two ``ftcluster submit`` of one spec at the same moment: exactly one trains, the other stops with the one
line naming the first, and the store holds the checkpoints of one run only (one ``run_uid`` in every
committed ``state.json`` and in the adapter's record). A third submit while the first trains is refused
before anything is submitted (no run folder). The live-Slurm version is tests/e2e/test_slurm_e2e.py's
``test_two_submits_of_one_spec_one_trains``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

pytestmark = pytest.mark.train

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
IN_USE = re.compile(r"output\.uri is in use by run (\S+) on host \S+ \(pid \d+\)")


def overrides(out: Path) -> list[str]:
    return ["training.max_steps=40", "training.log_every_steps=5", "training.eval_every_steps=1000",
            "output.checkpoint_every_steps=10", "output.keep_last=10", "data.general_eval=null",
            f"output.uri={out.as_uri()}"]


def submit(env: dict[str, str], out: Path, *extra: str) -> subprocess.Popen:
    sets = [a for o in overrides(out) for a in ("--set", o)]
    return subprocess.Popen([sys.executable, "-m", "ftcluster.cli", "submit", str(QUICKSTART), *sets, *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_uids(out: Path) -> set[str]:
    """The run ids in every committed checkpoint's state.json and in the adapter's record."""
    uids = set()
    for step in sorted((out / "checkpoints").glob("step-*")):
        if (step / "manifest.json").exists():
            uids.add(json.loads((step / "state.json").read_text())["run_uid"])
    uids.add(json.loads((out / "adapter" / "ftcluster_meta.json").read_text())["run"]["uid"])
    return uids


def test_two_submits_of_one_spec_at_once_one_trains(tmp_path):
    out = tmp_path / "out"
    home = tmp_path / "home"
    env = {**os.environ, "FTCLUSTER_HOME": str(home), "FTCLUSTER_CACHE": str(tmp_path / "cache"),
           "HF_HUB_OFFLINE": "1"}
    env.pop("FTCLUSTER_RUN_ID", None)  # each submit's run gets its own from the backend
    first, second = submit(env, out, "--wait"), submit(env, out, "--wait")

    # While one of them trains: a third submit is refused up front, nothing submitted.
    lease = out / ".ftcluster" / "lease.json"
    end = time.monotonic() + 300
    while not lease.exists() and time.monotonic() < end and (first.poll() is None or second.poll() is None):
        time.sleep(0.1)
    assert lease.exists(), "no run took the lease"
    holder = json.loads(lease.read_text())["run_id"]
    runs_before = sorted(p.name for p in (home / "runs").iterdir())
    third = submit(env, out)
    stdout3, stderr3 = third.communicate(timeout=120)
    assert third.returncode == 1, stdout3 + stderr3
    lines = [ln for ln in stderr3.splitlines() if ln.strip()]
    assert len(lines) == 1 and IN_USE.search(lines[0]) and IN_USE.search(lines[0]).group(1) == holder, stderr3
    assert f"ftcluster cancel {holder}" in lines[0] and "--fresh" in lines[0] and "expires at" in lines[0]
    assert "submitted" not in stdout3 and sorted(p.name for p in (home / "runs").iterdir()) == runs_before

    results = [p.communicate(timeout=600) for p in (first, second)]
    codes = [first.returncode, second.returncode]
    assert sorted(codes) == [0, 1], results
    won = codes.index(0)
    winner = re.search(r"submitted (\S+)", results[won][0]).group(1)
    assert winner == holder
    lost_log = "".join(results[1 - won])
    refused = [ln for ln in lost_log.splitlines() if IN_USE.search(ln)]
    assert refused and all(IN_USE.search(ln).group(1) == winner for ln in refused), lost_log[-3000:]
    assert "Traceback" not in lost_log and "committed" not in lost_log, lost_log[-3000:]
    loser = re.search(r"submitted (\S+)", results[1 - won][0])
    if loser:  # the usual case: both passed submit's check, the run that came second stopped at its start
        assert json.loads((home / "runs" / loser.group(1) / "status.json").read_text())["state"] == "FAILED"
    else:  # that submit was slow enough to find the lease already: refused before submitting
        assert len(refused) == 1 and len(list((home / "runs").iterdir())) == 1, lost_log

    assert len(run_uids(out)) == 1  # every checkpoint and the adapter come from one run
    assert sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step-*")) == [10, 20, 30, 40]
    assert not (out / ".ftcluster").exists()  # released at the end: the next run starts at once


def test_a_run_that_loses_its_lease_stops_at_once_and_commits_nothing_more(tmp_path, monkeypatch):
    """Another run took the lease (here: written over it, as a taker after an expiry would): the renewing
    thread sees it within ttl/4, the run exits 1 with one line, and no manifest is written after that."""
    from tests.e2e.test_train_runtime import finish, launch, write_payload

    out = tmp_path / "out"
    payload = write_payload(tmp_path, "run", ["training.max_steps=100000", "training.log_every_steps=50",
                                               "training.eval_every_steps=100000", "output.checkpoint_every_steps=5",
                                               "output.keep_last=1000", "data.general_eval=null",
                                               f"output.uri={out.as_uri()}"])
    monkeypatch.setenv("FTCLUSTER_LEASE_TTL_S", "4")  # renewed every second
    proc = launch(payload, 1, tmp_path / "cache", tmp_path)
    try:
        end = time.monotonic() + 300
        while not list((out / "checkpoints").glob("step-*/manifest.json")) and time.monotonic() < end:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            time.sleep(0.2)
        lease = out / ".ftcluster" / "lease.json"
        rec = json.loads(lease.read_text())
        intruder = {**rec, "holder": "run:intruder", "run_id": "intruder", "host": "elsewhere", "token": "f" * 16,
                    "expires_unix": time.time() + 3600}
        tmp = lease.with_name("intruder.tmp")
        tmp.write_text(json.dumps(intruder))
        os.replace(tmp, lease)
        taken = time.time()
        code, log = finish(proc, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 1, log[-3000:]
    lines = [ln for ln in log.splitlines() if "lost its lease" in ln]
    assert len(lines) == 1 and lines[0].startswith("error (rank 0): ") and "taken by run intruder on host elsewhere" \
        in lines[0], log[-3000:]
    late = [m for m in (out / "checkpoints").glob("step-*/manifest.json")
            if json.loads(m.read_text())["created_unix"] > taken]
    assert late == [], late
    assert json.loads(lease.read_text())["run_id"] == "intruder"  # the loser leaves the new holder's lease alone
