"""Experiment trackers against real parts (issue #25): an MLflow tracking server started here on loopback
(sqlite backend store, artifacts on the local disk), TensorBoard event files read back with tensorboard's
own reader, the real runtime on CPU (the quickstart LoRA job).

* a run reports its parameters, every step's metrics, evals, the forgetting check, the planner's
  prediction and its adapter's URI and record; the MLflow server is killed mid-run and started again:
  the run finishes all the same, says so in one warning line, and what it missed is delivered;
* a run stopped (SIGUSR2) and resumed reports to the same MLflow run, with one value per step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
mlflow = pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")

from tests.e2e.test_train_runtime import (  # noqa: E402
    QUICKSTART,
    ROOT,
    _free_port,
    cache_dir,  # noqa: F401 - the module's shared cache fixture
    finish,
    launch,
    records,
    wait_for_step,
    write_payload,
)

pytestmark = [pytest.mark.train, pytest.mark.slow]


class Server:
    """``mlflow server`` on loopback; stop() kills it, start() brings it back on the same port and store."""

    def __init__(self, root: Path):
        self.root, self.port = root, _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> None:
        exe = Path(sys.executable).with_name("mlflow")
        self.proc = subprocess.Popen(
            [str(exe), "server", "--backend-store-uri", f"sqlite:///{self.root}/db.sqlite", "--artifacts-destination",
             str(self.root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=(self.root / "server.log").open("a"), stderr=subprocess.STDOUT, start_new_session=True)
        end = time.monotonic() + timeout
        import urllib.request

        while time.monotonic() < end:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module (each test its own experiment); a test that stops it starts it again."""
    s = Server(tmp_path_factory.mktemp("mlflow"))
    s.start()
    yield s
    s.stop()


def client(server: Server):
    from mlflow.tracking import MlflowClient

    return MlflowClient(server.uri)


def run_of(server: Server, experiment: str = "quickstart"):
    c = client(server)
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None
    runs = c.search_runs([exp.experiment_id])
    assert len(runs) == 1, runs
    return runs[0]


def steps_of(server: Server, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in client(server).get_metric_history(run_id, key))


def test_a_run_reports_everything_and_survives_a_tracker_outage(tmp_path, cache_dir, server):  # noqa: F811
    out = tmp_path / "out"
    steps = 600  # ~30 s on this CPU: the outage (and the server's restart, ~20 s) lands inside it
    tracking = json.dumps({"mlflow": {"uri": server.uri}, "tensorboard": {}})
    payload = write_payload(tmp_path, "tracked", [f"output.uri={out.as_uri()}", f"training.max_steps={steps}",
                                                  f"tracking={tracking}", "training.eval_every_steps=200"])
    proc = launch(payload, 1, cache_dir, tmp_path)
    state = out / ".ftcluster" / "tracking.json"
    wait_for_step(proc, out, 10)
    end = time.monotonic() + 60
    while not state.exists() and time.monotonic() < end:  # the tracker's thread opens the MLflow run
        time.sleep(0.2)
    assert json.loads(state.read_text())["mlflow"]["uri"] == server.uri
    server.stop()  # the tracker goes down mid-run
    wait_for_step(proc, out, 60)
    server.start()
    rc, log = finish(proc)
    assert rc == 0, log[-3000:]
    failed = [ln for ln in log.splitlines() if "tracking: mlflow at" in ln and "failed" in ln]
    assert len(failed) == 1 and "training goes on, retrying in the background" in failed[0], log[-3000:]
    assert "answers again; what it missed is sent" in log, log[-3000:]

    run = run_of(server)
    assert run.info.status == "FINISHED"
    rid = run.info.run_id
    assert json.loads(state.read_text())["mlflow"]["run_id"] == rid
    assert steps_of(server, rid) == list(range(1, steps + 1))  # every step, once, the outage's included
    p = run.data.params
    assert p["training.max_steps"] == str(steps) and p["method"] == "lora" and "ftcluster.plan.memory_gb" in p
    assert [m.step for m in client(server).get_metric_history(rid, "eval/loss")] == [0, 200, 400, 600]
    general = {r["when"]: r["loss"] for r in records(out, "general_eval")}
    assert run.data.metrics["general_eval_before/loss"] == pytest.approx(general["before"])
    assert run.data.metrics["general_eval_after/loss"] == pytest.approx(general["after"])
    assert run.data.tags["ftcluster.artifact.adapter"] == f"{out.as_uri().rstrip('/')}/adapter"
    meta = client(server).download_artifacts(rid, "ftcluster/adapter_meta.json", str(tmp_path))
    assert json.loads(Path(meta).read_text())["kind"] == "adapter"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, steps + 1))
    assert loss[-1].value == pytest.approx(records(out, "train")[-1]["loss"], rel=1e-6)


def test_a_resumed_run_reports_to_the_same_run_with_one_value_per_step(tmp_path, cache_dir, server):  # noqa: F811
    out = tmp_path / "out"
    steps = 60
    tracking = json.dumps({"mlflow": {"uri": server.uri, "experiment": "resume-check"}, "tensorboard": {}})
    common = [f"output.uri={out.as_uri()}", f"training.max_steps={steps}", "output.checkpoint_every_steps=10",
              f"tracking={tracking}", "training.eval_every_steps=1000", "training.log_every_steps=1"]
    payload = write_payload(tmp_path, "run", common)
    proc = launch(payload, 1, cache_dir, tmp_path)
    wait_for_step(proc, out, 25)
    os.kill(proc.pid, signal.SIGUSR2)
    rc, log = finish(proc)
    assert rc == 143, log[-3000:]
    first = run_of(server, "resume-check")
    assert first.info.status == "KILLED"
    logged_before = steps_of(server, first.info.run_id)
    rc, log = finish(launch(payload, 1, cache_dir, tmp_path))
    assert rc == 0, log[-3000:]
    run = run_of(server, "resume-check")  # still one run
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    got = steps_of(server, run.info.run_id)
    assert got == list(range(1, steps + 1)), (logged_before, got)  # the retrained steps not logged twice
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tb_steps = [e.step for e in acc.Scalars("train/loss")]
    assert tb_steps == list(range(1, steps + 1)), tb_steps  # purge_step hid the first attempt's later steps
    assert QUICKSTART.exists() and ROOT.exists()
