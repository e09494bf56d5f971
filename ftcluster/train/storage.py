"""Training outputs on any fsspec filesystem (local, file://, s3://, gs://), committed atomically.

Commit protocol (docs/storage.md): every file of a checkpoint or artifact is uploaded first,
with per-file retries, then ``manifest.json`` (each file's size and sha256) is written LAST. A
folder is *committed* only when its manifest exists and every listed file has the listed size;
readers ignore anything else, so a crash or an outage in the middle of an upload never yields a
half checkpoint. Uploads run in background threads, one commit after the other in submission
order, so training goes on while they upload.

Credentials never come from ``storage_options`` (the spec rejects them): s3fs/botocore read
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/an instance role, gcsfs reads
``GOOGLE_APPLICATION_CREDENTIALS``/workload identity. This module imports no torch.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import queue
import random
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import StorageError

log = logging.getLogger("ftcluster.train")

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "ftcluster.manifest/1"
STEP_DIR = re.compile(r"^step-(\d{8,})$")
DONE_SUFFIX = ".done"


# ----------------------------------------------------------------------------- paths


def is_local(uri: str) -> bool:
    """True for plain paths and file:// URIs."""
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> Path:
    """The absolute local path of a plain path or file:// URI (file://./x is relative to the cwd)."""
    rest = uri[len("file://"):] if uri.startswith("file://") else uri
    return Path(os.path.abspath(os.path.expanduser(rest)))


def fs_and_path(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """The fsspec filesystem and the protocol-less path for ``uri`` (no trailing '/')."""
    if is_local(uri):
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem(), str(local_path(uri))
    import fsspec.core

    protocol = uri.split("://", 1)[0]
    try:
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    except ImportError as exc:
        pkg = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}.get(protocol)
        raise StorageError(f"{uri}: {protocol}:// needs the {pkg or 'matching fsspec'} package; "
                           f"pip install {pkg or 'it'} ({exc})") from exc
    except (ValueError, TypeError) as exc:
        raise StorageError(f"{uri}: cannot open this URI with storage_options {sorted(storage_options or {})}: "
                           f"{one_line(exc)}") from exc
    return fs, path.rstrip("/")


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return msg if len(msg) <= 300 else msg[:297] + "..."


