"""``training.compile``: every decoder layer compiled (regional), the same loss and gradients as
eager, with LoRA, selective checkpointing and the variable-length attention inside the compiled
layers. CPU runs use the aot_eager backend (dynamo's capture and AOTAutograd's forward/backward
split, without inductor's code generation); benchmarks/speed.py measures inductor on a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from ftcluster.errors import SpecError  # noqa: E402
from ftcluster.spec.loader import load_spec_text  # noqa: E402
from ftcluster.train import model as M  # noqa: E402
from ftcluster.train import varlen as V  # noqa: E402
from tests.unit.train.test_train_units import Tok, lora_spec  # noqa: E402
from tests.unit.train.test_varlen import _loss_and_grads, _packed  # noqa: E402

pytestmark = pytest.mark.train
CPU = torch.device("cpu")


def _model(share):
    spec = lora_spec(gradient_checkpointing=share)
    base = M.load_base_model(spec, Tok(), torch.float32, CPU, Path("/nonexistent"))
    V.enable(base)
    model = M.apply_lora(base, spec.lora, spec.training.seed)
    model.train()
    return model


@pytest.mark.slow
@pytest.mark.parametrize("share", [0.0, 0.5])
def test_compiled_layers_match_eager(monkeypatch, share):
    from torch._dynamo.utils import counters

    monkeypatch.setenv("FTCLUSTER_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    data = _packed()
    ce_eager, n_eager, g_eager = _loss_and_grads(_model(share), data, varlen=True)
    model = _model(share)
    assert M.compile_layers(model) == model.base_model.model.config.num_hidden_layers
    ce, n, g = _loss_and_grads(model, data, varlen=True)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo captured the layers (not all graph breaks)
    assert n == n_eager and ce == pytest.approx(ce_eager, rel=1e-5)
    for name in g_eager:
        torch.testing.assert_close(g[name], g_eager[name], rtol=1e-4, atol=1e-6, msg=name)


def test_compile_with_zero3_is_refused_on_load():
    text = """
name: z3
method: full
model: {random_init: {preset: tiny}}
data: {train: x.jsonl, seq_len: 32}
training: {max_steps: 2, compile: true}
deepspeed: {zero_stage: 3}
resources: {gpus_per_node: 0}
output: {uri: file:///nowhere}
"""
    with pytest.raises(SpecError) as err:
        load_spec_text(text, "z3.yaml")
    assert "training.compile" in str(err.value) and "zero_stage 2" in str(err.value)
    load_spec_text(text.replace("zero_stage: 3", "zero_stage: 2"), "z2.yaml")


def test_compiled_layers_keep_state_dict_keys(monkeypatch):
    """Checkpoints, adapters and merged exports are written from state dicts: compiling the layers
    in place (``Module.compile``, not a wrapper) must not rename a key."""
    monkeypatch.setenv("FTCLUSTER_COMPILE_BACKEND", "aot_eager")
    eager, compiled = _model(0.5), _model(0.5)
    M.compile_layers(compiled)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    from peft import get_peft_model_state_dict

    assert list(get_peft_model_state_dict(compiled)) == list(get_peft_model_state_dict(eager))


def test_compile_takes_a_boolean_with_a_located_error(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("""name: lora
method: lora
model: {random_init: {preset: tiny}}
data: {train: x.jsonl, seq_len: 32}
training:
  compile: sometimes
resources: {gpus_per_node: 0}
output: {uri: file:///nowhere}
""")
    from ftcluster.spec.loader import load_spec

    with pytest.raises(SpecError) as err:
        load_spec(path)
    msg = str(err.value)
    assert msg.count("\n") == 0 and "job.yaml:6:" in msg and "training.compile" in msg, msg
