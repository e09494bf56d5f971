"""Step time: FLOPs at a calibrated fraction of the GPU's peak, the loss's memory traffic,
the optimizer step, and whatever communication compute does not hide.

FLOPs per token (Kaplan et al. 2020; Narayanan et al. 2021): a forward pass costs 2N for the N
parameters in matrix multiplies plus attention's score and value products. Full fine-tuning's
backward costs twice the forward (gradients for activations and for weights); a frozen base
(LoRA) skips the weight gradients, so its backward costs about one forward. Gradient
checkpointing adds one more forward.

The share of the peak reached falls with the hidden size (``matmul_efficiency``), so one set of
constants covers the 1B (hidden 2048) and 8B (hidden 4096) shapes; ZeRO-3 on several GPUs adds
a latency per gathered module. The constants are fit on ftcluster's own runs on H200s
(docs/planner.md, "Time and cost", says which run fits which constant);
benchmarks/plan_accuracy.py prints predicted against measured (docs/BENCHMARKS.md, "Planner
accuracy"). Other GPU types are assumed to reach the same fraction of their own peak.
"""

from __future__ import annotations

from .gpus import INTER_NODE_GBPS, PCIE_GBPS, Gpu
from .layout import Layout, Workload

# Share of dense bf16 peak the layers would reach at an unbounded hidden size, by (method,
# fused_ce); matmul_efficiency scales it down. Bounded at 0.75 (~740 TFLOP/s, about the best
# large bf16 GEMM on an H200; the profile in docs/BENCHMARKS.md saw ~690). The fused path
# (Liger's fused loss, RMSNorm, SwiGLU and RoPE kernels) cuts the elementwise traffic the
# matmuls wait on; LoRA adds its adapters' small GEMMs and fp32 casts.
MFU = {("lora", False): 0.49, ("full", False): 0.69, ("lora", True): 0.63, ("full", True): 0.74}
# Hidden size at which the share is MFU / 2 (see matmul_efficiency): 0.70 x MFU at hidden 4096
# (Llama 8B), 0.54 x MFU at 2048 (Llama 1B).
GEMM_HALF_DIM = 1750
# training.compile: how much faster the compiled decoder layers compute than eager ones (the loss is
# not compiled), by (method, engine). Measured (docs/BENCHMARKS.md): LoRA 8B r16 all-linear mb 2, Liger's
# kernels on when eager, 1.21x on an H200 (12,629 -> 15,302 tok/s, 2026-12-01) and 1.28x on an H100
# (10,985 -> 14,022, 2026-12); FSDP2 8B cut to 8 layers mb 4 seq 2048, plain loss, 0.333 -> 0.292 s on an
# H100 (1.14x, 2026-12-07); DeepSpeed ZeRO-2 on the same shape unchanged on an H200 (2026-12-01).
COMPILE_GAIN = {("lora", "deepspeed"): 1.25, ("lora", "fsdp"): 1.25, ("full", "fsdp"): 1.14, ("full", "deepspeed"): 1.0}
CE_BYTES_PER_LOGIT = {False: 40,  # fp32 upcast, log_softmax, its backward and the 16-bit casts, read + written
                      True: 10}  # Liger: 16-bit chunk written, read by the kernel, gradient written in place, read twice
