"""A URI -> its fsspec filesystem and path, and the small file operations the storage layer shares.

Credentials never come from ``storage_options`` (the spec rejects them): s3fs/botocore read
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/an instance role, gcsfs reads
``GOOGLE_APPLICATION_CREDENTIALS``/workload identity.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from pathlib import Path
from typing import Any

from ..errors import StorageError

# The package an fsspec protocol needs, for the "pip install" hint.
PROTOCOL_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


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
        pkg = PROTOCOL_PACKAGES.get(protocol)
        raise StorageError(f"{uri}: {protocol}:// needs the {pkg or 'matching fsspec'} package; "
                           f"pip install {pkg or 'it'} ({exc})") from exc
    except (ValueError, TypeError) as exc:
        raise StorageError(f"{uri}: cannot open this URI with storage_options {sorted(storage_options or {})}: "
                           f"{one_line(exc)}") from exc
    return fs, path.rstrip("/")


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, at most 300 characters."""
    text = str(exc).strip().splitlines()
    msg = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return msg if len(msg) <= 300 else msg[:297] + "..."


def is_local_fs(fs: Any) -> bool:
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
    if is_local_fs(fs):
        fs.makedirs(fs._parent(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, data)


def put_file(fs: Any, src: Path, dest: str) -> None:
    """Upload one local file (a local destination gets its folders first; object stores need none)."""
    if is_local_fs(fs):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
    fs.put_file(str(src), dest)


def listing(fs: Any, root: str) -> dict[str, dict[str, Any]]:
    """Every file under root -> its info (one LIST on object stores); {} when root does not exist."""
    with contextlib.suppress(Exception):
        fs.invalidate_cache(root)
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    return {p: i for p, i in found.items() if i.get("type", "file") != "directory"}


def rm_if_exists(fs: Any, path: str) -> None:
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
