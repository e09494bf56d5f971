"""The training runtime's seams: engines built from their torch-free recipes (ftcluster/train/engines/,
ftcluster/plan/engines.py), the checkpoint manager over named stateful parts (train/checkpoint.py,
train/state.py), and the loop over a narrow context and a DataSource that may have no length
(train/loop.py, train/datasource.py). In-process, one CPU rank; the end-to-end runs are in
tests/e2e/test_train_runtime.py and tests/e2e/test_train_stops.py.
"""

from __future__ import annotations

import inspect
import json
import random
import sys
import types
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from ftcluster.errors import TrainError  # noqa: E402
from ftcluster.plan.engines import ENGINES, EngineRecipe  # noqa: E402
from ftcluster.train import engines as engines_pkg  # noqa: E402
from ftcluster.train.asyncsave import CheckpointWriter  # noqa: E402
from ftcluster.train.checkpoint import CheckpointManager, RunIdentity  # noqa: E402
from ftcluster.train.data import PackedDataset, ShardedBatches  # noqa: E402
from ftcluster.train.datasource import DataSource, epoch_length, total_steps_for  # noqa: E402
from ftcluster.train.distributed import DistContext  # noqa: E402
from ftcluster.train.engines import build_engine, builder  # noqa: E402
from ftcluster.train.engines.base import EngineInputs  # noqa: E402
from ftcluster.train.loop import LoopContext, run_steps  # noqa: E402
from ftcluster.train.signals import StopFlag  # noqa: E402
from ftcluster.train.state import RngState, Stateful, TrainState  # noqa: E402
from tests.unit.train.test_train_units import CPU, Tok, batch, lora_spec  # noqa: E402

pytestmark = pytest.mark.train

ONE = DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0, nnodes=1, device=CPU)


# --------------------------------------------------------------------------- engines


def engine_classes(module: types.ModuleType) -> list[type]:
    return [c for c in vars(module).values()
            if inspect.isclass(c) and c.__module__ == module.__name__ and "kind" in vars(c)]


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_each_registered_recipe_has_a_builder_whose_engine_writes_its_checkpoint_kind(name):
    recipe = ENGINES[name]
    module = builder(recipe)
    assert module.__name__ == recipe.builder == f"ftcluster.train.engines.{name}"
    assert Path(module.__file__).parent == Path(engines_pkg.__file__).parent  # one module per engine, here
    assert list(inspect.signature(module.build).parameters) == ["inputs"]
    classes = engine_classes(module)
    assert len(classes) == 1, classes
    assert classes[0].kind == recipe.checkpoint_kind


def test_the_engines_keep_the_kinds_existing_checkpoints_record():
    assert {r.name: r.checkpoint_kind for r in ENGINES.values()} == {"lora": "plain", "deepspeed": "deepspeed",
                                                                     "fsdp": "fsdp"}


def test_build_engine_builds_the_lora_engine_from_its_recipe():
    eng, keep = build_engine(lora_spec(), {"deepspeed": None}, Tok(), torch.float32, ONE, Path("/nonexistent"), 4)
    assert type(eng).__module__ == "ftcluster.train.engines.lora" and eng.kind == "plain" and keep is None
    assert eng.lr > 0 and eng.grad_accum_scale == 1


def test_deepspeed_builder_needs_the_payloads_config():
    from ftcluster.train.engines import deepspeed as ds

    inputs = EngineInputs(spec=types.SimpleNamespace(method="full"), payload={"deepspeed": None}, tokenizer=None,
                          dtype=torch.float32, ctx=ONE, cache_dir=Path("/nonexistent"), total_steps=1)
    with pytest.raises(TrainError, match="needs the 'deepspeed' config"):
        ds.build(inputs)


class ToyEngine:
    kind = "toy"

    def __init__(self, inputs: EngineInputs):
        self.inputs = inputs


@pytest.fixture
def toy_engine(monkeypatch):
    """An engine added the documented way: a module ftcluster.train.engines.toy and one recipe."""
    recipe = EngineRecipe(name="toy", method="toy", section=None, checkpoint_kind="toy",
                          artifacts=lambda spec: ("final",), plan_extra=lambda spec: {})
    module = types.ModuleType(recipe.builder)
    module.build = lambda inputs: (ToyEngine(inputs), "keep")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, recipe.builder, module)
    monkeypatch.setitem(ENGINES, recipe.name, recipe)
    return module


def test_an_engine_is_one_module_plus_one_registration(toy_engine):
    spec = types.SimpleNamespace(method="toy")
    eng, keep = build_engine(spec, {"x": 1}, "tok", torch.float32, ONE, Path("/c"), 7)
    assert isinstance(eng, ToyEngine) and keep == "keep"
    assert eng.inputs == EngineInputs(spec=spec, payload={"x": 1}, tokenizer="tok", dtype=torch.float32, ctx=ONE,
                                      cache_dir=Path("/c"), total_steps=7)


