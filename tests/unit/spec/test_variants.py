"""Variants: validation at load time (located errors), resolution, payload selection, rendering
for Kubernetes (one job per variant) and the local backend (variants one after another)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ftcluster.errors import SpecError, TrainError
from ftcluster.plan.facts import slurm_output
from ftcluster.plan.launch import compile_plan
from ftcluster.plan.payload import select_payload
from ftcluster.spec.loader import load_spec, load_spec_text, spec_from_dict
from ftcluster.spec.variants import resolve_variants
from tests.support.specs import TINY_LORA

ROOT = Path(__file__).resolve().parents[3]

BASE = TINY_LORA  # tests/support/specs.py


def problems(text: str, tmp_path: Path) -> list[str]:
    p = tmp_path / "job.yaml"
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    with pytest.raises(SpecError) as info:
        load_spec(p)
    return [str(x).removeprefix(f"{tmp_path}/") for x in info.value.problems]


def test_variants_resolve_to_named_specs_with_their_own_output():
    spec = load_spec_text(BASE + textwrap.dedent("""\
        array_parallelism: 2
        variants:
          - name: r4
            set: {lora.r: 4, training.learning_rate: 1.0e-3}
          - name: same
          - name: qv
            set:
              lora: {target_modules: [q_proj, v_proj]}
        """), "v.yaml")
    r4, same, qv = resolve_variants(spec)
    assert [v.name for v in (r4, same, qv)] == ["demo-r4", "demo-same", "demo-qv"]
    assert [v.output.uri for v in (r4, same, qv)] == [f"file:///tmp/ftc-out/{n}" for n in ("r4", "same", "qv")]
    assert (r4.lora.r, r4.training.learning_rate, same.lora.r, qv.lora.r) == (4, 1e-3, 16, 16)
    assert qv.lora.target_modules == ["q_proj", "v_proj"]
    assert all(not v.variants and v.array_parallelism is None for v in (r4, same, qv))
    plan = compile_plan(spec)
    assert plan.array == "0-2%2" and plan.variants == ("r4", "same", "qv")
    assert [p["variant"] for p in plan.payload["variants"]] == ["r4", "same", "qv"]
    assert plan.payload["base"]["spec"] == {**spec.model_dump(mode="json"), "variants": [], "array_parallelism": None}
    assert plan.payload["variants"][0]["set"] == {"/name": "demo-r4", "/output/uri": "file:///tmp/ftc-out/r4",
                                                  "/lora/r": 4, "/training/learning_rate": 1e-3}
    # each task rebuilds exactly its variant's payload from the compact array payload
    for i, v in enumerate((r4, same, qv)):
        got = select_payload(json.loads(plan.payload_json()), {"SLURM_ARRAY_TASK_ID": str(i)})
        assert got["spec"] == v.model_dump(mode="json") and got["variant"] == v._variant
        assert got["deepspeed"] is None
    # a spec built in Python resolves the same way (no file, so no line numbers)
    again = spec_from_dict(spec.model_dump(mode="json"))
    assert [v.model_dump() for v in resolve_variants(again)] == [v.model_dump() for v in (r4, same, qv)]


def test_variant_errors_point_at_the_variant_line_and_field(tmp_path):
    msgs = problems(BASE + """\
variants:
  - name: ok
    set: {lora.r: 8}
  - name: bad
    set:
      lora.r: 0
      training.learning_rate: -1
      data: {train: b.jsonl, seq_len: 2}
  - name: typo
    set: {training.max_stepz: 3}
  - name: both
    set: {lora: {r: 2}, lora.alpha: 4}
""", tmp_path)
    assert msgs == [
        "job.yaml:15:7: variants[1].set.lora.r: Input should be greater than 0 (got 0)",
        "job.yaml:16:7: variants[1].set.training.learning_rate: Input should be greater than 0 (got -1)",
        "job.yaml:17:30: variants[1].set.data.seq_len: Input should be greater than or equal to 8 (got 2)",
        "job.yaml:19:11: variants[2].set.training.max_stepz: unknown field 'max_stepz'; did you mean 'max_steps'? "
        "valid fields: adam_beta1, adam_beta2, compile, epochs, eval_every_steps, fp8, gradient_accumulation_steps, "
        "gradient_checkpointing, hang_timeout, learning_rate, log_every_steps, lr_schedule, max_grad_norm, max_steps, "
        "micro_batch_size, precision, seed, warmup_steps, weight_decay",
        "job.yaml:21:25: variants[3].set.lora.alpha: lora is also set, and a mapping replaces the whole section; "
        "put lora.alpha inside the lora mapping, or set single fields with dotted keys only",
    ]


def test_variants_cannot_change_the_shape_of_the_array(tmp_path):
    msgs = problems(BASE + """\
