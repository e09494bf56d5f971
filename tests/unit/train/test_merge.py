"""The streaming LoRA merge (ftcluster.train.merge): a tiny random Llama on CPU, real peft adapters
with random (nonzero) trainable tensors, merged shard by shard and compared with peft itself
(``PeftModel`` logits and ``merge_and_unload()`` weights), sharded and single-file bases, rslora
with rank/alpha patterns, modules_to_save, trainable tokens with added tokens (the base grown as
``fit_embeddings`` grows it), tied and untied embeddings, bf16, and the refusals.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from ftcluster.errors import TrainError  # noqa: E402
from ftcluster.spec.loader import load_spec_text  # noqa: E402
from ftcluster.train import model as M  # noqa: E402
from ftcluster.train import tensorfile as TF  # noqa: E402
from ftcluster.train.merge import materialize_random_init, merge_folder  # noqa: E402
from ftcluster.train.tokenizer import load_or_train_tokenizer  # noqa: E402

pytestmark = pytest.mark.train

ROOT = Path(__file__).resolve().parents[3]
TEXT = ROOT / "examples" / "data" / "text.jsonl"
CPU = torch.device("cpu")
TERMS = ["habeas corpus", "res judicata", "Varnholt rule"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHARD = 60_000  # bytes: the tiny model (about 0.5 MB in fp32) in several shards


def spec_for(tied: bool = False):
    return load_spec_text(
        "name: merge\nmethod: lora\n"
        f"model: {{random_init: {{preset: tiny, vocab_size: 320, tie_word_embeddings: {str(tied).lower()}}}}}\n"
        "tokenizer: {train_vocab_size: 320}\n"
        f"data: {{train: {TEXT}, format: text, seq_len: 64}}\n"
        "training: {max_steps: 1, micro_batch_size: 2, precision: fp32, seed: 7}\n"
        "lora: {r: 4, alpha: 8, dropout: 0.0}\nresources: {gpus_per_node: 0}\noutput: {uri: file:///nowhere}\n")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    """The 320-token BPE the tiny bases are built for, saved."""
    cache = tmp_path_factory.mktemp("cache")
    tok = load_or_train_tokenizer(spec_for(), cache / "tokenizers")
    folder = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(str(folder))
    return folder


def tokenizer(tok_dir: Path, added: bool = False) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.ftcluster_base_vocab = len(tok)
    if added:
        tok.add_tokens(TERMS)
    return tok


def make_base(tmp: Path, tok_dir: Path, *, tied: bool = False, shard: int = SHARD) -> Path:
    """A tiny random-init base saved in shards of ``shard`` bytes (materialize_random_init)."""
    return materialize_random_init(spec_for(tied), tokenizer(tok_dir), tmp / "base", device="cpu",
                                   max_shard_bytes=shard)


def base_model(base: Path, tok: Any, dtype: Any = torch.float32) -> Any:
    """The base as training loads it: from_pretrained, then fit_embeddings (the reference side)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
    M.fit_embeddings(model, tok)
    return model.eval()


def make_adapter(tmp: Path, base: Path, tok: Any, *, save_embedding_layers: bool = False, **lora: Any) -> Path:
    """A peft adapter on the base (grown for ``tok``) whose every trainable tensor is random, saved
    with the tokenizer and an ftcluster_meta.json like a run's artifact (without the embedding
    matrices, as ftcluster.train.engines.lora exports it, unless ``save_embedding_layers``)."""
    from peft import LoraConfig, get_peft_model

    model = base_model(base, tok)
    cfg = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ALL, "task_type": "CAUSAL_LM", **lora})
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:  # lora_A/B, modules_to_save copies, trainable token rows
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    folder = tmp / "adapter"
    peft_model.save_pretrained(str(folder), save_embedding_layers=save_embedding_layers)
    tok.save_pretrained(str(folder))
    meta = {"tokenizer": {"vocab": len(tok), "base_vocab": tok.ftcluster_base_vocab}}
    (folder / "ftcluster_meta.json").write_text(json.dumps(meta))
    return folder


def ids(tok: Any) -> Any:
    """Inputs that use every id, the added ones included."""
    n = len(tok)
    return torch.stack([torch.arange(i, i + 64) for i in range(0, n - 64, 64)] + [torch.arange(n - 64, n)])


def logits(model: Any, x: Any, vocab: int) -> Any:
    with torch.no_grad():
        return model(input_ids=x).logits[..., :vocab].float()


