"""The planner on first use (issue 19): an unknown GPU type is said so (and its memory can be given),
the out-of-memory refusal is `ftcluster plan`'s recommendation as `--set` flags at a field the spec
has, and the doctor and the shipped examples follow the planner's cost."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ftcluster import api
from ftcluster.errors import SpecError
from ftcluster.plan.planner import build_plan, check_spec, doctor_checks
from ftcluster.plan.planner.advise import stage_specs
from ftcluster.spec.loader import load_spec
from ftcluster.spec.yamlio import load_file

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples"
DATA = EXAMPLES / "data" / "instruct.jsonl"
NOT_THE_PLANNERS = "# Not the planner's layout:"  # how an example says why it does not follow the planner


def ftc(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftcluster.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _job(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    f = tmp_path / name
    f.write_text(textwrap.dedent(text).replace("DATA", str(DATA)).replace("OUT", str(tmp_path / "out")))
    return f


# 8B full fine-tune of instruction data; no gradient_checkpointing field and no deepspeed section
FULL_8B = """\
    name: full8b
    method: full
    backend: local
    model:
      random_init: {preset: llama-3-8b}
    data: {train: DATA, format: instruction, seq_len: 2048}
    training:
      micro_batch_size: 4
      max_steps: 100
    resources:
      gpus_per_node: 1
      gpu_type: GPU
    output: {uri: OUT}
    """


# ----------------------------------------------------------------------------- 4: unknown GPU types


def test_an_unknown_gpu_type_is_one_located_warning_line(tmp_path):
    f = _job(tmp_path, FULL_8B.replace("GPU", "rtx4090"))
    res = ftc("validate", str(f), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"warning: {f}:12:3: resources.gpu_type: 'rtx4090' is not in the planner's GPU table, "
                               "so the memory check was skipped; set resources.gpu_memory_gb"), lines[0]
    sub = ftc("submit", str(f), "--dry-run", cwd=tmp_path)
    assert sub.returncode == 0 and sub.stderr.startswith("warning: ") and sub.stderr.count("\n") == 1, sub.stderr
    warnings = api.check_plan(load_spec(f))
    assert [w.field for w in warnings] == ["resources.gpu_type"]
    with pytest.warns(UserWarning, match="rtx4090"):
        api.validate(f)


def test_the_gpus_memory_can_be_given_and_the_check_runs(tmp_path):
    f = _job(tmp_path, FULL_8B.replace("GPU", "rtx4090").replace("    resources:\n", "    resources:\n      gpu_memory_gb: 24\n"))
    with pytest.raises(SpecError, match=r"needs .* but a rtx4090 has 2\d\.\d GiB usable"):
        api.validate(f)
    assert ftc("validate", str(f), "--set", "resources.gpu_memory_gb=1000", cwd=tmp_path).returncode == 0
    bad = ftc("validate", str(f), "--set", "resources.gpu_memory_gb=-1", cwd=tmp_path)
    assert bad.returncode == 2 and "resources.gpu_memory_gb" in bad.stderr, bad.stderr
    # a known type's memory can be given too (a smaller slice), and wins over the table
    g = _job(tmp_path, FULL_8B.replace("GPU", "h200").replace("micro_batch_size: 4", "micro_batch_size: 1")
             .replace("method: full", "method: lora"), "small.yaml")
    api.validate(g)
    with pytest.raises(SpecError, match="a h200 has 9.7 GiB usable"):
        api.validate(g, ["resources.gpu_memory_gb=12"])


# ----------------------------------------------------------------------------- 5: one answer, as --set flags


CASES = {
    # the spec has every field the answer changes (ZeRO stage, micro-batch, checkpointing)
    "flagship-on-one-l4": (EXAMPLES / "full-slurm-2node.yaml", ["resources.nodes=1", "resources.gpus_per_node=1",
                                                               "resources.gpu_type=l4"]),
    # no gradient_checkpointing, no deepspeed section; instruction data: plan recommends LoRA
    "full-8b-on-l4": (None, []),
    # no gpu_type: checked against the largest GPU, answered as `ftcluster plan` answers (h100 assumed)
    "lora-8b-no-gpu-type": (None, ["method=lora", "data.seq_len=8192", "training.micro_batch_size=16"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_refusal_is_plans_recommendation_as_flags_that_pass(case, tmp_path):
    path, sets = CASES[case]
    if path is None:
        text = FULL_8B.replace("GPU", "l4") if case == "full-8b-on-l4" else \
            FULL_8B.replace("      gpu_type: GPU\n", "")
        path = _job(tmp_path, text)
    spec = api.load(path, sets)
    problems = check_spec(spec)
    assert len(problems) == 1
    p = problems[0]
    rec = build_plan(spec, network=False).recommendation
    assert rec is not None
    assert f"`ftcluster plan` recommends {rec.layout.describe()} (" in p.message, p.message
    # located at a field the spec has (or --set), or at the section when it has none
    if p.file != "--set":
        doc = load_file(path)
        assert tuple(p.field.split(".")) in doc.locations, p
        assert (p.line, p.column) == doc.locations[tuple(p.field.split("."))]
    flags = re.findall(r"--set (\S+)", p.message)
    assert flags and "--no-plan-check" in p.message
    assert re.findall(r"--set (\S+)", build_plan(spec, network=False).change) == flags  # what `plan` prints
    api.validate(path, [*sets, *flags])  # pasted, they pass


def test_a_missing_field_is_named_by_its_section(tmp_path):
    """No training.gradient_checkpointing in the file: the line names `training`, not the absent field."""
    f = _job(tmp_path, FULL_8B.replace("GPU", "l4").replace("micro_batch_size: 4", "micro_batch_size: 1"))
    spec = load_spec(f)
    (p,) = check_spec(spec)
    assert "gradient_checkpointing" not in p.field
    assert tuple(p.field.split(".")) in load_file(f).locations


# ----------------------------------------------------------------------------- 8: cost against the recommendation


def test_the_doctor_warns_when_the_spec_costs_more_than_twice_its_recommendation():
    spec = load_spec(EXAMPLES / "full-slurm-2node.yaml")
    rows = {name: (status, detail, fix) for name, status, detail, fix in doctor_checks(spec)}
    status, detail, fix = rows["plan: recommendation"]
    ratio = float(re.search(r"costs (\d+\.\d)x the recommendation", detail).group(1))
    plan = build_plan(spec, network=False)
    assert status == "warn" and ratio > 2 and ratio == round(_ratio(plan.requested, plan.recommendation), 1), detail
    flags = re.findall(r"--set (\S+)", fix)
    assert "deepspeed.zero_stage=2" in flags
    followed = api.load(EXAMPLES / "full-slurm-2node.yaml", flags)
    rows = {name: status for name, status, _, _ in doctor_checks(followed)}
    assert rows == {"plan: memory": "ok", "plan: recommendation": "ok"}
    lora = {name: status for name, status, _, _ in doctor_checks(load_spec(EXAMPLES / "lora-slurm.yaml"))}
    assert lora["plan: recommendation"] == "ok"  # 1.6x: within 2x


def _ratio(spec_option, rec) -> float:
    """The spec's layout's cost over the recommendation's: per run when both know their steps, else per token."""
    if spec_option.cost_usd is not None and rec.cost_usd:
        return spec_option.cost_usd / rec.cost_usd
    return spec_option.usd_per_million_tokens / rec.usd_per_million_tokens


def test_every_example_follows_the_planner_or_says_why():
    for f in sorted(EXAMPLES.glob("*.yaml")):
        shapes = stage_specs(api.load(f))
        for spec, shape in shapes:
            p = build_plan(spec, network=False, shape=shape)
            ratio = _ratio(p.requested, p.recommendation) if p.recommendation is not None else None
            if ratio is not None and ratio > 2:
                source = Path(ROOT / spec._source_file) if not Path(spec._source_file).is_absolute() \
                    else Path(spec._source_file)
                assert NOT_THE_PLANNERS in source.read_text(encoding="utf-8"), \
                    f"{f.name}: {spec.name} costs {ratio:.1f}x the planner's recommendation and does not say why"
