"""The planner (ftcluster.plan.planner): parameter counts, the memory model against the ZeRO paper
and ftcluster's own measured peaks, the validate/submit guard, the JSON schema and the
recommendation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ftcluster.plan.planner import build_plan, check_spec
from ftcluster.plan.planner.gpus import GPUS, load_gpus
from ftcluster.plan.planner.layout import Layout, Workload
from ftcluster.plan.planner.memory import model_states, per_gpu_memory
from ftcluster.plan.planner.report import plan_dict
from ftcluster.plan.planner.shape import (
    PRESET_SHAPES,
    ModelShape,
    count_lora,
    known_shape,
    shape_from_config,
)
from ftcluster.plan.planner.speed import step_seconds
from ftcluster.spec.loader import load_spec, load_spec_text
from tests.support.specs import BIG

ROOT = Path(__file__).resolve().parents[3]


def llama(preset: str) -> ModelShape:
    return shape_from_config({"model_type": "llama", **PRESET_SHAPES[preset]})


# ----------------------------------------------------------------------------- shapes and counts


def test_counts_match_what_the_runtime_logged_for_llama_3_8b():
    # benchmarks/results/h200-2026-11-29/lora-8b.log: "41,943,040 trainable of 8,072,204,288 parameters"
    s = llama("llama-3-8b")
    c = count_lora(s, 16, "all-linear")
    assert c.trainable == 41_943_040
    assert s.total_params() + c.trainable == 8_072_204_288
    assert llama("llama-3.2-1b").total_params() == 1_235_814_400  # tied lm_head counted once


def test_names_of_public_models_are_recognised():
    assert known_shape("s3://models/base/llama-3.1-8b").total_params() == 8_030_261_248
    assert known_shape("meta-llama/Llama-3.2-1B-Instruct").tie_word_embeddings
    assert known_shape("s3://models/my-finetune") is None


@pytest.mark.train
@pytest.mark.parametrize("tie,kv,targets,save", [
    (False, 2, "all-linear", ()),
    (True, 4, ["q_proj", "v_proj"], ()),
    (False, 1, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"], ()),
    (False, 2, ["q_proj", "embed_tokens"], ("lm_head",)),
])
def test_counts_equal_transformers_and_peft(tie, kv, targets, save):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=kv, vocab_size=300, tie_word_embeddings=tie)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    shape = shape_from_config({"model_type": "llama", **cfg})
    assert shape.total_params() == sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=targets, modules_to_save=list(save) or None))
    c = count_lora(shape, 8, targets, save)
    assert c.trainable == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert shape.total_params() + c.trainable == sum(p.numel() for p in peft_model.parameters())


# ----------------------------------------------------------------------------- memory


def test_zero_paper_worked_example_within_2_percent():
    # Rajbhandari et al., "ZeRO" (2019), Figure 1: 7.5B parameters, 64 GPUs, K = 12. The paper's
    # GB are 10^9 bytes (7.5e9 x 16 B = 120e9 B; in GiB it would be 111.8).
    paper = {0: 120, 1: 31.4, 2: 16.6, 3: 1.9}
    for stage, gb in paper.items():
        got = sum(model_states(7_500_000_000, stage, 64)) / 1e9
        assert abs(got - gb) / gb < 0.02, (stage, got, gb)


MEASURED = [  # ftcluster on one/two H200s, seq 2048, bf16, SDPA, packing (docs/BENCHMARKS.md, shared/REFERENCE.md)
    ("lora", "llama-3-8b", 1, 8, True, None, 43.3),
    ("lora", "llama-3-8b", 1, 4, False, None, 84.4),
    ("full", "llama-3.2-1b", 1, 8, True, 3, 44.17),
    ("full", "llama-3-8b", 2, 2, True, 3, 69.7),
    ("full", "llama-3-8b", 2, 4, True, 3, 76.7),
    ("full", "llama-3-8b", 2, 2, True, 2, 89.8),
]


@pytest.mark.parametrize("method,preset,gpus,mb,ckpt,stage,gib", MEASURED)
def test_memory_model_holds_its_calibration(method, preset, gpus, mb, ckpt, stage, gib):
    s = llama(preset)
    w = Workload(s, 2048, lora_dropout=0.0)
    lay = Layout(method, 1, gpus, mb, 1, ckpt, stage)
    if method == "lora":
        c = count_lora(s, 16, "all-linear")
        mem = per_gpu_memory(w, lay, s.total_params() + c.trainable, c.trainable, c.adapter)
    else:
        mem = per_gpu_memory(w, lay, s.total_params(), s.total_params())
    assert abs(mem.total / 2**30 - gib) / gib < 0.03, (mem.to_dict(), gib)


def test_checkpointing_and_smaller_batches_use_less_memory_and_zero_shards():
    s = llama("llama-3-8b")
    w = Workload(s, 4096)
    n = s.total_params()
    base = Layout("full", 1, 8, 4, 1, False, 3)
    full = per_gpu_memory(w, base, n, n).total
    assert per_gpu_memory(w, base.with_(gradient_checkpointing=True), n, n).total < full
    assert per_gpu_memory(w, base.with_(micro_batch_size=1), n, n).total < full
    by_stage = [per_gpu_memory(w, base.with_(zero_stage=z, gradient_checkpointing=True), n, n).total for z in (0, 1, 2, 3)]
    assert by_stage == sorted(by_stage, reverse=True)


def test_selective_checkpointing_sits_between_on_and_off():
    s = llama("llama-3-8b")
    w = Workload(s, 2048, fused_ce=True)
    n = s.total_params()
    g = GPUS["h200"]
    lay = Layout("full", 1, 2, 2, 1, True, 3)
    mem = [per_gpu_memory(w, lay.with_(gradient_checkpointing=f), n, n).total for f in (1.0, 0.75, 0.5, 0.25, 0.0)]
    assert mem == sorted(mem) and len(set(mem)) == 5  # less recompute, more memory, every step
    step = [step_seconds(w, lay.with_(gradient_checkpointing=f), g, n, n) for f in (1.0, 0.5, 0.0)]
    assert step[0] > step[1] > step[2]
    # Half the layers keep their activations: half the difference between off and on (+ the working set).
    half = per_gpu_memory(w, lay.with_(gradient_checkpointing=0.5), n, n).total
    assert half == pytest.approx((mem[0] + mem[4]) / 2, rel=0.05)


def test_planner_offers_the_least_recompute_that_fits():
    # LoRA 8B, 8 x 4096 tokens on one H200: all activations (~220 GB) do not fit; every layer
    # recomputed (~32 GB) wastes memory and a third of the step: a share of the layers fits.
    from ftcluster.plan.planner.advise import Evaluator, requested_layout, workload_of
    from ftcluster.plan.planner.shape import spec_shape

    spec = _spec(**{"seq_len: 2048": "seq_len: 4096"})
    shape = spec_shape(spec, network=False)
    ev = Evaluator(workload_of(spec, shape), GPUS["h200"], spec, None, (16, "all-linear", 0.05))
    on = ev.evaluate(requested_layout(spec, "h200").with_(gradient_checkpointing=True))
    off = ev.evaluate(on.layout.with_(gradient_checkpointing=False))
    least = ev.least_recompute(on)
    f = least.layout.gradient_checkpointing
    assert on.fits and not off.fits and least.fits and 0 < f < 1 and (f * 8).is_integer()
    assert on.step_time_s > least.step_time_s > off.step_time_s
    assert not ev.evaluate(least.layout.with_(gradient_checkpointing=f - 1 / 8)).fits  # the least
    assert f"checkpointing {f:g} of layers" in least.layout.describe()
    # The plan's alternatives carry such layouts, and its JSON the share as the spec takes it.
    p = build_plan(spec, network=False)
    shares = [d["gradient_checkpointing"] for d in plan_dict(p)["alternatives"]]
    assert any(isinstance(x, float) and 0 < x < 1 for x in shares), shares
    assert load_spec_text(BIG + "", "x.yaml").training.checkpoint_fraction == 0.0


def test_step_time_scales_with_tokens_and_recompute():
    s = llama("llama-3-8b")
    w = Workload(s, 2048)
    g = GPUS["h200"]
    lay = Layout("lora", 1, 1, 8, 1, True)
    n = s.total_params()
    t = step_seconds(w, lay, g, n, 1)
    assert step_seconds(w, lay.with_(gradient_accumulation_steps=2), g, n, 1) == pytest.approx(2 * t, rel=0.01)
    assert step_seconds(w, lay.with_(gradient_checkpointing=False), g, n, 1) < t
    # measured 2.247 s per step (docs/BENCHMARKS.md); the model stays within 20 %
    assert t == pytest.approx(2.247, rel=0.2)


# ----------------------------------------------------------------------------- guard




def ftc(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftcluster.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def _big(tmp_path: Path) -> Path:
    """BIG with its data present (validate checks that a local data path exists, from the cwd)."""
    (tmp_path / "x.jsonl").write_text('{"text": "a"}\n')
    f = tmp_path / "big.yaml"
    f.write_text(BIG)
    return f


def test_guard_refuses_what_does_not_fit_with_one_located_line(tmp_path):
    f = _big(tmp_path)
    problems = check_spec(load_spec(f))
    assert len(problems) == 1
    line = str(problems[0])
    assert line.startswith(f"{f}:7:3: training.micro_batch_size: needs ")
    assert "h100 has 74.7 GiB usable" in line and "`ftcluster plan` recommends LoRA on 1 x h100" in line
    assert "--set training.micro_batch_size=1" in line
    res = ftc("validate", str(f), cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--no-plan-check" in res.stderr
    assert ftc("validate", str(f), "--no-plan-check", cwd=tmp_path).returncode == 0
    sub = ftc("submit", str(f), "--dry-run", cwd=tmp_path)
    assert sub.returncode == 2 and "needs" in sub.stderr


def test_guard_points_at_set_overrides_and_passes_when_it_fits(tmp_path):
    f = _big(tmp_path)
    res = ftc("validate", str(f), "--set", "training.micro_batch_size=1", "--set", "training.gradient_checkpointing=true",
              cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    res = ftc("validate", str(f), "--set", "training.micro_batch_size=64", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.startswith("error: --set: training.micro_batch_size:"), res.stderr


def test_guard_does_not_guess_unknown_shapes_or_gpus():
    spec = load_spec_text(BIG.replace("random_init: {preset: llama-3-8b}", "path: s3://models/private-model"), "x.yaml")
    assert check_spec(spec) == []
    spec = load_spec_text(BIG.replace("gpu_type: h100", "gpu_type: tpu-v9"), "x.yaml")
    assert check_spec(spec) == []


@pytest.mark.slow
def test_every_example_validates_and_fits(tmp_path):
    from tests.support.corpora import prepared_stand_in

    for f in sorted((ROOT / "examples").glob("*.yaml")):
        res = ftc("validate", str(f.relative_to(ROOT)), *prepared_stand_in(f, tmp_path))
        assert res.returncode == 0, res.stderr


# ----------------------------------------------------------------------------- JSON and recommendation


def test_plan_json_follows_the_schema():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((ROOT / "docs/plan.schema.json").read_text())
    for f in ("examples/quickstart.yaml", "examples/full-slurm-2node.yaml"):
        res = ftc("plan", f, "--json", "--offline")
        assert res.returncode == 0, res.stderr
        doc = json.loads(res.stdout)
        jsonschema.validate(doc, schema)
        assert doc["requested"]["per_gpu_memory_bytes"]["total"] > 0
    pipe = json.loads(ftc("plan", "examples/pipeline-cpt-then-lora.yaml", "--json", "--offline").stdout)
    assert [d["requested"]["method"] for d in pipe] == ["full", "lora"]


def _spec(**over: str):
    text = BIG.replace("gpu_type: h100", "gpu_type: h200").replace("seq_len: 8192", "seq_len: 2048")
    for k, v in over.items():
        text = text.replace(k, v)
    return load_spec_text(text, "x.yaml")


def test_recommendation_follows_practice():
    p = build_plan(_spec(**{"data: {train: x.jsonl": "data: {format: chat, train: x.jsonl"}), network=False)
    assert p.recommendation.layout.method == "lora" and "chat" in p.reason
    full_text = _spec(**{"method: lora": "method: full", "data: {train: x.jsonl": "data: {format: text, train: x.jsonl"})
    p = build_plan(full_text, network=False)
    assert p.recommendation.layout.method == "full" and "continual pre-training" in p.reason
    p = build_plan(_spec(**{"random_init: {preset: llama-3-8b}": "path: s3://m/llama-3.1-8b\ntokenizer: {hub_id: x/y}"}),
                   network=False)
    assert p.recommendation.layout.method == "full" and "tokenizer" in p.reason
    text = BIG.replace("gpu_type: h100", "gpu_type: h200").replace("seq_len: 8192", "seq_len: 2048, format: text")
    text += "variants:\n  - {name: cpt}\n  - {name: chat, set: {data.format: chat}}\n"
    p = build_plan(load_spec_text(text, "x.yaml"), network=False)
    assert "hybrid" in p.reason
    assert p.recommendation.fits


def test_local_data_tokens_and_steps_are_counted():
    spec = load_spec(ROOT / "examples/quickstart.yaml")
    p = build_plan(spec, network=False)
    assert p.data.how == "counted" and 30_000 < p.data.tokens < 200_000
    d = plan_dict(p)
    assert d["requested"]["steps"] == 200  # max_steps wins


def test_price_file_and_price_flag(tmp_path, monkeypatch):
    f = tmp_path / "prices.yaml"
    f.write_text("nvidia-h200: 1.5\nmy-gpu: {price_per_hour: 0.5, memory_gb: 48, bf16_tflops: 300}\n")
    monkeypatch.setenv("FTCLUSTER_PRICES", str(f))
    table = load_gpus()
    assert table["h200"].price_per_hour == 1.5 and table["my-gpu"].memory_bytes == 48_000_000_000
    p = build_plan(_spec(), network=False, price=9.0)
    assert p.gpu.price_per_hour == 9.0
    f.write_text("h200: {cost: 1}\n")
    res = ftc("plan", "examples/quickstart.yaml", env={"FTCLUSTER_PRICES": str(f)})
    assert res.returncode == 1 and "unknown key 'cost'" in res.stderr and "Traceback" not in res.stderr


# ----------------------------------------------------------------------------- accuracy (issue #11)


RUNS_JSONL = [ROOT / "benchmarks/results/h200x2-2026-11-30-final/plan_accuracy.jsonl",
              ROOT / "benchmarks/results/h200x2-2026-11-30-accuracy/plan_accuracy.jsonl"]
# Counted runs whose step time misses +-20 %, and why (docs/BENCHMARKS.md, "Planner accuracy").
KNOWN_STEP_MISSES = {"#19"}  # 1B ZeRO-3 1 GPU: first job on a cold machine (plain path's warm run #6: -5.7 %)


def _accuracy():
    import importlib.util

    spec = importlib.util.spec_from_file_location("plan_accuracy", ROOT / "benchmarks/plan_accuracy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_planner_reproduces_the_measured_runs():
    acc = _accuracy()
    rows = acc.evaluate(acc.load_runs(RUNS_JSONL))
    counted = [r for r in rows if r["runtime"] != "probe"]
    assert len(rows) == 23 and len(counted) == 19
    assert {r["runtime"] for r in counted} == {"current", "plain"}
    assert sum(r["runtime"] == "current" for r in counted) == 11
    for r in counted:
        assert abs(r["mem_error"]) <= acc.MEM_TOL, r
        if r["step_error"] is not None and r["run"] not in KNOWN_STEP_MISSES:
            assert abs(r["step_error"]) <= 0.11, r  # the refit's worst hit: #18, -10.1 %
    misses = {r["run"] for r in counted if r["step_error"] is not None and abs(r["step_error"]) > acc.TIME_TOL}
    assert misses == KNOWN_STEP_MISSES  # a fixed miss is taken off the list
    # the target: >= 10 current-runtime configurations within +-20 %
    assert sum(r["runtime"] == "current" and abs(r["step_error"]) <= acc.TIME_TOL for r in counted) >= 10


SESSION3 = sorted((ROOT / "benchmarks/results").glob("h200x2-2026-11-30-selective/*/plan_accuracy.jsonl")) + sorted(
    (ROOT / "benchmarks/results").glob("h200x2-2026-11-30-ckpt-*/*/plan_accuracy.jsonl"))
# Without checkpointing (and at micro-batch 1) the step is set by communication that compute no
# longer hides, which the planner models only in part (docs/BENCHMARKS.md, "Planner accuracy").
SESSION3_STEP_MISSES = {"8B full Z2 2g mb2 2k no-ckpt", "8B LoRA 1g mb1 2k no-ckpt", "8B full Z3 2g mb1 2k ckpt"}


def test_planner_predicts_selective_checkpointing_runs():
    acc = _accuracy()
    rows = [r for r in acc.evaluate(acc.load_runs(SESSION3)) if r["runtime"] == "current"]
    assert len(rows) == 13 and any("ckpt 0.125" in r["config"] for r in rows) and any("ckpt 0.5" in r["config"] for r in rows)
    for r in rows:
        assert abs(r["mem_error"]) <= acc.MEM_TOL, r  # every one within +-10 %, selective shares too
    misses = {r["config"] for r in rows if abs(r["step_error"]) > acc.TIME_TOL}
    assert misses == SESSION3_STEP_MISSES


def test_speedups_modelled_as_the_runtime_decides_them():
    from ftcluster.plan import speedups as rules
    from ftcluster.plan.planner.advise import speedups_of
    from ftcluster.plan.planner.memory import zero3_keeps
    from ftcluster.train import speedups

    # one set of rules: the runtime asks the module the planner models (no copy of its constants to drift)
    assert speedups.decisions is rules and rules.FUSED_CE_MODEL_TYPES and 0 < rules.KEEP_FRACTION < 1
    s = llama("llama-3-8b")
    n = s.total_params()
    w = Workload(s, 2048, zero3_keep=True)
    cfg = {"zero_optimization": {"stage": 3}}
    for gpus, mem in ((2, GPUS["h200"].memory_bytes), (2, GPUS["h100"].memory_bytes), (8, GPUS["h100"].memory_bytes)):
        lay = Layout("full", 1, gpus, 2, 1, True, 3)
        assert zero3_keeps(w, lay, n, mem) == bool(speedups.zero3_keep_settings(cfg, n, gpus, mem)), (gpus, mem)
    spec = load_spec_text(BIG, "x.yaml")
    assert speedups_of(spec, s) == (True, True)
    off = load_spec_text(BIG + "env: {FTCLUSTER_FUSED_CE: '0', FTCLUSTER_ZERO3_KEEP: 'off'}\n", "x.yaml")
    assert speedups_of(off, s) == (False, False)
    assert speedups_of(spec, s, fused_ce=False)[0] is False
    qwen = shape_from_config({"model_type": "qwen2", **PRESET_SHAPES["llama-3-8b"]})
    assert speedups_of(spec, qwen)[0] is False


def test_fused_loss_and_keep_change_memory_as_measured():
    # 8B ZeRO-3 on 2 H200s, micro-batch 2: plain 69.7 GiB, fused + keep 77.9 GiB (plan_accuracy.jsonl)
    s = llama("llama-3-8b")
    n = s.total_params()
    lay = Layout("full", 1, 2, 2, 1, True, 3)
    plain = per_gpu_memory(Workload(s, 2048), lay, n, n).total
    fused = per_gpu_memory(Workload(s, 2048, fused_ce=True), lay, n, n)
    kept = per_gpu_memory(Workload(s, 2048, fused_ce=True), lay, n, n, keep=True).total
    assert fused.total < plain and fused.phase == "optimizer_step"  # the loss no longer sets the peak
    assert kept - fused.total > 8 * 2**30  # the whole 16-bit model stays gathered in backward
    g = GPUS["h200"]
    assert step_seconds(Workload(s, 2048, fused_ce=True), lay, g, n, n, keep=True) < step_seconds(Workload(s, 2048), lay, g, n, n)


def test_plan_cli_fused_ce_switch(tmp_path):
    f = _big(tmp_path)
    on = json.loads(ftc("plan", str(f), "--json", "--offline", cwd=tmp_path).stdout)
    off = json.loads(ftc("plan", str(f), "--json", "--offline", "--fused-ce", "off", cwd=tmp_path).stdout)
    mem = [p["requested"]["per_gpu_memory_bytes"]["logits"] for p in (on, off)]
    assert mem[0] < mem[1] / 10
    assert any("FTCLUSTER_FUSED_CE" in n for n in on["notes"]) and not any("FTCLUSTER_FUSED_CE" in n for n in off["notes"])


@pytest.mark.slow
def test_unreadable_remote_config_is_one_line_or_falls_back_to_the_name(tmp_path):
    """`plan` reads a remote config.json; a store that refuses (here: no credentials) is one line with
    the fix, never a traceback; a model known by its name is planned with that shape instead."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    root = Path(__file__).resolve().parents[3]
    job = tmp_path / "job.yaml"
    job.write_text(textwrap.dedent(f"""\
        name: x
        method: lora
        model: {{path: "s3://no-such-bucket/some-model"}}
        data: {{train: {root}/examples/data/instruct.jsonl}}
        output: {{uri: file://{tmp_path}/out}}
        resources: {{gpus_per_node: 1, gpu_type: h200}}
        """))
    run = lambda: subprocess.run([sys.executable, "-m", "ftcluster.cli", "plan", str(job)],  # noqa: E731
                                 capture_output=True, text=True, env=env, timeout=120)
    res = run()
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1 and "cannot read s3://no-such-bucket/some-model/config.json" in res.stderr
    assert "credentials" in res.stderr and "--offline" in res.stderr
    job.write_text(job.read_text().replace("some-model", "llama-3.1-8b"))
    res = run()
    assert res.returncode == 0, res.stderr
    assert "shape taken from the name 'llama-3.1-8b'" in " ".join(res.stdout.split())


