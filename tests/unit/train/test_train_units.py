"""Unit tests of the training runtime's parts: loss, engines, schedule, signals, metrics, launcher.

Real torch/transformers/peft on a tiny random Llama; no mocks. The end-to-end runs are in
tests/e2e/test_train_runtime.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from ftcluster.errors import TrainError  # noqa: E402
from ftcluster.spec.loader import load_spec_text  # noqa: E402
from ftcluster.train import model as M  # noqa: E402
from ftcluster.train.engines import base as E  # noqa: E402
from ftcluster.train.engines.lora import PlainEngine  # noqa: E402
from ftcluster.train.metrics import JsonlSink, MetricsReporter, format_line, peak_memory_gb  # noqa: E402
from ftcluster.train.signals import StopFlag, all_max  # noqa: E402

pytestmark = pytest.mark.train

CPU = torch.device("cpu")


class Tok:
    """The three facts model.py needs from a tokenizer."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __init__(self, n: int = 512):
        self.n = n

    def __len__(self) -> int:
        return self.n


def lora_spec(**training):
    tr = {"max_steps": 4, "micro_batch_size": 2, "precision": "fp32", **training}
    return load_spec_text(textwrap.dedent(f"""
        name: unit
        method: lora
        model: {{random_init: {{preset: tiny}}}}
        data: {{train: x.jsonl, seq_len: 32}}
        training: {json.dumps(tr)}
        lora: {{r: 4, alpha: 8, dropout: 0.0}}
        resources: {{gpus_per_node: 0}}
        output: {{uri: file:///nowhere}}
    """))


def tiny_lora(spec):
    base = M.load_base_model(spec, Tok(), torch.float32, CPU, Path("/nonexistent"))
    return M.apply_lora(base, spec.lora, spec.training.seed)


def batch(rows: list[list[int]], pos: list[list[int]] | None = None) -> dict:
    ids = torch.tensor(rows)
    return {"input_ids": ids, "labels": ids.clone(),
            "position_ids": torch.tensor(pos) if pos else torch.arange(ids.shape[1]).expand_as(ids).clone(),
            "attention_mask": torch.ones_like(ids)}


# --------------------------------------------------------------------------- schedule


