"""Two launcher agents on one host as two "nodes", started as the rendered sbatch script starts
them, preempted with SIGUSR2 and resumed, against one agent with all the GPUs (issue #12).

Runs of one spec (full fine-tuning with DeepSpeed, random init, bf16, packing):

1. ``one-node``: one ``ftcluster.train.launch`` agent with ``2 x --gpus-per-agent`` processes,
   uninterrupted (the reference curve);
2. ``two-agents`` (preempted): two agents of ``--gpus-per-agent`` processes each, every one
   with its own ``CUDA_VISIBLE_DEVICES`` slice and its own node-local folder, started with
   the argv of :meth:`LaunchPlan.torchrun_args` as the Slurm renderer uses it (c10d, endpoint
   ``HOST:derived_port(JOB_ID)``, ``--rdzv-id=JOB_ID``, ``--spec-env FTCLUSTER_PAYLOAD``) and
   the plan's environment (what the sbatch script exports). When the log shows step
   ``--kill-at``, SIGUSR2 goes to both agents (the sbatch trap signals srun, which signals every
   task); both must exit 143 after committing a checkpoint;
3. ``two-agents`` (resumed): the same two agents again, same job id (a requeued Slurm job
   keeps its id, so its port and rendezvous id), which must resume and finish.

It writes ``two_agents.json`` (exit codes, the resume line, per-step loss of both curves with
the max absolute and relative difference, tokens/s per GPU and peak memory of each launch,
and ``ftcluster plan --json``'s prediction for each layout) and one log per launch. Every
agent runs in its own process group, which is killed by id if a launch outlives the deadline.

    python benchmarks/gpu_two_agents.py RESULTS [--gpus-per-agent 1] [--steps 30] [--kill-at 14]
    python benchmarks/gpu_two_agents.py RESULTS --gpus-per-agent 2        # 2 x 2 on a 4-GPU host
    python benchmarks/gpu_two_agents.py RESULTS --plan-only               # predictions, no training
    python benchmarks/gpu_two_agents.py RESULTS --cpu --preset tiny ...   # CPU smoke test (gloo)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
JOB_ID = 912012  # the fake SLURM_JOB_ID: the port is derived from it as the sbatch script does


def spec_dict(args, data: Path, out: Path, nodes: int, gpus_per_node: int) -> dict:
    spec = {
        "name": f"two-agents-{nodes}x{gpus_per_node}",
        "method": "full",
        "model": {"random_init": {"preset": args.preset}, "attn_implementation": "sdpa"},
        "tokenizer": {"train_vocab_size": args.vocab},
        "data": {"train": str(data), "format": "text", "seq_len": args.seq_len, "packing": True},
        "training": {"learning_rate": 1.0e-4, "warmup_steps": 2, "max_steps": args.steps,
                     "micro_batch_size": args.micro_batch, "gradient_checkpointing": True,
                     "precision": "bf16", "log_every_steps": 1, "seed": 7},
        "resources": {"nodes": nodes, "gpus_per_node": gpus_per_node, "gpu_type": "h200"},
        "deepspeed": {"zero_stage": args.stage},
        # No periodic checkpoint: the one the benchmark checks is the one SIGUSR2 commits.
        "output": {"uri": out.as_uri(), "checkpoint_every_minutes": 10000, "keep_last": 1},
    }
    if args.cpu:
        spec["resources"] = {"nodes": nodes, "gpus_per_node": 0, "procs_per_node": gpus_per_node}
    return spec


def predict(spec_file: Path) -> dict:
    """``ftcluster plan SPEC --json`` (pure Python, no GPU): per-GPU peak and step time."""
    proc = subprocess.run([sys.executable, "-m", "ftcluster.cli", "plan", str(spec_file), "--json", "--offline"],
                          capture_output=True, text=True, env=child_env({}), timeout=120)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout)[-600:]}
    req = json.loads(proc.stdout)["requested"]
    gpus = req["nodes"] * req["gpus_per_node"]
    return {"per_gpu_memory_bytes": req["per_gpu_memory_bytes"], "step_time_s": req["step_time_s"],
            "tok_s_per_gpu": round(req["tokens_per_step"] / req["step_time_s"] / gpus) if req["step_time_s"] else None,
            "summary": req["summary"]}


def child_env(extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **extra, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def rdzv_host() -> str:
    """The sbatch script takes the first node's hostname; use this host's when it resolves."""
    name = socket.gethostname()
    try:
        socket.getaddrinfo(name, None)
        return name
    except OSError:
        return "127.0.0.1"


def start_agents(plan, args, work: Path, tag: str, agents: int, per_agent: int, log) -> list[subprocess.Popen]:
    from ftcluster.plan.launch import derived_port

    job = JOB_ID + (0 if agents > 1 else 1)  # the reference is another job: another port
    argv = plan.torchrun_args(rdzv_endpoint=f"{args.host}:{derived_port(job)}", rdzv_id=str(job),
                              python=sys.executable, spec_arg=["--spec-env", "FTCLUSTER_PAYLOAD"])
    if args.probe_skip_finish:  # the final checkpoint and export are skipped: device time
        i = argv.index("-m", 3)
        argv[i:i] = ["-m", "benchmarks.ds_probe"]
    procs = []
    for node in range(agents):
        env = {**plan.env, "FTCLUSTER_PAYLOAD": plan.payload_json(), "FTCLUSTER_CACHE": str(work / "cache"),
               "FTCLUSTER_LOCAL_DIR": str(work / f"{tag}-disk{node}"), "SLURM_JOB_ID": str(job),
               "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "120"}
        if args.probe_skip_finish:
            env.update(PROBE_SKIP_FINISH="1", PROBE_PHASES="0", PROBE_OUT=str(work))
        if args.cpu:  # this machine's two cores are shared
            env["OMP_NUM_THREADS"] = "1"
        else:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(node * per_agent + i) for i in range(per_agent))
        log.write(f"### benchmark: agent {node}: {' '.join(argv)} (CUDA_VISIBLE_DEVICES="
                  f"{env.get('CUDA_VISIBLE_DEVICES', '-')})\n")
        procs.append(subprocess.Popen(argv, cwd=str(ROOT), env=child_env(env), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    return procs


def run_launch(procs: list[subprocess.Popen], log, kill_at: int | None, deadline: float) -> list[int | None]:
    """Tee every agent's output into one log; at ``step KILL_AT/`` SIGUSR2 to each agent."""
    import threading

    seen = threading.Event()

    def pump(i: int, p: subprocess.Popen) -> None:
        for line in p.stdout:
            log.write(f"[agent{i}] {line}")
            if kill_at is not None and f"step {kill_at}/" in line:
                seen.set()

    threads = [threading.Thread(target=pump, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    sent = False
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if seen.is_set() and not sent:
            for p in procs:
                p.send_signal(signal.SIGUSR2)
            log.write(f"### benchmark: sent SIGUSR2 to both agents after step {kill_at}\n")
            sent = True
        time.sleep(0.2)
    for p in procs:  # past the deadline: kill each agent's process group, by its id
        if p.poll() is None:
            log.write(f"### benchmark: deadline: killing process group {p.pid}\n")
            os.killpg(p.pid, signal.SIGKILL)
    for t in threads:
        t.join(timeout=10)
    return [p.wait() for p in procs]


def read_metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def summary(recs: list[dict], warmup: int, gpus: int) -> dict:
    """tokens/s per GPU (real tokens, from the end of step ``warmup`` of this launch) and rank 0's
    peak ``max_memory_allocated`` / reserved, in 10^9 bytes."""
    train = [r for r in recs if r.get("kind") == "train"]
    if len(train) < 2:
        return {}
    a, b = train[min(warmup, len(train) - 2)], train[-1]
    dt = b["elapsed_s"] - a["elapsed_s"]
    return {"steps": [train[0]["step"], b["step"]],
            "tok_s_per_gpu": round((b["tokens_seen"] - a["tokens_seen"]) / dt / gpus) if dt > 0 else None,
            "peak_alloc_gb": round(max(r["peak_mem_gb"] for r in train) * 2**30 / 1e9, 2),
            "peak_reserved_gb": round(max(r.get("peak_mem_reserved_gb", 0) for r in train) * 2**30 / 1e9, 2)}


def curve(recs: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in recs if r.get("kind") == "train"}  # a resumed step: last wins


def compare(ref: dict[int, float], got: dict[int, float]) -> dict:
    common = sorted(set(ref) & set(got))
    if not common:
        return {"common_steps": 0}
    diffs = {s: abs(ref[s] - got[s]) for s in common}
    worst = max(common, key=lambda s: diffs[s] / abs(ref[s]))
    return {"common_steps": len(common), "max_abs_loss_diff": max(diffs.values()),
            "max_rel_loss_diff": diffs[worst] / abs(ref[worst]), "worst_rel_step": worst,
            "loss_one_node": [ref[s] for s in common], "loss_two_agents": [got[s] for s in common]}


def launch_one(name: str, plan, args, work: Path, res_dir: Path, agents: int, per_agent: int,
               kill_at: int | None, deadline: float, out: Path) -> dict:
    before = len(read_metrics(out))
    t0 = time.monotonic()
    with (res_dir / f"{name}.log").open("a", buffering=1) as log:
        rcs = run_launch(start_agents(plan, args, work, name.split(".")[0], agents, per_agent, log), log,
                         kill_at, deadline)
    recs = read_metrics(out)
    text = (res_dir / f"{name}.log").read_text()
    res = {"exit_codes": rcs, "wall_s": round(time.monotonic() - t0, 1),
           **summary(recs[before:], args.warmup, agents * per_agent)}
    res["resumed_line"] = next((ln.split("] ", 2)[-1] for ln in text.splitlines()[::-1] if "resumed from checkpoint" in ln), None)
    pre = [r for r in recs[before:] if r.get("kind") == "preempted"]
    if pre:
        res["preempted_at_step"] = pre[-1]["step"]
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results_dir", type=Path)
    ap.add_argument("--work-dir", type=Path, default=None)
    ap.add_argument("--gpus-per-agent", type=int, default=1, help="2 on a 4-GPU host: 2 agents x 2 against 1 x 4")
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--stage", type=int, default=3, choices=(2, 3))
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--kill-at", type=int, default=14)
    ap.add_argument("--warmup", type=int, default=3, help="steps of each launch left out of tokens/s")
    ap.add_argument("--vocab", type=int, default=8000, help="trained tokenizer size (400 for --preset tiny)")
    ap.add_argument("--records", type=int, default=600, help="synthetic corpus records (~1,100 tokens each)")
    ap.add_argument("--deadline", type=float, default=1e9, help="seconds for everything; then agents are killed")
    ap.add_argument("--probe-skip-finish", action="store_true",
                    help="end runs after their last step without the final checkpoint/export (benchmarks/ds_probe.py)")
    ap.add_argument("--cpu", action="store_true", help="gloo on the CPU: smoke-test this script (use --preset tiny)")
    ap.add_argument("--plan-only", action="store_true", help="write the specs and plan predictions only")
    ap.add_argument("--plan-json", type=Path, default=None, help="predictions made beforehand (by --plan-only)")
    args = ap.parse_args()
    end = time.monotonic() + args.deadline
    from gpu_train import write_corpus

    from ftcluster.plan.launch import compile_plan
    from ftcluster.spec.loader import load_spec_text

    res_dir = args.results_dir.resolve()
    work = (args.work_dir or res_dir / "work").resolve()
    res_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    args.host = rdzv_host()
    data = work / "corpus.jsonl"
    if not data.exists():
        write_corpus(data, records=args.records, words_per_record=1000)
    g = args.gpus_per_agent
    layouts = {"one-node": (1, 2 * g), "two-agents": (2, g)}
    plans, predictions = {}, {}
    for name, (nodes, per) in layouts.items():
        spec_file = work / f"{name}.spec.json"
        spec_file.write_text(json.dumps(spec_dict(args, data, work / name, nodes, per)))
        plans[name] = compile_plan(load_spec_text(spec_file.read_text(), str(spec_file)))
        if not args.plan_json:
            predictions[name] = predict(spec_file)
    if args.plan_json:
        predictions = json.loads(args.plan_json.read_text())
    (res_dir / "plan.json").write_text(json.dumps(predictions, indent=1))
    if args.plan_only:
        print(json.dumps(predictions, indent=1))
        return 0
    result: dict = {"gpus_per_agent": g, "preset": args.preset, "zero_stage": args.stage, "seq_len": args.seq_len,
                    "micro_batch": args.micro_batch, "steps": args.steps, "kill_at": args.kill_at,
                    "rdzv_host": args.host, "job_id": JOB_ID, "probe_skip_finish": args.probe_skip_finish,
                    "plan": predictions}
    out1, out2 = work / "one-node", work / "two-agents"

    def save() -> None:
        (res_dir / "two_agents.json").write_text(json.dumps(result, indent=1))

    result["one_node"] = launch_one("one-node", plans["one-node"], args, work, res_dir, 1, 2 * g, None, end, out1)
    save()
    result["preempted"] = launch_one("two-agents.1-preempted", plans["two-agents"], args, work, res_dir, 2, g,
                                     args.kill_at, end, out2)
    save()
    result["resumed"] = launch_one("two-agents.2-resumed", plans["two-agents"], args, work, res_dir, 2, g,
                                   None, end, out2)
    result["comparison"] = compare(curve(read_metrics(out1)), curve(read_metrics(out2)))
    save()
    print(json.dumps({k: v for k, v in result.items() if k not in ("plan", "comparison")}, indent=1))
    print(json.dumps({k: v for k, v in result["comparison"].items() if not k.startswith("loss_")}))
    ok = (result["one_node"]["exit_codes"] == [0] and result["preempted"]["exit_codes"] == [143, 143]
          and result["resumed"]["exit_codes"] == [0, 0] and result["resumed"].get("steps", [0, 0])[1] == args.steps)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
