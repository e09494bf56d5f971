"""Merge a peft LoRA adapter into its base model one tensor at a time (the engine of ``ftcluster merge``).

peft's ``merge_and_unload()`` needs the whole base model in memory. :func:`merge_folder` reads the
base's safetensors files tensor by tensor (plain reads, :mod:`.tensorfile`), applies what the
adapter changes in that tensor and streams it into the output file, whose header was written
first. Peak memory is about the largest single tensor (the embedding, usually) plus one fp32
copy of it (the LoRA delta; a 16-bit weight is upcast ``CHUNK_ELEMS`` elements at a time).

What the adapter changes, as peft 0.22's merge does it:

* LoRA on a Linear: ``W + (B @ A) * scale`` in fp32, cast back to W's dtype
  (``peft/tuners/lora/layer.py`` ``Linear.get_delta_weight`` and ``Linear.merge``: the delta is
  computed in fp32 on CPU and added with ``base_layer.weight.data += delta``); on an Embedding
  ``(B @ A).T * scale`` (``Embedding.get_delta_weight``). ``scale = lora_alpha / r``, or
  ``lora_alpha / sqrt(r)`` with ``use_rslora`` (``LoraLayer.update_layer``), with ``r`` and
  ``lora_alpha`` per module from ``rank_pattern``/``alpha_pattern`` (``peft.utils.other.get_pattern_key``).
* ``modules_to_save``: the saved module's tensor (``base_model.model.lm_head.weight`` in the
  adapter file) replaces the base's.
* ``trainable_token_indices``: the saved rows (``...embed_tokens.token_adapter.trainable_tokens_delta``)
  overwrite those rows (``peft/tuners/trainable_tokens/layer.py`` ``merge``: ``index_copy``).
* Added tokens: the base's embedding (and untied output matrix) is first grown and mean-initialised
  exactly as :func:`ftcluster.train.model.fit_embeddings` did before training, from the adapter
  folder's tokenizer and ``ftcluster_meta.json``.

A base with tied embeddings has one matrix in its files: every change to the embedding is the
output layer's too, as in the tied model peft merges.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TrainError
from .tensorfile import FLOATS, ShardWriter, nbytes, read_all, read_header, read_tensor, torch_dtype

PREFIX = "base_model.model."  # peft's PeftModelForCausalLM -> LoraModel -> the base model's names
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")
TOKENS_KEY = re.compile(r"^(?P<module>.+)\.token_adapter\.trainable_tokens_delta$")
CHUNK_ELEMS = 16 * 2**20  # elements of a 16-bit weight upcast at once: 64 MB of fp32
PAD_MULTIPLE = 64  # as ftcluster.train.model.PAD_MULTIPLE (not imported: that module is heavier)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja",
                   "chat_template.json")
DTYPE_NAMES = {"fp32": "F32", "float32": "F32", "bf16": "BF16", "bfloat16": "BF16", "fp16": "F16", "float16": "F16"}
# Adapter features whose merge is not W + scale * B @ A (or that change the base at init): refused.
REFUSED = {
    "use_dora": "DoRA (use_dora) rescales each weight column by a learned magnitude",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-style weights) transposes the update per layer type",
    "lora_bias": "lora_bias trains a bias on lora_B",
    "layer_replication": "layer_replication duplicates decoder layers",
    "target_parameters": "target_parameters adapts raw parameters (peft's ParamWrapper)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) applies only after its invocation tokens",
    "use_qalora": "QALoRA (use_qalora) pools its inputs",
}


@dataclass(frozen=True)
class MergeInfo:
    """What :func:`merge_folder` wrote."""

    out_dir: Path
    files: tuple[str, ...]  # weight files written (the base's names), then the index if sharded
    tensors: int  # tensors written
    total_bytes: int  # tensor bytes written (the index's total_size)
    dtype: str | None  # the output dtype asked for (safetensors name), None: each tensor's own
    lora_merged: int  # weights that got a LoRA update
    replaced: tuple[str, ...]  # tensors replaced by the adapter's modules_to_save
    token_rows: int  # embedding/output rows overwritten by trainable_token_indices
    base_rows: int  # the base's embedding rows
    rows: int  # the merged model's embedding rows (vocab_size)
    vocab: int | None  # the adapter's tokenizer length (ftcluster_vocab when rows were padded), if it has one
    peak_rss_bytes: int  # this process's peak resident memory (VmHWM) when the merge ended; 0 if unknown


@dataclass
class _Adapter:
    lora: dict[str, tuple[Any, Any, float, bool]] = field(default_factory=dict)  # tensor -> (A, B, scale, embedding)
    full: dict[str, Any] = field(default_factory=dict)  # tensor -> replacement (modules_to_save)
    tokens: dict[str, tuple[list[int], Any]] = field(default_factory=dict)  # tensor -> (row ids, rows)


def merge_folder(base_dir: Path, adapter_dir: Path, out_dir: Path, *, dtype: str | None = None,
                 progress: Callable[[int, int], None] | None = None) -> MergeInfo:
    """Merge the peft LoRA adapter in ``adapter_dir`` into the safetensors model in ``base_dir``,
    writing a model folder to ``out_dir`` (see the module docstring for the math), one tensor in memory at a time.

    The base is ``model.safetensors`` or shards with ``model.safetensors.index.json``; the output
    keeps that layout and those file names. ``dtype`` (``bf16``/``fp16``/``fp32`` or the torch
    names) casts every floating tensor first, as loading the base in that dtype would; None keeps
    each one's. ``config.json`` (``vocab_size``, ``ftcluster_vocab``), ``generation_config.json``
    (padding rows suppressed) and the adapter folder's tokenizer files are written too.
    ``progress(bytes_done, bytes_total)`` is called after each tensor. Raises TrainError.
    """
    import torch

    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    if out_dir.resolve() in (base_dir.resolve(), adapter_dir.resolve()):
        raise TrainError(f"{out_dir}: the merged model must go to a folder of its own, not the base's or the adapter's")
    out_dtype = None
    if dtype is not None:
        out_dtype = DTYPE_NAMES.get(str(dtype).removeprefix("torch."))
        if out_dtype is None:
            raise TrainError(f"dtype {dtype!r}: use one of {', '.join(DTYPE_NAMES)}")
    files, index = _base_files(base_dir)
    headers = {name: read_header(base_dir / name) for name in files}
    where = {t: name for name, h in headers.items() for t in h.entries}
    config = _read_json(base_dir / "config.json")
    emb_name, out_name = _embedding_names(base_dir, where)
    cfg = _adapter_config(adapter_dir)
    adapter = _read_adapter(adapter_dir, cfg, emb_name, where)

    # The embedding rows as ftcluster.train.model.fit_embeddings set them before training.
    vocab, base_vocab, pad_id = _adapter_vocab(adapter_dir)
    emb = headers[where[emb_name]].entries[emb_name]
    rows = size = emb.shape[0]
    grown = config.get("ftcluster_vocab")
    padded = grown is not None
    mean_rows: tuple[int, int] | None = None
    if vocab is not None:
        first = min(rows, max(base_vocab if base_vocab is not None else rows, grown or 0))
        if first < vocab:
            if vocab > rows:
                size, padded = -(-vocab // PAD_MULTIPLE) * PAD_MULTIPLE, True
            mean_rows = (first, size if padded else vocab)
    resized = {n for n in (emb_name, out_name) if n is not None and n in where}

    def out_spec(name: str) -> tuple[str, tuple[int, ...]]:
        e = headers[where[name]].entries[name]
        shape = (size, *e.shape[1:]) if name in resized else e.shape
        return (out_dtype if out_dtype and e.dtype in FLOATS else e.dtype), shape

    _check_shapes(adapter, {n: out_spec(n)[1] for n in where})
    total = sum(nbytes(*out_spec(n)) for n in where)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = lora_merged = token_rows = 0
    for fname in files:
        h = headers[fname]
        specs = [(n, *out_spec(n)) for n in h.entries]
        part = out_dir / (fname + ".partial")
        writer = ShardWriter(part, specs, h.metadata)
        try:
            with open(h.path, "rb") as f, torch.no_grad():
                for n, want, _shape in specs:
                    t = _merged_tensor(read_tensor(f, h, n), want, n, adapter,
                                       (size, mean_rows) if n in resized else None)
                    lora_merged += n in adapter.lora
                    token_rows += len(adapter.tokens[n][0]) if n in adapter.tokens else 0
                    writer.write(n, t)
                    done += t.numel() * t.element_size()
                    del t  # before the next read: one tensor held at a time
                    if progress is not None:
                        progress(done, total)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        os.replace(part, out_dir / fname)  # a file under its final name is complete
    written = list(files)
    if index is not None:
        index = {**index, "metadata": {**(index.get("metadata") or {}), "total_size": total}}
        _write_json(out_dir / "model.safetensors.index.json", index)
        written.append("model.safetensors.index.json")

    ftcluster_vocab = vocab if (vocab is not None and padded and size > vocab) else grown
    if size != rows:
        config["vocab_size"] = size
    if ftcluster_vocab is not None:
        config["ftcluster_vocab"] = ftcluster_vocab
    if pad_id is not None:  # as load_base_model sets it from the tokenizer
        config["pad_token_id"] = pad_id
    if out_dtype is not None:
        for key in ("dtype", "torch_dtype"):
            if key in config or key == "dtype":
                config[key] = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[out_dtype]
    _write_json(out_dir / "config.json", config)
    _write_generation_config(base_dir, out_dir, config, ftcluster_vocab, size)
    for name in TOKENIZER_FILES:
        if (adapter_dir / name).is_file():
            shutil.copyfile(adapter_dir / name, out_dir / name)
    return MergeInfo(out_dir=out_dir, files=tuple(written), tensors=len(where), total_bytes=total, dtype=out_dtype,
                     lora_merged=lora_merged, replaced=tuple(sorted(adapter.full)), token_rows=token_rows,
                     base_rows=rows, rows=size, vocab=vocab, peak_rss_bytes=peak_rss_bytes())


def _merged_tensor(t: Any, want: str, name: str, adapter: _Adapter, resize: tuple[int, tuple[int, int] | None] | None):
    """Tensor ``name`` of the base (``t``, as read) with the adapter's changes, in dtype ``want``."""
    import torch

    dtype = torch_dtype(want)
    if t.dtype != dtype:  # the base loaded in the output dtype, as from_pretrained(dtype=...) does
        t = t.to(dtype)
    if resize is not None:
        size, mean_rows = resize
        if size != t.shape[0]:  # resize_token_embeddings(size): the old rows kept, the new set below
            grown = torch.empty((size, *t.shape[1:]), dtype=t.dtype)
            grown[: t.shape[0]] = t
            t = grown
        if mean_rows is not None:  # ftcluster.train.model._set_mean_rows, the same expression
            known, end = mean_rows
            t[known:end] = t[:known].float().mean(dim=0).to(t.dtype)
    if name in adapter.full:
        t = adapter.full[name].to(t.dtype).clone()
    if name in adapter.lora:
        a, b, scale, embedding = adapter.lora[name]
        _add_lora(t, a.float(), b.float(), scale, embedding)
    if name in adapter.tokens:  # TrainableTokensLayer.merge: index_copy of the trained rows
        ids, delta = adapter.tokens[name]
        t = t.index_copy(0, torch.tensor(ids), delta.to(t.dtype))
    return t


