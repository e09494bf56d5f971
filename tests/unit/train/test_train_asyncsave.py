"""Asynchronous checkpoint writes (ftcluster/train/asyncsave.py): the capture is a snapshot, the
manifest never precedes the engine files, and a failed background write leaves that checkpoint
uncommitted while the run goes on (the final one fails cleanly). In-process, one CPU rank, a real
PlainEngine on a tiny LoRA and a real CheckpointStore on a folder; the writer's test hook stands in
for a slow or failing disk. The end-to-end resume (LoRA, ZeRO-2/3) is in tests/e2e/test_train_stops.py.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from ftcluster.errors import TrainError  # noqa: E402
from ftcluster.train.asyncsave import CheckpointWriter, async_enabled  # noqa: E402
from ftcluster.train.checkpoint import CheckpointManager, RunIdentity  # noqa: E402
from ftcluster.train.distributed import DistContext  # noqa: E402
from ftcluster.train.engines.deepspeed import DeepSpeedEngine  # noqa: E402
from ftcluster.train.engines.lora import PlainEngine  # noqa: E402
from ftcluster.train.state import RngState, TrainState  # noqa: E402
from tests.unit.train.test_train_units import CPU, batch, lora_spec, tiny_lora  # noqa: E402

pytestmark = pytest.mark.train

DATA = batch([[3, 4, 5, 6, 7, 8, 9, 10], [9, 8, 7, 6, 5, 4, 3, 2]])


def engine():
    spec = lora_spec()
    eng = PlainEngine(tiny_lora(spec), spec, CPU, torch.float32, total_steps=4, world_size=1)
    eng.train_step([DATA], 1 / 14)
    return spec, eng


def manager(tmp_path: Path, hook=None) -> tuple[CheckpointManager, PlainEngine]:
    spec, eng = engine()
    spec.output.uri = (tmp_path / "out").as_uri()
    ctx = DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0, nnodes=1, device=CPU)
    parts = {"train": TrainState(), "engine": eng, "data": Position(), "rng": RngState(CPU)}
    mgr = CheckpointManager(spec, ctx, tmp_path / "local", RunIdentity("plain", "fp", "lora", 10), parts)
    mgr.writer = CheckpointWriter(True, CPU, hook=hook)
    return mgr, eng


class Position:
    """A data source's position, as a checkpoint part (Stateful)."""

    def __init__(self) -> None:
        self.index = 0

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]


def save_at(mgr: CheckpointManager, step: int, final: bool = False) -> None:
    mgr.state.step = step
    mgr.save(final=final)


def test_switch_defaults_on():
    assert async_enabled({}) and async_enabled({"FTCLUSTER_ASYNC_CKPT": "1"})
    assert not async_enabled({"FTCLUSTER_ASYNC_CKPT": "0"})


def test_capture_is_a_snapshot_of_the_state_at_save(tmp_path):
    """Parameters and optimizer state change right after the capture; the files hold the old values."""
    from safetensors.torch import load_file

    _, eng = engine()
    gate = threading.Event()
    writer = CheckpointWriter(True, CPU, hook=lambda name: gate.wait(30))
    eng.save(tmp_path, 0, writer)
    want = {n: p.detach().clone() for n, p in eng.module.named_parameters() if p.requires_grad}
    want_avg = [s["exp_avg"].clone() for s in eng.optimizer.state.values()]
    done = writer.finish(lambda error: error)
    eng.train_step([DATA], 1 / 14)  # mutates every trainable parameter and the Adam moments in place
    with torch.no_grad():
        for p in eng.params:
            p.add_(1.0)
    gate.set()
    assert done.result(timeout=30) is None
    got = load_file(str(tmp_path / "trainable.safetensors"))
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)
    opt = torch.load(tmp_path / "optimizer.pt", weights_only=False)
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(want_avg, opt["optimizer"]["state"].values(),
                                                                strict=True))


