"""Phase timing and a torch.profiler window around any DeepSpeed training script, unchanged.

Also the benchmark shim for ftcluster runs: ``PROBE_SKIP_FINISH=1`` ends a run after its
last step without the final checkpoint and exports (an 8B ZeRO-3 checkpoint is ~112 GB;
checkpoint cost is measured by the cases that checkpoint every N steps), and
``PROBE_NO_POSITION_IDS=1`` drops the packed position_ids (an experiment: plain causal
attention, no block-diagonal mask), ``PROBE_BATCHES=1`` records every micro-batch's width and
real/learned token counts (speed.py's fill fraction). (Liger-Kernel, once tried here with
``PROBE_LIGER=1``, is the runtime's own now: ``FTCLUSTER_FUSED_CE``, train/speedups.py.)
``PROBE_PHASES=0`` turns the timing off.
``PROBE_DUMP=DIR`` records the run's initial weights and every micro-batch for the fidelity check
(benchmarks/fidelity.py); ``PROBE_ROUND_INIT=bfloat16`` rounds the built model's weights through
that dtype (a bf16 checkpoint's values). ``PROBE_STEP_PROFILE=1`` profiles any torch training
script (plain FSDP2 baseline or ftcluster's FSDP2 engine alike) from the end of optimizer step
``PROBE_FROM`` (default 5) to the end of step ``PROBE_FROM + 2``, through torch's global optimizer
step hook: rank 0 writes PROBE_OUT/TAG_profile.txt (CUDA and CPU time tables) and the two steps'
wall time, CUDA kernel time and the share of the wall time the GPU sat idle.

    torchrun ... -m benchmarks.ds_probe SCRIPT.py [args]           # e.g. the plain ds_baseline.py
    python -m ftcluster.train.launch ... -m benchmarks.ds_probe -m ftcluster.train --spec payload.json

It wraps ``DeepSpeedEngine.forward/backward/step`` so that, from optimizer step
``PROBE_FROM`` (default 3) on, each boundary is synchronised and timed: "host" (from the
end of the last step to the next forward: data, loss bookkeeping, metrics, collectives of
the loop), "forward", "loss" (forward end to backward start: the cross-entropy outside the
model), "backward", "step". Steps ``PROBE_PROFILE`` (default "6,7") run under torch.profiler
(CPU+CUDA); rank 0 writes the tables and a JSON summary to ``PROBE_OUT`` (default $OUT).
Synchronising costs the overlap between phases, so the step times here are a little higher
than unprobed ones; use them to compare phases, and metrics.jsonl / RESULT lines for speed.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time


def _patch_ftcluster() -> None:
    if os.environ.get("PROBE_SKIP_FINISH") == "1":
        from ftcluster.train.runtime import Trainer

        def finish(self) -> int:
            self.ckpt.wait()
            self._shutdown()
            return 0

        Trainer._finish = finish
    if os.environ.get("PROBE_NO_POSITION_IDS") == "1":
        import ftcluster.train.engines.base as E  # the engines call it through this module

        orig = E.token_ce_sum

        def token_ce_sum(model, batch, device, **kw):
            return orig(model, {k: v for k, v in batch.items() if k != "position_ids"}, device, **kw)

        E.token_ce_sum = token_ce_sum
    if os.environ.get("PROBE_BATCHES") == "1":
        _record_batches()
    if os.environ.get("PROBE_CPU_BF16") == "1":
        _cpu_bf16()
    if os.environ.get("PROBE_ROUND_INIT"):
        _round_init(os.environ["PROBE_ROUND_INIT"])
    if os.environ.get("PROBE_DUMP"):
        _dump_run(os.environ["PROBE_DUMP"])


def _cpu_bf16() -> None:
    """An experiment (benchmarks/fidelity.py): compute in bf16 on a CPU as on a GPU (the runtime
    computes in fp32 on CPUs), DeepSpeed's bf16 mode kept on."""
    import torch

    import ftcluster.train.engines.deepspeed as D
    import ftcluster.train.model as M

    orig_dtype, orig_cfg = M.compute_dtype, D.prepare_ds_config
    M.compute_dtype = lambda precision, device: torch.bfloat16 if precision == "bf16" else orig_dtype(precision, device)

    def prepare_ds_config(ds_config, device):
        cfg = orig_cfg(ds_config, device)
        cfg["bf16"] = ds_config.get("bf16", {"enabled": False})
        return cfg

    D.prepare_ds_config = prepare_ds_config


