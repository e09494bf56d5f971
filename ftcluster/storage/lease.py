"""One writer per ``output.uri``: a lease object in the store (docs/storage.md, "One writer per output").

A run's rank 0 takes ``<output.uri>/.ftcluster/lease.json`` before it reads or writes anything
there, renews it every ``ttl/4`` from a background thread while the run lives, renews it once
more right before each manifest is written (:meth:`Lease.check`, the commit guard) and deletes it
when the run ends in an orderly way (finished, stopped, or failed with an error it could report).
A crash (SIGKILL, OOM, a lost node) leaves it until it expires, ``ttl`` seconds after its last
renewal.

Taking and renewing are conditional writes, so two takers can never both win:

* ``s3://``: ``PutObject`` with ``If-None-Match: *`` to create, ``If-Match: <ETag>`` to renew or
  to take over an expired lease (S3, and moto; an S3-compatible store without conditional writes
  answers them with an error or ignores them: see the docs);
* a local path / ``file://``: the new lease is written to a private file and ``link()``-ed into
  place (fails if one exists, like ``O_EXCL``); replacing and deleting compare the content under
  an exclusive ``flock`` of ``.ftcluster/lease.lock``;
* any other fsspec store (``gs://`` ...): best effort: write, then read back and keep the lease
  only if the read-back holds our token. A race inside one round trip can go unseen there.

Who counts as the same holder (:func:`holder_from_env`): the run id ftcluster gives every run
(``FTCLUSTER_RUN_ID``) together with the scheduler's identity of the job (Slurm cluster and job
id, kept across a requeue; the Kubernetes job's master address, kept across pod restarts). The
same holder takes its own lease back at once, whatever its expiry (a requeue, a restarted pod, a
worker restarted by torchrun); anyone else waits for the expiry.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from .. import __version__
from ..errors import StorageError
from .layout import LEASE
from .leasestore import FORMAT, Conflict, LeaseRecord, read_lease, store_for
from .retry import RetryPolicy, call, classify
from .uri import one_line

log = logging.getLogger("ftcluster.storage")

__all__ = ["FORMAT", "Holder", "Lease", "LeaseHeld", "LeaseLost", "LeaseRecord", "holder_from_env", "read_lease",
           "refusal", "ttl_from_env"]

TTL_ENV = "FTCLUSTER_LEASE_TTL_S"
DEFAULT_TTL_S = 300.0  # 5 min: what a crash costs the next run at most; renewed every TTL/4 (75 s)
RUN_ID_ENV = "FTCLUSTER_RUN_ID"  # set by the local and Slurm backends for every run they start


class LeaseHeld(StorageError):
    """Another run holds a live lease on the output URI (the message is the one-line refusal)."""


class LeaseLost(StorageError):
    """This run's lease was taken by another run, broken, or released: nothing more may be committed."""

    found = False  # True where the loss was discovered (not a later check, not a release)


def ttl_from_env(env: Mapping[str, str] | None = None) -> float:
    """The lease's time to live: ``$FTCLUSTER_LEASE_TTL_S`` or 300 s."""
    raw = (env if env is not None else os.environ).get(TTL_ENV, "")
    try:
        ttl = float(raw) if raw else DEFAULT_TTL_S
    except ValueError:
        raise StorageError(f"{TTL_ENV}={raw!r}: not a number of seconds; unset it for the default "
                           f"{DEFAULT_TTL_S:g}") from None
    if ttl <= 0:
        raise StorageError(f"{TTL_ENV}={raw!r}: must be positive; unset it for the default {DEFAULT_TTL_S:g}")
    return ttl


# ----------------------------------------------------------------------------- who holds it


@dataclass(frozen=True)
class Holder:
    """The process taking the lease, and the identity that makes a restart of it the same holder."""

    key: str  # equal across a requeue / pod restart / worker restart of the same run, different between runs
    run_id: str | None  # ftcluster's run id, for `ftcluster cancel`
    job_id: str | None  # the scheduler's id (Slurm job, Kubernetes job)
    host: str
    pid: int


