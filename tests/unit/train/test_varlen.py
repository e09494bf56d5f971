"""Variable-length attention for packed batches (ftcluster/train/varlen.py).

On CPU the registered attention runs one causal SDPA per packed example (the CUDA path runs
FlashAttention's varlen kernel on the same boundaries; benchmarks/varlen_check.py compares it
with the dense mask on a GPU). These tests check what the runtime feeds it and that a real
tiny Llama (GQA: 4 query, 2 key/value heads) with LoRA and selective checkpointing computes
the same loss and gradients as transformers' SDPA with its block-diagonal mask, through the
variable-length path (counted, so a silent fallback to SDPA fails them)."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from ftcluster.train import model as M  # noqa: E402
from ftcluster.train import varlen as V  # noqa: E402
from ftcluster.train.engines import base as E  # noqa: E402
from tests.unit.train.test_train_units import Tok, batch, lora_spec  # noqa: E402

pytestmark = pytest.mark.train
CPU = torch.device("cpu")


def test_cu_seqlens_start_at_every_restart_and_every_row():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3],
                        [3, 4, 5, 6, 0, 1, 2, 3, 4]])  # a row that starts mid-example still starts a segment
    assert V.cu_seqlens(pos).tolist() == [0, 3, 5, 9, 13, 18]
    assert V.cu_seqlens(pos).dtype == torch.int32
    kw = V.varlen_kwargs(pos, CPU)
    assert kw["max_length_q"] == kw["max_length_k"] == 9 and kw["cu_seq_lens_k"] is kw["cu_seq_lens_q"]


def test_per_example_kernel_equals_dense_block_mask_with_gqa():
    torch.manual_seed(0)
    q, k, v = torch.randn(11, 4, 8), torch.randn(11, 2, 8), torch.randn(11, 2, 8)
    cu = torch.tensor([0, 4, 11], dtype=torch.int32)
    out = V._per_example(q, k, v, cu, 0.3)
    seg = torch.tensor([0] * 4 + [1] * 7)
    allowed = (seg[:, None] == seg[None, :]) & torch.ones(11, 11, dtype=torch.bool).tril()
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1), v.repeat_interleave(2, 1).transpose(0, 1),
        attn_mask=allowed, scale=0.3).transpose(0, 1)
    torch.testing.assert_close(out, ref)


def _packed():
    a, b, c = [5, 17, 33, 90, 4], [7, 8, 100, 250, 31, 12, 3], [9, 10, 11, 12]
    rows = [a + b + c, c + b + a]
    pos = [list(range(5)) + list(range(7)) + list(range(4)), list(range(4)) + list(range(7)) + list(range(5))]
    out = batch(rows, pos)
    out["labels"][1, :3] = -100
    return out


def _loss_and_grads(model, data, varlen):
    model.zero_grad(set_to_none=True)
    ce, n = E.token_ce_sum(model, data, CPU, varlen=varlen)
    ce.backward()
    return float(ce.detach()), int(n), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("share", [0.0, 0.5])
def test_lora_model_matches_sdpa_block_mask_through_the_varlen_path(monkeypatch, share):
    spec = lora_spec(gradient_checkpointing=share)
    base = M.load_base_model(spec, Tok(), torch.float32, CPU, Path("/nonexistent"))
    assert base.ftcluster_varlen is False  # CPU: never switched on by the runtime
    model = M.apply_lora(base, spec.lora, spec.training.seed)
    model.train()
    data = _packed()
    ce_dense, n_dense, g_dense = _loss_and_grads(model, data, varlen=False)

    calls = []
    real = V._per_example
    monkeypatch.setattr(V, "_per_example", lambda *a: calls.append(a[3].tolist()) or real(*a))
    V.enable(base)
    ce_var, n_var, g_var = _loss_and_grads(model, data, varlen=True)
    layers = base.config.num_hidden_layers
    recomputed = round(share * layers)
    assert len(calls) == layers + recomputed  # every layer's attention, and again for each recomputed one
    assert calls[0] == [0, 5, 12, 16, 20, 27, 32]
    assert n_var == n_dense
    assert ce_var == pytest.approx(ce_dense, rel=1e-5)
    assert g_var.keys() == g_dense.keys()
    for name in g_dense:
        torch.testing.assert_close(g_var[name], g_dense[name], rtol=1e-4, atol=1e-6, msg=name)


def test_forward_without_boundaries_falls_back_to_sdpa(monkeypatch):
    """Generation and left-padded batches carry no boundaries: SDPA with transformers' mask."""
    spec = lora_spec()
    model = M.load_base_model(spec, Tok(), torch.float32, CPU, Path("/nonexistent"))
    model.eval()
    ids = torch.tensor([[5, 17, 33, 90, 4, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])  # left padding
    with torch.no_grad():
        dense = model(input_ids=ids, attention_mask=mask).logits
        V.enable(model)
        monkeypatch.setattr(V, "_per_example", lambda *a: pytest.fail("the varlen kernel ran without boundaries"))
        fallback = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(fallback, dense)
    assert model.config._attn_implementation == V.NAME


def test_apply_switches_on_only_for_cuda_sdpa_and_respects_the_off_switch(monkeypatch):
    spec = lora_spec()
    fp32 = M.load_base_model(spec, Tok(), torch.float32, CPU, Path("/nonexistent"))
    model = M.load_base_model(spec, Tok(), torch.bfloat16, CPU, Path("/nonexistent"))
    assert V.apply_varlen_attention(model, CPU) is False and model.config._attn_implementation == "sdpa"
    cuda = torch.device("cuda", 0)  # only its type is read before the switch
    monkeypatch.setattr(V, "enable", lambda m: setattr(m, "ftcluster_varlen", True))
    monkeypatch.setattr(V, "available", lambda: True)
    monkeypatch.setenv(V.ENV, "0")
    assert V.apply_varlen_attention(model, cuda) is False
    monkeypatch.delenv(V.ENV)
    assert V.apply_varlen_attention(model, cuda) is True and model.ftcluster_varlen is True
    assert V.apply_varlen_attention(fp32, cuda) is False  # FlashAttention-2 computes in fp16/bf16 only
    model.config._attn_implementation = "eager"
    assert V.apply_varlen_attention(model, cuda) is False


def test_saved_models_do_not_name_the_runtime_attention(tmp_path):
    """An exported model (full fine-tune, merged LoRA) must load where ftcluster is not installed."""

    model = M.load_base_model(lora_spec(), Tok(), torch.float32, CPU, Path("/nonexistent"))
    V.enable(model)
    model.save_pretrained(tmp_path)
    assert V.NAME not in (tmp_path / "config.json").read_text()


def test_flash_limits_send_other_dtypes_and_head_dims_to_sdpa():
    from types import SimpleNamespace as NS

    def q(dtype, d, cuda=True):
        return NS(is_cuda=cuda, dtype=dtype, shape=(1, 4, 16, d))

    assert V._flash_ok(q(torch.bfloat16, 128)) and V._flash_ok(q(torch.float16, 256))
    assert not V._flash_ok(q(torch.float32, 128))  # training.precision: fp32 on a GPU
    assert not V._flash_ok(q(torch.bfloat16, 512))
    assert not V._flash_ok(q(torch.bfloat16, 128, cuda=False))
