"""Faults of a multi-process run: which rank on which host went first, and whether a restart helps.

Three parts (docs/lifecycle.md, "Faults"):

* :data:`PROGRESS`: what this rank is doing (step, phase, whether it waits in a collective for its
  peers, whether the phase may legitimately take long). The loop and the collectives mark it; it
  costs an attribute write.
* :class:`Watchdog`: a thread on every rank that publishes a heartbeat record (host, pid, step,
  phase, a beat counter) in the c10d store every few seconds and reads its peers'. A peer whose beat
  stops for ``training.hang_timeout`` (a stopped, frozen or lost process) or that sits in one phase
  that long while this rank waits for it (a data read that never returns) is named, and the job
  ends at once with :data:`~ftcluster.exitcodes.FAULT_EXIT` instead of idling until a collective
  timeout that cannot say who was at fault. Beats are compared on this rank's own clock (counters,
  not timestamps), so clock skew between hosts does not matter.
* :func:`exit_for`: a failed rank's exit status and one line. A failure is an *infrastructure
  fault* (exit 170: a lost peer, a collective, rendezvous or store error, a hang) or a *user error*
  (exit 1: anything else, e.g. a bad data file or an exception in the loss; never retried). The
  first failure of the job is recorded in the store (``compare_set``: first writer wins), so a rank
  whose collective failed because a peer raised a user error exits 1 too, and every rank names the
  same culprit.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..exitcodes import FAULT_EXIT

INFRA, USER = "infrastructure", "user"
FIRST_KEY = "ftcluster/first-failure"
HB_PREFIX = "ftcluster/hb/"
WATCH_WINDOW = 32  # peers each rank watches (every rank is watched by this many others)
# Words of torch.distributed / gloo / NCCL errors that a lost or hung peer causes.
_INFRA_WORDS = ("gloo", "nccl", "connection closed", "connection reset", "broken pipe", "timed out", "timeout",
                "socket", "unhandled system error", "watchdog", "tcpstore", "c10d")
_INFRA_TYPES = ("DistError", "DistBackendError", "DistNetworkError", "DistStoreError")


def host_name() -> str:
    """The node as the scheduler names it (several Slurm nodes can share a host), else the hostname."""
    return os.environ.get("SLURMD_NODENAME") or os.environ.get("FTCLUSTER_NODE_NAME") or socket.gethostname()


@dataclass
class Fault:
    """One failure: its kind (:data:`INFRA` or :data:`USER`), the rank and host it names, one line."""

    kind: str
    rank: int | None
    host: str
    what: str

    def describe(self) -> str:
        who = f"rank {self.rank} on {self.host}" if self.rank is not None else self.host
        return f"{who}: {self.what}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Fault | None:
        try:
            d = json.loads(text)
            return cls(str(d["kind"]), d.get("rank"), str(d.get("host", "?")), str(d.get("what", "")))
        except (ValueError, KeyError, TypeError):
            return None


def verdict(kind: str) -> str:
    """What follows from a failure of ``kind``, for the one line."""
    if kind == INFRA:
        return (f"an infrastructure fault (exit {FAULT_EXIT}): the job restarts from the last committed checkpoint "
                "while resources.max_restarts allows")
    return "an error in the training code, data or settings (exit 1): not retried, a restart would fail the same way"


def classify(exc: BaseException) -> str:
    """:data:`INFRA` for errors a lost, hung or unreachable peer causes (torch.distributed's errors, gloo and
    NCCL failures, store and rendezvous errors), else :data:`USER` (the chain of causes is searched)."""
    from ..errors import FtclusterError

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, FtclusterError):
            return USER  # our own errors say what to fix: retrying cannot
        if any(t.__name__ in _INFRA_TYPES for t in type(e).__mro__):
            return INFRA
        if isinstance(e, (RuntimeError, OSError, TimeoutError)) and any(w in str(e).lower() for w in _INFRA_WORDS):
            return INFRA
        e = e.__cause__ or e.__context__
    return USER


class Progress:
    """What this rank does now. Written by the main thread, read by the watchdog (plain attributes)."""

    def __init__(self) -> None:
        self.step = 0
        self.phase = "starting"
        self.waiting = False  # inside a collective: waiting for the other ranks
        self.exempt = True  # a phase that may take long (set-up, uploads, exports): bounded elsewhere
        self.seq = 0

    def enter(self, phase: str, step: int | None = None, *, exempt: bool = False) -> None:
        self.phase, self.exempt, self.waiting = phase, exempt, False
        if step is not None:
            self.step = step
        self.seq += 1

    @contextmanager
    def waiting_in(self, what: str) -> Iterator[None]:
        """Mark a collective: this rank waits for the others (a peer that never comes is named)."""
        outer = (self.phase, self.exempt, self.waiting)
        if outer[2]:  # nested (a barrier inside a save): the outer mark stands
            yield
            return
        self.phase, self.waiting = f"{what} (in {outer[0]})", True
        self.seq += 1
        try:
            yield
        finally:
            self.phase, self.exempt, self.waiting = outer
            self.seq += 1

    def record(self, rank: int, host: str, beat: int) -> dict[str, Any]:
        return {"rank": rank, "host": host, "pid": os.getpid(), "beat": beat, "step": self.step,
                "phase": self.phase, "waiting": self.waiting, "exempt": self.exempt, "seq": self.seq}


PROGRESS = Progress()


@dataclass
class _Peer:
    beat: int = -1
    seq: int = -1
    beat_at: float = 0.0  # this rank's monotonic clock when the beat last changed
    seq_at: float = 0.0
    rec: dict[str, Any] | None = None


def _secs(s: float) -> str:
    return f"{s:.0f} s"


class Watchdog:
    """Heartbeats through the c10d store; names a silent or stuck peer after ``hang_timeout`` seconds.

    :meth:`check` is one round (publish, read, judge) and is what the thread runs every ``interval``;
    tests call it with their own clock.
    """

    def __init__(self, store: Any, rank: int, world: int, hang_timeout: float, *, host: str | None = None,
                 progress: Progress = PROGRESS, clock: Callable[[], float] = time.monotonic,
                 interval: float | None = None):
        self.store, self.rank, self.world, self.timeout = store, rank, world, float(hang_timeout)
        self.host = host or host_name()
        self.progress, self.clock = progress, clock
        self.interval = interval if interval is not None else min(10.0, max(0.5, self.timeout / 20))
        self.beats = 0
        n = min(world - 1, WATCH_WINDOW)
        self.peers = {(rank + i) % world: _Peer() for i in range(1, n + 1)}
        self.started = clock()
        self.store_ok_at = self.started
        self._own = (-1, self.started)  # this rank's progress counter and when it last changed (own clock)
        # The host of rank 0, whose launcher hosts the workers' c10d store: read once at start so that a
        # store lost in the first seconds (before any watchdog round) is still named with its node.
        self.rank0_host: str | None = self.host if rank == 0 else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- one round -------------------------------------------------------------
    def publish(self) -> None:
        self.beats += 1
        self.store.set(HB_PREFIX + str(self.rank), json.dumps(self.progress.record(self.rank, self.host, self.beats)))

    def read_peers(self, now: float) -> None:
        for r, p in self.peers.items():
            key = HB_PREFIX + str(r)
            if p.rec is None and not self.store.check([key]):
                continue
            try:
                rec = json.loads(self.store.get(key))
            except ValueError:
                continue
            if rec["beat"] != p.beat:
                p.beat, p.beat_at = rec["beat"], now
            if rec["seq"] != p.seq:
                p.seq, p.seq_at = rec["seq"], now
            p.rec = rec

    def check(self) -> Fault | None:
        """Publish this rank's record, read the watched peers', return the fault to report, if any."""
        now = self.clock()
        try:
            self.publish()
            self.read_peers(now)
            self.store_ok_at = now
        except Exception as exc:  # noqa: BLE001 - the store's host may be gone: judged below
            if now - self.store_ok_at > self.timeout:
                where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
                return Fault(INFRA, None, where.split(":")[0],
                             f"the job's c10d store at {where} (hosted by rank 0's launcher) has not "
                             f"answered for {_secs(now - self.store_ok_at)} ({type(exc).__name__}): that node "
                             "is probably lost")
            return None
        return self.judge(now)

    def judge(self, now: float) -> Fault | None:
        t = self.timeout
        for r, p in self.peers.items():
            if p.rec is None:
                if now - self.started > t:
                    return Fault(INFRA, r, "?", f"never sent a heartbeat in {_secs(now - self.started)} "
                                 "(training.hang_timeout): the process is stopped, frozen or its host unreachable")
                continue
            if now - p.beat_at > t:
                rec = p.rec
                return Fault(INFRA, r, rec["host"],
                             f"pid {rec['pid']} has sent no heartbeat for {_secs(now - p.beat_at)} (last at step "
                             f"{rec['step']}, {rec['phase']}): the process is stopped, frozen or its host "
                             "unreachable (training.hang_timeout)")
        me = self.progress
        if me.seq != self._own[0]:
            self._own = (me.seq, now)
        if not (me.waiting and now - self._own[1] > t and all(p.rec for p in self.peers.values())):
            return None
        stuck = [(r, p) for r, p in self.peers.items()
                 if not p.rec["waiting"] and not p.rec["exempt"] and now - p.seq_at > t]  # type: ignore[index]
        if stuck:
            r, p = min(stuck, key=lambda rp: rp[1].seq_at)
            rec = p.rec or {}
            return Fault(INFRA, r, rec["host"],
                         f"pid {rec['pid']} has been stuck in {rec['phase']} at step {rec['step']} for "
                         f"{_secs(now - p.seq_at)} while rank {self.rank} waits in {me.phase} (training.hang_timeout)")
        if all(p.rec["waiting"] and now - p.seq_at > t for p in self.peers.values()):  # type: ignore[index]
            return Fault(INFRA, self.rank, self.host,
                         f"every rank has waited in a collective for over {_secs(t)} ({me.phase} at step "
                         f"{me.step}) and none is working: the collective does not complete (network or NCCL)")
        return None

    def silent_peers(self, wait_s: float) -> list[int]:
        """Peers whose beat does not advance over ``wait_s`` seconds (after a collective failed)."""
        try:
            self.read_peers(self.clock())
            before = {r: p.beat for r, p in self.peers.items()}
            end = time.monotonic() + wait_s
            while time.monotonic() < end:
                time.sleep(min(0.2, wait_s))
                self.read_peers(self.clock())
                if first_failure(self.store) is not None:
                    return []
            return [r for r, p in self.peers.items() if p.beat == before[r]]
        except Exception:  # noqa: BLE001 - the store is gone too
            return []

    # -- the thread ------------------------------------------------------------
    def learn_rank0_host(self) -> None:
        """Wait (up to the store's timeout) for rank 0's first record and keep its host."""
        if self.rank0_host is None:
            try:
                self.rank0_host = json.loads(self.store.get(HB_PREFIX + "0"))["host"]
            except Exception:  # noqa: BLE001 - rank 0 never published or the store is gone: unknown
                pass

    def start(self, on_fault: Callable[[Fault], None]) -> Watchdog:
        def loop() -> None:
            self.learn_rank0_host()
            while not self._stop.wait(self.interval):
                fault = self.check()
                if fault is not None and not self._stop.is_set():
                    on_fault(fault)
                    return

        self.publish()
        self._thread = threading.Thread(target=loop, name="ftcluster-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()


# -- the job's first failure ------------------------------------------------------
_state: dict[str, Any] = {}  # "store", "watchdog", "rank", "timeout": set by start_watchdog


def claim_first(store: Any, fault: Fault) -> Fault:
    """Record ``fault`` as the job's first failure unless one is there; returns the one that stands."""
    try:
        got = store.compare_set(FIRST_KEY, "", fault.to_json())
        return Fault.from_json(got) or fault
    except Exception:  # noqa: BLE001 - the store's host is gone: this rank's own view stands
        return fault


def store_answers(store: Any) -> bool:
    try:
        store.check([FIRST_KEY])
        return True
    except Exception:  # noqa: BLE001 - connection refused or reset, a timeout
        return False


def first_failure(store: Any) -> Fault | None:
    try:
        if not store.check([FIRST_KEY]):
            return None
        return Fault.from_json(store.get(FIRST_KEY))
    except Exception:  # noqa: BLE001
        return None


def start_watchdog(rank: int, world: int, hang_timeout: float) -> Watchdog | None:
    """Start this rank's watchdog on a store connection of its own (MASTER_ADDR/MASTER_PORT, the store
    torchrun gives the workers); None for a single process."""
    if world <= 1 or "MASTER_ADDR" not in os.environ:
        return None
    import datetime

    import torch.distributed as dist

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(seconds=max(5.0, min(60.0, hang_timeout / 4))))
    dog = Watchdog(store, rank, world, hang_timeout)
    _state.update(store=store, watchdog=dog, rank=rank, timeout=hang_timeout)

    def on_fault(fault: Fault) -> None:
        stands = claim_first(store, fault)
        if stands == fault:
            print(f"error (rank {rank}): {fault.describe()}; ending the job: {verdict(INFRA)}", file=sys.stderr,
                  flush=True)
        write_cause(rank, stands)
        os._exit(FAULT_EXIT)  # the main thread is stuck in a collective: nothing else would end it

    return dog.start(on_fault)


