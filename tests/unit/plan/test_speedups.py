"""The speed-up decisions (ftcluster/plan/speedups.py): torch-free, and the one place both the
launch plan and the training runtime (train/speedups.py, train/varlen.py) ask. The runtime's
functions are called here with stand-in models and devices (no torch needed): a patched decision
must change what the runtime does, so a runtime that decides on its own fails these tests."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from ftcluster.plan import speedups as S

CUDA, CPU = SimpleNamespace(type="cuda"), SimpleNamespace(type="cpu")
GB = 10**9


@pytest.mark.parametrize(("gpu", "model_type", "env", "on"), [
    (True, "llama", {}, True), (False, "llama", {}, False), (True, "qwen2", {}, False),
    (True, "llama", {"FTCLUSTER_FUSED_CE": "0"}, False), (True, "llama", {"FTCLUSTER_FUSED_CE": " Off "}, False),
    (True, "llama", {"FTCLUSTER_FUSED_CE": "1"}, True),
])
def test_fused_ce(gpu, model_type, env, on):
    assert S.fused_ce_on(gpu, model_type, env) is on


def test_varlen_keep_and_nccl():
    assert S.varlen_on(True, "sdpa", {}) and not S.varlen_on(True, "eager", {}) and not S.varlen_on(False, "sdpa", {})
    assert not S.varlen_on(True, "sdpa", {"FTCLUSTER_VARLEN": "no"})
    assert S.zero3_keep_on(True, {}) and not S.zero3_keep_on(True, {"FTCLUSTER_ZERO3_KEEP": "false"})
    n8b = 8_030_000_000
    assert S.zero3_keep_fits(n8b, 2, 143 * GB) and not S.zero3_keep_fits(n8b, 1, 143 * GB)
    assert S.nccl_proto(True, 2, {}) == "Simple" and S.nccl_proto(True, 1, {}) is None
    assert S.nccl_proto(True, 2, {"NCCL_PROTO": "LL"}) is None and S.nccl_proto(True, 2, {"FTCLUSTER_NCCL_PROTO": "auto"}) is None
    assert S.nccl_proto(True, 2, {"FTCLUSTER_NCCL_PROTO": "LL128"}) == "LL128"


def test_the_runtime_asks_the_plan_module(monkeypatch):
    """train/speedups.py and train/varlen.py switch on exactly what ftcluster.plan.speedups decides."""
    from ftcluster.train import speedups as T
    from ftcluster.train import varlen as V

    seen = []
    monkeypatch.setattr(S, "fused_ce_on", lambda gpu, mt, env: seen.append(("fused", gpu, mt)) or False)
    monkeypatch.setattr(S, "varlen_on", lambda gpu, attn, env: seen.append(("varlen", gpu, attn)) or False)
    monkeypatch.setattr(S, "zero3_keep_on", lambda gpu, env: seen.append(("keep", gpu)) or False)
    monkeypatch.setattr(S, "nccl_proto", lambda gpu, world, env: seen.append(("nccl", gpu, world)) or None)
    model = SimpleNamespace(config=SimpleNamespace(model_type="llama", _attn_implementation="sdpa"))
    assert T.apply_fused_kernels(model, CUDA) is False
    assert V.apply_varlen_attention(model, CUDA) is False and model.ftcluster_varlen is False
    cfg = {"zero_optimization": {"stage": 3}}
    assert T.tune_ds_config(cfg, model, CUDA, 2) is cfg
    monkeypatch.delenv("NCCL_PROTO", raising=False)
    T.nccl_defaults(True, 8)
    assert "NCCL_PROTO" not in os.environ
    assert seen == [("fused", True, "llama"), ("varlen", True, "sdpa"), ("keep", True), ("nccl", True, 8)]
    # and the fit: one predicate for the runtime's settings and the planner's memory model
    monkeypatch.setattr(S, "zero3_keep_fits", lambda n, world, gpu_bytes: False)
    assert T.zero3_keep_settings(cfg, 1_000, 2, 143 * GB) == {}
    from ftcluster.plan.planner.layout import Layout, Workload
    from ftcluster.plan.planner.memory import zero3_keeps
    from ftcluster.plan.planner.shape import PRESET_SHAPES, shape_from_config

    shape = shape_from_config({"model_type": "llama", **PRESET_SHAPES["llama-3-8b"]})
    assert not zero3_keeps(Workload(shape, 2048, zero3_keep=True), Layout("full", 1, 2, 1, 1, True, 3), 1_000, 143 * GB)


def test_decide_from_a_spec_matches_the_predicates():
    from ftcluster.spec.loader import load_spec

    from .test_launch_plan import EXAMPLES

    spec = load_spec(EXAMPLES / "lora-slurm.yaml")
    d = S.decide(spec)
    gpu = spec.resources.gpus_per_node > 0
    assert d.fused_ce_for("llama") == S.fused_ce_on(gpu, "llama", spec.env)
    assert d.fused_ce_for("qwen2") is False
    assert d.varlen == S.varlen_on(gpu, spec.model.attn_implementation, spec.env)
    assert d.compile == S.compile_on(gpu, spec.training.compile, zero3=False) and d.to_dict()["compile"] == d.compile
    assert d.liger_kernels == (not d.compile)