def test_an_engine_whose_kind_differs_from_its_recipe_is_refused(toy_engine, monkeypatch):
    monkeypatch.setattr(ToyEngine, "kind", "plain")
    with pytest.raises(TrainError, match="built a 'plain' engine, its recipe says 'toy'"):
        build_engine(types.SimpleNamespace(method="toy"), {}, None, None, ONE, Path("/c"), 1)
    del toy_engine.build
    with pytest.raises(TrainError, match="defines no build"):
        build_engine(types.SimpleNamespace(method="toy"), {}, None, None, ONE, Path("/c"), 1)


# --------------------------------------------------------------------------- checkpoint parts


class Counter:
    """A Stateful part."""

    def __init__(self, n: int = 0):
        self.n = n

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n = state["n"]


class FolderPart:
    """A part that saves itself into a folder, as an engine does."""

    checkpoint_bytes_asked = False

    def __init__(self, value: str = ""):
        self.value = value

    def save(self, folder: Path, rank: int, writer: CheckpointWriter | None = None) -> None:
        (folder / "value.txt").write_text(self.value)

    def load(self, folder: Path) -> None:
        self.value = (folder / "value.txt").read_text()


def manager(tmp_path: Path, parts: dict[str, Any], *, deferred: bool = False) -> CheckpointManager:
    spec = lora_spec()
    spec.output.uri = (tmp_path / "out").as_uri()
    mgr = CheckpointManager(spec, ONE, tmp_path / "local", RunIdentity("plain", "fp", "lora", 10), parts)
    mgr.writer = CheckpointWriter(deferred, CPU)
    return mgr


@pytest.mark.parametrize("deferred", [False, True], ids=["sync", "async"])
def test_the_manager_saves_and_restores_exactly_the_parts_it_is_given(tmp_path, deferred):
    state = TrainState(step=3, tokens_seen=300, general_eval_before=2.5, last_loss=1.25)
    mgr = manager(tmp_path, {"train": state, "engine": FolderPart("weights@3"), "data": Counter(7),
                             "extra": Counter(11)}, deferred=deferred)
    mgr.save(final=True)
    mgr.wait()
    folder = tmp_path / "out" / "checkpoints" / "step-00000003"
    files = set(json.loads((folder / "manifest.json").read_text())["files"])
    assert files == {"state.json", "rank-00000.pt", "engine/value.txt"}
    rank_file = torch.load(folder / "rank-00000.pt", weights_only=False)
    assert rank_file == {"step": 3, "data": {"n": 7}, "extra": {"n": 11}}

    fresh = TrainState()
    parts = {"train": fresh, "engine": FolderPart(), "data": Counter(), "extra": Counter()}
    assert manager(tmp_path, parts).load()
    assert (fresh.step, fresh.tokens_seen, fresh.general_eval_before, fresh.last_loss) == (3, 300, 2.5, 1.25)
    assert parts["engine"].value == "weights@3" and parts["data"].n == 7 and parts["extra"].n == 11

    other = {"train": TrainState(), "engine": FolderPart(), "data": Counter(), "more": Counter()}
    with pytest.raises(TrainError, match="holds no 'more' state for rank 0"):
        manager(tmp_path, other).load()


def test_a_fresh_start_loads_nothing(tmp_path):
    parts = {"train": TrainState(), "data": Counter(5)}
    assert manager(tmp_path, parts).load() is False
    assert parts["data"].n == 5 and parts["train"].step == 0


def test_the_runs_parts_keep_the_checkpoint_layout(tmp_path):
    """The parts the runtime gives (train, engine, data, rng) write the files and keys of earlier
    versions, so their checkpoints resume (docs/training.md, train/checkpoint.py)."""
    data = ShardedBatches(PackedDataset([([5] * 8, [5] * 8)] * 8, 8, False, 0), 2)
    data.next_batch()
    state = TrainState(step=2, tokens_seen=32, elapsed_before=5.0)
    state.start_clock()
    mgr = manager(tmp_path, {"train": state, "engine": FolderPart("w"), "data": data, "rng": RngState(CPU)})
    mgr.save(final=True)
    mgr.wait()
    expected_draws = [random.random() for _ in range(3)]
    folder = tmp_path / "out" / "checkpoints" / "step-00000002"
    shared = json.loads((folder / "state.json").read_text())
    assert set(shared) == {"step", "tokens_seen", "world_size", "engine", "model_fingerprint", "total_steps",
                           "general_eval_before", "elapsed_s", "last_loss", "ftcluster_version", "run_uid",
                           "global_batch"}
    assert shared["run_uid"] == state.run_uid  # the run's id in its records, kept across resumes
    assert shared["engine"] == "plain" and shared["step"] == 2 and shared["elapsed_s"] >= 5.0
    rank_file = torch.load(folder / "rank-00000.pt", weights_only=False)
    assert set(rank_file) == {"data", "step", "rng"} and rank_file["data"]["index"] == 1

    random.random()  # the generators move on
    again = ShardedBatches(data.dataset, 2)
    fresh = TrainState()
    assert manager(tmp_path, {"train": fresh, "engine": FolderPart(), "data": again, "rng": RngState(CPU)}).load()
    assert [random.random() for _ in range(3)] == expected_draws
    assert again.state_dict() == data.state_dict()
    assert fresh.elapsed_before == shared["elapsed_s"] and fresh.elapsed() == shared["elapsed_s"]  # clock not started


