"""The DeepSpeed engine: :class:`DeepSpeedEngine` (full fine-tuning with ZeRO 0-3: client torch
AdamW, DeepSpeedCPUAdam with optimizer offload on GPU, or the optimizer of a user config) and its
``build``, from the payload's ``deepspeed`` config (what the recipe's ``plan_extra`` resolved at
render time). Recipe: ``deepspeed`` in :mod:`ftcluster.plan.engines` (checkpoint kind "deepspeed")."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ...errors import TrainError
from ...plan.engines import ENGINES
from ..asyncsave import CheckpointWriter
from . import base  # base.token_ce_sum through the module: a probe may wrap it (benchmarks/ds_probe.py)
from .base import EngineInputs, LrLambda, model_flags

log = logging.getLogger("ftcluster.train")

RECIPE = ENGINES["deepspeed"]


def build(inputs: EngineInputs) -> tuple[DeepSpeedEngine, Any]:
    """The model under DeepSpeed, and what to keep alive as long as it (ZeRO-3: transformers'
    HfDeepSpeedConfig, by which the model is built partitioned; else None)."""
    from .. import model as M

    spec, ctx = inputs.spec, inputs.ctx
    ds_config = inputs.payload.get("deepspeed")  # the recipe's plan_extra put it there
    if ds_config is None:
        raise TrainError("payload: a full fine-tune needs the 'deepspeed' config; render the job with ftcluster")
    if ctx.device.type != "cuda":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # skip DeepSpeed's accelerator probe and its warning
        if ctx.rank == 0:
            note_cpu_op_build()
    import deepspeed

    cfg = prepare_ds_config(ds_config, ctx.device)
    zero3 = zero_stage(cfg) == 3
    keep = None
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(cfg)  # kept alive: transformers builds the model partitioned
    deepspeed.init_distributed(dist_backend="nccl" if ctx.device.type == "cuda" else "gloo")
    model = M.load_base_model(spec, inputs.tokenizer, inputs.dtype, ctx.device, inputs.cache_dir, zero3=zero3)
    if spec.training.fp8 is not None:
        if zero3:  # a config_file that sets stage 3 (the spec's own zero_stage 3 is refused on load)
            raise TrainError("training.fp8: not with ZeRO-3 (deepspeed.config_file sets stage 3); use stage 2 or "
                             "engine: fsdp")
        from ..fp8 import apply_fp8

        apply_fp8(model, spec.training.fp8, ctx.device)
    if getattr(model, "ftcluster_compile", False):  # load_base_model decided (off with ZeRO-3, said why)
        M.compile_layers(model)
    return DeepSpeedEngine(model, spec, cfg, ctx.device, inputs.total_steps, ctx.world_size, ctx=ctx), keep


CPU_COMM_OP = "deepspeed_shm_comm"  # what deepspeed.init_distributed JIT-compiles on a CPU host


def cpu_op_build_dir(name: str = CPU_COMM_OP) -> Path:
    """Where torch's cpp_extension builds DeepSpeed's op ``name`` (as ``_get_build_directory``, creating nothing)."""
    import sys

    import torch
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        cu = "cpu" if torch.version.cuda is None else f"cu{torch.version.cuda.replace('.', '')}"
        root = os.path.join(get_default_build_root(),
                            f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}_{cu}")
    return Path(root) / name


def cpu_op_cached(name: str = CPU_COMM_OP) -> bool:
    """Whether the op is built for this DeepSpeed installation already (its library, and a build file
    naming this installation's sources: another environment's build of it is built again)."""
    import importlib.util

    folder = cpu_op_build_dir(name)
    found = importlib.util.find_spec("deepspeed")  # without importing it (that would pick the accelerator)
    try:
        ninja = (folder / "build.ninja").read_text()
    except OSError:
        return False
    here = str(Path(found.origin).parent) if found and found.origin else ""
    return (folder / f"{name}.so").is_file() and bool(here) and here in ninja


def note_cpu_op_build() -> None:
    """Say once, before the silence, that DeepSpeed compiles its CPU op (only when it is not built yet)."""
    if not cpu_op_cached():
        log.info("building DeepSpeed's CPU communication op (once per machine and environment, ~40 s; cached "
                 "in %s)...", cpu_op_build_dir())


def prepare_ds_config(ds_config: dict[str, Any], device: Any) -> dict[str, Any]:
    """The payload's DeepSpeed config, adjusted for a CPU-only host: fp32 compute (no bf16
    kernels to gain from on gloo) and torch AdamW allowed with optimizer offload."""
    import copy

    cfg = copy.deepcopy(ds_config)
    if device.type != "cuda":
        cfg["bf16"] = {"enabled": False}
        cfg["fp16"] = {"enabled": False}
        cfg["zero_force_ds_cpu_optimizer"] = False
    return cfg


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


# ZeRO stages whose checkpoint resumes on another number of processes through DeepSpeed's universal
# checkpoint, verified end to end (tests/e2e/test_ds_reshard.py: 2 -> 1 -> 2 processes on CPU).
RESHARD_STAGES = (1, 2, 3)


def reshard_refusal(stage: int, offload_optimizer: str, offload_params: str) -> str | None:
    """Why a checkpoint of this configuration cannot resume on another number of processes (None: it can)."""
    if stage not in RESHARD_STAGES:
        return (f"DeepSpeed ZeRO-{stage}: only ZeRO-{'/'.join(map(str, RESHARD_STAGES))} checkpoints reshard, "
                "through DeepSpeed's universal checkpoint")
    if "nvme" in (offload_optimizer, offload_params):
        return f"DeepSpeed ZeRO-{stage} with NVMe offload: its swapped optimizer state is kept per rank"
    return None


def saved_dp_world(ds_folder: Path) -> int | None:
    """How many data-parallel ranks wrote the ZeRO checkpoint in ``ds_folder`` (the tag's folder):
    one ``zero_pp_rank_{dp}_mp_rank_{mp}_optim_states.pt`` per rank (``engine._get_zero_ckpt_name``);
    None when it has none (ZeRO-0: the optimizer state is whole in ``mp_rank_00_model_states.pt``)."""
    import re

    ranks = {int(m.group(1)) for f in ds_folder.glob("*zero_pp_rank_*_optim_states.pt")
             if (m := re.search(r"zero_pp_rank_(\d+)_", f.name))}
    return len(ranks) or None


def to_universal(ds_folder: Path, out_folder: Path) -> dict[str, float]:
    """Convert the ZeRO checkpoint ``ds_folder`` into a universal checkpoint ``out_folder`` with
    DeepSpeed's own converter, in a child process (its memory is measured apart from training's, and
    its worker pool forks a clean interpreter, not a rank with live process groups).

    The converter (DeepSpeed 0.19.8 deepspeed/checkpoint/ds_to_universal.py:1156 ``main``) reassembles every parameter's
    fp32 master weight and Adam moments from the per-rank flat partitions into
    ``out_folder/zero/<param name>/{fp32,exp_avg,exp_avg_sq}.pt`` plus ``zero/optimizer_state.pt``
    (ZeRO-1/2: ``_extract_zero_shard_files`` then ``_merge_tp_slice_files``; ZeRO-3:
    ``_extract_zero_shard_files_stage3`` then ``_merge_zero3_slice_files``) and copies the
    ``*model_states.pt`` files (module, LR scheduler, step counters). ``--inject_missing_state``:
    a plain Hugging Face module records no ``universal_checkpoint_info`` (only AutoTP/Megatron
    models do), which ``_check_for_required_state`` (:1086) otherwise asserts for ZeRO-1/2;
    ``_inject_missing_state`` (:1079) adds just the version key.
    Returns seconds and the converter's peak resident memory (bytes; its largest process)."""
    import subprocess
    import sys
    import time

    cpus = os.cpu_count() or 1
    workers = int(os.environ.get("FTCLUSTER_DS_CONVERT_WORKERS", str(min(4, cpus))))
    cmd = [sys.executable, "-c", _CONVERT, "--input_folder", str(ds_folder), "--output_folder", str(out_folder),
           "--inject_missing_state", "--num_extract_workers", str(workers),
           "--num_merge_workers", str(max(1, min(2, workers)))]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    t0 = time.monotonic()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - t0
    if res.returncode != 0:
        lines = [x for x in (res.stdout + res.stderr).strip().splitlines() if not x.startswith(_PEAK)]
        raise TrainError(f"{ds_folder}: converting the DeepSpeed checkpoint to a universal one failed "
                         f"(exit {res.returncode}): {(lines or ['(no output)'])[-1]}")
    peaks = [int(x.split()[1]) for x in res.stderr.splitlines() if x.startswith(_PEAK)]
    return {"seconds": seconds, "peak_rss_bytes": float(peaks[-1] * 1024 if peaks else 0)}  # ru_maxrss: kB


