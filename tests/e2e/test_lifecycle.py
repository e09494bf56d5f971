"""A run's processes live and die together (docs/lifecycle.md), with real processes.

The local backend, its supervisor, ``ftcluster.train.launch`` and torchrun are real; the
workers are tests/support/lifecycle_worker.py unless a test says otherwise (the last ones run the real
runtime). Every test checks the two promises: once something of the run is killed, no process
of it survives for long, and ``status`` never says the run ended while one still lives.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")

from ftcluster.backends.local.backend import LocalBackend  # noqa: E402
from ftcluster.backends.local.proctree import run_pids  # noqa: E402
from ftcluster.procs import alive  # noqa: E402
from ftcluster.spec.loader import load_spec  # noqa: E402
from tests.support.lifecycle_worker import make_python  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
BOUND_S = 20.0  # what "dies with" may take: the kernel's SIGKILL, torchrun noticing, the supervisor's sweep


@pytest.fixture
def lifecycle(tmp_path, ftc_home, monkeypatch):
    monkeypatch.setenv("LIFECYCLE_DIR", str(tmp_path))
    monkeypatch.setenv("FTCLUSTER_CANCEL_GRACE_S", "3")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    return tmp_path


def submit(tmp: Path, nproc: int, *sets: str):
    spec = load_spec(QUICKSTART, overrides=[f"resources.procs_per_node={nproc}", f"local.python={make_python(tmp)}",
                                            f"output.uri={(tmp / 'out').as_uri()}", *sets])
    backend = LocalBackend()
    st = backend.submit(spec)
    return backend, Path(st.run_dir)


def workers_up(tmp: Path, run_dir: Path, nproc: int, timeout: float = 120) -> list[int]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        pids = [int(p.read_text()) for p in tmp.glob("worker-*.pid") if p.read_text()]
        if len(pids) == nproc and all(alive(p) for p in pids):
            return pids
        time.sleep(0.2)
    log = (run_dir / "log.txt").read_text() if (run_dir / "log.txt").exists() else ""
    raise AssertionError(f"{nproc} worker(s) not up in {timeout} s:\n{log[-3000:]}")


def watch_until_ended(backend: LocalBackend, run_dir: Path, timeout: float = BOUND_S) -> str:
    """Poll status until the run ended and none of its processes lives; fail if status ever
    reports an end while a process of the run is alive, or if the bound passes."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = backend.status(str(run_dir))
        if st.terminal:
            left = run_pids(run_dir)
            assert not left, f"status says {st.state} while pid(s) {left} of the run are alive"
            return st.state
        time.sleep(0.1)
    raise AssertionError(f"still {backend.status(str(run_dir)).state} after {timeout} s; alive: "
                         f"{run_pids(run_dir)}\n{(run_dir / 'log.txt').read_text()[-3000:]}")


def all_gone(pids: list[int], timeout: float = BOUND_S) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and any(alive(p) for p in pids):
        time.sleep(0.1)
    assert not [p for p in pids if alive(p)], f"survived: {[p for p in pids if alive(p)]}"


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("victim", ["launcher", "supervisor", "worker"])
def test_sigkill_of_any_part_ends_the_whole_run(lifecycle, nproc, victim):
    # No restart: a SIGKILLed worker is an infrastructure fault the supervisor would otherwise
    # restart (tests/e2e/test_faults.py); here the run must end with every process gone.
    backend, run_dir = submit(lifecycle, nproc, "resources.max_restarts=0")
    workers = workers_up(lifecycle, run_dir, nproc)
    supervisor = int((run_dir / "supervisor.pid").read_text())
    launcher = int((run_dir / "job.pid").read_text())
    everything = run_pids(run_dir)
    assert {supervisor, launcher, *workers} <= set(everything), everything
    os.kill({"launcher": launcher, "supervisor": supervisor, "worker": workers[-1]}[victim], signal.SIGKILL)
    assert watch_until_ended(backend, run_dir) == "FAILED"
    all_gone(everything)
    assert run_pids(run_dir) == []


def test_cancel_during_a_retrying_upload_returns_after_every_process_exited(lifecycle, monkeypatch):
    """The worker retries an upload to an endpoint that refuses connections (nothing listens on
    the port) and never acts on the stop; cancel still returns only once all of the run is gone."""
    pytest.importorskip("s3fs")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections are refused
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION":
                 "us-west-2", "AWS_MAX_ATTEMPTS": "1", "AWS_EC2_METADATA_DISABLED": "true",
                 "LIFECYCLE_MODE": "upload"}.items():
        monkeypatch.setenv(k, v)
    backend, run_dir = submit(lifecycle, 2, "output.uri=s3://ftc-stalled/run",
                              f"output.storage_options={{client_kwargs: {{endpoint_url: 'http://127.0.0.1:{port}'}}}}")
    workers_up(lifecycle, run_dir, 2)
    time.sleep(2)  # retrying by now
    everything = run_pids(run_dir)
    t0 = time.monotonic()
    st = backend.cancel(str(run_dir))
    took = time.monotonic() - t0
    assert [p for p in everything if alive(p)] == [], "cancel returned while processes of the run live"
    assert st.state == "CANCELLED" and backend.status(str(run_dir)).state == "CANCELLED"
    assert 3 <= took < 3 + 30, took  # the grace (3 s) for a checkpoint, then SIGKILL
    assert run_pids(run_dir) == []