variants:
  - name: big
    set: {resources.nodes: 2, backend: slurm, slurm.partition: gpu}
  - name: full
    set: {method: full, output.uri: s3://x/y}
""", tmp_path)
    assert len(msgs) == 5
    assert msgs[0].startswith("job.yaml:12:11: variants[0].set.resources.nodes: cannot vary within one array: "
                              "every array task gets the same nodes")
    assert msgs[1].startswith("job.yaml:12:31: variants[0].set.backend: cannot vary within one array")
    assert msgs[2].startswith("job.yaml:12:47: variants[0].set.slurm.partition: cannot vary within one array")
    assert "set slurm at the top level" in msgs[2]
    assert msgs[3].startswith("job.yaml:14:11: variants[1].set.method: cannot vary")
    assert msgs[4].startswith("job.yaml:14:25: variants[1].set.output.uri: cannot vary") and "<output.uri>/<variant>" in msgs[4]


def test_variant_names_unique_short_and_dns(tmp_path):
    msgs = problems(BASE + """\
variants:
  - {name: a}
  - {name: a}
  - {name: this-variant-name-is-far-too-long-for-a-job-name}
""", tmp_path)
    assert msgs[0] == "job.yaml:12:6: variants[1].name: 'a' is already the name of variants[0]; give every variant its own name"
    assert msgs[1].startswith("job.yaml:13:6: variants[2].name: the variant's job name "
                              "'demo-this-variant-name-is-far-too-long-for-a-job-name' has 53 characters, more than 50")
    assert problems(BASE + "variants:\n  - {name: Big_One}\n", tmp_path) == [
        "job.yaml:11:6: variants[0].name: use lower-case letters, digits and '-', starting with a letter, e.g. 'big-one'"]
    assert problems(BASE + "array_parallelism: 2\n", tmp_path) == [
        "job.yaml:10:1: array_parallelism: only applies to a job with variants; remove it or add variants"]


def test_problem_across_fields_names_the_variant(tmp_path):
    # seq_len is fine for the base model; the variant's smaller model cannot take it
    msgs = problems(BASE + """\
variants:
  - name: short
    set: {model.random_init.max_position_embeddings: 64}
""", tmp_path)
    assert msgs == ["job.yaml:11:5: variants[0]: variant 'short': data.seq_len: 128 exceeds "
                    "model.random_init.max_position_embeddings (64); lower seq_len or raise max_position_embeddings"]
    msgs = problems(BASE + "variants:\n  - {name: hub, set: {model: {hub_id: org/model}}}\n", tmp_path)
    assert "variants[0]: variant 'hub': changes the environment every array task shares (HF_DATASETS_OFFLINE" in msgs[0]


def test_json_changes_round_trip():
    from ftcluster.plan.payload import apply_changes, json_changes

    a = {"x": 1, "m": {"k": [1, 2], "a/b": {"~t": 1}, "gone": 0}, "same": {"v": None}}
    b = {"x": 2, "m": {"k": [1], "a/b": {"~t": 2}, "new": {"z": 1}}, "same": {"v": None}}
    changed, removed = json_changes(a, b)
    assert changed == {"/x": 2, "/m/k": [1], "/m/a~1b/~0t": 2, "/m/new": {"z": 1}} and removed == ["/m/gone"]
    assert apply_changes(a, changed, removed) == b and a["x"] == 1


def test_select_payload_by_array_task_or_name():
    spec = load_spec_text(BASE + "variants:\n  - {name: a, set: {lora.r: 2}}\n  - {name: b, set: {lora.r: 4}}\n")
    payload = json.loads(compile_plan(spec).payload_json())
    assert select_payload(payload, {"SLURM_ARRAY_TASK_ID": "1"})["spec"]["lora"]["r"] == 4
    assert select_payload(payload, {"FTCLUSTER_VARIANT": "a", "SLURM_ARRAY_TASK_ID": "1"})["variant"] == "a"
    assert select_payload(payload, {"FTCLUSTER_VARIANT": "1"})["variant"] == "b"
    single = json.loads(compile_plan(load_spec_text(BASE)).payload_json())
    assert select_payload(single, {"SLURM_ARRAY_TASK_ID": "7"}) is single
    with pytest.raises(TrainError, match=r"holds 2 variants \(a, b\); choose one with FTCLUSTER_VARIANT"):
        select_payload(payload, {})
    with pytest.raises(TrainError, match="SLURM_ARRAY_TASK_ID=2 names no variant of this job; use one of a, b"):
        select_payload(payload, {"SLURM_ARRAY_TASK_ID": "2"})


def test_array_output_pattern():
    assert slurm_output("slurm-%x-%j.out", True) == "slurm-%x-%A_%a.out"
    assert slurm_output("slurm-%x-%j.out", False) == "slurm-%x-%j.out"
    assert slurm_output("logs/%x.log", True) == "logs/%x_%a.log"
    assert slurm_output("logs/%x-%A-%a.txt", True) == "logs/%x-%A-%a.txt"


def test_kubernetes_renders_one_job_per_variant():
    from ftcluster.render import render

    spec = load_spec(ROOT / "examples" / "lora-variants-slurm.yaml",
                     ["kubernetes.image=registry.example.com/ml/ftcluster-train:0.1.0"])
    files = render(spec, "pytorchjob")
    names = [v.name for v in resolve_variants(spec)]
    assert all(any(f.startswith(n + ".") for f in files) for n in names), sorted(files)
    for n in names:
        job_files = {f: t for f, t in files.items() if f.startswith(n + ".")}
        assert any(f"name: {n}" in t for t in job_files.values())
    r64 = next(t for f, t in files.items() if f.startswith("support-lora-r64.") and "FTCLUSTER_PAYLOAD" in t)
    assert '"r": 64' in r64 and "s3://ft-runs/support-lora/r64" in r64 and '"variants": []' in r64


# --------------------------------------------------------------------------- local backend

def _local_job(tmp_path: Path, extra_env: str = "") -> Path:
    from tests.support.train_shim import make_shim

    shim = make_shim(tmp_path)
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    # The data, absolute: submit checks the inputs as validate does.
    base = BASE.replace("file:///tmp/ftc-out", f"file://{out}").replace("examples/data/", f"{ROOT}/examples/data/")
    job.write_text(base + textwrap.dedent(f"""\
        local:
          python: {shim}
          env: {{SHIM_SLEEP: '0.2'{extra_env}}}
        variants:
          - {{name: r2, set: {{lora.r: 2}}}}
          - {{name: r4, set: {{lora.r: 4}}}}
          - {{name: r8, set: {{lora.r: 8}}}}
        """))
    return job


def _ftc(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftcluster.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


@pytest.mark.slow
def test_local_backend_runs_variants_one_after_another(tmp_path):
    env = {"FTCLUSTER_HOME": str(tmp_path / "home")}
    res = _ftc("submit", str(_local_job(tmp_path)), "--wait", env=env)
    assert res.returncode == 0, res.stderr
    picked = [json.loads((tmp_path / "out" / v / "selected.json").read_text()) for v in ("r2", "r4", "r8")]
    assert [(p["variant"], p["name"], p["lora_r"]) for p in picked] == [
        ("r2", "demo-r2", 2), ("r4", "demo-r4", 4), ("r8", "demo-r8", 8)]
    assert picked[0]["end"] <= picked[1]["start"] and picked[1]["end"] <= picked[2]["start"]
    assert "==> r4 (variant 2/3) <==" in res.stdout and res.stdout.count("shim trains") == 3
    st = json.loads(_ftc("status", res.stdout.split()[1], "--json", env=env).stdout)
    assert st["state"] == "SUCCEEDED" and [(t["name"], t["state"]) for t in st["tasks"]] == [
        ("r2", "SUCCEEDED"), ("r4", "SUCCEEDED"), ("r8", "SUCCEEDED")]


@pytest.mark.slow
def test_local_backend_stops_at_the_first_failed_variant(tmp_path):
    env = {"FTCLUSTER_HOME": str(tmp_path / "home")}
    res = _ftc("submit", str(_local_job(tmp_path, ", SHIM_FAIL: r4")), "--wait", env=env)
    assert res.returncode == 1 and "variant r4: exit code 3" in res.stderr
    assert not (tmp_path / "out" / "r8").exists()
    st = json.loads(_ftc("status", res.stdout.split()[1], "--json", env=env).stdout)
    assert [(t["name"], t["state"]) for t in st["tasks"]] == [("r2", "SUCCEEDED"), ("r4", "FAILED"), ("r8", "CANCELLED")]
    table = _ftc("status", res.stdout.split()[1], env=env).stdout
    assert "  r4" in table and "exit code 3" in table


def test_variants_cannot_change_the_full_engine(tmp_path):
    """DeepSpeed and FSDP jobs launch differently (a DeepSpeed config, the doctor's probe): one array, one engine.
    A variant may set the fields of the engine in use, not the other engine's."""
    full = BASE.replace("method: lora", "method: full") + "engine: fsdp\n"
    msgs = problems(full + "variants:\n  - name: ds\n    set: {engine: deepspeed}\n", tmp_path)
    assert msgs == ["job.yaml:13:11: variants[0].set.engine: cannot vary within one array: DeepSpeed and FSDP jobs "
                    "launch differently; one array runs one shape; put variants that need a different one in a "
                    "separate job spec"]
    msgs = problems(full + "variants:\n  - name: z2\n    set: {deepspeed.zero_stage: 2}\n", tmp_path)
    assert len(msgs) == 1 and "deepspeed: DeepSpeed options apply only to engine: deepspeed" in msgs[0]
    spec = load_spec_text(full + "variants:\n  - name: keep\n    set: {fsdp.reshard_after_forward: false}\n", "v.yaml")
    (keep,) = resolve_variants(spec)
    assert keep.engine == "fsdp" and keep.fsdp.reshard_after_forward is False
