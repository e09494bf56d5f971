"""Checkpoints and artifacts under one output URI, committed atomically (docs/storage.md).

Commit protocol: every file of a checkpoint or artifact is uploaded first, then
``manifest.json`` (each file's size and sha256) is written LAST. A folder is *committed* only
when its manifest exists and every listed file has the listed size; readers ignore anything
else, so a crash or an outage in the middle of an upload never yields a half checkpoint.
Uploads run in background threads, one commit after the other in submission order, so
training goes on while they upload. Several nodes upload their parts of one checkpoint
without a manifest (:meth:`CheckpointStore.upload_part_async`); one process then commits
them all (:meth:`CheckpointStore.commit_parts_async`).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import StorageError
from .fetch import Corrupt, download_verified
from .layout import CHECKPOINTS, MANIFEST, OutputLayout, parse_step_dir, step_dir
from .retry import END_OF_RUN_S, Attempts, RetryPolicy, call, classify
from .testhook import signal_at
from .uri import fs_and_path, listing, one_line, put_bytes, put_file, rm_if_exists, scan_local

log = logging.getLogger("ftcluster.storage")

MANIFEST_FORMAT = "ftcluster.manifest/1"


def build_manifest(kind: str, step: int | None, meta: dict[str, Any], files: dict[str, dict[str, Any]]) -> bytes:
    """The bytes of a ``manifest.json``: the one place its fields are written."""
    man = {"format": MANIFEST_FORMAT, "kind": kind, "step": step, "meta": meta, "files": dict(sorted(files.items())),
           "total_bytes": sum(i["size"] for i in files.values()), "ftcluster_version": __version__,
           "created_unix": round(time.time(), 3)}
    return json.dumps(man, indent=1, sort_keys=True, default=str).encode()


@dataclass
class _Job:
    kind: str  # "checkpoint" | "artifact" | "part" (one node's files, no manifest) | "manifest" (commit parts)
    dest: str  # fs path of the folder
    display: str  # URI for messages
    local_dir: Path
    meta: dict[str, Any]
    step: int | None
    final: bool
    delete_local: bool
    future: Future = field(default_factory=Future)
    deadline: float | None = None  # time.monotonic(); None: retry without end
    submitted: float = field(default_factory=time.monotonic)
    files: dict[str, dict[str, Any]] | None = None  # kind "manifest": the files the parts uploaded


@dataclass
class _Scan:
    committed: dict[int, dict[str, Any]]  # step -> manifest
    incomplete: set[int]


class CheckpointStore:
    """Resumable checkpoints and published artifacts under one output URI.

    ``commit_async`` and ``publish`` return at once; a single committer thread uploads one job
    after the other in submission order (a newer checkpoint never commits before an older one).
    Periodic uploads retry transient errors without end while training goes on; once a final
    job is submitted, every pending job must finish within ``retry_max_s`` and a failed final
    job raises :class:`StorageError` from :meth:`wait`. Permanent errors (credentials, access,
    a missing bucket) fail a job at once (:mod:`.retry`).
    """

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None, keep_last: int = 3,
                 concurrency: int = 8, retry_max_s: float = END_OF_RUN_S, *,
                 fs: Any = None, retry_base_s: float = 1.0, retry_cap_s: float = 30.0,
                 guard: Callable[[], None] | None = None):
        self.uri = uri.rstrip("/")
        # Called right before a manifest is written or removed (the run's output lease, storage/lease.py):
        # raises LeaseLost (permanent: the job fails at once) once another run owns the output.
        self.guard = guard
        fs_, root = fs_and_path(uri, storage_options)
        self.fs = fs if fs is not None else fs_
        self.paths = OutputLayout(root)  # fs paths
        self.uris = OutputLayout(self.uri)  # the same, as URIs for messages
        self.keep_last = keep_last
        self.concurrency = max(1, concurrency)
        self.retry_max_s = retry_max_s
        self.policy = RetryPolicy(retry_base_s, retry_cap_s)
        self.failures = 0  # failed attempts so far (all jobs); tests and logs read it
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._jobs: list[_Job] = []
        self._errors: list[StorageError] = []
        self._draining = False
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="ftcluster-upload")
        # A daemon thread: a crashed run must not hang at exit behind an upload retrying without end.
        self._thread = threading.Thread(target=self._committer, name="ftcluster-commit", daemon=True)
        self._thread.start()

    # -- public API ------------------------------------------------------------
    def step_uri(self, step: int) -> str:
        return self.uris.checkpoint(step) + "/"

    def commit_async(self, step: int, local_dir: Path, meta: dict[str, Any], final: bool = False) -> Future:
        """Upload ``local_dir`` as checkpoint ``step`` in the background, manifest last, then prune."""
        return self._submit(_Job("checkpoint", self.paths.checkpoint(step), self.step_uri(step), Path(local_dir),
                                 dict(meta), int(step), final, True))

    def publish(self, name: str, local_dir: Path, meta: dict[str, Any], final: bool | None = None,
                delete_local: bool = True) -> Future:
        """Upload ``local_dir`` to ``{uri}/{name}/`` with the same commit protocol (replacing an older one).

        ``final=None`` means: final once a final checkpoint was submitted (the end-of-run artifacts).
        """
        name = name.strip("/")
        if not name or name.split("/")[0] == CHECKPOINTS or ".." in name.split("/"):
            raise StorageError(f"{self.uri}: bad artifact name {name!r}")
        is_final = self._draining if final is None else final
        return self._submit(_Job("artifact", f"{self.paths.root}/{name}", f"{self.uri}/{name}/", Path(local_dir),
                                 dict(meta), None, is_final, delete_local))

    def upload_part_async(self, step: int, local_dir: Path, final: bool = False) -> Future:
        """Several nodes: upload this node's files of checkpoint ``step`` without committing it.

        The future's result has ``manifest_files`` (rel -> size, sha256); gather them from every
        node and let one process call :meth:`commit_parts_async`.
        """
        return self._submit(_Job("part", self.paths.checkpoint(step), self.step_uri(step), Path(local_dir), {},
                                 int(step), final, True))

    def commit_parts_async(self, step: int, parts: list[dict[str, dict[str, Any]]], meta: dict[str, Any],
                           final: bool = False) -> Future:
        """Commit checkpoint ``step`` from the ``manifest_files`` of every node's uploaded part.

        Checks that each listed file is stored with its size, writes the manifest, then prunes.
        """
        files: dict[str, dict[str, Any]] = {}
        for part in parts:
            for rel, info in part.items():
                if rel in files and files[rel] != info:
                    raise StorageError(f"{self.step_uri(step)}{rel}: two nodes uploaded different files under "
                                       "this name; give every node's files distinct names")
                files[rel] = dict(info)
        return self._submit(_Job("manifest", self.paths.checkpoint(step), self.step_uri(step), Path(), dict(meta),
                                 int(step), final, False, files=dict(sorted(files.items()))))

    def wait(self, timeout: float | None = None) -> None:
        """Block until every submitted job is done; raise StorageError if a final one failed."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            jobs = list(self._jobs)
        for job in jobs:
            left = None if end is None else max(0.0, end - time.monotonic())
            done, _ = concurrent.futures.wait([job.future], timeout=left)
            if not done:
                raise StorageError(f"{job.display}: still uploading after {timeout:.0f} s")
        with self._lock:
            self._jobs = [j for j in self._jobs if not j.future.done()]
            errors, self._errors = self._errors, []
        if errors:
            raise errors[0]

    def committed(self) -> list[int]:
        """Steps with a valid manifest whose files are all present with the right sizes, ascending."""
        return sorted(self._scan().committed)

    def manifest(self, step: int) -> dict[str, Any] | None:
        return self._scan().committed.get(step)

    def is_published(self, name: str) -> bool:
        """Whether ``{uri}/{name}/`` holds a committed artifact (the catalog's rule, :mod:`.catalog`), retried
        like every read of the store."""
        from .catalog import Catalog

        catalog = Catalog(self.uri, fs=self.fs, root=self.paths.root)
        return bool(self._read(lambda: catalog.is_committed(name), f"{self.uri}/{name}/"))

    def finished(self, last_artifact: str) -> bool:
        """Whether the run is done: ``last_artifact`` is committed (:meth:`.catalog.Catalog.done`)."""
        return self.is_published(last_artifact)

    def restore_latest(self, local_dir: Path) -> tuple[int, dict[str, Any]] | None:
        """Download the newest committed checkpoint into ``local_dir`` (verified); None if none.

        A corrupt one (missing file, wrong size or sha256) is logged and skipped for an older one.
        An unreachable store is retried up to ``retry_max_s``, then raises: never a silent fresh start.
        """
        local_dir = Path(local_dir)
        scan = self._read(self._scan, self.uris.checkpoints + "/")
        if scan.incomplete:
            log.info("ignoring %d incomplete checkpoint folder(s) under %s/: %s", len(scan.incomplete),
                     self.uris.checkpoints, ", ".join(step_dir(s) for s in sorted(scan.incomplete)))
        for step in sorted(scan.committed, reverse=True):
            man = scan.committed[step]
            try:
                download_verified(self.fs, self.paths.checkpoint(step), man["files"], local_dir, self.concurrency,
                                  deadline=time.monotonic() + self.retry_max_s, policy=self.policy,
                                  where=self.step_uri(step))
            except Corrupt as exc:
                log.warning("checkpoint %s is corrupt (%s); falling back to an older one", self.step_uri(step), exc)
                continue
            return step, man.get("meta", {})
        shutil.rmtree(local_dir, ignore_errors=True)
        return None

    def close(self) -> None:
        """Stop the committer after the queued jobs (call :meth:`wait` first to see errors)."""
        self._queue.put(None)
        self._thread.join()
        self._pool.shutdown(wait=True)

    # -- submission ----------------------------------------------------------------
    def _submit(self, job: _Job) -> Future:
        if job.kind != "manifest":
            if not job.local_dir.is_dir():
                raise StorageError(f"{job.local_dir}: not a folder; nothing to upload to {job.display}")
            if (job.local_dir / MANIFEST).exists():
                raise StorageError(f"{job.local_dir / MANIFEST}: the name {MANIFEST} is reserved for the commit "
                                   "marker")
        now = time.monotonic()
        with self._lock:
            if job.final or self._draining:
                job.deadline = now + self.retry_max_s
            if job.final:
                self._draining = True
                for other in self._jobs:
                    if other.future.done():
                        continue
                    # Bound what runs before the final job; a queued periodic checkpoint is superseded.
                    if other.deadline is None:
                        other.deadline = now + self.retry_max_s
                    if job.kind == "checkpoint" and other.kind == "checkpoint" and not other.final:
                        if other.future.cancel():
                            log.info("skipping the queued upload of %s: superseded by %s", other.display,
                                     job.display)
            self._jobs = [j for j in self._jobs if not j.future.done()]
            self._jobs.append(job)
        self._queue.put(job)
        return job.future

    def _committer(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                if job.delete_local:  # skipped (superseded): its snapshot is not needed any more
                    shutil.rmtree(job.local_dir, ignore_errors=True)
                continue
            try:
                result = self._run(job)
            except BaseException as exc:  # noqa: BLE001 - reported via the future and wait()
                err = exc if isinstance(exc, StorageError) else StorageError(f"{job.display}: {one_line(exc)}")
                if job.final:
                    with self._lock:
                        self._errors.append(err)
                else:
                    log.warning("gave up uploading %s: %s", job.display, err)
                job.future.set_exception(err)
            else:
                job.future.set_result(result)

    # -- one job -------------------------------------------------------------------
    def _attempts(self, job: _Job, what: str) -> Attempts:
        def on_failure(exc: BaseException, attempt: int, delay: float) -> None:
            with self._lock:
                self.failures += 1
            if attempt == 0 or attempt % 10 == 0:
                log.warning("upload of %s failed (attempt %d: %s); retrying in %.1f s%s", what, attempt + 1,
                            one_line(exc), delay, "" if job.final else " while training goes on")

        return Attempts(job.display, "upload", deadline=lambda: job.deadline, policy=self.policy,
                        limit_s=self.retry_max_s, on_failure=on_failure, started=job.submitted,
                        hint="check the endpoint, bucket and credentials; a rerun resumes from the last "
                             "committed checkpoint")

    def _retry(self, job: _Job, what: str, fn: Callable[[], Any]) -> Any:
        attempts = self._attempts(job, what)
        while True:
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified by the retry policy
                attempts.failed(exc)

    def _run(self, job: _Job) -> dict[str, Any]:
        t0 = time.monotonic()
        manifest_path = f"{job.dest}/{MANIFEST}"
        if job.kind == "manifest":
            files = job.files or {}
            self._retry(job, job.dest, lambda: self._check_stored(job, files))
        else:
            files = scan_local(job.local_dir)
            # Uncommit first: re-saving the same step, or republishing an artifact, replaces it.
            self._retry(job, manifest_path, lambda: self._guarded(lambda: rm_if_exists(self.fs, manifest_path)))
            self._upload_all(job, files)
            if job.kind == "part":
                shutil.rmtree(job.local_dir, ignore_errors=True)
                return {"uri": job.display, "step": job.step, "files": len(files), "manifest_files": files,
                        "bytes": sum(i["size"] for i in files.values()), "seconds": time.monotonic() - t0}
            self._retry(job, job.dest, lambda: self._remove_stale(job.dest, set(files)))
        kind = "checkpoint" if job.kind == "manifest" else job.kind
        data = build_manifest(kind, job.step, job.meta, files)
        if kind == "checkpoint":
            signal_at("checkpoint-files")  # test-only (.testhook); a no-op unless its variable is set
        self._retry(job, manifest_path, lambda: self._guarded(lambda: put_bytes(self.fs, manifest_path, data)))
        if kind == "checkpoint":
            signal_at("checkpoint-committed")
        dt = time.monotonic() - t0
        total = sum(i["size"] for i in files.values())
        if job.kind == "manifest":
            log.info("committed %s (%d files from every node)", job.display, len(files))
        else:
            log.info("committed %s (%d files, %.1f MB in %.1f s)", job.display, len(files), total / 1e6, dt)
        if kind == "checkpoint":
            try:
                self._prune()
            except Exception as exc:  # noqa: BLE001 - pruning is housekeeping; the next commit retries it
                log.warning("could not prune old checkpoints under %s/: %s", self.uris.checkpoints, one_line(exc))
        if job.delete_local:
            shutil.rmtree(job.local_dir, ignore_errors=True)
        return {"uri": job.display, "step": job.step, "files": len(files), "manifest_files": files,
                "bytes": total, "seconds": dt}

    def _guarded(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` (a manifest written or removed) once the guard passed: never a commit by a run that lost
        the output's lease."""
        if self.guard is not None:
            self.guard()
        return fn()

    def _upload_all(self, job: _Job, files: dict[str, dict[str, Any]]) -> None:
        """Upload every file, ``concurrency`` at a time; failed ones are retried in rounds with backoff.

        The retry loop runs here (a daemon thread), so the pool only ever holds single attempts and
        interpreter exit never waits behind an upload that retries without end.
        """
        pending = dict(files)
        attempts = self._attempts(job, f"{len(pending)} file(s) of {job.display}")
        while pending:
            futs = {rel: self._pool.submit(self._put_one, job.local_dir / rel, f"{job.dest}/{rel}", info["size"])
                    for rel, info in pending.items()}
            failed, last = {}, None
            for rel, fut in futs.items():
                exc = fut.exception()
                if exc is None:
                    continue
                if isinstance(exc, StorageError) or classify(exc, job.display) is not None:
                    attempts.failed(exc)  # raises: retrying the other files cannot help
                failed[rel], last = pending[rel], exc
            pending = failed
            if last is not None:
                attempts.failed(last)

    def _put_one(self, src: Path, dest: str, size: int) -> None:
        if not src.is_file():
            raise StorageError(f"{src}: vanished before its upload to {dest}")
        put_file(self.fs, src, dest)
        got = self.fs.info(dest).get("size")
        if got is not None and int(got) != size:
            raise OSError(f"{dest}: stored {got} bytes, expected {size}")

    def _read(self, fn: Callable[[], Any], where: str) -> Any:
        return call(fn, where, "reading the checkpoint store", deadline=time.monotonic() + self.retry_max_s,
                    policy=self.policy, limit_s=self.retry_max_s)

    def _check_stored(self, job: _Job, files: dict[str, dict[str, Any]]) -> None:
        stored = {p[len(job.dest) + 1:]: int(i.get("size") or 0) for p, i in listing(self.fs, job.dest).items()}
        bad = [rel for rel, info in files.items() if stored.get(rel) != int(info["size"])]
        if bad:
            raise StorageError(f"{job.display}: {len(bad)} file(s) of the parts are missing or of the wrong size "
                               f"(first: {bad[0]}); not committing this checkpoint")

    def _remove_stale(self, dest: str, keep: set[str]) -> None:
        for path in listing(self.fs, dest):
            rel = path[len(dest) + 1:]
            if rel not in keep and rel != MANIFEST:
                self.fs.rm_file(path)

    # -- reading and pruning ---------------------------------------------------------
    def _scan(self) -> _Scan:
        root = self.paths.checkpoints
        by_step: dict[int, dict[str, int]] = {}
        for path, info in listing(self.fs, root).items():
            parts = path[len(root) + 1:].split("/", 1)
            step = parse_step_dir(parts[0])
            if step is not None and len(parts) == 2:
                by_step.setdefault(step, {})[parts[1]] = int(info.get("size") or 0)
        scan = _Scan({}, set())
        for step, present in by_step.items():
            man = self._valid_manifest(self.paths.checkpoint(step), present, step) if MANIFEST in present else None
            if man is None:
                scan.incomplete.add(step)
            else:
                scan.committed[step] = man
        return scan

    def _valid_manifest(self, folder: str, present: dict[str, int], step: int) -> dict[str, Any] | None:
        try:
            man = json.loads(self.fs.cat_file(f"{folder}/{MANIFEST}"))
            files = man["files"]
            ok = man.get("step") == step and all(present.get(rel) == int(i["size"]) for rel, i in files.items())
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("%s/%s is unreadable (%s); ignoring that checkpoint", folder, MANIFEST, one_line(exc))
            return None
        if not ok:
            log.warning("%s: files missing or of the wrong size; ignoring that checkpoint", folder)
        return man if ok else None

    def _prune(self) -> None:
        """Keep the newest ``keep_last`` committed checkpoints; remove leftovers older than the newest."""
        scan = self._scan()
        steps = sorted(scan.committed)
        if not steps:
            return
        for step in steps[:-self.keep_last] if len(steps) > self.keep_last else []:
            folder = self.paths.checkpoint(step)
            self.fs.rm_file(f"{folder}/{MANIFEST}")  # uncommitted first, so a half-deleted one is ignored
            self.fs.rm(folder, recursive=True)
            log.info("pruned checkpoint %s (keep_last %d)", self.step_uri(step), self.keep_last)
        # Incomplete folders older than the newest commit can never commit (commits are serialized in
        # step order): leftovers of a crash or an abandoned upload. Newer ones may be in progress.
        for step in sorted(s for s in scan.incomplete if s < steps[-1]):
            self.fs.rm(self.paths.checkpoint(step), recursive=True)
            log.info("removed the incomplete checkpoint folder %s", self.step_uri(step))
