"""``ftcluster.artifacts.serving``: will an adapter folder load in vLLM / LoRAX, and the finding's wording.

Real adapter folders are saved by peft from a tiny random Llama on CPU (as ftcluster's LoRA engine saves
them: safetensors, save_embedding_layers=False), beside an ``ftcluster_meta.json``; a few rank rules use
a hand-written config. The rules themselves cite vLLM v0.34.0 and LoRAX a7394ba (see the module).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from ftcluster.artifacts.serving import (
    AdapterCheckError,
    check_adapter,
    check_adapter_uri,
    read_safetensors_header,
)

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

pytestmark = pytest.mark.train
ADDED = ["habeas corpus", "res judicata"]
MERGE = "serve its merged model instead (ftcluster merge ADAPTER -o URI)"


def save_adapter(folder: Path, added: list[str] | None = None, **lora: Any) -> Path:
    """A peft LoRA of a 2-layer Llama (vocab 128) saved like ftcluster saves one, with its metadata."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=128,
                                         tie_word_embeddings=False))
    args: dict[str, Any] = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "task_type": "CAUSAL_LM", **lora}
    get_peft_model(model, LoraConfig(**args)).save_pretrained(str(folder), safe_serialization=True,
                                                               save_embedding_layers=False)
    base = 128 - len(added or [])
    meta = {"training": {"method": "lora"}, "tokenizer": {"vocab": 128, "base_vocab": base, "added": added or [],
                                                          "sha256": "0" * 64}}
    (folder / "ftcluster_meta.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    rows = {"embed_tokens": [126, 127], "lm_head": [126, 127]}
    kinds: dict[str, dict[str, Any]] = {
        "plain": {}, "r128": {"r": 128}, "rslora": {"use_rslora": True}, "lm_head": {"modules_to_save": ["lm_head"]},
        "tokens": {"trainable_token_indices": rows, "added": ADDED}, "dora": {"use_dora": True},
        "bias": {"bias": "lora_only"}, "embed": {"target_modules": ["q_proj", "v_proj", "embed_tokens"]},
    }
    return {name: save_adapter(root / name, **kw) for name, kw in kinds.items()}


def only(verdict, severity: str = "error"):
    assert len(verdict.findings) == 1, verdict.lines()
    (finding,) = verdict.findings
    assert finding.severity == severity
    return finding


@pytest.mark.parametrize("engine", ["vllm", "lorax"])
@pytest.mark.parametrize("name", ["plain", "rslora"])
def test_a_plain_all_linear_adapter_loads_without_a_flag(adapters, name, engine):
    verdict = check_adapter_uri(str(adapters[name]), engine)
    assert verdict.findings == () and verdict.loads and verdict.flags == ()
    assert verdict.lines() == [f"{engine}: loads"]


def test_rank_128_needs_vllm_max_lora_rank_128(adapters):
    verdict = check_adapter_uri(str(adapters["r128"]), "vllm")
    finding = only(verdict, "warning")
    assert finding.reason == "LoRA rank 128 is greater than vLLM's default max_lora_rank 16"
    assert finding.action == "start vLLM with --max-lora-rank 128"
    assert verdict.loads and verdict.flags == ("--max-lora-rank", "128")
    assert verdict.lines()[0] == "vllm: loads with --max-lora-rank 128"
    assert finding.source.endswith("vllm/lora/peft_helper.py#L200-L205")


def test_rank_above_a_known_server_setting_is_an_error_and_fits_at_it(adapters):
    finding = only(check_adapter_uri(str(adapters["r128"]), "vllm", max_lora_rank=64))
    assert finding.reason == "LoRA rank 128 is greater than max_lora_rank 64"
    assert finding.action == "start vLLM with --max-lora-rank 128"
    assert check_adapter_uri(str(adapters["r128"]), "vllm", max_lora_rank=128).findings == ()
    assert check_adapter_uri(str(adapters["r128"]), "lorax").findings == ()  # LoRAX has no rank cap


@pytest.mark.parametrize(("rank", "pattern", "flag"), [(24, {}, "32"), (8, {"q_proj": 300}, "320")])
def test_the_flag_is_the_next_rank_vllm_accepts_rank_pattern_included(rank, pattern, flag):
    config = {"r": rank, "lora_alpha": 16, "target_modules": ["q_proj"], "rank_pattern": pattern}
    assert check_adapter(config, {}, "vllm").flags == ("--max-lora-rank", flag)


def test_a_rank_above_512_cannot_be_served_by_vllm():
    finding = only(check_adapter({"r": 1024, "lora_alpha": 16, "target_modules": ["q_proj"]}, {}, "vllm"))
    assert finding.reason == "LoRA rank 1024 is greater than vLLM's largest --max-lora-rank 512"
    assert finding.action == f"retrain with lora.r <= 512, or {MERGE}"


def test_modules_to_save_lm_head_is_refused_by_vllm_and_dropped_by_lorax(adapters):
    vllm = only(check_adapter_uri(str(adapters["lm_head"]), "vllm"))
    assert vllm.reason == ("vLLM only supports modules_to_save being None or classifier/score; "
                           "this adapter trains lm_head in full")
    assert vllm.action == f"retrain without lora.modules_to_save, or {MERGE}"
    lorax = only(check_adapter_uri(str(adapters["lm_head"]), "lorax"))
    assert lorax.reason == ("modules_to_save lm_head trained in full: LoRAX drops them as unused adapter weights "
                            "and serves a different model than trained (issue #231)")


def test_added_tokens_are_named_from_the_metadata_for_both_engines(adapters):
    vllm = only(check_adapter_uri(str(adapters["tokens"]), "vllm"))
    assert vllm.reason == ("vLLM serves every adapter with the base model's tokenizer and embeddings and cannot "
                           "read trainable_tokens_delta (issue #36501); this adapter was trained with 2 added "
                           "token(s): habeas corpus, res judicata")
    assert vllm.action == f"{MERGE}, or retrain without tokenizer.add_tokens"
    lorax = only(check_adapter_uri(str(adapters["tokens"]), "lorax"))
    assert lorax.reason.startswith("this adapter was trained with 2 added token(s) (habeas corpus, res judicata); "
                                   "LoRAX tokenizes with the adapter's tokenizer")


def test_token_rows_without_metadata_are_still_found_from_the_tensors(adapters, tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).write_bytes((adapters["tokens"] / name).read_bytes())
    config = json.loads((folder / "adapter_config.json").read_text())
    config["trainable_token_indices"] = None  # only the trainable_tokens_delta tensors are left
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert "1 added token(s): (token rows)" in only(check_adapter_uri(str(folder), "vllm")).reason


def test_dora_is_refused_by_vllm_and_its_magnitudes_dropped_by_lorax(adapters):
    assert only(check_adapter_uri(str(adapters["dora"]), "vllm")).reason == "vLLM does not yet support DoRA (use_dora)"
    assert only(check_adapter_uri(str(adapters["dora"]), "lorax")).reason.startswith("DoRA magnitude vectors")


def test_bias_is_refused_by_vllm_only(adapters):
    finding = only(check_adapter_uri(str(adapters["bias"]), "vllm"))
    assert finding.reason == "vLLM does not support adapter bias (bias='lora_only')"
    assert check_adapter_uri(str(adapters["bias"]), "lorax").findings == ()  # Llama has no bias to drop


def test_an_embedding_lora_loads_in_vllm_but_not_in_lorax(adapters):
    assert check_adapter_uri(str(adapters["embed"]), "vllm").findings == ()
    finding = only(check_adapter_uri(str(adapters["embed"]), "lorax"))
    assert finding.reason.startswith("LoRA on embed_tokens, which are not LoRAX adapter layers")


def test_a_module_outside_the_model_is_unexpected_for_vllm():
    tensors = {"base_model.model.model.layers.0.mlp.fc9.lora_A.weight": (8, 32)}
    finding = only(check_adapter({"r": 8, "lora_alpha": 16, "target_modules": ["fc9"]}, tensors, "vllm"))
    assert finding.reason.endswith("but received fc9")


def test_missing_required_fields_are_reported_first():
    finding = only(check_adapter({"r": 8, "use_dora": True}, {}, "vllm"))
    assert finding.reason == "adapter_config.json lacks lora_alpha, target_modules, which vLLM requires"


def test_the_header_is_read_without_the_tensor_data(adapters, tmp_path):
    from fsspec.implementations.local import LocalFileSystem
    from safetensors import safe_open

    path = adapters["plain"] / "adapter_model.safetensors"
    with safe_open(str(path), "pt") as f:
        expected = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    assert read_safetensors_header(LocalFileSystem(), str(path)) == expected
    (size,) = struct.unpack("<Q", path.read_bytes()[:8])
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[: 8 + size])  # the header alone: no tensor bytes at all
    assert read_safetensors_header(LocalFileSystem(), str(cut)) == expected


def test_a_folder_that_is_not_an_adapter_or_a_bad_argument_is_one_line(tmp_path):
    with pytest.raises(AdapterCheckError, match=r"no adapter_config.json; is this an adapter folder\?$"):
        check_adapter_uri(str(tmp_path), "vllm")
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(AdapterCheckError, match="not a safetensors file"):
        check_adapter_uri(str(tmp_path), "vllm")
    with pytest.raises(AdapterCheckError, match="unknown serving engine 'tgi'; one of vllm, lorax"):
        check_adapter({}, {}, "tgi")
    with pytest.raises(AdapterCheckError, match="--max-lora-rank 48: vLLM takes one of 1, 8, 16"):
        check_adapter({}, {}, "vllm", max_lora_rank=48)


@pytest.mark.s3
def test_an_adapter_on_s3_is_checked_through_fsspec(adapters, s3):
    c = s3.client()
    for f in adapters["r128"].iterdir():
        c.put_object(Bucket=s3.bucket, Key=f"run/adapters/step-00000010/{f.name}", Body=f.read_bytes())
    verdict = check_adapter_uri(s3.uri("run/adapters/step-00000010"), "vllm", storage_options=s3.storage_options)
    assert verdict.flags == ("--max-lora-rank", "128")
