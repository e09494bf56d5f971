"""The read-only catalog of an output URI: committed means "has its manifest", done means "the last
artifact is committed", and the checkpoint store and `ftcluster sample` ask it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftcluster.storage.catalog import Catalog, Item
from ftcluster.storage.commit import CheckpointStore


def _folder(root: Path, name: str, committed: bool, meta: dict | None = None) -> None:
    d = root / name
    d.mkdir(parents=True)
    (d / "weights.bin").write_bytes(b"w")
    if meta is not None:
        (d / "ftcluster_meta.json").write_text(json.dumps(meta))
    if committed:
        (d / "manifest.json").write_text(json.dumps({"files": {"weights.bin": {"size": 1}}}))


@pytest.fixture
def out(tmp_path: Path) -> Path:
    root = tmp_path / "out"
    _folder(root, "checkpoints/step-00000010", True)
    _folder(root, "checkpoints/step-00000020", True)
    _folder(root, "checkpoints/step-00000030", False)  # an upload in progress, or a crash's leftover
    _folder(root, "checkpoints/not-a-step", True)
    _folder(root, "adapters/step-00000010", True, {"step": 10})
    _folder(root, "adapters/step-00000020", False, {"step": 20})
    _folder(root, "adapter", True, {"training": {"name": "x"}, "step": 20})
    _folder(root, "merged", False)
    return root


def test_only_folders_with_a_manifest_are_listed(out):
    cat = Catalog(f"file://{out}")
    assert [(i.kind, i.name, i.step) for i in cat.checkpoints()] == [
        ("checkpoint", "checkpoints/step-00000010", 10), ("checkpoint", "checkpoints/step-00000020", 20)]
    assert [i.name for i in cat.step_adapters()] == ["adapters/step-00000010"]
    assert cat.artifacts() == [Item("artifact", "adapter", f"file://{out}/adapter")]
    assert len(cat.items()) == 4
    assert cat.is_committed("adapter") and not cat.is_committed("merged") and not cat.is_committed("final")
    assert Catalog(str(out / "nothing")).items() == []  # an output not written yet


def test_meta_and_manifest_are_read_from_committed_folders(out):
    cat = Catalog(str(out))  # a plain path works as well as file://
    assert cat.meta(cat.step_adapters()[0]) == {"step": 10}
    assert cat.meta("adapter") == {"training": {"name": "x"}, "step": 20}
    assert cat.manifest("adapter") == {"files": {"weights.bin": {"size": 1}}}
    assert cat.manifest("merged") is None and cat.meta("checkpoints/step-00000010") is None


def test_done_is_the_last_artifact_committed(out):
    cat = Catalog(str(out))
    assert cat.done("adapter") and not cat.done("merged") and not cat.done("final")
    (out / "merged" / "manifest.json").write_text("{}")
    assert cat.done("merged")


def test_the_newest_model_to_sample(out):
    cat = Catalog(str(out))
    assert cat.newest_model() == Item("artifact", "adapter", f"{out}/adapter") and not cat.newest_model().whole_model
    (out / "merged" / "manifest.json").write_text("{}")
    assert cat.newest_model().name == "merged" and cat.newest_model().whole_model
    for name in ("adapter", "merged"):
        (out / name / "manifest.json").unlink()
    assert cat.newest_model() == Item("step_adapter", "adapters/step-00000010", f"{out}/adapters/step-00000010", 10)
    (out / "adapters" / "step-00000010" / "manifest.json").unlink()
    assert cat.newest_model() is None


def test_sample_and_the_store_ask_the_catalog(out):
    from ftcluster.errors import TrainError
    from ftcluster.train.sample import find_artifact

    assert find_artifact(f"file://{out}") == (f"file://{out}/adapter", False)
    store = CheckpointStore(f"file://{out}", {})
    try:
        assert store.is_published("adapter") and store.finished("adapter") and not store.finished("merged")
    finally:
        store.wait()
    with pytest.raises(TrainError, match="no trained model or adapter there yet"):
        find_artifact(str(out / "nothing"))


@pytest.mark.parametrize("example,sets", [("quickstart.yaml", []), ("quickstart.yaml", ["lora.merge_at_end=true"]),
                                          ("full-slurm-2node.yaml", [])])
def test_a_pipelines_model_source_is_the_engines_last_artifact_when_a_whole_model(example, sets):
    """spec/pipeline.py's model_source still names artifacts itself (the spec layer sits below the engine
    recipes): it must agree with the recipe's last artifact and the catalog's whole models."""
    from ftcluster.plan.engines import engine_for
    from ftcluster.spec.loader import load_spec
    from ftcluster.spec.pipeline import model_source
    from ftcluster.storage.catalog import WHOLE_MODELS
    from ftcluster.storage.layout import OutputLayout

    spec = load_spec(Path(__file__).resolve().parents[3] / "examples" / example, sets)
    last = engine_for(spec).last_artifact(spec)
    uri, _ = model_source(spec)
    assert uri == (OutputLayout(spec.output.uri).artifact(last) if last in WHOLE_MODELS else None)  # type: ignore[arg-type]
