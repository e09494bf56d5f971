"""Experiment trackers (``tracking:``, docs/tracking.md): MLflow and TensorBoard, from rank 0.

Every record the run writes to ``metrics.jsonl`` (train steps, evals, the general eval before and
after, checkpoints, the summary) is also queued here and sent by one background thread, so a tracker
never holds training up. A tracker that fails (down, refusing, slow) is said once in one warning
line and retried with a growing pause (up to a minute), keeping what it has not sent yet; when it
answers again it gets everything in order, and the run says so. At the end the thread gets a bounded
time to deliver; what is still unsent then is counted in one line, never waited for.

* **MLflow** (``MlflowClient``): an experiment (``tracking.mlflow.experiment``, default the job's name:
  a job array's variants share their job's), one run per output (its id kept in
  ``<output.uri>/.ftcluster/tracking.json``, so a requeued or resumed run reports to the same MLflow
  run), the resolved spec as parameters (secrets masked, dotted keys), the planner's predicted memory
  and step time, every numeric field of every record as a metric ``KIND/FIELD`` at its step, and at
  the end the artifacts' URIs as tags and each artifact's record (``ftcluster_meta.json``) as a
  run artifact. A resumed run skips the steps the MLflow run already holds (the retrained steps repeat
  their losses: docs/training.md, "Resume"), so no step is logged twice.
* **TensorBoard**: event files under ``<output.uri>/tensorboard`` (or ``tracking.tensorboard.dir``),
  written locally and uploaded through fsspec at each flush for a remote store; a resumed run purges
  the events at and after its first step (``purge_step``) so the curve has one value per step.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("ftcluster.train")

STATE = ".ftcluster/tracking.json"  # under output.uri: the tracker runs this output reports to
MAX_PENDING = 200_000  # records a failing tracker keeps to send later (the oldest are dropped beyond)
CLOSE_TIMEOUT_S = 30.0
SEND_EVERY_S = 2.0  # records are sent in batches at most this often: one request per batch, not per step


def metric_items(rec: dict[str, Any]) -> tuple[int | None, dict[str, float]]:
    """(step, {"KIND/FIELD": value}) for the numeric fields of a metrics.jsonl record."""
    kind = str(rec.get("kind", "train"))
    if kind == "general_eval":
        kind = f"general_eval_{rec.get('when', 'x')}"
    step = rec.get("step")
    out = {}
    for k, v in rec.items():
        if k in ("kind", "step", "when") or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if v != v or v in (float("inf"), float("-inf")):  # NaN/inf: MLflow refuses them
            continue
        out[f"{kind}/{k}"] = float(v)
    return (int(step) if isinstance(step, (int, float)) else None), out


def flatten(d: Any, prefix: str = "") -> dict[str, str]:
    """Dotted keys to strings (lists as JSON), as tracker parameters."""
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = json.dumps(d) if isinstance(d, (list, tuple)) else str(d)
    return out


class _Store:
    """The output's small tracking state file, through fsspec."""

    def __init__(self, uri: str, options: dict[str, Any]):
        from ..storage.uri import fs_and_path

        self.fs, root = fs_and_path(uri, options)
        self.path = f"{root.rstrip('/')}/{STATE}"

    def read(self) -> dict[str, Any]:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except (FileNotFoundError, ValueError, OSError):
            return {}

    def write(self, data: dict[str, Any]) -> None:
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        with self.fs.open(self.path, "w") as fh:
            fh.write(json.dumps(data, indent=1, sort_keys=True))


