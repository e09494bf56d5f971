"""Variable-length attention for packed batches (issue #10): each packed example attends only
to itself, computed without a dense mask.

With ``attn_implementation: sdpa`` transformers turns packed ``position_ids`` into a
``batch x seq x seq`` block-diagonal mask, and SDPA with a mask computes every block of the
square, the blocks between examples included, and none of the causal skipping. Here the
runtime passes the examples' boundaries instead (``cu_seq_lens_q/k``: cumulative lengths over
the flattened batch, computed on the host from the position ids, so no device sync) and the
attention runs FlashAttention-2's variable-length kernel, which ships inside PyTorch
(``aten::_flash_attention_forward`` with cumulative lengths; GQA's fewer key/value heads are
used as they are). On a batch of four 512-token examples in a 2,048-token row that is an
eighth of the square's work.

It is registered with transformers as the attention implementation ``ftcluster_varlen``:

* a forward that carries ``cu_seq_lens_q`` (the training and evaluation losses, see
  :func:`varlen_kwargs`) runs the variable-length kernel: FlashAttention on CUDA, one causal
  SDPA per example elsewhere (the same result, used by the CPU tests);
* any other forward (generation with a cache, a left-padded batch whose mask is passed on)
  falls back to transformers' SDPA with the mask it built, so nothing changes there.

:func:`apply_varlen_attention` switches a model to it on CUDA when the model uses SDPA, the
kernel exists in this torch, and ``FTCLUSTER_VARLEN`` is not ``0``.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

log = logging.getLogger("ftcluster.train")

NAME = "ftcluster_varlen"
ENV = "FTCLUSTER_VARLEN"  # ftcluster.plan.speedups.VARLEN


def available() -> bool:
    """True when this torch has FlashAttention's variable-length op (CUDA builds, torch >= 2.5)."""
    import torch

    return hasattr(torch.ops.aten, "_flash_attention_forward") and hasattr(torch.ops.aten, "_flash_attention_backward")


def cu_seqlens(position_ids: Any) -> Any:
    """Cumulative example lengths (int32, with a leading 0) over the flattened ``batch x seq``
    ``position_ids``: an example starts where its position is 0 and at every row's start."""
    import torch

    b, s = position_ids.shape
    starts = position_ids.reshape(-1) == 0
    starts[::s] = True
    idx = torch.nonzero(starts).reshape(-1)
    return torch.cat([idx, torch.tensor([b * s])]).to(torch.int32)


def varlen_kwargs(position_ids: Any, device: Any) -> dict[str, Any]:
    """The model keyword arguments that select the variable-length path for this batch.

    ``position_ids`` is the batch's host tensor; the maximum length passed to the kernel is the
    row width (an upper bound, which the kernel accepts), so it is the same for every batch of a
    width and a compiled graph does not specialise on it."""
    cu = cu_seqlens(position_ids).to(device, non_blocking=True)
    width = int(position_ids.shape[1])
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": width, "max_length_k": width}


def _flash_varlen():
    import torch

    class FlashVarlen(torch.autograd.Function):
        """Causal FlashAttention-2 over examples given by cumulative lengths; (tokens, heads, dim)."""

        @staticmethod
        def forward(ctx, q, k, v, cu, max_len, scale):  # type: ignore[override]
            out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
                q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale)
            ctx.save_for_backward(q, k, v, out, lse, cu, rng, unused)
            ctx.max_len, ctx.scale = max_len, scale
            return out

        @staticmethod
        def backward(ctx, grad):  # type: ignore[override]
            q, k, v, out, lse, cu, rng, unused = ctx.saved_tensors
            dq, dk, dv = torch.ops.aten._flash_attention_backward(
                grad.contiguous(), q, k, v, out, lse, cu, cu, ctx.max_len, ctx.max_len, 0.0, True, rng, unused,
                scale=ctx.scale)
            return dq, dk, dv, None, None, None

    return FlashVarlen


_FLASH: Any = None


def _per_example(q: Any, k: Any, v: Any, cu: Any, scale: float | None) -> Any:
    """The same attention as the kernel, one causal SDPA per example (CPU and tests)."""
    import torch
    import torch.nn.functional as F

    rep = q.shape[1] // k.shape[1]
    out = []
    bounds = cu.tolist()
    for a, b in itertools.pairwise(bounds):
        qi, ki, vi = (x[a:b].transpose(0, 1) for x in (q, k, v))
        if rep > 1:
            ki, vi = ki.repeat_interleave(rep, 0), vi.repeat_interleave(rep, 0)
        out.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(out)


def flash_limits(dtype: Any, head_dim: int) -> bool:
    """FlashAttention-2's limits: fp16/bf16 and head_dim <= 256."""
    import torch

    return dtype in (torch.float16, torch.bfloat16) and head_dim <= 256


def _flash_ok(query: Any) -> bool:
    """A CUDA query the kernel takes."""
    return query.is_cuda and flash_limits(query.dtype, query.shape[-1])


def attention_forward(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                      scaling: float | None = None, is_causal: bool | None = None, **kwargs: Any):
    """transformers' attention interface: ``query`` (batch, heads, seq, dim); returns the output
    as (batch, seq, heads, dim), as the SDPA forward does, and no weights."""
    cu = kwargs.get("cu_seq_lens_q")
    if (cu is None or query.shape[2] == 1 or (dropout and module.training)
            or (query.is_cuda and not _flash_ok(query))):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    global _FLASH
    b, h, s, d = query.shape
    q = query.transpose(1, 2).reshape(b * s, h, d)
    k = key.transpose(1, 2).reshape(b * s, key.shape[1], d)
    v = value.transpose(1, 2).reshape(b * s, value.shape[1], d)
    if q.is_cuda:
        if _FLASH is None:
            _FLASH = _flash_varlen()
        out = _FLASH.apply(q, k, v, cu, int(kwargs.get("max_length_q") or s), scaling)
    else:
        out = _per_example(q, k, v, cu, scaling)
    return out.reshape(b, s, h, d), None


def register() -> None:
    """Make ``ftcluster_varlen`` a transformers attention implementation (its mask: SDPA's)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def enable(model: Any) -> None:
    """Switch ``model`` (before LoRA or DeepSpeed wrap it) to the variable-length attention."""
    register()
    model.config._attn_implementation = NAME
    model.ftcluster_varlen = True


def apply_varlen_attention(model: Any, device: Any) -> bool:
    """On CUDA, for a model computing attention with SDPA: the variable-length kernel; True if applied."""
    model.ftcluster_varlen = False
    import os

    from ..plan.speedups import varlen_on  # the switch-on decision the launch plan and the planner share

    if not varlen_on(device.type == "cuda", getattr(model.config, "_attn_implementation", None), os.environ):
        return False
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    if not flash_limits(model.dtype, head_dim):
        log.info("variable-length attention: needs fp16/bf16 and head_dim <= 256 (FlashAttention-2); this model "
                 "computes in %s with head_dim %d, so packed batches use SDPA with a block mask",
                 str(model.dtype).replace("torch.", ""), head_dim)
        return False
    if not available():
        log.info("variable-length attention: this torch has no FlashAttention varlen op; packed batches use "
                 "SDPA with a block mask")
        return False
    enable(model)
    log.info("variable-length attention: packed examples attend within themselves, no dense mask (%s=0: off)", ENV)
    return True
