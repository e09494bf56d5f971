"""Build the model: where the weights come from, dtype, attention kernel, gradient
checkpointing and the LoRA wrap.

Sources (exactly one, validated by the spec): a local folder or fsspec URI (downloaded
once per node by ``ftcluster.storage.fetch.fetch_dir``), a Hub id (the only path that may reach a hub),
or ``random_init`` (a LlamaConfig from a preset; seeded, so every rank and every rerun
builds the same weights).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from ..errors import TrainError

log = logging.getLogger("ftcluster.train")


def compute_dtype(precision: str, device: Any):
    """The dtype the model computes in: bf16/fp16 on GPU, fp32 on CPU (logged once)."""
    import torch

    if device.type != "cuda":
        if precision != "fp32":
            log.info("training.precision=%s: running on CPU, so computing in fp32 instead", precision)
        return torch.float32
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise TrainError("training.precision: bf16 is not supported on this GPU; use fp16 or fp32")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def llama_config(ri: Any, tokenizer: Any, attn_implementation: str):
    """A transformers LlamaConfig from the spec's random_init section, sized for the tokenizer."""
    from transformers import LlamaConfig

    # Tokens the spec adds come on top (fit_embeddings grows the matrices); the tokenizer itself must fit.
    if getattr(tokenizer, "ftcluster_base_vocab", len(tokenizer)) > ri.vocab_size:
        raise TrainError(
            f"model.random_init.vocab_size: the tokenizer has {len(tokenizer)} tokens but the model only "
            f"{ri.vocab_size} embeddings; raise vocab_size or lower tokenizer.train_vocab_size"
        )
    return LlamaConfig(
        vocab_size=ri.vocab_size, hidden_size=ri.hidden_size, intermediate_size=ri.intermediate_size,
        num_hidden_layers=ri.num_hidden_layers, num_attention_heads=ri.num_attention_heads,
        num_key_value_heads=ri.num_key_value_heads, max_position_embeddings=ri.max_position_embeddings,
        tie_word_embeddings=ri.tie_word_embeddings, rope_theta=ri.rope_theta,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, attn_implementation=attn_implementation, use_cache=False,
    )


def config_fingerprint(config: Any) -> str:
    """sha256 of the model config (architecture only), recorded with adapters and checkpoints."""
    d = config.to_dict()
    for k in ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "use_cache",
              "attn_implementation", "_attn_implementation_autoset"):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def model_source(spec: Any) -> str:
    """A human name for the base model: the path, the hub id@revision or random_init:<preset>."""
    m = spec.model
    if m.path:
        return m.path
    if m.hub_id:
        return m.hub_id + (f"@{m.revision}" if m.revision else "")
    return f"random_init:{m.random_init.preset or 'custom'}"


