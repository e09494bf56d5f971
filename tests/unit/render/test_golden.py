"""Golden files: every example x target rendered and compared in full.

Regenerate only on purpose: ``pytest tests/unit/render/test_golden.py --update-golden``.
"""

from __future__ import annotations

import difflib
import shutil
from pathlib import Path

import pytest

from ftcluster.render import TARGETS, render
from ftcluster.render.pipeline import render_pipeline
from ftcluster.spec.loader import load_spec
from ftcluster.spec.pipeline import Pipeline, load, load_pipeline

ROOT = Path(__file__).resolve().parents[3]
GOLDEN = ROOT / "tests" / "golden"
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.yaml"))
# Examples written for Slurm carry no container image; Kubernetes needs one.
IMAGE = "kubernetes.image=registry.example.com/ml/ftcluster-train:0.1.0"


def _render(example: str, target: str) -> dict[str, str]:
    path = f"examples/{example}"
    if isinstance(load(ROOT / path), Pipeline):  # files under <stage>/, plus a submit script for Slurm
        pipe = load_pipeline(ROOT / path)
        overrides = [IMAGE] if target != "slurm" and any(not s.spec.kubernetes.image for s in pipe.stages) else []
        pipe = load_pipeline(ROOT / path, overrides)
        pipe.source = path
        return render_pipeline(pipe, target)
    spec = load_spec(ROOT / path)
    overrides = [IMAGE] if target != "slurm" and not spec.kubernetes.image else []
    spec = load_spec(ROOT / path, overrides)
    spec._source_file = path  # headers name the repo-relative path, whatever the cwd
    return render(spec, target)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("example", EXAMPLES)
def test_golden(example: str, target: str, update_golden: bool):
    files = _render(example, target)
    folder = GOLDEN / example.removesuffix(".yaml") / target
    if update_golden:
        if folder.is_dir():
            shutil.rmtree(folder)
        for name, text in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text, encoding="utf-8")
        pytest.skip("golden files rewritten")
    assert folder.is_dir(), f"no golden files for {example} x {target}; run pytest --update-golden"
    expected = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert sorted(files) == expected, "rendered file names differ from the golden set"
    for name, text in files.items():
        want = (folder / name).read_text(encoding="utf-8")
        if text != want:
            diff = "".join(difflib.unified_diff(want.splitlines(True), text.splitlines(True),
                                                f"golden/{name}", f"rendered/{name}"))
            pytest.fail(f"{example} x {target}: {name} differs from the golden file:\n{diff}")


@pytest.mark.slow
def test_render_is_deterministic():
    for example in EXAMPLES:
        for target in TARGETS:
            assert _render(example, target) == _render(example, target)
