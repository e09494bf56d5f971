"""A ``deepspeed.config_file`` that disagrees with ``training:`` is refused at validate time, at the key's
line:column in the JSON file; before, the loop and DeepSpeed silently used different batches (or
precisions, clipping, learning rates).

World size here: 2 nodes x 4 GPUs = 8; the spec's global batch 2 x 4 x 8 = 64.
"""

from __future__ import annotations

import json
import textwrap

import pytest
from click.testing import CliRunner

from ftcluster import api
from ftcluster.cli import cli
from ftcluster.errors import SpecError
from ftcluster.plan.deepspeed import resolved_deepspeed_config
from ftcluster.spec.loader import load_spec

JOB = """\
name: demo
method: full
backend: slurm
model:
  random_init: {preset: tiny}
data:
  train: data.jsonl
  seq_len: 128
training:
  micro_batch_size: 2
  gradient_accumulation_steps: 4
%s
deepspeed:
  zero_stage: 2
  config_file: ds.json
resources:
  nodes: 2
  gpus_per_node: 4
output:
  uri: file:///tmp/ftc-out
"""


def job(tmp_path, ds: str, training: str = "") -> str:
    (tmp_path / "data.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (tmp_path / "ds.json").write_text(textwrap.dedent(ds))
    (tmp_path / "job.yaml").write_text(JOB % textwrap.indent(training, "  ").rstrip("\n"))
    return str(tmp_path / "job.yaml")


def refusal(tmp_path, ds: str, training: str = "") -> list[str]:
    with pytest.raises(SpecError) as info:
        api.validate(job(tmp_path, ds, training), plan_check=False)
    return str(info.value).splitlines()


@pytest.mark.parametrize("ds, training, where, says", [
    ('{\n  "train_micro_batch_size_per_gpu": 3\n}\n', "",
     "ds.json:2:3: train_micro_batch_size_per_gpu: 3 here, but training.micro_batch_size is 2", "make it 2"),
    ('{"zero_optimization": {"stage": 2},\n "gradient_accumulation_steps": 8}\n', "",
     "ds.json:2:2: gradient_accumulation_steps: 8 here, but training.gradient_accumulation_steps is 4", "make it 4"),
    ('{\n\t"train_batch_size": 32\n}\n', "",
     "ds.json:2:2: train_batch_size: 32 here, but training.micro_batch_size x training.gradient_accumulation_steps "
     "x world size (resources.nodes x processes per node) is 2 x 4 x 2 x 4 = 64", "make it 64"),
    ('{\n  "bf16": {\n    "enabled": false\n  }\n}\n', "",
     "ds.json:3:5: bf16.enabled: false here, but training.precision is bf16", "make it true"),
    ('{"fp16": {"enabled": true, "loss_scale": 0}}\n', "",
     "ds.json:1:11: fp16.enabled: true here, but training.precision is bf16", "make it false"),
    ('{"gradient_clipping": 0.5}\n', "max_grad_norm: 1.0\n",
     "ds.json:1:2: gradient_clipping: 0.5 here, but training.max_grad_norm is 1", "drop training.max_grad_norm"),
    ('{"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}\n', "learning_rate: 3.0e-5\n",
     "ds.json:1:44: optimizer.params.lr: 0.0001 here, but training.learning_rate is 3e-05", "make it 3e-05"),
    ('{"optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.95]}}}\n', "adam_beta2: 0.98\n",
     "ds.json:1:44: optimizer.params.betas: [0.9, 0.95] here, but [training.adam_beta1, training.adam_beta2] is "
     "[0.9, 0.98]", "drop training.adam_beta1/adam_beta2"),
    ('{"optimizer": {"type": "AdamW", "params": {"weight_decay": 0.1}}}\n', "weight_decay: 0.01\n",
     "ds.json:1:44: optimizer.params.weight_decay: 0.1 here, but training.weight_decay is 0.01", ""),
    ('{"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}}\n', "warmup_steps: 100\n",
     "ds.json:1:47: scheduler.params.warmup_num_steps: 10 here, but training.warmup_steps is 100", ""),
], ids=["micro_batch", "accumulation", "train_batch_size", "bf16", "fp16", "gradient_clipping", "lr", "betas",
        "weight_decay", "warmup"])
def test_a_disagreeing_key_is_refused_at_its_place(tmp_path, ds, training, where, says):
    (line,) = refusal(tmp_path, ds, training)
    assert line.startswith(str(tmp_path / where)), line
    assert says in line and "remove the key from this file" in line and '"auto"' in line


def test_every_disagreement_at_once(tmp_path):
    lines = refusal(tmp_path, '{"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, '
                              '"train_batch_size": 8}')
    assert [ln.split(": ")[1] for ln in lines] == ["train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                                  "train_batch_size"]


def test_the_cli_prints_one_line_and_exits_2(tmp_path):
    path = job(tmp_path, '{"train_micro_batch_size_per_gpu": 3}')
    res = CliRunner().invoke(cli, ["validate", "--no-plan-check", path])
    assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
    assert "ds.json:1:2: train_micro_batch_size_per_gpu: 3 here" in res.output


def test_render_refuses_too(tmp_path):
    spec = load_spec(job(tmp_path, '{"gradient_accumulation_steps": 2}'))
    with pytest.raises(SpecError, match="gradient_accumulation_steps: 2 here"):
        api.render(spec, "slurm")


def test_agreeing_and_auto_values_pass_and_auto_takes_the_spec(tmp_path):
    ds = json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 4,
                     "train_batch_size": 64, "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
                     "fp16": {"enabled": False},
                     "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto"},
                     "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "weight_decay": "auto"}},
                     "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto", "warmup_max_lr": "auto"}}})
    spec = api.validate(job(tmp_path, ds, "learning_rate: 3.0e-5\nwarmup_steps: 7\n"), plan_check=False)
    cfg = resolved_deepspeed_config(spec)
    assert cfg is not None and "auto" not in json.dumps(cfg)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == (2, 4, 64)
    assert cfg["gradient_clipping"] == 1.0 and cfg["bf16"] == {"enabled": True}
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["zero_optimization"]["reduce_bucket_size"] == 500_000_000
    assert cfg["optimizer"]["params"] == {"lr": 3e-5, "betas": [0.9, 0.999], "weight_decay": 0.0}
    assert cfg["scheduler"]["params"] == {"warmup_num_steps": 7, "warmup_max_lr": 3e-5}