def test_manifest_only_after_the_engine_files(tmp_path):
    """The writes are held back: save returns, nothing commits; released, the manifest lists them."""
    gate = threading.Event()
    mgr, _ = manager(tmp_path, hook=lambda name: gate.wait(30))
    save_at(mgr, 2, final=False)
    assert not gate.is_set() and mgr.store.committed() == []
    assert not (tmp_path / "out" / "checkpoints" / "step-00000002" / "manifest.json").exists()
    gate.set()
    mgr.wait()
    assert mgr.store.committed() == [2]
    man = json.loads((tmp_path / "out" / "checkpoints" / "step-00000002" / "manifest.json").read_text())
    local = tmp_path / "out" / "checkpoints" / "step-00000002"
    assert {"engine/trainable.safetensors", "engine/optimizer.pt", "rank-00000.pt", "state.json"} == set(man["files"])
    assert all((local / rel).stat().st_size == info["size"] for rel, info in man["files"].items())


def test_failed_write_skips_that_checkpoint_and_the_final_one_fails(tmp_path, caplog):
    fail = {2, 6}
    current = {"step": 0}

    def hook(name: str) -> None:
        if current["step"] in fail:
            raise OSError(f"No space left on device: {name}")

    mgr, eng = manager(tmp_path, hook)
    for step in (2, 4):
        current["step"] = step
        with caplog.at_level(logging.WARNING, "ftcluster.train"):
            save_at(mgr, step, final=False)
            mgr.writer.idle()
        eng.train_step([DATA], 1 / 14)  # the run goes on
    assert "checkpoint step 2 was not committed: writing checkpoint step 2 failed (local rank 0: OSError: " \
           "No space left on device: trainable.safetensors)" in caplog.text
    current["step"] = 6
    save_at(mgr, 6, final=True)
    with pytest.raises(TrainError) as err:
        mgr.wait()
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("output.uri: a final checkpoint write or upload failed: writing "
                                              "checkpoint step 6 failed (local rank 0: OSError:"), msg
    assert mgr.store.committed() == [4]


def test_step_adapter_is_written_from_the_capture_in_the_background(tmp_path):
    """After a deferred save, export queues peft's save of the captured weights: the files equal a
    synchronous export of the weights at save time, though training changed them in between."""
    from safetensors.torch import load_file

    _, eng = engine()
    sync_dir, async_dir = tmp_path / "sync", tmp_path / "async"
    sync_dir.mkdir()
    async_dir.mkdir()
    eng.export(sync_dir, 0)  # the reference: the live weights now, written at once
    gate = threading.Event()
    writer = CheckpointWriter(True, CPU, hook=lambda name: gate.wait(30))
    (tmp_path / "engine").mkdir()
    eng.save(tmp_path / "engine", 0, writer)
    eng.export(async_dir, 0, writer=writer)
    assert not (async_dir / "adapter_model.safetensors").exists()  # queued, not written
    done = writer.finish(lambda error: error)
    eng.train_step([DATA], 1 / 14)
    gate.set()
    assert done.result(timeout=30) is None
    want, got = load_file(str(sync_dir / "adapter_model.safetensors")), load_file(str(async_dir / "adapter_model.safetensors"))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads((async_dir / "adapter_config.json").read_text()) == json.loads(
        (sync_dir / "adapter_config.json").read_text())
    # Without a save before it (resume, end of run) export writes the live weights at once.
    again = tmp_path / "again"
    again.mkdir()
    eng.export(again, 0, writer=writer)
    assert (again / "adapter_model.safetensors").exists()


def test_a_save_reports_the_time_it_waited_for_the_previous_writes(tmp_path):
    """Checkpoints faster than the disk: the second save waits for the first one's writes, and says so."""
    import time

    mgr, _ = manager(tmp_path, hook=lambda name: time.sleep(0.4))
    save_at(mgr, 2, final=False)
    assert mgr.last_wait_s < 0.2 and mgr.last_blocked_s < 0.3  # returned before its writes ran
    save_at(mgr, 4, final=False)
    assert mgr.last_wait_s >= 0.5 and mgr.last_blocked_s >= mgr.last_wait_s  # two 0.4 s writes of step 2
    mgr.wait()
    assert mgr.store.committed() == [4] or mgr.store.committed() == [2, 4]


