"""ftcluster.backends.slurm.submitit against the live Slurm: the executor mapping, the torch.distributed
environment of every task, and preemption/time-limit requeues that resume (a fast fake runtime
first, then the real training runtime)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("submitit")

from ftcluster.backends.slurm.submitit import TrainTask, executor_for, submit  # noqa: E402
from ftcluster.plan.launch import derived_port  # noqa: E402
from ftcluster.spec.loader import load_spec_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parents[1] / "support"

pytestmark = pytest.mark.slurm

SPEC = """\
name: submitit-test
method: lora
backend: slurm
model: {{random_init: {{preset: tiny}}}}
tokenizer: {{train_vocab_size: 512}}
data: {{train: {root}/examples/data/instruct.jsonl, seq_len: 64}}
training: {{max_steps: {steps}, precision: fp32, micro_batch_size: 4, log_every_steps: 5}}
resources: {{nodes: {nodes}, gpus_per_node: 0, procs_per_node: {procs}, time_limit: "00:10:00", memory: 900M}}
output: {{uri: "file://{out}", checkpoint_every_steps: 10, keep_last: 2}}
slurm: {{partition: debug, signal_seconds: 30}}
"""


def make_spec(tmp_path: Path, steps: int = 20, nodes: int = 1, procs: int = 1):
    text = SPEC.format(root=ROOT, steps=steps, nodes=nodes, procs=procs, out=tmp_path / "out")
    return load_spec_text(text, str(tmp_path / "job.yaml"))


@pytest.fixture
def slurm(live_slurm, monkeypatch, tmp_path):
    # The test nodes n1, n2 do not resolve; every task runs on this host. sbatch exports this
    # process's environment to the job, so the tasks see both variables.
    monkeypatch.setenv("FTCLUSTER_RDZV_HOST", "127.0.0.1")
    monkeypatch.delenv("FTCLUSTER_RDZV_PORT", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    for job_id in _SUBMITTED:  # a failed test must not leave jobs holding the two test nodes
        subprocess.run(["scancel", job_id], capture_output=True)
    _SUBMITTED.clear()


_SUBMITTED: list[str] = []


def track(job):
    _SUBMITTED.append(job.job_id)
    return job


def squeue_state(job_id: str) -> tuple[str, str]:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T|%r"], capture_output=True, text=True).stdout
    state, _, reason = out.strip().partition("|")
    return state, reason


def wait_for(predicate, timeout: float, what: str, poll: float = 0.3):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def run_to_end(job, timeout: float):
    """Wait until the job is done, starting a requeued job at once: Slurm holds it ~2 min in
    Reason=BeginTime, which an admin can skip with `scontrol update StartTime=now`."""
    def done():
        state, reason = squeue_state(job.job_id)
        if state == "PENDING" and reason == "BeginTime":
            subprocess.run(["scontrol", "update", f"jobid={job.job_id}", "StartTime=now"], capture_output=True)
        return not state and job.done(force_check=True)
    wait_for(done, timeout, f"job {job.job_id} to finish", poll=0.5)
    return job


class EnvProbe(TrainTask):
    """Exports the distributed environment like TrainTask, then reports it instead of training."""

    def __call__(self):
        env = self._export_environment()
        return {**env, "SLURM_PROCID": os.environ["SLURM_PROCID"], "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def test_executor_and_distributed_environment(slurm):
    spec = make_spec(slurm, nodes=2, procs=2)
    executor = executor_for(spec, slurm / "submitit" / "%j")
    job = track(executor.submit(EnvProbe({}, {"OMP_NUM_THREADS": "1"})))
    results = run_to_end(job, 90).results()
    assert len(results) == 4
    assert sorted(int(r["RANK"]) for r in results) == [0, 1, 2, 3]
    assert {r["WORLD_SIZE"] for r in results} == {"4"} and {r["LOCAL_WORLD_SIZE"] for r in results} == {"2"}
    assert sorted(r["GROUP_RANK"] for r in results) == ["0", "0", "1", "1"]
    assert sorted(r["LOCAL_RANK"] for r in results) == ["0", "0", "1", "1"]
    assert all(r["RANK"] == r["SLURM_PROCID"] for r in results)
    assert {r["MASTER_PORT"] for r in results} == {str(derived_port(job.job_id))}
    assert {r["MASTER_ADDR"] for r in results} == {"127.0.0.1"} and {r["OMP_NUM_THREADS"] for r in results} == {"1"}
    script = job.paths.submission_file.read_text()
    for line in ("--nodes=2", "--ntasks-per-node=2", "--partition=debug", "--time=10", "--mem=900M",
                 "--signal=USR2@30", "--job-name=submitit-test"):
        assert f"#SBATCH {line}\n" in script, (line, script)


def test_executor_rejects_specs_it_cannot_express(slurm):
    from ftcluster.errors import BackendError

    spec = make_spec(slurm)
    spec.resources.time_limit = None
    with pytest.raises(BackendError, match="resources.time_limit"):
        executor_for(spec, slurm / "submitit")


def _starts(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "starts.log").read_text().splitlines()]


@pytest.mark.parametrize("timeout", [True, False], ids=["timeout", "preemption"])
def test_fake_runtime_requeues_and_resumes(slurm, timeout):
    """USR2 (time limit) or SIGTERM+USR2 (preemption) -> the runtime saves -> submitit requeues -> resume."""
    spec = make_spec(slurm, steps=60, nodes=2, procs=1)
    job = submit_fake(spec, slurm)
    out = slurm / "out"
    wait_for(lambda: (out / "rank1.json").exists() and json.loads((out / "rank1.json").read_text())["step"] >= 10,
             60, "the fake training to make progress")
    job._interrupt(timeout=timeout)
    result = run_to_end(job, 120).results()[0]
    assert result["status"] == 0 and result["requeues"] == 1, result
    starts = _starts(out)
    assert [s["RANK"] for s in starts] == ["0", "1", "0", "1"] or sorted(s["RANK"] for s in starts) == ["0", "0", "1", "1"]
    first, second = [s for s in starts if s["RANK"] == "0"]
    assert first["step"] == 0 and second["step"] >= 10  # resumed from the saved step, not from zero
    assert second["SLURM_RESTART_COUNT"] == "1" and first["SLURM_JOB_ID"] == second["SLURM_JOB_ID"] == job.job_id
    for rank in (0, 1):
        assert json.loads((out / f"rank{rank}.json").read_text()) == {"step": 60, "done": True}


def test_fake_runtime_cancel_saves_and_stays_cancelled(slurm):
    """scancel sends SIGTERM: the runtime saves, and the job is not requeued (it would come back)."""
    spec = make_spec(slurm, steps=600, nodes=2, procs=1)
    job = submit_fake(spec, slurm)
    out = slurm / "out"
    wait_for(lambda: (out / "rank0.json").exists(), 60, "the fake training to make progress")
    job.cancel()
    wait_for(lambda: not squeue_state(job.job_id)[0], 60, f"job {job.job_id} to leave the queue")
    time.sleep(3)  # a wrongful requeue would show up as PENDING by now
    shown = subprocess.run(["scontrol", "show", "job", "-o", job.job_id], capture_output=True, text=True).stdout
    assert "JobState=CANCELLED" in shown and "Restarts=0" in shown, shown
    assert len(_starts(out)) == 2
    assert json.loads((out / "rank0.json").read_text())["stopped_by"] == "SIGTERM"  # saved before exiting


def test_result_after_scontrol_requeue_is_the_final_outcome(slurm):
    """`scontrol requeue` (SIGTERM, then Slurm runs the job again): while the job runs again, the
    stopped run's outcome must not be read as the job's; the final result counts the requeue."""
    spec = make_spec(slurm, steps=80, nodes=2, procs=1)
    job = submit_fake(spec, slurm)
    out = slurm / "out"
    wait_for(lambda: (out / "rank0.json").exists(), 60, "the fake training to make progress")
    subprocess.run(["scontrol", "requeue", job.job_id], check=True, capture_output=True)

    def running_again():
        state, reason = squeue_state(job.job_id)
        if state == "PENDING" and reason == "BeginTime":
            subprocess.run(["scontrol", "update", f"jobid={job.job_id}", "StartTime=now"], capture_output=True)
        return state == "RUNNING" and len(_starts(out)) == 4
    wait_for(running_again, 120, f"job {job.job_id} to run again")
    assert not job.done(), job.paths.result_pickle  # no outcome yet: the job runs
    result = run_to_end(job, 120).results()[0]
    assert result["status"] == 0 and result["requeues"] == 1, result
    assert json.loads((out / "rank0.json").read_text()) == {"step": 80, "done": True}


def submit_fake(spec, tmp_path: Path):
    from ftcluster.plan.launch import compile_plan

    plan = compile_plan(spec, spec.slurm.env)
    executor = executor_for(spec, tmp_path / "submitit" / "%j")
    return track(executor.submit(TrainTask(plan.payload, plan.env, "fake_runtime:run")))


@pytest.mark.train
@pytest.mark.slow
def test_real_training_preempted_resumes_from_object_storage(slurm):
    pytest.importorskip("torch")
    spec = make_spec(slurm, steps=40, nodes=2, procs=1)
    job = track(submit(spec, folder=slurm / "submitit" / "%j"))
    out = slurm / "out"
    wait_for(lambda: any((out / "checkpoints").glob("step-*/manifest.json")), 240,
             "the first committed checkpoint")  # setup done, training under way
    job._interrupt(timeout=False)
    result = run_to_end(job, 300).results()[0]
    assert result["status"] == 0 and result["requeues"] == 1, result
    log = job.stderr() or ""  # rank 0's log, both runs (the runtime logs to stderr)
    stopped = re.search(r"checkpoint step (\d+) committed; exiting with 143", log)
    resumed = re.search(r"resumed from checkpoint step (\d+)", log)
    assert stopped and resumed, log[-3000:]
    assert int(resumed.group(1)) == int(stopped.group(1)) >= 1  # the requeued job went on from the stop's save
    assert log.index(stopped.group(0)) < log.index(resumed.group(0))
    assert (out / "adapter" / "manifest.json").exists() and (out / "checkpoints" / "step-00000040").is_dir()