# ZeRO-3's all-gathers and reduce-scatters pass two stages in series, so their rates add as
# resistances (zero3_gbps): the network, at NCCL's bus efficiency for large messages (ring
# all-gather/reduce-scatter of 100 MB-2 GB reach ~80 % of the bus bandwidth in nccl-tests), and
# DeepSpeed's own path (copying each rank's partition into the flat gather buffer and back out,
# issued from module hooks between kernels), which does not get faster with the link. Fitted on
# one H200 node: the 8B ZeRO-3 runs move their weights at ~30 GB/s (0.08 of the 370 GB/s NVLink
# bus; 0.81 s per step with or without the recompute, so the gathers set the step), which with
# NVLink at 0.8 x 370 leaves 32.9 GB/s for DeepSpeed's path. Across nodes the slower link then
# matters too: 45 GB/s per GPU x 0.8 in series with 32.9 gives ~17 GB/s, against the ~3.6 GB/s that
# scaling the single-node share (0.08) down to the inter-node link gave before (a 70B step on 8
# nodes predicted at 950 s). Not yet measured on more than one node (docs/planner.md, Limits).
NCCL_BUS_EFFICIENCY = 0.8
ZERO3_ENGINE_GBPS = 32.9
# Seconds per ZeRO-3 all-gather that compute does not hide (NCCL launch, the hook's wait):
# why 1B on 2 GPUs, whose gathers are small, pays about as much as 8B (0.13 s per step).
ZERO3_GATHER_LATENCY_S = 0.35e-3
MODULES_PER_LAYER = 9  # modules holding parameters: q, k, v, o, gate, up, down, two RMSNorms
HBM_EFFICIENCY = 0.8
OVERLAP = 0.8  # share of compute time that hides ZeRO's collectives (overlap_comm)
CPU_ADAM_PARAMS_PER_S = 1.0e9  # DeepSpeedCPUAdam per process
ADAM_BYTES_PER_PARAM = 40  # fp32 master/m/v/grad read and written, the sqrt scratch, the 16-bit copy
# Fixed seconds per decoder layer per micro-batch (kernel launches, Python, checkpoint hooks):
# what makes small micro-batches slow. From the plain-stack LoRA 8B runs at micro-batch 1 and
# 4/8 (shared/REFERENCE.md): 0.8 ms without and 4.7 ms with checkpointing; full fine-tuning
# launches fewer small kernels (no adapters), assumed half.
LAYER_OVERHEAD_S = {("lora", False): 0.8e-3, ("lora", True): 4.7e-3, ("full", False): 0.4e-3, ("full", True): 2.3e-3}


def layer_overhead_s(method: str, checkpointing: float) -> float:
    """LAYER_OVERHEAD_S for the share of layers checkpointed (each layer pays its own)."""
    f = float(checkpointing)
    return (1 - f) * LAYER_OVERHEAD_S[(method, False)] + f * LAYER_OVERHEAD_S[(method, True)]


def _passes(method: str, checkpointing: float) -> float:
    """Forward-sized passes per step: forward, backward (x2 when weights train), and the
    recompute of the checkpointed share of the layers."""
    return (3.0 if method == "full" else 2.0) + float(checkpointing)


def attention_flops_per_token(w: Workload, method: str, checkpointing: float) -> float:
    """Attention's score and value products per token, as the kernel computes them: causal
    (``2 * layers * seq * q_dim`` per forward) only for flash_attention_2. ftcluster's batches
    always carry a mask (doc: Memory, attention kernels), so SDPA runs its memory-efficient
    kernel with a float bias and eager a full softmax: both compute the whole seq x seq square."""
    s = w.shape
    square = 1.0 if w.attn_implementation == "flash_attention_2" else 2.0
    # The varlen kernel (modelled as flash_attention_2) computes each packed example's own causal
    # square: a token attends over its example, not the row (Workload.attention_span).
    span = w.attention_span if (w.attention_span and w.attn_implementation == "flash_attention_2") else w.seq_len
    return square * 2.0 * s.num_hidden_layers * min(span, w.seq_len) * s.q_dim * _passes(method, checkpointing)


def flops_per_token(w: Workload, method: str, checkpointing: float) -> float:
    """Training FLOPs per token of the micro-batch: the weights' matrix multiplies and attention."""
    return 2.0 * w.shape.matmul_params() * _passes(method, checkpointing) + attention_flops_per_token(w, method, checkpointing)


def matmul_efficiency(w: Workload, method: str) -> float:
    """Share of the dense peak the layers reach: ``MFU / (1 + GEMM_HALF_DIM / hidden)``.

    Per token and layer the matmuls cost ~h^2 FLOPs, while the work that is not a matmul (norms,
    activations, RoPE, residual adds, LoRA's casts: memory-bound) and the GEMMs' own edge
    effects (tile and wave quantisation of N and K) grow ~h: their share of the time goes as
    1/h. The micro-batch's tokens (the GEMMs' M) are not in it: ftcluster's runs span 4k-16k
    tokens per micro-batch with no measurable effect; small micro-batches pay through
    LAYER_OVERHEAD_S instead."""
    return MFU[(method, w.fused_ce)] / (1.0 + GEMM_HALF_DIM / w.shape.hidden_size)


