"""Asynchronous checkpoint writes: a fast capture on the training thread, the file writes behind it.

An engine's ``save`` hands every state object to :meth:`CheckpointWriter.capture`, which copies
each tensor to host memory (CUDA tensors into pinned buffers reused from one checkpoint to the
next, CPU tensors cloned, since training goes on mutating them; everything else deep-copied),
and queues the serialisation with :meth:`CheckpointWriter.write`. :meth:`CheckpointWriter.finish`
waits once for the device copies and runs the queued writes on one background thread, then a
continuation the checkpoint manager supplies (which starts the upload: the commit protocol,
files first and manifest last, is unchanged). One checkpoint's writes are in flight at a time:
:meth:`CheckpointWriter.idle` waits for the previous one before a new capture reuses the buffers.

Pinning host memory is slow the first time (~1 GB/s on the lent H200 machines: the pages are
faulted in, then locked), and an 8B ZeRO checkpoint copies ~50 GB per process, so
:meth:`CheckpointWriter.reserve` pins an arena of the expected size on the writer thread
while training starts (faulted in with the GIL released, then registered with CUDA); the first
capture takes its buffers from it instead of pinning them while training waits.

``FTCLUSTER_ASYNC_CKPT=0`` makes the writer synchronous: ``capture`` returns its argument and
``write`` runs at once, exactly the saves of before (docs/training.md, "Checkpoints").
"""

from __future__ import annotations

import copy
import ctypes
import logging
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

log = logging.getLogger("ftcluster.train")

ENV = "FTCLUSTER_ASYNC_CKPT"
RESERVE_MIN = 1 << 30  # smaller states pin fast enough at the first checkpoint
RESERVE_MARGIN = 1.1  # over the engine's estimate (tied embeddings saved twice, buffers, padding)
HOST_SHARE = 0.5  # of the host's memory that this node's processes may pin ahead, together
ALIGN = 512


def async_enabled(env: Mapping[str, str] = os.environ) -> bool:
    """On unless ``FTCLUSTER_ASYNC_CKPT=0``."""
    return env.get(ENV, "1").strip() != "0"


