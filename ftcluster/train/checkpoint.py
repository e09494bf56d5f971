"""Resumable checkpoints: snapshot locally (fast), upload in the background, commit last.

The runtime talks only to :class:`CheckpointManager` (``load``, ``maybe_save``, ``save``,
``wait``, ``finished``), which it gives the run's parts by name (:mod:`.state`): ``train`` (the
:class:`~.state.TrainState`: ``state.json``), the engine (a part that saves itself into a
folder of its name: ``engine/``) and :class:`~.state.Stateful` ones saved per rank under their
names (``data``: the data source's position, ``rng``: the random generators); where and how
things are stored is :mod:`ftcluster.storage`'s business.

Layout of one snapshot (a node-local folder, then ``{output.uri}/checkpoints/step-NNNNNNNN/``)::

    state.json              step, tokens seen, world size, global batch, engine kind, forgetting baseline (rank 0)
    rank-00000.pt ...       per rank: {"step", and each Stateful part by name: "data" (data source position),
                            "rng" (python, numpy, torch, cuda generators)}
    engine/                 PlainEngine: trainable.safetensors + optimizer.pt (rank 0)
                            DeepSpeedEngine: ds/ with every rank's ZeRO shards
                            FsdpEngine: torch.distributed.checkpoint's __<rank>_0.distcp per rank,
                            .metadata (rank 0) and scheduler.pt (rank 0)
    manifest.json           written by the store LAST: the checkpoint is committed only then

Protocol (documented in docs/training.md):

* Single node (all ranks share the node's disk): every rank writes its files, a barrier,
  then rank 0 alone commits the folder with ``CheckpointStore.commit_async``; training goes
  on while it uploads.
* Several nodes (node-local disks): every node's local rank 0 uploads the files its node
  wrote into the same step folder, without a manifest (``upload_part_async``), in the
  background. Each step the loop's MAX all-reduce carries a "this node is still uploading"
  flag next to the stop flag; once it is 0 everywhere, all ranks all-gather each node's file
  list and outcome (a barrier with status) and rank 0 commits the manifest listing every
  node's files (``commit_parts_async``), only when every node succeeded. The final save (end
  or preemption) waits for all of that.
* Asynchronous writes (on unless ``FTCLUSTER_ASYNC_CKPT=0``; :mod:`.asyncsave`): the snapshot
  only *captures* the state to host memory on the training thread; each rank's writer thread
  writes the files, then leaves a marker file in the folder. The node's local rank 0 waits, on
  its writer thread, for every local rank's marker before it starts the commit or the part
  upload above, so the protocol is unchanged, only later. A failed write leaves that checkpoint
  uncommitted with a warning (the final save: an error from :meth:`CheckpointManager.wait`). A
  save first waits for the previous checkpoint's writes (one in flight; the buffers are reused).
* Resume: rank 0 asks the store for the newest *committed* checkpoint (a corrupt or
  half-uploaded one is skipped) and broadcasts its step; on every node local rank 0
  downloads that step and all ranks load from the node-local copy. On another number of
  processes only when every part can (``_fixed_world_parts``); the DeepSpeed engine's ``load``
  then converts its ZeRO shards on each node's local rank 0 (docs/training.md, "Resume on another
  number of GPUs").
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .. import __version__
from ..errors import TrainError
from ..storage.commit import CheckpointStore
from ..storage.layout import Artifact, artifact_name, step_dir
from ..storage.uri import one_line
from .asyncsave import CheckpointWriter, async_enabled
from .state import Stateful, TrainState

log = logging.getLogger("ftcluster.train")


TRAIN = "train"  # the part that is state.json: a TrainState (the manager reads the step from it)


@runtime_checkable
class SavesToFolder(Protocol):
    """A part that writes itself into a folder of the checkpoint (the engine: ``Engine.save``/``load``)."""

    def save(self, folder: Path, rank: int, writer: CheckpointWriter | None = None) -> None: ...

    def load(self, folder: Path) -> None: ...


def default_work_dir(spec: Any, node_rank: int) -> Path:
    """A node-local folder for snapshots, unique per output URI and launch."""
    base = Path(os.environ.get("FTCLUSTER_LOCAL_DIR") or Path(tempfile.gettempdir()) / "ftcluster")
    key = hashlib.sha256(f"{spec.output.uri}|{os.environ.get('TORCHELASTIC_RUN_ID', '')}".encode()).hexdigest()[:10]
    return base / f"{spec.name}-{key}" / f"node{node_rank}"


def remove_work_dir(work_dir: Path) -> None:
    """Remove a run's node-local folder once everything in it is committed (a resume reads the
    store, never this folder), and its parents up to the ``ftcluster`` folder when left empty."""
    shutil.rmtree(work_dir, ignore_errors=True)
    for parent in (work_dir.parent, work_dir.parent.parent):
        try:
            parent.rmdir()  # only when empty: another run's folder may be beside it
        except OSError:
            break


# ----------------------------------------------------------------------------- manager


@dataclass
class _Awaiting:
    """Multi-node: a checkpoint whose parts are uploading; its manifest is not written yet."""

    step: int
    meta: dict[str, Any]
    final: bool
    future: Future | None  # this node's upload (node leaders only)


@dataclass
class RunIdentity:
    """What a checkpoint must match to be resumed by this run."""

    engine: str
    model_fingerprint: str
    method: str
    total_steps: int
    every_steps: int | None = None
    every_s: float | None = None


class CheckpointManager:
    """Saves and restores the run's state; every method is called on every rank (collective).

    ``parts``: the run's state by name. ``parts["train"]`` is the :class:`~.state.TrainState`
    (rank 0 writes it, with the run's identity, as ``state.json``; it gives the step); a
    :class:`SavesToFolder` part (the engine) saves into the folder of its name; every other part
    is :class:`~.state.Stateful` and saved per rank, under its name, in ``rank-NNNNN.pt``.
    Restored in that order: folders, then the per-rank parts in the order given, then ``train``.
    """

    def __init__(self, spec: Any, ctx: Any, work_dir: Path, identity: RunIdentity,
                 parts: Mapping[str, Stateful | SavesToFolder], lease: Any = None):
        state = parts.get(TRAIN)
        if not isinstance(state, TrainState):
            raise TypeError(f"parts[{TRAIN!r}] must be the run's TrainState, not {type(state).__name__}")
        self.state = state
        self.folders: dict[str, SavesToFolder] = {}
        self.per_rank: dict[str, Stateful] = {}
        for name, part in parts.items():
            if name == TRAIN:
                continue
            if name == "step":
                raise ValueError("checkpoint part 'step': the name is the rank file's own; choose another")
            if isinstance(part, SavesToFolder):
                self.folders[name] = part
            elif isinstance(part, Stateful):
                self.per_rank[name] = part
            else:
                raise TypeError(f"checkpoint part {name!r}: a {type(part).__name__} is neither Stateful "
                                "(state_dict/load_state_dict) nor saves into a folder (save/load)")
        out = spec.output
        # ``lease`` (rank 0's, storage/lease.py): no manifest is written unless it is still this run's.
        self.store = CheckpointStore(out.uri, out.storage_options, out.keep_last, concurrency=out.upload_concurrency,
                                     retry_max_s=out.final_upload_timeout,
                                     guard=None if lease is None else lease.check)
        self.ctx, self.work_dir, self.id, self.spec = ctx, work_dir, identity, spec
        self._pending: list[Future] = []
        self._awaiting: list[_Awaiting] = []
        self._errors: list[str] = []
        self._last_save = time.monotonic()
        self.writer = CheckpointWriter(async_enabled(), ctx.device)
        ahead = sum(getattr(p, "checkpoint_bytes", lambda rank: 0)(ctx.rank) for p in self.folders.values())
        self.writer.reserve(ahead, ctx.local_world_size)  # pinned while training starts
        self.last_blocked_s = 0.0  # seconds the last save() kept training waiting
        self.last_wait_s = 0.0  # the part of it spent waiting for the previous checkpoint's writes

    # -- the loop's surface ----------------------------------------------------------
    def time_due(self) -> int:
        """1 when the time-based checkpoint interval has passed on this rank (all-reduced by the loop)."""
        return 1 if self.id.every_s and time.monotonic() - self._last_save >= self.id.every_s else 0

    def busy(self) -> int:
        """1 while this node's oldest uncommitted multi-node upload is still running (all-reduced by the loop)."""
        if not self._awaiting:
            return 0
        fut = self._awaiting[0].future
        return 0 if fut is None or fut.done() else 1

    def maybe_save(self, *, time_due: bool, uploading: bool, before: Callable[[], None] | None = None) -> bool:
        """After the step's agreement: commit a multi-node checkpoint every node finished uploading,
        and save a periodic checkpoint when one is due (never at the last step: the end saves).
        ``before`` is called just before saving (the loop flushes its metrics: the last loss)."""
        if not uploading:
            self._commit_ready()
        every, state = self.id.every_steps, self.state
        if state.step >= self.id.total_steps or not ((every and state.step % every == 0) or time_due):
            return False
        if before is not None:
            before()
        self.save(final=False)
        return True

    def save(self, *, final: bool) -> None:
        """Snapshot every rank's parts to node-local disk and start uploading them; returns at once
        (asynchronous writes: once the state is captured to host memory)."""
        t0 = time.monotonic()
        train = self.state.state_dict()  # as of now: its time leaves out the wait and the capture below
        self.writer.idle()  # one checkpoint's writes in flight: the capture reuses their buffers
        self.last_wait_s = time.monotonic() - t0
        step = train["step"]
        folder = self._snapshot(step, train)
        meta = {"step": step, "tokens_seen": train["tokens_seen"], "world_size": self.ctx.world_size,
                "method": self.id.method, "last_loss": train["last_loss"]}
        if self.writer.deferred:
            self._commit_after_writes(step, folder, meta, final)
        else:
            self._commit(step, folder, meta, final)
        self._last_save = time.monotonic()
        self.last_blocked_s = self._last_save - t0

    def publish(self, name: str, folder: Path, meta: dict[str, Any]) -> None:
        """Rank 0: upload an exported folder as ``{uri}/{name}/`` (committed like a checkpoint).

        Asynchronous writes: on the writer thread, after the writes queued for the folder and
        after the commit of the checkpoint being written, as in a synchronous save (the store
        commits in submission order, so a step's adapter never commits before it); a failed
        write leaves it unpublished with a warning (``ensure_step_adapter`` exports it again on
        resume). A failed final publish is raised by wait() (the store's final jobs)."""
        if self.ctx.rank != 0:
            return
        if not self.writer.deferred:
            self.store.publish(name, folder, meta)
            return

        def then(error: BaseException | None) -> Any:
            if error is not None:
                log.warning("%s was not published: %s", name, _one_line(error))
                return None
            return self.store.publish(name, folder, meta)

        self._pending.append(self.writer.finish(then))

    def finished(self, artifact: Artifact) -> bool:
        """Whether ``artifact`` is committed under the output URI (rank 0 looks, every rank learns)."""
        return self.is_published(artifact_name(artifact))

    def is_published(self, name: str) -> bool:
        """Whether ``{uri}/{name}/`` is committed (rank 0 looks, every rank learns; collective)."""
        flag = [self.store.is_published(name) if self.ctx.rank == 0 else False]
        self._broadcast(flag)
        return bool(flag[0])

    def wait(self) -> None:
        """Block until every started commit finished; raise if a final one failed (collective)."""
        errors: list[str] = []
        self.writer.idle()  # this rank's writes (a failure reaches rank 0 through its marker)
        while self._awaiting:  # multi-node: every node's uploads, then the manifests in order
            item = self._awaiting[0]
            if item.future is not None:
                concurrent.futures.wait([item.future])
            self._commit_ready()
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
            raise TrainError(f"output.uri: a final checkpoint write or upload failed: {errors[0]}")

    def load(self) -> bool:
        """Restore the newest committed checkpoint into the parts (in place); False on a fresh start."""
        found = self._restore()
        if found is None:
            return False
        step, folder, shared = found
        saved_world = int(shared["world_size"])
        if saved_world != self.ctx.world_size:
            fixed = self._fixed_world_parts()
            if fixed:
                raise TrainError(
                    f"output.uri: checkpoint step {step} was written by {saved_world} processes, this run has "
                    f"{self.ctx.world_size}, and its {', '.join(fixed)} cannot change the number of processes; "
                    "resume with the same resources or write to a new output.uri")
            log.info("resuming checkpoint step %d of %d process(es) on %d%s", step, saved_world, self.ctx.world_size,
                     self._global_batch_note(shared))
        if shared["engine"] != self.id.engine or shared["model_fingerprint"] != self.id.model_fingerprint:
            raise TrainError(f"output.uri: checkpoint step {step} belongs to another model or method; "
                             "use a new output.uri for a changed spec")
        for name, part in self.folders.items():
            part.load(folder / name)
        own = self.ctx.rank < saved_world
        rank_state = self._load_rank_state(folder, self.ctx.rank if own else 0)
        for name, stateful in self.per_rank.items():
            if not own and getattr(stateful, "resharding", None) == "fresh":
                continue  # a rank the checkpoint did not have keeps its freshly seeded state
            if name not in rank_state:
                raise TrainError(f"output.uri: checkpoint step {step} holds no {name!r} state for rank "
                                 f"{self.ctx.rank}; it was written by another version or setup; use a new output.uri")
            stateful.load_state_dict(rank_state[name])
        self.state.load_state_dict(shared)
        self._cleanup_restore()
        return True

    def _global_batch(self, world_size: int) -> int:
        """Sequences per optimizer step: micro-batch x accumulation x processes."""
        tr = self.spec.training
        return int(tr.micro_batch_size) * int(tr.gradient_accumulation_steps) * world_size

    def _global_batch_note(self, shared: dict[str, Any]) -> str:
        """What a resume on another number of processes does to the global batch (for the log line)."""
        now = self._global_batch(self.ctx.world_size)
        was = shared.get("global_batch")
        if was is None:
            return f"; global batch now {now} sequences (the checkpoint does not record its own)"
        if int(was) == now:
            return f"; global batch unchanged: {now} sequences"
        return (f"; the global batch CHANGES from {was} to {now} sequences (micro-batch x accumulation x processes; "
                "set training.gradient_accumulation_steps to keep it)")

    # -- save ------------------------------------------------------------------
    def _snapshot(self, step: int, train: dict[str, Any]) -> Path:
        import torch

        ctx = self.ctx
        folder = self.work_dir / step_dir(step)
        if ctx.local_rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            for name in self.folders:
                (folder / name).mkdir()
        ctx.barrier()
        for name, part in self.folders.items():
            part.save(folder / name, ctx.rank, self.writer)
        mine = {"step": step, **{name: part.state_dict() for name, part in self.per_rank.items()}}
        torch.save(mine, folder / f"rank-{ctx.rank:05d}.pt")  # small: written here, before the marker
        if ctx.rank == 0:
            shared = {**train, "world_size": ctx.world_size, "engine": self.id.engine,
                      "model_fingerprint": self.id.model_fingerprint, "total_steps": self.id.total_steps,
                      "ftcluster_version": __version__, "global_batch": self._global_batch(ctx.world_size)}
            (folder / "state.json").write_text(json.dumps(shared, indent=1, sort_keys=True))
        if not self.writer.deferred:
            ctx.barrier()  # every file of every rank is on the node's disk (deferred: the markers say so)
        return folder

    def _commit_after_writes(self, step: int, folder: Path, meta: dict[str, Any], final: bool) -> None:
        """Asynchronous writes: the commit (or this node's part upload) starts on the writer thread
        once every local rank's writes finished; ``out`` is its future, as :meth:`_commit`'s."""
        ctx = self.ctx
        leader = ctx.local_rank == 0
        out: Future | None = Future() if leader and (ctx.nnodes > 1 or ctx.rank == 0) else None

        def then(error: BaseException | None) -> None:
            _put_marker(folder, ctx.local_rank, error)
            if out is None:
                return
            try:
                failed = _wait_markers(folder, ctx.local_world_size)
                if failed:
                    raise TrainError(f"writing checkpoint step {step} failed ({failed})")
                start = self.store.commit_async if ctx.nnodes == 1 else None
                inner = (start(step, folder, meta, final=final) if start is not None
                         else self.store.upload_part_async(step, folder, final=final))
            except BaseException as exc:  # noqa: BLE001 - the checkpoint is not committed; reported below
                shutil.rmtree(folder, ignore_errors=True)
                if not final and ctx.nnodes == 1:  # reported here, and the run goes on (several nodes:
                    log.warning("checkpoint step %d was not committed: %s", step, _one_line(exc))
                    out.set_result(None)  # _commit_ready reports every node's outcome)
                else:
                    out.set_exception(exc)
                return
            inner.add_done_callback(lambda f: _chain(f, out))

        self.writer.finish(then)
        if ctx.nnodes == 1:
            if out is not None:
                self._pending.append(out)
            return
        self._awaiting.append(_Awaiting(step, meta, final, out))

    def _commit(self, step: int, folder: Path, meta: dict[str, Any], final: bool) -> None:
        ctx = self.ctx
        if ctx.nnodes == 1:
            if ctx.rank == 0:
                self._pending.append(self.store.commit_async(step, folder, meta, final=final))
            return
        fut = self.store.upload_part_async(step, folder, final=final) if ctx.local_rank == 0 else None
        self._awaiting.append(_Awaiting(step, meta, final, fut))

    def _commit_ready(self) -> None:
        """Multi-node: every node reports its uploaded files; rank 0 commits only if all succeeded."""
        if not self._awaiting:
            return
        import torch.distributed as dist

        item, ctx = self._awaiting.pop(0), self.ctx
        mine: tuple[int, Any, str | None] = (ctx.node_rank, None, None)
        if item.future is not None:
            exc = item.future.exception()
            mine = (ctx.node_rank, None if exc else item.future.result()["manifest_files"],
                    None if exc is None else str(exc))
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
            parts = [f for _, f, _ in reports if f]
            self._pending.append(self.store.commit_parts_async(item.step, parts, item.meta, final=item.final))

    # -- restore ---------------------------------------------------------------
    def _broadcast(self, obj: list[Any]) -> None:
        if self.ctx.world_size > 1:
            import torch.distributed as dist

            dist.broadcast_object_list(obj, src=0, group=self.ctx.ctl_group)

    def _restore(self) -> tuple[int, Path, dict[str, Any]] | None:
        """Download the newest committed checkpoint onto every node; None on a fresh start."""
        ctx = self.ctx
        local = self.work_dir / "restore"
        found: list[Any] = [None]
        if ctx.rank == 0:
            shutil.rmtree(local, ignore_errors=True)
            res = self.store.restore_latest(local)
            found = [None if res is None else int(res[0])]
        self._broadcast(found)
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
        return step, local, json.loads((local / "state.json").read_text())

    def _fixed_world_parts(self) -> list[str]:
        """The parts whose checkpoint only resumes on the same number of processes.

        A part says otherwise with ``resharding``: ``"global"`` (its state is the same on every rank,
        e.g. a stream's global position, or is replicated, e.g. LoRA's rank-0 weights and optimizer),
        ``"fresh"`` (per-rank state a new rank may start afresh, e.g. the random generators), or
        ``"self"`` (a folder part whose ``load`` reads a checkpoint of any number of processes itself:
        a sharded engine that reshards, e.g. torch.distributed.checkpoint, or the DeepSpeed engine's
        universal checkpoint).

        A part that cannot may say why in ``resharding_refusal`` (the DeepSpeed engine names its ZeRO
        stage); the error shows it next to the part's name."""
        parts = {**self.folders, **self.per_rank}
        return [f"{name} ({part.resharding_refusal})" if getattr(part, "resharding_refusal", None) else name
                for name, part in parts.items()
                if getattr(part, "resharding", None) not in ("global", "fresh", "self")]

    def _load_rank_state(self, folder: Path, rank: int | None = None) -> dict[str, Any]:
        import torch

        path = folder / f"rank-{self.ctx.rank if rank is None else rank:05d}.pt"
        if not path.exists():
            raise TrainError(f"{path}: missing from the checkpoint; it was written by another number of processes")
        return torch.load(path, map_location="cpu", weights_only=False)

    def _cleanup_restore(self) -> None:
        self.ctx.barrier()
        if self.ctx.local_rank == 0:
            shutil.rmtree(self.work_dir / "restore", ignore_errors=True)


# ----------------------------------------------------------------------------- asynchronous writes


def _marker(local_rank: int) -> str:
    """A rank's "my writes of this folder are done" file (empty) or its error; removed before upload."""
    return f".written-{local_rank:05d}"


def _one_line(exc: BaseException) -> str:
    """Our own errors as they read; anything else as ``Type: message`` (storage.uri.one_line)."""
    return " ".join(str(exc).split()) if isinstance(exc, TrainError) else one_line(exc)


def _put_marker(folder: Path, local_rank: int, error: BaseException | None) -> None:
    """Written whole, then renamed: the leader never reads a half-written one."""
    tmp = folder / (_marker(local_rank) + ".tmp")
    try:
        tmp.write_text("" if error is None else _one_line(error))
        tmp.rename(folder / _marker(local_rank))
    except OSError as exc:  # e.g. the disk filled up: the leader gives up after its timeout
        log.warning("%s: could not write the checkpoint's write marker: %s", folder, _one_line(exc))


def _wait_markers(folder: Path, local_world: int, poll_s: float = 0.01) -> str | None:
    """Node leader, writer thread: wait for every local rank's marker, remove them; the first error."""
    paths = [folder / _marker(r) for r in range(local_world)]
    end = time.monotonic() + float(os.environ.get("FTCLUSTER_DIST_TIMEOUT_S", "3600"))
    while not all(p.exists() for p in paths):
        if time.monotonic() > end:
            missing = [r for r, p in enumerate(paths) if not p.exists()]
            return f"local rank {missing[0]} did not finish its writes within FTCLUSTER_DIST_TIMEOUT_S"
        time.sleep(poll_s)
    errors = [(r, p.read_text()) for r, p in enumerate(paths)]
    for p in paths:
        p.unlink()
    return next((f"local rank {r}: {e}" for r, e in errors if e), None)


def _chain(src: Future, dst: Future) -> None:
    if src.cancelled():  # a queued periodic upload superseded by the final one
        dst.cancel()
    elif src.exception() is not None:
        dst.set_exception(src.exception())
    else:
        dst.set_result(src.result())
