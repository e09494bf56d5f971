"""DeepSpeed on a CPU host: the one-time build of its communication op is announced before the
silence it causes, and no "Setting accelerator to CPU" warning reaches the run's log."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")

from ftcluster.train.distributed import DistContext  # noqa: E402
from ftcluster.train.engines import deepspeed as ds  # noqa: E402
from ftcluster.train.engines.base import EngineInputs  # noqa: E402

pytestmark = pytest.mark.train

ROOT = Path(__file__).resolve().parents[3]
BUILDING = "building DeepSpeed's CPU communication op"


def cpu_ctx(rank: int = 0) -> DistContext:
    return DistContext(rank=rank, world_size=2, local_rank=rank, local_world_size=2, node_rank=0, nnodes=1,
                       device=torch.device("cpu"))


class Initialised(Exception):
    """deepspeed.init_distributed was reached (where DeepSpeed JIT-builds the op on CPU)."""


def build_until_init(monkeypatch, rank: int = 0) -> None:
    import deepspeed

    def init_distributed(**kw):
        raise Initialised

    monkeypatch.setattr(deepspeed, "init_distributed", init_distributed)
    inputs = EngineInputs(spec=types.SimpleNamespace(method="full"), payload={"deepspeed": {"zero_optimization":
                          {"stage": 2}}}, tokenizer=None, dtype=torch.float32, ctx=cpu_ctx(rank),
                          cache_dir=Path("/nonexistent"), total_steps=1)
    with pytest.raises(Initialised):
        ds.build(inputs)


def test_the_first_cpu_full_finetune_says_it_builds_deepspeeds_op(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    caplog.set_level(logging.INFO, logger="ftcluster.train")
    build_until_init(monkeypatch)
    notes = [r.getMessage() for r in caplog.records if BUILDING in r.getMessage()]
    assert len(notes) == 1 and "once per machine" in notes[0] and "~40 s" in notes[0], caplog.text
    assert str(tmp_path / "ext" / "deepspeed_shm_comm") in notes[0]

    caplog.clear()  # another rank says nothing
    build_until_init(monkeypatch, rank=1)
    assert BUILDING not in caplog.text


def test_no_note_once_the_op_is_built_for_this_installation(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = tmp_path / "deepspeed_shm_comm"
    folder.mkdir()
    (folder / "deepspeed_shm_comm.so").write_bytes(b"")
    (folder / "build.ninja").write_text("build shm.o: compile /elsewhere/site-packages/deepspeed/ops/csrc/shm.cpp\n")
    assert not ds.cpu_op_cached()  # another environment's build: DeepSpeed builds it again
    spec = importlib.util.find_spec("deepspeed")
    assert spec is not None and spec.origin is not None
    (folder / "build.ninja").write_text(f"build shm.o: compile {Path(spec.origin).parent}/ops/csrc/shm.cpp\n")
    assert ds.cpu_op_cached()
    caplog.set_level(logging.INFO, logger="ftcluster.train")
    build_until_init(monkeypatch)
    assert BUILDING not in caplog.text


def test_no_accelerator_warning_on_cpu(tmp_path):
    """A CPU worker names DeepSpeed's accelerator when it joins the process group, so a later import of
    DeepSpeed (the engine's, or accelerate's when a LoRA run saves its merged model) does not warn."""
    code = ("from ftcluster.spec.loader import load_spec_text\n"
            "from ftcluster.train.distributed import init_distributed\n"
            "init_distributed(load_spec_text('name: x\\nmethod: lora\\nmodel: {random_init: {preset: tiny}}\\n"
            "data: {train: x.jsonl, seq_len: 64}\\nresources: {gpus_per_node: 0}\\noutput: {uri: file:///nowhere}\\n'))\n"
            "import deepspeed\n")
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "MASTER_ADDR")}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "CUDA_VISIBLE_DEVICES": ""},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Setting accelerator to CPU" not in res.stdout + res.stderr

