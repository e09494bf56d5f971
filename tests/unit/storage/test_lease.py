"""One writer per output.uri (issue #23): the lease in the store, against a local disk and a real S3 API
(moto's server, whose PutObject honours If-None-Match and If-Match: the conditional writes are real)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ftcluster.errors import StorageError
from ftcluster.storage.commit import CheckpointStore
from ftcluster.storage.layout import LEASE, MANIFEST
from ftcluster.storage.lease import (
    FORMAT,
    Holder,
    Lease,
    LeaseHeld,
    LeaseLost,
    LeaseRecord,
    holder_from_env,
    read_lease,
    refusal,
)
from ftcluster.storage.retry import RetryPolicy

ROOT = Path(__file__).resolve().parents[3]
FAST = RetryPolicy(0.01, 0.05)


def holder(run: str, host: str = "node1", pid: int = 4242, job: str | None = None) -> Holder:
    return Holder(f"run:{run}" + (f"/slurm::{job}" if job else ""), run, job, host, pid)


class Clock:
    """Wall-clock time the test moves by hand (expiry is a wall-clock fact; renewal intervals are not)."""

    def __init__(self, now: float = 1_800_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["file", "s3"])
def where(request, tmp_path):
    """(uri, storage_options) of a fresh output folder on a local disk or on moto S3."""
    if request.param == "file":
        return (tmp_path / "out").as_uri(), {}
    s3 = request.getfixturevalue("s3")
    return s3.uri("runs/x"), s3.storage_options


def lease(where, run: str, clock=None, ttl: float = 60.0, **kw) -> Lease:
    uri, opts = where
    return Lease(uri, opts, kw.pop("who", None) or holder(run), ttl, clock=clock or time.time, retry_max_s=5,
                 policy=FAST, **kw)


def test_acquire_writes_the_record_renew_extends_it_release_deletes_it(where):
    clock = Clock()
    a = lease(where, "run-a", clock)
    a.acquire()
    rec = read_lease(*where)
    assert rec is not None and rec.format == FORMAT
    assert (rec.holder, rec.run_id, rec.host, rec.pid) == ("run:run-a", "run-a", "node1", 4242)
    assert rec.expires_unix == clock.now + 60 and rec.renewed_unix == rec.acquired_unix == clock.now
    assert rec.ftcluster_version and len(rec.token) == 16
    clock.now += 30
    a.renew()
    again = read_lease(*where)
    assert again is not None and again.expires_unix == clock.now + 60 and again.acquired_unix == rec.acquired_unix
    assert again.token == rec.token
    a.release()
    assert read_lease(*where) is None
    if where[0].startswith("file://"):  # nothing left behind on a local disk (the lock is the folder itself)
        assert not (Path(where[0].removeprefix("file://")) / ".ftcluster").exists()
    with pytest.raises(LeaseLost, match="released"):
        a.check()  # nothing is committed after the release
    b = lease(where, "run-b", clock)
    b.acquire()  # a clean end lets the next run in at once
    assert read_lease(*where).run_id == "run-b"


def test_a_second_writer_is_refused_in_one_line_naming_the_holder(where):
    clock = Clock()
    lease(where, "support-bot-20261207-213000-ab12", clock).acquire()
    clock.now += 20
    with pytest.raises(LeaseHeld) as err:
        lease(where, "support-bot-20261207-213500-cd34", clock, who=holder("other", host="node2")).acquire()
    msg = str(err.value)
    assert "\n" not in msg
    uri = where[0]
    assert msg.startswith(f"{uri}: output.uri is in use by run support-bot-20261207-213000-ab12 on host node1 (pid 4242)")
    assert "renewed 20 s ago" in msg and "ftcluster cancel support-bot-20261207-213000-ab12" in msg
    assert "--fresh" in msg and "--set output.uri=" in msg
    assert f"expires at {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(clock.now + 40))} (in 40 s)" in msg
    assert f"{uri}/{LEASE}" in msg
    assert read_lease(*where).run_id == "support-bot-20261207-213000-ab12"  # untouched


def test_the_same_holder_takes_its_own_lease_back_at_once_and_the_old_process_loses_it(where):
    """A requeued Slurm job (same job id), a restarted pod or worker: no wait for the expiry."""
    clock = Clock()
    first = lease(where, "r", clock, who=holder("r", job="77", pid=1))
    first.acquire()
    clock.now += 1  # live, far from expiry
    again = lease(where, "r", clock, who=holder("r", job="77", pid=2))
    again.acquire()
    assert read_lease(*where).pid == 2
    with pytest.raises(LeaseLost, match="taken by run r"):
        first.renew()  # a leftover of the old incarnation commits nothing more
    other_job = lease(where, "r", clock, who=holder("r", job="78", pid=3))  # same run id, another job: not the same
    with pytest.raises(LeaseHeld):
        other_job.acquire()


def test_an_expired_lease_is_taken_over_and_its_old_holder_loses_it(where):
    clock = Clock()
    crashed = lease(where, "crashed", clock, ttl=10)
    crashed.acquire()
    clock.now += 9.9
    with pytest.raises(LeaseHeld):
        lease(where, "next", clock).acquire()
    clock.now += 0.2  # 10.1 s after the last renewal
    nxt = lease(where, "next", clock)
    nxt.acquire()
    assert read_lease(*where).run_id == "next"
    with pytest.raises(LeaseLost) as err:
        crashed.check()
    assert "lost its lease" in str(err.value) and "taken by run next on host node1" in str(err.value)
    crashed.release()  # releasing a lost lease leaves the new holder's alone
    assert read_lease(*where).run_id == "next"


def test_a_broken_lease_counts_as_lost(where, tmp_path):
    a = lease(where, "a")
    a.acquire()
    uri, opts = where
    from ftcluster.storage.uri import fs_and_path

    fs, root = fs_and_path(uri, opts)
    fs.rm_file(f"{root}/{LEASE}")
    with pytest.raises(LeaseLost, match="deleted"):
        a.renew()


def race(where, takers: int, clock: Clock) -> tuple[list[str], list[str]]:
    """``takers`` threads (each its own Lease and, for S3, its own connections) take at once."""
    barrier = threading.Barrier(takers)
    won, refused = [], []

    def take(i: int) -> None:
        mine = lease(where, f"taker-{i}", clock)
        barrier.wait()
        try:
            mine.acquire()
            won.append(f"taker-{i}")
        except LeaseHeld:
            refused.append(f"taker-{i}")

    threads = [threading.Thread(target=take, args=(i,)) for i in range(takers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return won, refused


@pytest.mark.parametrize("expired", [False, True], ids=["free", "expired"])
def test_racing_takers_exactly_one_wins(where, expired):
    """Threads racing for a free output, or for the lease of a run that crashed: one wins, the rest
    are refused by the winner's lease (If-None-Match / If-Match on S3, link / flock on a local disk)."""
    clock = Clock()
    if expired:
        lease(where, "crashed", clock, ttl=5).acquire()
        clock.now += 6
    won, refused = race(where, 8, clock)
    assert len(won) == 1 and len(refused) == 7, (won, refused)
    assert read_lease(*where).run_id == won[0]


