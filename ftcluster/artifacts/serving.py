"""Will a LoRA adapter folder load in a serving engine (vLLM, LoRAX), and if not, why and what to do.

Pure rules over the adapter's ``adapter_config.json``, the names and shapes in the header of its
``adapter_model.safetensors`` and ftcluster's ``ftcluster_meta.json`` (the tokens training added);
torch-free: the safetensors header is read as bytes (8-byte little-endian length, then JSON).

Each rule copies a check of the engine's own loader, cited beside it:
  vLLM  v0.34.0, commit 62d4bc3c7 (``vllm/_version.py`` of the release wheel; the repository is too big
        to mirror here), https://github.com/vllm-project/vllm/blob/v0.34.0/<file>
  LoRAX commit a7394ba386ece427d5a6125b419aa38b46d966dc,
        https://github.com/predibase/lorax/blob/a7394ba386ece427d5a6125b419aa38b46d966dc/<file>
The module lists of both are those of Llama-like models (Llama, Mistral, Qwen2: q/k/v/o, gate/up/down).
Severity: "error" = will not load, or loads but serves something other than what was trained (weights
dropped); "warning" = loads once the server is started with the flag the finding names.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import FtclusterError
from ..storage.uri import fs_and_path, one_line

ENGINES = ("vllm", "lorax")
# vllm/config/lora.py#L26 (MaxLoRARanks) and L33 (max_lora_rank default 16), v0.34.0
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
# vllm/model_executor/models/llama.py#L475-L482 (packed_modules_mapping qkv_proj/gate_up_proj expanded to
# the peft names, embedding_modules) as vllm/lora/worker_manager.py#L106-L118 builds expected_lora_modules
VLLM_LLAMA_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                "embed_tokens", "lm_head"})
# server/lorax_server/models/flash_llama.py#L26 (ADAPTER_LAYERS), lorax a7394ba
LORAX_LLAMA_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                 "lm_head"})
# vllm/lora/peft_helper.py#L90-L101: the init_lora_weights strings that leave a plain LoRA once saved
PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "ftcluster_meta.json")
MERGE = "serve its merged model instead (ftcluster merge ADAPTER -o URI)"
VLLM = "https://github.com/vllm-project/vllm/blob/v0.34.0/"
LORAX = "https://github.com/predibase/lorax/blob/a7394ba386ece427d5a6125b419aa38b46d966dc/"


class AdapterCheckError(FtclusterError):
    """The folder cannot be checked: a missing or unreadable file, an unknown engine or rank."""


@dataclass(frozen=True)
class Finding:
    """One reason the adapter will not load (error) or needs a server setting (warning)."""

    severity: Literal["error", "warning"]
    reason: str  # one line: what upstream does with this adapter
    action: str  # one line: what to do
    source: str  # the upstream lines the rule comes from
    flags: tuple[str, ...] = ()  # server flags that make a warning go away, e.g. ("--max-lora-rank", "64")

    def __str__(self) -> str:
        return f"{self.severity}: {self.reason}; {self.action}"


@dataclass(frozen=True)
class Verdict:
    """Every finding for one engine; ``loads`` when none is an error."""

    engine: str
    findings: tuple[Finding, ...] = field(default_factory=tuple)

    @property
    def loads(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    @property
    def flags(self) -> tuple[str, ...]:
        """The server flags the warnings ask for, in order (empty when the defaults do)."""
        return tuple(x for f in self.findings if f.severity == "warning" for x in f.flags)

    def lines(self) -> list[str]:
        """A headline, then one line per finding (errors first) with its upstream source."""
        errors = sum(f.severity == "error" for f in self.findings)
        head = (f"{self.engine}: will not load as trained ({errors} error{'s' * (errors != 1)})" if errors else
                f"{self.engine}: loads with {' '.join(self.flags)}" if self.flags else f"{self.engine}: loads")
        ordered = sorted(self.findings, key=lambda f: f.severity != "error")
        return [head, *(f"  {f}  [{f.source}]" for f in ordered)]


# --- reading -------------------------------------------------------------------------------------

def read_safetensors_header(fs: Any, path: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header: only its first 8 + N bytes are read."""
    try:
        with fs.open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= 100_000_000:  # the format caps the header at 100 MB
                raise AdapterCheckError(f"{path}: not a safetensors file (header length {size})")
            header = json.loads(f.read(size))
    except (OSError, ValueError) as exc:
        raise AdapterCheckError(f"{path}: cannot read the safetensors header: {one_line(exc)}") from exc
    if not isinstance(header, dict):
        raise AdapterCheckError(f"{path}: not a safetensors file (its header is not a JSON object)")
    return {name: tuple(info.get("shape", ())) for name, info in header.items() if name != "__metadata__"}