def test_cancel_while_running_stops_cleanly(lifecycle):
    backend, run_dir = submit(lifecycle, 2)
    everything = [*workers_up(lifecycle, run_dir, 2), *run_pids(run_dir)]
    st = backend.cancel(str(run_dir))
    assert st.state == "CANCELLED"
    all_gone(everything, timeout=0.5)  # already gone when cancel returned
    log = (run_dir / "log.txt").read_text()
    assert "rank 0: stopped at step" in log and "rank 1: stopped at step" in log, log


# --------------------------------------------------------------------------- the launcher's exit status


def launcher(tmp: Path, nproc: int, worker: list[str], env: dict[str, str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ftcluster.train.launch", "--standalone", f"--nproc-per-node={nproc}",
           "--max-restarts=0", *worker]
    full = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "LIFECYCLE_DIR": str(tmp),
            "PYTHONUNBUFFERED": "1", **env}
    full.pop("OMP_NUM_THREADS", None)  # torchrun prints its banner when it sets it
    full.pop("FTCLUSTER_DEBUG", None)
    return subprocess.Popen(cmd, cwd=ROOT, env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def fake_worker(tmp: Path) -> list[str]:
    payload = tmp / "payload.json"
    payload.write_text('{"spec": {}}')
    return [str(ROOT / "tests" / "support" / "lifecycle_worker.py"), "--spec", str(payload)]


@pytest.mark.parametrize(("mode", "sig", "want"), [
    ("steps", signal.SIGUSR2, 143),  # saved and stopped
    ("steps", signal.SIGTERM, 143),
    ("finish", signal.SIGTERM, 0),  # a stop during the finish that completes it: 0, not torchrun's 1
    ("fail", None, 1),
])
def test_launcher_exit_follows_the_workers(tmp_path, mode, sig, want):
    proc = launcher(tmp_path, 2, fake_worker(tmp_path), {"LIFECYCLE_MODE": mode, "LIFECYCLE_STEPS": "40"})
    if sig is not None:
        workers_up(tmp_path, tmp_path, 2)
        os.kill(proc.pid, sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == want, out
    assert "Traceback" not in out and "SignalException" not in out, out
    assert "OMP_NUM_THREADS" not in out and "torch/distributed" not in out, out  # torchrun's own lines
    if want == 1:
        assert "ftcluster: training failed: rank 0 on " in out and "not retried" in out, out


@pytest.mark.train
@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGTERM])
def test_stop_during_start_up_exits_143_without_traceback(tmp_path, sig):
    """The real runtime, 2 workers: a stop while they start (import torch, build the model)."""
    payload = write_payload(tmp_path, 2)
    proc = launcher(tmp_path, 2, ["-m", "ftcluster.train", "--spec", str(payload)], real_env(tmp_path))
    time.sleep(3)  # the workers are importing torch
    os.kill(proc.pid, sig)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 143, out
    assert "Traceback" not in out and "SignalException" not in out, out


@pytest.mark.train
def test_real_launcher_sigkilled_takes_its_two_workers_along(tmp_path):
    payload = write_payload(tmp_path, 2, "training.max_steps=100000")
    proc = launcher(tmp_path, 2, ["-m", "ftcluster.train", "--spec", str(payload)], real_env(tmp_path))
    metrics = tmp_path / "out" / "metrics.jsonl"
    end = time.monotonic() + 240
    while time.monotonic() < end and not (metrics.exists() and '"kind": "train"' in metrics.read_text()):
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.2)
    workers = children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    all_gone(workers, timeout=10)


def real_env(tmp: Path) -> dict[str, str]:
    return {"FTCLUSTER_CACHE": str(tmp / "cache"), "FTCLUSTER_LOCAL_DIR": str(tmp / "local"), "HF_HUB_OFFLINE": "1",
            "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "60"}


def write_payload(tmp: Path, nproc: int, *sets: str) -> Path:
    from ftcluster.plan.launch import compile_plan

    spec = load_spec(QUICKSTART, overrides=[f"resources.procs_per_node={nproc}", f"output.uri={(tmp / 'out').as_uri()}",
                                            "training.log_every_steps=1", *sets])
    path = tmp / "payload.json"
    path.write_text(compile_plan(spec).payload_json())
    return path


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]
