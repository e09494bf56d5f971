"""Faults of a multi-process run on CPU (issue #23): a hung rank, a lost rank, the restart budget.

Two processes over gloo. The faults come from the test hook (``FTCLUSTER_TEST_SIGNAL_AT``,
ftcluster/storage/testhook.py: ``SIGSTOP`` a frozen rank, ``HANG`` a data read that never returns,
``SIGKILL`` the OOM killer, ``RAISE`` an error in the code; each only in a run's first attempt) or
from a real SIGKILL of a second "node"'s worker. Each case checks the exit status (170: an
infrastructure fault; 1: an error of the code or data), that the line names the rank and host that
went first, how long the job took to end, and that the store holds only committed checkpoints.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from ftcluster.exitcodes import FAULT_EXIT  # noqa: E402
from tests.e2e.test_train_runtime import (  # noqa: E402
    _children,
    _env_of,
    assert_same_curve,
    committed_steps,
    curve,
    finish,
    full_overrides,
    full_spec_file,
    launch,
    launch_two_nodes,
    records,
    wait_for_step,
    write_payload,
)

pytestmark = pytest.mark.train
HANG = 10  # training.hang_timeout of these runs, seconds
STEPS, EVERY = 6, 2


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ftc-cache")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def overrides(out: Path, *extra: str) -> list[str]:
    return [f"training.max_steps={STEPS}", "training.log_every_steps=1", "training.eval_every_steps=1000",
            f"output.checkpoint_every_steps={EVERY}", "output.keep_last=3", "data.seq_len=64",
            "training.micro_batch_size=2", "data.general_eval=null", f"output.uri={out.as_uri()}",
            "resources.procs_per_node=2", f"training.hang_timeout={HANG}", *extra]


def timed_run(tmp_path, cache_dir, monkeypatch, at: str) -> tuple[int, str, float, Path]:
    out = tmp_path / "out"
    monkeypatch.setenv("FTCLUSTER_TEST_SIGNAL_AT", at)
    started = time.monotonic()
    rc, log = finish(launch(write_payload(tmp_path, "run", overrides(out)), 2, cache_dir, tmp_path), timeout=300)
    return rc, log, time.monotonic() - started, out


def assert_one_line(log: str) -> None:
    assert "Traceback" not in log, log[-4000:]


def test_frozen_rank_is_named_within_the_hang_timeout(tmp_path, cache_dir, monkeypatch):
    """SIGSTOP of rank 1 at step 3: its heartbeat stops; rank 0 names it after training.hang_timeout
    (not the collective timeout) and the job ends as an infrastructure fault."""
    rc, log, took, out = timed_run(tmp_path, cache_dir, monkeypatch, "data-read@3:SIGSTOP:1")
    assert rc == FAULT_EXIT, log[-4000:]
    line = re.search(r"ftcluster: training failed: rank 1 on (\S+): pid \d+ has sent no heartbeat for (\d+) s", log)
    assert line, log[-4000:]
    assert HANG <= int(line.group(2)) < HANG + 10
    assert "an infrastructure fault (exit 170)" in log
    assert took < 150, took  # set-up, the hang timeout, torchrun's 30 s for the stopped rank
    assert committed_steps(out) == [2]  # step 2 committed before the freeze; nothing after it
    assert_one_line(log)


def test_data_read_that_never_returns_is_named(tmp_path, cache_dir, monkeypatch):
    """Rank 1's data read blocks at step 3 while its process (and heartbeat) live on: rank 0, waiting
    in the step's all-reduce, names it as stuck in "reading data"."""
    rc, log, _, out = timed_run(tmp_path, cache_dir, monkeypatch, "data-read@3:HANG:1")
    assert rc == FAULT_EXIT, log[-4000:]
    assert re.search(r"training failed: rank 1 on \S+: pid \d+ has been stuck in reading data at step 3 for \d+ s "
                     r"while rank 0 waits", log), log[-4000:]
    assert committed_steps(out) == [2]
    assert_one_line(log)


def test_error_in_the_code_is_not_an_infrastructure_fault(tmp_path, cache_dir, monkeypatch):
    """A ValueError on rank 1: rank 0's collective fails after it, but the job's first failure (agreed
    through the store) is rank 1's error: exit 1, not retried, on both ranks."""
    rc, log, _, _ = timed_run(tmp_path, cache_dir, monkeypatch, "data-read@3:RAISE:1")
    assert rc == 1, log[-4000:]
    assert "error (rank 1): ValueError: FTCLUSTER_TEST_SIGNAL_AT" in log
    assert re.search(r"ftcluster: training failed: rank 1 on \S+: ValueError: .*an error in the training code, "
                     r"data or settings \(exit 1\): not retried", log), log[-4000:]
    rank0 = [x for x in log.splitlines() if x.startswith("error (rank 0)")]
    assert all("after the job's first failure, rank 1" in x and "not retried" in x for x in rank0), rank0


