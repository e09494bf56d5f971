"""The backend registry (ftcluster.spec.registry) as the spec layer reads it: one entry makes a backend
name valid in a spec, in its JSON Schema and docs, and says where its paths are and what it renders."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from ftcluster.errors import SpecError
from ftcluster.spec import registry
from ftcluster.spec.loader import json_schema, load_spec
from ftcluster.spec.registry import BackendEntry

ROOT = Path(__file__).resolve().parents[3]
QUICKSTART = str(ROOT / "examples" / "quickstart.yaml")
TOY = BackendEntry(name="toy", factory="tests.unit.backends.toy_backend:ToyBackend", section=None)


@pytest.fixture
def toy():
    registry.register(TOY)
    yield TOY
    registry.unregister("toy")


def test_built_in_backends_are_the_specs_choices():
    assert registry.spec_backends() == ("local", "slurm", "kubernetes")
    assert registry.lookup("pipeline") is not None and not registry.is_spec_backend("pipeline")
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(BackendEntry(name="slurm", factory="x:y"))


def test_an_unregistered_backend_is_refused_with_the_literal_message():
    with pytest.raises(SpecError) as err:
        load_spec(QUICKSTART, ["backend=toy"])
    assert "backend: expected one of local, slurm, kubernetes (got 'toy')" in str(err.value)
    with pytest.raises(SpecError, match=r"backend: expected one of local, slurm, kubernetes \(got 3\)"):
        load_spec(QUICKSTART, ["backend=3"])


def test_a_registered_backend_is_a_valid_spec_backend(toy):
    spec = load_spec(QUICKSTART, ["backend=toy"])
    assert spec.backend == "toy"
    with pytest.raises(SpecError, match=r"expected one of local, slurm, kubernetes, toy \(got 'tyo'\); did you mean 'toy'"):
        load_spec(QUICKSTART, ["backend=tyo"])
    enum = json_schema()["$defs"]["LoraJob"]["properties"]["backend"]["enum"]
    assert enum == ["local", "slurm", "kubernetes", "toy"]


def test_the_schema_and_docs_say_what_the_literal_said():
    from ftcluster.spec.docgen import render_markdown

    doc = json.loads((ROOT / "docs" / "ftcluster.schema.json").read_text())
    assert json_schema() == doc
    assert '| `backend` | "local" \\| "slurm" \\| "kubernetes" | `"local"` |' in render_markdown()


def test_where_paths_are_and_the_default_target_come_from_the_entry(toy):
    spec = load_spec(QUICKSTART, ["backend=toy"])
    assert registry.runs_here("toy", spec) and registry.default_target(spec) == "slurm"
    assert not registry.runs_here("kubernetes", spec)
    assert registry.runs_here("slurm", {"slurm": {}}) and not registry.runs_here("slurm", {"slurm": {"login": "hpc"}})
    registry.unregister("toy")
    registry.register(dataclasses.replace(TOY, paths_here=False, render_target="trainjob"))
    spec = load_spec(QUICKSTART, ["backend=toy", "data.train=missing.jsonl"])  # not here: not looked for
    assert not registry.runs_here("toy", spec) and registry.default_target(spec) == "trainjob"
    assert spec.data.train == "missing.jsonl"  # a path on another machine is not rebased to this cwd


def test_a_backend_section_is_fixed_for_variants():
    from ftcluster.spec.variants import fixed_reason

    assert fixed_reason("slurm.partition", "x") == ("the sbatch script (partition, directives, setup) is shared by every "
                                                     "task; set slurm at the top level")
    registry.register(BackendEntry(name="toy2", factory="x:y", section="toy2"))
    try:
        assert fixed_reason("toy2.queue", "x") == "toy2 settings are shared by every variant; set toy2 at the top level"
    finally:
        registry.unregister("toy2")


def test_a_package_registers_a_backend_through_an_entry_point(monkeypatch):
    import importlib.metadata

    class EntryPoint:
        def load(self):
            return TOY

    groups = []
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: groups.append(group) or [EntryPoint()])
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    try:
        assert registry.lookup("local") is not None and groups == []  # a built-in name looks for no plugin
        assert registry.lookup("toy") is TOY and groups == ["ftcluster.backends"]
        assert "toy" in registry.spec_backends()
    finally:
        registry.unregister("toy")


def test_an_entrys_required_fields_are_checked_on_load(toy):
    registry.unregister("toy")
    registry.register(dataclasses.replace(TOY, required=(("slurm.partition", "the toy cluster routes by partition"),)))
    with pytest.raises(SpecError, match="slurm.partition: the toy cluster routes by partition"):
        load_spec(QUICKSTART, ["backend=toy"])
    assert load_spec(QUICKSTART, ["backend=toy", "slurm.partition=gpu"]).slurm.partition == "gpu"