def _is_local_fs(fs: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def put_bytes(fs: Any, path: str, data: bytes) -> None:
    """Write a small file atomically: a rename on a local disk, a single PUT on object stores."""
    if _is_local_fs(fs):
        fs.makedirs(fs._parent(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, data)


def _listing(fs: Any, root: str) -> dict[str, dict[str, Any]]:
    """Every file under root -> its info (one LIST on object stores); {} when root does not exist."""
    with contextlib.suppress(Exception):
        fs.invalidate_cache(root)
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    return {p: i for p, i in found.items() if i.get("type", "file") != "directory"}


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes and threads of one node (flock on a lock file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- retries


def backoff_s(attempt: int, base_s: float, cap_s: float) -> float:
    """Exponential backoff with 'equal jitter': half fixed, half random, capped."""
    d = min(cap_s, base_s * (2 ** min(attempt, 30)))
    return d / 2 + random.uniform(0, d / 2)


# ----------------------------------------------------------------------------- checkpoint store


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
    Periodic uploads retry without end while training goes on; once a final job is submitted,
    every pending job must finish within ``retry_max_s`` and a failed final job raises
    :class:`StorageError` from :meth:`wait`.
    """

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None, keep_last: int = 3,
                 concurrency: int = 8, retry_max_s: float = 600.0, prefix: str = "checkpoints", *,
                 fs: Any = None, retry_base_s: float = 1.0, retry_cap_s: float = 30.0):
        self.uri = uri.rstrip("/")
        fs_, self.root = fs_and_path(uri, storage_options)
        self.fs = fs if fs is not None else fs_
        self.keep_last = keep_last
        self.concurrency = max(1, concurrency)
        self.retry_max_s = retry_max_s
        self.retry_base_s, self.retry_cap_s = retry_base_s, retry_cap_s
        self.prefix = prefix.strip("/")
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
        return f"{self.uri}/{self.prefix}/step-{step:08d}/"

    def commit_async(self, step: int, local_dir: Path, meta: dict[str, Any], final: bool = False) -> Future:
        """Upload ``local_dir`` as checkpoint ``step`` in the background, manifest last, then prune."""
        dest = f"{self.root}/{self.prefix}/step-{step:08d}"
        return self._submit(_Job("checkpoint", dest, self.step_uri(step), Path(local_dir), dict(meta), int(step),
                                 final, True))

    def publish(self, name: str, local_dir: Path, meta: dict[str, Any], final: bool | None = None,
                delete_local: bool = True) -> Future:
        """Upload ``local_dir`` to ``{uri}/{name}/`` with the same commit protocol (replacing an older one).

        ``final=None`` means: final once a final checkpoint was submitted (the end-of-run artifacts).
        """
        name = name.strip("/")
        if not name or name.startswith(self.prefix + "/") or ".." in name.split("/"):
            raise StorageError(f"{self.uri}: bad artifact name {name!r}")
        is_final = self._draining if final is None else final
        return self._submit(_Job("artifact", f"{self.root}/{name}", f"{self.uri}/{name}/", Path(local_dir),
                                 dict(meta), None, is_final, delete_local))

    def upload_part_async(self, step: int, local_dir: Path, final: bool = False) -> Future:
        """Several nodes: upload this node's files of checkpoint ``step`` without committing it.

        The future's result has ``manifest_files`` (rel -> size, sha256); gather them from every
        node and let one process call :meth:`commit_parts_async`.
        """
        dest = f"{self.root}/{self.prefix}/step-{step:08d}"
        return self._submit(_Job("part", dest, self.step_uri(step), Path(local_dir), {}, int(step), final, True))

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
        dest = f"{self.root}/{self.prefix}/step-{step:08d}"
        return self._submit(_Job("manifest", dest, self.step_uri(step), Path(), dict(meta), int(step), final,
                                 False, files=dict(sorted(files.items()))))

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

    def restore_latest(self, local_dir: Path) -> tuple[int, dict[str, Any]] | None:
        """Download the newest committed checkpoint into ``local_dir`` (verified); None if none.

        A corrupt one (missing file, wrong size or sha256) is logged and skipped for an older one.
        An unreachable store is retried up to ``retry_max_s``, then raises: never a silent fresh start.
        """
        local_dir = Path(local_dir)
        scan = self._retry_call(self._scan, f"{self.uri}/{self.prefix}/", time.monotonic() + self.retry_max_s)
        if scan.incomplete:
            log.info("ignoring %d incomplete checkpoint folder(s) under %s/%s/: %s", len(scan.incomplete),
                     self.uri, self.prefix, ", ".join(f"step-{s:08d}" for s in sorted(scan.incomplete)))
        for step in sorted(scan.committed, reverse=True):
            man = scan.committed[step]
            try:
                download_verified(self.fs, f"{self.root}/{self.prefix}/step-{step:08d}", man["files"], local_dir,
                                  self.concurrency, deadline=time.monotonic() + self.retry_max_s,
                                  retry=(self.retry_base_s, self.retry_cap_s))
            except _Corrupt as exc:
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
    def _run(self, job: _Job) -> dict[str, Any]:
        t0 = time.monotonic()
        manifest_path = f"{job.dest}/{MANIFEST}"
        if job.kind == "manifest":
            files = job.files or {}
            self._retry(job, job.dest, lambda: self._check_stored(job, files))
        else:
            files = scan_local(job.local_dir)
            # Uncommit first: re-saving the same step, or republishing an artifact, replaces it.
            self._retry(job, manifest_path, lambda: _rm_if_exists(self.fs, manifest_path))
            self._upload_all(job, files)
            if job.kind == "part":
                shutil.rmtree(job.local_dir, ignore_errors=True)
                return {"uri": job.display, "step": job.step, "files": len(files), "manifest_files": files,
                        "bytes": sum(i["size"] for i in files.values()), "seconds": time.monotonic() - t0}
            self._retry(job, job.dest, lambda: self._remove_stale(job.dest, set(files)))
        man = {"format": MANIFEST_FORMAT, "kind": job.kind, "step": job.step, "meta": job.meta, "files": files,
               "total_bytes": sum(i["size"] for i in files.values()), "ftcluster_version": __version__,
               "created_unix": round(time.time(), 3)}
        data = json.dumps(man, indent=1, sort_keys=True, default=str).encode()
        self._retry(job, manifest_path, lambda: put_bytes(self.fs, manifest_path, data))
        dt = time.monotonic() - t0
        log.info("committed %s (%d files, %.1f MB in %.1f s)", job.display, len(files), man["total_bytes"] / 1e6, dt)
        if job.kind == "checkpoint":
            try:
                self._prune()
            except Exception as exc:  # noqa: BLE001 - pruning is housekeeping; the next commit retries it
                log.warning("could not prune old checkpoints under %s/%s/: %s", self.uri, self.prefix, one_line(exc))
        if job.delete_local:
            shutil.rmtree(job.local_dir, ignore_errors=True)
        return {"uri": job.display, "step": job.step, "files": len(files), "manifest_files": files,
                "bytes": man["total_bytes"], "seconds": dt}

    def _upload_all(self, job: _Job, files: dict[str, dict[str, Any]]) -> None:
        """Upload every file, ``concurrency`` at a time; failed ones are retried in rounds with backoff.

        The retry loop runs here (a daemon thread), so the pool only ever holds single attempts and
        interpreter exit never waits behind an upload that retries without end.
        """
        pending, attempt = dict(files), 0
        while pending:
            futs = {rel: self._pool.submit(self._put_one, job.local_dir / rel, f"{job.dest}/{rel}", info["size"])
                    for rel, info in pending.items()}
            failed, last = {}, None
            for rel, fut in futs.items():
                exc = fut.exception()
                if isinstance(exc, StorageError):
                    raise exc
                if exc is not None:
                    failed[rel], last = pending[rel], exc
            pending = failed
            if pending:
                assert last is not None
                self._after_failure(job, f"{len(pending)} file(s) of {job.display}", last, attempt)
                attempt += 1

    def _put_one(self, src: Path, dest: str, size: int) -> None:
        if not src.is_file():
            raise StorageError(f"{src}: vanished before its upload to {dest}")
        if _is_local_fs(self.fs):
            os.makedirs(os.path.dirname(dest), exist_ok=True)
        self.fs.put_file(str(src), dest)
        got = self.fs.info(dest).get("size")
        if got is not None and int(got) != size:
            raise OSError(f"{dest}: stored {got} bytes, expected {size}")

    def _retry(self, job: _Job, what: str, fn: Callable[[], Any]) -> Any:
        attempt = 0
        while True:
            try:
                return fn()
            except StorageError:
                raise
            except Exception as exc:  # noqa: BLE001 - every storage error is retried until the deadline
                self._after_failure(job, what, exc, attempt)
                attempt += 1

    def _after_failure(self, job: _Job, what: str, exc: BaseException, attempt: int) -> None:
        """Count and log a failed attempt, then sleep the backoff; raise once the job's deadline passes."""
        with self._lock:
            self.failures += 1
        delay = backoff_s(attempt, self.retry_base_s, self.retry_cap_s)
        now = time.monotonic()
        if job.deadline is not None and now + delay > job.deadline:
            raise StorageError(
                f"{job.display}: upload failed for {now - job.submitted:.0f} s (limit {self.retry_max_s:g} s): "
                f"{one_line(exc)}; check the endpoint, bucket and credentials; a rerun resumes from the last "
                "committed checkpoint") from exc
        if attempt == 0 or attempt % 10 == 0:
            log.warning("upload of %s failed (attempt %d: %s); retrying in %.1f s%s", what, attempt + 1,
                        one_line(exc), delay, "" if job.final else " while training goes on")
        time.sleep(delay)

    def _retry_call(self, fn: Callable[[], Any], what: str, deadline: float) -> Any:
        attempt = 0
        while True:
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001
                delay = backoff_s(attempt, self.retry_base_s, self.retry_cap_s)
                if time.monotonic() + delay > deadline:
                    raise StorageError(f"{what}: cannot read the checkpoint store: {one_line(exc)}; "
                                       "check the endpoint, bucket and credentials") from exc
                log.warning("reading %s failed (%s); retrying in %.1f s", what, one_line(exc), delay)
                attempt += 1
                time.sleep(delay)

    def _check_stored(self, job: _Job, files: dict[str, dict[str, Any]]) -> None:
        stored = {p[len(job.dest) + 1:]: int(i.get("size") or 0) for p, i in _listing(self.fs, job.dest).items()}
        bad = [rel for rel, info in files.items() if stored.get(rel) != int(info["size"])]
        if bad:
            raise StorageError(f"{job.display}: {len(bad)} file(s) of the parts are missing or of the wrong size "
                               f"(first: {bad[0]}); not committing this checkpoint")

    def _remove_stale(self, dest: str, keep: set[str]) -> None:
        for path in _listing(self.fs, dest):
            rel = path[len(dest) + 1:]
            if rel not in keep and rel != MANIFEST:
                self.fs.rm_file(path)

    # -- reading and pruning ---------------------------------------------------------
    def _scan(self) -> _Scan:
        root = f"{self.root}/{self.prefix}"
        by_step: dict[int, dict[str, int]] = {}
        for path, info in _listing(self.fs, root).items():
            parts = path[len(root) + 1:].split("/", 1)
            m = STEP_DIR.match(parts[0])
            if m and len(parts) == 2:
                by_step.setdefault(int(m.group(1)), {})[parts[1]] = int(info.get("size") or 0)
        scan = _Scan({}, set())
        for step, present in by_step.items():
            man = self._valid_manifest(f"{root}/step-{step:08d}", present, step) if MANIFEST in present else None
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
        scan = self._scan()
        steps = sorted(scan.committed)
        if not steps:
            return
        root = f"{self.root}/{self.prefix}"
        for step in steps[:-self.keep_last] if len(steps) > self.keep_last else []:
            folder = f"{root}/step-{step:08d}"
            self.fs.rm_file(f"{folder}/{MANIFEST}")  # uncommitted first, so a half-deleted one is ignored
            self.fs.rm(folder, recursive=True)
            log.info("pruned checkpoint %s (keep_last %d)", self.step_uri(step), self.keep_last)
        # Incomplete folders older than the newest commit can never commit (commits are serialized in
        # step order): leftovers of a crash or an abandoned upload. Newer ones may be in progress.
        for step in sorted(s for s in scan.incomplete if s < steps[-1]):
            self.fs.rm(f"{root}/step-{step:08d}", recursive=True)
            log.info("removed the incomplete checkpoint folder %s", self.step_uri(step))


def _rm_if_exists(fs: Any, path: str) -> None:
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def scan_local(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file under ``folder`` (relative posix path) -> {size, sha256}, sorted."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    return out


# ----------------------------------------------------------------------------- downloads


class _Corrupt(Exception):
    """A committed folder whose content does not match its manifest."""


def download_verified(fs: Any, src: str, files: dict[str, dict[str, Any]], dest: Path, concurrency: int,
                      deadline: float, retry: tuple[float, float] = (1.0, 30.0)) -> None:
    """Download ``files`` (rel -> {size, sha256?}) from ``src`` into a fresh ``dest`` and verify them.

    Raises _Corrupt for a missing file or a size/sha256 mismatch, StorageError when the store stays
    unreachable past ``deadline``.
    """
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)

    def one(rel: str, info: dict[str, Any]) -> None:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        attempt = 0
        while True:
            try:
                fs.get_file(f"{src}/{rel}", str(target))
                break
            except FileNotFoundError as exc:
                raise _Corrupt(f"{rel} is missing") from exc
            except Exception as exc:  # noqa: BLE001 - transient: retried until the deadline
                delay = backoff_s(attempt, *retry)
                if time.monotonic() + delay > deadline:
                    raise StorageError(f"{src}/{rel}: download failed: {one_line(exc)}") from exc
                attempt += 1
                time.sleep(delay)
        size = target.stat().st_size
        if "size" in info and size != int(info["size"]):
            raise _Corrupt(f"{rel} has {size} bytes, the manifest says {info['size']}")
        if info.get("sha256") and file_sha256(target) != info["sha256"]:
            raise _Corrupt(f"{rel} does not match its sha256")

    with ThreadPoolExecutor(max(1, min(concurrency, len(files) or 1)), thread_name_prefix="ftcluster-get") as pool:
        futs = [pool.submit(one, rel, info) for rel, info in sorted(files.items())]
        errs = [f.exception() for f in futs]
    for e in errs:
        if isinstance(e, _Corrupt):
            raise e
    for e in errs:
        if e is not None:
            raise e


def fetch_dir(uri: str, storage_options: dict[str, Any] | None, cache_root: Path, *, concurrency: int = 8,
              retry_max_s: float = 600.0) -> Path:
    """A local copy of the folder at ``uri`` (a model or tokenizer), downloaded once per node.

    Local paths and file:// URIs are returned as they are. Remote folders go to
    ``cache_root/<name>-<hash of uri>-<hash of the listing>``: the first process takes a file
    lock and downloads, the others wait and reuse it; a ``.done`` marker beside the folder says
    it is complete. A folder published by ftcluster (with a manifest) is verified against it.
    """
    if is_local(uri):
        path = local_path(uri)
        if not path.exists():
            raise StorageError(f"{uri}: no such file or folder")
        return path
    fs, root = fs_and_path(uri, storage_options)
    deadline = time.monotonic() + retry_max_s
    listing = _retry_read(lambda: _listing(fs, root), uri, deadline)
    files = {p[len(root) + 1:]: {"size": int(i.get("size") or 0)} for p, i in listing.items()}
    if not files:
        raise StorageError(f"{uri}: no files there; check the path and that the credentials can list it")
    if "" in files:
        raise StorageError(f"{uri}: is a file; point at the folder that holds it")
    if MANIFEST in files:
        man = json.loads(_retry_read(lambda: fs.cat_file(f"{root}/{MANIFEST}"), uri, deadline))
        files = {**{rel: dict(i) for rel, i in man.get("files", {}).items()}, MANIFEST: files[MANIFEST]}
    version = hashlib.sha256(json.dumps(sorted(
        (p, i.get("size"), str(i.get("ETag") or i.get("etag") or i.get("mtime") or i.get("LastModified") or ""))
        for p, i in listing.items()), default=str).encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", root.rsplit("/", 1)[-1])[:40] or "root"
    key = f"{name}-{hashlib.sha256(uri.encode()).hexdigest()[:10]}-{version}"
    cache_root = Path(cache_root)
    dest, done = cache_root / key, cache_root / f"{key}{DONE_SUFFIX}"
    if done.exists():
        return dest
    with file_lock(cache_root / f"{key}.lock"):
        if done.exists():
            return dest
        partial = cache_root / f"{key}.partial"
        log.info("downloading %s (%d files) to %s", uri, len(files), dest)
        try:
            download_verified(fs, root, files, partial, concurrency, deadline)
        except _Corrupt as exc:
            raise StorageError(f"{uri}: {exc}; the folder changed during the download or is damaged") from exc
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(partial, dest)
        done.write_text(json.dumps({"uri": uri, "files": len(files)}))
    return dest


def _retry_read(fn: Callable[[], Any], what: str, deadline: float) -> Any:
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            delay = backoff_s(attempt, 1.0, 30.0)
            if time.monotonic() + delay > deadline:
                raise StorageError(f"{what}: cannot read: {one_line(exc)}; check the URI and credentials") from exc
            attempt += 1
            time.sleep(delay)


# ----------------------------------------------------------------------------- metrics


class MetricsWriter:
    """Keeps metrics.jsonl in a local file and uploads the whole (small) file in the background.

    Best effort: an upload that fails is logged and the next one carries everything. On resume
    (``resume_step > 0``) the stored file is downloaded first and records after ``resume_step``
    (from the interrupted attempt, about to be redone) are dropped. If the stored file cannot be
    read, this run writes ``metrics-from-step-N.jsonl`` instead of overwriting the history.
    """

    def __init__(self, uri: str, storage_options: dict[str, Any] | None, local_dir: Path, resume_step: int = 0,
                 relpath: str = "metrics.jsonl"):
        self.fs, root = fs_and_path(uri, storage_options)
        self.local_path = Path(local_dir) / relpath
        self.local_path.parent.mkdir(parents=True, exist_ok=True)
        self.remote = f"{root}/{relpath}"
        self.display = f"{uri.rstrip('/')}/{relpath}"
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ftcluster-metrics")
        self._pending: Future | None = None
        self._lock = threading.Lock()
        self._warned = False
        kept: list[str] = []
        if resume_step > 0:
            try:
                old = self.fs.cat_file(self.remote).decode("utf-8")
                kept = [ln for ln in old.splitlines() if ln.strip() and _record_step(ln) <= resume_step]
            except FileNotFoundError:
                pass
            except Exception as exc:  # noqa: BLE001 - keep training; do not clobber the stored history
                stem = relpath.rsplit(".", 1)[0]
                self.remote = f"{root}/{stem}-from-step-{resume_step:08d}.jsonl"
                self.display = f"{uri.rstrip('/')}/{stem}-from-step-{resume_step:08d}.jsonl"
                log.warning("could not read %s/%s (%s); this run writes %s", uri, relpath, one_line(exc),
                            self.display)
        self.local_path.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")

    def upload(self) -> Future:
        """Schedule an upload of the current file; coalesces with one that has not started yet."""
        with self._lock:
            if self._pending is not None and not self._pending.running() and not self._pending.done():
                return self._pending
            self._pending = self._pool.submit(self._upload)
            return self._pending

    def _upload(self) -> None:
        try:
            put_bytes(self.fs, self.remote, self.local_path.read_bytes())
            self._warned = False
        except Exception as exc:  # noqa: BLE001 - best effort; the next upload carries everything
            if not self._warned:
                log.warning("could not upload %s (%s); will retry at the next log", self.display, one_line(exc))
                self._warned = True

    def close(self, timeout: float | None = 60.0) -> None:
        """A last upload, waited for up to ``timeout`` seconds."""
        fut = self.upload()
        with contextlib.suppress(Exception):
            fut.result(timeout=timeout)
        self._pool.shutdown(wait=False)


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0) or 0)
    except (ValueError, AttributeError, TypeError):
        return 0
