"""`--backend X` means exactly `--set backend=X` (issue 19, item 1): `ftcluster submit examples/quickstart.yaml
--backend kubernetes` used to render for the spec's own backend and end in `KeyError: 'quickstart.yaml'`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from ftcluster.cli import cli

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ["quickstart.yaml", "lora-slurm.yaml", "full-slurm-2node.yaml"]
RUN_ID = re.compile(r"-\d{8}-\d{6}-[0-9a-f]{4}")


def _invoke(*args: str):
    res = CliRunner().invoke(cli, list(args))
    return res.exit_code, RUN_ID.sub("-<id>", res.output), res.exception


@pytest.mark.parametrize("example", EXAMPLES)
@pytest.mark.parametrize("dry_run", [True, False])
def test_submit_backend_kubernetes_is_set_backend_kubernetes(example, dry_run, ftc_home):
    job = str(ROOT / "examples" / example)
    flag = _invoke("submit", job, *(["--dry-run"] if dry_run else []), "--backend", "kubernetes")
    sets = _invoke("submit", job, *(["--dry-run"] if dry_run else []), "--set", "backend=kubernetes")
    assert not isinstance(flag[2], KeyError), flag[1]
    assert flag[:2] == sets[:2] and flag[0] == 2  # the same answer: a kubernetes job needs an image
    assert "kubernetes.image: the kubernetes backend needs an image" in flag[1]


@pytest.mark.parametrize("example", EXAMPLES)
def test_submit_dry_run_backend_kubernetes_shows_the_job(example, ftc_home):
    job = str(ROOT / "examples" / example)
    image = ("--set", "kubernetes.image=ghcr.io/x/ftcluster:1")
    code, out, exc = _invoke("submit", job, "--dry-run", *image, "--backend", "kubernetes")
    assert code == 0 and exc is None, out
    assert out.startswith("# backend: kubernetes\n") and "kind: PyTorchJob" in out and "$ kubectl create" in out
    assert (code, out) == _invoke("submit", job, "--dry-run", *image, "--set", "backend=kubernetes")[:2]


def test_the_api_takes_backend_as_the_override(ftc_home):
    from ftcluster import api
    from ftcluster.spec.loader import load_spec

    spec = load_spec(str(ROOT / "examples" / "lora-slurm.yaml"), ["kubernetes.image=img:1"])
    req = api.submit_dryrun(spec, "kubernetes")
    assert req.backend == "kubernetes" and list(req.files) == ["support-bot-lora.yaml"]
    assert api.with_backend(spec, "kubernetes").backend == "kubernetes" and spec.backend == "slurm"
    assert api.with_backend(spec, None) is spec
    from ftcluster.spec.loader import load_spec_text

    text = load_spec_text((ROOT / "examples" / "full-trainjob.yaml").read_text())  # no file: validated from its data
    moved = api.with_backend(text, "local")
    assert moved.backend == "local" and api.with_backend(moved, "kubernetes").model_dump() == text.model_dump()


def test_doctor_backend_is_set_backend(ftc_home):
    job = str(ROOT / "examples" / "quickstart.yaml")
    flag = _invoke("doctor", job, "--json", "--backend", "kubernetes")
    assert flag[0] == 1 and '"name": "spec"' in flag[1] and "kubernetes.image" in flag[1]
    assert flag[:2] == _invoke("doctor", job, "--json", "--set", "backend=kubernetes")[:2]
