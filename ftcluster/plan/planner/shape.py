"""Model shape and exact parameter counts, from a ``config.json`` or a random-init preset.

Never loads weights and never imports torch. Counts follow transformers' Llama-family
modelling code (``modeling_llama.py``: q/k/v/o projections with GQA, a gated SwiGLU MLP,
RMSNorm weights, optional tied ``lm_head``) and peft's LoRA layers (``A: r x in``,
``B: out x r`` per adapted Linear; ``A: r x vocab``, ``B: hidden x r`` on an Embedding);
tests/unit/plan/test_planner.py checks them against the real libraries.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

from ...errors import FtclusterError
from ...spec.schema import PRESETS
from ...spec.terms import added_count
from ...storage.uri import is_local, local_path

# The random-init presets' shapes: the spec's own table (ftcluster.spec.schema.PRESETS, torch-free).
PRESET_SHAPES: dict[str, dict[str, Any]] = PRESETS

# Public shapes recognised by name when a remote config.json cannot be read (validate/submit
# never touch the network). Values are the models' own config.json fields.
_LLAMA3 = dict(vocab_size=128256, num_attention_heads=32, num_key_value_heads=8)
KNOWN_SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": PRESET_SHAPES["llama-3.2-1b"],
    "llama-3.2-3b": dict(_LLAMA3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, tie_word_embeddings=True),
    "llama-3-8b": PRESET_SHAPES["llama-3-8b"],
    "llama-3.1-8b": PRESET_SHAPES["llama-3-8b"],
    "llama-3-70b": dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64),
    "llama-3.1-70b": dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64),
    "llama-3.3-70b": dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64),
    "mistral-7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=32768),
}
_NAME_NOISE = re.compile(r"^(meta-)|(-instruct|-hf|-base|-chat|-v0\.\d)+$")

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """A dense decoder-only transformer with a gated MLP (Llama, Mistral, Qwen2/3)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v/o (Llama's attention_bias)
    qkv_bias: bool = False  # bias on q/k/v only (Qwen2)
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    model_type: str = "llama"  # config.json's; the runtime's fused loss (train/speedups.py) is Llama-only
    source: str = ""
    notes: tuple[str, ...] = field(default=())

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.hd

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.hd

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each Linear in one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_params(self) -> int:
        """Parameters of one decoder layer."""
        n = sum(a * b for a, b in self.linear_dims().values())
        if self.attention_bias:
            n += self.q_dim + 2 * self.kv_dim + self.hidden_size
        elif self.qkv_bias:
            n += self.q_dim + 2 * self.kv_dim
        if self.mlp_bias:
            n += 2 * self.intermediate_size + self.hidden_size
        n += 2 * self.hidden_size  # input and post-attention RMSNorm weights
        if self.qk_norm:
            n += 2 * self.hd
        return n

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def total_params(self) -> int:
        """Every parameter of the causal LM; a tied lm_head is counted once."""
        head = 0 if self.tie_word_embeddings else self.embedding_params
        return self.embedding_params + self.num_hidden_layers * self.layer_params() + self.hidden_size + head

    def matmul_params(self) -> int:
        """Parameters that take part in a matrix multiply per token (the embedding lookup does not,
        the lm_head does, tied or not): the N in the 6N FLOPs rule."""
        return self.num_hidden_layers * self.layer_params() + self.embedding_params


# ----------------------------------------------------------------------------- LoRA


@dataclass(frozen=True)
class LoraCount:
    trainable: int  # adapter weights plus modules_to_save copies plus new tokens' rows
    adapter: int  # LoRA A/B weights only
    saved_copies: int  # trainable copies of modules_to_save
    targets: tuple[str, ...]  # module names that got an adapter, per layer or global (lm_head, embed_tokens)
    token_rows: int = 0  # rows of added tokens trained through peft's trainable_token_indices


def lora_targets(shape: ModelShape, target_modules: str | list[str]) -> tuple[str, ...]:
    """Module names peft adapts. ``all-linear`` is every Linear but the output layer (peft's rule)."""
    if target_modules == "all-linear":
        return LINEAR_MODULES
    known = set(LINEAR_MODULES) | {"lm_head", "embed_tokens"}
    out = []
    for name in target_modules:
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in known:
            raise FtclusterError(f"lora.target_modules: the planner does not know module {name!r}; "
                                 f"known: {', '.join(sorted(known))}")
        if leaf not in out:
            out.append(leaf)
    return tuple(out)


def count_lora(shape: ModelShape, r: int, target_modules: str | list[str],
               modules_to_save: list[str] | tuple[str, ...] = (), added_tokens: int = 0) -> LoraCount:
    """Trainable parameters of a peft LoRA model (bias='none'). ``added_tokens`` train their own rows
    of the embedding and of an untied output layer that is neither adapted nor in ``modules_to_save``
    (the runtime's ``train.model.token_rows``); a module in ``modules_to_save`` trains in full instead."""
    targets = lora_targets(shape, target_modules)
    dims = shape.linear_dims()
    adapter = 0
    for t in targets:
        if t in dims:
            a, b = dims[t]
            adapter += shape.num_hidden_layers * r * (a + b)
        elif t == "lm_head":
            adapter += r * (shape.hidden_size + shape.vocab_size)
        elif t == "embed_tokens":  # lora_embedding_A: r x vocab, lora_embedding_B: hidden x r
            adapter += r * (shape.vocab_size + shape.hidden_size)
    copies = 0
    for m in modules_to_save:
        if m in ("lm_head", "embed_tokens"):
            copies += shape.embedding_params
        else:
            raise FtclusterError(f"modules_to_save: the planner counts lm_head and embed_tokens only (got {m!r})")
    rows = 0
    if added_tokens:
        rows += 0 if "embed_tokens" in modules_to_save else added_tokens * shape.hidden_size
        if not (shape.tie_word_embeddings or "lm_head" in targets or "lm_head" in modules_to_save):
            rows += added_tokens * shape.hidden_size
    return LoraCount(adapter + copies + rows, adapter, copies, targets, rows)


PAD_MULTIPLE = 64  # the runtime's (train.model.PAD_MULTIPLE): embedding rows come in multiples of 64


def with_added_tokens(shape: ModelShape, added: int) -> ModelShape:
    """``shape`` with its embedding (and output) matrices grown for ``added`` tokens, as the runtime
    grows them: vocabulary + added, rounded up to a multiple of 64. An upper bound: terms the
    tokenizer holds already, and spare rows a model has beyond its tokenizer, are not known here."""
    if added <= 0:
        return shape
    rows = -(-(shape.vocab_size + added) // PAD_MULTIPLE) * PAD_MULTIPLE
    return replace(shape, vocab_size=rows,
                   notes=shape.notes + (f"vocabulary {shape.vocab_size:,} + {added} added tokens: {rows:,} rows",))


# ----------------------------------------------------------------------------- sources


def shape_from_config(cfg: dict[str, Any], source: str = "config.json") -> ModelShape:
    """A :class:`ModelShape` from a Hugging Face ``config.json`` mapping."""
    if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers keep the LM's fields here
        cfg = {**cfg["text_config"], "tie_word_embeddings": cfg.get("tie_word_embeddings",
                                                                    cfg["text_config"].get("tie_word_embeddings"))}
    if cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts"):
        raise FtclusterError(f"{source}: mixture-of-experts models are not modelled by the planner yet; "
                             "use --no-plan-check")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if not isinstance(cfg.get(k), int)]
    if missing:
        raise FtclusterError(f"{source}: not a decoder config the planner understands (missing {', '.join(missing)})")
    model_type = str(cfg.get("model_type", "llama"))
    notes = []
    if model_type not in ("llama", "mistral", "qwen2", "qwen3", "granite"):
        notes.append(f"model_type {model_type!r} counted as a Llama-style decoder")
    # transformers' PretrainedConfig defaults tie_word_embeddings to True; LlamaConfig and
    # Qwen2Config to False. A missing key follows the model type.
    tie = cfg.get("tie_word_embeddings")
    if tie is None:
        tie = model_type not in ("llama", "mistral", "qwen2", "qwen3")
    return ModelShape(
        hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        vocab_size=cfg["vocab_size"], head_dim=cfg.get("head_dim") or 0, tie_word_embeddings=bool(tie),
        attention_bias=bool(cfg.get("attention_bias", False)), qkv_bias=model_type == "qwen2",
        mlp_bias=bool(cfg.get("mlp_bias", False)), qk_norm=model_type == "qwen3", model_type=model_type,
        source=source, notes=tuple(notes))


def shape_from_random_init(ri: Any) -> ModelShape:
    """The shape of a spec's ``model.random_init`` section (presets already applied by the spec)."""
    return ModelShape(hidden_size=ri.hidden_size, intermediate_size=ri.intermediate_size,
                      num_hidden_layers=ri.num_hidden_layers, num_attention_heads=ri.num_attention_heads,
                      num_key_value_heads=ri.num_key_value_heads, vocab_size=ri.vocab_size,
                      tie_word_embeddings=ri.tie_word_embeddings,
                      source=f"random_init{':' + ri.preset if ri.preset else ''}")


def known_shape(name: str) -> ModelShape | None:
    """A public model's shape recognised from the last part of a path or hub id, e.g.
    ``s3://models/base/llama-3.1-8b`` or ``meta-llama/Llama-3.1-8B-Instruct``."""
    leaf = name.rstrip("/").rsplit("/", 1)[-1].lower()
    leaf = _NAME_NOISE.sub("", _NAME_NOISE.sub("", leaf))
    cfg = KNOWN_SHAPES.get(leaf)
    if cfg is None:
        return None
    s = shape_from_config({"model_type": "llama", **cfg}, f"{name} (shape recognised from the name)")
    return replace(s, notes=s.notes + (f"shape taken from the name {leaf!r}, not from its config.json",))


def read_config(uri: str, storage_options: dict[str, Any] | None = None, *, network: bool) -> dict[str, Any] | None:
    """``<uri>/config.json`` as a dict; None when it is remote and ``network`` is False, or absent."""
    if not is_local(uri) and not network:
        return None
    path = uri.rstrip("/") + "/config.json"
    try:
        if not is_local(uri):
            import fsspec

            with fsspec.open(path, "rb", **(storage_options or {})) as fh:
                return json.loads(fh.read())  # pyright: ignore[reportAttributeAccessIssue]  (fsspec.open's stub says list)
        with open(local_path(path), "rb") as fh:
            return json.loads(fh.read())
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - any store failure (credentials, endpoint, ...) is one line
        if not network:
            return None
        from ...storage.retry import classify

        permanent = classify(exc, path)
        what = permanent.problem if permanent else (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        fix = permanent.fix if permanent else "check the endpoint and the network"
        raise FtclusterError(f"model.path: cannot read {path} ({what}); {fix}, or plan offline with "
                             "--offline") from None


def spec_shape(spec: Any, *, network: bool = False) -> ModelShape | None:
    """The model shape of a job spec, or None when it cannot be known (offline, unknown name).

    Order: random_init; the model folder's config.json (a remote one only with ``network``);
    a public model recognised by name.
    """
    shape = _base_shape(spec, network)
    return None if shape is None else with_added_tokens(shape, added_count(spec.tokenizer))


def _base_shape(spec: Any, network: bool) -> ModelShape | None:
    m = spec.model
    if m.random_init is not None:
        return shape_from_random_init(m.random_init)
    name = m.path or m.hub_id or ""
    cfg = None
    if m.path:
        try:
            cfg = read_config(m.path, m.storage_options, network=network)
        except FtclusterError:
            if known_shape(name) is None:
                raise
            cfg = None  # a public model recognised by its name: plan with that shape (the plan notes it)
    elif m.hub_id and network:
        cfg = _hub_cached_config(m.hub_id)
    if cfg is not None:
        return shape_from_config(cfg, f"{name}/config.json")
    return known_shape(name)


def _hub_cached_config(hub_id: str) -> dict[str, Any] | None:
    """A hub model's config.json from the local Hugging Face cache only (the planner never downloads)."""
    import os
    from pathlib import Path

    root = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface")) / "hub")
    snaps = root / f"models--{hub_id.replace('/', '--')}" / "snapshots"
    for cfg in sorted(snaps.glob("*/config.json")) if snaps.is_dir() else []:
        try:
            return json.loads(cfg.read_text())
        except (OSError, ValueError):
            continue
    return None
