"""The DeepSpeed config of a full fine-tune: generated from the spec, the user's file merged over it.

:func:`resolved_deepspeed_config` is what the DeepSpeed engine recipe (:mod:`.engines`) contributes
to the launch plan; :func:`ftcluster.plan.launch.compile_plan` calls it once per distinct spec (the
job's, and each variant's) and every reader (payload, local backend, renderers) takes it from the
plan. Pure but for reading ``deepspeed.config_file`` (:mod:`.dsfile`: refused where it disagrees
with the spec, "auto" filled in).
"""

from __future__ import annotations

import copy
from typing import Any

from ..errors import Problem, SpecError
from .facts import global_batch


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``over`` onto a copy of ``base`` (``over`` wins)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _offload(device: str, nvme_path: str | None) -> dict[str, Any]:
    d: dict[str, Any] = {"device": device, "pin_memory": True}
    if device == "nvme":
        d["nvme_path"] = nvme_path
    return d


def deepspeed_config(spec: Any) -> dict[str, Any]:
    """The DeepSpeed JSON generated from a full fine-tune spec (before the user's file).

    The optimizer and LR schedule stay with the training loop (client optimizer), so the
    same loop serves ZeRO 0-3; a user file that adds `optimizer` takes precedence.
    """
    ds, tr = spec.deepspeed, spec.training
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": True,
        "reduce_bucket_size": ds.reduce_bucket_size,
    }
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(ds.offload_optimizer, ds.nvme_path)
    if ds.zero_stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": ds.reduce_bucket_size // 10,
            "stage3_param_persistence_threshold": 100_000,
            # Consolidated 16-bit weights on save: needed for HF checkpoints and to
            # avoid empty adapters (huggingface/peft #2892).
            "stage3_gather_16bit_weights_on_model_save": True,
        })
        if ds.offload_params != "none":
            zero["offload_param"] = _offload(ds.offload_params, ds.nvme_path)
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": tr.gradient_accumulation_steps,
        "train_batch_size": global_batch(spec),
        "gradient_clipping": tr.max_grad_norm,
        "bf16": {"enabled": tr.precision == "bf16"},
        "fp16": {"enabled": tr.precision == "fp16"},
        "zero_optimization": zero,
        "steps_per_print": 1_000_000_000,  # the loop logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    return cfg


def resolved_deepspeed_config(spec: Any) -> dict[str, Any] | None:
    """Generated DeepSpeed config with the user's file merged over it; None for a spec without a
    ``deepspeed`` section (LoRA). Prefer ``compile_plan(spec).deepspeed``: resolved once there."""
    if getattr(spec, "deepspeed", None) is None:
        return None
    cfg = deepspeed_config(spec)
    if spec.deepspeed.config_file:
        from .dsfile import file_problems, read_user_file, resolve_auto

        user = read_user_file(spec)
        problems = file_problems(spec, user, deepspeed_config)
        if problems:
            raise SpecError(problems)
        cfg = deep_merge(cfg, resolve_auto(user.data, spec, deepspeed_config))
    return cfg


def config_file_problems(spec: Any) -> list[Problem]:
    """What ``validate`` refuses in the ``deepspeed.config_file`` of a job spec or pipeline: of the job,
    each of its variants and each training stage (:mod:`.dsfile`); [] where there is none."""
    from ..spec.pipeline import Pipeline
    from ..spec.variants import resolve_variants

    jobs = [st.spec for st in spec.stages if not st.prepares] if isinstance(spec, Pipeline) else [spec]
    out: list[Problem] = []
    for job in jobs:
        for s in (job, *resolve_variants(job)):
            if getattr(s, "deepspeed", None) is None or not s.deepspeed.config_file:
                continue
            try:
                resolved_deepspeed_config(s)
            except SpecError as exc:
                out += [p for p in exc.problems if str(p) not in {str(q) for q in out}]
    return out