def load_base_model(spec: Any, tokenizer: Any, dtype: Any, device: Any, cache_dir: Path, *,
                    zero3: bool = False, meta: bool = False, load_dtype: Any = None, init_dtype: Any = None):
    """The base causal LM on ``device`` (ZeRO-3: partitioned at construction by transformers'
    DeepSpeed integration, which the caller enables with an ``HfDeepSpeedConfig``).

    ``meta``: the same model's structure only, every parameter and buffer on the meta device (no
    memory, no weights read): the architecture, grown embeddings, ties, config, generation config,
    attention kernel, checkpointing and hooks are the ones the full build gives. The FSDP2 engine
    builds it so on every rank, shards it, then fills the shards (:mod:`.engines.fsdp`). The
    device-dependent switches (fused loss, varlen attention) are decided for ``device``.

    ``load_dtype``: loaded weights (a path or hub id) are kept in this dtype instead of ``dtype``
    (FSDP's rank 0 holds a bf16 checkpoint in bf16: :func:`.engines.fsdp.full_weights`); the
    embedding matrices are cast to ``dtype`` first, so rows grown for new tokens are the mean
    computed and stored in ``dtype``, as without it.

    ``init_dtype``: a ``random_init`` model's weights are drawn, then rounded to this dtype and kept in
    ``dtype``: the FSDP2 engine keeps fp32 parameters and passes the compute dtype (bf16), so its
    random weights are the values the DeepSpeed and LoRA engines draw directly in bf16 (torch draws a
    bf16 tensor in fp32 and rounds it), as from a checkpoint stored in bf16. Without it, the same job
    trained on a GPU from different starting points per engine, which shows at small learning rates
    (docs/training.md, "Fidelity")."""
    import torch
    from transformers import AutoModelForCausalLM

    m = spec.model
    seed = spec.training.seed
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": m.attn_implementation}
    torch.manual_seed(seed)
    if m.random_init is not None:
        config = llama_config(m.random_init, tokenizer, m.attn_implementation)
        if zero3:
            model = AutoModelForCausalLM.from_config(config, **kwargs)
        else:
            # initialise in place: an 8B model never lands in host memory
            with torch.device("meta" if meta else device):
                model = AutoModelForCausalLM.from_config(config, **kwargs)
        if init_dtype is not None and init_dtype != dtype and not meta:
            round_through(model, init_dtype)
    else:
        if m.path:
            from ..storage.fetch import fetch_dir

            where = str(fetch_dir(m.path, m.storage_options, cache_dir / "models"))
            kwargs["local_files_only"] = True
        else:
            where = m.hub_id
            kwargs["revision"] = m.revision
        try:
            if meta:
                model = _structure(where, m.trust_remote_code, kwargs)
            else:
                model = AutoModelForCausalLM.from_pretrained(where, trust_remote_code=m.trust_remote_code,
                                                             **{**kwargs, "dtype": load_dtype or dtype})
        except (OSError, ValueError) as exc:
            field = "model.path" if m.path else "model.hub_id"
            raise TrainError(f"{field}: could not load a causal LM from {where!r}: {str(exc).splitlines()[0]}") from exc
        if not zero3 and not meta:
            model.to(device)
        if load_dtype is not None and load_dtype != dtype:
            for emb in {id(e): e for e in (model.get_input_embeddings(), model.get_output_embeddings())
                        if e is not None}.values():
                emb.to(dtype)  # in place: a tied matrix stays one parameter
    fit_embeddings(model, tokenizer, zero3=zero3)
    model.config.use_cache = False
    if tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    from .speedups import apply_fused_kernels
    from .varlen import apply_varlen_attention

    # Before LoRA or DeepSpeed wrap it: the engines read these flags to take the fused loss path
    # and to pass packed examples' boundaries to the attention.
    # Compiled layers get their norms, SwiGLU and RoPE fused by inductor: Liger keeps the loss only.
    model.ftcluster_compile = compile_wanted(spec, device, model, zero3=zero3)
    model.ftcluster_fused_ce = apply_fused_kernels(model, device, kernels=not model.ftcluster_compile)
    apply_varlen_attention(model, device)
    enable_checkpointing(model, spec.training.checkpoint_fraction)
    return model


def round_through(model: Any, dtype: Any) -> None:
    """Every floating parameter of ``model`` rounded to ``dtype`` in place (kept in its own dtype). Not
    the buffers: RoPE's inv_freq is fp32 whatever the model's dtype."""
    import torch

    with torch.no_grad():
        for t in model.parameters():
            if t.is_floating_point() and t.dtype != dtype:
                t.copy_(t.to(dtype))


