"""End to end on the live Slurm (.ci/slurm-up.sh) with the real training runtime on CPU:
``ftcluster submit`` -> sbatch -> srun -> torchrun -> ftcluster.train, then the outputs.

* the quickstart LoRA job completes and publishes its adapter, and as a job array of two variants
  each task trains its own variant and publishes its own adapter;
* a 2-node DeepSpeed ZeRO-3 job (one process per node, gloo) completes and publishes the
  consolidated model;
* preemption: ``scancel --signal=USR2 --batch`` (what ``--signal=B:USR2@T`` does before the time
  limit) makes every rank save and commit, the job requeues, and once released it resumes from
  the committed checkpoint and finishes with the planned step count;
* ``ftcluster cancel`` (scancel: SIGTERM) stops a run cleanly: it saves, ends CANCELLED and is
  not requeued.

The lab's node names n1/n2 do not resolve; the script takes the rendezvous host from the first
node's NodeAddr (127.0.0.1), with no FTCLUSTER_RDZV_HOST override.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slurm, pytest.mark.train, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _needs_slurm_and_runtime(live_slurm):
    pytest.importorskip("deepspeed", reason="needs the [train] extra")


def ftc(*args: str, home: Path, check: bool = True, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTCLUSTER_RDZV_")}
    env["FTCLUSTER_HOME"] = str(home)
    proc = subprocess.run([sys.executable, "-m", "ftcluster.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def lab_sets(tmp_path: Path, output_uri: bool = True) -> list[str]:
    """--set options that fit a spec to the lab: this interpreter, partition debug, no GPUs, logs (and
    outputs) in tmp_path."""
    sets = {"backend": "slurm", "slurm.python": sys.executable, "slurm.partition": "debug",
            "resources.gpus_per_node": "0", "slurm.output": f"{tmp_path}/slurm-%x-%j.out"}
    if output_uri:
        sets["output.uri"] = f"file://{tmp_path}/out"
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def job_of(submit: subprocess.CompletedProcess) -> tuple[str, str]:
    m = re.search(r"submitted (\S+) \(slurm, job (\d+)\)", submit.stdout)
    assert m, submit.stdout
    return m.group(1), m.group(2)


def scontrol(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def wait_until(what: str, check, timeout: float = 120, every: float = 0.5):
    deadline = time.time() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def log_text(tmp_path: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("slurm-*.out")))


def committed(out: Path, name: str) -> dict:
    """The manifest of a committed artifact (written last: its presence is the commit)."""
    manifest = out / name / "manifest.json"
    assert manifest.is_file(), f"{name} was not committed under {out}: {sorted(p.name for p in out.iterdir())}"
    return json.loads(manifest.read_text())


def release_and_wait(job: str, run: str, home: Path, timeout: float) -> dict:
    """Release requeued job ``job`` (held ~2 min in BeginTime) and return run ``run``'s status once it ends.

    Slurm holds a requeued job ~2 min (BeginTime) so that no node still holds the revoked credential of
    its last run. slurmd compares credential times in whole seconds: a release within the same second
    as the requeue fails the launch with "Job credential revoked". Let one second pass, then release."""
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)
    return wait_until("the resumed job to finish", lambda: (lambda s: s if s["state"] in (
        "SUCCEEDED", "FAILED", "CANCELLED") else None)(json.loads(ftc("status", run, "--json", home=home).stdout)),
        timeout=timeout)


ZERO3 = """\
name: zero3-cpu
method: full
backend: slurm
model: {{random_init: {{preset: tiny}}}}
tokenizer: {{train_vocab_size: 512}}
data: {{train: {root}/examples/data/text.jsonl, format: text, seq_len: 128}}
training: {{max_steps: {steps}, micro_batch_size: 4, precision: fp32, learning_rate: 1.0e-3, log_every_steps: 5}}
deepspeed: {{zero_stage: 3}}
resources: {{nodes: 2, gpus_per_node: 0, procs_per_node: 1}}
output: {{uri: file://{tmp}/out, checkpoint_every_steps: 20}}
"""


def zero3_job(tmp_path: Path, steps: int) -> Path:
    path = tmp_path / "zero3.yaml"
    path.write_text(textwrap.dedent(ZERO3.format(root=ROOT, tmp=tmp_path, steps=steps)))
    return path


def test_quickstart_lora_completes_on_slurm_and_writes_its_adapter(tmp_path):
    home = tmp_path / "home"
    res = ftc("submit", "examples/quickstart.yaml", *lab_sets(tmp_path), "--set", "training.max_steps=60",
              "--wait", home=home)
    assert "SUCCEEDED" in res.stderr
    adapter = committed(tmp_path / "out", "adapter")
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(adapter["files"])
    steps = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in steps if r["kind"] == "train") == 60
    assert any(r["kind"] == "eval" and r["step"] == 60 for r in steps)  # evaluated at the end
    assert "1 process(es) on 1 node(s)" in res.stdout and "done: step 60," in res.stdout


def test_lora_variants_array_trains_one_adapter_per_variant(tmp_path):
    home = tmp_path / "home"
    variants = "[{name: r2, set: {lora.r: 2}}, {name: r4, set: {lora.r: 4, training.learning_rate: 1.0e-3}}]"
    res = ftc("submit", "examples/quickstart.yaml", *lab_sets(tmp_path), "--set", "training.max_steps=10",
              "--set", "training.eval_every_steps=10", "--set", f"variants={variants}", "--wait", home=home)
    assert "SUCCEEDED" in res.stderr
    for variant, r in (("r2", 2), ("r4", 4)):
        adapter = committed(tmp_path / "out" / variant, "adapter")
        config = json.loads((tmp_path / "out" / variant / "adapter" / "adapter_config.json").read_text())
        assert config["r"] == r and adapter["meta"]["training"]["name"] == f"quickstart-{variant}"
        assert f"lora run 'quickstart-{variant}'" in res.stdout
    # ftcluster plot compares the array's adapters: the output root holds one run per variant
    png = tmp_path / "variants.png"
    shown = ftc("plot", str(tmp_path / "out"), "-o", str(png), home=home)
    rows = shown.stdout.splitlines()
    assert [r.split()[0] for r in rows[1:3]] == [f"{tmp_path / 'out'}/r2", f"{tmp_path / 'out'}/r4"], shown.stdout
    assert all(r.split()[1] == "10" for r in rows[1:3]) and "wrote" in rows[-1] and "(2 run(s))" in rows[-1]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_two_node_deepspeed_zero3_on_cpu_completes(tmp_path):
    home = tmp_path / "home"
    res = ftc("submit", str(zero3_job(tmp_path, 20)), *lab_sets(tmp_path, output_uri=False), "--wait", home=home)
    assert "SUCCEEDED" in res.stderr
    assert "2 process(es) on 2 node(s)" in res.stdout
    final = committed(tmp_path / "out", "final")
    assert "model.safetensors" in final["files"] and "config.json" in final["files"]
    assert "done: step 20" in res.stdout
    # a ZeRO-3 checkpoint holds every rank's shard: one commit with files from both nodes
    assert "from every node" in res.stdout


def test_preempted_job_checkpoints_requeues_and_resumes(tmp_path):
    home = tmp_path / "home"
    steps = 60
    run, job = job_of(ftc("submit", str(zero3_job(tmp_path, steps)), *lab_sets(tmp_path, output_uri=False), home=home))
    wait_until("training to pass step 10", lambda: re.search(r"step (1\d|[2-9]\d)/60", log_text(tmp_path)))
    subprocess.run(["scancel", "--signal=USR2", "--batch", job], check=True)
    # the step saves and commits, exits 143, and the script requeues the job (held until its BeginTime)
    info = wait_until("the requeue", lambda: (lambda i: i if i.get("Restarts") == "1"
                                              and i.get("JobState") == "PENDING" else None)(scontrol(job)))
    log = log_text(tmp_path)
    stop = re.search(r"stop requested \(\w+\): saving step (\d+)", log)
    assert stop, log[-3000:]
    saved = int(stop.group(1))
    assert 10 <= saved < steps
    assert f"checkpoint step {saved} committed; exiting with 143" in log
    assert "requeueing job" in log
    assert (tmp_path / "out" / "checkpoints" / f"step-{saved:08d}" / "manifest.json").is_file()
    assert info["Reason"] in ("BeginTime", "None", "Priority", "Resources"), info
    st = release_and_wait(job, run, home, timeout=150)
    log = log_text(tmp_path)
    assert st["state"] == "SUCCEEDED", log[-3000:]
    assert f"resumed from checkpoint step {saved}" in log
    after = log.split(f"resumed from checkpoint step {saved}", 1)[1]
    logged = [int(s) for s in re.findall(r"step (\d+)/60 \|", after)]
    assert logged and logged[0] > saved and logged[-1] == steps  # went on from the checkpoint, not from 0
    assert f"done: step {steps}," in after
    committed(tmp_path / "out", "final")


def test_cancel_stops_a_run_cleanly(tmp_path):
    home = tmp_path / "home"
    run, job = job_of(ftc("submit", "examples/quickstart.yaml", *lab_sets(tmp_path),
                          "--set", "training.max_steps=100000", home=home))
    wait_until("training to start", lambda: re.search(r"step \d+/100000", log_text(tmp_path)))
    assert "cancel requested" in ftc("cancel", run, home=home).stdout
    st = wait_until("the job to end", lambda: (lambda s: s if s["state"] in ("SUCCEEDED", "FAILED", "CANCELLED")
                                               else None)(json.loads(ftc("status", run, "--json", home=home).stdout)))
    assert st["state"] == "CANCELLED"
    log = log_text(tmp_path)
    stop = re.search(r"stop requested \(\w+\): saving step (\d+)", log)
    assert stop, log[-3000:]
    assert f"checkpoint step {stop.group(1)} committed" in log
    assert "requeueing job" not in log
    time.sleep(3)  # a requeue would show by now
    info = scontrol(job)
    assert info.get("JobState") == "CANCELLED" and info.get("Restarts") == "0", info


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_requeue_onto_fewer_nodes_resumes_on_the_nodes_it_gets(tmp_path, engine):
    """resources.min_nodes 1 of 2: preempted after a checkpoint while node n2 is drained, the requeued
    job starts on n1 alone, resumes the 2-process checkpoint on 1 process (FSDP2: DCP reshards;
    DeepSpeed ZeRO-3: the universal checkpoint) with twice the accumulation, the same global batch,
    and finishes the planned steps."""
    home = tmp_path / "home"
    steps, every = 40, 10
    text = textwrap.dedent(ZERO3.format(root=ROOT, tmp=tmp_path, steps=steps)).replace(
        "nodes: 2,", "nodes: 2, min_nodes: 1,").replace("checkpoint_every_steps: 20", f"checkpoint_every_steps: {every}")
    if engine == "fsdp":
        text = text.replace("deepspeed: {zero_stage: 3}", "engine: fsdp")
    job_file = tmp_path / "elastic.yaml"
    job_file.write_text(text)
    # MIN-MAX starts with the nodes free at that moment: wait until the previous test's job has left both
    wait_until("both nodes idle", lambda: subprocess.run(["sinfo", "-h", "-o", "%D %t", "-t", "idle"], capture_output=True,
                                                         text=True).stdout.split()[:1] == ["2"], timeout=120)
    run, job = job_of(ftc("submit", str(job_file), *lab_sets(tmp_path, output_uri=False), home=home))
    first = tmp_path / "out" / "checkpoints" / f"step-{every:08d}" / "manifest.json"
    try:
        wait_until("the first checkpoint", first.is_file, timeout=180)
        assert f"job {job} attempt 1 (restart 0) on n[1-2];" in log_text(tmp_path)
        subprocess.run(["scontrol", "update", "nodename=n2", "state=drain", "reason=ftcluster-test"], check=True)
        subprocess.run(["scancel", "--signal=USR2", "--batch", job], check=True)
        wait_until("the requeue", lambda: scontrol(job).get("Restarts") == "1" and scontrol(job).get("JobState")
                   == "PENDING")
        saved = int(re.search(r"stop requested \(\w+\): saving step (\d+)", log_text(tmp_path)).group(1))
        st = release_and_wait(job, run, home, timeout=240)
    finally:
        subprocess.run(["scontrol", "update", "nodename=n2", "state=resume"], capture_output=True)
    log = log_text(tmp_path)
    assert st["state"] == "SUCCEEDED", log[-3000:]
    after = log.split("(restart 1) on ", 1)[1]
    assert after.startswith("n1;"), after[:200]  # the requeued job got n1 alone
    assert "running on 1 of 2 nodes (resources.min_nodes 1): 1 process(es), gradient accumulation 2 instead of 1: " \
           "the global batch stays 8 sequences" in after
    assert f"resuming checkpoint step {saved} of 2 process(es) on 1; global batch unchanged: 8 sequences" in after
    logged = [int(s) for s in re.findall(rf"step (\d+)/{steps} \|", after)]
    assert logged and logged[0] > saved and logged[-1] == steps
    assert f"done: step {steps}," in after
    committed(tmp_path / "out", "final")


# --------------------------------------------------------------------------- one writer per output.uri (issue #23)

IN_USE = re.compile(r"error \(rank 0\): \S+: output\.uri is in use by run (\S+) \(job (\d+)\) on host (\S+) \(pid \d+\)")


def test_two_submits_of_one_spec_one_trains(tmp_path):
    """Two ``ftcluster submit`` (two sbatch) of one spec at the same moment, running at once: exactly one
    trains; the other's rank 0 finds the first's lease and the job fails with the one line naming that
    run, its job and node; the store holds the checkpoints of that one run."""
    home = tmp_path / "home"
    sets = [*lab_sets(tmp_path), "--set", "training.max_steps=100", "--set", "output.checkpoint_every_steps=25",
            "--set", "output.keep_last=10", "--set", "data.general_eval=null"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTCLUSTER_RDZV_") and k != "FTCLUSTER_RUN_ID"}
    env["FTCLUSTER_HOME"] = str(home)
    procs = [subprocess.Popen([sys.executable, "-m", "ftcluster.cli", "submit", "examples/quickstart.yaml", *sets],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    # Both submitted: neither lease existed yet (a job takes its lease seconds after sbatch, once it runs).
    assert [p.returncode for p in procs] == [0, 0], outs
    jobs = [job_of(subprocess.CompletedProcess([], 0, o, e)) for o, e in outs]

    def ended(run: str) -> dict | None:
        s = json.loads(ftc("status", run, "--json", home=home).stdout)
        return s if s["state"] in ("SUCCEEDED", "FAILED", "CANCELLED") else None

    states = {run: wait_until(f"{run} to end", lambda r=run: ended(r), timeout=300)["state"] for run, _ in jobs}
    assert sorted(states.values()) == ["FAILED", "SUCCEEDED"], (states, log_text(tmp_path)[-4000:])
    (won, won_job), (lost, lost_job) = sorted(jobs, key=lambda j: states[j[0]] != "SUCCEEDED")
    lost_log = next(p for p in tmp_path.glob(f"slurm-*-{lost_job}.out")).read_text()
    refused = IN_USE.search(lost_log)
    assert refused and refused.group(1) == won and refused.group(2) == won_job, lost_log[-3000:]
    assert refused.group(3) in ("n1", "n2")
    assert f"ftcluster cancel {won}" in lost_log and "Traceback" not in lost_log
    assert "committed" not in lost_log
    out = tmp_path / "out"
    uids = {json.loads((d / "state.json").read_text())["run_uid"] for d in (out / "checkpoints").glob("step-*")
            if (d / "manifest.json").is_file()}
    uids.add(json.loads((out / "adapter" / "ftcluster_meta.json").read_text())["run"]["uid"])
    assert len(uids) == 1
    assert not (out / ".ftcluster").exists()  # the winner released it at its end


def training_pids(job: str) -> list[int]:
    """The launcher and workers of Slurm job ``job`` (the lab's nodes are this machine)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            cmd = (proc / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if f"SLURM_JOB_ID={job}".encode() in env and b"ftcluster.train" in cmd:
            pids.append(int(proc.name))
    return pids


def test_a_requeued_job_takes_its_own_lease_back_at_once(tmp_path):
    """A job whose training processes are killed outright (SIGKILL, as by the OOM killer or a node crash: its
    lease stays, valid for 5 min) and that is then requeued keeps its job id: it takes its own lease back
    without waiting for the expiry and resumes."""
    import signal

    home = tmp_path / "home"
    # max_restarts 0: the killed job must fail and be requeued by hand (a fault restart would requeue it
    # itself: tests/e2e/test_slurm_faults.py), as a manual resubmission of a crashed job would
    run, job = job_of(ftc("submit", "examples/quickstart.yaml", *lab_sets(tmp_path), "--set", "training.max_steps=300",
                          "--set", "output.checkpoint_every_steps=10", "--set", "data.general_eval=null",
                          "--set", "resources.max_restarts=0", home=home))
    out = tmp_path / "out"
    wait_until("a committed checkpoint", lambda: list((out / "checkpoints").glob("step-*/manifest.json")),
               timeout=180, every=0.1)
    lease = json.loads((out / ".ftcluster" / "lease.json").read_text())
    assert lease["run_id"] == run and lease["job_id"] == job
    pids = training_pids(job)
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    wait_until("the job to fail", lambda: scontrol(job).get("JobState") in ("FAILED", "CANCELLED", "COMPLETED"))
    assert scontrol(job)["JobState"] == "FAILED" and "requeueing job" not in log_text(tmp_path)
    assert json.loads((out / ".ftcluster" / "lease.json").read_text())["token"] == lease["token"]  # a crash leaves it
    time.sleep(2)  # see test_preempted_job_checkpoints_requeues_and_resumes: credentials are compared in seconds
    subprocess.run(["scontrol", "requeue", job], check=True)
    wait_until("the requeue", lambda: scontrol(job).get("Restarts") == "1")
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)
    requeued = time.time()
    wait_until("the requeued job to finish", lambda: scontrol(job).get("JobState") in ("COMPLETED", "FAILED"),
               timeout=180)
    log = log_text(tmp_path)
    assert scontrol(job)["JobState"] == "COMPLETED", log[-3000:]
    assert "taking back this run's own lease" in log and "resumed from checkpoint step" in log, log[-3000:]
    assert time.time() - requeued < lease["ttl_s"]  # it did not wait for the expiry
    committed(out, "adapter")
