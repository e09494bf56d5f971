"""train/tracking.py's queue: a tracker that fails is said once, retried in the background, and gets
everything it missed in order when it answers again; one that never answers costs bounded time at the
end. The trackers themselves run against a real MLflow server and TensorBoard's reader in
tests/e2e/test_tracking.py."""

from __future__ import annotations

import logging
import time

from ftcluster.train import tracking as T


class Flaky:
    """A backend that raises for its first ``fail`` calls (open or send), then records what it gets."""

    name = "flaky"
    where = "flaky at nowhere"

    def __init__(self, fail: int):
        self.fail, self.got, self.ended = fail, [], None

    def _maybe(self):
        if self.fail > 0:
            self.fail -= 1
            raise ConnectionRefusedError("[Errno 111] Connection refused")

    def open(self):
        self._maybe()

    def send(self, recs):
        self._maybe()
        self.got += [r.get("step") for r in recs]

    def finish(self, artifacts, records, finished):
        self.ended = (artifacts, finished)


def test_a_failing_tracker_is_said_once_and_gets_everything_in_order(monkeypatch, caplog):
    monkeypatch.setattr(T, "MAX_PENDING", 1000)
    b = Flaky(fail=3)
    tr = T.Trackers([b], spec=None)
    tr.backoff[b.name] = 0.05  # short pauses for the test (the runtime's start at 5 s)
    caplog.set_level(logging.INFO, logger="ftcluster.train")
    for step in range(1, 51):
        tr.record({"kind": "train", "step": step, "loss": 1.0})
        time.sleep(0.002)
        tr.backoff[b.name] = min(tr.backoff.get(b.name, 0.05), 0.05)
    tr.record({"kind": "summary", "train_loss": 1.0})
    tr.close({"adapter": "file:///x/adapter"}, {}, timeout=10)
    assert [s for s in b.got if s is not None] == list(range(1, 51))
    assert b.ended == ({"adapter": "file:///x/adapter"}, True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "flaky at nowhere failed (ConnectionRefusedError" in warnings[0], warnings
    assert any("answers again" in r.getMessage() for r in caplog.records)


def test_a_tracker_that_never_answers_costs_bounded_time_and_one_count(caplog):
    b = Flaky(fail=10**9)
    tr = T.Trackers([b], spec=None)
    for step in range(1, 11):
        tr.record({"kind": "train", "step": step, "loss": 1.0})
    t0 = time.monotonic()
    tr.close({}, {}, timeout=3)
    assert time.monotonic() - t0 < 6
    assert b.ended is None
    assert any("10 record(s) not delivered" in r.getMessage() for r in caplog.records), caplog.text


def test_metric_items_and_flatten():
    assert T.metric_items({"kind": "general_eval", "step": 5, "when": "after", "loss": 2.0, "drift": 0.5}) == (
        5, {"general_eval_after/loss": 2.0, "general_eval_after/drift": 0.5})
    step, items = T.metric_items({"kind": "train", "step": 3, "loss": float("nan"), "lr": 1e-3, "final": True,
                                  "eta_s": None})
    assert step == 3 and items == {"train/lr": 1e-3}
    assert T.flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": "1", "a.c": "[1, 2]", "d": "None"}
    assert T.metric_items({"kind": "summary", "train_loss": 1.5}) == (None, {"summary/train_loss": 1.5})