def test_varlen_attention_modelled_as_the_runtime_decides_it():
    """train/varlen.py runs FlashAttention-2's varlen kernel for SDPA models on a GPU: the planner
    models that as flash_attention_2 (no mask, GQA's key/values kept, causal work), which the
    session-4 LoRA runs measured: 42.0 GB with the mask, 39.8 GB with varlen (mb 2, no ckpt)."""
    from ftcluster.plan.planner.advise import varlen_of, workload_of

    s = llama("llama-3-8b")
    spec = load_spec_text(BIG, "x.yaml")
    assert varlen_of(spec) and workload_of(spec, s).attn_implementation == "flash_attention_2"
    off = load_spec_text(BIG + "env: {FTCLUSTER_VARLEN: '0'}\n", "x.yaml")
    assert not varlen_of(off) and workload_of(off, s).attn_implementation == "sdpa"
    cpu = load_spec_text(BIG.replace("gpus_per_node: 1", "gpus_per_node: 0"), "x.yaml")
    assert not varlen_of(cpu)
    eager = load_spec_text(BIG.replace("random_init: {preset: llama-3-8b}",
                                       "random_init: {preset: llama-3-8b}\n  attn_implementation: eager"), "x.yaml")
    assert workload_of(eager, s).attn_implementation == "eager"
    lay = Layout("lora", 1, 1, 2, 1, 0.0, None)
    c = count_lora(s, 16, "all-linear")
    mem = {a: per_gpu_memory(Workload(s, 2048, attn_implementation=a, fused_ce=True, lora_dropout=0.0), lay,
                             s.total_params() + c.trainable, c.trainable, c.adapter).total / 1e9
           for a in ("sdpa", "flash_attention_2")}
    assert mem["sdpa"] == pytest.approx(42.0, rel=0.1) and mem["flash_attention_2"] == pytest.approx(39.8, rel=0.1)
    assert 1.0 < mem["sdpa"] - mem["flash_attention_2"] < 3.0  # measured: 2.2 GB