def _round_init(dtype_name: str) -> None:
    """An experiment (benchmarks/fidelity.py): the base model's floating-point weights rounded
    through ``dtype_name`` (e.g. bfloat16) as they are built, as a checkpoint stored in that dtype
    would give them."""
    import torch

    import ftcluster.train.model as M

    orig = M.load_base_model

    def load_base_model(*a, **kw):
        model = orig(*a, **kw)
        if not any(p.is_meta for p in model.parameters()):
            M.round_through(model, getattr(torch, dtype_name))
        return model

    M.load_base_model = load_base_model


def _dump_run(folder: str) -> None:
    """The fidelity check's record of an ftcluster run (benchmarks/fidelity.py): rank 0's initial
    weights as the engine built them (after LoRA is applied, for LoRA) in ``FOLDER/init.pt`` with
    the model's config, and every training micro-batch of every rank in ``FOLDER/b.rRANK.NNNNNN.pt``,
    so that a plain stack can train the same model on the same batches."""
    import torch

    import ftcluster.train.model as M
    from ftcluster.train.data import ShardedBatches

    os.makedirs(folder, exist_ok=True)
    rank = _rank()

    def save_init(model, lora: bool) -> None:
        params = list(model.parameters())
        if rank != 0 or not params or any(p.is_meta for p in params):
            return  # FSDP's meta structure on the other ranks; rank 0 builds the real weights
        base = model.get_base_model() if lora else model
        torch.save({"state": {k: v.detach().to("cpu", torch.float32).clone() for k, v in model.state_dict().items()},
                    "config": base.config.to_dict(), "vocab": getattr(base, "ftcluster_vocab", None),
                    "dtypes": sorted({str(p.dtype) for p in params}), "lora": lora},
                   os.path.join(folder, "init.pt"))

    orig_load, orig_lora = M.load_base_model, M.apply_lora

    def load_base_model(*a, **kw):
        model = orig_load(*a, **kw)
        save_init(model, False)
        return model

    def apply_lora(*a, **kw):
        model = orig_lora(*a, **kw)
        save_init(model, True)
        return model

    M.load_base_model, M.apply_lora = load_base_model, apply_lora
    orig_next, count = ShardedBatches.next_batch, [0]

    def next_batch(self):
        b = orig_next(self)
        torch.save({k: v.clone() for k, v in b.items() if isinstance(v, torch.Tensor)},
                   os.path.join(folder, f"b.r{rank}.{count[0]:06d}.pt"))
        count[0] += 1
        return b

    ShardedBatches.next_batch = next_batch


def _record_batches() -> None:
    """One line per training micro-batch of this rank to PROBE_OUT/TAG_batches.rRANK.jsonl: rows,
    width (the columns computed), real tokens (attention_mask) and learned ones (labels)."""
    from ftcluster.train.data import IGNORE_INDEX, ShardedBatches

    out = os.environ.get("PROBE_OUT") or os.environ.get("OUT") or "/tmp"
    path = os.path.join(out, f"{os.environ.get('PROBE_TAG', 'probe')}_batches.r{_rank()}.jsonl")
    fh = open(path, "w", buffering=1)  # noqa: SIM115 - open for the life of the process, a line per batch
    orig = ShardedBatches.next_batch

    def next_batch(self):
        b = orig(self)
        rows, width = b["input_ids"].shape
        fh.write(json.dumps({"rows": int(rows), "width": int(width), "real": int(b["attention_mask"].sum()),
                             "labels": int((b["labels"] != IGNORE_INDEX).sum())}) + "\n")
        return b

    ShardedBatches.next_batch = next_batch