def test_a_section_the_spec_does_not_set_is_the_files(tmp_path):
    """gradient_clipping and the optimizer's numbers replace the spec's defaults: nothing is ignored silently."""
    ds = '{"gradient_clipping": 0.3, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}'
    cfg = resolved_deepspeed_config(api.validate(job(tmp_path, ds), plan_check=False))
    assert cfg is not None and cfg["gradient_clipping"] == 0.3 and cfg["optimizer"]["params"]["lr"] == 1e-4


def test_auto_where_ftcluster_has_no_value_is_refused(tmp_path):
    (line,) = refusal(tmp_path, '{"zero_optimization": {"stage": 3, "stage3_max_live_parameters": "auto"}}')
    assert line.startswith(str(tmp_path / "ds.json:1:36: zero_optimization.stage3_max_live_parameters: \"auto\""))
    assert "give a value" in line


def test_a_variant_that_changes_the_batch_is_checked(tmp_path):
    path = job(tmp_path, '{"train_micro_batch_size_per_gpu": 2}')
    text = (tmp_path / "job.yaml").read_text() + "variants:\n  - {name: mb4, set: {training.micro_batch_size: 4}}\n"
    (tmp_path / "job.yaml").write_text(text)
    with pytest.raises(SpecError) as info:
        api.validate(path, plan_check=False)
    assert "train_micro_batch_size_per_gpu: 2 here, but training.micro_batch_size is 4" in str(info.value)


def test_a_pipeline_stage_is_checked_with_its_own_values(tmp_path):
    job(tmp_path, '{"gradient_accumulation_steps": 4}')  # agrees with job.yaml; the stage's `set` changes it
    (tmp_path / "pipe.yaml").write_text("pipeline: p\nstages:\n  - name: full\n    spec: job.yaml\n"
                                        "    set: {training.gradient_accumulation_steps: 2}\n")
    with pytest.raises(SpecError) as info:
        api.validate(str(tmp_path / "pipe.yaml"), plan_check=False)
    assert "gradient_accumulation_steps: 4 here, but training.gradient_accumulation_steps is 2" in str(info.value)