def write_cause(rank: int, fault: Fault) -> None:
    """This rank's failure for its launcher (``FTCLUSTER_EXIT_DIR/cause-RANK.json``)."""
    d = os.environ.get("FTCLUSTER_EXIT_DIR")
    if d:
        try:
            (Path(d) / f"cause-{rank}.json").write_text(fault.to_json())
        except OSError:
            pass


def read_causes(exit_dir: Path) -> dict[int, Fault]:
    out: dict[int, Fault] = {}
    for f in exit_dir.glob("cause-*.json"):
        fault = Fault.from_json(f.read_text()) if f.is_file() else None
        if fault is not None:
            try:
                out[int(f.stem.split("-", 1)[1])] = fault
            except ValueError:
                continue
    return out


def exit_for(exc: BaseException, rank: int) -> tuple[int, str]:
    """A failed rank's exit status and what its one line adds after the error: the first failure of
    the job when another rank's came first, and the verdict (retried or not)."""
    first = (str(exc).splitlines() or [""])[0]
    own = Fault(classify(exc), rank, host_name(), f"{type(exc).__name__}: {first}")
    store, dog = _state.get("store"), _state.get("watchdog")
    if dog is not None:
        dog.stop()
    if store is None:
        write_cause(rank, own)
        return (FAULT_EXIT if own.kind == INFRA else 1), f"; {verdict(own.kind)}"
    if own.kind == INFRA and not store_answers(store):
        # The store is gone with the launcher that hosted it: rank 0's node's (torchrun's rendezvous
        # rank 0 hosts the workers' store; its ranks are 0 .. LOCAL_WORLD_SIZE-1). That is usually the
        # first node of the allocation, not always: nodes sharing an address race for the endpoint.
        rec = dog.peers[0].rec if dog is not None and 0 in dog.peers else None
        host = (rec or {}).get("host") or (dog.rank0_host if dog is not None else None)
        stands = Fault(INFRA, 0, host or f"{os.environ.get('MASTER_ADDR', 'the store host')}",
                       "lost with its node: the job's c10d store, which that node's launcher hosts, stopped "
                       "answering (the node failed or its launcher was killed)")
        write_cause(rank, stands)
        return FAULT_EXIT, f", after {stands.describe()}; {verdict(INFRA)}"
    if own.kind == INFRA:
        # A collective failed: a peer may have failed first (and said why) or been lost (its beat stops).
        stands = first_failure(store)
        if stands is None and dog is not None:
            lost = dog.silent_peers(min(15.0, 2.5 * dog.interval + 0.5))
            stands = first_failure(store)
            if stands is None and lost:
                rec = dog.peers[lost[0]].rec or {}
                stands = claim_first(store, Fault(INFRA, lost[0], rec.get("host", "?"),
                                                  f"lost (pid {rec.get('pid', '?')} stopped sending heartbeats at "
                                                  f"step {rec.get('step', '?')}, {rec.get('phase', '?')}): its process "
                                                  "was killed or its node failed"))
        stands = stands or claim_first(store, own)
    else:
        stands = claim_first(store, own)
    write_cause(rank, stands)
    code = FAULT_EXIT if stands.kind == INFRA else 1
    if stands == own or (stands.kind, stands.what) == (own.kind, own.what):  # the same error on every rank
        return code, f"; {verdict(own.kind)}"
    return code, f", after the job's first failure, {stands.describe()}; {verdict(stands.kind)}"
