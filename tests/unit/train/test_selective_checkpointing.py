"""Selective activation checkpointing (training.gradient_checkpointing as a share of layers)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ftcluster.plan.planner.memory import checkpointed_count  # noqa: E402
from ftcluster.train.model import checkpointed_layers, enable_checkpointing  # noqa: E402


@pytest.mark.parametrize("n, f, want", [(8, 0.5, [1, 3, 5, 7]), (4, 0.25, [3]), (4, 1.0, [0, 1, 2, 3]),
                                        (4, 0.0, []), (32, 0.375, None), (5, 0.5, None)])
def test_layers_are_evenly_spread_and_counted_as_the_planner_counts(n, f, want):
    got = checkpointed_layers(n, f)
    if want is not None:
        assert got == want
    assert len(got) == checkpointed_count(n, f) == round(f * n)
    assert got == sorted(set(got)) and all(0 <= i < n for i in got)


def _model():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).train()


def _run(fraction: float):
    torch.set_num_threads(1)
    model = _model()
    assert enable_checkpointing(model, fraction) == round(fraction * 4)
    calls = [0] * 4
    for i, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return calls, loss.detach(), grads


def test_only_the_chosen_layers_recompute_and_gradients_are_unchanged():
    calls_none, loss0, g0 = _run(0.0)
    calls_half, loss_half, g_half = _run(0.5)
    calls_all, loss_all, g_all = _run(1.0)
    assert calls_none == [1, 1, 1, 1]  # no recompute
    assert calls_half == [1, 2, 1, 2]  # layers 1 and 3 run their forward again in backward
    assert calls_all == [2, 2, 2, 2]
    for loss, g in ((loss_half, g_half), (loss_all, g_all)):
        assert torch.equal(loss, loss0)
        torch.testing.assert_close(g, g0, rtol=1e-5, atol=1e-6)