@pytest.mark.slow
def test_killed_rank_on_the_second_node_ends_both_nodes_fast(tmp_path, cache_dir, monkeypatch):
    """Two launchers as two nodes; SIGKILL of node1's worker mid-training: both launchers exit 170
    within seconds (node0's next collective fails, it names the lost rank from the heartbeats), the
    killed rank and its node are named, and only committed checkpoints are in the store."""
    spec_file = full_spec_file(tmp_path)
    out = tmp_path / "out"
    payload = write_payload(tmp_path, "run", full_overrides(
        out, 2, "resources.nodes=2", "resources.procs_per_node=1", "training.max_steps=40",
        "output.checkpoint_every_steps=4", f"training.hang_timeout={HANG}"), base=spec_file)
    procs = launch_two_nodes(payload, cache_dir, tmp_path, named=True)
    wait_for_step(procs[0], out, 6)
    victim = [p for p in _children(procs[1].pid) if "RANK" in _env_of(p)]
    assert len(victim) == 1
    rank = _env_of(victim[0])["RANK"]
    os.kill(victim[0], signal.SIGKILL)
    killed = time.monotonic()
    res = [finish(p, timeout=120) for p in procs]
    took = time.monotonic() - killed
    logs = res[0][1] + res[1][1]
    assert [rc for rc, _ in res] == [FAULT_EXIT, FAULT_EXIT], logs[-4000:]
    assert took < 40, took
    assert f"ftcluster: training failed: rank {rank} on node1: killed by SIGKILL" in res[1][1], res[1][1][-3000:]
    assert f"rank {rank} on node1: lost" in res[0][1], res[0][1][-3000:]
    steps = committed_steps(out)
    assert steps and max(steps) <= max(r["step"] for r in records(out, "train"))


# --------------------------------------------------------------------------- the local backend's restarts


def submit_and_wait(tmp_path, cache_dir, monkeypatch, out: Path, at: str | None, *extra: str):
    from ftcluster import api

    if at is None:
        monkeypatch.delenv("FTCLUSTER_TEST_SIGNAL_AT", raising=False)
    else:
        monkeypatch.setenv("FTCLUSTER_TEST_SIGNAL_AT", at)
    monkeypatch.setenv("FTCLUSTER_CACHE", str(cache_dir))
    monkeypatch.setenv("FTCLUSTER_LOCAL_DIR", str(tmp_path / "local"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    spec = Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml"
    st = api.submit(str(spec), overrides=[*overrides(out), *extra])
    end = time.monotonic() + 400
    while not (st := api.status(st.run_id)).terminal and time.monotonic() < end:
        time.sleep(0.5)
    return st, "".join(api.logs(st.run_id))


@pytest.mark.slow
def test_local_backend_restarts_after_a_lost_rank_and_resumes(tmp_path, cache_dir, monkeypatch, ftc_home):
    """Rank 1 SIGKILLed at step 4 (after step 2's checkpoint): the supervisor starts the run again
    (restart 1 of resources.max_restarts), it resumes from step 2, and the loss curve matches an
    uninterrupted run's; status keeps the restart count and the fault's cause."""
    ref_out, out = tmp_path / "ref", tmp_path / "out"
    ref, ref_log = submit_and_wait(tmp_path, cache_dir, monkeypatch, ref_out, None)
    assert ref.state == "SUCCEEDED", ref_log[-3000:]
    st, log = submit_and_wait(tmp_path, cache_dir, monkeypatch, out, "data-read@4:SIGKILL:1")
    assert st.state == "SUCCEEDED" and st.returncode == 0, (st, log[-4000:])
    assert st.restarts == 1 and len(st.faults) == 1, st
    fault = st.faults[0]
    assert fault["kind"] == "infrastructure" and fault["rank"] == 1 and "killed by SIGKILL" in fault["what"], fault
    assert "restarted 1 time(s) after infrastructure faults" in st.message
    assert "==> attempt 2 (restart 1 of at most 2" in log
    assert "resumed from checkpoint step 2 " in log
    assert committed_steps(out)[-1] == STEPS
    assert_same_curve(curve(out), curve(ref_out))


@pytest.mark.slow
def test_local_backend_gives_up_after_max_restarts(tmp_path, cache_dir, monkeypatch, ftc_home):
    """resources.max_restarts=0: the fault is recorded and the run fails, naming it."""
    st, log = submit_and_wait(tmp_path, cache_dir, monkeypatch, tmp_path / "out", "data-read@4:SIGKILL:1",
                              "resources.max_restarts=0")
    assert st.state == "FAILED" and st.returncode == FAULT_EXIT, (st, log[-3000:])
    assert st.restarts == 0 and len(st.faults) == 1
    assert "an infrastructure fault, after 0 restart(s)" in st.message and "killed by SIGKILL" in st.message
    assert "not restarting: resources.max_restarts=0" in log


@pytest.mark.slow
def test_local_backend_does_not_retry_an_error_in_the_code(tmp_path, cache_dir, monkeypatch, ftc_home):
    st, log = submit_and_wait(tmp_path, cache_dir, monkeypatch, tmp_path / "out", "data-read@3:RAISE:1")
    assert st.state == "FAILED" and st.returncode == 1, (st, log[-3000:])
    assert st.restarts == 0 and st.faults == []
    assert "an error in the training code, data or settings (exit 1), not retried" in st.message, st.message
    assert "==> attempt 2" not in log