def check_adapter_uri(uri: str, engine: str, *, storage_options: dict[str, Any] | None = None,
                      max_lora_rank: int | None = None) -> Verdict:
    """Read an adapter folder's small files through fsspec (any URI ftcluster writes to) and check it."""
    fs, root = fs_and_path(uri, storage_options)
    config_path, weights_path, meta_path = (f"{root}/{name}" for name in ADAPTER_FILES)

    def load_json(path: str, required: bool) -> dict[str, Any] | None:
        try:
            with fs.open(path, "rb") as f:
                value = json.loads(f.read())
        except FileNotFoundError as exc:
            if not required:
                return None
            raise AdapterCheckError(f"{uri}: no {path.rsplit('/', 1)[-1]}; is this an adapter folder?") from exc
        except (OSError, ValueError) as exc:
            raise AdapterCheckError(f"{path}: cannot read it: {one_line(exc)}") from exc
        if not isinstance(value, dict):
            raise AdapterCheckError(f"{path}: not a JSON object")
        return value

    config = load_json(config_path, required=True) or {}
    if not fs.exists(weights_path):
        raise AdapterCheckError(f"{uri}: no adapter_model.safetensors (only safetensors adapters are checked)")
    return check_adapter(config, read_safetensors_header(fs, weights_path), engine,
                         meta=load_json(meta_path, required=False), max_lora_rank=max_lora_rank)


# --- the rules -----------------------------------------------------------------------------------

def check_adapter(config: Mapping[str, Any], tensors: Mapping[str, tuple[int, ...]], engine: str, *,
                  meta: Mapping[str, Any] | None = None, max_lora_rank: int | None = None) -> Verdict:
    """The findings for ``engine`` ("vllm" or "lorax") from the adapter's config, its tensors' names and
    shapes, and its ftcluster metadata. ``max_lora_rank``: the vLLM server's --max-lora-rank when it is
    known (a rank above it is then an error), else the default 16 is assumed and a higher rank is a
    warning that names the flag."""
    if engine not in ENGINES:
        raise AdapterCheckError(f"unknown serving engine {engine!r}; one of {', '.join(ENGINES)}")
    if max_lora_rank is not None and max_lora_rank not in VLLM_MAX_LORA_RANKS:
        raise AdapterCheckError(f"--max-lora-rank {max_lora_rank}: vLLM takes one of "
                                f"{', '.join(map(str, VLLM_MAX_LORA_RANKS))}")
    kinds = _by_kind(tensors)
    added = _added_tokens(config, meta, kinds)
    rules = _vllm if engine == "vllm" else _lorax
    return Verdict(engine, tuple(rules(config, kinds, added, max_lora_rank)))


def _by_kind(tensors: Mapping[str, tuple[int, ...]]) -> dict[str, dict[str, tuple[int, ...]]]:
    """Group tensor names by what peft saved them for: lora, embedding lora, token rows, DoRA, other."""
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, shape in tensors.items():
        if name.endswith((".lora_A.weight", ".lora_B.weight")):
            kind = "lora"
        elif name.endswith((".lora_embedding_A", ".lora_embedding_B")):
            kind = "lora_embedding"
        elif name.endswith(".trainable_tokens_delta"):  # peft trainable_token_indices
            kind = "token_rows"
        elif name.endswith(".lora_magnitude_vector"):  # peft use_dora
            kind = "dora"
        elif name.endswith((".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")):
            kind = "base_embedding"  # save_embedding_layers=True (ftcluster saves with False)
        else:
            kind = "other"  # modules_to_save (lm_head.weight), biases, anything else
        out.setdefault(kind, {})[name] = shape
    return out


def _module(name: str) -> str:
    """``base_model.model.model.layers.0.mlp.up_proj.lora_A.weight`` -> ``up_proj``."""
    parts = name.split(".")
    return parts[-3] if parts[-1] == "weight" else parts[-2]