def test_lr_schedule_warmup_then_decay():
    cos = E.LrLambda("cosine", warmup=4, total=20)
    assert [cos(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cos(4) == 1.0 and 0 < cos(19) < 0.01
    assert all(cos(s) >= cos(s + 1) for s in range(4, 25))
    lin = E.LrLambda("linear", warmup=0, total=10)
    assert lin(0) == 1.0 and lin(5) == pytest.approx(0.5) and lin(10) == 0.0
    assert E.LrLambda("constant", warmup=2, total=10)(9) == 1.0


# --------------------------------------------------------------------------- loss


def test_packed_loss_equals_separate_examples():
    """Two examples packed in one row (positions restart) cost exactly what they cost apart:
    no attention across the boundary and no prediction of the next example's first token."""
    spec = lora_spec()
    model = M.load_base_model(spec, Tok(), torch.float32, CPU, Path("/nonexistent")).eval()
    a, b = [5, 17, 33, 90, 4], [7, 8, 100, 250, 31, 12, 3]
    with torch.no_grad():
        ce_packed, n_packed = E.token_ce_sum(model, batch([a + b], [list(range(5)) + list(range(7))]), CPU)
        ce_a, n_a = E.token_ce_sum(model, batch([a]), CPU)
        ce_b, n_b = E.token_ce_sum(model, batch([b]), CPU)
    assert int(n_packed) == int(n_a) + int(n_b) == 10
    assert float(ce_packed) == pytest.approx(float(ce_a + ce_b), rel=1e-5)
    assert E.count_label_tokens(batch([a + b], [list(range(5)) + list(range(7))])) == 10


def test_right_padding_is_masked_by_labels():
    spec = lora_spec()
    model = M.load_base_model(spec, Tok(), torch.float32, CPU, Path("/nonexistent")).eval()
    a = [5, 17, 33, 90, 4]
    padded = batch([a + [0, 0, 0]], [list(range(8))])
    padded["labels"][0, 5:] = -100
    padded["attention_mask"][0, 5:] = 0
    with torch.no_grad():
        ce_p, n_p = E.token_ce_sum(model, padded, CPU)
        ce_a, n_a = E.token_ce_sum(model, batch([a]), CPU)
    assert int(n_p) == int(n_a) == 4
    assert float(ce_p) == pytest.approx(float(ce_a), rel=1e-5)


# --------------------------------------------------------------------------- engines


def test_plain_engine_step_is_token_mean_whatever_the_micro_batching():
    """One step over micro-batches [x], [y] (accumulation 2) updates the adapter exactly like
    one step over the batch [x, y]: the loss is the mean over all label tokens of the step."""
    x = batch([[3, 4, 5, 6, 7, 8, 9, 10]])
    y = batch([[11, 12, 13, 14, 15, 16, 17, 18]])
    y["labels"][0, :6] = -100  # y has far fewer label tokens than x
    results = []
    for micro in ([x, y], [{k: torch.cat([x[k], y[k]]) for k in x}]):
        spec = lora_spec(gradient_accumulation_steps=len(micro), micro_batch_size=2 // len(micro))
        eng = PlainEngine(tiny_lora(spec), spec, CPU, torch.float32, total_steps=4, world_size=1)
        n = sum(E.count_label_tokens(b) for b in micro)
        ce, gn = eng.train_step(micro, eng.grad_accum_scale / n)
        results.append((float(ce) / n, float(gn), [p.detach().clone() for p in eng.params]))
    (l1, g1, p1), (l2, g2, p2) = results
    assert l1 == pytest.approx(l2, rel=1e-5) and g1 == pytest.approx(g2, rel=1e-4)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(p1, p2, strict=True))


def test_plain_engine_save_load_roundtrip(tmp_path):
    spec = lora_spec()
    data = [batch([[3, 4, 5, 6, 7, 8, 9, 10], [9, 8, 7, 6, 5, 4, 3, 2]]) for _ in range(3)]
    eng = PlainEngine(tiny_lora(spec), spec, CPU, torch.float32, total_steps=4, world_size=1)
    eng.train_step([data[0]], 1 / 14)
    eng.save(tmp_path, rank=0)
    ref = [float(eng.train_step([d], 1 / 14)[0]) for d in data[1:]]
    other = PlainEngine(tiny_lora(spec), spec, CPU, torch.float32, total_steps=4, world_size=1)
    other.load(tmp_path)
    assert other.lr == pytest.approx(E.LrLambda("cosine", 0, 4)(1) * spec.training.learning_rate)
    got = [float(other.train_step([d], 1 / 14)[0]) for d in data[1:]]
    assert got == ref


def test_plain_engine_load_rejects_other_adapter(tmp_path):
    spec = lora_spec()
    PlainEngine(tiny_lora(spec), spec, CPU, torch.float32, 4, 1).save(tmp_path, rank=0)
    spec.lora.target_modules = ["q_proj"]
    other = PlainEngine(tiny_lora(spec), spec, CPU, torch.float32, 4, 1)
    with pytest.raises(TrainError, match="other trainable parameters"):
        other.load(tmp_path)


def test_lora_export_loads_with_peft(tmp_path):
    from peft import PeftModel

    spec = lora_spec()
    eng = PlainEngine(tiny_lora(spec), spec, CPU, torch.float32, 4, 1)
    eng.train_step([batch([[3, 4, 5, 6, 7, 8, 9, 10]])], 1 / 7)
    eng.export(tmp_path, rank=0)
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in tmp_path.iterdir()}
    base = M.load_base_model(spec, Tok(), torch.float32, CPU, Path("/nonexistent"))
    loaded = PeftModel.from_pretrained(base, str(tmp_path))
    mine = {n: p for n, p in eng.module.named_parameters() if "lora_B" in n}
    theirs = dict(loaded.named_parameters())
    assert mine and all(torch.equal(p, theirs[n]) and p.abs().sum() > 0 for n, p in mine.items())


def test_merged_export_is_a_plain_model_with_the_adapter_folded_in(tmp_path):
    from transformers import AutoModelForCausalLM

    spec = lora_spec()
    eng = PlainEngine(tiny_lora(spec), spec, CPU, torch.float32, 4, 1)
    b = batch([[3, 4, 5, 6, 7, 8, 9, 10]])
    for _ in range(2):
        eng.train_step([b], 1 / 7)
    eng.module.eval()
    with torch.no_grad():
        want = eng.module(input_ids=b["input_ids"]).logits
    eng.export_merged(tmp_path, rank=0)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        got = merged(input_ids=b["input_ids"]).logits
    assert torch.allclose(got, want, atol=1e-5)


# --------------------------------------------------------------------------- model


def test_random_init_is_seeded_and_fingerprinted():
    spec = lora_spec()
    a = M.load_base_model(spec, Tok(), torch.float32, CPU, Path("/x"))
    b = M.load_base_model(spec, Tok(), torch.float32, CPU, Path("/x"))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert M.config_fingerprint(a.config) == M.config_fingerprint(b.config)
    spec.model.random_init.hidden_size = 128
    c = M.load_base_model(spec, Tok(), torch.float32, CPU, Path("/x"))
    assert M.config_fingerprint(c.config) != M.config_fingerprint(a.config)
    assert a.config._attn_implementation == "sdpa"


def test_tokenizer_larger_than_vocab_is_a_one_line_error():
    spec = lora_spec()
    with pytest.raises(TrainError, match=r"model\.random_init\.vocab_size: the tokenizer has 600 tokens"):
        M.load_base_model(spec, Tok(600), torch.float32, CPU, Path("/x"))


def test_unknown_lora_target_is_a_field_error():
    spec = lora_spec()
    spec.lora.target_modules = ["no_such_proj"]
    with pytest.raises(TrainError, match=r"^lora\.target_modules: "):
        tiny_lora(spec)


def test_cpu_computes_in_fp32():
    assert M.compute_dtype("bf16", CPU) == torch.float32
    assert M.compute_dtype("fp32", CPU) == torch.float32


# --------------------------------------------------------------------------- signals and metrics


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGTERM])
def test_stop_flag_catches_signal(sig):
    flag = StopFlag().install()
    try:
        assert flag.agree(0) == (False, False)
        os.kill(os.getpid(), sig)
        assert flag.local and flag.signal_name == sig.name
        assert flag.agree(1) == (True, True)
    finally:
        flag.uninstall()
    assert signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler) or callable(signal.getsignal(sig))
    assert all_max([3, 0]) == [3, 0]


