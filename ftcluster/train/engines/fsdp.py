"""The FSDP2 engine: :class:`FsdpEngine` (full fine-tuning with PyTorch's ``fully_shard``: every
decoder layer and the root sharded over all processes, torch AdamW over the sharded parameters,
torch.distributed.checkpoint for resumable state) and its ``build``. Recipe: ``fsdp`` in
:mod:`ftcluster.plan.engines` (checkpoint kind "fsdp").

The wrapping follows torchtitan's ``parallelize_llama`` (torchtitan/models/llama3/infra/parallelize.py,
``apply_fsdp``): regional ``torch.compile`` on each block first, then ``fully_shard`` per decoder
layer and once at the root (embeddings, final norm, output layer: a tied output layer stays in the
root group with the embedding it shares), a ``MixedPrecisionPolicy`` that computes in the spec's
precision and reduces gradients in fp32, and an optional ``CPUOffloadPolicy``.

The model is built on the meta device on every rank and only the shards are allocated; rank 0
alone builds the whole model and broadcasts it into the shards, unless a resume's checkpoint fills
them (:func:`build`), so a rank never holds more than its shards on its device.

Checkpoints are DCP's (torch.distributed.checkpoint): every rank writes its own
``__<rank>_<n>.distcp`` file(s) into the folder the checkpoint manager gives it and the coordinator
(rank 0) writes ``.metadata``. On several nodes each node's folder holds its ranks' files (rank 0's
adds the metadata); the manager uploads every node's part into one step folder, and a resume
downloads the whole merged folder on every node, which is the layout ``dcp.load`` reads. DCP
reshards on load, so a checkpoint resumes on any number of processes (``resharding = "self"``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...errors import TrainError
from ...plan.engines import ENGINES
from ..asyncsave import CheckpointWriter
from . import base  # base.token_ce_sum through the module: a probe may wrap it (benchmarks/ds_probe.py)
from .base import EngineInputs, LrLambda, model_flags

log = logging.getLogger("ftcluster.train")

RECIPE = ENGINES["fsdp"]
SCHEDULER = "scheduler.pt"  # the LR schedule's state, beside DCP's files (rank 0)


INIT_ENV = "FTCLUSTER_FSDP_INIT"  # "every-rank": the whole model on every rank first (comparisons only)


def build(inputs: EngineInputs) -> tuple[FsdpEngine, None]:
    """The model sharded with FSDP2 (compiled layers when ``training.compile``); nothing to keep alive.

    Every rank builds the model's structure on the meta device (:func:`~..model.load_base_model`
    with ``meta``: the same architecture, grown embeddings and ties as the full build), compiles
    and shards it, and allocates only its own shards (``to_empty``); the buffers no state dict
    carries (RoPE's ``inv_freq``) are computed again on every rank. The weights come later, once:
    from a checkpoint when the run resumes (:meth:`FsdpEngine.load` fills every shard), else
    broadcast from rank 0, the one process that builds the whole model (:func:`full_weights`), at
    the engine's first use (:meth:`FsdpEngine.materialize`). So no rank ever holds more than its
    shards on its device, and only rank 0 holds the whole model in host memory, once, before the
    first step (torchtitan's and accelerate's ``cpu_ram_efficient_loading`` do the same).
    ``FTCLUSTER_FSDP_INIT=every-rank`` builds the whole model on every rank's device before the
    sharding instead (the first FSDP2 engine's way, for comparisons)."""
    import os

    import torch

    from .. import model as M

    spec, ctx = inputs.spec, inputs.ctx
    every_rank = os.environ.get(INIT_ENV, "") == "every-rank"
    # fp32 parameters: they are the optimizer's master weights (DeepSpeed keeps an fp32 copy of the
    # bf16 module; FSDP2 shards the fp32 parameters and casts to param_dtype for compute).
    model = M.load_base_model(spec, inputs.tokenizer, torch.float32, ctx.device, inputs.cache_dir,
                              meta=not every_rank, init_dtype=inputs.dtype)
    from ..fp8 import apply_fp8

    apply_fp8(model, spec.training.fp8, ctx.device)  # before compile and fully_shard, as torchtitan
    if getattr(model, "ftcluster_compile", False):
        M.compile_layers(model)  # before fully_shard, per block, as torchtitan's apply_compile
    shard_model(model, spec.fsdp, inputs.dtype, ctx)
    weights = None
    if not every_rank:
        _allocate_shards(model, spec.fsdp.cpu_offload and ctx.device.type == "cuda", ctx.device)
        M.init_nonpersistent_buffers(model)
        weights = lambda: full_weights(inputs)  # noqa: E731 - called on rank 0 only
    return FsdpEngine(model, spec, ctx, inputs.total_steps, weights=weights), None


def _allocate_shards(model: Any, offload: bool, device: Any) -> None:
    """This rank's shards, uninitialised (``to_empty``): on ``device``, or in (pinned) host memory
    with CPU offload, where FSDP keeps them; the buffers on ``device`` either way (torchtitan's
    ``init_device`` and ``buffer_device``)."""
    import torch

    model.to_empty(device=torch.device("cpu") if offload else device)
    if offload:
        for mod in model.modules():
            for name, buf in mod._buffers.items():
                if buf is not None:
                    mod._buffers[name] = buf.to(device)


def full_weights(inputs: EngineInputs) -> dict[str, Any]:
    """Rank 0's whole state dict: exactly the weights the every-rank build gives (the same seed,
    init, loaded tensors and grown rows), from :func:`~..model.load_base_model` itself.

    Loaded weights (``model.path``, a hub id) land in host memory, read tensor by tensor from the
    memory-mapped safetensors files by transformers: the model once, in the dtype its files hold
    when every floating tensor there is bf16 or fp16 (:func:`stored_dtype`: 2 bytes a parameter;
    the shards' fp32 copy of each is exact, and the embeddings, grown rows included, are fp32 as in
    the every-rank build), else in fp32. A ``random_init`` model is drawn on rank 0's device, as the
    other engines draw it, and rounded to the compute dtype (``init_dtype``), so its weights equal
    theirs (same generator, same values), and broadcast from there."""
    import torch

    from .. import model as M

    spec, ctx = inputs.spec, inputs.ctx
    if spec.model.random_init is not None:
        where, load_dtype = ctx.device, None
    else:
        where, load_dtype = torch.device("cpu"), stored_dtype(spec, inputs.cache_dir)
    model = M.load_base_model(spec, inputs.tokenizer, torch.float32, where, inputs.cache_dir, load_dtype=load_dtype,
                              init_dtype=inputs.dtype)
    log.info("fsdp: rank 0 holds the whole model in %s (%.1f GB) to broadcast it", str(load_dtype or torch.float32)
             .replace("torch.", ""), sum(t.numel() * t.element_size() for t in model.parameters()) / 1e9)
    return model.state_dict()


def stored_dtype(spec: Any, cache_dir: Path) -> Any:
    """bf16 or fp16 when every floating tensor of ``model.path``'s safetensors files has that
    dtype (read from the files' headers), else None (fp32; a hub id: its files are not local yet)."""
    import torch

    if not spec.model.path:
        return None
    from safetensors import safe_open

    from ...storage.fetch import fetch_dir

    folder = Path(fetch_dir(spec.model.path, spec.model.storage_options, cache_dir / "models"))
    dtypes: set[Any] = set()
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open is no dict
                dtypes.add(fh.get_slice(key).get_dtype())
    halves = {"BF16": torch.bfloat16, "F16": torch.float16}
    floating = dtypes - {"I64", "I32", "I16", "I8", "U8", "BOOL"}
    return halves[next(iter(floating))] if len(floating) == 1 and floating <= set(halves) else None


def shard_model(model: Any, fsdp: Any, dtype: Any, ctx: Any) -> int:
    """``fully_shard`` each decoder layer, then the root (collective); returns the number of layers."""
    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    from .. import model as M

    mesh = _mesh(ctx)
    # reduce_dtype fp32: gradients are summed in full precision whatever the compute dtype
    # (torchtitan's default mixed_precision_reduce = float32).
    kw: dict[str, Any] = {"mesh": mesh, "mp_policy": MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)}
    if fsdp.cpu_offload and ctx.device.type == "cuda":
        kw["offload_policy"] = CPUOffloadPolicy()
    elif fsdp.cpu_offload:  # CPUOffloadPolicy needs an accelerator to move the shards to and from
        log.info("fsdp.cpu_offload: running on CPU, where the sharded state is in host memory already")
    layers = M.decoder_layers(model)
    if not layers:
        raise TrainError("engine: fsdp shards per decoder layer, and this model has none that transformers marks "
                         "(GradientCheckpointingLayer); use engine: deepspeed")
    for i, layer in enumerate(layers):
        # The last layer's parameters are gathered again at once by backward: resharding them after
        # forward only costs an all-gather (torchtitan's parallelize_llama does the same).
        reshard = fsdp.reshard_after_forward and i < len(layers) - 1
        fully_shard(layer, reshard_after_forward=reshard, **kw)
    fully_shard(model, reshard_after_forward=fsdp.reshard_after_forward, **kw)
    return len(layers)


def _mesh(ctx: Any) -> Any:
    """A 1-D device mesh over every process (FSDP's data-parallel dimension)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    if not torch.distributed.is_initialized():  # one process without torchrun's environment
        raise TrainError("engine: fsdp needs torch.distributed; start the run with ftcluster (torchrun)")
    return init_device_mesh(ctx.device.type, (ctx.world_size,))


class FsdpEngine:
    """Full fine-tuning with FSDP2; the model's parameters are DTensors sharded over all ranks."""

    kind = RECIPE.checkpoint_kind  # "fsdp"
    resharding = "self"  # torch.distributed.checkpoint reshards on load (checkpoint.py)

    def __init__(self, model: Any, spec: Any, ctx: Any, total_steps: int,
                 weights: Callable[[], dict[str, Any]] | None = None):
        import torch
        import torch.distributed as dist

        tr = spec.training
        self.module = model
        self.rank = ctx.rank
        # Rank 0's whole state dict, to broadcast into the shards at the first use (None: the shards
        # hold their weights already); a resume's load fills them instead (build's docstring).
        self._weights = weights
        self.device = ctx.device
        self.world_size = ctx.world_size
        self.params = [p for p in model.parameters() if p.requires_grad]
        offload = spec.fsdp.cpu_offload and self.device.type == "cuda"
        # fused: one kernel over the shards on GPU; with CPU offload the step runs on the host.
        self.optimizer = torch.optim.AdamW(self.params, lr=tr.learning_rate, betas=(tr.adam_beta1, tr.adam_beta2),
                                           weight_decay=tr.weight_decay,
                                           fused=self.device.type == "cuda" and not offload)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, LrLambda(tr.lr_schedule, tr.warmup_steps, total_steps))
        self.max_grad_norm = tr.max_grad_norm
        self.fused_ce, self.varlen = model_flags(model)
        self.offload = offload
        # DCP's collectives run on a gloo group of their own: an asynchronous save plans and writes
        # on a background thread while training uses the default group (torchtitan's checkpointer
        # does the same: components/checkpoint.py, "pg = dist.new_group(backend='gloo')").
        self.ckpt_group = dist.new_group(backend="gloo")
        self._pending: Any = None  # the last asynchronous DCP save's future
        self._stager: Any = None  # DCP's stager, kept: it reuses its (pinned) host copies from one save to the next

    # ------------------------------------------------------------------ weights
    def materialize(self) -> None:
        """The weights into the shards, unless they are there (collective; every public method that
        reads or changes them calls it first, and :meth:`load` makes it a no-op): rank 0 builds the
        whole state dict (:func:`full_weights`) and ``set_model_state_dict`` broadcasts it tensor by
        tensor, each rank keeping its shard of each; rank 0's copy is released at once."""
        if self._weights is None:
            return
        import gc

        import torch
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        weights, self._weights = self._weights, None
        began = time.monotonic()
        full = weights() if self.rank == 0 else {}
        set_model_state_dict(self.module, full, options=StateDictOptions(full_state_dict=True,
                                                                         broadcast_from_rank0=True))
        del full, weights
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("fsdp: the weights built on rank 0 and broadcast into every rank's shards in %.1f s",
                 time.monotonic() - began)

    # ------------------------------------------------------------------ step
    @property
    def grad_accum_scale(self) -> int:
        """FSDP's reduce-scatter averages gradients over ranks: the loop multiplies the loss scale by this."""
        return self.world_size

    def train_step(self, micro_batches: list[dict[str, Any]], scale: float):
        """One optimizer step; gradients are reduced only after the last micro-batch."""
        import torch

        self.materialize()
        total = torch.zeros((), device=self.device)
        n = len(micro_batches)
        for i, mb in enumerate(micro_batches):
            # No reduce-scatter on the accumulation micro-batches: the unsharded gradients add up
            # locally (torch docs, FSDPModule.set_requires_gradient_sync).
            self.module.set_requires_gradient_sync(i == n - 1)
            ce, _ = base.token_ce_sum(self.module, mb, self.device, fused=self.fused_ce, varlen=self.varlen)
            (ce * scale).backward()
            total += ce.detach()
        grad_norm = self._clip()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, grad_norm

    def _clip(self) -> Any:
        """Clip to ``training.max_grad_norm`` (0: only measure), over the sharded gradients' global
        norm, as torchtitan's ``clip_grad_norm_`` (torchtitan/distributed/utils.py): the DTensor
        norm is made whole before the clip."""
        import torch
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.max_grad_norm, norm)
        return norm.detach()

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def eval_sums(self, batch: dict[str, Any]):
        self.materialize()
        return base.eval_ce_sum(self.module, batch, self.device, varlen=self.varlen)

    # ------------------------------------------------------------------ state
    def checkpoint_bytes(self, rank: int) -> int:
        """0: nothing for the checkpoint writer to pin ahead. DCP's stager copies the shards (12 bytes
        a parameter over the ranks: fp32 weights and two Adam moments) into host buffers of its own,
        pinned at the first save and reused after (:meth:`save`); an arena reserved by the writer
        would sit unused beside them."""
        return 0

    def _state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.module, self.optimizer)
        return {"model": model, "optim": optim}

    def save(self, folder: Path, rank: int, writer: CheckpointWriter | None = None) -> None:
        """Every rank writes its shards with DCP (collective); rank 0 adds the LR schedule.

        A deferring ``writer``: ``dcp.async_save`` stages the shards into host memory here (DCP's
        stager copies every tensor, so training may go on changing them) and plans and writes on
        DCP's thread over :attr:`ckpt_group`; the writer's thread waits for it before this rank's
        "written" marker, so the manager commits only complete folders, as with DeepSpeed.
        """
        import torch
        import torch.distributed.checkpoint as dcp

        writer = writer or CheckpointWriter(deferred=False)
        self.materialize()
        self._wait_pending()
        state = self._state()
        if writer.deferred:
            fut = dcp.async_save(state, checkpoint_id=str(folder), process_group=self.ckpt_group,
                                 async_stager=self._staging())
            upload = getattr(fut, "upload_completion", fut)  # an AsyncSaveResponse with async staging
            self._pending = upload
            writer.write("engine/dcp", upload.result)
        else:
            dcp.save(state, checkpoint_id=str(folder), process_group=self.ckpt_group)
        if rank == 0:
            sched = writer.capture(self.scheduler.state_dict())
            writer.write(SCHEDULER, lambda: torch.save(sched, folder / SCHEDULER))

    def _staging(self) -> Any:
        """DCP's stager for this run: copies on the training thread (``async_save`` returns once the
        state is in host memory), pinned and non-blocking from a GPU. One stager for the whole run:
        it keeps a host copy per source storage and refills it at the next save, as the checkpoint
        writer reuses its buffers (one save in flight: :meth:`_wait_pending`)."""
        if self._stager is None:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            cuda = self.device.type == "cuda"
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                        use_async_staging=False, use_non_blocking_copy=cuda))
        return self._stager

    def _wait_pending(self) -> None:
        """One DCP save in flight (the manager waits for the writer first; this is belt and braces)."""
        if self._pending is not None:
            self._pending.exception()
            self._pending = None

    def load(self, folder: Path) -> None:
        """Read a DCP checkpoint of any number of processes into this run's shards (collective)."""
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        if not (folder / ".metadata").is_file():
            raise TrainError(f"{folder}: no torch.distributed.checkpoint metadata; the checkpoint was written by "
                             "another engine or is incomplete; use a new output.uri")
        # The checkpoint fills every shard: rank 0 need not build the whole model (build's docstring).
        self._weights = None
        state = self._state()
        dcp.load(state, checkpoint_id=str(folder), process_group=self.ckpt_group)
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(torch.load(folder / SCHEDULER, map_location="cpu", weights_only=False))

    # ------------------------------------------------------------------ export
    def export(self, folder: Path, rank: int, writer: CheckpointWriter | None = None) -> None:
        """A consolidated Hugging Face model (safetensors) written by rank 0 (collective: the full
        state dict is gathered to rank 0's host memory, shard by shard)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        self.materialize()
        full = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank != 0:
            return
        self.module.save_pretrained(str(folder), state_dict=full, safe_serialization=True, max_shard_size="5GB")
        _plain_architecture(folder, self.module)

    def export_merged(self, folder: Path, rank: int) -> None:  # pragma: no cover - not a LoRA engine
        raise NotImplementedError


def _plain_architecture(folder: Path, model: Any) -> None:
    """``config.json`` names the model's own class: fully_shard swapped it for ``FSDP<Class>``, and
    ``save_pretrained`` records the class it sees (serving engines such as vLLM read that name)."""
    import json

    from torch.distributed.fsdp import FSDPModule

    plain = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg["architectures"] = [plain.__name__]
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