def _added_tokens(config: Mapping[str, Any], meta: Mapping[str, Any] | None,
                  kinds: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The tokens training added (ftcluster_meta.json), or the token ids peft trained rows for."""
    added = list(((meta or {}).get("tokenizer") or {}).get("added") or [])
    indices = config.get("trainable_token_indices") or []
    ids = sorted({int(i) for v in (indices.values() if isinstance(indices, dict) else [indices]) for i in v})
    if not added and (ids or "token_rows" in kinds):
        added = [f"id {i}" for i in ids] or ["(token rows)"]
    return added


def _unexpected_modules(kinds: dict[str, dict[str, tuple[int, ...]]], allowed: set[str] | frozenset[str]) -> list[str]:
    """The modules the adapter's LoRA tensors (and LoRA embeddings) adapt that ``allowed`` lacks, sorted."""
    lora_names = {**kinds.get("lora", {}), **kinds.get("lora_embedding", {})}
    return sorted({_module(n) for n in lora_names} - set(allowed))


def _short(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _vllm(config: Mapping[str, Any], kinds: dict[str, dict[str, tuple[int, ...]]], added: list[str],
          max_lora_rank: int | None) -> list[Finding]:
    out: list[Finding] = []

    def err(reason: str, action: str, where: str) -> None:
        out.append(Finding("error", reason, action, VLLM + where))

    # vllm/lora/peft_helper.py#L162-L180 (from_dict): r, lora_alpha and target_modules are required
    missing = sorted({"r", "lora_alpha", "target_modules"} - set(config))
    if missing:
        err(f"adapter_config.json lacks {', '.join(missing)}, which vLLM requires",
            "save the adapter with peft's save_pretrained", "vllm/lora/peft_helper.py#L162-L180")
        return out
    # vllm/lora/peft_helper.py#L54-L88 (_validate_features, raised by validate_legal L195-L209 before any weight)
    unsaved = [m for m in config.get("modules_to_save") or [] if m not in ("classifier", "score")]
    if unsaved:
        err(f"vLLM only supports modules_to_save being None or classifier/score; this adapter trains "
            f"{', '.join(unsaved)} in full", f"retrain without lora.modules_to_save, or {MERGE}",
            "vllm/lora/peft_helper.py#L54-L66")
    if config.get("use_dora") or "dora" in kinds:
        err("vLLM does not yet support DoRA (use_dora)", f"retrain without DoRA, or {MERGE}",
            "vllm/lora/peft_helper.py#L67-L68")
    if config.get("lora_bias"):
        err("vLLM does not support LoRA bias (lora_bias)", f"retrain without lora_bias, or {MERGE}",
            "vllm/lora/peft_helper.py#L69-L70")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in PLAIN_INITS:
        err(f"vLLM does not support init_lora_weights={init!r} (it changes the base weights)",
            "convert it with peft's path_initial_model_for_weight_conversion, or " + MERGE,
            "vllm/lora/peft_helper.py#L71-L101")
    for key, what in (("alora_invocation_tokens", "Activated LoRA (aLoRA)"), ("layer_replication",
                      "layer_replication"), ("use_bdlora", "block-diagonal LoRA"), ("use_qalora", "QALoRA")):
        if config.get(key):
            err(f"vLLM does not support {what} ({key})", MERGE, "vllm/lora/peft_helper.py#L80-L87")
    # vllm/lora/peft_helper.py#L206-L207: any bias other than "none" is refused
    if config.get("bias", "none") != "none":
        err(f"vLLM does not support adapter bias (bias={config.get('bias')!r})",
            f"retrain with bias: none, or {MERGE}", "vllm/lora/peft_helper.py#L206-L207")
    # vllm/lora/peft_helper.py#L200-L205: the largest of r and rank_pattern against --max-lora-rank, which
    # takes only the values of vllm/config/lora.py#L26 (default 16, L33)
    try:
        rank = max([int(config["r"]), *(int(v) for v in (config.get("rank_pattern") or {}).values())])
    except (TypeError, ValueError) as exc:
        raise AdapterCheckError(f"adapter_config.json: r/rank_pattern is not an integer: {one_line(exc)}") from exc
    need = next((v for v in VLLM_MAX_LORA_RANKS if v >= rank), None)
    if rank <= 0:
        err(f"LoRA rank r={rank} is not positive", "retrain with lora.r >= 1", "vllm/lora/peft_helper.py#L104-L105")
    elif need is None:
        err(f"LoRA rank {rank} is greater than vLLM's largest --max-lora-rank {VLLM_MAX_LORA_RANKS[-1]}",
            f"retrain with lora.r <= {VLLM_MAX_LORA_RANKS[-1]}, or {MERGE}", "vllm/config/lora.py#L26")
    elif max_lora_rank is not None and rank > max_lora_rank:
        err(f"LoRA rank {rank} is greater than max_lora_rank {max_lora_rank}",
            f"start vLLM with --max-lora-rank {need}", "vllm/lora/peft_helper.py#L200-L205")
    elif max_lora_rank is None and rank > VLLM_DEFAULT_MAX_LORA_RANK:
        out.append(Finding("warning", f"LoRA rank {rank} is greater than vLLM's default max_lora_rank "
                           f"{VLLM_DEFAULT_MAX_LORA_RANK}", f"start vLLM with --max-lora-rank {need}",
                           VLLM + "vllm/lora/peft_helper.py#L200-L205", ("--max-lora-rank", str(need))))
    # vllm/lora/utils.py#L183-L236 (parse_fine_tuned_lora_name): a tensor other than lora_A/lora_B.weight,
    # lora_embedding_A/B or a classifier/score head raises "... is unsupported LoRA weight";
    # vllm/lora/request.py has no tokenizer: every adapter is served with the base model's vocabulary
    if added:
        err(f"vLLM serves every adapter with the base model's tokenizer and embeddings and cannot read "
            f"trainable_tokens_delta (issue #36501); this adapter was trained with {len(added)} added "
            f"token(s): {_short(added)}", f"{MERGE}, or retrain without tokenizer.add_tokens",
            "vllm/lora/utils.py#L183-L236")
    saved = {*(config.get("modules_to_save") or []), "classifier", "score"}  # reported above, or a head
    odd = sorted(n for n in kinds.get("other", {}) if n.split(".")[-2] not in saved)
    if odd:
        err(f"vLLM cannot read {len(odd)} tensor(s) of this adapter: {_short(odd)}",
            f"retrain as a plain LoRA, or {MERGE}", "vllm/lora/utils.py#L222-L236")
    # vllm/lora/lora_model.py#L250-L286 (check_unexpected_modules): a LoRA on a module the model does not
    # wrap is refused; the expected set is that of worker_manager.py#L106-L118 for Llama-like models
    unexpected = _unexpected_modules(kinds, VLLM_LLAMA_MODULES)
    if unexpected:
        err(f"vLLM expects target modules in {', '.join(sorted(VLLM_LLAMA_MODULES))} but received "
            f"{', '.join(unexpected)}", "retrain with lora.target_modules among those",
            "vllm/lora/lora_model.py#L250-L286")
    return out


def _lorax(config: Mapping[str, Any], kinds: dict[str, dict[str, tuple[int, ...]]], added: list[str],
           max_lora_rank: int | None) -> list[Finding]:
    # LoRAX loads any config peft's LoraConfig reads but keeps only r, target_modules, fan_in_fan_out,
    # lora_alpha and use_rslora (server/lorax_server/adapters/lora.py#L75-L84); it maps only
    # base_model.model.<layer>.lora_A/lora_B.weight of its adapter layers (lora.py#L37-L56) and logs the
    # rest as "unused adapter weights" and serves without them (models/model.py#L381-L398). So most
    # mismatches load and silently serve another model: those are errors here.
    del max_lora_rank  # no cap: ranks above 128 take the slower SGMV path (utils/punica.py#L37-L39)
    out: list[Finding] = []
    unused = "LoRAX drops them as unused adapter weights and serves a different model than trained"

    def err(reason: str, action: str, where: str) -> None:
        out.append(Finding("error", reason, action, LORAX + where))

    if config.get("modules_to_save"):
        err(f"modules_to_save {', '.join(config['modules_to_save'])} trained in full: {unused} (issue #231)",
            f"retrain without lora.modules_to_save, or {MERGE}", "server/lorax_server/models/model.py#L381-L398")
    if config.get("use_dora") or "dora" in kinds:
        err(f"DoRA magnitude vectors (use_dora): {unused}", f"retrain without DoRA, or {MERGE}",
            "server/lorax_server/adapters/lora.py#L75-L84")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        err("rank_pattern/alpha_pattern: LoRAX scales every layer with the one r and lora_alpha",
            "retrain with one rank for every module", "server/lorax_server/adapters/lora.py#L184-L188")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in PLAIN_INITS:
        err(f"init_lora_weights={init!r} changes the base weights, which LoRAX neither reads nor applies",
            "convert it with peft's path_initial_model_for_weight_conversion, or " + MERGE,
            "server/lorax_server/adapters/lora.py#L75-L84")
    # server/lorax_server/utils/adapter.py#L169-L175: LoRAX loads the adapter's own tokenizer, so the added
    # ids reach a base embedding that has no trained row for them (trainable_tokens_delta is unused)
    if added:
        err(f"this adapter was trained with {len(added)} added token(s) ({_short(added)}); LoRAX tokenizes "
            f"with the adapter's tokenizer but embeds with the base model, which has no trained rows for them "
            f"(issue #231)", f"{MERGE}, or retrain without tokenizer.add_tokens",
            "server/lorax_server/utils/adapter.py#L169-L175")
    saved = set(config.get("modules_to_save") or [])  # reported above
    odd = sorted([*(n for n in kinds.get("other", {}) if n.split(".")[-2] not in saved),
                  *kinds.get("base_embedding", {})])
    if odd:
        err(f"{len(odd)} tensor(s) that are not LoRA A/B ({_short(odd)}): {unused}",
            f"retrain as a plain LoRA, or {MERGE}", "server/lorax_server/models/model.py#L381-L398")
    unexpected = _unexpected_modules(kinds, LORAX_LLAMA_MODULES)
    if unexpected:
        err(f"LoRA on {', '.join(unexpected)}, which are not LoRAX adapter layers "
            f"({', '.join(sorted(LORAX_LLAMA_MODULES))}): {unused}",
            "retrain with lora.target_modules among those", "server/lorax_server/models/flash_llama.py#L26")
    return out
