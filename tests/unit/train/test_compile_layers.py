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
    assert msg.count("\n") == 0 and "job.yaml:6:" in msg and "training.compile: expected true, false or auto" in msg, msg


def _fail_backend(gm, example_inputs):  # FTCLUSTER_COMPILE_BACKEND=tests.unit.train.test_compile_layers:_fail_backend
    raise RuntimeError("this backend cannot compile anything")


def test_a_layer_the_backend_cannot_compile_runs_eager_and_is_reported(monkeypatch):
    """The fallback of training.compile: the failing frames run uncompiled, the loss and gradients are
    eager's, and the first step's report says so with the reason."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("FTCLUSTER_COMPILE_BACKEND", "tests.unit.train.test_compile_layers:_fail_backend")
    torch._dynamo.reset()
    counters.clear()
    data = _packed()
    ce_eager, _, g_eager = _loss_and_grads(_model(0.0), data, varlen=True)
    model = _model(0.0)
    assert M.compile_layers(model) > 0
    ce, _, g = _loss_and_grads(model, data, varlen=True)
    line = M.compile_report(1)
    assert line and "fell back to eager" in line and "cannot compile anything" in line, line
    assert ce == pytest.approx(ce_eager, rel=1e-6)
    for name in g_eager:
        torch.testing.assert_close(g[name], g_eager[name], msg=name)
    assert M.compile_report(2) is None  # nothing new


@pytest.mark.slow
def test_a_new_batch_width_is_reported_as_a_recompilation(monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setenv("FTCLUSTER_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    model = _model(0.0)
    M.compile_layers(model)

    def step(width: int) -> None:
        ids = torch.randint(3, 60, (2, width))
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()

    step(32)
    first = M.compile_report(1)
    assert first and "graph(s) compiled in the first step" in first, first
    step(32)
    assert M.compile_report(2) is None
    step(64)
    again = M.compile_report(3)
    assert again and "recompiled" in again and "before step 3" in again, again


@pytest.mark.parametrize("setting,gpu,zero3,model_type,expect", [
    ("auto", True, False, "llama", True),
    ("auto", True, False, None, True),  # not known yet (plan time): assumed a tested family
    ("auto", False, False, "llama", False),  # CPU
    ("auto", True, True, "llama", False),  # ZeRO-3
    ("auto", True, False, "gpt_neox", False),
    (True, True, False, "gpt_neox", True),
    (True, False, False, "llama", True),
    (True, True, True, "llama", False),  # a config_file's stage 3
    (False, True, False, "llama", False),
])
def test_compile_auto_decision(setting, gpu, zero3, model_type, expect):
    from ftcluster.plan.speedups import compile_on

    assert compile_on(gpu, setting, zero3=zero3, model_type=model_type) is expect


def test_compile_defaults_to_auto_and_the_plan_decides_by_gpus_and_stage():
    from ftcluster.plan.speedups import decide

    def spec(extra: str, gpus: int = 1):
        return load_spec_text(f"""
name: j
method: full
model: {{random_init: {{preset: tiny}}}}
data: {{train: x.jsonl, seq_len: 32}}
training: {{max_steps: 2}}
{extra}
resources: {{gpus_per_node: {gpus}}}
output: {{uri: file:///nowhere}}
""", "j.yaml")

    assert spec("deepspeed: {zero_stage: 2}").training.compile == "auto"
    assert decide(spec("deepspeed: {zero_stage: 2}")).compile is True
    assert decide(spec("deepspeed: {zero_stage: 3}")).compile is False  # auto with ZeRO-3: off, not refused
    assert decide(spec("engine: fsdp")).compile is True
    assert decide(spec("engine: fsdp", gpus=0)).compile is False