class CheckpointWriter:
    """Captures checkpoint state to host memory and writes it in the background (one rank).

    ``hook`` (tests): called with the name of each write on the writer thread, before it runs;
    it may sleep (a slow disk) or raise (a failed write).
    """

    def __init__(self, deferred: bool, device: Any = None, hook: Callable[[str], None] | None = None):
        self.deferred = deferred
        self.device = device
        self.hook = hook
        self._writes: list[tuple[str, Callable[[], None]]] = []
        self._buffers: list[Any] = []  # pinned host copies of CUDA tensors, in capture order
        self._used = 0  # buffers handed out by the capture under way
        self._cuda = False  # the capture under way copied from the GPU
        self._pinned_logged = False
        self._last: Future | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ftcluster-ckpt-write") if deferred else None
        self._arena: Any = None  # pinned host bytes reserved ahead of the first capture
        self._arena_at = 0
        self._arena_future: Future | None = None

    def reserve(self, nbytes: int, local_procs: int = 1) -> int:
        """Pin about ``nbytes`` of host memory on the writer thread now, for the first checkpoint's
        copies (CUDA, deferred writes, at least RESERVE_MIN); at most HOST_SHARE of the host's
        memory split across ``local_procs``. Returns the bytes being pinned (0: none)."""
        if not self.deferred or self._pool is None or getattr(self.device, "type", None) != "cuda":
            return 0
        if os.environ.get("FTCLUSTER_PIN_AHEAD", "1").strip() == "0":  # benchmarks: the first capture pins
            return 0
        if nbytes < RESERVE_MIN:
            return 0
        nbytes = int(min(RESERVE_MARGIN * nbytes, HOST_SHARE * _host_bytes() / max(local_procs, 1)))
        if nbytes < RESERVE_MIN:
            return 0
        self._arena_future = self._pool.submit(self._pin_arena, nbytes)
        return nbytes

    # -- the training thread ---------------------------------------------------------
    def capture(self, obj: Any) -> Any:
        """A host copy of ``obj`` that training cannot change any more (deferred), else ``obj``."""
        return self._copy(obj) if self.deferred else obj

    def write(self, name: str, fn: Callable[[], None]) -> None:
        """Run ``fn`` (a serialisation of captured state) now, or queue it for :meth:`finish`."""
        if self.deferred:
            self._writes.append((name, fn))
        else:
            fn()

    def idle(self) -> None:
        """Wait until the previous checkpoint's writes and continuation ran (its errors are its future's)."""
        if self._last is not None:
            self._last.exception()

    def finish(self, then: Callable[[BaseException | None], Any]) -> Future:
        """Start the queued writes in the background; ``then(error)`` runs after them on the writer
        thread and its return value is the returned future's result (deferred only)."""
        assert self._pool is not None, "finish() is for a deferred writer"
        self._sync()
        writes, self._writes, self._used = self._writes, [], 0
        self._last = self._pool.submit(self._run, writes, then)
        return self._last

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


    # -- the writer thread -------------------------------------------------------------
    def _run(self, writes: list[tuple[str, Callable[[], None]]], then: Callable[[BaseException | None], Any]) -> Any:
        error: BaseException | None = None
        for name, fn in writes:
            try:
                if self.hook is not None:
                    self.hook(name)
                fn()
            except Exception as exc:  # noqa: BLE001 - handed to the continuation, which reports it
                error = exc
                break
        return then(error)

    def _pin_arena(self, nbytes: int) -> None:
        """Writer thread: the arena, or a warning and none (the first capture then pins as before)."""
        import torch

        t0 = time.monotonic()
        try:
            arena = torch.empty(nbytes, dtype=torch.uint8)
            step = 256 << 20
            for at in range(0, nbytes, step):  # fault the pages in; ctypes releases the GIL per call
                ctypes.memset(arena.data_ptr() + at, 0, min(step, nbytes - at))
            rc = torch.cuda.cudart().cudaHostRegister(arena.data_ptr(), nbytes, 0)
            ok = int(getattr(rc, "value", rc)) == 0 and arena.is_pinned()
            why = f"cudaHostRegister: {rc}"
        except Exception as exc:  # noqa: BLE001 - host memory short, no CUDA runtime: not a reason to stop training
            ok, why = False, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if not ok:
            log.warning("asynchronous checkpoints: could not pin %.1f GB ahead (%s); the first checkpoint pins "
                        "its buffers", nbytes / 1e9, why)
            return
        self._arena = arena
        log.info("asynchronous checkpoints: %.1f GB of host memory pinned ahead of the first checkpoint in %.1f s",
                 nbytes / 1e9, time.monotonic() - t0)

    def _from_arena(self, t: Any) -> Any:
        """A pinned buffer shaped like ``t`` carved from the reserved arena, or None when it is used up."""
        if self._arena_future is not None:
            self._arena_future.result()  # the reservation finishes first (it is under way already)
            self._arena_future = None
        if self._arena is None:
            return None
        n = t.numel() * t.element_size()
        if self._arena_at + n > self._arena.numel():
            return None
        buf = self._arena[self._arena_at:self._arena_at + n].view(t.dtype).view(t.shape)
        self._arena_at += -(-max(n, 1) // ALIGN) * ALIGN
        return buf

    # -- capture -------------------------------------------------------------------------
    def _copy(self, obj: Any) -> Any:
        import torch

        if isinstance(obj, torch.Tensor):
            return self._tensor(obj)
        if isinstance(obj, dict):
            out = copy.copy(obj)  # keeps the dict's type (OrderedDict, defaultdict's factory)
            for k, v in obj.items():
                out[k] = self._copy(v)
            return out
        if type(obj) in (list, tuple):
            return type(obj)(self._copy(v) for v in obj)
        if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
            return obj
        try:
            return copy.deepcopy(obj)
        except Exception:  # noqa: BLE001 - an object that cannot be copied (a handle): training does not mutate those
            return obj

    def _tensor(self, t: Any) -> Any:
        import torch

        t = t.detach()
        if t.device.type != "cuda":
            return t.clone()
        if self._used < len(self._buffers):
            buf = self._buffers[self._used]
            if buf.shape != t.shape or buf.dtype != t.dtype:
                buf = self._buffers[self._used] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        else:
            buf = self._from_arena(t)
            if buf is None:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self._buffers.append(buf)
        self._used += 1
        buf.copy_(t, non_blocking=True)
        self._cuda = True
        return buf

    def _sync(self) -> None:
        """Wait for the device-to-host copies (one sync per checkpoint), log the pinned size once."""
        if not self._cuda:
            return
        import torch

        torch.cuda.synchronize(self.device)
        self._cuda = False
        if not self._pinned_logged:
            self._pinned_logged = True
            gb = sum(b.numel() * b.element_size() for b in self._buffers) / 1e9
            ahead = f", {self._arena_at / 1e9:.2f} GB of it from the {self._arena.numel() / 1e9:.2f} GB pinned ahead" \
                if self._arena is not None else ""
            log.info("asynchronous checkpoints: %.2f GB of pinned host memory per process for the state copy%s "
                     "(%s=0 saves synchronously)", gb, ahead, ENV)


def _host_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def deferred_ds_checkpoint_engine(inner: Any, writer: CheckpointWriter) -> Any:
    """DeepSpeed's TorchCheckpointEngine with ``save`` captured and deferred to ``writer``.

    DeepSpeed writes every file of ``save_checkpoint`` through ``engine.checkpoint_engine.save``;
    the rest (makedirs, ``commit``, barriers, the recovery scripts) stays with ``inner``.
    """
    import torch

    class _Deferred:
        def __getattr__(self, name: str) -> Any:
            return getattr(inner, name)

        def save(self, state_dict: Any, path: str) -> None:
            state = writer.capture(state_dict)
            zipfile = getattr(inner, "zipfile_serialization", True)
            writer.write(path, lambda: torch.save(state, path, _use_new_zipfile_serialization=zipfile))

        def preserves_storage_sharing(self) -> bool:
            # DeepSpeed clones views before save so torch.save writes only their part of a storage;
            # capture already copies each tensor into its own compact buffer.
            return False

    return _Deferred()
