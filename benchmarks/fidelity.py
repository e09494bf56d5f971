"""Fidelity check: ftcluster's runtime against a plain PyTorch / peft training loop on identical batches.

A speed-up that changes what the model learns is a bug (issue #24). For each run asked for, this
script trains ftcluster (``python -m ftcluster.train.launch`` through ``benchmarks/ds_probe.py``
with ``PROBE_DUMP``: rank 0's initial weights as the engine built them, and every micro-batch of
every rank, are recorded), then replays the same steps through a plain loop written from the
libraries' documented APIs only: a ``transformers`` model built from the same config and loaded
with the same initial weights (peft's ``get_peft_model`` with the same LoRA settings and the same
initial adapter weights for LoRA), ``torch.optim.AdamW`` with the spec's betas and weight decay,
``transformers.get_scheduler`` for the learning-rate schedule (warmup 0: transformers' warmup
starts at 0, ftcluster's at 1/warmup), ``clip_grad_norm_``, bf16 ``torch.autocast`` on a GPU (fp32
on a CPU), and an explicit block-diagonal causal mask built from each packed row's position ids
(transformers' documented 4D ``attention_mask``), so packed documents attend only to themselves
as ftcluster's varlen attention makes them. The global step's loss is the sum of every rank's
token cross entropy over the number of label tokens, ftcluster's objective.

Each run is compared with its own replay (same weights, same batches): the largest difference
of the per-step loss over the run and at the last step. A run fails the check when the largest
difference exceeds ``--tol`` (absolute, in nats); the runs are also printed side by side, so
engines can be compared with each other.

    python benchmarks/fidelity.py OUT --runs NAME=KEY=JSON;KEY=JSON,... [--shape tiny] [--steps 60]
        [--lr 1e-3] [--mb 2] [--seq 128] [--procs 2] [--tol 0.002]

A run is a name and dotted spec overrides, with ``env.NAME=value`` for environment variables,
``procs=N`` for the number of processes and ``method=lora`` for a LoRA run, e.g.
``z2=deepspeed.zero_stage=2``, ``fsdp=engine=\"fsdp\"``, ``fsdp-compile=engine=\"fsdp\";training.compile=true``,
``lora=method=\"lora\";procs=1``. ``--bad-lr-run NAME`` also replays that run with its learning rate
times 1.1, which must fail the tolerance (the check's own negative control). Results:
``OUT/fidelity.json`` (per-step losses of both sides), ``OUT/fidelity.md`` (the table); exit 1
when a run misses the tolerance or fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import case, spec_dict  # noqa: E402


def parse_runs(text: str) -> list[tuple[str, dict]]:
    runs = []
    for item in filter(None, text.split(",")):
        name, _, kvs = item.partition("=")
        ov = {}
        for part in filter(None, kvs.split(";")):
            k, _, v = part.partition("=")
            ov[k] = v if k.startswith("env.") else json.loads(v)
        runs.append((name, ov))
    return runs


# ----------------------------------------------------------------------------- ftcluster's side


def run_ftcluster(name: str, ov: dict, args, work: Path, data: Path) -> dict:
    from ftcluster.plan.launch import compile_plan
    from ftcluster.spec.loader import load_spec_text

    ov = dict(ov)
    procs = int(ov.pop("procs", args.procs))
    method = ov.pop("method", "full")
    c = case(f"p-{method}-z{2 if method == 'full' else 0}-g{procs}-mb{args.mb}-s{args.seq}-{args.shape}-gc0")
    out, dump = work / name / "out", work / name / "dump"
    for d in (out, dump):
        shutil.rmtree(d, ignore_errors=True)
    spec_ov = {k: v for k, v in ov.items() if not k.startswith("env.")}
    spec_ov = {"training.learning_rate": args.lr, "training.warmup_steps": 0, "training.lr_schedule": "cosine",
               "training.seed": args.seed, "tokenizer.train_vocab_size": args.vocab, **spec_ov}
    if c["method"] == "full" and spec_ov.get("engine", "deepspeed") == "deepspeed":
        spec_ov.setdefault("deepspeed.zero_stage", 2)
    doc = spec_dict(c, data, out, args.steps, spec_ov)
    if c["method"] == "lora":
        doc.pop("deepspeed", None)
    if args.device == "cpu":
        doc["resources"]["gpus_per_node"] = 0
        doc["resources"]["procs_per_node"] = procs
    spec = load_spec_text(json.dumps(doc), f"<{name}>")
    plan = compile_plan(spec)
    (work / name).mkdir(parents=True, exist_ok=True)
    payload = work / name / "payload.json"
    payload.write_text(plan.payload_json())
    env = {**os.environ, **plan.env, "FTCLUSTER_CACHE": str(work / "cache"), "PROBE_SKIP_FINISH": "1",
           "PROBE_PHASES": "0", "PROBE_DUMP": str(dump), "PROBE_TAG": name, "PROBE_OUT": str(work / name),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if args.cpu_bf16:
        env["PROBE_CPU_BF16"] = "1"
    env.update({k[4:]: str(v) for k, v in ov.items() if k.startswith("env.")})
    cmd = [sys.executable, "-m", "ftcluster.train.launch", "--standalone", f"--nproc-per-node={procs}",
           "-m", "benchmarks.ds_probe", "-m", "ftcluster.train", "--spec", str(payload)]
    t0 = time.monotonic()
    log = work / name / "train.log"
    with log.open("w") as fh:
        rc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=str(work),
                            timeout=args.timeout).returncode
    res = {"run": name, "overrides": ov, "procs": procs, "method": c["method"], "exit_code": rc,
           "wall_s": round(time.monotonic() - t0, 1), "dump": str(dump), "spec": doc}
    metrics = out / "metrics.jsonl"
    if rc != 0 or not metrics.exists():
        res["error"] = log.read_text()[-3000:]
        return res
    recs = [json.loads(x) for x in metrics.read_text().splitlines()]
    recs = [r for r in recs if "loss" in r and "step" in r and r.get("kind", "train") == "train"]
    res["ft"] = {"loss": [r["loss"] for r in recs], "grad_norm": [r.get("grad_norm") for r in recs],
                 "lr": [r.get("lr") for r in recs]}
    return res


# ----------------------------------------------------------------------------- the plain side


def block_causal_mask(pos, attn):
    """(rows, 1, L, L) bool: query i sees key j when j <= i, both in the same packed document
    (position ids restart at 0 where a document starts) and j is not padding."""
    import torch

    doc = torch.cumsum((pos == 0).int(), dim=1)
    L = pos.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=pos.device).tril()
    same = doc[:, :, None] == doc[:, None, :]
    keep = causal[None] & same & attn[:, None, :].bool()
    keep |= torch.eye(L, dtype=torch.bool, device=pos.device)[None]  # a padding query sees itself (no NaN)
    return keep[:, None]


def replay(run: dict, args, lr_factor: float = 1.0) -> dict:
    """Train the recorded initial weights on the recorded batches with a plain loop."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, LlamaConfig, get_scheduler

    dump = Path(run["dump"])
    init = torch.load(dump / "init.pt", weights_only=False)
    spec = run["spec"]
    tr = spec["training"]
    dev = torch.device("cuda" if args.device == "cuda" else "cpu")
    bf16 = (dev.type == "cuda" or args.cpu_bf16) and tr.get("precision", "bf16") == "bf16"
    torch.manual_seed(0)
    config = LlamaConfig.from_dict(init["config"])
    config.use_cache = False
    base_dtype = torch.bfloat16 if (bf16 and init["lora"]) else torch.float32  # plain peft: a bf16 base
    with torch.device(dev):  # random init on the device (fast), overwritten by the recorded weights below
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    if init["lora"]:
        from peft import LoraConfig, get_peft_model

        lo = spec["lora"]
        target = lo["target_modules"] if isinstance(lo["target_modules"], str) else list(lo["target_modules"])
        model = get_peft_model(model, LoraConfig(r=lo["r"], lora_alpha=lo["alpha"], lora_dropout=lo.get("dropout", 0.0),
                                                 target_modules=target, bias="none", task_type="CAUSAL_LM"))
    missing, unexpected = model.load_state_dict(init["state"], strict=False)
    tied = {"lm_head.weight", "base_model.model.lm_head.weight"}
    if unexpected or set(missing) - tied:
        raise SystemExit(f"{run['run']}: the initial weights do not fit the plain model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if init["lora"] and base_dtype != torch.float32:
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(base_dtype)
    model.to(dev)
    if args.plain_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tr["learning_rate"] * lr_factor, betas=(tr.get("adam_beta1", 0.9),
                            tr.get("adam_beta2", 0.999)), weight_decay=tr.get("weight_decay", 0.0))
    sched = get_scheduler(tr.get("lr_schedule", "cosine"), opt, num_warmup_steps=0, num_training_steps=args.steps)
    vocab = init.get("vocab")
    procs, accum = run["procs"], int(tr.get("gradient_accumulation_steps") or 1)
    files = {r: sorted(dump.glob(f"b.r{r}.*.pt")) for r in range(procs)}
    losses, norms = [], []
    for step in range(len(run["ft"]["loss"])):
        micro = [torch.load(files[r][step * accum + a]) for r in range(procs) for a in range(accum)]
        shifted = []
        for b in micro:
            lab = b["labels"][:, 1:].clone()
            if "position_ids" in b:
                lab[b["position_ids"][:, 1:] == 0] = -100
            shifted.append(lab)
        n = sum(int((lab != -100).sum()) for lab in shifted)
        total = 0.0
        for b, lab in zip(micro, shifted, strict=True):
            ids = b["input_ids"].to(dev)
            pos = b.get("position_ids")
            attn = b.get("attention_mask", torch.ones_like(b["input_ids"]))
            if pos is None:
                pos = (attn.cumsum(1) - 1).clamp(min=0)
            mask = block_causal_mask(pos.to(dev), attn.to(dev))
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos.to(dev)).logits
            logits = logits[:, :-1].float()
            if vocab is not None and logits.shape[-1] > vocab:
                logits = logits[..., :vocab]
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab.to(dev).reshape(-1), ignore_index=-100,
                                 reduction="sum")
            (ce / n).backward()
            total += float(ce.detach())
        norm = torch.nn.utils.clip_grad_norm_(params, tr.get("max_grad_norm", 1.0))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total / n)
        norms.append(float(norm))
    return {"loss": losses, "grad_norm": norms, "lr_factor": lr_factor}