SESSION4 = sorted((ROOT / "benchmarks/results").glob("h200-2026-12-01-varlen-compile/call*/*/plan_accuracy.jsonl"))
# 1B at micro-batch 8 on one GPU, +53 %. Not the attention: modelling the corpus's example span
# (Workload.attention_span, the planner's estimate ~1,100 tokens) moves the prediction from 0.488 s
# to 0.478 (measured 0.318); the small model's non-matmul share is what the model gets wrong there.
SESSION4_STEP_MISSES = {"1B full Z2 1g mb8 2k ckpt"}


def test_planner_predicts_the_varlen_runtime():
    """Session 4 (one H200, varlen attention on, the 8B shape cut to 8 layers for full
    fine-tuning): memory within +-10 % on every counted run, the SDPA-mask runs and (since the
    planner models training.compile) the four compiled runs included."""
    acc = _accuracy()
    rows = [r for r in acc.evaluate(acc.load_runs(SESSION4)) if r["runtime"] == "current"]
    assert len(rows) == 12 and sum(r["config"].endswith(" compiled") for r in rows) == 4
    assert any(r["overrides"] == {"env.FTCLUSTER_VARLEN": 0} for r in rows)  # the mask path, modelled as sdpa
    for r in rows:
        assert abs(r["mem_error"]) <= acc.MEM_TOL, r
    assert {r["config"] for r in rows if abs(r["step_error"]) > acc.TIME_TOL} == SESSION4_STEP_MISSES