def _k8s_namespace() -> str:
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace", encoding="utf-8") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def holder_from_env(env: Mapping[str, str] | None = None, host: str | None = None, pid: int | None = None) -> Holder:
    """This process as a lease holder: the key joins every identity present in ``env``.

    * ``FTCLUSTER_RUN_ID``: the run id the local and Slurm backends give each submission;
    * Slurm: ``SLURM_CLUSTER_NAME`` and ``SLURM_JOB_ID`` (a requeue keeps the job id; each task of a
      job array has its own, and its own output.uri);
    * Kubernetes: the namespace and the job's master address (``MASTER_ADDR``/``PET_MASTER_ADDR``, the
      same for every pod of one job, across restarts);
    * none of those (torchrun started by hand): torchrun's ``TORCHELASTIC_RUN_ID`` if it names one, else
      this host and the launcher's pid.

    Joined, so that a run id that leaked into a shell (two hand-made ``sbatch`` of one script) or two
    local runs inside one Slurm allocation still differ.
    """
    env = os.environ if env is None else env
    host = host or env.get("SLURMD_NODENAME") or socket.gethostname()  # Slurm's node name, where there is one
    pid = os.getpid() if pid is None else pid
    parts: list[str] = []
    run_id = env.get(RUN_ID_ENV) or None
    job_id: str | None = None
    if run_id:
        parts.append(f"run:{run_id}")
    if env.get("SLURM_JOB_ID"):
        job_id = env["SLURM_JOB_ID"]
        parts.append(f"slurm:{env.get('SLURM_CLUSTER_NAME', '')}:{job_id}")
    elif env.get("KUBERNETES_SERVICE_HOST") and (env.get("PET_MASTER_ADDR") or env.get("MASTER_ADDR")):
        master = env.get("PET_MASTER_ADDR") or env.get("MASTER_ADDR") or ""
        ns = env.get("POD_NAMESPACE") or _k8s_namespace()
        job_id = f"{ns}/{master}" if ns else master
        parts.append(f"kubernetes:{job_id}")
    if not parts:
        rdzv = env.get("TORCHELASTIC_RUN_ID", "")
        parts.append(f"torchrun:{host}:{rdzv}" if rdzv and rdzv != "none" else f"process:{host}:{os.getppid()}")
    return Holder("/".join(parts), run_id, job_id, host, pid)


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def refusal(uri: str, rec: LeaseRecord, now: float | None = None) -> str:
    """The one line that refuses a second writer of ``uri``: who holds it, until when, what to do."""
    now = time.time() if now is None else now
    stop = (f"ftcluster cancel {rec.run_id}" if rec.run_id else f"scancel {rec.job_id}" if "slurm:" in rec.holder
            else f"delete its Kubernetes job, whose master is {rec.job_id}" if "kubernetes:" in rec.holder
            else f"stop pid {rec.pid} on {rec.host}")
    left = max(0.0, rec.expires_unix - now)
    return (f"{uri}: output.uri is in use by {rec.who()} (its lease {uri.rstrip('/')}/{LEASE} was renewed "
            f"{max(0.0, now - rec.renewed_unix):.0f} s ago); one run writes one output.uri: stop that run "
            f"({stop}) and submit again, or write elsewhere (--fresh, or --set output.uri=...); if that run "
            f"crashed, its lease expires at {_utc(rec.expires_unix)} (in {left:.0f} s), then a new run takes it "
            f"over (or delete {uri.rstrip('/')}/{LEASE} once you are sure it is gone)")


# ----------------------------------------------------------------------------- the lease


