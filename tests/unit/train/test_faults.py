"""The watchdog's judgement, failure classification and the job's first failure (ftcluster.train.faults),
on a real c10d store (HashStore) and a clock the test moves; the processes are in tests/e2e/test_faults.py."""

from __future__ import annotations

import contextlib
import json

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

from ftcluster.errors import TrainError  # noqa: E402
from ftcluster.exitcodes import FAULT_EXIT  # noqa: E402
from ftcluster.train import faults as F  # noqa: E402

T = 60.0


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def ranks(world: int = 3):
    """One store, one clock, a Progress and a Watchdog per rank."""
    store, clock = dist.HashStore(), Clock()
    progress = [F.Progress() for _ in range(world)]
    dogs = [F.Watchdog(store, r, world, T, host=f"n{r}", progress=progress[r], clock=clock) for r in range(world)]
    return clock, progress, dogs


def tick(clock: Clock, dogs, seconds: float, *, silent: tuple[int, ...] = ()) -> list:
    """Every rank but ``silent`` runs a round every 5 s for ``seconds``; returns rank 0's findings."""
    found = []
    for _ in range(int(seconds // 5)):
        clock.t += 5
        for d in dogs:
            if d.rank not in silent and d.rank != 0:
                d.check()
        found.append(dogs[0].check())
    return [f for f in found if f is not None]


def test_a_silent_rank_is_named_after_the_hang_timeout_not_before():
    clock, progress, dogs = ranks()
    for p in progress:
        p.enter("the training step", 7)
    assert tick(clock, dogs, 10) == []
    assert tick(clock, dogs, T - 10, silent=(2,)) == []  # silent, but not for the timeout yet
    found = tick(clock, dogs, 15, silent=(2,))
    assert found and found[0].rank == 2 and found[0].host == "n2" and found[0].kind == F.INFRA
    assert "has sent no heartbeat for" in found[0].what and "step 7, the training step" in found[0].what


def test_a_rank_stuck_in_a_phase_while_the_others_wait_is_named():
    clock, progress, dogs = ranks()
    progress[1].enter("reading data", 4)
    for r in (0, 2):
        progress[r].enter("reading data", 4)
    cms = [progress[r].waiting_in("an all-reduce") for r in (0, 2)]
    for cm in cms:
        cm.__enter__()
    assert tick(clock, dogs, T - 5) == []
    found = tick(clock, dogs, 15)
    assert found and found[0].rank == 1 and "stuck in reading data at step 4" in found[0].what
    assert "while rank 0 waits in an all-reduce" in found[0].what


def test_an_exempt_phase_with_a_live_heartbeat_is_not_a_hang():
    """Rank 1 uploads the final checkpoint for longer than the timeout while the others wait at a barrier."""
    clock, progress, dogs = ranks()
    progress[1].enter("finishing (final checkpoint, evaluation, exports)", 9, exempt=True)
    held = []  # the context managers must live (a collected one leaves its collective)
    for r in (0, 2):
        progress[r].enter("shutting down", 9, exempt=True)
        held.append(progress[r].waiting_in("a barrier"))
        held[-1].__enter__()
    assert progress[0].waiting and tick(clock, dogs, 5 * T) == []


def test_every_rank_waiting_in_one_collective_is_reported():
    clock, progress, dogs = ranks()
    held = []
    for p in progress:
        p.enter("the training step", 3)
        held.append(p.waiting_in("an all-reduce"))
        held[-1].__enter__()
    found = tick(clock, dogs, T + 10)
    assert found and "every rank has waited in a collective" in found[0].what


def test_working_ranks_are_not_hung():
    """Long steps (a first compile) on every rank, none waiting: nothing to report."""
    clock, progress, dogs = ranks()
    for p in progress:
        p.enter("the training step", 1)
    assert tick(clock, dogs, 5 * T) == []


def test_each_rank_watches_a_window_of_peers():
    big = F.Watchdog(dist.HashStore(), 5, 100, T, host="x")
    assert len(big.peers) == F.WATCH_WINDOW and 6 in big.peers and 5 not in big.peers
    assert set(F.Watchdog(dist.HashStore(), 0, 2, T, host="x").peers) == {1}


@pytest.mark.parametrize("exc, kind", [
    (RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:1: Connection reset by peer"), F.INFRA),
    (dist.DistBackendError("NCCL communicator was aborted"), F.INFRA),
    (TimeoutError("c10d store get timed out"), F.INFRA),
    (ValueError("bad record on line 3"), F.USER),
    (KeyError("labels"), F.USER),
    (TrainError("data.train: no such file"), F.USER),
    (RuntimeError("The size of tensor a (3) must match the size of tensor b (4)"), F.USER),
])
def test_classify(exc, kind):
    assert F.classify(exc) == kind


def test_classify_follows_the_cause_chain():
    try:
        try:
            raise dist.DistNetworkError("connection to the store lost")
        except dist.DistNetworkError as inner:
            raise ValueError("while saving") from inner
    except ValueError as outer:
        assert F.classify(outer) == F.INFRA


def test_the_first_failure_wins_and_a_later_rank_adopts_it():
    store = dist.HashStore()
    user = F.Fault(F.USER, 1, "n2", "ValueError: bad record")
    assert F.claim_first(store, user) == user
    later = F.Fault(F.INFRA, 0, "n1", "RuntimeError: gloo connection reset")
    assert F.claim_first(store, later) == user
    assert F.first_failure(store) == user
    F._state.update(store=store, watchdog=None)
    try:
        code, tail = F.exit_for(RuntimeError("gloo: Connection closed by peer"), 0)
    finally:
        F._state.clear()
    assert code == 1 and "after the job's first failure, rank 1 on n2: ValueError: bad record" in tail
    assert "not retried" in tail


def test_exit_for_without_a_store_uses_the_rank_s_own_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FTCLUSTER_EXIT_DIR", str(tmp_path))
    code, tail = F.exit_for(RuntimeError("gloo: Connection closed by peer"), 3)
    assert code == FAULT_EXIT and "infrastructure fault (exit 170)" in tail
    cause = json.loads((tmp_path / "cause-3.json").read_text())
    assert cause["kind"] == F.INFRA and cause["rank"] == 3
    assert F.read_causes(tmp_path)[3].what.startswith("RuntimeError")
    assert F.exit_for(ValueError("x"), 0)[0] == 1


def test_the_launcher_names_a_rank_it_saw_killed(tmp_path):
    """torchrun's failures: a signal death with no cause file is an infrastructure fault of that rank;
    a recorded user error stands over it; no signal and no record is a user error."""
    from types import SimpleNamespace

    from ftcluster.train.launch import first_failure

    def failed(**codes):
        return SimpleNamespace(failures={int(r[1:]): SimpleNamespace(exitcode=c, timestamp=i)
                                         for i, (r, c) in enumerate(codes.items())})

    got = first_failure(failed(r1=-9, r0=FAULT_EXIT), tmp_path)
    assert got.kind == F.INFRA and got.rank == 1 and "killed by SIGKILL" in got.what
    # a rank SIGKILLed by torchrun after the first failure (a stopped rank, 30 s later) is not the culprit
    (tmp_path / "cause-0.json").write_text(F.Fault(F.INFRA, 1, "n1", "pid 9 has sent no heartbeat").to_json())
    got = first_failure(failed(r0=FAULT_EXIT, r1=-9), tmp_path)
    assert got.rank == 1 and "no heartbeat" in got.what
    (tmp_path / "cause-0.json").write_text(F.Fault(F.USER, 0, "n1", "ValueError: x").to_json())
    assert first_failure(failed(r1=-9, r0=1), tmp_path).kind == F.USER
    (tmp_path / "cause-0.json").unlink()
    assert first_failure(failed(r0=1), tmp_path).kind == F.USER
    assert first_failure(failed(r0=FAULT_EXIT), tmp_path).kind == F.INFRA


@contextlib.contextmanager
def store_host():
    """(a client connection, the process hosting the c10d store): the test kills that process to lose
    the store as a lost node's launcher would; ``F._state`` is cleared and the host killed after."""
    import datetime
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", "import time, torch.distributed as d; "
                               f"s = d.TCPStore('127.0.0.1', {port}, is_master=True, wait_for_workers=False); "
                               "time.sleep(60)"])
    try:
        yield dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=20)), server
    finally:
        F._state.clear()
        server.kill()


