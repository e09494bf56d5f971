"""Does torch's AdamW update every element of a tensor with 2^31 or more elements? (GPU)

DeepSpeed ZeRO-1/2 hands the client optimizer ONE flat fp32 partition per parameter group: on one GPU
the 8B shape cut to 8 layers is a single 2.8-billion-element tensor. Kernels that index with 32-bit
integers silently skip or corrupt what lies past 2^31 (DeepSpeed's own FusedAdam did: deepspeedai/
DeepSpeed#7640). This takes one AdamW step with grad 1 on zeros of N elements and reports, per
implementation (fused, foreach, single-tensor), whether the first, the 2^31-th and the last
elements moved by -lr as they must.

Measured on an H100 with torch 2.11 (2026-12-07, benchmarks/results/h100-2026-12-07-fsdp/adam.out): fused,
foreach and single-tensor AdamW all update all 2,147,487,744 elements. So ftcluster keeps the fused kernel on
ZeRO's flat partition; the single-tensor path, tried on the 8-layer cut, cost 10 % of the step and 7.6 GB.

    python benchmarks/fused_adam_check.py [--numel N] [--device cuda]
"""

from __future__ import annotations

import argparse
import json

import torch


def check(impl: str, numel: int, device: str) -> dict:
    p = torch.zeros(numel, device=device, requires_grad=True)
    p.grad = torch.ones(numel, device=device)
    kw = {"fused": impl == "fused", "foreach": impl == "foreach"}
    opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.0, **kw)
    opt.step()
    probe = [0, min(2**31 - 1, numel - 1), min(2**31, numel - 1), numel - 1]
    got = {i: float(p.detach()[i]) for i in probe}
    moved = (p.detach() != 0).sum().item()
    del opt, p
    torch.cuda.empty_cache() if device == "cuda" else None
    return {"impl": impl, "numel": numel, "moved": moved, "all_moved": moved == numel,
            "values": {str(k): v for k, v in got.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--numel", type=int, default=2**31 + 4096)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--impls", default="fused,foreach,single")
    a = ap.parse_args()
    for impl in a.impls.split(","):
        print("ADAMCHECK " + json.dumps(check(impl, a.numel, a.device)), flush=True)


if __name__ == "__main__":
    main()
