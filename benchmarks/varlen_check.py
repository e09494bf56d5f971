"""GPU check of the variable-length attention (ftcluster/train/varlen.py), issue #10.

1. Correctness: a small random Llama in bf16 on a packed batch, loss and gradients through
   transformers' SDPA with its block-diagonal mask against FlashAttention's varlen kernel.
2. Speed of the attention alone at the 8B shape (32 query / 8 key-value heads, head dim 128,
   2 x 2048 tokens, examples of DOC tokens): forward + backward of transformers' SDPA with the
   packed mask (what ftcluster ran before), the varlen kernel, and plain causal SDPA (what the
   plain stack runs: no example boundaries at all).

    python benchmarks/varlen_check.py [--doc 512]
Exit 1 when the two paths disagree beyond bf16 noise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def packed_batch(b: int, s: int, doc: int, vocab: int, gen):
    import torch

    ids = torch.randint(3, vocab, (b, s), generator=gen)
    pos = torch.arange(s).remainder(doc).expand(b, s).clone()
    pos[1] = torch.arange(s).remainder(doc // 2 + 37)  # another row with other lengths
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": pos, "attention_mask": torch.ones_like(ids)}


def correctness(doc: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ftcluster.train import varlen as V
    from ftcluster.train.engines import base as E

    dev = torch.device("cuda")
    cfg = LlamaConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096,
                      attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dev, torch.bfloat16).train()
    data = packed_batch(2, 2048, doc, 4096, torch.Generator().manual_seed(1))

    def run(varlen: bool):
        model.zero_grad(set_to_none=True)
        ce, n = E.token_ce_sum(model, data, dev, varlen=varlen)
        ce.backward()
        return float(ce), {k: p.grad.float().clone() for k, p in model.named_parameters()}

    ce_d, g_d = run(False)
    V.enable(model)
    ce_v, g_v = run(True)
    worst = max(float((g_v[k] - g_d[k]).norm() / g_d[k].norm().clamp_min(1e-12)) for k in g_d)
    return {"loss_dense": ce_d, "loss_varlen": ce_v, "loss_rel_diff": abs(ce_v - ce_d) / abs(ce_d),
            "grad_worst_rel_norm_diff": worst}


def speed(doc: int, reps: int = 20) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ftcluster.train import varlen as V

    dev, dt = torch.device("cuda"), torch.bfloat16
    b, s, h, kv, d = 2, 2048, 32, 8, 128
    gen = torch.Generator().manual_seed(2)
    pos = packed_batch(b, s, doc, 100, gen)["position_ids"]
    q = torch.randn(b, h, s, d, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(b, kv, s, d, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(b, kv, s, d, device=dev, dtype=dt, requires_grad=True)

    class Mod(torch.nn.Module):
        is_causal = True
        num_key_value_groups = h // kv

    mod = Mod().train()
    seg = (pos == 0).cumsum(1).to(dev)  # the boolean block-diagonal causal mask transformers builds for SDPA
    mask = ((seg[:, :, None] == seg[:, None, :]) & torch.ones(s, s, dtype=torch.bool, device=dev).tril())[:, None]
    kw = V.varlen_kwargs(pos, dev)

    def t(fn) -> float:
        for _ in range(3):
            fn().sum().backward()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn().sum().backward()
        torch.cuda.synchronize()
        return round((time.perf_counter() - t0) / reps * 1e3, 3)

    return {
        "sdpa_packed_mask_ms": t(lambda: sdpa_attention_forward(mod, q, k, v, mask, scaling=d ** -0.5)[0]),
        "varlen_ms": t(lambda: V.attention_forward(mod, q, k, v, None, scaling=d ** -0.5, **kw)[0]),
        "sdpa_causal_no_docs_ms": t(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)),
        "doc_tokens": doc, "examples": int(kw["cu_seq_lens_q"].numel() - 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--doc", type=int, default=512)
    args = ap.parse_args()
    import torch

    out = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0)}
    out.update(correctness(args.doc))
    out.update(speed(args.doc))
    print(json.dumps(out))
    ok = out["loss_rel_diff"] < 2e-2 and out["grad_worst_rel_norm_diff"] < 5e-2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