def _install() -> None:
    import torch
    from deepspeed.runtime.engine import DeepSpeedEngine

    start = int(os.environ.get("PROBE_FROM", "3"))
    prof_steps = {int(s) for s in os.environ.get("PROBE_PROFILE", "6,7").split(",") if s}
    out = os.environ.get("PROBE_OUT") or os.environ.get("OUT") or "/tmp"
    tag = os.environ.get("PROBE_TAG", "probe")
    st = {"step": 0, "t": None, "rows": [], "cur": {}, "prof": None}

    def now() -> float:
        torch.cuda.synchronize()
        return time.perf_counter()

    def timed(name, fn):
        def wrapper(self, *a, **kw):
            if st["step"] < start:
                return fn(self, *a, **kw)
            t0 = now()
            if name == "forward":
                if st["t"] is not None:
                    st["cur"]["host"] = st["cur"].get("host", 0.0) + t0 - st["t"]
                if st["step"] in prof_steps and st["prof"] is None:
                    st["prof"] = torch.profiler.profile(
                        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
                    st["prof"].__enter__()
            elif name == "backward" and "fwd_end" in st:
                st["cur"]["loss"] = st["cur"].get("loss", 0.0) + t0 - st.pop("fwd_end")
            r = fn(self, *a, **kw)
            t1 = now()
            st["cur"][name] = st["cur"].get(name, 0.0) + t1 - t0
            if name == "forward" and self.module.training:
                st["fwd_end"] = t1
            st["t"] = t1
            return r
        return wrapper

    orig_fwd, orig_bwd, orig_step = DeepSpeedEngine.forward, DeepSpeedEngine.backward, DeepSpeedEngine.step
    fwd_t, bwd_t, step_t = timed("forward", orig_fwd), timed("backward", orig_bwd), timed("step", orig_step)

    def step(self, *a, **kw):
        before = self.global_steps
        r = step_t(self, *a, **kw)
        if self.global_steps == before:  # inside gradient accumulation: the step goes on
            return r
        if st["step"] >= start:
            row = {"step": st["step"], **{k: round(v, 4) for k, v in st["cur"].items()}}
            row["total"] = round(sum(st["cur"].values()), 4)
            st["rows"].append(row)
            if st["prof"] is not None and st["step"] + 1 not in prof_steps:
                st["prof"].__exit__(None, None, None)
                _dump_profile(st["prof"], out, tag)
                st["prof"] = None
        st["cur"] = {}
        st["step"] += 1
        return r

    DeepSpeedEngine.forward, DeepSpeedEngine.backward, DeepSpeedEngine.step = fwd_t, bwd_t, step
    import atexit

    atexit.register(_dump_rows, st, out, tag)


def _install_step_profile() -> None:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    start = int(os.environ.get("PROBE_FROM", "5"))
    out = os.environ.get("PROBE_OUT") or os.environ.get("OUT") or "/tmp"
    tag = os.environ.get("PROBE_TAG", "probe")
    st = {"n": 0, "prof": None, "t0": 0.0}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def hook(opt, args, kwargs) -> None:
        st["n"] += 1
        if st["n"] == start:
            sync()
            st["prof"] = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
            st["prof"].__enter__()
            st["t0"] = time.perf_counter()
        elif st["n"] == start + 2 and st["prof"] is not None:
            sync()
            wall = time.perf_counter() - st["t0"]
            st["prof"].__exit__(None, None, None)
            if _rank() == 0:
                _dump_profile(st["prof"], out, tag)
                kernels = sum(e.self_device_time_total for e in st["prof"].key_averages()
                              if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6
                line = {"tag": tag, "steps": 2, "wall_s": round(wall, 4), "cuda_kernel_s": round(kernels, 4),
                        "gpu_idle_share": round(1 - kernels / wall, 4)}
                with open(os.path.join(out, f"{tag}_stepprof.json"), "w") as fh:
                    json.dump(line, fh)
                print("[probe] step profile", json.dumps(line), flush=True)
            st["prof"] = None

    register_optimizer_step_post_hook(hook)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _dump_profile(prof, out: str, tag: str) -> None:
    if _rank() != 0:
        return
    ka = prof.key_averages()
    with open(os.path.join(out, f"{tag}_profile.txt"), "w") as fh:
        fh.write(ka.table(sort_by="cuda_time_total", row_limit=45, max_name_column_width=90))
        fh.write("\n\n")
        fh.write(ka.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=90))
    print(f"[probe] profile written to {out}/{tag}_profile.txt", flush=True)


def _dump_rows(st, out: str, tag: str) -> None:
    import torch

    if _rank() != 0 or not st["rows"]:
        return
    rows = st["rows"]
    keys = sorted({k for r in rows for k in r if k != "step"})
    med = {k: sorted(r.get(k, 0.0) for r in rows)[len(rows) // 2] for k in keys}
    ms = torch.cuda.memory_stats()
    summary = {"tag": tag, "median_s": med, "rows": rows,
               "alloc_retries": ms.get("num_alloc_retries"), "cuda_mallocs": ms.get("segment.all.allocated"),
               "cuda_frees": ms.get("segment.all.freed"), "ooms": ms.get("num_ooms")}
    with open(os.path.join(out, f"{tag}_phases.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    print("[probe]", tag, "median phase seconds", json.dumps(med), "alloc_retries", summary["alloc_retries"],
          "segments alloc/freed", summary["cuda_mallocs"], summary["cuda_frees"], flush=True)


def main() -> None:
    args = sys.argv[1:]
    if args[:2] == ["-m", "ftcluster.train"]:
        _patch_ftcluster()
    if os.environ.get("PROBE_PHASES", "1") == "1":
        _install()
    if os.environ.get("PROBE_STEP_PROFILE") == "1":
        _install_step_profile()
    if args[0] == "-m":
        sys.argv = [args[1]] + args[2:]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = args
        runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
    main()
