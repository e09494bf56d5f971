"""training.fp8: accepted for full fine-tuning with FSDP2 or ZeRO-0/1/2 in bf16, refused elsewhere with
a located one-line error that says what to do."""

from __future__ import annotations

import pytest

from ftcluster.errors import SpecError
from ftcluster.spec.loader import load_spec_text

BASE = """name: j
method: {method}
model: {{random_init: {{preset: tiny}}}}
data: {{train: x.jsonl, seq_len: 32}}
training:
  fp8: {fp8}
  precision: {precision}
{engine}
resources: {{gpus_per_node: 1}}
output: {{uri: file:///nowhere}}
"""


def spec(method="full", fp8="tensorwise", precision="bf16", engine="engine: fsdp"):
    return load_spec_text(BASE.format(method=method, fp8=fp8, precision=precision, engine=engine), "job.yaml")


@pytest.mark.parametrize("engine", ["engine: fsdp", "deepspeed: {zero_stage: 2}", "deepspeed: {zero_stage: 0}"])
@pytest.mark.parametrize("fp8", ["tensorwise", "rowwise"])
def test_fp8_is_accepted_for_full_fine_tuning(engine, fp8):
    assert spec(fp8=fp8, engine=engine).training.fp8 == fp8


def test_fp8_defaults_to_off():
    assert load_spec_text(BASE.format(method="full", fp8="null", precision="bf16", engine=""), "j.yaml").training.fp8 is None


@pytest.mark.parametrize("kw,line,words", [
    (dict(method="lora", engine=""), 6, "FP8 matmuls are for method: full"),
    (dict(engine="deepspeed: {zero_stage: 3}"), 6, "not with deepspeed.zero_stage 3"),
    (dict(precision="fp32"), 6, "needs precision bf16"),
    (dict(fp8="blockwise"), 6, "expected one of tensorwise, rowwise"),
])
def test_fp8_refusals_are_one_located_line(kw, line, words):
    with pytest.raises(SpecError) as err:
        spec(**kw)
    msg = str(err.value)
    assert msg.count("\n") == 0 and f"job.yaml:{line}:" in msg and "training.fp8" in msg and words in msg, msg


@pytest.mark.parametrize("tracking,words", [
    ("{mlflow: {experiment: x}}", "tracking.mlflow.uri"),
    ("{wandb: {project: x}}", "tracking.wandb: unknown field"),
    ("{tensorboard: {dirr: /tmp}}", "tracking.tensorboard.dirr: unknown field"),
])
def test_tracking_mistakes_are_one_located_line(tracking, words):
    text = BASE.format(method="full", fp8="null", precision="bf16", engine="") + f"tracking: {tracking}\n"
    with pytest.raises(SpecError) as err:
        load_spec_text(text, "job.yaml")
    msg = str(err.value)
    assert msg.count("\n") == 0 and "job.yaml:11:" in msg and words in msg, msg
