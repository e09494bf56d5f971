"""Stops and crashes at every moment of a run end in a defined state (issue #8).

Each case delivers one signal at one named boundary through the test-only hook
``FTCLUSTER_TEST_SIGNAL_AT`` (ftcluster/storage/testhook.py; no timing-based sleeps), then checks
the exit code, the store (only complete checkpoints; an adapter for every committed checkpoint
after a clean stop; final artifacts complete or absent) and, where it matters, that a rerun
finishes with everything in place. A stop goes to the launcher (torchrun's agent), as a
scheduler or ``ftcluster cancel`` sends it; a crash is SIGKILL of the worker.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("deepspeed")

from test_train_runtime import finish, full_overrides, full_spec_file, launch, write_payload  # noqa: E402

from ftcluster.storage.layout import ARTIFACTS, MANIFEST, parse_step_dir  # noqa: E402

pytestmark = pytest.mark.train

STEPS = 6
EVERY = 2
ALL = list(range(EVERY, STEPS + 1, EVERY))  # the checkpoints of a whole run (keep_last 3 keeps them all)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ftc-cache")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def lora_overrides(out: Path) -> list[str]:
    return [f"training.max_steps={STEPS}", "training.log_every_steps=1", "training.eval_every_steps=1000",
            f"output.checkpoint_every_steps={EVERY}", "output.keep_last=3", "data.seq_len=64",
            "training.micro_batch_size=2", "data.general_eval=null", f"output.uri={out.as_uri()}"]


def complete(folder: Path) -> bool:
    """Whether ``folder`` is committed; a manifest whose files are not all there fails the test."""
    man = folder / MANIFEST
    if not man.exists():
        return False
    for rel, info in json.loads(man.read_text())["files"].items():
        f = folder / rel
        assert f.is_file() and f.stat().st_size == info["size"], f"{folder}: committed but {rel} is missing"
    return True


def store(out: Path) -> tuple[list[int], list[int], set[str]]:
    """(committed checkpoint steps, committed adapters/step-N steps, committed end-of-run artifacts)."""
    def steps(sub: str) -> list[int]:
        found = [(parse_step_dir(d.name), d) for d in (out / sub).glob("step-*")]
        return sorted(s for s, d in found if s is not None and complete(d))

    return steps("checkpoints"), steps("adapters"), {a for a in ARTIFACTS if complete(out / a)}


def assert_finished(out: Path, final: str, lora: bool) -> None:
    """After a rerun: the last step committed, every adapter there, the final artifact complete.

    (A stop between two periodic checkpoints adds one at its step, so keep_last may prune step 2.)
    """
    ckpts, adapters, finals = store(out)
    assert ckpts[-1] == STEPS and finals == {final}
    if lora:
        assert set(ckpts) <= set(adapters) and set(ALL) <= set(adapters), (ckpts, adapters)
    else:
        assert adapters == []


def run(payload: Path, nproc: int, cache: Path, tmp: Path, monkeypatch, at: str | None) -> tuple[int, str]:
    if at is None:
        monkeypatch.delenv("FTCLUSTER_TEST_SIGNAL_AT", raising=False)
    else:
        monkeypatch.setenv("FTCLUSTER_TEST_SIGNAL_AT", at)
    return finish(launch(payload, nproc, cache, tmp), timeout=400)


def assert_clean(rc: int, log: str, expected: int) -> None:
    assert rc == expected, log[-4000:]
    assert "Traceback" not in log and "SignalException" not in log, log[-4000:]


# (boundary:signal, exit code, checkpoints, adapters, artifacts right after; None: not fixed)
LORA_CASES = [
    pytest.param("startup:SIGUSR2", 143, [], [], set(), id="startup-usr2"),
    pytest.param("setup:SIGTERM", 143, [], [], set(), id="setup-term", marks=pytest.mark.slow),
    pytest.param("checkpoint-files:SIGKILL", 1, [], [], set(), id="ckpt-files-kill", marks=pytest.mark.slow),
    pytest.param("checkpoint-files:SIGUSR2", 143, None, None, set(), id="ckpt-files-usr2", marks=pytest.mark.slow),
    pytest.param("checkpoint-committed:SIGKILL", 1, [EVERY], [], set(), id="ckpt-committed-kill"),
    pytest.param("final-export:SIGUSR2", 143, ALL, ALL, set(), id="final-export-usr2", marks=pytest.mark.slow),
    pytest.param("final-export:SIGKILL", 1, None, None, set(), id="final-export-kill", marks=pytest.mark.slow),
    pytest.param("final-committed:SIGUSR2", 0, ALL, ALL, {"adapter"}, id="final-committed-usr2"),
    pytest.param("final-committed:SIGTERM", 0, ALL, ALL, {"adapter"}, id="final-committed-term",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("at, code, ckpts, adapters, finals", LORA_CASES)
def test_lora_signal_at_boundary(tmp_path, cache_dir, monkeypatch, at, code, ckpts, adapters, finals):
    out = tmp_path / "out"
    payload = write_payload(tmp_path, "run", lora_overrides(out))
    rc, log = run(payload, 1, cache_dir, tmp_path, monkeypatch, at)
    if code == 1:  # a crash: torchrun reports the killed worker in one line
        assert rc == 1 and "exit code -9" in log, log[-4000:]
    else:
        assert_clean(rc, log, code)
    got_ckpts, got_adapters, got_finals = store(out)
    assert got_finals == finals
    if ckpts is not None:
        assert got_ckpts == ckpts
    if adapters is not None:
        assert got_adapters == adapters
    if code != 1:  # a clean stop leaves an adapter for every committed checkpoint
        assert got_adapters == got_ckpts
    if at == "checkpoint-files:SIGUSR2":  # stopped at a later step, which committed too
        assert got_ckpts[0] == EVERY and len(got_ckpts) == 2 and "stop requested (SIGUSR2)" in log
    if code == 0:
        return
    rc, log = run(payload, 1, cache_dir, tmp_path, monkeypatch, None)
    assert_clean(rc, log, 0)
    assert_finished(out, "adapter", lora=True)
    if at == "checkpoint-committed:SIGKILL":  # the lost adapter is exported again on resume
        assert f"resumed from checkpoint step {EVERY} " in log and "exporting it again" in log


DS_CASES = [
    pytest.param("startup:SIGTERM:1", 143, [], set(), id="startup-term-rank1"),
    pytest.param("checkpoint-files:SIGKILL", 1, [], set(), id="ckpt-files-kill"),
    pytest.param("checkpoint-files:SIGUSR2", 143, None, set(), id="ckpt-files-usr2"),
    pytest.param("final-export:SIGUSR2", 143, ALL, set(), id="final-export-usr2"),
    pytest.param("final-committed:SIGUSR2", 0, ALL, {"final"}, id="final-committed-usr2"),
]


@pytest.mark.slow
@pytest.mark.parametrize("at, code, ckpts, finals", DS_CASES)
def test_zero2_signal_at_boundary(tmp_path, cache_dir, monkeypatch, at, code, ckpts, finals):
    """DeepSpeed ZeRO-2 on CPU, two processes over gloo: the same boundaries, and a rerun finishes."""
    out = tmp_path / "out"
    extra = [f"training.max_steps={STEPS}", f"output.checkpoint_every_steps={EVERY}", "output.keep_last=3",
             "data.general_eval=null"]
    payload = write_payload(tmp_path, "run", full_overrides(out, 2, *extra), base=full_spec_file(tmp_path))
    rc, log = run(payload, 2, cache_dir, tmp_path, monkeypatch, at)
    if code == 1:
        assert rc == 1 and "exit code -9" in log, log[-4000:]
    else:
        assert_clean(rc, log, code)
    got_ckpts, got_adapters, got_finals = store(out)
    assert got_adapters == [] and got_finals == finals
    if ckpts is not None:
        assert got_ckpts == ckpts
    if at.startswith("startup"):
        assert "stopped by SIGTERM" in log or "stopped by peer" in log
    if code == 0:
        return
    rc, log = run(payload, 2, cache_dir, tmp_path, monkeypatch, None)
    assert_clean(rc, log, 0)
    assert_finished(out, "final", lora=False)


@pytest.mark.slow
@pytest.mark.parametrize("at, state", [("final-committed:SIGUSR2", "SUCCEEDED"), ("final-export:SIGUSR2", "FAILED")])
def test_local_backend_status_after_a_stop_in_the_finish(tmp_path, cache_dir, monkeypatch, ftc_home, at, state):
    """Through the local backend: a stop after the final manifest is a success; one before the
    exports is "stopped ... resubmit to resume" (exit 143), never a plain failure (exit 1)."""
    from ftcluster import api

    out = tmp_path / "out"
    spec = Path(__file__).resolve().parent.parent / "examples" / "quickstart.yaml"
    monkeypatch.setenv("FTCLUSTER_TEST_SIGNAL_AT", at)
    monkeypatch.setenv("FTCLUSTER_CACHE", str(cache_dir))
    monkeypatch.setenv("FTCLUSTER_LOCAL_DIR", str(tmp_path / "local"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    st = api.submit(str(spec), overrides=lora_overrides(out))
    end = time.monotonic() + 400
    while not (st := api.status(st.run_id)).terminal and time.monotonic() < end:
        time.sleep(0.5)
    log = "".join(api.logs(st.run_id))
    assert st.state == state, (st, log[-4000:])
    assert st.returncode == (0 if state == "SUCCEEDED" else 143), log[-4000:]
    assert "Traceback" not in log
    if state == "FAILED":
        assert "stopped by a signal" in st.message
        assert store(out) == (ALL, ALL, set())
    else:
        assert store(out) == (ALL, ALL, {"adapter"})
