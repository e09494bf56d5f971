"""The FSDP2 engine's meta-device build (one process, no process group): ``load_base_model(meta=True)``
gives the full build's architecture (grown embeddings, ties, config, generation config, hooks) with
no storage, and ``init_nonpersistent_buffers`` computes what no state dict carries (RoPE's inv_freq)
after ``to_empty``. The 2-process build and its memory: tests/e2e/test_fsdp_init.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from ftcluster.errors import TrainError  # noqa: E402
from ftcluster.train import model as M  # noqa: E402
from ftcluster.train.tokenizer import load_or_train_tokenizer  # noqa: E402
from tests.unit.train.test_added_tokens import CPU, TERMS, spec_text  # noqa: E402

from ftcluster.spec.loader import load_spec_text  # noqa: E402  # isort: skip

pytestmark = pytest.mark.train


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, cache) -> Path:
    """A saved tiny tied Llama (320 embeddings) with its BPE and a generation config of its own."""
    spec = load_spec_text(spec_text(model="{random_init: {preset: tiny, vocab_size: 320, tie_word_embeddings: true}}"))
    tok = load_or_train_tokenizer(spec, cache / "tokenizers")
    model: Any = M.load_base_model(spec, tok, torch.float32, CPU, cache)
    model.generation_config.temperature, model.generation_config.do_sample = 0.3, True
    folder = tmp_path_factory.mktemp("base")
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def full_spec(**sections: str) -> Any:
    """A full fine-tune (engine: fsdp) of spec_text's tiny model."""
    return load_spec_text(spec_text(method="full", lora="null", **sections).replace("lora: null\n", "engine: fsdp\n"))


def both(spec: Any, cache: Path) -> tuple[Any, Any]:
    tok = load_or_train_tokenizer(spec, cache / "tokenizers")
    return (M.load_base_model(spec, tok, torch.float32, CPU, cache),
            M.load_base_model(spec, tok, torch.float32, CPU, cache, meta=True))


def config_of(model: Any) -> dict[str, Any]:
    d = model.config.to_dict()
    d.pop("_name_or_path", None)
    return json.loads(json.dumps(d, sort_keys=True, default=str))


@pytest.mark.parametrize("model_section", [
    "{random_init: {preset: tiny, vocab_size: 320}}",
    "{random_init: {preset: tiny, vocab_size: 320, tie_word_embeddings: true}}",
    "SAVED",
])
def test_the_meta_build_is_the_full_builds_architecture_with_no_storage(model_section, saved, cache):
    """Random init, untied and tied, and a saved model (model.path) with added tokens: the same
    parameters and shapes (the grown, 64-row-padded embedding), ties, config (the recorded
    ftcluster_vocab), generation config, new token ids and padding mask; every tensor on meta."""
    spec = full_spec(
        model=model_section.replace("SAVED", f"{{path: {saved}}}"),
        tokenizer=(f"{{add_tokens: {json.dumps(TERMS)}}}" if model_section == "SAVED"
                   else f"{{train_vocab_size: 320, add_tokens: {json.dumps(TERMS)}}}"))
    full, meta = both(spec, cache)
    assert all(t.is_meta for t in [*meta.parameters(), *meta.buffers()])
    assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in full.state_dict().items()}
    assert meta.get_input_embeddings().weight.shape[0] == 384  # 323 tokens, rounded up to 64
    tied = full.config.tie_word_embeddings
    assert (meta.lm_head.weight is meta.model.embed_tokens.weight) == tied
    assert config_of(meta) == config_of(full) and meta.config.ftcluster_vocab == 323
    assert meta.generation_config.to_dict() == full.generation_config.to_dict()
    if model_section == "SAVED":
        assert meta.generation_config.temperature == 0.3  # read from the folder, as from_pretrained does
    assert meta.ftcluster_new_token_ids == full.ftcluster_new_token_ids == [320, 321, 322]
    assert meta.ftcluster_vocab == full.ftcluster_vocab == 323
    assert [type(m).__name__ for m in M.decoder_layers(meta)] == [type(m).__name__ for m in M.decoder_layers(full)]


def test_inv_freq_is_computed_again_after_to_empty(cache):
    """``to_empty`` leaves the rotary buffers uninitialised (NaN here, to be sure); they come back
    equal to the full build's, and the RNG is where it was."""
    spec = full_spec(model="{random_init: {preset: tiny, vocab_size: 320, rope_theta: 500000.0}}")
    full, meta = both(spec, cache)
    meta.to_empty(device=CPU)
    for b in meta.buffers():
        b.fill_(float("nan"))
    state = torch.get_rng_state()
    names = M.init_nonpersistent_buffers(meta)
    assert torch.equal(torch.get_rng_state(), state)
    assert names == ["model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"]
    assert torch.equal(meta.model.rotary_emb.inv_freq, full.model.rotary_emb.inv_freq)
    assert torch.equal(meta.model.rotary_emb.original_inv_freq, full.model.rotary_emb.original_inv_freq)


def test_a_buffer_transformers_does_not_compute_is_refused_in_one_line(cache):
    spec = full_spec(model="{random_init: {preset: tiny, vocab_size: 320}}")
    _, meta = both(spec, cache)
    meta.model.norm.register_buffer("scale", torch.ones(4, device="meta"), persistent=False)
    meta.to_empty(device=CPU)
    with pytest.raises(TrainError, match=r"^engine: fsdp .* its buffer model\.norm\.scale \(LlamaRMSNorm\); use "
                                         r"engine: deepspeed$"):
        M.init_nonpersistent_buffers(meta)


def test_a_random_init_rounded_to_the_compute_dtype_is_the_bf16_draw(cache):
    """FSDP2 keeps fp32 parameters; its random init (init_dtype=bf16) holds exactly the values the
    DeepSpeed and LoRA engines draw in bf16, so every engine starts a job from the same weights
    (CI test_fidelity shows the curves; before, FSDP2 kept the fp32 draw)."""
    spec = full_spec()
    tok = load_or_train_tokenizer(spec, cache / "tokenizers")
    fsdp = M.load_base_model(spec, tok, torch.float32, CPU, cache, init_dtype=torch.bfloat16)
    other = M.load_base_model(spec, tok, torch.bfloat16, CPU, cache)
    plain32 = M.load_base_model(spec, tok, torch.float32, CPU, cache)
    pairs = list(zip(fsdp.named_parameters(), other.named_parameters(), plain32.named_parameters(), strict=True))
    assert pairs
    for (name, a), (_, b), (_, c) in pairs:
        assert a.dtype == torch.float32 and torch.equal(a, b.float()), name
        assert torch.equal(a, c.to(torch.bfloat16).float()), name
    assert any(not torch.equal(a, c) for (_, a), _, (_, c) in pairs)  # the fp32 draw is another start
    inv = [b for n, b in fsdp.named_buffers() if n.endswith("inv_freq")]
    assert inv and all(b.dtype == torch.float32 for b in inv)
