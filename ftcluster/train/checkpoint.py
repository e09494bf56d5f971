"""Resumable checkpoints: snapshot locally (fast), upload in the background, commit last.

Layout of one snapshot (a node-local folder, then ``{output.uri}/checkpoints/step-NNNNNNNN/``)::

    state.json              step, tokens seen, world size, engine kind, forgetting baseline (rank 0)
    rank-00000.pt ...       per rank: RNG states (python, numpy, torch, cuda) and data iterator state
    engine/                 PlainEngine: trainable.safetensors + optimizer.pt (rank 0)
                            DeepSpeedEngine: ds/ with every rank's ZeRO shards
    manifest.json           written by the store LAST: the checkpoint is committed only then

Protocol (documented in docs/training.md):

* Single node (all ranks share the node's disk): every rank writes its files, a barrier,
  then rank 0 alone commits the folder with ``CheckpointStore.commit_async``; training goes
  on while it uploads.
* Several nodes (node-local disks): every node's local rank 0 uploads the files its node
  wrote into the same step folder, without a manifest, in the background. Each step the
  loop's MAX all-reduce carries a "this node is still uploading" flag next to the stop
  flag; once it is 0 everywhere, all ranks all-gather each node's file list and outcome
  (a barrier with status) and rank 0 writes the manifest listing every node's files, only
  when every node succeeded. The final save (end or preemption) waits for all of that.
* Resume: rank 0 asks the store for the newest *committed* checkpoint (a corrupt or
  half-uploaded one is skipped) and broadcasts its step; on every node local rank 0
  downloads that step and all ranks load from the node-local copy.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import random
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import TrainError

log = logging.getLogger("ftcluster.train")


# ----------------------------------------------------------------------------- RNG


def rng_state(device: Any) -> dict[str, Any]:
    import numpy as np
    import torch

    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(st: dict[str, Any], device: Any) -> None:
    import numpy as np
    import torch

    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- multi-node uploads


@dataclass
class _Awaiting:
    step: int
    meta: dict[str, Any]
    final: bool
    future: Future | None  # this node's upload (node leaders only)


class NodeUploader:
    """One node's share of a multi-node checkpoint: upload its files into the step folder (no
    manifest), and on rank 0 write the manifest listing every node's files, then prune.

    Uses the store's filesystem and its commit format, so ``CheckpointStore.restore_latest``
    and ``committed`` treat these checkpoints like single-node ones.
    """

    def __init__(self, store: Any):
        self.store = store
        self._serial = ThreadPoolExecutor(1, thread_name_prefix="ftcluster-node-commit")
        self._pool = ThreadPoolExecutor(max(1, store.concurrency), thread_name_prefix="ftcluster-node-put")

    def _dest(self, step: int) -> str:
        return f"{self.store.root}/{self.store.prefix}/step-{step:08d}"

    def submit(self, step: int, folder: Path, final: bool) -> Future:
        deadline = time.monotonic() + self.store.retry_max_s if final else None
        return self._serial.submit(self._upload, step, folder, deadline)

    def _upload(self, step: int, folder: Path, deadline: float | None) -> dict[str, Any]:
        from .storage import scan_local

        files = scan_local(folder)
        dest = self._dest(step)
        pending, attempt = dict(files), 0
        while pending:
            futs = {rel: self._pool.submit(self._put, folder / rel, f"{dest}/{rel}") for rel in pending}
            failed = {rel: fut.exception() for rel, fut in futs.items() if fut.exception() is not None}
            pending = {rel: files[rel] for rel in failed}
            if pending:
                self._backoff(next(iter(failed.values())), attempt, deadline, f"{len(pending)} file(s) of step {step}")
                attempt += 1
        shutil.rmtree(folder, ignore_errors=True)
        return files

    def _put(self, src: Path, dest: str) -> None:
        from .storage import _is_local_fs

        if _is_local_fs(self.store.fs):
            os.makedirs(os.path.dirname(dest), exist_ok=True)
        self.store.fs.put_file(str(src), dest)

    def _backoff(self, exc: BaseException, attempt: int, deadline: float | None, what: str) -> None:
        from ..errors import StorageError
        from .storage import backoff_s, one_line

        delay = backoff_s(attempt, self.store.retry_base_s, self.store.retry_cap_s)
        if deadline is not None and time.monotonic() + delay > deadline:
            raise StorageError(f"{self.store.uri}: upload of {what} failed: {one_line(exc)}")
        if attempt % 10 == 0:
            log.warning("upload of %s failed (%s); retrying in %.1f s", what, one_line(exc), delay)
        time.sleep(delay)

    def write_manifest(self, step: int, files: dict[str, Any], meta: dict[str, Any], final: bool) -> Future:
        deadline = time.monotonic() + self.store.retry_max_s if final else None
        return self._serial.submit(self._write_manifest, step, files, meta, deadline)

    def _write_manifest(self, step: int, files: dict[str, Any], meta: dict[str, Any], deadline: float | None) -> None:
        from .. import __version__
        from .storage import MANIFEST, MANIFEST_FORMAT, put_bytes

        man = {"format": MANIFEST_FORMAT, "kind": "checkpoint", "step": step, "meta": meta,
               "files": dict(sorted(files.items())), "total_bytes": sum(i["size"] for i in files.values()),
               "ftcluster_version": __version__, "created_unix": round(time.time(), 3)}
        data = json.dumps(man, indent=1, sort_keys=True, default=str).encode()
        attempt = 0
        while True:
            try:
                put_bytes(self.store.fs, f"{self._dest(step)}/{MANIFEST}", data)
                break
            except Exception as exc:  # noqa: BLE001 - retried like the files
                self._backoff(exc, attempt, deadline, f"the manifest of step {step}")
                attempt += 1
        log.info("committed %s (%d files from every node)", self.store.step_uri(step), len(files))
        try:
            self.store._prune()
        except Exception as exc:  # noqa: BLE001 - housekeeping; the next commit retries it
            log.warning("could not prune old checkpoints: %s", exc)


# ----------------------------------------------------------------------------- checkpointer


class Checkpointer:
    """Writes snapshots and drives the store. All methods are called on every rank."""

    def __init__(self, store: Any, ctx: Any, work_dir: Path):
        self.store = store
        self.ctx = ctx  # runtime.DistContext
        self.work_dir = work_dir
        self._pending: list[Future] = []
        self._awaiting: list[_Awaiting] = []  # multi-node: uploaded or uploading, manifest not yet written
        self._nodes: NodeUploader | None = None
        self._errors: list[str] = []

    # -- save ------------------------------------------------------------------
    def snapshot(self, step: int, engine: Any, shared: dict[str, Any], per_rank: dict[str, Any]) -> Path:
        """Write the state of every rank into the node-local folder for ``step`` (collective)."""
        import torch

        ctx = self.ctx
        folder = self.work_dir / f"step-{step:08d}"
        if ctx.local_rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
            (folder / "engine").mkdir(parents=True)
        ctx.barrier()
        engine.save(folder / "engine", ctx.rank)
        torch.save({**per_rank, "rng": rng_state(ctx.device)}, folder / f"rank-{ctx.rank:05d}.pt")
        if ctx.rank == 0:
            (folder / "state.json").write_text(json.dumps(shared, indent=1, sort_keys=True))
        ctx.barrier()  # every file of every rank is on the node's disk
        return folder

    def commit(self, step: int, folder: Path, meta: dict[str, Any], final: bool) -> None:
        """Start uploading ``folder`` as checkpoint ``step``; returns at once (collective)."""
        ctx = self.ctx
        if ctx.nnodes == 1:
            if ctx.rank == 0:
                self._pending.append(self.store.commit_async(step, folder, meta, final=final))
            return
        fut = None
        if ctx.local_rank == 0:
            if self._nodes is None:
                self._nodes = NodeUploader(self.store)
            fut = self._nodes.submit(step, folder, final)
        self._awaiting.append(_Awaiting(step, meta, final, fut))

    def busy(self) -> int:
        """1 while this node's oldest uncommitted multi-node upload is still running (for the step's all-reduce)."""
        if not self._awaiting:
            return 0
        fut = self._awaiting[0].future
        return 0 if fut is None or fut.done() else 1

    def commit_ready(self) -> None:
        """After the all-reduced ``busy()`` came back 0: commit the oldest awaiting checkpoint (collective)."""
        if self._awaiting:
            self._finalize(self._awaiting.pop(0))

    def _finalize(self, item: _Awaiting) -> None:
        """Every node reports its uploaded files; rank 0 writes the manifest only if all succeeded."""
        import torch.distributed as dist

        ctx = self.ctx
        mine: tuple[int, Any, str | None] = (ctx.node_rank, None, None)
        if item.future is not None:
            exc = item.future.exception()
            mine = (ctx.node_rank, None if exc else item.future.result(), None if exc is None else str(exc))
        reports: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(reports, mine, group=ctx.ctl_group)
        errors = [f"node {n}: {e}" for n, _, e in reports if e]
        if errors:
            msg = f"checkpoint step {item.step} was not committed: " + "; ".join(sorted(set(errors)))
            if item.final:
                self._errors.append(msg)
            log.warning("%s", msg)
            return
        if ctx.rank == 0:
            files: dict[str, Any] = {}
            for _, f, _ in reports:
                files.update(f or {})
            self._pending.append(self._nodes.write_manifest(item.step, files, item.meta, item.final))

    def wait(self) -> None:
        """Block until every started commit finished; raise if a final one failed (collective)."""
        errors: list[str] = []
        while self._awaiting:  # multi-node: every node's uploads, then the manifests in order
            item = self._awaiting[0]
            if item.future is not None:
                concurrent.futures.wait([item.future])
            self.commit_ready()
        for fut in self._pending:
            if fut.cancelled():  # a queued periodic upload superseded by the final one
                continue
            exc = fut.exception()
            if exc is not None:
                errors.append(str(exc))
        self._pending.clear()
        if self.ctx.rank == 0:
            try:
                self.store.wait()
            except Exception as exc:  # noqa: BLE001 - reported below as one line
                errors.append(str(exc))
        errors += self._errors
        self._errors = []
        if errors:
            raise TrainError(f"output.uri: a final upload failed: {errors[0]}")

    # -- restore ---------------------------------------------------------------
    def restore(self) -> tuple[int, Path, dict[str, Any]] | None:
        """Download the newest committed checkpoint onto every node; None on a fresh start."""
        import torch.distributed as dist

        ctx = self.ctx
        local = self.work_dir / "restore"
        found: list[Any] = [None]
        if ctx.rank == 0:
            shutil.rmtree(local, ignore_errors=True)
            res = self.store.restore_latest(local)
            found = [None if res is None else int(res[0])]
        if ctx.world_size > 1:
            dist.broadcast_object_list(found, src=0, group=ctx.ctl_group)
        step = found[0]
        if step is None:
            return None
        if ctx.nnodes > 1 and ctx.local_rank == 0 and ctx.rank != 0:
            shutil.rmtree(local, ignore_errors=True)
            got = self.store.restore_latest(local)
            if got is None or int(got[0]) != step:
                raise TrainError(f"output.uri: node {ctx.node_rank} found checkpoint "
                                 f"{None if got is None else got[0]} while rank 0 restores {step}; "
                                 "is another job writing to the same output.uri?")
        ctx.barrier()
        state = json.loads((local / "state.json").read_text())
        return step, local, state

    def load_rank_state(self, folder: Path) -> dict[str, Any]:
        import torch

        path = folder / f"rank-{self.ctx.rank:05d}.pt"
        if not path.exists():
            raise TrainError(f"{path}: missing from the checkpoint; it was written by another number of processes")
        st = torch.load(path, map_location="cpu", weights_only=False)
        set_rng_state(st.pop("rng"), self.ctx.device)
        return st

    def cleanup_restore(self) -> None:
        self.ctx.barrier()
        if self.ctx.local_rank == 0:
            shutil.rmtree(self.work_dir / "restore", ignore_errors=True)


def default_work_dir(spec: Any, node_rank: int) -> Path:
    """A node-local folder for snapshots, unique per output URI and launch."""
    import hashlib
    import tempfile

    base = Path(os.environ.get("FTCLUSTER_LOCAL_DIR") or Path(tempfile.gettempdir()) / "ftcluster")
    key = hashlib.sha256(f"{spec.output.uri}|{os.environ.get('TORCHELASTIC_RUN_ID', '')}".encode()).hexdigest()[:10]
    return base / f"{spec.name}-{key}" / f"node{node_rank}"