class Lease:
    """This run's lease on one output URI (rank 0 holds it).

    :meth:`acquire` takes it (or raises :class:`LeaseHeld`); :meth:`keep_renewed` starts the renewing
    thread; :meth:`check` is the commit guard (a conditional renewal now, :class:`LeaseLost` if the
    lease is no longer ours); :meth:`release` deletes it if it is still ours.
    """

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None, holder: Holder | None = None,
                 ttl_s: float | None = None, *, fs: Any = None, clock: Callable[[], float] = time.time,
                 retry_max_s: float = 600.0, policy: RetryPolicy | None = None):
        self.uri = uri.rstrip("/")
        self.where = f"{self.uri}/{LEASE}"
        self.holder = holder or holder_from_env()
        self.ttl = ttl_from_env() if ttl_s is None else float(ttl_s)
        self.interval = self.ttl / 4
        self.clock = clock
        self.retry_max_s = retry_max_s
        self.policy = policy or RetryPolicy(min(1.0, self.interval / 4), min(30.0, self.interval))
        self._store = store_for(uri, storage_options, fs)
        self._lock = threading.Lock()
        self.record: LeaseRecord | None = None
        self._version: Any = None
        self.lost: str | None = None  # why nothing more may be committed
        self.confirmed = 0.0  # time.monotonic() of the last successful conditional write
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_lost: Callable[[str], None] | None = None
        self._notified = False

    # -- taking --------------------------------------------------------------------
    def _new_record(self, now: float) -> LeaseRecord:
        h = self.holder
        return LeaseRecord(holder=h.key, token=secrets.token_hex(8), run_id=h.run_id, job_id=h.job_id, host=h.host,
                           pid=h.pid, acquired_unix=round(now, 3), renewed_unix=round(now, 3),
                           expires_unix=round(now + self.ttl, 3), ttl_s=self.ttl, ftcluster_version=__version__)

    def _try_take(self) -> LeaseRecord:
        """One round: create, take over our own or an expired one, or raise LeaseHeld; Conflict: go again."""
        rec, version, present = self._store.read()
        now = self.clock()
        new = self._new_record(now)
        if not present:
            self._version = self._store.create(new.to_bytes())
        elif rec is None or rec.holder == self.holder.key or rec.expired(now):
            if rec is not None and rec.holder == self.holder.key:
                log.info("taking back this run's own lease on %s (left by pid %d on %s)", self.uri, rec.pid, rec.host)
            elif rec is not None:
                log.warning("taking over the expired lease of %s on %s (expired %.0f s ago: that run crashed or "
                            "lost the store)", rec.who(), self.uri, now - rec.expires_unix)
            self._version = self._store.replace(new.to_bytes(), version)
        else:
            raise LeaseHeld(refusal(self.uri, rec, now))
        return new

    def acquire(self) -> LeaseRecord:
        """Take the lease; :class:`LeaseHeld` (the one-line refusal) when another run holds a live one.

        An unreachable store is retried up to ``retry_max_s``; two runs racing for a free or expired
        lease: exactly one wins (the conditional write), the other is refused by the winner's lease."""
        def attempt() -> LeaseRecord:
            for _ in range(20):  # each conflict means someone else wrote meanwhile: read again
                try:
                    return self._try_take()
                except Conflict:
                    continue
            raise StorageError(f"{self.where}: the lease kept changing under 20 attempts to take it; is another "
                               "job restarting in a loop on this output.uri?")

        rec = call(attempt, self.where, "taking the output lease", deadline=time.monotonic() + self.retry_max_s,
                   policy=self.policy, limit_s=self.retry_max_s)
        with self._lock:
            self.record, self.lost, self.confirmed = rec, None, time.monotonic()
        log.info("took the lease on %s as %s; it expires %.0f s after each renewal (every %.0f s)", self.uri,
                 rec.who(), self.ttl, self.interval)
        return rec

    # -- keeping ---------------------------------------------------------------------
    def _lose(self, why: str) -> LeaseLost:
        self.lost = why
        return LeaseLost(why)

    def renew(self) -> None:
        """Extend the lease by a conditional write; :class:`LeaseLost` if it is no longer ours, other errors
        (an unreachable store) as they come. Finding it lost (here, in the renewing thread or in the commit
        check) calls :meth:`keep_renewed`'s ``on_lost`` once."""
        try:
            self._renew()
        except LeaseLost as exc:
            if exc.found and self._on_lost is not None and not self._notified:
                self._notified = True
                self._on_lost(str(exc))
            raise

    def _renew(self) -> None:
        with self._lock:
            if self.lost:
                raise LeaseLost(self.lost)
            if self.record is None:
                raise self._lose(f"{self.where}: no lease taken")
            now = self.clock()
            new = replace(self.record, renewed_unix=round(now, 3), expires_unix=round(now + self.ttl, 3))
            try:
                self._version = self._store.replace(new.to_bytes(), self._version)
            except Conflict:
                rec, version, present = self._store.read()
                if rec is None or rec.token != self.record.token:
                    who = "deleted (broken by hand?)" if not present else (
                        "unreadable" if rec is None else f"taken by {rec.who()} at {_utc(rec.acquired_unix)}")
                    lost = self._lose(f"{self.uri}: this run lost its lease on output.uri: the lease was {who}; "
                                      "stopping without committing anything more (the other run writes there now; "
                                      "use another output.uri for this one)")
                    lost.found = True
                    raise lost from None
                # Ours after all (an earlier write landed though its answer was lost): write again on its version.
                self._version = self._store.replace(new.to_bytes(), version)
            self.record, self.confirmed = new, time.monotonic()

    def check(self) -> None:
        """The commit guard, called right before a manifest is written (or removed): renew now, so the
        commit lands within ``ttl`` of a conditional write that proved the lease ours."""
        self.renew()

    def keep_renewed(self, on_lost: Callable[[str], None]) -> None:
        """Renew every ``ttl/4`` in a daemon thread; on a store outage retry (backing off) and warn; when the
        lease is found lost (by this thread or by the commit check) call ``on_lost(one line)`` once and stop."""
        self._on_lost = on_lost

        def loop() -> None:
            failures, wait = 0, self.interval
            while not self._stop.wait(wait):
                try:
                    self.renew()
                except LeaseLost:
                    return
                except Exception as exc:  # noqa: BLE001 - the store is down or slow: retry, the run goes on
                    perm = classify(exc, self.where)
                    since = time.monotonic() - self.confirmed
                    if failures == 0 or failures % 10 == 0:
                        log.warning("renewing the lease %s failed (%s%s); last renewed %.0f s ago, it expires after "
                                    "%.0f s; retrying, and no checkpoint commits until it is renewed", self.where,
                                    one_line(exc), f": {perm.problem}" if perm else "", since, self.ttl)
                    wait = self.policy.delay(failures)
                    failures += 1
                    continue
                failures, wait = 0, self.interval

        self._thread = threading.Thread(target=loop, name="ftcluster-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours (best effort: it expires anyway)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        with self._lock:
            if self.record is None or self.lost:
                self.lost = self.lost or f"{self.uri}: the lease was released"
                return
            token, self.lost = self.record.token, f"{self.uri}: the lease was released"
            try:
                rec, version, _ = self._store.read()
                if rec is not None and rec.token == token:
                    self._store.delete(version)
            except Conflict:
                pass
            except Exception as exc:  # noqa: BLE001 - it expires by itself
                log.warning("could not release the lease %s (%s); it expires by itself at %s", self.where,
                            one_line(exc), _utc(self.record.expires_unix))
