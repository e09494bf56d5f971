"""The DeepSpeed config of a full fine-tune: generated from the spec, the user's file merged over it.

:func:`resolved_deepspeed_config` is what the DeepSpeed engine recipe (:mod:`.engines`) contributes
to the launch plan; :func:`ftcluster.plan.launch.compile_plan` calls it once per distinct spec (the
job's, and each variant's) and every reader (payload, local backend, renderers) takes it from the
plan. Pure but for reading ``deepspeed.config_file``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
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


def _user_ds_file(spec: Any) -> dict[str, Any]:
    path = Path(spec.deepspeed.config_file)
    if not path.is_absolute() and spec._source_file and not spec._source_file.startswith("<"):
        path = Path(spec._source_file).parent / path
    src = spec._source_file or "<spec>"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError([Problem(src, None, None, "deepspeed.config_file", f"{path}: no such file; the path is relative to the spec file")]) from None
    except (OSError, ValueError) as exc:
        raise SpecError([Problem(src, None, None, "deepspeed.config_file", f"{path}: not a readable JSON file ({exc})")]) from None
    if not isinstance(data, dict):
        raise SpecError([Problem(src, None, None, "deepspeed.config_file", f"{path}: must hold a JSON object")])
    return data


def resolved_deepspeed_config(spec: Any) -> dict[str, Any] | None:
    """Generated DeepSpeed config with the user's file merged over it; None for a spec without a
    ``deepspeed`` section (LoRA). Prefer ``compile_plan(spec).deepspeed``: resolved once there."""
    if getattr(spec, "deepspeed", None) is None:
        return None
    cfg = deepspeed_config(spec)
    if spec.deepspeed.config_file:
        cfg = deep_merge(cfg, _user_ds_file(spec))
    return cfg