def _structure(where: str, trust_remote_code: bool, kwargs: dict[str, Any]):
    """``from_pretrained(where)``'s model on the meta device: its config and generation config are
    read (a few KB), no weight is. ``kwargs``: :func:`load_base_model`'s (dtype, attention kernel,
    revision or local_files_only)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    where_kw = {k: kwargs[k] for k in ("revision", "local_files_only") if k in kwargs}
    config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code, **where_kw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                 dtype=kwargs["dtype"], attn_implementation=kwargs["attn_implementation"])
    model.config.name_or_path = where  # as from_pretrained records it
    try:  # from_pretrained reads generation_config.json when there is one; the export writes it back
        model.generation_config = GenerationConfig.from_pretrained(where, **where_kw)
    except OSError:
        pass
    return model


def init_nonpersistent_buffers(model: Any) -> list[str]:
    """Compute the buffers no state dict carries (RoPE's ``inv_freq``, a scaled embedding's
    ``embed_scale``) for a model whose storage was allocated empty (``to_empty`` after a meta-device
    build): transformers' own ``_init_weights`` of each module that owns one, as its
    ``from_pretrained`` does for a model it builds on the meta device. The RNG is left as it was
    (a module's parameters may be drawn again here; the weights loaded next overwrite them).
    Returns the buffers' names."""
    import torch

    names: list[str] = []
    owners = [(name, mod) for name, mod in model.named_modules() if mod._non_persistent_buffers_set]
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        for name, mod in owners:
            bufs = {b: getattr(mod, b) for b in sorted(mod._non_persistent_buffers_set) if getattr(mod, b) is not None}
            for buf in bufs.values():
                if buf.is_floating_point():
                    buf.fill_(float("nan"))  # what transformers leaves alone shows
            model._init_weights(mod)
            for b, buf in bufs.items():
                full = f"{name}.{b}" if name else b
                if buf.is_floating_point() and bool(torch.isnan(buf).any()):
                    raise TrainError(f"engine: fsdp builds the model on the meta device, and transformers does not "
                                     f"compute its buffer {full} ({type(mod).__name__}); use engine: deepspeed")
                names.append(full)
    return names


PAD_MULTIPLE = 64  # embedding rows come in multiples of 64: tensor-core friendly shapes for the output matmul


def fit_embeddings(model: Any, tokenizer: Any, *, zero3: bool = False) -> list[int]:
    """Give the tokens the base model has no trained embedding for (the spec's added tokens, and a
    tokenizer larger than the model) rows that start at the mean of the existing ones; returns their ids.

    The input and (untied) output matrices grow to ``len(tokenizer)`` rounded up to a multiple of
    64 when they are too small. Every new row, the padding rows included, is set to exactly the
    mean of the rows of the tokens the model knew. Hewitt (2021), "Initializing New Word Embeddings
    for Pretrained Language Models" (https://nlp.stanford.edu/~johnhew/vocab-expansion.html): with
    the mean, a new word's probability starts near the average one's and the model's predictions
    barely move (KL bounded); a random row can dominate the softmax. transformers'
    ``mean_resizing`` samples around the mean with the embeddings' covariance; the exact mean is
    deterministic, so a resumed run, ``ftcluster sample`` and the loss-equality tests rebuild the
    same rows. The padding rows never reach the loss: :func:`mask_padding_logits`. The model's
    config records ``ftcluster_vocab`` (the tokenizer's length) once it is grown, so a model saved
    from this run (the final or merged model, a pipeline's next stage) masks the same rows; the
    spare rows of a model ftcluster did not grow (Qwen's, beyond its tokenizer) are left alone.
    """
    emb = model.get_input_embeddings()
    rows = _rows(emb.weight)
    # A model ftcluster grew before (a continual pre-training's final model) has trained rows for
    # the ids below its ftcluster_vocab, and padding rows above.
    grown = getattr(model.config, "ftcluster_vocab", None)
    first = min(rows, max(getattr(tokenizer, "ftcluster_base_vocab", rows), grown or 0))
    new_ids = list(range(first, len(tokenizer)))
    model.ftcluster_new_token_ids = new_ids
    padded = grown is not None
    size = rows
    if new_ids:
        known = new_ids[0]
        if len(tokenizer) > rows:
            size = -(-len(tokenizer) // PAD_MULTIPLE) * PAD_MULTIPLE
            log.info("tokenizer: %d tokens, the model %d embeddings: growing the embedding%s to %d rows "
                     "(a multiple of %d)", len(tokenizer), rows,
                     "" if model.config.tie_word_embeddings else " and output matrices", size, PAD_MULTIPLE)
            model.resize_token_embeddings(size, mean_resizing=False)  # the rows are set below, exactly
            padded = True
        end = size if padded else len(tokenizer)  # a model's own spare rows beyond the tokenizer stay as they are
        out = model.get_output_embeddings()
        matrices = [model.get_input_embeddings().weight]
        if out is not None and out.weight is not matrices[0]:
            matrices.append(out.weight)
        _set_mean_rows(matrices, known, end, zero3)
        log.info("tokenizer: %d new token ids (%d-%d) start at the mean of the %d known embeddings", len(new_ids),
                 known, len(tokenizer) - 1, known)
    if padded and size > len(tokenizer):
        model.config.ftcluster_vocab = len(tokenizer)  # saved in config.json: rows from here on are padding
        mask_padding_logits(model, len(tokenizer))
    return new_ids


def _rows(weight: Any) -> int:
    shape = getattr(weight, "ds_shape", None)  # ZeRO-3 partitions a parameter; ds_shape is the whole one
    return int((shape if shape is not None else weight.shape)[0])


def _set_mean_rows(matrices: list[Any], known: int, end: int, zero3: bool) -> None:
    import contextlib

    import torch

    gather: Any = contextlib.nullcontext()
    if zero3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(matrices, modifier_rank=0)
    with gather, torch.no_grad():
        for w in matrices:
            w[known:end] = w[:known].float().mean(dim=0).to(w.dtype)


def mask_padding_logits(model: Any, vocab: int) -> None:
    """Logits of ids at or above ``vocab`` (rows that exist only to round the matrix up) become the
    dtype's lowest value wherever this model computes logits: softmax gives them 0, so they take no
    probability and get no gradient, and the loss is the one over the real vocabulary. The fused
    loss (Liger on GPU) never materialises logits, so it is not used on such a model
    (:func:`.speedups.apply_fused_kernels`)."""
    import torch

    def hook(_module: Any, _args: Any, output: Any) -> Any:
        logits = getattr(output, "logits", None)
        if logits is not None and logits.shape[-1] > vocab:
            logits[..., vocab:] = torch.finfo(logits.dtype).min
        return output

    model.register_forward_hook(hook)
    model.ftcluster_vocab = vocab
    # A saved model has no hook: its generation config keeps transformers' generate() off those ids.
    gen = getattr(model, "generation_config", None)
    rows = _rows(model.get_output_embeddings().weight) if model.get_output_embeddings() is not None else vocab
    if gen is not None and rows > vocab:
        gen.suppress_tokens = sorted(set(gen.suppress_tokens or []) | set(range(vocab, rows)))


def checkpointed_layers(n_layers: int, fraction: float) -> list[int]:
    """Indices of the ``round(fraction * n_layers)`` layers to recompute, evenly spaced
    (0.5 of 8 -> 1, 3, 5, 7): every layer saves the same activations, so which ones only
    matters for spreading the recompute through the step."""
    k = round(fraction * n_layers)
    return [i for i in range(n_layers) if (i + 1) * k // n_layers > i * k // n_layers]


def decoder_layers(model: Any) -> list[Any]:
    """The decoder layers, as transformers marks them (``GradientCheckpointingLayer``), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def enable_checkpointing(model: Any, fraction: float) -> int:
    """Recompute ``fraction`` of the decoder layers in backward (selective activation
    checkpointing); returns how many. The others keep their activations: no recompute there."""
    if fraction <= 0:
        return 0
    # Non-reentrant checkpointing needs no input-grad hooks under LoRA and works with DDP.
    # transformers >= 5.2x names it activation_checkpointing_enable (the old name warns).
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = decoder_layers(model)
    if fraction >= 1 or not layers:
        if fraction < 1:
            log.warning("training.gradient_checkpointing: %g, but this model has no per-layer checkpointing "
                        "(transformers' GradientCheckpointingLayer): recomputing every layer", fraction)
        return len(layers)
    keep = set(checkpointed_layers(len(layers), fraction))
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i in keep
    log.info("gradient checkpointing: %d of %d decoder layers recomputed", len(keep), len(layers))
    return len(keep)


def compile_wanted(spec: Any, device: Any, model: Any, *, zero3: bool = False) -> bool:
    """``training.compile`` for this model on ``device`` (:func:`ftcluster.plan.speedups.compile_on`),
    with a line saying why when ``auto`` leaves it off on a GPU or ``true`` cannot apply."""
    from ..plan import speedups as decisions

    setting = spec.training.compile
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    gpu = getattr(device, "type", str(device)) == "cuda"
    on = decisions.compile_on(gpu, setting, zero3=zero3, model_type=model_type)
    if setting is True and zero3:
        log.warning("training.compile: not with ZeRO-3 (deepspeed.config_file sets stage 3); running uncompiled")
    elif setting == "auto" and gpu and not on:
        why = "ZeRO-3's parameter gathers hook every module" if zero3 else (
            f"model type {model_type!r} is not among those compile is tested with "
            f"({', '.join(decisions.COMPILE_MODEL_TYPES)}); set training.compile: true to compile it anyway")
        log.info("training.compile auto: off (%s)", why)
    return on


def compile_layers(model: Any) -> int:
    """``torch.compile`` each decoder layer (regional compilation: the layers share one graph, so
    an 8B model compiles one layer's forward and backward, not 32); returns how many.

    Called after the LoRA wrap (its modules are inside the layers) and before DeepSpeed's. The
    checkpointing wrapper stays outside the compiled call, so a recomputed layer reruns the
    compiled graph. ``FTCLUSTER_COMPILE_BACKEND`` picks another backend (tests: aot_eager; a
    ``module:function`` names a backend callable).

    A frame dynamo cannot capture or the backend cannot compile runs eagerly instead of ending the
    run (``torch._dynamo.config.suppress_errors``); :func:`compile_report` says so after the first
    step, with the first failure's reason, and names later recompilations."""
    import importlib
    import os

    import torch._dynamo

    layers = decoder_layers(model)
    if not layers:
        log.warning("training.compile: this model has no decoder layers that transformers marks "
                    "(GradientCheckpointingLayer); running it uncompiled")
        return 0
    name = os.environ.get("FTCLUSTER_COMPILE_BACKEND", "inductor")
    backend: Any = name
    if ":" in name:
        module, _, attr = name.partition(":")
        backend = getattr(importlib.import_module(module), attr)
    torch._dynamo.config.suppress_errors = True
    failures = logging.getLogger("torch._dynamo.convert_frame")
    if not any(isinstance(f, _DynamoFailures) for f in failures.filters):
        failures.addFilter(_DynamoFailures())
    _COMPILED.update(layers=len(layers), seen=None, why=None)
    for layer in layers:
        layer.compile(backend=backend)
    log.info("training.compile: %d decoder layers compiled (torch.compile, backend %s); the first steps compile",
             len(layers), backend)
    return len(layers)


_COMPILED: dict[str, Any] = {"layers": 0, "seen": None, "why": None}


class _DynamoFailures(logging.Filter):
    """Dynamo's warning when it gives a frame up (suppress_errors) is a traceback per frame: keep the
    first one's reason for :func:`compile_report`'s line and drop the rest (shown with FTCLUSTER_DEBUG=1)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and _COMPILED["why"] is None:
            lines = [ln.strip() for ln in record.getMessage().splitlines() if ln.strip()]
            skip = ("File ", "WON'T CONVERT", "Set TORCHDYNAMO_VERBOSE", "For even more", "from user code", "^")
            reasons = [ln for ln in lines if not ln.startswith(skip)]
            errors = [ln for ln in reasons if "Error" in ln.split(":", 1)[0] or "Exception" in ln.split(":", 1)[0]]
            _COMPILED["why"] = ((errors or reasons or lines or ["unknown"])[-1 if errors else 0])[:240]
        import os

        return os.environ.get("FTCLUSTER_DEBUG") == "1" or record.levelno < logging.WARNING


def compile_report(step: int) -> str | None:
    """One line about the compiled layers, or None: after the first step how many graphs were
    compiled and whether any frame fell back to eager (and why); later, a recompilation (a new batch
    shape or argument type), so a run that keeps recompiling says so instead of only getting slow."""
    if not _COMPILED["layers"]:
        return None
    from torch._dynamo.utils import counters

    total, ok = counters["frames"]["total"], counters["frames"]["ok"]
    seen, _COMPILED["seen"] = _COMPILED["seen"], (total, ok)
    if seen is None:
        failed = total - ok
        if failed:
            return (f"training.compile: {failed} of {total} compiled frame(s) fell back to eager, so those layers run "
                    f"uncompiled (slower, the same training): {_COMPILED['why'] or 'see the warning above'}")
        return (f"training.compile: {counters['stats']['unique_graphs']} graph(s) compiled in the first step for "
                f"{_COMPILED['layers']} layers")
    if total > seen[0]:
        more = total - seen[0]
        fails = more - (ok - seen[1])
        return (f"training.compile: recompiled {more} time(s) before step {step} (a new batch shape or argument type; "
                f"{total} compilations in all)" + (f", {fails} fell back to eager" if fails else ""))
    return None


def token_rows(model: Any, lora: Any) -> dict[str, list[int]]:
    """peft's ``trainable_token_indices`` for the new token ids :func:`fit_embeddings` recorded:
    {embedding module name: ids}, and the output layer's when it is untied and neither adapted by
    LoRA nor in ``lora.modules_to_save`` (peft cannot wrap a LoRA layer in a token adapter; a LoRA
    on lm_head gives each new row its own rank-r update). A tied output layer follows the embedding
    (peft ties the token adapters). Modules in ``modules_to_save`` train in full instead."""
    import re

    ids = list(getattr(model, "ftcluster_new_token_ids", []))
    if not ids:
        return {}

    def name_of(module: Any) -> str:
        return next(n for n, m in model.named_modules() if m is module)

    def named(name: str, names: list[str]) -> bool:
        return any(name == n or name.endswith("." + n) for n in names)

    rows: dict[str, list[int]] = {}
    emb = name_of(model.get_input_embeddings())
    if not named(emb, list(lora.modules_to_save)):
        rows[emb.rsplit(".", 1)[-1]] = ids
    out = model.get_output_embeddings()
    if out is None or model.config.tie_word_embeddings:
        return rows
    head = name_of(out)
    t = lora.target_modules
    adapted = (named(head, list(t)) if not isinstance(t, str)
               else t != "all-linear" and re.fullmatch(t, head) is not None)
    if not adapted and not named(head, list(lora.modules_to_save)):
        rows[head.rsplit(".", 1)[-1]] = ids
    return rows


def apply_lora(model: Any, lora: Any, seed: int):
    """Wrap ``model`` with a peft LoRA adapter (seeded A init); only adapter weights train, plus the
    rows of new tokens (:func:`token_rows`) and ``lora.modules_to_save``."""
    import torch
    from peft import LoraConfig, get_peft_model

    target = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    rows = token_rows(model, lora)
    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=target,
                     bias="none", task_type="CAUSAL_LM", modules_to_save=list(lora.modules_to_save) or None,
                     trainable_token_indices=rows or None)
    torch.manual_seed(seed + 1)
    try:
        peft_model = get_peft_model(model, cfg)
    except ValueError as exc:  # e.g. a target module name that the model does not have
        raise TrainError(f"lora.target_modules: {str(exc).splitlines()[0]}") from exc
    if rows:
        log.info("LoRA: the %d new token ids train their own rows of %s (peft trainable_token_indices)",
                 len(next(iter(rows.values()))), " and ".join(rows))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    log.info("LoRA r=%d alpha=%g on %s: %s trainable of %s parameters (%.3f%%)", lora.r, lora.alpha, target,
             f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return peft_model


def load_adapter(base: Any, folder: Path, tokenizer: Any, adapter_name: str = "default"):
    """``PeftModel.from_pretrained(base, folder)`` once the base has a row for every token of the
    adapter's tokenizer (``tokenizer``, saved in ``folder``): an adapter trained with added tokens
    on a base that lacks them is refused in one line, instead of peft's shape errors or an index
    past the embedding at the first new token."""
    from peft import PeftModel

    rows = base.get_input_embeddings().weight.shape[0]
    need = len(tokenizer)
    try:
        cfg = json.loads((Path(folder) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cfg = {}
    indices = cfg.get("trainable_token_indices") or []
    for ids in (indices.values() if isinstance(indices, dict) else [indices]):
        need = max([need, *(int(i) + 1 for i in ids)])
    if rows < need:
        vocab = sorted(((i, t) for t, i in tokenizer.get_vocab().items() if i >= rows))
        missing = ", ".join(t for _, t in vocab[:8]) + (" ..." if len(vocab) > 8 else "")
        raise TrainError(f"{folder}: the adapter was trained with a vocabulary of {need} tokens, the base model has "
                         f"{rows} embeddings (missing: {missing or 'ids ' + str(rows) + '+'}); load it on the base "
                         "it was trained on, resized to its tokenizer (ftcluster sample does), or use its merged model")
    return PeftModel.from_pretrained(base, str(folder), adapter_name=adapter_name)