def test_the_manager_refuses_parts_it_cannot_save(tmp_path):
    with pytest.raises(TypeError, match="must be the run's TrainState"):
        manager(tmp_path, {"data": Counter()})
    with pytest.raises(TypeError, match="part 'data': a object is neither Stateful"):
        manager(tmp_path, {"train": TrainState(), "data": object()})


# --------------------------------------------------------------------------- data source and loop


class Stream:
    """A DataSource without a length: a stream of batches, resumable by position."""

    def __init__(self) -> None:
        self.served = 0

    def next_batch(self) -> dict[str, Any]:
        self.served += 1
        return batch([[3, 4, 5, 6 + self.served % 5]])

    def state_dict(self) -> dict[str, Any]:
        return {"served": self.served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.served = state["served"]


class FakeEngine:
    kind = "fake"
    grad_accum_scale = 1
    lr = 0.5

    def __init__(self) -> None:
        self.steps: list[int] = []

    def train_step(self, micro_batches: list[dict[str, Any]], scale: float) -> tuple[Any, Any]:
        self.steps.append(len(micro_batches))
        return torch.tensor(2.0 * len(micro_batches)), torch.tensor(1.0)


class Saves:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def flags(self) -> tuple[int, int]:
        return 0, 0

    def maybe_save(self, *, time_due: bool, uploading: bool, before: Any) -> bool:
        self.calls.append("maybe")
        return False

    def save(self, *, final: bool) -> None:
        self.calls.append(f"save final={final}")


def loop(source: Any, stop: StopFlag | None = None, total: int = 5) -> tuple[LoopContext, list[dict], Saves]:
    records: list[dict] = []
    saves = Saves()
    lc = LoopContext(engine=FakeEngine(), data=source, ctx=ONE, stop=stop or StopFlag(), state=TrainState(),
                     total_steps=total, grad_accum=2, log_every=2, eval_every=None, report=records.append,
                     evaluate=lambda: None, checkpoints=saves)
    return lc, records, saves


def test_a_stream_without_a_length_trains_for_max_steps():
    stream = Stream()
    assert isinstance(stream, DataSource) and isinstance(stream, Stateful) and epoch_length(stream) is None
    lc, records, saves = loop(stream)
    assert run_steps(lc) is False
    assert lc.state.step == 5 and stream.served == 10 and lc.engine.steps == [2] * 5
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and lc.state.tokens_seen == 40
    assert records[-1]["loss"] == pytest.approx(4.0 / 6) and lc.state.last_loss == records[-1]["loss"]
    assert saves.calls == ["maybe"] * 5


def test_a_stop_saves_a_final_checkpoint_and_ends_the_loop():
    stop = StopFlag()
    stop.set("test")
    lc, records, saves = loop(Stream(), stop)
    assert run_steps(lc) is True
    assert lc.state.step == 1 and saves.calls == ["save final=True"] and [r["step"] for r in records] == [1]


def test_steps_come_from_max_steps_or_the_epochs_of_a_sized_source():
    sized = ShardedBatches(PackedDataset([([5] * 8, [5] * 8)] * 8, 8, False, 0), 2)
    assert isinstance(sized, DataSource) and epoch_length(sized) == 4
    spec = lora_spec(max_steps=None, epochs=2, gradient_accumulation_steps=2)
    assert total_steps_for(spec, epoch_length(sized)) == 4
    with pytest.raises(TrainError, match="training.max_steps: the training data is a stream"):
        total_steps_for(spec, epoch_length(Stream()))
    assert total_steps_for(lora_spec(max_steps=3), None) == 3


def test_a_resumed_run_keeps_its_run_id_and_an_old_checkpoint_gets_one():
    """The run id in every artifact's record is made once and comes back with the checkpoint."""
    first = TrainState(step=3)
    resumed = TrainState()
    assert resumed.run_uid != first.run_uid
    resumed.load_state_dict(first.state_dict())
    assert resumed.run_uid == first.run_uid
    older = {k: v for k, v in first.state_dict().items() if k != "run_uid"}  # written before run ids
    again = TrainState()
    mine = again.run_uid
    again.load_state_dict(older)
    assert again.run_uid == mine and again.step == 3


# --------------------------------------------------------------------------- another number of processes


TWO = DistContext(rank=0, world_size=2, local_rank=0, local_world_size=2, node_rank=0, nnodes=1, device=CPU)


@pytest.fixture
def one_rank_group():
    """A 1-process gloo group, so rank 0 of a DistContext that says 2 processes can run the manager's
    collectives (broadcast, barrier) in this process."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def saved_by_one_process(tmp_path: Path) -> None:
    mgr = manager(tmp_path, {"train": TrainState(step=3), "engine": FolderPart("w"), "data": Counter(1),
                             "rng": RngState(CPU)})
    mgr.save(final=True)
    mgr.wait()


def manager_of_two(tmp_path: Path, parts: dict[str, Any]) -> CheckpointManager:
    spec = lora_spec()
    spec.output.uri = (tmp_path / "out").as_uri()
    mgr = CheckpointManager(spec, TWO, tmp_path / "local2", RunIdentity("plain", "fp", "lora", 10), parts)
    mgr.writer = CheckpointWriter(False, CPU)
    return mgr


def ds_engine(stage: int, **zero: Any) -> Any:
    """A DeepSpeedEngine that declares what its ZeRO configuration allows, DeepSpeed not initialised."""
    pytest.importorskip("deepspeed")
    from ftcluster.train.engines import deepspeed as ds

    eng = ds.DeepSpeedEngine.__new__(ds.DeepSpeedEngine)
    eng.declare_resharding({"zero_optimization": {"stage": stage, **zero}})
    eng.offloaded = True  # checkpoint_bytes (asked by the manager) is 0
    return eng


def test_a_zero_stage_without_resharding_is_refused_on_another_number_of_processes(tmp_path, one_rank_group):
    saved_by_one_process(tmp_path)
    parts = {"train": TrainState(), "engine": ds_engine(0), "data": GlobalCounter(), "rng": RngState(CPU)}
    with pytest.raises(TrainError) as err:
        manager_of_two(tmp_path, parts).load()
    assert str(err.value) == (
        "output.uri: checkpoint step 3 was written by 1 processes, this run has 2, and its engine (DeepSpeed ZeRO-0: "
        "only ZeRO-1/2/3 checkpoints reshard, through DeepSpeed's universal checkpoint) cannot change the number "
        "of processes; resume with the same resources or write to a new output.uri")
    nvme = ds_engine(3, offload_optimizer={"device": "nvme"})
    assert nvme.resharding is None and "NVMe offload" in nvme.resharding_refusal


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_1_to_3_and_the_runs_other_parts_reshard(tmp_path, stage):
    """ZeRO-1/2/3 declare "self" (their load converts through a universal checkpoint: tests/e2e/
    test_ds_reshard.py); the in-memory data source's position is global (tests/unit/train/
    test_train_data.py), the random generators start afresh on a new rank."""
    eng = ds_engine(stage, offload_optimizer={"device": "cpu"})
    assert eng.resharding == "self" and eng.resharding_refusal is None
    data = ShardedBatches(PackedDataset([([5] * 8, [5] * 8)] * 8, 8, False, 0), 2, rank=0, world_size=2)
    parts = {"train": TrainState(), "engine": eng, "data": data, "rng": RngState(CPU)}
    assert manager_of_two(tmp_path, parts)._fixed_world_parts() == []


class GlobalCounter(Counter):
    resharding = "global"


class ReshardingFolder(FolderPart):
    resharding = "self"


def test_a_resume_on_another_number_of_processes_says_what_happens_to_the_global_batch(tmp_path, one_rank_group,
                                                                                        caplog):
    import logging

    saved_by_one_process(tmp_path)  # micro-batch 2 x accumulation 1 x 1 process
    parts = {"train": TrainState(), "engine": ReshardingFolder(), "data": GlobalCounter(), "rng": RngState(CPU)}
    caplog.set_level(logging.INFO, logger="ftcluster.train")
    assert manager_of_two(tmp_path, parts).load()
    assert parts["engine"].value == "w" and parts["data"].n == 1 and parts["train"].step == 3
    assert ("resuming checkpoint step 3 of 1 process(es) on 2; the global batch CHANGES from 2 to 4 sequences "
            "(micro-batch x accumulation x processes; set training.gradient_accumulation_steps to keep it)"
            ) in caplog.text
