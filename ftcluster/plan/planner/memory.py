"""Per-GPU memory: what ``torch.cuda.max_memory_allocated`` will show at the peak of a step.

Two moments compete for the peak, and the larger wins:

* **backward**: model states + saved activations + the loss's working set (or, with
  gradient checkpointing, the one layer being recomputed) + framework buffers;
* **optimizer step**: model states + the step's temporaries (fp32 copies of the gradients
  and torch AdamW's ``foreach`` scratch), activations already freed.

Every constant below is read off the code that runs (transformers 5 ``modeling_llama.py``
and ``sdpa_attention.py``, peft 0.21 ``lora/layer.py``, DeepSpeed 0.19 ``stage_1_and_2.py`` /
``stage3.py``, ftcluster's ``train/engines/``) and checked against ftcluster's own
measured peaks (docs/planner.md has the derivation and the comparison).
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import speedups as speedup_rules
from .layout import Layout, Workload

SUB_GROUP_SIZE = 1_000_000_000  # DeepSpeed ZeRO-3's default sub_group_size: the optimizer steps one at a time
CONTEXT_BYTES = 1 << 30  # CUDA context, cuBLAS workspace: on the GPU but not in max_memory_allocated
NCCL_BYTES = 512 << 20  # NCCL's own buffers with more than one process
FRAGMENTATION = 0.95  # the caching allocator cannot hand out every last byte: keep 5 % free
# The runtime keeps ZeRO-3's gathered weights from forward to backward when the whole 16-bit model
# plus this rank's shards (2 N + 16 N / world bytes) fit in plan/speedups.py's KEEP_FRACTION of the GPU: the one
# predicate is ftcluster.plan.speedups.zero3_keep_fits, which train/speedups.py asks too.


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU at the peak, by kind; ``total`` is the predicted max_memory_allocated."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    overhead: int
    lora_extras: int  # part of the above that the adapter adds (its states and activation copies)
    phase: str  # 'backward' or 'optimizer_step'

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.overhead

    def to_dict(self) -> dict[str, int | str]:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": self.activations, "logits": self.logits, "overhead": self.overhead,
                "lora_extras": self.lora_extras, "total": self.total, "peak_phase": self.phase}


def usable_bytes(gpu_memory: int, world: int) -> int:
    """What a job may allocate on a GPU of ``gpu_memory`` bytes and still run."""
    return int((gpu_memory - CONTEXT_BYTES - (NCCL_BYTES if world > 1 else 0)) * FRAGMENTATION)


# ----------------------------------------------------------------------------- model states


def model_states(params: int, stage: int, dp: int, *, k: int = 12, half: int = 2,
                 offload_optimizer: bool = False, offload_params: bool = False) -> tuple[int, int, int]:
    """(weights, gradients, optimizer) bytes per GPU for mixed-precision Adam under ZeRO ``stage``.

    The ZeRO paper's accounting (Rajbhandari et al. 2019, section 3.1): 2 bytes of 16-bit weights,
    2 of 16-bit gradients and K = 12 of fp32 master weights, momentum and variance per
    parameter; stage 1 partitions the optimizer states over ``dp`` GPUs, stage 2 also the
    gradients, stage 3 also the weights. ``half`` = 4 models fp32 training (no master copy: K = 8).
    """
    n = params
    w = half * n
    g = half * n
    o = k * n
    if stage >= 1:
        o = -(-o // dp)
    if stage >= 2:
        g = -(-g // dp)
    if stage >= 3:
        w = -(-w // dp)
    if offload_optimizer:
        o = 0
        if stage >= 2:
            g = 0  # the gradient partitions live in pinned host memory (stage3.py, stage_1_and_2.py)
    if offload_params:
        w = 0
    return w, g, o


def zero3_keeps(w: Workload, lay: Layout, params: int, gpu_memory: int) -> bool:
    """Whether the runtime keeps ZeRO-3's gathered weights for this layout (speedups.zero3_keep_settings)."""
    if not w.zero3_keep or lay.zero_stage != 3 or lay.offload_params:
        return False
    return speedup_rules.zero3_keep_fits(params, lay.world, gpu_memory)


