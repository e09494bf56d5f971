"""safetensors files read and written one tensor at a time with plain file reads and writes.

The format (https://github.com/huggingface/safetensors#format): an 8-byte little-endian header
length, a JSON header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{...}}`` whose offsets count from the end of the header, then the tensors' bytes, contiguous.

No mmap and no ``safe_open`` on purpose: pages of a mapped file count towards the process's RSS
(and a memory limit) as they are touched, so a merge that maps a 16 GB shard can hold all of it.
Here a tensor is read with ``readinto`` into a buffer the size of that tensor, and a shard is
written by writing its header first (the shapes and dtypes are known before any byte is) and then
each tensor's bytes in header order. Little-endian hosts only, like the format.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import TrainError

# The dtype names of the format and their torch names (torch attributes, resolved at use).
DTYPES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
SIZES: dict[str, int] = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
                         "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOATS = frozenset({"F64", "F32", "F16", "BF16"})


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: its dtype name, shape and byte range in the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A parsed safetensors header: the tensors in file order, the metadata, where the data starts."""

    path: Path
    entries: dict[str, Entry]
    metadata: dict[str, str]
    data_start: int


def nbytes(dtype: str, shape: Iterable[int]) -> int:
    n = SIZES[dtype]
    for d in shape:
        n *= int(d)
    return n


def torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, DTYPES[name])


def st_dtype(dtype: Any) -> str:
    """The format's name of a torch dtype."""
    want = str(dtype).removeprefix("torch.")
    for k, v in DTYPES.items():
        if v == want:
            return k
    raise TrainError(f"dtype {dtype}: not one safetensors stores ({', '.join(DTYPES)})")


def read_header(path: Path) -> Header:
    """The header of ``path`` (8 + header-length bytes read; no tensor data)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise TrainError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (length,) = struct.unpack("<Q", raw)
            if length > 100 * 2**20:
                raise TrainError(f"{path}: not a safetensors file (header length {length} bytes)")
            header = json.loads(f.read(length))
    except (OSError, ValueError) as exc:
        raise TrainError(f"{path}: cannot read its safetensors header: {str(exc).splitlines()[0]}") from None
    metadata = header.pop("__metadata__", None) or {}
    entries = []
    for name, d in header.items():
        if d["dtype"] not in SIZES:
            raise TrainError(f"{path}: tensor {name} has dtype {d['dtype']}, which this merge does not handle")
        begin, end = (int(x) for x in d["data_offsets"])
        shape = tuple(int(x) for x in d["shape"])
        if end - begin != nbytes(d["dtype"], shape):
            raise TrainError(f"{path}: tensor {name}: {end - begin} bytes for a {d['dtype']}{list(shape)}")
        entries.append(Entry(name, d["dtype"], shape, begin, end))
    entries.sort(key=lambda e: e.begin)
    return Header(path, {e.name: e for e in entries}, dict(metadata), 8 + length)


def read_tensor(f: BinaryIO, header: Header, name: str) -> Any:
    """Tensor ``name`` of the open file ``f`` (``header``'s), in a buffer of its own (not mapped)."""
    import torch

    e = header.entries[name]
    buf = torch.empty(e.nbytes, dtype=torch.uint8)
    f.seek(header.data_start + e.begin)
    view = memoryview(buf.numpy())
    got = 0
    while got < e.nbytes:  # readinto may return short reads on some file systems
        n = f.readinto(view[got:])
        if not n:
            raise TrainError(f"{header.path}: truncated: tensor {name} ends past the end of the file")
        got += n
    return buf.view(torch_dtype(e.dtype)).reshape(e.shape)


def read_all(path: Path) -> dict[str, Any]:
    """Every tensor of a (small) file, e.g. an adapter."""
    header = read_header(path)
    with open(path, "rb") as f:
        return {name: read_tensor(f, header, name) for name in header.entries}


class ShardWriter:
    """Writes one safetensors file whose tensors (name, dtype name, shape) are declared up front:
    the header goes out first, then :meth:`write` takes each tensor in the declared order."""

    def __init__(self, path: Path, specs: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]):
        header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        self._order: list[tuple[str, str, tuple[int, ...], int]] = []
        for name, dtype, shape in specs:
            n = nbytes(dtype, shape)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            self._order.append((name, dtype, shape, n))
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # as safetensors pads it: the data section starts 8-byte aligned
        self.path, self.size, self._next = path, offset, 0
        self._f = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: Any) -> None:
        """The next declared tensor's bytes (its dtype and shape must be the declared ones)."""
        want, dtype, shape, n = self._order[self._next]
        if name != want or tuple(tensor.shape) != shape or st_dtype(tensor.dtype) != dtype:
            raise TrainError(f"{self.path}: writing {name} {st_dtype(tensor.dtype)}{list(tensor.shape)} where "
                             f"{want} {dtype}{list(shape)} was declared (a bug in the merge)")
        if n:
            self._f.write(memoryview(tensor.contiguous().reshape(-1).view(_u8()).numpy()))
        self._next += 1

    def abort(self) -> None:
        """Close and delete the unfinished file (the merge failed)."""
        self._f.close()
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        self._f.close()
        if self._next != len(self._order):
            raise TrainError(f"{self.path}: {len(self._order) - self._next} declared tensors were not written")


def _u8() -> Any:
    import torch

    return torch.uint8
