"""Pipelines: loading and checking (located errors), rendering, and submission as one unit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ftcluster.errors import SpecError
from ftcluster.render.pipeline import render_pipeline
from ftcluster.spec.pipeline import Pipeline, load, load_pipeline

ROOT = Path(__file__).resolve().parents[3]

FULL = """\
name: base-cpt
method: full
backend: slurm
model:
  random_init: {preset: tiny}
data:
  train: examples/data/text.jsonl
  format: text
  seq_len: 64
output:
  uri: file:///tmp/ftc-pipe/cpt
"""

LORA = """\
name: adapters
method: lora
backend: slurm
model:
  hub_id: org/unused      # replaced by model_from
data:
  train: examples/data/instruct.jsonl
  seq_len: 64
output:
  uri: file:///tmp/ftc-pipe/adapters
variants:
  - {name: r2, set: {lora.r: 2}}
  - {name: r4, set: {lora.r: 4}}
"""


def write(tmp_path: Path, pipeline: str, **specs: str) -> Path:
    for name, text in {"full.yaml": FULL, "lora.yaml": LORA, **specs}.items():
        (tmp_path / name).write_text(text)
    path = tmp_path / "pipe.yaml"
    path.write_text(textwrap.dedent(pipeline))
    return path


def problems(path: Path, overrides=None) -> list[str]:
    with pytest.raises(SpecError) as info:
        load(path, overrides)
    return [str(p).replace(f"{path.parent}/", "") for p in info.value.problems]


GOOD = """\
pipeline: cpt-then-lora
stages:
  - name: cpt
    spec: full.yaml
  - spec: lora.yaml
    model_from: cpt