RACER = """
import sys, time
from ftcluster.storage.lease import Holder, Lease, LeaseHeld
uri, name, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
lease = Lease(uri, {}, Holder("run:" + name, name, None, "h", 1), 60, retry_max_s=5)
while time.time() < start:
    pass
try:
    lease.acquire()
    print("won")
except LeaseHeld:
    print("refused")
"""


def test_racing_processes_on_a_local_disk_exactly_one_wins(tmp_path):
    """Processes, not threads, for the expired lease of a crashed run on file://."""
    uri = (tmp_path / "out").as_uri()
    Lease(uri, {}, holder("crashed"), 0.001).acquire()
    time.sleep(0.01)
    start = time.time() + 1.5
    procs = [subprocess.Popen([sys.executable, "-c", RACER, uri, f"p{i}", str(start)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(6)]
    outs = [p.communicate(timeout=60) for p in procs]
    answers = sorted(o.strip() for o, _ in outs)
    assert answers == ["refused"] * 5 + ["won"], outs
    assert read_lease(uri).run_id in {f"p{i}" for i in range(6)}


def test_a_commit_after_the_lease_was_lost_writes_no_manifest(where, tmp_path):
    """The commit guard: the manifest is the commit, and it is never written by a run that lost the lease."""
    clock = Clock()
    uri, opts = where
    mine = lease(where, "slow", clock, ttl=60)
    mine.acquire()
    lost: list[str] = []
    mine.keep_renewed(lost.append)  # every 15 s: the commit check finds the loss first, and says so once
    store = CheckpointStore(uri, opts, retry_max_s=5, retry_base_s=0.01, retry_cap_s=0.05, guard=mine.check)
    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "state.json").write_text("{}")
    store.commit_async(1, snap, {"step": 1})
    store.wait()
    assert store.committed() == [1]
    clock.now += 61  # it could not renew: expired, and another run took over
    lease(where, "other", clock).acquire()
    snap2 = tmp_path / "snap2"
    snap2.mkdir()
    (snap2 / "state.json").write_text("{}")
    store.commit_async(2, snap2, {"step": 2}, final=True)
    with pytest.raises(StorageError, match="lost its lease.*taken by run other"):
        store.wait()
    assert store.committed() == [1]
    from ftcluster.storage.uri import fs_and_path

    fs, root = fs_and_path(uri, opts)
    assert not fs.exists(f"{root}/checkpoints/step-00000002/{MANIFEST}")
    assert len(lost) == 1 and "lost its lease" in lost[0]
    with pytest.raises(LeaseLost):
        mine.check()
    assert len(lost) == 1
    mine.release()
    store.close()


def test_the_renewing_thread_keeps_it_alive_and_reports_a_loss(where):
    uri, opts = where
    mine = Lease(uri, opts, holder("kept"), 0.8, retry_max_s=5, policy=FAST)
    mine.acquire()
    first = read_lease(*where).expires_unix
    lost: list[str] = []
    mine.keep_renewed(lost.append)
    time.sleep(1.2)  # past the first expiry: renewed meanwhile (every 0.2 s)
    assert read_lease(*where).expires_unix > first
    with pytest.raises(LeaseHeld):
        Lease(uri, opts, holder("intruder"), 0.8, retry_max_s=5, policy=FAST).acquire()
    # Another run takes it by hand-made force (the old one could not have renewed: simulate with the same key).
    Lease(uri, opts, Holder(mine.holder.key, "kept", None, "elsewhere", 9), 0.8, retry_max_s=5).acquire()
    deadline = time.monotonic() + 5
    while not lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lost and "lost its lease" in lost[0] and "\n" not in lost[0]
    mine.release()
    assert read_lease(*where).host == "elsewhere"


def test_a_store_outage_delays_renewal_without_losing_the_lease(s3):
    mine = Lease(s3.uri("runs/o"), s3.storage_options, holder("o"), 60, retry_max_s=5, policy=FAST)
    mine.acquire()
    s3.stop()
    with pytest.raises(Exception) as err:
        mine.renew()
    assert not isinstance(err.value, LeaseLost)
    s3.start()
    mine.check()  # back: still ours
    assert mine.lost is None


def test_unreadable_lease_is_replaced(tmp_path):
    """A torn or foreign file at the lease's path names no holder: it is treated as expired."""
    out = tmp_path / "out"
    (out / ".ftcluster").mkdir(parents=True)
    (out / LEASE).write_text("not json")
    Lease(out.as_uri(), {}, holder("a"), 60).acquire()
    assert read_lease(out.as_uri()).run_id == "a"
    assert LeaseRecord.parse(b"{}") is None and LeaseRecord.parse(json.dumps({"format": "x"}).encode()) is None


# ----------------------------------------------------------------------------- who is the same holder


def test_holder_identity_across_backends():
    slurm = {"FTCLUSTER_RUN_ID": "bot-1", "SLURM_JOB_ID": "812", "SLURM_CLUSTER_NAME": "hpc"}
    requeued = {**slurm, "SLURM_RESTART_COUNT": "1"}
    assert holder_from_env(slurm, "n1", 1).key == holder_from_env(requeued, "n2", 2).key == "run:bot-1/slurm:hpc:812"
    assert holder_from_env(slurm, "n1", 1).job_id == "812"
    # The same rendered script sbatch'ed twice by hand (a run id left in the shell): two holders.
    assert holder_from_env({**slurm, "SLURM_JOB_ID": "813"}).key != holder_from_env(slurm).key
    # Two local runs inside one Slurm allocation: two holders.
    assert holder_from_env({**slurm, "FTCLUSTER_RUN_ID": "bot-2"}).key != holder_from_env(slurm).key
    local = holder_from_env({"FTCLUSTER_RUN_ID": "bot-3", "TORCHELASTIC_RUN_ID": "bot-3"}, "box", 5)
    assert (local.key, local.run_id, local.job_id) == ("run:bot-3", "bot-3", None)
    pod = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "MASTER_ADDR": "bot-master-0", "POD_NAMESPACE": "ml"}
    assert holder_from_env(pod, "bot-master-0", 1).key == holder_from_env(pod, "bot-master-0", 7).key \
        == "kubernetes:ml/bot-master-0"
    assert holder_from_env({**pod, "MASTER_ADDR": "other-master-0"}).key != holder_from_env(pod).key
    by_hand = holder_from_env({"TORCHELASTIC_RUN_ID": "none"}, "box", 5)
    assert by_hand.key.startswith("process:box:") and by_hand.run_id is None


