"""The hybrid pattern on the live two-node Slurm with the real runtime on CPU: examples/pipeline-cpt-domain.yaml
as written (a smaller corpus and fewer steps): prepare-data as a job array of 2 tasks, continual
pre-training streaming that corpus on 2 nodes, then two LoRA adapters on the model it produced."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ftcluster.artifacts.record import weights_identity
from tests.e2e.test_slurm_e2e import committed, ftc

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slurm, pytest.mark.train, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _needs_slurm_and_runtime(live_slurm):
    pytest.importorskip("deepspeed", reason="needs the [train] extra")


def test_prepare_then_continual_pretraining_then_adapters(tmp_path):
    ex = tmp_path / "examples"
    shutil.copytree(ROOT / "examples", ex, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    shutil.copy(ROOT / "examples" / "cpt" / "make_corpus.py", ex / "cpt" / "make_corpus.py")
    subprocess.run([sys.executable, str(ex / "cpt" / "make_corpus.py"), str(tmp_path / "out" / "cpt" / "raw"),
                    "--mb", "1.5", "--files", "4"], check=True)
    sets = {"slurm.python": sys.executable, "slurm.partition": "debug", "slurm.setup": "[]",
            "slurm.output": f"{tmp_path}/slurm-%x-%j.out", "training.max_steps": "20",
            "output.checkpoint_every_steps": "10"}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    res = ftc("submit", str(ex / "pipeline-cpt-domain.yaml"), *args, "--wait", home=tmp_path / "home", timeout=1200)
    logs = "".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("slurm-*.out")))
    assert "SUCCEEDED" in res.stderr, res.stderr + logs[-4000:]

    corpus = json.loads((tmp_path / "out" / "cpt" / "corpus" / "manifest.json").read_text())
    assert corpus["tokens"] > 200_000 and len(corpus["sources"]) == 4
    assert logs.count("prepare: task ") >= 2  # two array tasks shared the files
    assert "2 process(es) on 2 node(s)" in logs and "full run 'cpt-domain'" in logs
    final = committed(tmp_path / "out" / "cpt-domain", "final")
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(final["files"])
    base = tmp_path / "out" / "cpt-domain" / "final"
    for variant in ("qa", "chat"):
        adapter = committed(tmp_path / "out" / "cpt-adapters" / variant, "adapter")
        assert "adapter_model.safetensors" in adapter["files"]
        # the base as the stage's spec names it: relative to the submission directory when that is shorter
        assert adapter["meta"]["base"]["source"] == "local:final", adapter["meta"]["base"]  # no path of this machine
        # its lineage: the base is the continual pre-training's final model, known by that run's record
        by = adapter["meta"]["base"]["produced_by"]
        assert (by["name"], by["kind"], by["weights_sha256"]) == ("cpt-domain", "final",
                                                                  adapter["meta"]["base"]["weights"]["sha256"])
        assert adapter["meta"]["base"]["weights"] == {k: v for k, v in weights_identity(base).items()
                                                      if k != "produced_by"}
    # The pipeline's run lists its artifacts with their lineage: both adapters on the CPT's final model.
    run_id = json.loads(ftc("list", "--json", home=tmp_path / "home").stdout)[-1]["run_id"]
    listed = ftc("adapters", "list", run_id, home=tmp_path / "home").stdout
    names = [line.split()[0] for line in listed.splitlines()[1:] if not line.startswith("base ")]
    assert names == ["cpt-adapters/chat/adapter", "cpt-adapters/qa/adapter", "cpt-domain/final"], listed
    bases = {line.split()[1] for line in listed.splitlines()[1:3]}
    assert len(bases) == 1 and f"base {bases.pop()}: local:final (from run cpt-domain@20)" in listed, listed
