"""The planner counts the rows tokenizer.add_tokens adds (#20, section 3): the vocabulary grows to
base + added rounded up to 64 (the runtime's train.model.fit_embeddings), and LoRA trains only the
new rows (peft trainable_token_indices) unless modules_to_save names the matrix. From the spec
alone: no tokenizer is loaded and no torch is imported."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from ftcluster.plan.planner import build_plan
from ftcluster.plan.planner.report import plan_dict
from ftcluster.plan.planner.shape import ModelShape, count_lora
from ftcluster.plan.planner.shape import spec_shape as maybe_shape
from ftcluster.spec.loader import load_spec, load_spec_text

ROOT = Path(__file__).resolve().parents[3]
TERMS = [f"term{i}" for i in range(50)]


def spec_shape(spec) -> ModelShape:
    shape = maybe_shape(spec)
    assert shape is not None
    return shape


def spec(tokenizer: str = "{}", lora: str = "{r: 16}", tie: bool = False):
    return load_spec_text(textwrap.dedent(f"""\
        name: p
        method: lora
        model: {{random_init: {{preset: llama-3-8b, tie_word_embeddings: {str(tie).lower()}}}}}
        tokenizer: {tokenizer}
        data: {{train: x.jsonl, seq_len: 2048}}
        training: {{max_steps: 10}}
        lora: {lora}
        resources: {{gpus_per_node: 1, gpu_type: h100}}
        output: {{uri: file:///tmp/o}}
        """))


def test_the_vocabulary_grows_by_the_added_tokens_rounded_up_to_64():
    assert spec_shape(spec()).vocab_size == 128256
    grown = spec_shape(spec(f"{{add_tokens: {json.dumps(TERMS)}, add_special_tokens: ['<|case|>']}}"))
    assert grown.vocab_size == 128320  # 128256 + 51 -> 128307, rounded up to a multiple of 64
    assert any("51 added tokens" in n for n in grown.notes)


def test_lora_trains_the_new_rows_of_both_matrices_or_the_whole_matrix_in_modules_to_save():
    added = f"{{add_tokens: {json.dumps(TERMS)}}}"
    plain, grown = build_plan(spec(), network=False), build_plan(spec(added), network=False)
    assert grown.requested.params_trainable - plain.requested.params_trainable == 2 * 50 * 4096
    tied = build_plan(spec(added, tie=True), network=False).requested.params_trainable
    assert tied - build_plan(spec(tie=True), network=False).requested.params_trainable == 50 * 4096
    shape = spec_shape(spec(added))
    c = count_lora(shape, 16, "all-linear", ("embed_tokens",), 50)
    assert c.token_rows == 50 * 4096 and c.saved_copies == shape.vocab_size * 4096  # lm_head rows only
    assert count_lora(shape, 16, ["q_proj", "lm_head"], (), 50).token_rows == 50 * 4096  # lm_head: its LoRA
    saved = build_plan(spec(added, "{r: 16, modules_to_save: [embed_tokens, lm_head]}"), network=False)
    assert saved.requested.params_trainable - grown.requested.params_trainable == 2 * 128320 * 4096 - 2 * 50 * 4096
    assert plan_dict(grown)["model"]["vocab_size"] == 128320


def test_a_terms_file_is_counted_without_loading_a_tokenizer(tmp_path):
    (tmp_path / "terms.txt").write_text("# terms\n" + "\n".join(TERMS[:10]) + "\n\n")
    (tmp_path / "job.yaml").write_text(textwrap.dedent("""\
        name: p
        method: lora
        model: {random_init: {preset: llama-3-8b}}
        tokenizer: {add_tokens: terms.txt}
        data: {train: x.jsonl, seq_len: 2048}
        resources: {gpus_per_node: 1, gpu_type: h100}
        output: {uri: file:///tmp/o}
        """))
    code = ("import sys; from ftcluster.spec.loader import load_spec; from ftcluster.plan.planner.shape import "
            "spec_shape; print(spec_shape(load_spec(sys.argv[1])).vocab_size, 'torch' in sys.modules, "
            "'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "job.yaml")], cwd=ROOT, capture_output=True,
                         text=True, check=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.stdout.split() == ["128320", "False", "False"]  # 128256 + 10 -> 128266 -> 128320
    assert spec_shape(load_spec(tmp_path / "job.yaml")).vocab_size == 128320