def test_metrics_reporter_writes_every_step_and_logs_every_n(tmp_path, caplog):
    flushed = []
    sink = JsonlSink(tmp_path / "metrics.jsonl", on_flush=lambda p: flushed.append(p.read_text().count("\n")))
    rep = MetricsReporter(enabled=True, total_steps=4, start_step=0, log_every=2, sink=sink, tty=False)
    with caplog.at_level("INFO", logger="ftcluster.train"):
        for s in range(1, 5):
            rep.train_step({"step": s, "loss": 2.0 / s, "lr": 1e-3, "grad_norm": 0.5, "tokens": 10,
                            "tokens_per_s": 100.0, "peak_mem_gb": peak_memory_gb(CPU), "elapsed_s": s,
                            "tokens_seen": 10 * s})
        rep.event({"kind": "eval", "step": 4, "loss": 0.3}, "eval loss 0.3000 at step 4")
    rep.close()
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4]
    assert recs[-1] == {"kind": "eval", "step": 4, "loss": 0.3}
    assert flushed[:2] == [2, 4]  # published at log steps
    lines = [r.message for r in caplog.records]
    assert any(m.startswith("step 2/4 | loss 1.0000") for m in lines) and not any("step 3/4" in m for m in lines)
    assert peak_memory_gb(CPU) > 0.01
    assert "eta" in format_line({**recs[0], "eta_s": 3.0}, 4)


def test_disabled_reporter_is_silent(tmp_path, caplog, capsys):
    def report(enabled: bool, name: str) -> Path:
        path = tmp_path / name
        rep = MetricsReporter(enabled=enabled, total_steps=2, start_step=0, log_every=1, sink=JsonlSink(path),
                              tty=False)
        with caplog.at_level("DEBUG", logger="ftcluster.train"):
            rep.train_step({"step": 1, "loss": 1.0, "lr": 1e-3, "grad_norm": 0.5, "tokens": 10,
                            "tokens_per_s": 100.0, "peak_mem_gb": 0.0, "elapsed_s": 1, "tokens_seen": 10})
            rep.event({"kind": "eval", "step": 1, "loss": 0.5}, "eval loss 0.5000 at step 1")
            rep.print("a message")
            rep.close()
        return path

    metrics = report(False, "off.jsonl")  # another rank: no log record, no output, no metrics line
    assert caplog.records == [] and capsys.readouterr() == ("", "")
    assert not metrics.exists() or metrics.read_text() == ""
    metrics = report(True, "on.jsonl")  # rank 0, the same calls: the capture above would have seen them
    assert len(caplog.records) >= 3 and metrics.read_text().count("\n") == 2


# --------------------------------------------------------------------------- launcher


WORKER = """
import os, sys, time
from ftcluster.train.launch import mark_preempted
if sys.argv[1] == "preempt":
    mark_preempted()
    sys.exit(143)
sys.exit(int(sys.argv[1]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode,expected", [("preempt", 143), ("0", 0), ("3", 1)])
def test_launcher_maps_preemption_to_143(tmp_path, mode, expected):
    script = tmp_path / "w.py"
    script.write_text(WORKER)
    r = subprocess.run([sys.executable, "-m", "ftcluster.train.launch", "--nproc-per-node=2", "--max-restarts=0",
                        str(script), mode], capture_output=True, text=True, timeout=120)
    assert r.returncode == expected, r.stderr[-2000:]
    if mode == "3":  # a failed worker: one summary line from the launcher, no torchrun traceback
        assert "Traceback" not in r.stderr and "ftcluster: training failed: rank 0 on " in r.stderr, r.stderr
        assert "[rank 0 exit code 3" in r.stderr and "not retried" in r.stderr, r.stderr


def test_stop_flag_survives_a_signal_inside_its_own_handler():
    """TERM then USR2 back to back (Slurm preemption, submitit's interrupt): the second handler runs
    inside the first. An Event-based flag deadlocked here; the flag must take no lock."""
    import os
    import signal as _signal

    from ftcluster.train.signals import StopFlag

    flag = StopFlag().install()
    try:
        inner = flag._handle
        fired = []

        def handler(signum, frame):
            inner(signum, frame)
            fired.append(signum)
            if signum == _signal.SIGTERM:
                os.kill(os.getpid(), _signal.SIGUSR2)  # delivered while this handler runs

        _signal.signal(_signal.SIGTERM, handler)
        _signal.signal(_signal.SIGUSR2, handler)
        os.kill(os.getpid(), _signal.SIGTERM)
        assert sorted(fired) == sorted([_signal.SIGTERM, _signal.SIGUSR2])
        assert flag.local and flag.signal_name == "SIGTERM"
    finally:
        flag.uninstall()
