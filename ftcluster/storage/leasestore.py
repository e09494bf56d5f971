"""The lease object of an output URI and conditional access to it (docs/storage.md, "One writer per output").

:class:`LeaseRecord` is ``<output.uri>/.ftcluster/lease.json``; :func:`store_for` picks how a store is
written conditionally: S3's ``If-None-Match``/``If-Match``, ``link()`` and ``flock`` on a local disk,
write-and-read-back elsewhere. :mod:`.lease` takes, renews and releases the lease with them.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from .layout import LEASE, LEASE_LOCK
from .uri import fs_and_path, is_local, local_path

FORMAT = "ftcluster.lease/1"


class Conflict(Exception):
    """A conditional write or delete found the lease changed (or, creating, present)."""


@dataclass(frozen=True)
class LeaseRecord:
    """The content of ``lease.json`` (no secrets: ids, host, pid, times, version)."""

    holder: str
    token: str  # random per taking: tells this process's lease from a restarted one of the same holder
    run_id: str | None
    job_id: str | None
    host: str
    pid: int
    acquired_unix: float
    renewed_unix: float
    expires_unix: float
    ttl_s: float
    ftcluster_version: str
    format: str = FORMAT

    def expired(self, now: float) -> bool:
        return now >= self.expires_unix

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def parse(cls, data: bytes) -> LeaseRecord | None:
        """The record, or None for anything unreadable (treated as expired: it cannot name a holder)."""
        try:
            doc = json.loads(data)
            if doc.get("format") != FORMAT:
                return None
            return cls(**{k: doc[k] for k in cls.__dataclass_fields__})
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def who(self) -> str:
        """``run X (job J) on host H (pid P)``."""
        name = f"run {self.run_id}" if self.run_id else f"holder {self.holder}"
        job = f" (job {self.job_id})" if self.job_id and self.job_id != self.run_id else ""
        return f"{name}{job} on host {self.host} (pid {self.pid})"


# ----------------------------------------------------------------------------- store access


class Store:
    """Conditional access to one lease object. ``version`` is what a conditional write compares."""

    def read(self) -> tuple[LeaseRecord | None, Any, bool]:
        """(record or None, version, present)."""
        raise NotImplementedError

    def create(self, data: bytes) -> Any:
        raise NotImplementedError

    def replace(self, data: bytes, version: Any) -> Any:
        raise NotImplementedError

    def delete(self, version: Any) -> None:
        raise NotImplementedError


class LocalStore(Store):
    """A local path: create by ``link()`` (atomic, fails if present); compare-and-swap under ``flock``.

    The lock is the output folder itself (a directory can be flocked on local filesystems), so nothing
    is left behind; where that fails (NFS emulates flock with POSIX locks, which need a file open for
    writing) the lock is ``.ftcluster/lease.lock``, a file that then stays: removing it could let two
    processes hold "the" lock at once (one on the removed file, one on a new one).
    """

    def __init__(self, root: str):
        self.root = root
        self.path = os.path.join(root, LEASE)
        self.folder = os.path.dirname(self.path)
        self.lock_path = os.path.join(root, LEASE_LOCK)

    @contextlib.contextmanager
    def _locked(self):
        import fcntl

        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.root, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            os.close(fd)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _bytes(self) -> bytes | None:
        try:
            with open(self.path, "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    def read(self) -> tuple[LeaseRecord | None, Any, bool]:
        data = self._bytes()
        return (None if data is None else LeaseRecord.parse(data)), data, data is not None

    def _private(self, data: bytes) -> str:
        tmp = f"{self.path}.{os.getpid()}-{threading.get_ident()}-{secrets.token_hex(4)}"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return tmp

    def create(self, data: bytes) -> Any:
        os.makedirs(self.folder, exist_ok=True)
        try:
            tmp = self._private(data)
        except FileNotFoundError:  # .ftcluster/ removed by a release meanwhile: go again
            raise Conflict() from None
        try:
            os.link(tmp, self.path)  # the O_EXCL of a complete file: fails when a lease is there
        except (FileExistsError, FileNotFoundError):
            raise Conflict() from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return data

    def replace(self, data: bytes, version: Any) -> Any:
        with self._locked():
            if self._bytes() != version:
                raise Conflict()
            tmp = self._private(data)
            os.replace(tmp, self.path)
        return data

    def delete(self, version: Any) -> None:
        with self._locked():
            if self._bytes() != version:
                raise Conflict()
            os.unlink(self.path)
            with contextlib.suppress(OSError):  # only when empty (no lock file, no taker's file in it)
                os.rmdir(self.folder)


def _precondition_failed(exc: BaseException) -> bool:
    """S3 answered 412 PreconditionFailed (or 409 ConditionalRequestConflict: a concurrent conditional write)."""
    if isinstance(exc, FileExistsError):  # s3fs's answer to a failed If-None-Match
        return True
    cur: BaseException | None = exc
    for _ in range(8):
        if cur is None:
            break
        resp = getattr(cur, "response", None)
        if isinstance(resp, dict):
            code = str((resp.get("Error") or {}).get("Code") or "")
            status = (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return True
        if "pre-conditions you specified did not hold" in str(cur):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _missing_key(exc: BaseException) -> bool:
    """A conditional write or delete of an object that is gone (404 NoSuchKey, not a missing bucket)."""
    return isinstance(exc, FileNotFoundError) and "bucket" not in str(exc).lower()


class S3Store(Store):
    """S3 through s3fs: If-None-Match to create, If-Match on the ETag to replace and delete."""

    def __init__(self, fs: Any, root: str):
        self.fs = fs
        self.path = f"{root}/{LEASE}"

    def read(self) -> tuple[LeaseRecord | None, Any, bool]:
        # The ETag first, then the body: if the object changes in between, a write conditional on that
        # ETag fails, so a decision taken on a newer body is never written over an even newer one.
        self.fs.invalidate_cache(self.path)
        try:
            etag = self.fs.info(self.path)["ETag"]
            data = self.fs.cat_file(self.path)
        except FileNotFoundError as exc:
            if "bucket" in str(exc).lower():
                raise
            return None, None, False
        return LeaseRecord.parse(data), etag, True

    def _put(self, data: bytes, **cond: Any) -> Any:
        try:
            out = self.fs.pipe_file(self.path, data, **cond)
        except Exception as exc:  # noqa: BLE001 - a failed condition is the answer, anything else is raised
            if _precondition_failed(exc) or (_missing_key(exc) and "IfMatch" in cond):
                raise Conflict() from exc
            raise
        self.fs.invalidate_cache(self.path)
        etag = out.get("ETag") if isinstance(out, dict) else None
        if etag is None:  # an s3fs that does not return PutObject's answer: ask
            etag = self.fs.info(self.path)["ETag"]
        return etag

    def create(self, data: bytes) -> Any:
        return self._put(data, mode="create")

    def replace(self, data: bytes, version: Any) -> Any:
        return self._put(data, IfMatch=version)

    def delete(self, version: Any) -> None:
        bucket, key, _ = self.fs.split_path(self.path)
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
        except Exception as exc:  # noqa: BLE001
            if _precondition_failed(exc) or _missing_key(exc):
                raise Conflict() from exc
            raise
        self.fs.invalidate_cache(self.path)


class BestEffortStore(Store):
    """Any other fsspec store: write, then read back (docs: a race within one round trip can go unseen)."""

    def __init__(self, fs: Any, root: str):
        self.fs = fs
        self.path = f"{root}/{LEASE}"

    def read(self) -> tuple[LeaseRecord | None, Any, bool]:
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(self.path)
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None, None, False
        return LeaseRecord.parse(data), data, True

    def _write_and_check(self, data: bytes) -> Any:
        self.fs.pipe_file(self.path, data)
        time.sleep(0.2)  # let a concurrent writer's PUT land before reading back
        _, got, _ = self.read()
        if got != data:
            raise Conflict()
        return data

    def create(self, data: bytes) -> Any:
        if self.read()[2]:
            raise Conflict()
        return self._write_and_check(data)

    def replace(self, data: bytes, version: Any) -> Any:
        if self.read()[1] != version:
            raise Conflict()
        return self._write_and_check(data)

    def delete(self, version: Any) -> None:
        if self.read()[1] != version:
            raise Conflict()
        self.fs.rm_file(self.path)


def store_for(uri: str, storage_options: dict[str, Any] | None, fs: Any = None) -> Store:
    if is_local(uri) and fs is None:
        return LocalStore(str(local_path(uri)))
    fs_, root = fs_and_path(uri, storage_options)
    fs = fs if fs is not None else fs_
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "s3" in protocols or "s3a" in protocols:
        return S3Store(fs, root)
    if "file" in protocols or "local" in protocols:
        return LocalStore(root)
    return BestEffortStore(fs, root)


def read_lease(uri: str, storage_options: dict[str, Any] | None = None, *, fs: Any = None) -> LeaseRecord | None:
    """The lease stored under ``uri`` (None: none, or unreadable); one attempt, errors raised as they come."""
    return store_for(uri, storage_options, fs).read()[0]