def compare(ft: list[float], plain: list[float]) -> dict:
    d = [abs(a - b) for a, b in zip(ft, plain, strict=True)]
    worst = max(range(len(d)), key=d.__getitem__)
    return {"max_abs": round(d[worst], 6), "at_step": worst + 1, "last_abs": round(d[-1], 6),
            "ft_first_last": [round(ft[0], 4), round(ft[-1], 4)], "plain_first_last": [round(plain[0], 4),
                                                                                       round(plain[-1], 4)]}


def table(rows: list[dict], tol: float) -> str:
    out = [f"| run | processes | loss, step 1 -> last (ftcluster) | plain | max abs diff (step) | last abs diff | "
           f"within {tol} |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['run']} | {r['procs']} | failed | | | | no |")
            continue
        c = r["compare"]
        out.append(f"| {r['run']} | {r['procs']} | {c['ft_first_last'][0]} -> {c['ft_first_last'][1]} | "
                   f"{c['plain_first_last'][0]} -> {c['plain_first_last'][1]} | {c['max_abs']} ({c['at_step']}) | "
                   f"{c['last_abs']} | {'yes' if r['ok'] else 'no'} |")
        if "control" in r:
            k = r["control"]
            out.append(f"| {r['run']}, plain at 1.1x the learning rate (negative control) | {r['procs']} | | "
                       f"{k['plain_first_last'][0]} -> {k['plain_first_last'][1]} | {k['max_abs']} ({k['at_step']}) | "
                       f"{k['last_abs']} | {'yes (control FAILED)' if k['max_abs'] <= tol else 'no, as it must'} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--runs", required=True)
    ap.add_argument("--shape", default="tiny", help="speed.py's shapes: tiny, 1b, 8b8, 8b")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--mb", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--vocab", type=int, default=400, help="the locally trained tokenizer's size")
    ap.add_argument("--tol", type=float, default=0.002, help="largest allowed per-step loss difference (nats)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None)
    ap.add_argument("--records", type=int, default=300)
    ap.add_argument("--words", type=int, default=120)
    ap.add_argument("--bad-lr-run", default="", help="also replay this run at 1.1x the learning rate (must fail)")
    ap.add_argument("--plain-checkpointing", action="store_true", help="activation checkpointing in the plain replay")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cpu-bf16", action="store_true", help="on a CPU, ftcluster and the replay compute in bf16 as "
                    "on a GPU (ds_probe PROBE_CPU_BF16; the runtime itself computes in fp32 on CPUs)")
    ap.add_argument("--keep-dumps", action="store_true", help="keep each run's recorded weights and batches")
    ap.add_argument("--timeout", type=int, default=1800)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = args.out.resolve()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    from gpu_train import write_corpus

    data = work / "corpus.jsonl"
    if not data.exists():
        write_corpus(data, records=args.records, words_per_record=args.words)
    rows = []
    ok = True
    for name, ov in parse_runs(args.runs):
        res = run_ftcluster(name, ov, args, work, data)
        if "error" in res:
            print(f"{name}: ftcluster failed (exit {res['exit_code']})\n{res['error']}", file=sys.stderr, flush=True)
            ok = False
            rows.append(res)
            continue
        plain = replay(res, args)
        res["plain"] = plain
        res["compare"] = compare(res["ft"]["loss"], plain["loss"])
        res["ok"] = res["compare"]["max_abs"] <= args.tol
        ok &= res["ok"]
        if name == args.bad_lr_run:
            ctl = replay(res, args, lr_factor=1.1)
            res["control"] = compare(res["ft"]["loss"], ctl["loss"])
            res["control_loss"] = ctl["loss"]
            ok &= res["control"]["max_abs"] > args.tol
        if args.device == "cuda":
            torch.cuda.empty_cache()
        if not args.keep_dumps:
            shutil.rmtree(res["dump"], ignore_errors=True)
        print(json.dumps({"run": name, **res["compare"], "ok": res["ok"],
                          **({"control": res["control"]} if "control" in res else {})}), flush=True)
        rows.append(res)
        (out / "fidelity.json").write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v)
                                                                 for k, v in vars(args).items()},
                                                        "runs": rows}, indent=1))
    text = table(rows, args.tol)
    print(text, flush=True)
    (out / "fidelity.md").write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
