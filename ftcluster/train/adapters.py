"""Many adapters on one base: load the base once, add adapters by name, switch, unload
(peft's multi-adapter API), each checked against the base it was trained on.

::

    from ftcluster.train.adapters import AdapterSet

    s = AdapterSet.load({"qa": "s3://b/runs/qa/adapter", "chat": "s3://b/runs/chat/adapter"})
    s.use("qa").complete("What is the capital of Garovia?")
    s.use("chat").complete("...")
    s.add("legal", "s3://b/runs/legal/adapter"); s.unload("qa")

The base comes from the first adapter's record (the spec it trained with: its ``model`` section,
``random_init`` rebuilt from its seed), or from ``base=URI`` (a model folder: a Hugging Face save,
or an ftcluster ``final/``/``merged/``). Every adapter's record must name that base (its
fingerprint; :func:`ftcluster.train.lineage.check`, ``force=True`` to skip) and the same tokenizer
(adapters with different vocabularies cannot share one embedding matrix).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..artifacts.record import LineageError, short
from ..errors import TrainError
from ..storage.layout import META

log = logging.getLogger("ftcluster.train")


def cache_root() -> Path:
    return Path(os.environ.get("FTCLUSTER_CACHE") or Path.home() / ".cache" / "ftcluster")


@dataclass(frozen=True)
class Adapter:
    """One adapter of a set: its name, where it came from, its record and its local copy."""

    name: str
    uri: str
    record: dict[str, Any]
    folder: Path


def fetch_adapter(uri: str, storage_options: dict[str, Any] | None = None, name: str | None = None) -> Adapter:
    """The adapter at ``uri`` (an adapter folder, or a run's output URI: its ``adapter/``, else its
    newest ``adapters/step-N``), downloaded once into the cache and verified against its manifest."""
    from ..storage.catalog import Catalog
    from ..storage.fetch import fetch_dir

    cat = Catalog(uri, storage_options)
    folder_uri = uri.rstrip("/")
    here = cat.paths.root
    if not (cat.fs.exists(f"{here}/manifest.json") or cat.fs.exists(f"{here}/adapter_config.json")):  # a run's output
        steps = cat.step_adapters()
        if cat.is_committed("adapter"):
            folder_uri = f"{cat.uri}/adapter"
        elif steps:
            folder_uri = steps[-1].uri
        else:
            raise TrainError(f"{uri}: no committed adapter there (looked for adapter/ and adapters/step-N/ with a "
                             "manifest); give an adapter folder or a LoRA run's output URI")
    folder = fetch_dir(folder_uri, storage_options, cache_root() / "adapters")
    if not (folder / "adapter_config.json").is_file():
        raise TrainError(f"{folder_uri}: not a LoRA adapter (no adapter_config.json); a merged or final model loads "
                         "on its own (ftcluster sample)")
    try:
        record = json.loads((folder / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise TrainError(f"{folder_uri}/{META}: missing or unreadable; is this an ftcluster adapter?") from None
    return Adapter(name or default_name(folder_uri), folder_uri, record, folder)


def default_name(uri: str) -> str:
    """A name for an adapter from its URI: the folder above ``adapter`` (the variant or run), else the last."""
    parts = [p for p in uri.rstrip("/").split("/") if p]
    if len(parts) >= 3 and parts[-2] == "adapters":  # <run>/adapters/step-N
        return f"{parts[-3]}@{parts[-1]}"
    if len(parts) >= 2 and parts[-1] == "adapter":
        return parts[-2]
    return parts[-1] if parts else "adapter"


class AdapterSet:
    """A base model with named LoRA adapters; one is active at a time (see the module docstring)."""

    def __init__(self, model: Any, tokenizer: Any, spec: Any, base: dict[str, Any], adapters: list[Adapter],
                 force: bool = False):
        self.model, self.tokenizer, self.spec, self.base = model, tokenizer, spec, base
        self.adapters: dict[str, Adapter] = {a.name: a for a in adapters}
        self.force = force
        self.given_base: str | None = None  # the base as the caller named it (base=), for messages

    # -- building ------------------------------------------------------------------
    @classmethod
    def load(cls, adapters: Mapping[str, str] | Sequence[str | tuple[str | None, str]], *, base: str | None = None,
             storage_options: dict[str, Any] | None = None, device: str | None = None,
             force: bool = False) -> AdapterSet:
        """Load the base once and every adapter of ``adapters``: {name: URI}, or URIs (named by their folder,
        :func:`default_name`), or (name or None, URI) pairs."""
        import torch

        from ..spec.loader import spec_from_dict
        from .lineage import base_of_folder, base_of_spec, check
        from .model import compute_dtype, load_adapter, load_base_model

        pairs = (list(adapters.items()) if isinstance(adapters, Mapping)
                 else [a if isinstance(a, tuple) else (None, a) for a in adapters])
        if not pairs:
            raise TrainError("no adapter to load: give at least one adapter URI")
        items: list[Adapter] = []
        for name, uri in pairs:
            item = fetch_adapter(uri, storage_options, name)
            if any(i.name == item.name for i in items):
                other = next(i.uri for i in items if i.name == item.name)
                raise TrainError(f"two adapters named {item.name!r} ({other}, {item.uri}); name them: NAME=URI")
            items.append(item)
        first = items[0]
        spec = spec_from_dict(first.record["training"])
        tokenizer = adapter_tokenizer(first.folder, first.record)
        cache = cache_root()
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = compute_dtype(spec.training.precision, dev)
        if base is not None:
            from ..storage.fetch import fetch_dir

            folder = fetch_dir(base, storage_options, cache / "models")
            spec = spec.model_copy(update={"model": spec.model.model_copy(update={
                "path": str(folder), "hub_id": None, "random_init": None, "revision": None})})
            identity = base_of_folder(folder, base, cache)
        else:
            identity = base_of_spec(spec, tokenizer, cache)
        for item in items:  # before the base is loaded: a refusal costs no model load
            check(item.record, identity, force=force, what=item.uri, given=base)
            _same_tokenizer(first, item)
        model = load_base_model(spec, tokenizer, dtype, dev, cache)
        peft_model = load_adapter(model, first.folder, tokenizer, adapter_name=first.name)
        for item in items[1:]:
            peft_model.load_adapter(str(item.folder), adapter_name=item.name)
        peft_model.eval()
        out = cls(peft_model, tokenizer, spec, identity, items, force)
        out.given_base = base
        out.use(first.name)
        log.info("base %s (%s) with %d adapter(s): %s", short(identity["fingerprint"]), identity["source"],
                 len(items), ", ".join(out.names))
        return out

    # -- switching -----------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    @property
    def active(self) -> str:
        return str(self.model.active_adapter)

    def use(self, name: str) -> AdapterSet:
        """Make ``name`` the active adapter (returns the set, for ``s.use("qa").complete(...)``)."""
        if name not in self.adapters:
            raise TrainError(f"no adapter {name!r} loaded; loaded: {', '.join(self.adapters) or 'none'}")
        self.model.set_adapter(name)
        return self

    def add(self, name: str, uri: str, storage_options: dict[str, Any] | None = None) -> AdapterSet:
        """Load one more adapter on the same base (checked like the first ones)."""
        from .lineage import check

        if name in self.adapters:
            raise TrainError(f"an adapter named {name!r} is loaded already; unload it first or pick another name")
        item = fetch_adapter(uri, storage_options, name)
        check(item.record, self.base, force=self.force, what=item.uri, given=self.given_base)
        _same_tokenizer(next(iter(self.adapters.values())), item)
        self.model.load_adapter(str(item.folder), adapter_name=name)
        self.adapters[name] = item
        return self

    def unload(self, name: str) -> AdapterSet:
        """Remove an adapter (its weights are freed); another one becomes active if it was."""
        if name not in self.adapters:
            raise TrainError(f"no adapter {name!r} loaded; loaded: {', '.join(self.adapters) or 'none'}")
        if len(self.adapters) == 1:
            raise TrainError(f"{name!r} is the last adapter: keep it, or drop the set to free the base")
        self.model.delete_adapter(name)
        del self.adapters[name]
        if self.active not in self.adapters:
            self.use(next(iter(self.adapters)))
        return self

    # -- using ---------------------------------------------------------------------
    def logits(self, input_ids: Any) -> Any:
        """The active adapter's logits for ``input_ids`` (a [batch, seq] tensor)."""
        import torch

        with torch.no_grad():
            ids = input_ids.to(next(self.model.parameters()).device)
            return self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits

    def complete(self, prompt: str, *, inp: str = "", max_new_tokens: int = 64, temperature: float = 0.0) -> str:
        """The active adapter's completion of ``prompt``, formatted as its run's data format trained it."""
        from .generation import format_prompt, generate

        ids = format_prompt(self.tokenizer, self.spec.data.format, prompt, inp)
        return generate(self.model, self.tokenizer, ids, max_new_tokens, temperature, self.spec.training.seed)


def adapter_tokenizer(folder: Path, record: dict[str, Any]) -> Any:
    """The tokenizer an adapter was trained with (saved in its folder), set up as training had it: the pad
    token, the vocabulary size before the spec's added tokens (the base's rows are rebuilt from it), the
    chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    base_vocab = (record.get("tokenizer") or {}).get("base_vocab")
    if base_vocab is not None:  # the size before tokenizer.add_tokens: the base's rows are rebuilt as trained
        tok.ftcluster_base_vocab = int(base_vocab)
    spec_format = ((record.get("training") or {}).get("data") or {}).get("format")
    if spec_format == "chat" and not getattr(tok, "chat_template", None):
        from .tokenizer import CHAT_TEMPLATE

        tok.chat_template = CHAT_TEMPLATE
    return tok


def _same_tokenizer(first: Adapter, item: Adapter) -> None:
    a = (first.record.get("tokenizer") or {}).get("sha256")
    b = (item.record.get("tokenizer") or {}).get("sha256")
    if a and b and a != b:
        raise LineageError(f"{item.uri}: trained with tokenizer {short(b)}, {first.uri} with {short(a)}: adapters "
                           "with different vocabularies cannot share one base; load them in separate sets, or "
                           "merge each (ftcluster merge)")