def check(tmp: Path, base: Path, adapter: Path, tok: Any, *, dtype: Any = torch.float32, atol: float = 1e-5,
          name: str | None = None) -> Any:
    """Merge; the merged folder's logits equal PeftModel's, its weights peft's merge_and_unload()'s."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp / "merged"
    calls: list[tuple[int, int]] = []
    info = merge_folder(base, adapter, out, dtype=name, progress=lambda done, total: calls.append((done, total)))
    assert len(calls) == info.tensors and calls[-1] == (info.total_bytes,) * 2
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=dtype).eval()
    ref = PeftModel.from_pretrained(base_model(base, tok, dtype), str(adapter)).eval()
    x = ids(tok)
    want = logits(ref, x, len(tok))
    got = logits(merged, x, len(tok))
    plain = logits(base_model(base, tok, dtype), x, len(tok))
    # fp32: merged and unmerged sum the same terms in another order; atol is per unit of the largest logit
    tol = atol * max(1.0, want.abs().max().item())
    print("logits", dtype, "max |got - want|", (got - want).abs().max().item(), "tolerance", tol,
          "adapter's effect", (want - plain).abs().max().item())
    assert (want - plain).abs().max() > 10 * tol  # the adapter changes the outputs: a no-op merge fails
    torch.testing.assert_close(got, want, atol=tol, rtol=0)
    peft_sd = ref.merge_and_unload().state_dict()
    sd = merged.state_dict()
    assert set(sd) == set(peft_sd)
    for k, v in peft_sd.items():
        assert torch.equal(sd[k], v), k  # the same fp32 expression as peft's merge: bit-equal
    return info


def test_sharded_untied_fp32_equals_peft(tmp_path, tok_dir):
    base = make_base(tmp_path, tok_dir)
    shards = sorted(p.name for p in base.glob("model-*.safetensors"))
    assert len(shards) > 2
    tok = tokenizer(tok_dir)
    info = check(tmp_path, base, make_adapter(tmp_path, base, tok), tok)
    out = tmp_path / "merged"
    assert sorted(p.name for p in out.glob("model-*.safetensors")) == shards  # the base's layout, kept
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["metadata"]["total_size"] == info.total_bytes == sum(
        TF.nbytes(e.dtype, e.shape) for s in shards for e in TF.read_header(out / s).entries.values())
    assert info.lora_merged == 2 * 7 and info.rows == info.base_rows == 320
    assert (out / "tokenizer.json").is_file()


def test_single_file_rslora_with_rank_and_alpha_patterns(tmp_path, tok_dir, monkeypatch):
    import ftcluster.train.merge as merge

    monkeypatch.setattr(merge, "CHUNK_ELEMS", 3 * 64)  # 16-bit weights upcast 3 rows at a time
    base = make_base(tmp_path, tok_dir, shard=10**9)
    assert (base / "model.safetensors").is_file() and not (base / "model.safetensors.index.json").exists()
    tok = tokenizer(tok_dir)
    adapter = make_adapter(tmp_path, base, tok, use_rslora=True, rank_pattern={"layers.0.self_attn.q_proj": 8},
                           alpha_pattern={"v_proj": 32})
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["use_rslora"] and cfg["rank_pattern"] and cfg["alpha_pattern"]
    check(tmp_path, base, adapter, tok)
    check(tmp_path, base, adapter, tok, dtype=torch.float16, atol=2e-2, name="fp16")
    assert sorted(p.name for p in (tmp_path / "merged").glob("*.safetensors*")) == ["model.safetensors"]


def test_modules_to_save_replaces_the_output_layer(tmp_path, tok_dir):
    base = make_base(tmp_path, tok_dir)
    tok = tokenizer(tok_dir)
    adapter = make_adapter(tmp_path, base, tok, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    info = check(tmp_path, base, adapter, tok)
    assert info.replaced == ("lm_head.weight",)


@pytest.mark.parametrize("tied,save_embedding_layers", [(False, False), (True, False), (False, True)],
                         ids=["untied", "tied", "untied-embeddings-saved"])
def test_added_tokens_grow_the_embeddings_as_fit_embeddings_does(tmp_path, tok_dir, tied, save_embedding_layers):
    base = make_base(tmp_path, tok_dir, tied=tied)
    tok = tokenizer(tok_dir, added=True)
    assert len(tok) == 323
    probe = base_model(base, tok)  # what training built: 384 rows and the token rows to train
    rows = M.token_rows(probe, type("L", (), {"modules_to_save": [], "target_modules": ALL})())
    assert set(rows) == ({"embed_tokens"} if tied else {"embed_tokens", "lm_head"})
    adapter = make_adapter(tmp_path, base, tok, trainable_token_indices=rows,
                           save_embedding_layers=save_embedding_layers)
    info = check(tmp_path, base, adapter, tok)
    assert len(info.replaced) == (2 if save_embedding_layers else 0)
    out = tmp_path / "merged"
    config = json.loads((out / "config.json").read_text())
    assert (config["vocab_size"], config["ftcluster_vocab"], info.rows, info.base_rows) == (384, 323, 384, 320)
    assert json.loads((out / "generation_config.json").read_text())["suppress_tokens"] == list(range(323, 384))
    assert info.token_rows == 3 * len(rows)
    names = {n for p in out.glob("*.safetensors") for n in TF.read_header(p).entries}
    assert ("lm_head.weight" in names) is not tied  # a tied base stays tied: one matrix, no lm_head tensor
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(out))
    emb = merged.get_input_embeddings().weight
    # the padding rows hold the mean of the base's 320 rows, as fit_embeddings set them
    torch.testing.assert_close(emb[323:], probe.get_input_embeddings().weight[323:], atol=0, rtol=0)
    if tied:
        assert merged.get_output_embeddings().weight.data_ptr() == emb.data_ptr()


def test_bf16_output_equals_peft_merge_in_bf16(tmp_path, tok_dir):
    base = make_base(tmp_path, tok_dir)
    tok = tokenizer(tok_dir, added=True)
    probe = base_model(base, tok)
    rows = M.token_rows(probe, type("L", (), {"modules_to_save": [], "target_modules": ALL})())
    adapter = make_adapter(tmp_path, base, tok, trainable_token_indices=rows)
    # Weights: bit-equal to peft's merge in bf16 (both add the fp32 delta to the bf16 weight and round
    # once). Logits: the merged bf16 weights against PeftModel's bf16 base plus its LoRA path differ by
    # the rounding of the merged weights: 2% of the largest logit (measured: 0.023 of 2.5, under 1%).
    info = check(tmp_path, base, adapter, tok, dtype=torch.bfloat16, atol=2e-2, name="bf16")
    assert info.dtype == "BF16"
    assert {e.dtype for p in (tmp_path / "merged").glob("model-*.safetensors")
            for e in TF.read_header(p).entries.values()} == {"BF16"}


def test_dora_and_fan_in_fan_out_are_refused_in_one_line(tmp_path, tok_dir):
    base = make_base(tmp_path, tok_dir)
    tok = tokenizer(tok_dir)
    adapter = make_adapter(tmp_path, base, tok, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(TrainError, match=r"DoRA \(use_dora\)") as err:
        merge_folder(base, adapter, tmp_path / "merged")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "merged").exists()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update(use_dora=False, fan_in_fan_out=True)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TrainError, match="fan_in_fan_out"):
        merge_folder(base, adapter, tmp_path / "merged")


def test_an_adapter_for_another_base_is_refused_before_writing(tmp_path, tok_dir):
    base = make_base(tmp_path, tok_dir)
    tok = tokenizer(tok_dir)
    adapter = make_adapter(tmp_path, base, tok, target_modules=["q_proj"])
    cfg = json.loads((base / "config.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg.pop("dtype", None)
    small = LlamaConfig(**{**cfg, "hidden_size": 32, "intermediate_size": 64})
    AutoModelForCausalLM.from_config(small).save_pretrained(str(other))
    with pytest.raises(TrainError, match="was it trained on this base"):
        merge_folder(other, adapter, tmp_path / "merged")
    assert not list((tmp_path / "merged").glob("*.safetensors"))


def test_materialize_random_init_builds_the_training_weights(tmp_path, tok_dir):
    spec = spec_for()
    tok = tokenizer(tok_dir)
    folder = materialize_random_init(spec, tok, tmp_path / "ri", device="cpu", max_shard_bytes=SHARD)
    model = M.load_base_model(spec, tok, torch.float32, CPU, tmp_path / "cache")
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(str(folder)).state_dict()
    want = model.state_dict()
    assert set(saved) == set(want)
    for k, v in want.items():
        assert torch.equal(saved[k], v), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool])
def test_tensorfile_reads_and_writes_what_safetensors_does(tmp_path, dtype):
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    tensors = {"a": (torch.randn(5, 7, generator=g) * 100).to(dtype), "b.c": (torch.randn(3, generator=g) * 9).to(dtype),
               "empty": torch.zeros(0, 4, dtype=dtype)}
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    got = TF.read_all(tmp_path / "ref.safetensors")
    assert set(got) == set(tensors) and all(torch.equal(got[k], v) for k, v in tensors.items())
    w = TF.ShardWriter(tmp_path / "ours.safetensors", [(k, TF.st_dtype(v.dtype), tuple(v.shape))
                                                       for k, v in tensors.items()], {"format": "pt"})
    for k, v in tensors.items():
        w.write(k, v)
    w.close()
    back = load_file(str(tmp_path / "ours.safetensors"))
    assert set(back) == set(tensors) and all(torch.equal(back[k], v) for k, v in tensors.items())
