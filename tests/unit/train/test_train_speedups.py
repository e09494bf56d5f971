"""The optional speed-ups (ftcluster/train/speedups.py): what each decides, and that the fused
loss path computes the same sum as the plain one. Real tiny Llama on CPU; the GPU kernels
themselves are measured by benchmarks/speed.py (docs/BENCHMARKS.md)."""

from __future__ import annotations

import os
import types
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from ftcluster.train import model as M  # noqa: E402
from ftcluster.train import speedups as S  # noqa: E402
from ftcluster.train.engines import base as E  # noqa: E402
from tests.unit.train.test_train_units import Tok, batch, lora_spec  # noqa: E402

pytestmark = pytest.mark.train
CPU = torch.device("cpu")
GB = 10**9


def z3(**zero):
    return {"zero_optimization": {"stage": 3, "overlap_comm": True, **zero}}


def test_zero3_keeps_gathered_weights_only_when_they_fit():
    n8b = 8_030_000_000
    keep = S.zero3_keep_settings(z3(), n8b, world_size=2, gpu_bytes=143 * GB)  # 16 + 64 GB <= 86 GB
    assert keep == {"stage3_max_live_parameters": n8b, "stage3_max_reuse_distance": n8b}
    assert S.zero3_keep_settings(z3(), n8b, world_size=1, gpu_bytes=143 * GB) == {}  # 16 + 128 GB
    assert S.zero3_keep_settings(z3(), n8b, world_size=2, gpu_bytes=80 * GB) == {}
    small = S.zero3_keep_settings(z3(), 1_000, world_size=1, gpu_bytes=80 * GB)
    assert small["stage3_max_live_parameters"] == 1_000_000_000  # never below DeepSpeed's own default


@pytest.mark.parametrize("cfg", [
    z3(stage3_max_live_parameters=5),  # the user's config file decides
    z3(stage3_max_reuse_distance=5),
    z3(offload_param={"device": "cpu"}),  # offloaded weights live on the host
    {"zero_optimization": {"stage": 2}},
])
def test_zero3_keep_leaves_user_settings_offload_and_other_stages_alone(cfg):
    assert S.zero3_keep_settings(cfg, 1_000, world_size=2, gpu_bytes=143 * GB) == {}


def test_tune_ds_config_is_a_no_op_on_cpu():
    cfg = z3()
    assert S.tune_ds_config(cfg, torch.nn.Linear(2, 2), CPU, 2) is cfg


def test_nccl_protocol_default_only_for_multi_gpu_and_never_over_the_user(monkeypatch):
    monkeypatch.delenv("NCCL_PROTO", raising=False)
    monkeypatch.delenv("FTCLUSTER_NCCL_PROTO", raising=False)
    S.nccl_defaults(use_cuda=False, world_size=2)
    S.nccl_defaults(use_cuda=True, world_size=1)
    assert "NCCL_PROTO" not in os.environ
    S.nccl_defaults(use_cuda=True, world_size=2)
    assert os.environ["NCCL_PROTO"] == "Simple"
    monkeypatch.setenv("NCCL_PROTO", "LL128")
    S.nccl_defaults(use_cuda=True, world_size=2)
    assert os.environ["NCCL_PROTO"] == "LL128"
    monkeypatch.delenv("NCCL_PROTO")
    monkeypatch.setenv("FTCLUSTER_NCCL_PROTO", "auto")
    S.nccl_defaults(use_cuda=True, world_size=2)
    assert "NCCL_PROTO" not in os.environ


def test_fused_kernels_stay_off_on_cpu():
    model = M.load_base_model(lora_spec(), Tok(), torch.float32, CPU, Path("/nonexistent"))
    assert model.ftcluster_fused_ce is False
    assert S.apply_fused_kernels(model, CPU) is False


def test_fused_loss_path_passes_the_same_labels_as_the_plain_path():
    """The fused path hands the model shifted labels (packing boundaries masked) and
    num_items_in_batch=1; a forward that honours that contract the way Liger's does (sum of
    CE over shift_labels / num_items) must give exactly the plain path's sum and count."""
    model = M.load_base_model(lora_spec(), Tok(), torch.float32, CPU, Path("/nonexistent"))
    plain_forward = model.forward

    def fused_forward(self, input_ids=None, shift_labels=None, num_items_in_batch=None, **kw):
        out = plain_forward(input_ids=input_ids, **kw)
        if shift_labels is not None:
            ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]),
                                                   shift_labels.reshape(-1), ignore_index=-100, reduction="sum")
            out.loss = ce / num_items_in_batch
        return out

    a, b = [5, 17, 33, 90, 4], [7, 8, 100, 250, 31, 12, 3]
    packed = batch([a + b, b + a], [list(range(5)) + list(range(7)), list(range(7)) + list(range(5))])
    packed["labels"][1, :3] = -100  # an instruction-style prompt mask
    with torch.no_grad():
        ce_plain, n_plain = E.token_ce_sum(model, packed, CPU)
        model.forward = types.MethodType(fused_forward, model)
        ce_fused, n_fused = E.token_ce_sum(model, packed, CPU, fused=True)
    assert int(n_fused) == int(n_plain) == 18
    assert float(ce_fused) == pytest.approx(float(ce_plain), rel=1e-6)
    model.eval()  # evaluation keeps the logits path (the forward then gets no labels)
    with torch.no_grad():
        ce_eval, _ = E.token_ce_sum(model, packed, CPU, fused=True)
    assert float(ce_eval) == pytest.approx(float(ce_plain), rel=1e-6)


def test_liger_optional_backend_noise_is_dropped_and_other_failures_kept():
    """The message liger-kernel 0.8.5 logs (backends/registry.py) for its optional CuTe-DSL backend."""
    import logging

    f = S._OptionalBackendNoise()
    msg = "Backend impl '%s' for op '%s' could not be imported: %s: %s"

    def rec(path: str) -> logging.LogRecord:
        return logging.LogRecord(S.LIGER_REGISTRY_LOGGER, logging.WARNING, "registry.py", 323, msg,
                                 (path, "rope", "ImportError", "cutedsl backend requires ..."), None)

    assert f.filter(rec("liger_kernel.ops.backends._cutedsl.rope")) is False
    assert f.filter(rec("liger_kernel.ops.backends._triton.rope")) is True
    assert f.filter(logging.LogRecord("x", logging.WARNING, "f", 1, "something else", None, None)) is True