def _step_scratch(params: int, stage: int, dp: int, half: int) -> int:
    """Extra bytes while the optimizer steps: fp32 gradient copies and AdamW's foreach scratch.

    Stage 3 steps one sub-group (<= 1e9 elements) at a time: an fp32 copy of its gradients and a
    sqrt(v) scratch of the same size. Stages 1/2 flatten the 16-bit partition and convert it to
    fp32 for the whole partition at once (measured: ZeRO-2, 8B, 2 GPUs peaks at the step). Stage
    0 (DeepSpeed's fp16/bf16 optimizer) keeps fp32 masters and builds fp32 gradients for all.
    """
    if half == 4:
        return 4 * -(-params // (dp if stage >= 1 else 1))  # only the foreach scratch
    if stage == 3:
        return 8 * min(-(-params // dp), SUB_GROUP_SIZE)
    if stage in (1, 2):
        return (4 + 2) * -(-params // dp)  # bf16 flat copy + fp32 copy (stage 2 frees its averaged grads)
    return 8 * params


# ----------------------------------------------------------------------------- activations


def _lora_copy(w: Workload) -> int:
    """Bytes per input element that a LoRA module saves: under bf16 autocast peft casts the input to
    the fp32 adapter's dtype and autocast casts it back, and that 16-bit copy is what lora_A saves
    (one per adapted module, not shared); dropout adds its 1-byte mask."""
    return (2 if w.act_bytes == 2 else 4) + (1 if w.lora_dropout > 0 else 0)


def layer_bytes_per_token(w: Workload, method: str, targets: tuple[str, ...] = ()) -> int:
    """Bytes one decoder layer saves for backward, per token of the micro-batch."""
    s, a = w.shape, w.act_bytes
    h, q, kv, i, heads, seq = s.hidden_size, s.q_dim, s.kv_dim, s.intermediate_size, s.num_attention_heads, w.seq_len
    full = method == "full"
    t = set(targets)
    c = _lora_copy(w)
    # RMSNorm saves its fp32 upcast input; with a trainable weight also the 16-bit normalised input.
    # Liger's RMSNorm (fused_ce: its kernels come together) saves the 16-bit input and a rstd per row;
    # so does inductor's fused RMSNorm in a compiled layer (measured: FSDP2 8B/8 layers, mb 4, seq 2048,
    # compiled 53.2 GiB against 57.0 eager, the two terms here give 3.75 GiB).
    kernels = w.fused_ce or w.compiled
    n = 2 * a * h if kernels else 2 * ((4 + a) * h if full else 4 * h)
    # q/k/v: a trainable projection saves the shared normed input once; LoRA saves a copy per module.
    n += a * h if full else c * h * len(t & {"q_proj", "k_proj", "v_proj"})
    # Attention. SDPA with a mask (ftcluster's batches always carry one: packed or padded rows
    # restart position_ids) repeats k/v to every head and converts the mask to a float bias per
    # layer; flash-attention keeps GQA's k/v; eager keeps the fp32 softmax and 16-bit probabilities.
    if w.attn_implementation == "flash_attention_2":
        n += a * (2 * q + 2 * kv) + 4 * heads
    elif w.attn_implementation == "eager":
        n += a * 3 * q + (4 + a) * heads * seq
    else:
        n += a * 4 * q + 4 * heads + a * seq
    n += a * q if full else (c * q if "o_proj" in t else 0)  # o_proj input
    # SwiGLU: gate output (SiLU's input), SiLU output and up output (the product's inputs),
    # and the down projection's input when its weight trains. Liger's SwiGLU recomputes SiLU
    # in backward: gate and up outputs only.
    n += (2 if kernels else 3) * a * i
    if full:
        n += a * h + a * i
    else:
        n += c * h * len(t & {"gate_proj", "up_proj"}) + (c * i if "down_proj" in t else 0)
        n += a * w.lora_r * len(t & set(s.linear_dims()))  # lora_A outputs, saved by lora_B
    return n


def loss_bytes(w: Workload, micro_batch: int, head_trains: bool = False) -> int:
    """The loss's peak. Plain path: ftcluster's token_ce_sum upcasts the shifted logits to fp32;
    cross_entropy keeps log_softmax's fp32 output, and its backward holds that, the incoming
    gradient and the outgoing one at once: 12 bytes per logit (train/engines/base.py, token_ce_sum).

    Fused (Liger 0.8.5 ``fused_linear_cross_entropy``): the gradients are computed in forward,
    chunk by chunk, and held until backward: the hidden states' gradient (16-bit, tokens x h)
    and, when the lm_head trains, its weight gradient (16-bit, V x h); one chunk of 16-bit
    logits, its rows a power of two near tokens / ceil(V / h), exists at a time."""
    s, a, tokens = w.shape, w.act_bytes, micro_batch * w.seq_len
    if not w.fused_ce:
        return 12 * micro_batch * (w.seq_len - 1) * s.vocab_size
    inc = -(-s.vocab_size // s.hidden_size)
    chunk = min(tokens, 1 << max(0, (-(-tokens // inc) - 1).bit_length()))
    return a * tokens * s.hidden_size + a * chunk * s.vocab_size + (a * s.vocab_size * s.hidden_size if head_trains else 0)


def activation_bytes(w: Workload, lay: Layout, targets: tuple[str, ...]) -> tuple[int, int, int]:
    """(saved activations at the backward peak, loss working set, the LoRA part of the activations)."""
    s, a, tokens = w.shape, w.act_bytes, lay.micro_batch_size * w.seq_len
    per_layer = layer_bytes_per_token(w, lay.method, targets) * tokens
    n_layers = s.num_hidden_layers
    ckpt = checkpointed_count(n_layers, lay.gradient_checkpointing)
    lora_part = 0
    if lay.method == "lora":
        base = layer_bytes_per_token(w, "lora", ()) * tokens
        lora_part = (per_layer - base) * (n_layers - ckpt + (1 if ckpt else 0))
    # Final norm (+ the lm_head's input when it trains or carries an adapter); the fused loss
    # saves no input (it holds the input's gradient instead, counted in loss_bytes).
    if w.fused_ce:
        head = a * s.hidden_size
    else:
        head = (4 + 2 * a) * s.hidden_size if lay.method == "full" else 4 * s.hidden_size
    if lay.method == "lora" and "lm_head" in targets:
        head += _lora_copy(w) * s.hidden_size
    extra = head * tokens
    if w.attn_implementation != "flash_attention_2":  # the boolean (or eager: float) mask, built once
        extra += (a if w.attn_implementation == "eager" else 1) * lay.micro_batch_size * w.seq_len ** 2
    head_trains = lay.method == "full" or "lm_head" in targets
    loss = loss_bytes(w, lay.micro_batch_size, head_trains)
    if ckpt:
        # A checkpointed layer keeps only its input; the others (selective checkpointing) keep
        # everything, as without checkpointing.
        stored = ckpt * a * s.hidden_size * tokens + (n_layers - ckpt) * per_layer
        # Backward recomputes one layer at a time; with its gradients in flight that never
        # exceeds the loss's working set for Llama shapes, but a long sequence can.
        working = max(loss, per_layer + 3 * a * s.hidden_size * tokens)
        return stored + extra + (working - loss), loss, lora_part
    return n_layers * per_layer + extra, loss, lora_part


def checkpointed_count(n_layers: int, fraction: float) -> int:
    """Layers the runtime recomputes for ``training.gradient_checkpointing`` = ``fraction``
    (train/model.py: round(fraction x layers), evenly spaced)."""
    return round(float(fraction) * n_layers)


# ----------------------------------------------------------------------------- total


def per_gpu_memory(w: Workload, lay: Layout, params_total: int, trainable: int,
                   adapter: int = 0, saved_copies: int = 0, keep: bool = False) -> Memory:
    """Predicted peak allocated bytes per GPU for ``lay``; ``keep``: ZeRO-3 keeps the gathered
    weights from forward to backward (:func:`zero3_keeps`)."""
    w = w.on(lay)
    a = w.act_bytes
    targets = _targets(w) if lay.method == "lora" else ()
    acts, loss, lora_acts = activation_bytes(w, lay, targets)
    if lay.method == "lora":
        base = params_total - adapter - saved_copies
        weights = base * a + adapter * 4 + saved_copies * a  # peft keeps adapters in fp32
        grads = adapter * 4 + saved_copies * a
        opt = adapter * 8 + saved_copies * 2 * a  # fused AdamW: no scratch
        overhead = (adapter * 4 + saved_copies * a) if lay.world > 1 else 0  # DDP's gradient buckets
        lora_extras = adapter * 16 + saved_copies * 4 * a + lora_acts
        back = Memory(weights, grads, opt, acts, loss, overhead, lora_extras, "backward")
        return back
    if lay.engine == "fsdp":
        return _fsdp_memory(w, lay, params_total, acts, loss)
    stage = lay.zero_stage or 0
    dp = lay.world
    wgt, grd, opt = model_states(params_total, stage, dp, k=12 if a == 2 else 8, half=a,
                                 offload_optimizer=lay.offload_optimizer, offload_params=lay.offload_params)
    bucket = w.reduce_bucket_size * a
    s = w.shape
    if stage == 3:
        # The reduce bucket (allocated once), the largest gathered module (lm_head or embedding
        # is larger than a layer in every Llama) and the prefetch bucket.
        gathered = max(s.embedding_params, s.layer_params()) + w.reduce_bucket_size // 10
        if keep:  # every weight stays gathered from its forward use until the backward peak
            gathered = params_total
        buffers = bucket + a * gathered
        step_buffers = bucket
    elif stage in (1, 2):
        buffers = bucket * (2 if w.overlap_comm else 1)  # the ipg buffers, freed after backward
        step_buffers = 0
    else:
        buffers = bucket if dp > 1 else 0  # DeepSpeed's allreduce flattening
        step_buffers = 0
    moments = [Memory(wgt, grd, opt, acts, loss, buffers, 0, "backward")]
    if stage in (1, 2):
        # Stages 1/2 allocate their gradient partition and reduce buckets as backward produces
        # gradients and free them after the step (stage_1_and_2.py, _release_ipg_buffers): at
        # the loss's peak, the start of backward, neither exists; the loss is gone when they do.
        moments = [Memory(wgt, 0, opt, acts, loss, 0, 0, "backward"),
                   Memory(wgt, grd, opt, acts, 0, buffers, 0, "backward")]
    scratch = 0 if lay.offload_optimizer else _step_scratch(params_total, stage, dp, a)
    moments.append(Memory(wgt, grd, opt + scratch, 0, 0, step_buffers, 0, "optimizer_step"))
    return max(moments, key=lambda m: m.total)


def _fsdp_memory(w: Workload, lay: Layout, params: int, acts: int, loss: int) -> Memory:
    """FSDP2 (train/engines/fsdp.py): the parameters' fp32 shards are the master weights (4 bytes
    per parameter over the world), the gradients' fp32 shards (reduce_dtype fp32) exist from the
    backward that produces them until ``zero_grad(set_to_none=True)`` after the step, and fused
    AdamW keeps two fp32 moments (8 bytes) with no scratch. Mixed precision casts each module's
    unsharded weights to 16 bits while it computes: resharding after forward (the ``FSDP2`` label,
    ZeRO-3's stage number in the layout) holds the largest module and the next one prefetched;
    without it (``FSDP2 no-reshard``) every 16-bit weight stays gathered from forward to backward.

    Moments: backward's start (the loss's peak, no gradients yet), the end of backward (every
    gradient; the activations mostly freed, counted whole as the conservative side), the step.
    Measured (H100, 8B cut to 8 layers, mb 4, seq 2048, no checkpointing, the plain loss, one GPU,
    2026-12-07): 57.0 GiB; DeepSpeed ZeRO-2's accounting (16-bit weights and gradients apart from a
    12-byte optimizer) put it at 68.4 GiB, since it held the gradients at the loss's peak."""
    dp, a, s = lay.world, w.act_bytes, w.shape
    shard = -(-params // dp)
    wgt, grd, opt = 4 * shard, 4 * shard, 8 * shard
    if lay.offload_optimizer or lay.offload_params:  # fsdp.cpu_offload: the shards and the step live on the host
        wgt, grd, opt = 0, 0, 0
    if (lay.zero_stage or 0) == 3:
        gathered = a * (max(s.embedding_params, s.layer_params()) + s.layer_params())
    else:
        gathered = a * params
    moments = [Memory(wgt, 0, opt, acts, loss, gathered, 0, "backward"),
               Memory(wgt, grd, opt, acts, 0, gathered, 0, "backward"),
               Memory(wgt, grd, opt, 0, 0, 0, 0, "optimizer_step")]
    return max(moments, key=lambda m: m.total)


def _targets(w: Workload) -> tuple[str, ...]:
    from .shape import lora_targets

    t = w.lora_targets
    return lora_targets(w.shape, t if isinstance(t, str) else list(t))


def host_bytes_per_node(params_total: int, lay: Layout, half: int = 2) -> int:
    """Host memory that CPU offload needs on each node (pinned optimizer states, gradients, weights)."""
    if lay.method != "full" or not (lay.offload_optimizer or lay.offload_params):
        return 0
    per_gpu = 0
    n = -(-params_total // lay.world)
    if lay.offload_optimizer:
        per_gpu += 12 * n + 4 * n  # fp32 master, m, v and the fp32 gradient partition
    if lay.offload_params:
        per_gpu += half * n
    return per_gpu * lay.gpus_per_node