_PEAK = "FTCLUSTER_CONVERTER_PEAK_RSS_KB"
# The converter run as its own __main__, then the peak resident memory of its largest process
# (itself or one of its workers: ru_maxrss of RUSAGE_SELF and RUSAGE_CHILDREN), on stderr.
_CONVERT = f"""
import resource, runpy, sys
sys.argv[0] = "ds_to_universal"
try:
    runpy.run_module("deepspeed.checkpoint.ds_to_universal", run_name="__main__", alter_sys=True)
finally:
    r = resource.getrusage
    print("{_PEAK}", max(r(resource.RUSAGE_SELF).ru_maxrss, r(resource.RUSAGE_CHILDREN).ru_maxrss), file=sys.stderr)
"""


class DeepSpeedEngine:
    """Full fine-tuning with DeepSpeed ZeRO, configured by :func:`prepare_ds_config`'s output."""

    kind = RECIPE.checkpoint_kind  # "deepspeed"

    def __init__(self, model: Any, spec: Any, ds_config: dict[str, Any], device: Any, total_steps: int,
                 world_size: int, ctx: Any = None):
        import deepspeed
        import torch

        tr, dss = spec.training, spec.deepspeed
        cfg = ds_config
        self.device = device
        self.world_size = world_size
        self.ctx = ctx  # the DistContext (a resume on another number of processes converts on each node's local rank 0)
        self.zero_stage = zero_stage(cfg)
        self.offloaded = dss.offload_optimizer != "none"
        self.declare_resharding(cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = None
        if "optimizer" not in cfg:
            kw = dict(lr=tr.learning_rate, betas=(tr.adam_beta1, tr.adam_beta2), weight_decay=tr.weight_decay)
            if dss.offload_optimizer != "none" and device.type == "cuda":
                from deepspeed.ops.adam import DeepSpeedCPUAdam

                optimizer = DeepSpeedCPUAdam(params, adamw_mode=True, **kw)
            else:
                # fused: one kernel over ZeRO's flat fp32 partition instead of ~8 foreach passes
                # (the 8B step on 2 GPUs spends ~0.1 s in the optimizer: docs/BENCHMARKS.md)
                optimizer = torch.optim.AdamW(params, fused=device.type == "cuda", **kw)
        sched = None
        if "scheduler" not in cfg:
            lam = LrLambda(tr.lr_schedule, tr.warmup_steps, total_steps)

            def sched(opt):
                return torch.optim.lr_scheduler.LambdaLR(opt, lam)

        from ..speedups import tune_ds_config

        self.fused_ce, self.varlen = model_flags(model)
        cfg = tune_ds_config(cfg, model, device, world_size)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=params if optimizer is None else None, optimizer=optimizer,
            lr_scheduler=sched, config=cfg, dist_init_required=False)
        self.module = self.engine.module

    def declare_resharding(self, cfg: dict[str, Any]) -> None:
        """For CheckpointManager.load: ``resharding = "self"`` (load() reads a checkpoint of another
        number of processes itself) where this configuration's resharded resume is verified; else
        ``resharding_refusal`` says why not, and the manager refuses such a checkpoint with it."""
        zero = cfg.get("zero_optimization", {})
        self.zero_stage = zero_stage(cfg)
        self.resharding_refusal = reshard_refusal(self.zero_stage, str(zero.get("offload_optimizer", {}).get(
            "device", "none")), str(zero.get("offload_param", {}).get("device", "none")))
        self.resharding = "self" if self.resharding_refusal is None else None

    @property
    def grad_accum_scale(self) -> int:
        """DeepSpeed averages over ranks and divides by gradient_accumulation_steps in backward."""
        return self.world_size * self.engine.gradient_accumulation_steps()

    def train_step(self, micro_batches: list[dict[str, Any]], scale: float):
        import torch

        total = torch.zeros((), device=self.device)
        for mb in micro_batches:
            ce, _ = base.token_ce_sum(self.engine, mb, self.device, fused=self.fused_ce, varlen=self.varlen)
            self.engine.backward(ce * scale)
            self.engine.step()  # applies the optimizer only at the accumulation boundary
            total += ce.detach()
        gn = self.engine.get_global_grad_norm()
        gn = torch.tensor(float("nan") if gn is None else float(gn))
        return total, gn

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def eval_sums(self, batch: dict[str, Any]):
        return base.eval_ce_sum(self.engine, batch, self.device, varlen=self.varlen)

    def checkpoint_bytes(self, rank: int) -> int:
        """ZeRO's fp32 master weights and two Adam moments (12 bytes a parameter), partitioned from
        stage 1 on, and on rank 0 below stage 3 the 16-bit module (2 bytes a parameter); nothing
        when the optimizer state lives on the host (offload)."""
        if self.offloaded:
            return 0
        n = sum(getattr(p, "ds_numel", p.numel()) for p in self.module.parameters())
        opt = 12 * n // (self.world_size if self.zero_stage >= 1 else 1)
        return opt + (2 * n if self.zero_stage < 3 and rank == 0 else 0)

    def save(self, folder: Path, rank: int, writer: CheckpointWriter | None = None) -> None:
        """Every rank writes its own ZeRO shards under folder/ds (collective).

        A deferring ``writer`` stands in for DeepSpeed's torch.save for this one call (every file
        of ``save_checkpoint`` goes through ``checkpoint_engine.save``); another checkpoint engine
        chosen in the DeepSpeed config (its own asynchronous ones) is left to itself.
        """
        from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

        inner = self.engine.checkpoint_engine
        if writer is None or not writer.deferred or type(inner) is not TorchCheckpointEngine:
            self.engine.save_checkpoint(str(folder), tag="ds", client_state={}, save_latest=False)
            return
        from ..asyncsave import deferred_ds_checkpoint_engine

        self.engine.checkpoint_engine = deferred_ds_checkpoint_engine(inner, writer)
        try:
            self.engine.save_checkpoint(str(folder), tag="ds", client_state={}, save_latest=False)
        finally:
            self.engine.checkpoint_engine = inner

    def load(self, folder: Path) -> None:
        """Restore folder/ds; one written by another number of processes through a universal checkpoint."""
        saved = saved_dp_world(folder / "ds")
        if saved is None or saved == self.world_size:
            path, _ = self.engine.load_checkpoint(str(folder), tag="ds", load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        else:
            if self.resharding_refusal is not None:  # the manager refuses first; a direct caller too
                raise TrainError(f"{folder}: written by {saved} processes, this run has {self.world_size}, "
                                 f"and {self.resharding_refusal} cannot change the number of processes")
            path = self._load_universal(folder, saved)
        if path is None:
            raise TrainError(f"{folder}: DeepSpeed could not load the checkpoint (see the log above)")

    def _load_universal(self, folder: Path, saved: int) -> str | None:
        """Convert folder/ds (written by ``saved`` ranks) into folder/universal/ds once per node (its
        local rank 0: the restored checkpoint is node-local and every node downloaded all of it), then
        every rank loads its new partition from it (collective).

        What this relies on, in DeepSpeed 0.19.8 (line numbers of that release; the e2e test
        tests/e2e/test_ds_reshard.py fails if a later one changes the behaviour):

        - runtime/config.py:549: ``checkpoint.load_universal`` is read into
          ``DeepSpeedConfig.load_universal_checkpoint``, and runtime/engine.py:1712
          ``load_universal_checkpoint()`` reads that attribute at every use (not once at
          ``initialize``), so switching it on for this one ``load_checkpoint`` call is enough.
        - runtime/engine.py:4383 ``_get_all_ckpt_names`` globs the ``*model_states.pt`` files with
          pp rank 0; :4589 ``_load_checkpoint`` maps this rank onto one of the saved ones
          (``checkpoint_mp_rank * len(ckpt_list) // checkpoint_mp_world_size``) for the module, LR
          scheduler and step counters; :4733 ``_load_zero_checkpoint`` skips its
          dp-world-size check and hands the optimizer the folder instead of per-rank shards.
        - ZeRO-1/2: runtime/zero/stage_1_and_2.py:3664 ``_load_universal_checkpoint`` ->
          runtime/base_optimizer.py:332 ``load_hp_checkpoint_state_from_checkpoint_dir`` reads
          ``zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt`` and keeps this rank's fragment
          (checkpoint/universal_checkpoint.py:236 ``load_hp_checkpoint_state``); then
          runtime/engine.py:4488 ``optimizer.update_lp_params()`` refreshes the module's weights.
        - ZeRO-3: runtime/zero/stage3.py:3647 ``_load_universal_checkpoint`` -> :3653
          ``load_hp_checkpoint_state_from_checkpoint_dir_stage3`` fills the flat fp32 partition
          and the moments, and copies the fp32 partition into the 16-bit one.
        - The converter: checkpoint/ds_to_universal.py:1156 ``main`` (see :func:`to_universal`);
          it writes ``latest_universal`` beside the tag's folder (:1372), unused here (the tag is given).
        """
        import json
        import shutil

        import torch.distributed as dist

        ctx = self.ctx
        local_rank = 0 if ctx is None else ctx.local_rank
        out = folder / "universal" / "ds"
        error: str | None = None
        if local_rank == 0:
            try:
                shutil.rmtree(folder / "universal", ignore_errors=True)
                cost = to_universal(folder / "ds", out)
                log.info("DeepSpeed ZeRO-%d checkpoint of %d processes converted to a universal checkpoint for %d "
                         "in %.1f s (converter's peak memory %.2f GiB)", self.zero_stage, saved, self.world_size,
                         cost["seconds"], cost["peak_rss_bytes"] / 2**30)
                (folder / "universal" / "cost.json").write_text(json.dumps(cost))
            except Exception as exc:  # noqa: BLE001 - every rank raises it below, none waits forever
                error = str(exc) if isinstance(exc, TrainError) else f"{type(exc).__name__}: {exc}"
        if self.world_size > 1:
            errors: list[Any] = [None] * self.world_size
            dist.all_gather_object(errors, error, group=None if ctx is None else ctx.ctl_group)
            error = next((e for e in errors if e), None)
        if error:
            raise TrainError(error)
        cfg = self.engine._config
        before, cfg.load_universal_checkpoint = cfg.load_universal_checkpoint, True
        try:
            path, _ = self.engine.load_checkpoint(str(folder / "universal"), tag="ds", load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        finally:
            cfg.load_universal_checkpoint = before
        return path

    def export(self, folder: Path, rank: int, writer: CheckpointWriter | None = None) -> None:
        """A consolidated Hugging Face checkpoint (16-bit on GPU, safetensors shards); collective."""
        if self.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()  # gathers shards onto rank 0
        else:
            state = self.module.state_dict() if rank == 0 else None
        if rank == 0:
            self.module.save_pretrained(str(folder), state_dict=state, safe_serialization=True,
                                        max_shard_size="5GB")

    def export_merged(self, folder: Path, rank: int) -> None:  # pragma: no cover - not a LoRA engine
        raise NotImplementedError