class MlflowTracker:
    name = "mlflow"

    def __init__(self, cfg: Any, spec: Any, group: str | None, store: _Store, resume_step: int):
        self.cfg, self.spec, self.store, self.resume_step = cfg, spec, store, resume_step
        self.experiment = cfg.experiment or group or spec.name
        self.where = f"mlflow at {cfg.uri}"
        self.client: Any = None
        self.run_id: str | None = None
        self.last_step = -1  # the newest train step the MLflow run holds (resume: skip up to it)

    def open(self) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.cfg.uri)
        exp = client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(self.experiment)
        state = self.store.read()
        run_id = (state.get("mlflow") or {}).get("run_id") if state.get("mlflow", {}).get("uri") == self.cfg.uri else None
        if run_id and self.resume_step > 0:
            try:
                run = client.get_run(run_id)
                history = client.get_metric_history(run_id, "train/loss")
                self.last_step = max((m.step for m in history), default=-1)
                if run.info.status != "RUNNING":
                    client.update_run(run_id, status="RUNNING")
            except Exception:  # noqa: BLE001 - deleted or another server: a new run
                run_id = None
        if not run_id or self.resume_step == 0:
            from ..artifacts.record import masked

            tags = {"ftcluster.job": self.spec.name, "ftcluster.method": self.spec.method,
                    "ftcluster.output_uri": self.spec.output.uri}
            if self.experiment != self.spec.name:
                tags["ftcluster.group"] = self.experiment
            run_id = client.create_run(exp_id, run_name=self.spec.name, tags=tags).info.run_id
            params = flatten(masked(self.spec.model_dump(mode="json")))
            params.update(_plan_params(self.spec))
            from mlflow.entities import Param

            items = [Param(k[:250], v[:6000]) for k, v in sorted(params.items())]
            for i in range(0, len(items), 100):
                client.log_batch(run_id, params=items[i:i + 100])
            self.store.write({**state, "mlflow": {"uri": self.cfg.uri, "run_id": run_id, "experiment": self.experiment}})
        self.client, self.run_id = client, run_id

    def send(self, recs: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = []
        for rec in recs:
            step, items = metric_items(rec)
            if rec.get("kind") in ("train", "eval", "checkpoint") and step is not None and step <= self.last_step:
                continue  # a resumed run's retrained step: the MLflow run holds it already
            metrics += [Metric(k, v, now, step if step is not None else 0) for k, v in items.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def finish(self, artifacts: dict[str, str], records: dict[str, dict[str, Any]], finished: bool) -> None:
        for name, uri in artifacts.items():
            self.client.set_tag(self.run_id, f"ftcluster.artifact.{name}", uri)
        for name, rec in records.items():
            self.client.log_dict(self.run_id, rec, f"ftcluster/{name}_meta.json")
        self.client.set_terminated(self.run_id, status="FINISHED" if finished else "KILLED")


class TensorboardTracker:
    name = "tensorboard"

    def __init__(self, cfg: Any, spec: Any, work_dir: Path, resume_step: int):
        self.spec = spec
        self.target = (cfg.dir or f"{spec.output.uri.rstrip('/')}/tensorboard").rstrip("/")
        self.where = f"tensorboard at {self.target}"
        self.resume_step = resume_step
        from ..storage.uri import is_local, local_path

        self.local = Path(local_path(self.target)) if is_local(self.target) else work_dir / "tensorboard"
        self.remote = not is_local(self.target)
        self.writer: Any = None

    def open(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if self.remote:  # continue the uploaded event files
            self._sync(download=True)
        self.local.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(self.local), purge_step=self.resume_step + 1 if self.resume_step else None)

    def send(self, recs: list[dict[str, Any]]) -> None:
        for rec in recs:
            step, items = metric_items(rec)
            for k, v in items.items():
                self.writer.add_scalar(k, v, step if step is not None else 0)
        self.writer.flush()
        if self.remote:
            self._sync(download=False)

    def finish(self, artifacts: dict[str, str], records: dict[str, dict[str, Any]], finished: bool) -> None:
        for name, uri in artifacts.items():
            self.writer.add_text(f"artifacts/{name}", uri)
        self.writer.close()
        if self.remote:
            self._sync(download=False)

    def _sync(self, download: bool) -> None:
        from ..storage.uri import fs_and_path

        fs, root = fs_and_path(self.target, self.spec.output.storage_options)
        if download:
            if fs.exists(root):
                fs.get(root.rstrip("/") + "/", str(self.local) + "/", recursive=True)
        else:
            fs.put(str(self.local) + "/", root.rstrip("/") + "/", recursive=True)


def _plan_params(spec: Any) -> dict[str, str]:
    """The planner's prediction for this job on its GPUs, as parameters beside the measured metrics."""
    try:
        from ..plan.planner import build_plan

        req = build_plan(spec, network=False, count_data=False, alternatives=False).requested
        if req is None:
            return {}
        return {"ftcluster.plan.memory_gb": f"{req.memory.total / 1e9:.2f}", "ftcluster.plan.step_s": f"{req.step_time_s:.4f}",
                "ftcluster.plan.layout": req.layout.describe()}
    except Exception:  # noqa: BLE001 - a prediction is optional
        return {}


class Trackers:
    """The run's trackers behind one queue and one thread (rank 0)."""

    def __init__(self, backends: list[Any], spec: Any):
        self.backends = backends
        self.spec = spec
        self.q: queue.Queue[Any] = queue.Queue()
        self.pending: dict[str, list[dict[str, Any]]] = {b.name: [] for b in backends}
        self.opened: set[str] = set()
        self.failing: dict[str, float] = {}  # name -> when to retry
        self.backoff: dict[str, float] = {}
        self.finished = False
        self.dropped: dict[str, int] = {b.name: 0 for b in backends}
        self._close = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ftcluster-tracking", daemon=True)
        self._thread.start()

    def record(self, rec: dict[str, Any]) -> None:
        if rec.get("kind") == "summary":
            self.finished = True
        self.q.put(dict(rec))

    def _loop(self) -> None:
        while True:
            try:
                item = self.q.get(timeout=1.0)
            except queue.Empty:
                item = None
            batch = [] if item is None else [item]
            self._close.wait(SEND_EVERY_S if item is not None else 0)  # gather a batch (not when closing)
            while True:
                try:
                    batch.append(self.q.get_nowait())
                except queue.Empty:
                    break
            for b in self.backends:
                p = self.pending[b.name]
                p += batch
                if len(p) > MAX_PENDING:
                    self.dropped[b.name] += len(p) - MAX_PENDING
                    del p[:len(p) - MAX_PENDING]
                self._deliver(b)
            if self._close.is_set() and self.q.empty():
                return

    def _deliver(self, b: Any, final: bool = False) -> bool:
        now = time.monotonic()
        if b.name in self.failing and now < self.failing[b.name] and not final:
            return False
        try:
            if b.name not in self.opened:
                b.open()
                self.opened.add(b.name)
            if self.pending[b.name]:
                b.send(self.pending[b.name])
                self.pending[b.name] = []
        except Exception as exc:  # noqa: BLE001 - a tracker never stops training
            first = b.name not in self.failing
            pause = min(60.0, self.backoff.get(b.name, 2.5) * 2)
            self.backoff[b.name] = pause
            self.failing[b.name] = now + pause
            if first:
                log.warning("tracking: %s failed (%s: %s); training goes on, retrying in the background",
                            b.where, type(exc).__name__, (str(exc).splitlines() or [""])[0][:200])
            return False
        if b.name in self.failing:
            del self.failing[b.name]
            self.backoff.pop(b.name, None)
            log.info("tracking: %s answers again; what it missed is sent", b.where)
        return True

    def close(self, artifacts: dict[str, str], records: dict[str, dict[str, Any]],
              timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Deliver what is queued (at most ``timeout`` seconds), then each tracker's end."""
        end = time.monotonic() + timeout
        self._close.set()
        self._thread.join(timeout)
        for b in self.backends:
            while self.pending[b.name] or b.name not in self.opened:
                if self._deliver(b, final=True) or time.monotonic() > end:
                    break
                time.sleep(1.0)
            left = len(self.pending[b.name]) + self.dropped[b.name]
            if left or b.name not in self.opened:
                log.warning("tracking: %s: %d record(s) not delivered (it did not answer); metrics.jsonl under "
                            "output.uri has them all", b.where, left)
                continue
            try:
                b.finish(artifacts, records, self.finished)
            except Exception as exc:  # noqa: BLE001
                log.warning("tracking: %s: could not record the run's end (%s: %s)", b.where, type(exc).__name__,
                            (str(exc).splitlines() or [""])[0][:200])


def open_trackers(spec: Any, work_dir: Path, resume_step: int, group: str | None = None) -> Trackers | None:
    """The trackers ``spec.tracking`` asks for, or None; the MLflow client's own retries are kept short so
    that this module's retry decides (a down server must not hold the thread for minutes)."""
    import os

    t = getattr(spec, "tracking", None)
    if t is None or (t.mlflow is None and t.tensorboard is None):
        return None
    import importlib.util

    backends: list[Any] = []
    missing = [(name, extra) for name, module, extra in (("mlflow", "mlflow", "mlflow"), ("tensorboard", "tensorboard", "tensorboard"))
               if getattr(t, name) is not None and importlib.util.find_spec(module) is None]
    for name, extra in missing:
        log.warning("tracking.%s: its client is not installed where the job runs (pip install 'ftcluster[%s]'); "
                    "not reporting to it; metrics.jsonl under output.uri has every figure", name, extra)
    if t.mlflow is not None and ("mlflow", "mlflow") not in missing:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        backends.append(MlflowTracker(t.mlflow, spec, group, _Store(spec.output.uri, spec.output.storage_options),
                                      resume_step))
    if t.tensorboard is not None and ("tensorboard", "tensorboard") not in missing:
        backends.append(TensorboardTracker(t.tensorboard, spec, work_dir, resume_step))
    return Trackers(backends, spec) if backends else None


def end_of_run(spec: Any) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """The committed artifacts' URIs and records under ``output.uri`` (for the trackers' last entries)."""
    from ..storage.catalog import Catalog

    try:
        cat = Catalog(spec.output.uri, spec.output.storage_options)
        uris, records = {}, {}
        for item in cat.artifacts():
            uris[item.name] = item.uri
            meta = cat.meta(item)
            if meta:
                records[item.name] = meta
        return uris, records
    except Exception:  # noqa: BLE001 - the store is unreachable: the trackers end without them
        return {}, {}
