"""One registration makes a backend: a backend that lives outside ftcluster (tests/unit/backends/toy_backend.py),
registered in the test, is built by get_backend, offered by the CLI's --backend, submitted through the API and
checked by the doctor with its own preflight rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ftcluster import api
from ftcluster.backends import entry, get_backend, names, resolve
from ftcluster.cli import cli
from ftcluster.errors import BackendError
from ftcluster.spec import registry
from tests.unit.backends.toy_backend import ENTRY, ToyBackend

ROOT = Path(__file__).resolve().parents[3]
QUICKSTART = str(ROOT / "examples" / "quickstart.yaml")


@pytest.fixture
def toy():
    registry.register(ENTRY)
    yield ENTRY
    registry.unregister(ENTRY.name)


def test_get_backend_resolves_the_entrys_factory(toy):
    assert isinstance(get_backend("toy"), ToyBackend) and "toy" in names()
    assert entry("toy") is toy and resolve("tests.unit.backends.toy_backend:ToyBackend") is ToyBackend
    assert type(get_backend("kubernetes", context="ctx", rank=1)).__name__ == "KubernetesBackend"  # rank: not taken


def test_an_unknown_backend_names_the_registered_ones(toy):
    with pytest.raises(BackendError, match="unknown backend 'nope'; choose one of local, slurm, kubernetes, toy"):
        get_backend("nope")


def test_the_clis_backend_choices_are_the_registry(toy, ftc_home):
    runner = CliRunner()
    res = runner.invoke(cli, ["submit", QUICKSTART, "--backend", "toy", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("# backend: toy\n") and "quickstart.sbatch" in res.output
    assert "[local|slurm|kubernetes|toy]" in runner.invoke(cli, ["doctor", "--help"]).output
    registry.unregister("toy")
    res = runner.invoke(cli, ["submit", QUICKSTART, "--backend", "toy", "--dry-run"])
    assert res.exit_code == 2 and "'toy' is not one of 'local', 'slurm', 'kubernetes'" in res.output
    registry.register(ENTRY)


def test_the_doctor_shows_the_entrys_preflight_rows(toy, ftc_home):
    rows = {c.name: c for c in api.doctor(QUICKSTART, backend="toy")}
    assert rows["spec"].status == "ok" and "backend toy" in rows["spec"].result
    assert rows["toy cluster"].status == "ok" and "toy method" not in rows
    assert rows["launch files"].result == "quickstart.sbatch"  # what the toy's submit --dry-run writes


def test_a_registered_backend_is_submitted_and_read_back_through_the_api(toy, ftc_home):
    st = api.submit(QUICKSTART, backend="toy")
    assert st.backend == "toy" and api.status(st.run_id).state == "SUCCEEDED"
    assert list(api.logs(st.run_id)) == ["toy log\n"]
    out = api.run_output(st.run_id)  # outputs.json, written by the base for every backend
    assert out == {"uri": f"file://{ROOT / 'out' / 'quickstart'}", "storage_options": {}, "max_steps": 200,
                   "single": True}
    assert json.loads((Path(st.run_dir) / "outputs.json").read_text())["max_steps"] == 200