"""


def test_pipeline_links_the_model_of_one_stage_to_the_next(tmp_path):
    pipe = load(write(tmp_path, GOOD))
    assert isinstance(pipe, Pipeline) and pipe.backend == "slurm"
    cpt, adapters = pipe.stages
    assert (cpt.name, cpt.after, adapters.name, adapters.after) == ("cpt", (), "adapters", ("cpt",))
    assert adapters.spec.model.path == "file:///tmp/ftc-pipe/cpt/final" and adapters.spec.model.hub_id is None
    # every variant trains on the upstream model too
    assert {v.model.path for v in adapters.spec._resolved} == {"file:///tmp/ftc-pipe/cpt/final"}
    # a job spec is not a pipeline
    assert load(tmp_path / "full.yaml").name == "base-cpt"


def test_cli_set_applies_to_every_stage(tmp_path):
    pipe = load(write(tmp_path, GOOD), ["slurm.partition=debug", "training.max_steps=3"])
    assert [s.spec.slurm.partition for s in pipe.stages] == ["debug", "debug"]
    assert [v.training.max_steps for v in pipe.stages[1].spec._resolved] == [3, 3]


def test_stage_set_errors_point_at_the_pipeline_file(tmp_path):
    path = write(tmp_path, """\
        pipeline: p
        stages:
          - name: cpt
            spec: full.yaml
            set: {training.learning_rate: -1, deepspeed.zero_stag: 2}
          - spec: lora.yaml
            after: [cpt]
            stagez: 1
        """)
    msgs = problems(path)
    assert msgs == ["pipe.yaml:8:5: stages[1].stagez: unknown field 'stagez'; valid fields: after, model_from, name, "
                    "run, set, spec"]
    path.write_text(path.read_text().replace("    stagez: 1\n", ""))
    msgs = problems(path)
    assert msgs[0] == "pipe.yaml:5:11: stages[0].set.training.learning_rate: Input should be greater than 0 (got -1)"
    assert msgs[1].startswith("pipe.yaml:5:39: stages[0].set.deepspeed.zero_stag: unknown field 'zero_stag'; "
                              "did you mean 'zero_stage'?")


def test_links_between_stages_are_checked(tmp_path):
    lora_adapter_only = LORA.replace("variants:", "variants_off:").split("variants_off:")[0]
    path = write(tmp_path, """\
        pipeline: p
        stages:
          - spec: lora1.yaml
          - spec: lora2.yaml
            after: [later]
          - spec: lora3.yaml
            model_from: adapters
          - spec: missing.yaml
        """, **{"lora1.yaml": lora_adapter_only,
                "lora2.yaml": lora_adapter_only.replace("name: adapters", "name: two"),
                "lora3.yaml": lora_adapter_only.replace("name: adapters", "name: three").replace(
                    "file:///tmp/ftc-pipe/adapters", "file:///tmp/ftc-pipe/three")})
    msgs = problems(path)
    assert msgs == [
        "pipe.yaml:4:5: stages[1].spec: writes to file:///tmp/ftc-pipe/adapters, as stage 'adapters' does; give each "
        "stage its own output.uri (in its spec or its `set`)",
        "pipe.yaml:5:13: stages[1].after[0]: no earlier stage is named 'later' (earlier stages: adapters); a stage can "
        "wait only for stages listed before it",
        "pipe.yaml:7:5: stages[2].model_from: cannot take the model of stage 'adapters': it is a LoRA run that "
        "publishes only an adapter; set lora.merge_at_end: true in that stage",
        "pipe.yaml:8:5: stages[3].spec: missing.yaml: no such file; the path is relative to the "
        "pipeline file",
    ]


def test_one_backend_and_unique_stage_names(tmp_path):
    path = write(tmp_path, """\
        pipeline: p
        stages:
          - {spec: full.yaml}
          - {spec: full.yaml, set: {output.uri: file:///tmp/other}}
          - {name: local-one, spec: full.yaml, set: {backend: local, output.uri: file:///tmp/third}}
        """)
    msgs = problems(path)
    assert msgs == [
        "pipe.yaml:4:6: stages[1].spec: stage name 'base-cpt' is taken by an earlier stage; give this stage its own "
        "`name:`",
        "pipe.yaml:5:23: stages[2].spec: this stage runs on backend local but stage 'base-cpt' on slurm; a pipeline "
        "runs on one backend: set the same backend in every stage spec",
    ]


def test_model_from_a_stage_with_variants_is_refused(tmp_path):
    path = write(tmp_path, """\
        pipeline: p
        stages:
          - {name: a, spec: lora.yaml}
          - {name: b, spec: full.yaml, model_from: a}
        """)
    assert problems(path) == [
        "pipe.yaml:4:32: stages[1].model_from: cannot take the model of stage 'a': it has variants (r2, r4), so it "
        "publishes one model per variant; model_from needs a stage that produces one model"]


def test_render_kubernetes_puts_each_stage_in_its_folder(tmp_path):
    pipe = load_pipeline(write(tmp_path, GOOD), ["kubernetes.image=registry.example.com/t:1"])
    files = render_pipeline(pipe, "pytorchjob")
    assert {f.split("/")[0] for f in files} == {"cpt", "adapters"}
    assert any(f.startswith("adapters/adapters-r2.") for f in files)
    assert all(f"Reproduce with: ftcluster render {pipe.source} --target pytorchjob --set kubernetes.image=" in t
               for t in files.values())


def test_submit_refuses_a_local_pipeline_with_a_fix(tmp_path):
    path = write(tmp_path, GOOD)
    res = subprocess.run([sys.executable, "-m", "ftcluster.cli", "submit", str(path), "--set", "backend=local"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env={**os.environ, "FTCLUSTER_HOME": str(tmp_path / "home")})
    assert res.returncode == 1 and len(res.stderr.splitlines()) == 1
    assert "pipelines are submitted to Slurm" in res.stderr and "--set backend=slurm" in res.stderr
    assert not (tmp_path / "home").exists()


def test_pipeline_schema_matches_committed_file():
    res = subprocess.run([sys.executable, "-m", "ftcluster.cli", "schema", "--pipeline"], capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 0, res.stderr
    assert set(json.loads(res.stdout)["properties"]) == {"pipeline", "description", "stages"}
    assert res.stdout == (ROOT / "docs" / "ftcluster-pipeline.schema.json").read_text(), (
        "docs/ftcluster-pipeline.schema.json is stale: run `ftcluster schema --pipeline -o "
        "docs/ftcluster-pipeline.schema.json`")


CPT = """\
name: cpt
method: full
backend: slurm
model: {random_init: {preset: tiny}}
tokenizer: {train_vocab_size: 512}
data:
  train: corpus
  format: text
  seq_len: 64
  prepare: {source: raw, tasks: 3}
output: {uri: file:///tmp/ftc-pipe/cpt}
"""

PREPARED = """\
pipeline: cpt-domain
stages:
  - name: corpus
    spec: cpt.yaml
    run: prepare-data
  - name: train
    spec: cpt.yaml
  - spec: lora.yaml
    model_from: train
"""


def test_a_prepare_stage_runs_before_the_stages_that_train_on_its_corpus(tmp_path):
    pipe = load(write(tmp_path, PREPARED, **{"cpt.yaml": CPT}))  # corpus/ does not exist yet: it is made first
    corpus, train, adapters = pipe.stages
    assert (corpus.prepares, train.prepares) == (True, False)
    assert train.after == ("corpus",) and adapters.after == ("train",)  # implied, as model_from implies after
    assert train.spec._corpus_from == "corpus" and adapters.spec._corpus_from is None
    assert adapters.spec.model.path == "file:///tmp/ftc-pipe/cpt/final"
    from ftcluster.spec.pipeline import describe

    assert describe(pipe).startswith("pipeline cpt-domain, backend slurm: corpus (prepare-data, 3 tasks) -> train "
                                     "(full, 1x1, after corpus)")


def test_prepare_stage_mistakes_are_located(tmp_path):
    path = write(tmp_path, PREPARED.replace("model_from: train", "model_from: corpus"), **{"cpt.yaml": CPT})
    msgs = problems(path)
    assert msgs == ["pipe.yaml:9:5: stages[2].model_from: cannot take the model of stage 'corpus': it prepares a "
                    "corpus (run: prepare-data) and trains no model"]
    path = write(tmp_path, PREPARED, **{"cpt.yaml": CPT.replace("  prepare: {source: raw, tasks: 3}\n", "")})
    msgs = problems(path)
    assert msgs == ["pipe.yaml:5:5: stages[0].run: cpt.yaml has no data.prepare: add "
                    "data.prepare.source (the raw corpus to tokenize into data.train), or drop `run: prepare-data`"]


def test_model_from_uses_the_upstream_tokenizer(tmp_path):
    lora = LORA.replace("  hub_id: org/unused      # replaced by model_from\n", "  random_init: {preset: tiny}\n")
    pipe = load(write(tmp_path, GOOD, **{"lora.yaml": lora + "tokenizer: {train_vocab_size: 512}\n"}))
    assert pipe.stages[1].spec.tokenizer.train_vocab_size is None  # the cpt model's tokenizer, added tokens included


def test_a_prepare_stage_renders_and_submits_as_a_job_array_first(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from ftcluster.backends.pipeline import PipelineBackend
    from ftcluster.backends.slurm.backend import SlurmBackend

    monkeypatch.setenv("FTCLUSTER_HOME", str(tmp_path / "home"))
    pipe = load(write(tmp_path, PREPARED, **{"cpt.yaml": CPT}))
    files = render_pipeline(pipe, "slurm")
    assert sorted(files) == ["adapters/adapters.sbatch", "corpus/cpt-prepare.sbatch", "submit-pipeline.sh",
                             "train/cpt.sbatch"]
    assert "#SBATCH --array=0-2\n" in files["corpus/cpt-prepare.sbatch"]
    assert "-m ftcluster.train.prepare" in files["corpus/cpt-prepare.sbatch"]
    script = files["submit-pipeline.sh"]
    assert script.index("corpus/cpt-prepare.sbatch") < script.index('"--dependency=afterok:${id0}" '
                                                                    "--kill-on-invalid-dep=yes train/cpt.sbatch")
    kube = render_pipeline(load(write(tmp_path, PREPARED, **{"cpt.yaml": CPT + "kubernetes: {image: i:1}\n"}),
                                ["kubernetes.image=i:1"]), "pytorchjob")
    assert "kind: Job\n" in kube["corpus/cpt-prepare.yaml"] and "completionMode: Indexed" in kube["corpus/cpt-prepare.yaml"]
    assert "kind: PyTorchJob" in kube["train/cpt.yaml"]

    calls = []

    def sbatch(argv, stdin=None, env=None):
        calls.append((argv, stdin or ""))
        return SimpleNamespace(returncode=0, stdout=f"{100 + len(calls)}\n", stderr="")

    backend = PipelineBackend(slurm=SlurmBackend(runner=sbatch))
    st = backend.schedule(backend.submit_dryrun(pipe))
    sb = [(argv, script) for argv, script in calls if argv[0] == "sbatch"]
    assert "--hold" in sb[0][0] and "#SBATCH --array=0-2" in sb[0][1] and "ftcluster.train.prepare" in sb[0][1]
    assert "--dependency=afterok:101" in sb[1][0] and "ftcluster.train.launch" in sb[1][1]
    assert st.state == "PENDING" and [t["name"] for t in st.tasks] == ["corpus", "train", "adapters"]
