"""Test helper, one process of a torchrun: build the FSDP2 engine of a payload, fill its weights, and
write what it cost this rank's host memory into ``<out>/rank-<rank>.json`` (tests/e2e/test_fsdp_init.py).

Recorded: the model's full size in bytes (fp32 parameters), this rank's peak RSS growth over the
build and the weight broadcast (``ru_maxrss``: the process's high-water mark), its resident memory
after the broadcast (after ``malloc_trim``, so freed heap pages count as freed), its shard's bytes,
whether the rotary ``inv_freq`` equals a fresh computation, the loss of one fixed batch, and (rank 0)
the sha256 of the whole state dict gathered from the shards.

Usage: python -m torch.distributed.run --nproc-per-node=2 tests/support/fsdp_init_probe.py PAYLOAD OUT
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import resource
import sys
from pathlib import Path
from typing import Any


def rss_bytes() -> int:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(payload_path: str, out: str) -> None:
    import logging

    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    from ftcluster.spec.loader import spec_from_dict
    from ftcluster.train import model as M
    from ftcluster.train.distributed import init_distributed
    from ftcluster.train.engines import build_engine
    from ftcluster.train.tokenizer import load_or_train_tokenizer

    payload = json.loads(Path(payload_path).read_text())
    spec = spec_from_dict(payload["spec"])
    ctx = init_distributed(spec)
    cache = Path(os.environ["FTCLUSTER_CACHE"])
    tokenizer = load_or_train_tokenizer(spec, cache / "tokenizers")
    dtype = M.compute_dtype(spec.training.precision, ctx.device)
    # The modules the build imports (about 100 MB of code and tables) are not the model's memory.
    import torch.distributed.checkpoint.state_dict  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import ftcluster.train.engines.fsdp  # noqa: F401
    import ftcluster.train.speedups  # noqa: F401
    import ftcluster.train.varlen  # noqa: F401
    ctx.barrier()
    before, peak_before = rss_bytes(), peak_bytes()
    engine, _ = build_engine(spec, payload, tokenizer, dtype, ctx, cache, 4)
    getattr(engine, "materialize", lambda: None)()
    ctx.barrier()
    peak_growth = peak_bytes() - max(peak_before, before)
    after = rss_bytes()
    model = engine.module
    full = sum(p.numel() * 4 for p in model.parameters())  # DTensors: numel is the whole parameter's
    shard = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    rotary = model.model.rotary_emb
    fresh, _ = type(rotary).compute_default_rope_parameters(model.config)
    ids = torch.arange(64).reshape(1, 64) % len(tokenizer)
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    digest = hashlib.sha256()
    for key in sorted(whole):  # rank 0 gets the tensors (collective), the others an empty dict
        t: Any = whole[key]
        digest.update(key.encode() + str(t.dtype).encode() + t.numpy().tobytes())
    rec = {"rank": ctx.rank, "weights_sha256": digest.hexdigest() if whole else None, "full_bytes": full, "shard_bytes": shard, "peak_growth": peak_growth,
           "resident_growth": after - before, "inv_freq_ok": bool(torch.equal(rotary.inv_freq.cpu(), fresh)),
           "loss": loss,
           "tied": model.lm_head.weight is model.model.embed_tokens.weight}
    Path(out, f"rank-{ctx.rank}.json").write_text(json.dumps(rec))
    ctx.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
