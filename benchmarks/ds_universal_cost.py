"""What converting a DeepSpeed ZeRO checkpoint into a universal one costs (the resharded resume of
ftcluster/train/engines/deepspeed.py: ``to_universal``), on CPU.

Writes a ZeRO checkpoint of a random Llama model of the given size from N processes (gloo, fp32,
torch AdamW, one optimizer step), then rank 0 converts it as a resume on another number of
processes does, and prints one JSON line: parameters, checkpoint bytes, seconds, the converter's
peak resident memory and the universal checkpoint's bytes.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node=2 \\
        benchmarks/ds_universal_cost.py --stage 2 --hidden 768 --layers 12 --out /tmp/dsu
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--out", default="/tmp/ds-universal-cost")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ftcluster.train.engines.deepspeed import to_universal

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3, num_hidden_layers=args.layers,
                      num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 64),
                      vocab_size=args.vocab, max_position_embeddings=256)
    ds_cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": args.stage}, "bf16": {"enabled": False}, "zero_allow_untested_optimizer": True}
    keep = None
    if args.stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig({**ds_cfg, "train_batch_size": world})
        with deepspeed.zero.Init(config_dict_or_path={**ds_cfg, "train_batch_size": world}):
            model = LlamaForCausalLM(cfg)
    else:
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
    params = [p for p in model.parameters()]
    n = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=1e-4), config=ds_cfg)
    ids = torch.randint(0, args.vocab, (1, 64))
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    root = Path(args.out)
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
    torch.distributed.barrier()
    engine.save_checkpoint(str(root / "ckpt"), tag="ds", save_latest=False)
    torch.distributed.barrier()
    if rank == 0:
        cost = to_universal(root / "ckpt" / "ds", root / "universal" / "ds")
        print(json.dumps({"stage": args.stage, "saved_by": world, "params": n,
                          "checkpoint_bytes": folder_bytes(root / "ckpt" / "ds"),
                          "universal_bytes": folder_bytes(root / "universal" / "ds"), **cost}), flush=True)
        shutil.rmtree(root, ignore_errors=True)
    torch.distributed.barrier()
    del keep


if __name__ == "__main__":
    main()