# --------------------------------------------------------------------------- pinned ahead


class _Cuda:
    type = "cuda"


def test_reserve_pins_only_for_a_large_gpu_state_capped_by_the_hosts_share(monkeypatch):
    import ftcluster.train.asyncsave as A

    asked = []
    monkeypatch.setattr(A.CheckpointWriter, "_pin_arena", lambda self, n: asked.append(n))
    monkeypatch.setattr(A, "_host_bytes", lambda: 256 << 30)
    assert CheckpointWriter(True, CPU).reserve(8 << 30) == 0  # CPU: nothing to pin
    assert CheckpointWriter(False, _Cuda()).reserve(8 << 30) == 0  # synchronous saves copy nothing ahead
    assert CheckpointWriter(True, _Cuda()).reserve(A.RESERVE_MIN - 1) == 0
    w = CheckpointWriter(True, _Cuda())
    assert w.reserve(40 << 30, local_procs=2) == 44 << 30  # the estimate and a 10 % margin
    w._arena_future.result()
    capped = CheckpointWriter(True, _Cuda())
    assert capped.reserve(200 << 30, local_procs=4) == 32 << 30  # half of 256 GiB across 4 processes
    capped._arena_future.result()
    assert asked == [44 << 30, 32 << 30]


def test_first_capture_carves_aligned_disjoint_buffers_from_the_arena():
    import ftcluster.train.asyncsave as A

    w = CheckpointWriter(True, CPU)
    w._arena = torch.zeros(4096, dtype=torch.uint8)
    shapes = [((3, 5), torch.float32), ((), torch.int64), ((7,), torch.bfloat16), ((2, 2), torch.float64)]
    bufs = [w._from_arena(torch.empty(s, dtype=d)) for s, d in shapes]
    for b, (s, d) in zip(bufs, shapes, strict=True):
        assert b.shape == torch.Size(s) and b.dtype == d
        assert (b.data_ptr() - w._arena.data_ptr()) % A.ALIGN == 0
    for i, b in enumerate(bufs):
        b.fill_(i + 1)
    assert [float(b.reshape(-1)[0]) for b in bufs] == [1, 2, 3, 4]  # no buffer overlaps another
    assert w._from_arena(torch.empty(4096, dtype=torch.uint8)) is None  # used up: pinned one at a time


def test_deepspeed_checkpoint_bytes_estimate():
    from types import SimpleNamespace

    params = [torch.empty(1000), torch.empty(500)]
    eng = SimpleNamespace(module=SimpleNamespace(parameters=lambda: iter(params)), world_size=2, offloaded=False)
    est = DeepSpeedEngine.checkpoint_bytes
    assert est(SimpleNamespace(**vars(eng), zero_stage=2), 0) == 12 * 1500 // 2 + 2 * 1500  # rank 0 saves the module
    assert est(SimpleNamespace(**vars(eng), zero_stage=2), 1) == 12 * 1500 // 2
    assert est(SimpleNamespace(**vars(eng), zero_stage=3), 0) == 12 * 1500 // 2
    assert est(SimpleNamespace(**vars(eng), zero_stage=0), 1) == 12 * 1500
    assert est(SimpleNamespace(**{**vars(eng), "offloaded": True}, zero_stage=2), 0) == 0


def test_a_failed_reservation_warns_and_the_first_capture_pins_as_before(monkeypatch, caplog):
    """Host memory short or no CUDA runtime while pinning ahead: one warning, no arena, and the
    capture that waits for the reservation does not fail."""
    import ftcluster.train.asyncsave as A

    monkeypatch.setattr(A, "_host_bytes", lambda: 64 << 30)
    w = CheckpointWriter(True, _Cuda())
    monkeypatch.setattr(torch, "empty", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of host memory")))
    with caplog.at_level(logging.WARNING, logger="ftcluster.train"):
        assert w.reserve(4 << 30) > 0
        w._arena_future.result()
    monkeypatch.undo()
    assert w._from_arena(torch.empty(4)) is None and w._arena is None
    assert "could not pin" in caplog.text and "out of host memory" in caplog.text
