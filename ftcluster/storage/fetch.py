"""Verified downloads: a committed folder into a fresh local folder, and a once-per-node model cache."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..errors import StorageError
from .layout import MANIFEST
from .retry import DEFAULT_POLICY, END_OF_RUN_S, RetryPolicy, call
from .uri import file_sha256, fs_and_path, is_local, listing, local_path

log = logging.getLogger("ftcluster.storage")

DONE_SUFFIX = ".done"


class Corrupt(Exception):
    """A committed folder whose content does not match its manifest."""


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


def download_verified(fs: Any, src: str, files: dict[str, dict[str, Any]], dest: Path, concurrency: int,
                      deadline: float, policy: RetryPolicy = DEFAULT_POLICY, where: str | None = None) -> None:
    """Download ``files`` (rel -> {size, sha256?}) from ``src`` into a fresh ``dest`` and verify them.

    Raises Corrupt for a missing file or a size/sha256 mismatch, StorageError for a permanent
    error or when the store stays unreachable past ``deadline``.
    """
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    base = (where or src).rstrip("/")

    def one(rel: str, info: dict[str, Any]) -> None:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            call(lambda: fs.get_file(f"{src}/{rel}", str(target)), f"{base}/{rel}", "download", deadline=deadline,
                 policy=policy)
        except StorageError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):  # listed by the manifest, gone from the store
                raise Corrupt(f"{rel} is missing") from exc
            raise
        size = target.stat().st_size
        if "size" in info and size != int(info["size"]):
            raise Corrupt(f"{rel} has {size} bytes, the manifest says {info['size']}")
        if info.get("sha256") and file_sha256(target) != info["sha256"]:
            raise Corrupt(f"{rel} does not match its sha256")

    with ThreadPoolExecutor(max(1, min(concurrency, len(files) or 1)), thread_name_prefix="ftcluster-get") as pool:
        futs = [pool.submit(one, rel, info) for rel, info in sorted(files.items())]
        errs = [f.exception() for f in futs]
    for e in errs:
        if isinstance(e, Corrupt):
            raise e
    for e in errs:
        if e is not None:
            raise e


def fetch_dir(uri: str, storage_options: dict[str, Any] | None, cache_root: Path, *, concurrency: int = 8,
              retry_max_s: float = END_OF_RUN_S) -> Path:
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
    found = call(lambda: listing(fs, root), uri, "listing", deadline=deadline)
    files = {p[len(root) + 1:]: {"size": int(i.get("size") or 0)} for p, i in found.items()}
    if not files:
        raise StorageError(f"{uri}: no files there; check the path and that the credentials can list it")
    if "" in files:
        raise StorageError(f"{uri}: is a file; point at the folder that holds it")
    if MANIFEST in files:
        man = json.loads(call(lambda: fs.cat_file(f"{root}/{MANIFEST}"), f"{uri}/{MANIFEST}", "reading",
                              deadline=deadline))
        files = {**{rel: dict(i) for rel, i in man.get("files", {}).items()}, MANIFEST: files[MANIFEST]}
    version = hashlib.sha256(json.dumps(sorted(
        (p, i.get("size"), str(i.get("ETag") or i.get("etag") or i.get("mtime") or i.get("LastModified") or ""))
        for p, i in found.items()), default=str).encode()).hexdigest()[:12]
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
            download_verified(fs, root, files, partial, concurrency, deadline, where=uri)
        except Corrupt as exc:
            raise StorageError(f"{uri}: {exc}; the folder changed during the download or is damaged") from exc
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(partial, dest)
        done.write_text(json.dumps({"uri": uri, "files": len(files)}))
    return dest