def _bus_gbps(gpu: Gpu, lay: Layout) -> float:
    return min(gpu.link_gbps, INTER_NODE_GBPS) if lay.nodes > 1 else gpu.link_gbps


def zero3_gbps(gpu: Gpu, lay: Layout) -> float:
    """GB/s per GPU at which ZeRO-3 moves the weights and gradients: the network (the NVLink bus in
    a node, the slower inter-node link across nodes) at NCCL_BUS_EFFICIENCY, in series with
    DeepSpeed's own gather path (ZERO3_ENGINE_GBPS). FSDP2 gathers each layer's parameters with one
    all-gather into a buffer it allocates once, and copies in and out with fused kernels at HBM
    speed (torch's FSDP2 design notes; torchtitan's 70B runs are compute-bound at 51.7 % MFU on 64
    A100), so it is modelled at the network's rate alone: an assumption until measured on several
    GPUs (docs/planner.md, Limits)."""
    net = _bus_gbps(gpu, lay) * NCCL_BUS_EFFICIENCY
    if lay.engine == "fsdp":
        return net
    return 1.0 / (1.0 / net + 1.0 / ZERO3_ENGINE_GBPS)


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
        return (2 if keep else 3) * ring * a * params / (zero3_gbps(gpu, lay) * 1e9), 0.0
    if stage in (1, 2):
        return ring * a * params / bw, ring * a * params / bw
    return 0.0, 2 * ring * a * params / bw


def zero3_gather_seconds(w: Workload, lay: Layout, keep: bool = False) -> float:
    """Latency of ZeRO-3's all-gathers per micro-batch, which compute does not hide: one per
    module that holds parameters (the 7 Linears and 2 norms of a layer, the embedding, the final
    norm), issued from a hook that the module's kernels then wait on; twice without ``keep``
    (forward and backward). None on one GPU: the hooks alone cost nothing measurable there (1B,
    plain path: ZeRO-3 0.323 s against ZeRO-2 0.325 s)."""
    if lay.method != "full" or (lay.zero_stage or 0) != 3 or lay.world == 1:
        return 0.0
    # FSDP2 (fully_shard per decoder layer and at the root) gathers a layer's parameters at once.
    per_layer = 1 if lay.engine == "fsdp" else MODULES_PER_LAYER
    modules = per_layer * w.shape.num_hidden_layers + 2
    return (1 if keep else 2) * modules * ZERO3_GATHER_LATENCY_S


def step_seconds(w: Workload, lay: Layout, gpu: Gpu, params: int, trainable: int, keep: bool = False) -> float:
    """Seconds per optimizer step on every GPU of the layout (``keep``: memory.zero3_keeps)."""
    w = w.on(lay)
    tokens = lay.micro_batch_size * w.seq_len
    peak = gpu.bf16_tflops * 1e12 * (0.5 if w.precision == "fp32" else 1.0)  # TF32 tensor cores
    compute = tokens * flops_per_token(w, lay.method, lay.gradient_checkpointing) / (peak * matmul_efficiency(w, lay.method))
    if w.compiled:
        compute /= COMPILE_GAIN[(lay.method, lay.engine)]
    compute += tokens * w.shape.vocab_size * CE_BYTES_PER_LOGIT[w.fused_ce] / (gpu.hbm_tbps * 1e12 * HBM_EFFICIENCY)
    compute += w.shape.num_hidden_layers * layer_overhead_s(lay.method, lay.gradient_checkpointing)
    per_micro, per_step = comm_seconds(w, lay, gpu, params, trainable, keep)
    micro = compute + max(0.0, per_micro - OVERLAP * compute) + zero3_gather_seconds(w, lay, keep)
    if lay.method == "full" and lay.offload_params:
        micro += 2 * w.act_bytes * params / lay.world / (PCIE_GBPS * 1e9)  # fetch for forward and backward
    local = trainable if lay.method == "lora" else -(-params // (lay.world if (lay.zero_stage or 0) >= 1 else 1))
    if lay.method == "full" and lay.offload_optimizer:
        opt = local / CPU_ADAM_PARAMS_PER_S + 2 * w.act_bytes * local / (PCIE_GBPS * 1e9)
    else:
        opt = local * ADAM_BYTES_PER_PARAM / (gpu.hbm_tbps * 1e12 * HBM_EFFICIENCY)
    return lay.gradient_accumulation_steps * micro + per_step + opt
