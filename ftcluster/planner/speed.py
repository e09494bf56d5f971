"""Step time: FLOPs at a calibrated fraction of the GPU's peak, the loss's memory traffic,
the optimizer step, and whatever communication compute does not hide.

FLOPs per token (Kaplan et al. 2020; Narayanan et al. 2021): a forward pass costs 2N for the N
parameters in matrix multiplies plus causal attention ``2 * layers * seq * q_dim``. Full
fine-tuning's backward costs twice the forward (gradients for activations and for weights);
a frozen base (LoRA) skips the weight gradients, so its backward costs about one forward.
Gradient checkpointing adds one more forward.

``MFU`` is calibrated on ftcluster's own runs on H200s: the plain path's on the runs before
train/speedups.py (LoRA 8B with and without checkpointing, ZeRO-3 1B on 1 GPU), the fused
path's on the runs after it (LoRA 8B micro-batch 8; ZeRO-2 and ZeRO-3 8B on 2 GPUs);
benchmarks/plan_accuracy.py prints predicted against measured (docs/BENCHMARKS.md, "Planner
accuracy").
Other GPU types are assumed to reach the same fraction of their own peak.
"""

from __future__ import annotations

from .gpus import INTER_NODE_GBPS, PCIE_GBPS, Gpu
from .layout import Layout, Workload

# Fraction of dense bf16 peak reached, by (method, fused_ce). The plain path's from the runs
# before train/speedups.py; the fused path's (Liger's fused loss, RMSNorm, SwiGLU and RoPE
# kernels cut the elementwise traffic the matmuls wait on) from the runs after it.
MFU = {("lora", False): 0.345, ("full", False): 0.38, ("lora", True): 0.44, ("full", True): 0.48}
CE_BYTES_PER_LOGIT = {False: 40,  # fp32 upcast, log_softmax, its backward and the 16-bit casts, read + written
                      True: 10}  # Liger: 16-bit chunk written, read by the kernel, gradient written in place, read twice
# Share of the link bandwidth that ZeRO-3's per-module all-gathers and reduce-scatters (20-100
# MB each, issued from hooks between kernels) reach: ~30 GB/s of the H200's 370. Fit to the two
# steps that expose it (8B, 2 GPUs, micro-batch 2: 0.806 s with the speed-ups, 0.842 s on the
# plain path with NCCL Simple; at micro-batch 4 compute hides it): the first comes out 13 % low,
# the second 20 % high. The least certain constant here; re-measure it on 8-GPU nodes.
ZERO3_LINK_EFFICIENCY = 0.08
HBM_EFFICIENCY = 0.8
OVERLAP = 0.8  # share of compute time that hides ZeRO's collectives (overlap_comm)
CPU_ADAM_PARAMS_PER_S = 1.0e9  # DeepSpeedCPUAdam per process
ADAM_BYTES_PER_PARAM = 40  # fp32 master/m/v/grad read and written, the sqrt scratch, the 16-bit copy
# Fixed seconds per decoder layer per micro-batch (kernel launches, Python, checkpoint hooks):
# what makes small micro-batches slow. From the plain-stack LoRA 8B runs at micro-batch 1 and
# 4/8 (shared/REFERENCE.md): 0.8 ms without and 4.7 ms with checkpointing; full fine-tuning
# launches fewer small kernels (no adapters), assumed half.
LAYER_OVERHEAD_S = {("lora", False): 0.8e-3, ("lora", True): 4.7e-3, ("full", False): 0.4e-3, ("full", True): 2.3e-3}


def flops_per_token(w: Workload, method: str, checkpointing: bool) -> float:
    """Training FLOPs per token of the micro-batch."""
    s = w.shape
    fwd = 2.0 * s.matmul_params() + 2.0 * s.num_hidden_layers * w.seq_len * s.q_dim
    passes = (3.0 if method == "full" else 2.0) + (1.0 if checkpointing else 0.0)
    return fwd * passes


def _bus_gbps(gpu: Gpu, lay: Layout) -> float:
    return min(gpu.link_gbps, INTER_NODE_GBPS) if lay.nodes > 1 else gpu.link_gbps


def comm_seconds(w: Workload, lay: Layout, gpu: Gpu, params: int, trainable: int,
                 keep: bool = False) -> tuple[float, float]:
    """(per micro-batch, per optimizer step) seconds of collective traffic on the slowest link.

    Ring collectives move (n-1)/n of the buffer per GPU. ZeRO-3 gathers the 16-bit weights for
    forward and again for backward and reduce-scatters gradients every micro-batch; ZeRO-1/2
    reduce gradients every micro-batch and gather the updated weights once per step; DDP
    (LoRA, ZeRO-0) all-reduces (twice the bytes) at the step. ``keep``: ZeRO-3 keeps the
    weights gathered in forward for backward, so it gathers once.
    """
    n = lay.world
    if n == 1:
        return 0.0, 0.0
    ring = (n - 1) / n
    bw = _bus_gbps(gpu, lay) * 1e9
    a = w.act_bytes
    if lay.method == "lora":
        return 0.0, 2 * ring * 4 * trainable / bw
    stage = lay.zero_stage or 0
    if stage == 3:
        return (2 if keep else 3) * ring * a * params / (bw * ZERO3_LINK_EFFICIENCY), 0.0
    if stage in (1, 2):
        return ring * a * params / bw, ring * a * params / bw
    return 0.0, 2 * ring * a * params / bw


def step_seconds(w: Workload, lay: Layout, gpu: Gpu, params: int, trainable: int, keep: bool = False) -> float:
    """Seconds per optimizer step on every GPU of the layout (``keep``: memory.zero3_keeps)."""
    tokens = lay.micro_batch_size * w.seq_len
    peak = gpu.bf16_tflops * 1e12 * (0.5 if w.precision == "fp32" else 1.0)  # TF32 tensor cores
    compute = tokens * flops_per_token(w, lay.method, lay.gradient_checkpointing) / (peak * MFU[(lay.method, w.fused_ce)])
    compute += tokens * w.shape.vocab_size * CE_BYTES_PER_LOGIT[w.fused_ce] / (gpu.hbm_tbps * 1e12 * HBM_EFFICIENCY)
    compute += w.shape.num_hidden_layers * LAYER_OVERHEAD_S[(lay.method, lay.gradient_checkpointing)]
    per_micro, per_step = comm_seconds(w, lay, gpu, params, trainable, keep)
    micro = compute + max(0.0, per_micro - OVERLAP * compute)
    if lay.method == "full" and lay.offload_params:
        micro += 2 * w.act_bytes * params / lay.world / (PCIE_GBPS * 1e9)  # fetch for forward and backward
    local = trainable if lay.method == "lora" else -(-params // (lay.world if (lay.zero_stage or 0) >= 1 else 1))
    if lay.method == "full" and lay.offload_optimizer:
        opt = local / CPU_ADAM_PARAMS_PER_S + 2 * w.act_bytes * local / (PCIE_GBPS * 1e9)
    else:
        opt = local * ADAM_BYTES_PER_PARAM / (gpu.hbm_tbps * 1e12 * HBM_EFFICIENCY)
    return lay.gradient_accumulation_steps * micro + per_step + opt
