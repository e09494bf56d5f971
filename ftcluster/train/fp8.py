"""FP8 matmuls for full fine-tuning (``training.fp8``): torchao's float8 training.

Every ``nn.Linear`` inside the decoder layers becomes torchao's ``Float8Linear``: its weight stays
where it was (bf16 compute weights, the engine's fp32 master copy and optimizer unchanged), and at
each matmul the input, the weight and, in backward, the output's gradient are cast to float8 (e4m3
forward, e5m2 for gradients) with scales computed on the fly: one per tensor (``tensorwise``, the
fastest) or one per row (``rowwise``, closer to bf16). The output layer (``lm_head``) and the
embeddings stay bf16, as in torchtitan's float8 recipe. Checkpoints and exports keep the same keys
and dtypes as without it (``Float8Linear`` stores a plain weight).

On a CPU it runs torchao's emulation (the same casts and scales, the matmul in high precision), so
the CPU tests check the wiring and what the rounding does to the loss; the speed is the GPU's.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from ..errors import TrainError

log = logging.getLogger("ftcluster.train")


def _in_decoder_layer(fqn: str) -> bool:
    return ".layers." in f".{fqn}."


def apply_fp8(model: Any, recipe: str | None, device: Any) -> int:
    """Swap the decoder layers' linear layers for float8 ones (before compile and FSDP's sharding);
    returns how many were swapped (0 when ``recipe`` is None)."""
    if recipe is None:
        return 0
    import torch

    try:
        import torchao
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
        from torchao.float8.float8_linear import Float8Linear
    except ImportError as exc:
        raise TrainError("training.fp8: needs torchao where the job runs (pip install 'ftcluster[gpu]'); "
                         f"it is not importable here ({exc}); install it or remove training.fp8") from exc
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            raise TrainError(f"training.fp8: needs a GPU of compute capability 8.9 or newer (H100, H200, L40S); "
                             f"{torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]}: remove training.fp8")
        emulate = False
    else:
        emulate = True
    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=emulate)

    def keep(module: Any, fqn: str) -> bool:
        # float8 matmuls need both dimensions a multiple of 16 (torch._scaled_mm)
        return (isinstance(module, torch.nn.Linear) and _in_decoder_layer(fqn)
                and module.in_features % 16 == 0 and module.out_features % 16 == 0)

    convert_to_float8_training(model, config=config, module_filter_fn=keep)
    n = sum(isinstance(m, Float8Linear) for m in model.modules())
    if n == 0:
        raise TrainError("training.fp8: no linear layer of this model's decoder layers can compute in float8 (their "
                         "dimensions must be multiples of 16); remove training.fp8")
    log.info("training.fp8: %d linear layers of the decoder layers compute in float8 (%s scaling, torchao %s%s)",
             n, recipe, torchao.__version__, "; emulated: no GPU" if emulate else "")
    return n