def test_a_lost_store_names_the_first_node(tmp_path):
    """The workers' c10d store lives in the first node's launcher: when it stops answering after a
    collective failed, the rank names that node's rank 0 (from the heartbeats it read) as lost."""
    with store_host() as (store, server):
        clock = Clock()
        node0 = F.Watchdog(store, 0, 2, T, host="n1", clock=clock, progress=F.Progress())
        me = F.Watchdog(store, 1, 2, T, host="n2", clock=clock, progress=F.Progress())
        node0.check()
        me.check()
        F._state.update(store=store, watchdog=me)
        server.kill()
        server.wait()
        code, tail = F.exit_for(RuntimeError("gloo: Connection reset by peer"), 1)
    assert code == FAULT_EXIT and "rank 0 on n1: lost with its node: the job's c10d store" in tail


def test_a_store_lost_before_any_watchdog_round_still_names_rank_0_s_node(tmp_path):
    """CI, 2026-12-07: a node lost a second after training started (the watchdog's first round is
    hang_timeout/20 s away) was named "rank 0 on the first node": the rank had read no heartbeat yet.
    The watchdog learns rank 0's host as it starts."""
    import time

    me = None
    with store_host() as (store, server):
        F.Watchdog(store, 0, 2, 300.0, host="n2", progress=F.Progress()).publish()
        me = F.Watchdog(store, 1, 2, 300.0, host="n1", progress=F.Progress()).start(lambda f: None)
        F._state.update(store=store, watchdog=me)
        time.sleep(1.0)  # the thread's start; its first round is 15 s away
        assert me.peers[0].rec is None
        server.kill()
        server.wait()
        code, tail = F.exit_for(RuntimeError("gloo: Connection reset by peer"), 1)
        me.stop()
    assert code == FAULT_EXIT and "rank 0 on n2: lost with its node" in tail, tail


def test_the_same_error_on_every_rank_is_said_once():
    store = dist.HashStore()
    F.claim_first(store, F.Fault(F.USER, 0, "n1", "ValueError: bad record"))
    F._state.update(store=store, watchdog=None)
    try:
        code, tail = F.exit_for(ValueError("bad record"), 1)
    finally:
        F._state.clear()
    assert code == 1 and "after the job's first failure" not in tail and "not retried" in tail