def test_refusal_of_a_slurm_job_without_a_run_id_names_scancel():
    rec = LeaseRecord(holder="slurm:hpc:812", token="t", run_id=None, job_id="812", host="n1", pid=3,
                      acquired_unix=100.0, renewed_unix=100.0, expires_unix=400.0, ttl_s=300, ftcluster_version="0")
    msg = refusal("s3://b/x", rec, now=160.0)
    assert "in use by holder slurm:hpc:812 (job 812) on host n1 (pid 3)" in msg and "(scancel 812)" in msg
    assert "in 240 s" in msg


# ----------------------------------------------------------------------------- submit's check


def test_submit_refuses_a_live_lease_of_another_run_before_submitting(tmp_path, s3):
    from ftcluster import api
    from ftcluster.spec.loader import load_spec

    quickstart = ROOT / "examples" / "quickstart.yaml"
    out = tmp_path / "out"
    spec = load_spec(quickstart, [f"output.uri={out.as_uri()}"])
    api.check_lease(spec)  # no lease: fine
    clock = Clock(time.time())
    Lease(out.as_uri(), {}, holder("running-1"), 60, clock=clock).acquire()
    with pytest.raises(LeaseHeld, match=r"in use by run running-1 on host node1 .*ftcluster cancel running-1"):
        api.check_lease(spec)
    clock.now -= 61  # a lease that expired (its run crashed) does not stop a submit: the run takes it over
    Lease(out.as_uri(), {}, holder("running-1"), 60, clock=clock).acquire()
    api.check_lease(spec)
    # A variant's own output.uri is checked too.
    variants = "[{name: a, set: {lora.r: 2}}, {name: b, set: {lora.r: 4}}]"
    with_variants = load_spec(quickstart, [f"output.uri={out.as_uri()}", f"variants={variants}"])
    Lease((out / "b").as_uri(), {}, holder("variant-b"), 60).acquire()
    with pytest.raises(LeaseHeld, match="variant-b"):
        api.check_lease(with_variants)
    # On S3, and with the store down the check gives way (quickly): the run decides.
    remote = load_spec(quickstart, [f"output.uri={s3.uri('runs/q')}",
                                    f"output.storage_options={json.dumps(s3.storage_options)}"])
    Lease(s3.uri("runs/q"), s3.storage_options, holder("remote-1"), 60).acquire()
    with pytest.raises(LeaseHeld, match="remote-1"):
        api.check_lease(remote)
    s3.stop()
    t0 = time.monotonic()
    api.check_lease(remote)
    assert time.monotonic() - t0 < 30