def test_a_prepared_corpus_gives_exact_tokens_and_one_epoch_of_steps(tmp_path):
    """The planner reads the manifest: tokens, and steps of one epoch = full blocks / global batch."""
    from ftcluster.corpus.synthetic import write_synthetic

    corpus = tmp_path / "corpus"
    m = write_synthetic(str(corpus), 3 * 100_000 + 5_000, vocab=32000, shard_tokens=100_000)
    text = BIG.replace("gpu_type: h100", "gpu_type: h200").replace("seq_len: 8192", "seq_len: 2048, format: text")
    spec = load_spec_text(text.replace("train: x.jsonl", f"train: {corpus}"), "x.yaml")
    p = build_plan(spec, network=False)
    assert p.data.how == "read from the corpus manifest" and p.data.tokens == m.tokens == 305_000
    blocks = 3 * (100_000 // 2048) + 5_000 // 2048
    per_step = spec.training.micro_batch_size * spec.training.gradient_accumulation_steps  # one GPU requested
    d = plan_dict(p)
    assert d["data"] == {"tokens": 305_000, "examples": m.documents, "how": "read from the corpus manifest"}
    assert blocks // per_step <= d["requested"]["steps"] <= -(-blocks // per_step) + 1


def test_a_corpus_not_prepared_yet_is_estimated_from_its_source(tmp_path):
    text = BIG.replace("gpu_type: h100", "gpu_type: h200").replace("seq_len: 8192", "seq_len: 2048, format: text")
    src = tmp_path / "raw.jsonl"
    src.write_text("".join('{"text": "%s"}\n' % ("word " * 200) for _ in range(100)))
    text = text.replace("train: x.jsonl", f"train: {tmp_path / 'corpus'}, prepare: {{source: {src}}}")
    p = build_plan(load_spec_text(text, "x.yaml"), network=False)
    assert p.data.how.endswith("of data.prepare.source (not prepared yet)") and 20_000 < p.data.tokens < 30_000


def test_zero3_collectives_pass_the_network_and_deepspeeds_path_in_series():
    """One H200 node keeps the measured 8B rate (0.08 of NVLink's 370 GB/s); across nodes the slower link joins
    the series: slower than either stage alone, and far above the single-node share applied to the
    inter-node link (the model that predicted a 70B step on 8 nodes at 950 s)."""
    from ftcluster.plan.planner import speed
    from ftcluster.plan.planner.gpus import INTER_NODE_GBPS, load_gpus
    from ftcluster.plan.planner.layout import Layout

    h200 = load_gpus()["h200"]
    one = Layout("full", 1, 8, 2, 1, 1.0, 3)
    assert speed.zero3_gbps(h200, one) == pytest.approx(0.08 * h200.link_gbps, rel=0.01)
    two = one.with_(nodes=2)
    net = INTER_NODE_GBPS * speed.NCCL_BUS_EFFICIENCY
    assert speed.zero3_gbps(h200, two) < min(net, speed.ZERO3_ENGINE_GBPS)
    assert speed.zero3_gbps(h200, two) > 4 * 0.08 * INTER_NODE_GBPS


def test_fsdp2_is_planned_at_the_networks_rate_and_gathers_per_layer():
    """An fsdp job's layouts carry the engine: its collectives skip DeepSpeed's gather path, and it gathers once
    per decoder layer, not per module; its plan is at most as slow as the same layout on DeepSpeed."""
    import json

    import yaml

    from ftcluster.plan.planner import speed
    from ftcluster.plan.planner.advise import build_plan, workload_of
    from ftcluster.plan.planner.gpus import load_gpus
    from ftcluster.spec.loader import load_spec_text

    doc = yaml.safe_load((ROOT / "examples" / "full-70b-slurm.yaml").read_text())
    ds = build_plan(load_spec_text(json.dumps(doc), "ds"), network=False)
    doc.pop("deepspeed")
    doc["engine"] = "fsdp"
    fs_spec = load_spec_text(json.dumps(doc), "fsdp")
    fs = build_plan(fs_spec, network=False)
    assert fs.requested.layout.engine == "fsdp" and ds.requested.layout.engine == "deepspeed"
    # FSDP2's own accounting (memory._fsdp_memory): fp32 parameter shards (ZeRO-3: 16-bit), no gradients at
    # the loss's peak, a smaller optimizer (the shards are the master weights): less than ZeRO-3 in all
    assert fs.requested.memory.weights == 2 * ds.requested.memory.weights
    assert fs.requested.memory.total < ds.requested.memory.total
    assert fs.requested.step_time_s < ds.requested.step_time_s
    h200 = load_gpus()["h200"]
    lay = fs.requested.layout
    assert speed.zero3_gbps(h200, lay) == pytest.approx(45.0 * speed.NCCL_BUS_EFFICIENCY)
    w = workload_of(fs_spec, fs.shape)
    assert speed.zero3_gather_seconds(w, lay) == pytest.approx(2 * (fs.shape.num_hidden_layers + 2)
                                                               * speed.ZERO3_GATHER_LATENCY_S)
    assert speed.zero3_gather_seconds(w, lay.with_(engine="deepspeed")) == pytest.approx(
        2 * (speed.MODULES_PER_LAYER * fs.shape.num_hidden_layers + 2) * speed.ZERO3_GATHER_LATENCY_S)


def test_varlen_attention_work_follows_the_examples_length(tmp_path):
    """Packed examples attend only to themselves under the varlen kernel: the planner's attention work
    follows the corpus's token-weighted example length (counted from the jsonl), capped at seq_len."""
    from ftcluster.plan.planner.data import estimate_tokens

    def corpus(name: str, words: int, n: int = 200) -> Path:
        p = tmp_path / f"{name}.jsonl"
        p.write_text("".join(json.dumps({"text": " ".join(["word"] * words)}) + "\n" for _ in range(n)))
        return p

    def job(path: Path, seq: int = 8192):
        return load_spec_text(json.dumps({
            "name": "span", "method": "lora", "model": {"random_init": {"preset": "llama-3-8b"}},
            "data": {"train": str(path), "format": "text", "seq_len": seq, "packing": True},
            "training": {"max_steps": 10}, "resources": {"gpus_per_node": 1, "gpu_type": "h200"},
            "output": {"uri": "file:///nowhere"}}), "span.yaml")

    short, long_ = job(corpus("short", 60)), job(corpus("long", 20000))
    span_short = estimate_tokens(short.data).attention_span(8192)
    assert span_short is not None and 60 < span_short < 200  # ~4 characters a token plus the eos
    assert estimate_tokens(long_.data).attention_span(8192) == pytest.approx(8192, rel=0.05)
    p_short, p_long = build_plan(short, network=False), build_plan(long_, network=False)
    assert p_short.requested.step_time_s < 0.92 * p_long.requested.step_time_s  # 8B at seq 8192: attention ~12 %
    assert p_short.requested.memory.total == p_long.requested.memory.total  # memory does not depend on it
