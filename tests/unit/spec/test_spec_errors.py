"""Every kind of bad input gives located, fixable, one-line problems (all at once)."""

from __future__ import annotations

import textwrap

import pytest

from ftcluster.errors import SpecError
from ftcluster.spec.loader import load_spec, load_spec_text
from tests.support.specs import TINY_LORA

GOOD = TINY_LORA  # tests/support/specs.py


def problems(text: str, tmp_path, name: str = "job.yaml", overrides=None) -> list[str]:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    with pytest.raises(SpecError) as info:
        load_spec(p, overrides)
    lines = str(info.value).splitlines()
    assert lines == [str(x) for x in info.value.problems]
    return lines


def test_good_spec_loads():
    spec = load_spec_text(GOOD, "good.yaml")
    assert spec.method == "lora" and spec.lora.r == 16 and spec.world_size == 1


def test_empty_file(tmp_path):
    (msg,) = problems("# only a comment\n", tmp_path)
    assert msg.startswith(f"{tmp_path}/job.yaml:") and "empty" in msg


def test_non_utf8(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_bytes(b"name: demo\nmethod: lora\ndescription: caf\xe9\n")
    with pytest.raises(SpecError) as info:
        load_spec(p)
    assert "job.yaml:3:" in str(info.value) and "UTF-8" in str(info.value)


def test_not_a_mapping(tmp_path):
    (msg,) = problems("- a\n- b\n", tmp_path)
    assert ":1:1:" in msg and "mapping" in msg and "list" in msg


def test_duplicate_key(tmp_path):
    (msg,) = problems(GOOD + "name: again\n", tmp_path)
    assert "duplicate key 'name'" in msg and "job.yaml:10:" in msg


def test_bad_yaml_syntax(tmp_path):
    (msg,) = problems("name: demo\nmodel: [unclosed\n", tmp_path)
    assert "invalid YAML" in msg and "job.yaml:" in msg


def test_two_typos_reported_at_once_with_did_you_mean(tmp_path):
    text = GOOD.replace("  seq_len: 128", "  seq_len: 128\n  pakcing: false").replace(
        "output:", "trainig:\n  max_steps: 3\noutput:")
    msgs = problems(text, tmp_path)
    assert len(msgs) == 2
    assert "job.yaml:8:3: data.pakcing: unknown field 'pakcing'; did you mean 'packing'?" in msgs[0]
    assert "job.yaml:9:1: trainig: unknown field 'trainig'; did you mean 'training'?" in msgs[1]


def test_wrong_type_and_out_of_range(tmp_path):
    text = GOOD + "training:\n  micro_batch_size: lots\n  learning_rate: -0.1\n"
    msgs = problems(text, tmp_path)
    assert any("training.micro_batch_size: expected an integer, e.g. 1 (got 'lots')" in m for m in msgs)
    assert any(":12:3: training.learning_rate" in m and "greater than 0" in m and "-0.1" in m for m in msgs)


@pytest.mark.parametrize("section, line, expected", [
    ("training", "micro_batch_size: eight", "training.micro_batch_size: expected an integer, e.g. 1 (got 'eight')"),
    ("training", "max_steps: ten", "training.max_steps: expected an integer, e.g. 8 (got 'ten')"),
    ("training", "learning_rate: fast", "training.learning_rate: expected a number, e.g. 0.0002 (got 'fast')"),
    ("data", "general_eval: [a]", "data.general_eval: expected text"),
    ("resources", "nodes: 1.5", "resources.nodes: expected a whole number, e.g. 1 (got 1.5)"),
    ("data", "packing: maybe", "data.packing: expected true or false (got 'maybe')"),
    ("data", "fields: oops", "data.fields: expected a mapping: indented `key: value` lines with fields such as input"),
    ("model", "attn_implementation: spda",
     "model.attn_implementation: expected one of sdpa, eager, flash_attention_2 (got 'spda'); did you mean 'sdpa'?"),
    ("lora", "target_modules: 7", "lora.target_modules: expected one of all-linear or a list, e.g. [a, b]"),
    ("slurm", "partition: 5", 'slurm.partition: expected text; quote it, e.g. "5" (got 5)'),
    ("slurm", "modules: lmod", "slurm.modules: expected a list, e.g. [a, b]"),
])
def test_type_errors_carry_a_fix_with_an_example(tmp_path, section, line, expected):
    text = GOOD + f"{section}:\n  {line}\n" if section not in ("model", "data") else GOOD.replace(
        f"{section}:\n", f"{section}:\n  {line}\n", 1)
    (msg,) = problems(text, tmp_path)
    assert expected in msg, msg


def test_method_missing_and_invalid(tmp_path):
    (msg,) = problems(GOOD.replace("method: lora\n", ""), tmp_path)
    assert "method" in msg and "lora" in msg and "full" in msg
    (msg,) = problems(GOOD.replace("method: lora", "method: qlora"), tmp_path)
    assert "job.yaml:2:1: method: must be 'lora' or 'full' (got 'qlora')" == msg.split(f"{tmp_path}/")[1]


def test_lora_options_on_full_and_zero_on_lora(tmp_path):
    (msg,) = problems(GOOD.replace("method: lora", "method: full") + "lora:\n  r: 8\n", tmp_path)
    assert "lora:" in msg and "only to method: lora" in msg
    (msg,) = problems(GOOD + "deepspeed:\n  zero_stage: 3\n", tmp_path)
    assert "deepspeed" in msg and "only to method: full" in msg and ":10:1:" in msg


def test_invalid_combinations(tmp_path):
    text = GOOD.replace("method: lora", "method: full") + "deepspeed:\n  zero_stage: 2\n  offload_params: cpu\n"
    (msg,) = problems(text, tmp_path)
    assert "deepspeed.offload_params" in msg and "zero_stage: 3" in msg and ":12:3:" in msg
    (msg,) = problems(GOOD.replace("  random_init: {preset: tiny}", "  random_init: {preset: tiny}\n  hub_id: x/y"), tmp_path)
    assert "exactly one of model.path, model.hub_id or model.random_init" in msg
    (msg,) = problems(GOOD.replace("seq_len: 128", "seq_len: 4096"), tmp_path)
    assert "data.seq_len" in msg and "max_position_embeddings" in msg


def test_name_must_be_dns1035(tmp_path):
    (msg,) = problems(GOOD.replace("name: demo", "name: My_Job"), tmp_path)
    assert "job.yaml:1:1: name:" in msg and "'my-job'" in msg


def test_secrets_rejected(tmp_path):
    text = GOOD + "env:\n  AWS_SECRET_ACCESS_KEY: abc123\n"
    (msg,) = problems(text, tmp_path)
    assert "env.AWS_SECRET_ACCESS_KEY" in msg and "secret" in msg and "abc123" not in msg
    text = GOOD.replace("  uri: file:///tmp/ftc-out", "  uri: s3://b/p\n  storage_options:\n    secret: abc123")
    (msg,) = problems(text, tmp_path)
    assert "output.storage_options.secret" in msg and "abc123" not in msg


def test_overrides_apply_and_are_located(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text(GOOD)
    spec = load_spec(p, ["training.max_steps=7", "lora.target_modules=[q_proj, v_proj]"])
    assert spec.training.max_steps == 7 and spec.lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(SpecError) as info:
        load_spec(p, ["training.max_steps=-3"])
    assert str(info.value).startswith("--set: training.max_steps: Input should be greater than 0")
    with pytest.raises(SpecError) as info:
        load_spec(p, ["nonsense"])
    assert "KEY.PATH=VALUE" in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "nope.yaml")
    assert "nope.yaml: no such file" in str(info.value)


def test_missing_required_sections(tmp_path):
    msgs = problems("name: demo\nmethod: full\n", tmp_path)
    assert {m.split(": ")[1] for m in msgs} >= {"model", "data", "output"}
    assert all("required field is missing" in m for m in msgs)


def test_list_item_location(tmp_path):
    text = GOOD.replace("output:", "kubernetes:\n  tolerations:\n    - {key: a, operator: Sometimes}\noutput:")
    (msg,) = problems(text, tmp_path)
    assert "kubernetes.tolerations[0].operator" in msg and ":10:" in msg


@pytest.mark.parametrize("value, expected", [
    ("1.5", "training.gradient_checkpointing: 1.5 is not a share of the layers: use true, false or a number from 0 to 1"),
    ("-0.25", "training.gradient_checkpointing: -0.25 is not a share of the layers: use true, false or a number from 0 to 1"),
])
def test_checkpointing_share_outside_0_to_1_is_one_located_line(tmp_path, value, expected):
    (msg,) = problems(GOOD + f"training:\n  gradient_checkpointing: {value}\n", tmp_path)
    line = len(textwrap.dedent(GOOD).splitlines()) + 2
    assert msg.split(f"{tmp_path}/")[1] == f"job.yaml:{line}:3: {expected}", msg


def test_the_continual_pretraining_options_refuse_wrong_values_in_one_located_line(tmp_path):
    """data.prepare, data.streaming, tokenizer.add_special_tokens and lora.modules_to_save (#20): each wrong
    value is one problem at its own line and field, saying what is accepted."""
    text = GOOD.replace("  seq_len: 128\n", "  seq_len: 128\n  format: text\n"
                        "  prepare: {source: raw, shard_tokens: 10, tasks: 0, file_format: csv}\n"
                        "  streaming: maybe\n")
    text += "tokenizer: {add_special_tokens: case}\nlora: {modules_to_save: embed_tokens}\n"
    msgs = problems(text, tmp_path)
    path = f"{tmp_path}/job.yaml"
    assert len(msgs) == 6, msgs
    expect = {"data.prepare.shard_tokens": (":9:", "greater than or equal to 1024"),
              "data.prepare.tasks": (":9:", "greater than or equal to 1"),
              "data.prepare.file_format": (":9:", "expected one of auto, jsonl, parquet, text (got 'csv')"),
              "data.streaming": (":10:", "expected true or false (got 'maybe')"),
              "tokenizer.add_special_tokens": (":13:", "expected a list, e.g. [a, b] or one `- item` line per item"),
              "lora.modules_to_save": (":14:", "expected a list, e.g. [a, b] or one `- item` line per item")}
    for field, (line, says) in expect.items():
        (msg,) = [m for m in msgs if f" {field}: " in m]
        assert msg.startswith(path + line) and says in msg, msg
    (msg,) = problems(GOOD.replace("  seq_len: 128\n", "  seq_len: 128\n  prepare: {source: raw}\n"), tmp_path)
    assert msg.startswith(f"{path}:") and "a prepared (streamed) corpus is plain text" in msg \
        and "set data.format: text" in msg


FULL = GOOD.replace("method: lora", "method: full")


def test_engine_sections_of_the_other_engine_are_one_located_line(tmp_path):
    """engine: fsdp with a deepspeed section (or the default engine with an fsdp section) is refused at
    the section's line, naming both ways out; the section of the engine in use loads."""
    (msg,) = problems(FULL + "engine: fsdp\ndeepspeed:\n  zero_stage: 2\n", tmp_path)
    assert msg.split(f"{tmp_path}/")[1] == ("job.yaml:11:1: deepspeed: DeepSpeed options apply only to engine: "
                                            "deepspeed; remove the `deepspeed` section or set engine: deepspeed")
    (msg,) = problems(FULL + "fsdp:\n  cpu_offload: true\n", tmp_path)
    assert msg.split(f"{tmp_path}/")[1] == ("job.yaml:10:1: fsdp: FSDP options apply only to engine: fsdp; "
                                            "remove the `fsdp` section or set engine: fsdp")
    (msg,) = problems(FULL + "engine: fsdp\n", tmp_path, overrides=["deepspeed.zero_stage=2"])
    assert msg == "--set: deepspeed: DeepSpeed options apply only to engine: deepspeed; remove the `deepspeed` " \
                  "section or set engine: deepspeed"
    (msg,) = problems(FULL + "engine: fsdp2\n", tmp_path)
    assert ":10:1: engine: expected one of deepspeed, fsdp (got 'fsdp2'); did you mean 'fsdp'?" in msg
    (msg,) = problems(GOOD + "engine: fsdp\n", tmp_path)
    assert ":10:1: engine:" in msg and "set method: full" in msg
    (msg,) = problems(FULL + "engine: fsdp\nfsdp:\n  reshard: false\n", tmp_path)
    assert ":12:3: fsdp.reshard: unknown field 'reshard'; valid fields: cpu_offload, reshard_after_forward" in msg
    (msg,) = problems(FULL + "engine: fsdp\nfsdp:\n  cpu_offload: sometimes\n", tmp_path)
    assert msg.endswith("job.yaml:12:3: fsdp.cpu_offload: expected true or false (got 'sometimes')"), msg
    spec = load_spec_text(FULL + "engine: fsdp\nfsdp:\n  reshard_after_forward: false\ntraining: {compile: true}\n",
                          "ok.yaml")
    assert spec.engine == "fsdp" and not spec.fsdp.reshard_after_forward and spec.training.compile
    assert load_spec_text(FULL + "deepspeed: {zero_stage: 2}\n", "ok.yaml").engine == "deepspeed"