def test_other_stores_get_the_best_effort_lease(tmp_path):
    """A store with no conditional writes (fsspec's memory:// stands in for gs:// and the like): create,
    refuse, renew, take over after expiry, release, by write-and-read-back."""
    import uuid

    uri = f"memory://lease-{uuid.uuid4().hex[:8]}/out"
    clock = Clock()
    a = Lease(uri, {}, holder("a"), 10, clock=clock, retry_max_s=5, policy=FAST)
    a.acquire()
    with pytest.raises(LeaseHeld, match="in use by run a"):
        Lease(uri, {}, holder("b"), 10, clock=clock, retry_max_s=5, policy=FAST).acquire()
    clock.now += 5
    a.renew()
    clock.now += 11
    b = Lease(uri, {}, holder("b"), 10, clock=clock, retry_max_s=5, policy=FAST)
    b.acquire()
    with pytest.raises(LeaseLost, match="taken by run b"):
        a.check()
    b.release()
    assert read_lease(uri) is None


def test_refusal_names_how_to_stop_a_kubernetes_or_hand_started_holder():
    base = dict(token="t", run_id=None, host="h", pid=3, acquired_unix=100.0, renewed_unix=100.0,
                expires_unix=400.0, ttl_s=300, ftcluster_version="0")
    pod = LeaseRecord(holder="kubernetes:ml/bot-master-0", job_id="ml/bot-master-0", **base)
    assert "(delete its Kubernetes job, whose master is ml/bot-master-0)" in refusal("s3://b/x", pod, 100.0)
    by_hand = LeaseRecord(holder="process:h:7", job_id=None, **base)
    assert "(stop pid 3 on h)" in refusal("s3://b/x", by_hand, 100.0)
