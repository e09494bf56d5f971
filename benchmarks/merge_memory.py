"""The streaming LoRA merge under a hard memory limit that peft's merge_and_unload() cannot run in.

    python benchmarks/merge_memory.py [--limit-gib 1.5] [--layers 12] [--markdown docs/BENCHMARKS.md]

Builds, under a temporary folder in /tmp (deleted at the end), a random Llama base whose fp32
safetensors weights are more than twice the limit (written tensor by tensor, never whole in
memory) and a LoRA adapter for it in peft's format (r 16 on every Linear of the decoder, random
A and B), then runs three child processes:

1. ``ftcluster.train.merge.merge_folder`` under the limit;
2. peft's ``PeftModel.from_pretrained(base).merge_and_unload()`` under the same limit;
3. peft's merge without a limit, compared tensor by tensor with the streamed output.

The limit is ``RLIMIT_AS`` (address space), set in each child's ``preexec_fn``: this host's
memory cgroup belongs to the machinery that runs it (cgroup v1, not ours to write) and
``RLIMIT_DATA`` does not cover file mappings, which is how transformers reads safetensors. The limit
covers the whole process (``--limit-gib``, default 1.5 GiB), imports included: torch reserves address
space when imported (measured first, in a child that only imports: ``VmPeak``), so what is left for the
merge is less than that. Each child reports its peak resident memory (``VmHWM`` of /proc/self/status) at its end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's ftcluster, in this process and (PYTHONPATH) the children
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GiB = 2**30


def status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def llama_config(layers: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                       num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2, dtype="float32")


def build(work: Path, layers: int, rank: int) -> tuple[Path, Path, int]:
    """The base (shards of at most 1 GiB, with an index) and the adapter; returns their paths and the base's bytes."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from ftcluster.train.tensorfile import ShardWriter

    config = llama_config(layers)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    params = [(n, tuple(p.shape)) for n, p in skeleton.named_parameters()]
    base = work / "base"
    base.mkdir()
    config.save_pretrained(str(base))
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in params:
        n = 4 * int(torch.Size(shape).numel())
        if shards[-1] and size + n > GiB:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        w = ShardWriter(base / fname, [(n, "F32", s) for n, s in shard], {"format": "pt"})
        for name, shape in shard:
            t = torch.ones(shape) if "norm" in name else torch.randn(shape, generator=g).mul_(0.02)
            w.write(name, t)
            weight_map[name] = fname
            total += 4 * t.numel()
        w.close()
    (base / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    adapter = work / "adapter"
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, task_type="CAUSAL_LM").save_pretrained(str(adapter))
    from safetensors.torch import save_file

    lora = {}
    for name, shape in params:
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in TARGETS:
            lora[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, shape[1], generator=g) * 0.02
            lora[f"base_model.model.{module}.lora_B.weight"] = torch.randn(shape[0], rank, generator=g) * 0.02
    save_file(lora, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    return base, adapter, total


# ------------------------------------------------------------------ children (run as this file with --child)

def child(args: list[str]) -> None:
    """One measured job; prints one JSON line: ok, error, seconds, peak RSS, address space."""
    import torch

    torch.set_num_threads(1)
    what = args[0]
    t0 = time.perf_counter()
    out: dict[str, Any] = {"what": what}
    try:
        if what == "import":
            import peft  # noqa: F401
            import transformers  # noqa: F401

            import ftcluster.train.merge  # noqa: F401
        elif what == "stream":
            from ftcluster.train.merge import merge_folder

            info = merge_folder(Path(args[1]), Path(args[2]), Path(args[3]))
            out["lora_merged"] = info.lora_merged
            out["bytes"] = info.total_bytes
        elif what in ("peft", "peft-compare"):
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            out["stage"] = "loading the base (from_pretrained)"
            model = AutoModelForCausalLM.from_pretrained(args[1], dtype=torch.float32)
            out["stage"] = "loading the adapter"
            model = PeftModel.from_pretrained(model, args[2])
            out["stage"] = "merge_and_unload"
            merged = model.merge_and_unload()
            out["stage"] = "done"
            if what == "peft-compare":
                out.update(compare(merged.state_dict(), Path(args[3])))
        out["ok"] = True
    except (MemoryError, RuntimeError, OSError) as exc:  # torch's allocator raises RuntimeError when it gets no memory
        out["ok"] = False
        out["error"] = f"{type(exc).__name__}: {re.sub(r' from file <[^>]*>', '', str(exc).splitlines()[0])[:120]}"
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["peak_rss"] = status("VmHWM")
    out["peak_vm"] = status("VmPeak")
    print(json.dumps(out), flush=True)


def compare(state: dict[str, Any], streamed: Path) -> dict[str, Any]:
    """peft's merged tensors against the streamed files: how many are bit-equal, the largest difference."""
    from ftcluster.train.tensorfile import read_header, read_tensor

    equal = n = 0
    worst = 0.0
    for path in sorted(streamed.glob("*.safetensors")):
        h = read_header(path)
        with open(path, "rb") as f:
            for name in h.entries:
                t = read_tensor(f, h, name)
                ref = state[name]
                n += 1
                equal += bool((t == ref).all())
                worst = max(worst, float((t.float() - ref.float()).abs().max()))
    return {"tensors_compared": n, "bit_equal": equal, "max_abs_diff": worst, "tensors_in_peft": len(state)}


def run_child(args: list[str], limit: int | None, timeout: float = 1800) -> dict[str, Any]:
    def preexec() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2", "PYTHONPATH": str(ROOT),
           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env,
                          preexec_fn=preexec, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    tail = (proc.stderr.strip().splitlines() or [""])[-1][:160]
    return {"what": args[0], "ok": False, "error": f"exit status {proc.returncode} (killed: {proc.returncode < 0}) {tail}"}


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit-gib", type=float, default=1.5,
                    help="RLIMIT_AS of each limited child: the whole process, imports included")
    ap.add_argument("--layers", type=int, default=14, help="decoder layers (14: 3.17 GiB of fp32 weights)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--markdown", type=Path, default=None, help="append the result section to this file")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="ftcluster-merge-bench-", dir="/tmp"))
    try:
        t0 = time.perf_counter()
        base, adapter, size = build(work, args.layers, args.rank)
        built = time.perf_counter() - t0
        imports = run_child(["import"], None)
        limit = int(args.limit_gib * GiB)
        if limit < imports["peak_vm"] + GiB // 4:
            raise SystemExit(f"--limit-gib {args.limit_gib}: the imports alone take {gib(imports['peak_vm'])} of "
                             "address space; give at least 0.25 GiB more")
        print(f"base {gib(size)} of fp32 weights in {len(list(base.glob('*.safetensors')))} shards (built in "
              f"{built:.0f} s); the imports take {gib(imports['peak_vm'])} of address space, "
              f"{gib(imports['peak_rss'])} resident; RLIMIT_AS = {gib(limit)}", flush=True)
        stream = run_child(["stream", str(base), str(adapter), str(work / "streamed")], limit)
        print("stream", stream, flush=True)
        peft_limited = run_child(["peft", str(base), str(adapter)], limit)
        print("peft under the limit", peft_limited, flush=True)
        peft_free = run_child(["peft-compare", str(base), str(adapter), str(work / "streamed")], None)
        print("peft without a limit", peft_free, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [("ftcluster merge_folder (streaming)", "RLIMIT_AS " + gib(limit), stream),
            ("peft merge_and_unload", "RLIMIT_AS " + gib(limit), peft_limited),
            ("peft merge_and_unload", "none", peft_free)]
    table = ["| merge | limit | result | time | peak RSS (VmHWM) | peak address space (VmPeak) |",
             "|---|---|---|---|---|---|"]
    for name, lim, r in rows:
        result = "ok" if r.get("ok") else f"failed in {r.get('stage', '?')}: {r.get('error', '')}"
        table.append(f"| {name} | {lim} | {result} | {r.get('seconds', '-')} s | "
                     f"{gib(r['peak_rss']) if 'peak_rss' in r else '-'} | {gib(r['peak_vm']) if 'peak_vm' in r else '-'} |")
    agree = (f"{peft_free.get('bit_equal')} of {peft_free.get('tensors_compared')} tensors bit-equal "
             f"(peft's model has {peft_free.get('tensors_in_peft')}), largest difference "
             f"{peft_free.get('max_abs_diff')}") if peft_free.get("ok") else "peft did not run"
    print("\n".join(table))
    print("streamed against peft:", agree)
    if args.markdown:
        cmd = "python benchmarks/merge_memory.py" + (f" --layers {args.layers}" if args.layers != 14 else "") + \
            (f" --limit-gib {args.limit_gib:g}" if args.limit_gib != 1.5 else "") + f" --markdown {args.markdown}"
        section = [
            "", "## Memory-bounded merge", "",
            f"`{cmd}`, on this development machine (2 CPU cores, 24 GB RAM, no GPU; torch {torch.__version__}, "
            f"one thread), {datetime.date.today().isoformat()}.", "",
            f"A random Llama ({args.layers} layers, hidden 2048, MLP 5632, vocabulary 32000, untied): **{gib(size)} of "
            f"fp32 weights** in 1 GiB shards, with a peft LoRA adapter (r {args.rank} on all seven Linear "
            "projections of every layer, random A and B). Each merge runs in a child process; the limit is "
            f"`RLIMIT_AS` set in its `preexec_fn` on the whole process: {gib(limit)}, the weights are "
            f"{size / limit:.2f}x it; the imports alone take {gib(imports['peak_vm'])} of it (torch, transformers, "
            f"peft and ftcluster: VmPeak; {gib(imports['peak_rss'])} resident). (RLIMIT_AS because this host's memory cgroup "
            "is cgroup v1 and the sandbox's own; RLIMIT_DATA would not count file mappings, which is how "
            "transformers reads safetensors.)", "",
            *table, "",
            f"Streamed output against peft's merge (unlimited run): {agree}.", "",
            f"peft's merge needs the whole model resident: {gib(peft_free.get('peak_rss', 0))} peak RSS without a "
            f"limit, more than the {gib(limit)} the limit allows in all, so it fails under any limit of that "
            "size (under RLIMIT_AS it fails at the first mapping of a shard, before any merge work); the "
            f"streaming merge's peak is the imports plus about one tensor (the 32000 x 2048 fp32 embedding is "
            f"0.24 GiB) and its 1 GiB output shards are written tensor by tensor.", "",
        ]
        with open(args.markdown, "a", encoding="utf-8") as f:
            f.write("\n".join(section))
    return 0 if stream.get("ok") and not peft_limited.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
