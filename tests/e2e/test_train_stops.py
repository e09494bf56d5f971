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

from ftcluster.exitcodes import FAULT_EXIT  # noqa: E402
from ftcluster.storage.layout import ARTIFACTS, MANIFEST, parse_step_dir  # noqa: E402
from tests.e2e.test_train_runtime import finish, full_overrides, full_spec_file, launch, write_payload  # noqa: E402

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
    pytest.param("checkpoint-files:SIGKILL", FAULT_EXIT, [], [], set(), id="ckpt-files-kill", marks=pytest.mark.slow),
    pytest.param("checkpoint-files:SIGUSR2", 143, None, None, set(), id="ckpt-files-usr2", marks=pytest.mark.slow),
    pytest.param("checkpoint-committed:SIGKILL", FAULT_EXIT, [EVERY], [], set(), id="ckpt-committed-kill"),
    pytest.param("final-export:SIGUSR2", 143, ALL, ALL, set(), id="final-export-usr2", marks=pytest.mark.slow),
    pytest.param("final-export:SIGKILL", FAULT_EXIT, None, None, set(), id="final-export-kill", marks=pytest.mark.slow),
    pytest.param("final-committed:SIGUSR2", 0, ALL, ALL, {"adapter"}, id="final-committed-usr2"),
    pytest.param("final-committed:SIGTERM", 0, ALL, ALL, {"adapter"}, id="final-committed-term",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("at, code, ckpts, adapters, finals", LORA_CASES)
def test_lora_signal_at_boundary(tmp_path, cache_dir, monkeypatch, at, code, ckpts, adapters, finals):
    out = tmp_path / "out"
    payload = write_payload(tmp_path, "run", lora_overrides(out))
    rc, log = run(payload, 1, cache_dir, tmp_path, monkeypatch, at)
    if code == FAULT_EXIT:  # a crash: an infrastructure fault (exit 170), the killed worker named in one line
        assert rc == FAULT_EXIT and "exit code -9" in log and "killed by SIGKILL" in log, log[-4000:]
    else:
        assert_clean(rc, log, code)
    got_ckpts, got_adapters, got_finals = store(out)
    assert got_finals == finals
    if ckpts is not None:
        assert got_ckpts == ckpts
    if adapters is not None:
        assert got_adapters == adapters
    if code != FAULT_EXIT:  # a clean stop leaves an adapter for every committed checkpoint
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
    pytest.param("checkpoint-files:SIGKILL", FAULT_EXIT, [], set(), id="ckpt-files-kill"),
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
    if code == FAULT_EXIT:
        assert rc == FAULT_EXIT and "exit code -9" in log, log[-4000:]
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
    spec = Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml"
    monkeypatch.setenv("FTCLUSTER_TEST_SIGNAL_AT", at)
    monkeypatch.setenv("FTCLUSTER_CACHE", str(cache_dir))
    monkeypatch.setenv("FTCLUSTER_LOCAL_DIR", str(tmp_path / "local"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
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


def same_state(a, b, where: str) -> None:
    """Two loaded checkpoint objects hold equal tensors (bit for bit) and equal other values."""
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same_state(x, y, f"{where}[{i}]")
    elif type(a).__module__ == "numpy":
        assert (a == b).all(), where
    elif a.__class__.__eq__ is not object.__eq__:
        assert a == b or repr(a) == repr(b), where


@pytest.mark.parametrize("kind", ["lora", pytest.param("zero2", marks=pytest.mark.slow),
                                  pytest.param("zero3", marks=pytest.mark.slow)])
def test_async_checkpoints_save_and_resume_as_sync_ones(tmp_path, cache_dir, monkeypatch, kind):
    """A synchronous run (FTCLUSTER_ASYNC_CKPT=0) against an asynchronous one killed right after its
    first commit and resumed: the same loss curve, and the last checkpoint's files hold the same
    tensors bit for bit (engine state, optimizer, RNG and data position of every rank)."""
    import torch
    from safetensors.torch import load_file

    from tests.e2e.test_train_runtime import assert_same_curve, curve, records

    def payload(out: Path, name: str) -> Path:
        if kind == "lora":
            return write_payload(tmp_path, name, lora_overrides(out))
        extra = [f"training.max_steps={STEPS}", f"output.checkpoint_every_steps={EVERY}", "output.keep_last=3",
                 "data.general_eval=null"]
        return write_payload(tmp_path, name, full_overrides(out, int(kind[-1]), *extra), base=full_spec_file(tmp_path))

    nproc = 1 if kind == "lora" else 2
    ref, out = tmp_path / "ref", tmp_path / "out"
    monkeypatch.setenv("FTCLUSTER_ASYNC_CKPT", "0")
    assert_clean(*run(payload(ref, "ref"), nproc, cache_dir, tmp_path, monkeypatch, None), 0)
    monkeypatch.setenv("FTCLUSTER_ASYNC_CKPT", "1")
    run_payload = payload(out, "run")
    rc, log = run(run_payload, nproc, cache_dir, tmp_path, monkeypatch, "checkpoint-committed:SIGKILL")
    assert rc == FAULT_EXIT and store(out)[0] == [EVERY], log[-4000:]
    rc, log = run(run_payload, nproc, cache_dir, tmp_path, monkeypatch, None)
    assert_clean(rc, log, 0)
    assert f"resumed from checkpoint step {EVERY} " in log
    assert_same_curve(curve(out), curve(ref))
    saved = records(out, "checkpoint")
    assert saved and all(r["ckpt_blocked_s"] >= 0 for r in saved)
    assert all(r["step_s"] > 0 for r in records(out, "train"))

    last = Path("checkpoints") / f"step-{STEPS:08d}"
    files = sorted(p.relative_to(ref / last) for p in (ref / last).rglob("*") if p.suffix in (".pt", ".safetensors"))
    assert files and files == sorted(p.relative_to(out / last) for p in (out / last).rglob("*")
                                     if p.suffix in (".pt", ".safetensors"))
    for rel in files:
        if rel.suffix == ".safetensors":
            a, b = load_file(str(ref / last / rel)), load_file(str(out / last / rel))
        else:
            a, b = (torch.load(p / last / rel, map_location="cpu", weights_only=False) for p in (ref, out))
        same_state(a, b, str(rel))
