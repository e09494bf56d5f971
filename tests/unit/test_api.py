"""The one door: every rule the CLI applies is a function of ftcluster.api, callable from Python with the
CLI's behaviour and messages (check_plan, check_paths, validate, kustomized, check_submit_options, fresh_uri,
finished_note, run_output, sample_source)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from ftcluster import api
from ftcluster.backends.base import RunStatus, save_status
from ftcluster.errors import FtclusterError, RunNotFoundError, SpecError, UsageError
from ftcluster.spec.loader import load_spec
from tests.support.specs import BIG

ROOT = Path(__file__).resolve().parents[2]
EX = ROOT / "examples"


def test_check_plan_refuses_what_does_not_fit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.jsonl").write_text('{"text": "a"}\n')
    (big := tmp_path / "big.yaml").write_text(BIG)
    with pytest.raises(SpecError, match=r"big.yaml:7:3: training.micro_batch_size: needs .*--no-plan-check"):
        api.check_plan(load_spec(big))
    with pytest.raises(SpecError, match="micro_batch_size"):
        api.validate(big)
    assert api.validate(big, plan_check=False).name == "big"
    api.check_plan(load_spec(EX / "quickstart.yaml"))  # fits: no error


def test_check_paths_locates_a_missing_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (big := tmp_path / "big.yaml").write_text(BIG)
    with pytest.raises(SpecError) as err:
        api.check_paths(big)
    assert re.search(r"big.yaml:5:\d+: data.train: .*x.jsonl", str(err.value)), str(err.value)
    api.check_paths(big, ["backend=kubernetes", "kubernetes.image=i:1"])  # paths on the cluster: not looked for
    api.check_paths(EX / "quickstart.yaml")


def test_summary_is_what_validate_prints():
    spec = api.validate(EX / "full-slurm-2node.yaml")
    assert "world size 16, backend slurm" in api.summary(spec)
    pipe = api.load(EX / "pipeline-cpt-then-lora.yaml")
    assert api.summary(pipe).startswith("pipeline ")


def test_kustomized_applies_to_kubernetes_jobs_only():
    from ftcluster.render import render

    spec = load_spec(EX / "lora-pytorchjob.yaml")
    files = api.kustomized(spec, None, render(spec))
    assert "kustomization.yaml" in files and "legal-style-lora.yaml" in files["kustomization.yaml"]
    with pytest.raises(UsageError, match="--kustomize applies to one job spec rendered for --target pytorchjob"):
        api.kustomized(spec, "slurm", render(spec, "slurm"))


def test_check_submit_options():
    local, kube = load_spec(EX / "quickstart.yaml"), load_spec(EX / "lora-pytorchjob.yaml")
    with pytest.raises(UsageError, match="^--server and --context apply to the kubernetes backend only$"):
        api.check_submit_options(local, dry_run=True, server=True)
    with pytest.raises(UsageError, match="--server and --context apply"):
        api.check_submit_options(local, context="ctx")
    with pytest.raises(UsageError, match=r"--server goes with --dry-run"):
        api.check_submit_options(kube, server=True)
    api.check_submit_options(kube, dry_run=True, server=True, context="ctx")


def test_fresh_uri_is_beside_the_old_one():
    assert re.fullmatch(r"s3://b/run-\d{8}-\d{6}", api.fresh_uri("s3://b/run/"))


def test_finished_note_when_the_last_artifact_is_committed(tmp_path):
    out = tmp_path / "out"
    spec = load_spec(EX / "quickstart.yaml", [f"output.uri=file://{out}"])  # LoRA, no merge: adapter/ is last
    assert api.finished_note(spec) is None
    (out / "adapter").mkdir(parents=True)
    assert api.finished_note(spec) is None  # not committed: no manifest yet
    (out / "adapter" / "manifest.json").write_text("{}")
    note = api.finished_note(spec, "job.yaml")
    assert note is not None and note.startswith(f"note: file://{out} already holds a finished run (adapter/ is committed)")
    assert "ftcluster submit job.yaml --fresh" in note
    merged = load_spec(EX / "quickstart.yaml", [f"output.uri=file://{out}", "lora.merge_at_end=true"])
    assert api.finished_note(merged) is None  # its last artifact is merged/
    assert api.finished_note(load_spec(EX / "quickstart.yaml", ["output.uri=s3://b/x"])) is None  # the run looks


def _run_folder(home: Path, backend: str, outputs: dict | None, tasks: list | None = None) -> str:
    run_dir = home / "runs" / f"r-{backend}"
    run_dir.mkdir(parents=True)
    save_status(run_dir, RunStatus(f"r-{backend}", backend, "job", "SUCCEEDED", str(run_dir), submitted_at=time.time(),
                                   output_uri="s3://b/job", tasks=tasks or []))
    if outputs is not None:
        (run_dir / "outputs.json").write_text(json.dumps(outputs))
    return run_dir.name


def test_run_output_reads_what_every_backend_records(ftc_home):
    rec = {"uri": "s3://b/job", "storage_options": {"anon": True}, "max_steps": 7, "single": True}
    for backend in ("slurm", "kubernetes"):
        assert api.run_output(_run_folder(ftc_home, backend, rec)) == rec
    arr = _run_folder(ftc_home, "local", {**rec, "single": False})
    assert api.run_output(arr)["single"] is False
    legacy = _run_folder(ftc_home, "pipeline", None, tasks=[{"name": "a", "state": "PENDING"}])
    assert api.run_output(legacy) == {"uri": "s3://b/job", "storage_options": {}, "max_steps": None, "single": False}


def test_slurm_and_kubernetes_runs_record_their_outputs(ftc_home, tmp_path):
    from ftcluster.backends.slurm.backend import SlurmBackend

    def sbatch(argv, stdin=None, env=None):
        return SimpleNamespace(returncode=0, stdout="4242\n", stderr="")

    spec = load_spec(EX / "lora-slurm.yaml", ["output.uri=rel/out"])
    st = SlurmBackend(runner=sbatch).schedule(api.submit_dryrun(spec))
    assert api.run_output(st.run_id) == {"uri": f"file://{Path.cwd() / 'rel' / 'out'}",
                                         "storage_options": spec.output.storage_options,
                                         "max_steps": spec.training.max_steps, "single": True}
    kube = api.with_backend(load_spec(EX / "lora-slurm.yaml", ["kubernetes.image=i:1"]), "kubernetes")
    req = api.submit_dryrun(kube)
    assert req.meta["outputs"]["uri"] == kube.output.uri  # on the cluster: not made absolute here


def test_sample_source(ftc_home, tmp_path):
    assert api.sample_source("s3://b/x") == ("s3://b/x", {})
    assert api.sample_source(str(tmp_path)) == (str(tmp_path), {})
    rec = {"uri": "s3://b/job", "storage_options": {"anon": True}, "max_steps": 7, "single": True}
    assert api.sample_source(_run_folder(ftc_home, "slurm", rec)) == ("s3://b/job", {"anon": True})
    with pytest.raises(FtclusterError, match="several outputs .* e.g. s3://b/job/<variant name>"):
        api.sample_source(_run_folder(ftc_home, "local", {**rec, "single": False}))
    with pytest.raises(FtclusterError, match="; or give an output URI") as err:
        api.sample_source("no-such-run")
    assert not isinstance(err.value, RunNotFoundError)


def test_each_stage_of_a_pipeline_records_its_outputs(ftc_home):
    from ftcluster.backends.pipeline import PipelineBackend
    from ftcluster.backends.slurm.backend import SlurmBackend

    def slurm(argv, stdin=None, env=None):
        return SimpleNamespace(returncode=0, stdout="4242\n", stderr="")

    pipe = api.load(EX / "pipeline-cpt-then-lora.yaml")
    backend = PipelineBackend(slurm=SlurmBackend(runner=slurm))
    st = backend.schedule(backend.submit_dryrun(pipe))
    assert api.run_output(st.run_id)["single"] is False  # several stages: several outputs
    for stage in pipe.stages:
        out = api.run_output(str(Path(st.run_dir) / stage.name))
        assert out["uri"] == stage.spec.output.uri  # an s3:// URI, as the stage's spec says
        assert out["single"] == (not stage.spec.variants) and out["max_steps"] == stage.spec.training.max_steps
    assert [api.run_output(str(Path(st.run_dir) / s.name))["single"] for s in pipe.stages] == [True, False]


def test_sample_command_runs_the_train_layer_apart(tmp_path, monkeypatch):
    import importlib.util
    import sys

    argv = api.sample_command(f"file://{tmp_path}", "hi", max_new_tokens=3)
    assert argv[:4] == [sys.executable, "-m", "ftcluster.train.sample", f"file://{tmp_path}"]
    assert argv[argv.index("--max-new-tokens") + 1] == "3" and json.loads(argv[-1]) == {}
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(FtclusterError, match=r"needs peft: pip install 'ftcluster\[train\]'"):
        api.sample_command(f"file://{tmp_path}", "hi")


def test_write_files_writes_all_or_none(tmp_path):
    api.write_files(tmp_path / "o", {"a.yaml": "a\n", "stage/b.sbatch": "b\n"})
    assert (tmp_path / "o" / "a.yaml").read_text() == "a\n" and (tmp_path / "o" / "stage" / "b.sbatch").read_text() == "b\n"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FtclusterError, match="cannot write to"):
        api.write_files(tmp_path / "file", {"a.yaml": "a\n"})


def test_render_is_the_clis_render():
    files = api.render(EX / "lora-pytorchjob.yaml", kustomize=True)
    assert sorted(files) == ["kustomization.yaml", "legal-style-lora.yaml"]
    assert list(api.render(EX / "lora-slurm.yaml")) == ["support-bot-lora.sbatch"]
    assert list(api.render(EX / "pipeline-cpt-then-lora.yaml")) == [
        "cpt/cpt-llama-8b.sbatch", "adapters/support-lora.sbatch", "submit-pipeline.sh"]  # a folder per stage
    with pytest.raises(UsageError, match="--fresh does not apply to a pipeline"):
        api.fresh_uri(api.load(EX / "pipeline-cpt-then-lora.yaml"))


def test_plan_and_schema_are_the_clis():
    """`ftcluster plan` and `ftcluster schema` print what the API returns (the CLI adds no rule)."""
    plans = api.plan(str(ROOT / "examples" / "pipeline-cpt-then-lora.yaml"), network=False)
    assert [p.requested.layout.method for p in plans] == ["full", "lora"]
    one = api.plan(str(ROOT / "examples" / "quickstart.yaml"), ["training.max_steps=10"], network=False)
    assert len(one) == 1 and one[0].name == "quickstart"
    for pipeline, name in ((False, "ftcluster.schema.json"), (True, "ftcluster-pipeline.schema.json")):
        assert api.schema(pipeline) == json.loads((ROOT / "docs" / name).read_text())


def test_artifact_source_takes_runs_with_several_outputs_and_paths_inside(ftc_home, tmp_path):
    """``adapters list|show|check``, ``merge`` and ``sample --adapter``: a run id gives its output root (an array's
    or pipeline's too: every output is under it), ``RUN/path`` a folder inside it; paths and URIs as they are."""
    assert api.artifact_source("s3://b/x/adapter") == ("s3://b/x/adapter", {})
    assert api.artifact_source(str(tmp_path)) == (str(tmp_path.resolve()), {})
    rec = {"uri": "s3://b/job/", "storage_options": {"anon": True}, "max_steps": 7, "single": False}
    run = _run_folder(ftc_home, "slurm", rec)
    assert api.artifact_source(run) == ("s3://b/job", {"anon": True})
    assert api.artifact_source(f"{run}/qa/adapter") == ("s3://b/job/qa/adapter", {"anon": True})
    with pytest.raises(FtclusterError, match=r"^/no/such/folder: no such file or folder$"):
        api.artifact_source("/no/such/folder")
    with pytest.raises(FtclusterError, match="no-such-run/adapter: no such path, and .*give a URI, a path, or a run id"):
        api.artifact_source("no-such-run/adapter")


def test_a_pipelines_outputs_are_its_stages_common_root(ftc_home):
    """A pipeline records no outputs of its own; each stage does in ``<run folder>/<stage>``: ``adapters list RUN``
    lists under their common root."""
    rec = {"storage_options": {}, "max_steps": 5, "single": True}
    run = _run_folder(ftc_home, "pipeline", None, tasks=[{"name": "cpt", "state": "SUCCEEDED"}])
    for stage, uri in (("cpt", "file:///data/out/cpt-domain"), ("qa", "file:///data/out/cpt-adapters/qa")):
        (ftc_home / "runs" / run / stage).mkdir()
        (ftc_home / "runs" / run / stage / "outputs.json").write_text(json.dumps({**rec, "uri": uri}))
    assert api.run_output(run)["uri"] == "file:///data/out" and api.run_output(run)["single"] is False
    assert api.artifact_source(f"{run}/cpt-domain/final") == ("file:///data/out/cpt-domain/final", {})