def _add_lora(w: Any, a: Any, b: Any, scale: float, embedding: bool) -> None:
    """``w += (B @ A) * scale`` in place (``(B @ A).T`` for an Embedding), in fp32.

    The delta is one matmul, as peft computes it (a matmul split by rows can round differently,
    and the merge is meant to be bit-equal to peft's), so it costs an fp32 copy of the tensor; a
    16-bit weight is then upcast, added to and rounded a block of rows at a time."""
    # peft: output_tensor = transpose(weight_B @ weight_A, fan_in_fan_out); output_tensor.mul_(self.scaling[adapter])
    delta = (b @ a).T if embedding else b @ a
    delta.mul_(scale)
    if w.dtype == delta.dtype:
        w.add_(delta)
        return
    step = max(1, CHUNK_ELEMS // max(1, w.shape[1]))
    for i in range(0, w.shape[0], step):  # peft's `weight.data += delta` on a 16-bit weight: fp32 sum, rounded once
        w[i:i + step] = w[i:i + step].float().add_(delta[i:i + step]).to(w.dtype)


def _base_files(base_dir: Path) -> tuple[list[str], dict[str, Any] | None]:
    """The base's weight files in order and its index (None: a single model.safetensors)."""
    index_path = base_dir / "model.safetensors.index.json"
    if index_path.is_file():
        index = _read_json(index_path)
        files = list(dict.fromkeys(index.get("weight_map", {}).values()))
        if not files:
            raise TrainError(f"{index_path}: its weight_map names no files")
        return files, index
    if (base_dir / "model.safetensors").is_file():
        return ["model.safetensors"], None
    other = sorted(p.name for p in base_dir.glob("*.bin")) if base_dir.is_dir() else []
    raise TrainError(f"{base_dir}: no model.safetensors or model.safetensors.index.json"
                     + (f" (found {other[0]}: convert it to safetensors first)" if other else ""))


def _embedding_names(base_dir: Path, where: dict[str, str]) -> tuple[str, str | None]:
    """The tensor names of the input embedding and the output layer (None when the files lack it:
    tied), from the architecture built on the meta device (no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(base_dir), local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError) as exc:
        raise TrainError(f"{base_dir}: not a causal LM transformers can build: {str(exc).splitlines()[0]}") from None
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    emb = names[id(model.get_input_embeddings())] + ".weight"
    out_module = model.get_output_embeddings()
    out = names[id(out_module)] + ".weight" if out_module is not None else None
    if emb not in where:
        raise TrainError(f"{base_dir}: the weight files have no {emb} (the input embedding's name in the architecture)")
    return emb, (out if out in where else None)


def _adapter_config(adapter_dir: Path) -> dict[str, Any]:
    cfg = _read_json(adapter_dir / "adapter_config.json")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise TrainError(f"{adapter_dir}: a {cfg.get('peft_type')} adapter; only LoRA adapters are merged")
    for key, why in REFUSED.items():
        if cfg.get(key):
            raise TrainError(f"{adapter_dir}: cannot merge this adapter: {why}; merge it with peft's merge_and_unload()")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.split("_")[0] in ("pissa", "olora", "corda", "loftq"):
        raise TrainError(f"{adapter_dir}: cannot merge this adapter: init_lora_weights={init} changed the base "
                         "weights it was trained on; merge it with peft's merge_and_unload()")
    if cfg.get("bias", "none") != "none":
        raise TrainError(f"{adapter_dir}: cannot merge this adapter: bias={cfg['bias']} trains base biases")
    return cfg


def _pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft.utils.other.get_pattern_key: the first pattern that matches the end of the module name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def _read_adapter(adapter_dir: Path, cfg: dict[str, Any], emb_name: str, where: dict[str, str]) -> _Adapter:
    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise TrainError(f"{adapter_dir}: no adapter_model.safetensors (a peft adapter saved with safe_serialization)")
    tensors = read_all(path)
    ad = _Adapter()
    pairs: dict[str, dict[str, Any]] = {}
    indices = cfg.get("trainable_token_indices") or {}
    if isinstance(indices, list):  # a list means the input embedding (peft's TrainableTokensConfig default)
        indices = {emb_name.removesuffix(".weight").rsplit(".", 1)[-1]: indices}

    def target(key: str, module: str) -> str:
        name = module + ".weight"
        if name not in where:
            raise TrainError(f"{path}: tensor {key} has no base tensor {name} to merge into"
                             + (" (the base ties its output layer to the input embedding)" if "head" in module else ""))
        return name

    for key, t in tensors.items():
        name = key.removeprefix(PREFIX)
        if m := LORA_KEY.match(name):
            pairs.setdefault(m["module"], {})[m["part"][-1]] = (t, m["part"].startswith("lora_embedding"))
        elif m := TOKENS_KEY.match(name):
            module = m["module"]
            ids = next((v for k, v in indices.items() if module == k or module.endswith("." + k)), None)
            if ids is None or len(ids) != t.shape[0]:
                raise TrainError(f"{path}: {key} has {t.shape[0]} rows but adapter_config.json's "
                                 f"trainable_token_indices gives {module} {len(ids) if ids else 'no'} ids")
            ad.tokens[target(key, module)] = ([int(i) for i in ids], t)
        else:
            # modules_to_save: the module's own tensor (peft 0.22 saves it under the module's name);
            # save_embedding_layers=True (peft's default for a resized embedding; ftcluster saves
            # without) adds the whole wrapped matrix as `<module>.token_adapter.base_layer.weight`
            # or `<module>.base_layer.weight`: it replaces the base's, as loading the adapter does.
            for wrapper in (".modules_to_save.default", ".token_adapter.base_layer", ".base_layer"):
                name = name.replace(wrapper, "")
            if name not in where:
                raise TrainError(f"{path}: tensor {key} matches no tensor of the base ({name})")
            ad.full[name] = t
    for module, parts in pairs.items():
        if set(parts) != {"A", "B"}:
            raise TrainError(f"{path}: {module} has lora_{''.join(parts)} but not both lora_A and lora_B")
        (a, embedding), (b, _) = parts["A"], parts["B"]
        r = _pattern(cfg.get("rank_pattern") or {}, module, cfg.get("r", 8))
        alpha = _pattern(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8))
        if a.shape[0] != r:
            raise TrainError(f"{path}: {module}.lora_A has rank {a.shape[0]}, adapter_config.json says r={r}")
        # LoraLayer.update_layer: scaling = lora_alpha / sqrt(r) with use_rslora, else lora_alpha / r
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        ad.lora[target(module, module)] = (a, b, scale, embedding)
    return ad


def _check_shapes(ad: _Adapter, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every change fits the (grown) tensor it goes to, before anything is written."""
    for name, t in ad.full.items():
        if tuple(t.shape) != shapes[name]:
            raise TrainError(f"adapter: {name} is {list(t.shape)} in the adapter, {list(shapes[name])} in the base "
                             "(resized to the adapter's tokenizer); was it trained on this base?")
    for name, (a, b, _, embedding) in ad.lora.items():
        out, inp = (a.shape[1], b.shape[0]) if embedding else (b.shape[0], a.shape[1])
        if (out, inp) != shapes[name] or a.shape[0] != b.shape[1]:
            raise TrainError(f"adapter: LoRA of {name} gives a {[out, inp]} update, the base tensor is "
                             f"{list(shapes[name])}; was it trained on this base?")
    for name, (ids, rows) in ad.tokens.items():
        if max(ids, default=-1) >= shapes[name][0] or tuple(rows.shape[1:]) != shapes[name][1:]:
            raise TrainError(f"adapter: trainable tokens of {name} (ids up to {max(ids)}) do not fit its "
                             f"{list(shapes[name])}; was it trained on this base?")


def _adapter_vocab(adapter_dir: Path) -> tuple[int | None, int | None, int | None]:
    """(len(tokenizer), its size before the spec's added tokens, pad id) of the adapter folder's
    tokenizer (ftcluster_meta.json's ``tokenizer.base_vocab``); Nones without one."""
    if not any((adapter_dir / n).is_file() for n in TOKENIZER_FILES[:2]):
        return None, None, None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(adapter_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TrainError(f"{adapter_dir}: cannot load its tokenizer: {str(exc).splitlines()[0]}") from None
    meta_path = adapter_dir / "ftcluster_meta.json"
    base_vocab = None
    if meta_path.is_file():
        base_vocab = (_read_json(meta_path).get("tokenizer") or {}).get("base_vocab")
    return len(tok), (int(base_vocab) if base_vocab is not None else None), tok.pad_token_id


def _write_generation_config(base_dir: Path, out_dir: Path, config: dict[str, Any], vocab: int | None,
                             rows: int) -> None:
    """The base's generation config, with the padding rows suppressed (ftcluster.train.model.mask_padding_logits)."""
    path = base_dir / "generation_config.json"
    gen = _read_json(path) if path.is_file() else None
    if vocab is not None and rows > vocab:
        if gen is None:
            gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
        gen["suppress_tokens"] = sorted(set(gen.get("suppress_tokens") or []) | set(range(vocab, rows)))
    if gen is not None:
        _write_json(out_dir / "generation_config.json", gen)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TrainError(f"{path}: cannot read it: {str(exc).splitlines()[0]}") from None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def peak_rss_bytes() -> int:
    """This process's peak resident set (``VmHWM`` of /proc/self/status); 0 where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def materialize_random_init(spec: Any, tokenizer: Any, out_dir: Path, *, device: str | None = None,
                            max_shard_bytes: int = 5 * 2**30) -> Path:
    """Save the ``model.random_init`` base of ``spec`` to ``out_dir`` (safetensors, shards of at
    most ``max_shard_bytes``), so that :func:`merge_folder` has files to read.

    Built as :func:`ftcluster.train.model.load_base_model` builds it, before ``fit_embeddings``
    (the merge grows the embedding itself): ``torch.manual_seed(spec.training.seed)``, the same
    LlamaConfig (sized from ``tokenizer``, the adapter's, with ``ftcluster_base_vocab`` set as
    ``ftcluster sample`` sets it) and initialised on ``device`` in the run's compute dtype. The
    weights are the training's only on the same kind of device: CUDA's random generator is not
    the CPU's, so ``device`` defaults to cuda when there is one, as training does. This step
    holds the whole model in memory (unlike the merge).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from .model import compute_dtype, llama_config

    m = spec.model
    if m.random_init is None:
        raise TrainError("model.random_init: the spec's base model is not a random_init one; merge its files")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = compute_dtype(spec.training.precision, dev)
    torch.manual_seed(spec.training.seed)  # load_base_model's order: seed, then build
    config = llama_config(m.random_init, tokenizer, m.attn_implementation)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=m.attn_implementation)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), max_shard_size=max_shard_bytes)
    return out_dir
