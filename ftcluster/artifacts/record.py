"""The metadata record of a trained artifact (``ftcluster_meta.json``): what it is, what it was trained
on, and how well; the one place its fields are written and read (docs/adapters.md, "The record").

Every adapter (``adapter/``, ``adapters/step-N/``), merged model (``merged/``) and full fine-tuned
model (``final/``) carries one, written at commit time beside its weights. Format
``ftcluster.artifact/1``::

    format, kind              "ftcluster.artifact/1"; adapter | step_adapter | merged | final
    name, run                 the job's name; {uid: a random id kept across resumes, output_uri: a
                              remote output URI, else None: a local path is another machine's}
    base                      the base model's identity (:func:`base_identity`): source, config_sha256,
                              weights {kind, sha256}, fingerprint, produced_by (the ftcluster run that
                              made a base ftcluster trained, from that base's own record)
    tokenizer                 {vocab, base_vocab, added, sha256}
    lora                      {r, alpha, target_modules, modules_to_save, use_rslora, new_token_rows}
                              (None for a full fine-tune); trainable_params; size_bytes (None until known)
    data                      {kind: corpus | files, sha256, ...} (:func:`data_identity`)
    step, tokens_seen, train_loss, eval_loss, general_eval_before, general_eval_after
    merged_from               merged/: the adapter's lineage ({fingerprint, step} of the adapter merged)
    training                  the spec the run trained with (the loader refuses inline secrets; any value
                              that looks like one is masked here all the same)
    ftcluster_version

The base's **fingerprint** is sha256 of its config fingerprint (architecture, before any added token
grows it) and its weights' fingerprint, so a continually pre-trained base (new weights, maybe a grown
vocabulary) is a different base from the one it started from. Records written before this format
(no ``format`` key) are read as version 0: their base is known by config only and lineage checks
say they could not check.

Torch-free: the CLI reads records on a login node.
"""

from __future__ import annotations

import hashlib
import json
import secrets as _random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import FtclusterError

RECORD_FORMAT = "ftcluster.artifact/1"
KINDS = ("adapter", "step_adapter", "merged", "final")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
SHORT = 12  # hex digits of a fingerprint shown in tables and messages


class LineageError(FtclusterError):
    """An adapter is being loaded, merged or sampled on a base other than the one it was trained on."""


def short(fingerprint: str | None) -> str:
    """The first :data:`SHORT` hex digits (``-`` when unknown)."""
    return fingerprint[:SHORT] if fingerprint else "-"


def new_run_uid() -> str:
    """A run's id in its records: random, made at the first start, kept in checkpoints across resumes."""
    return _random.token_hex(8)


def fingerprint_of(config_sha256: str, weights_sha256: str) -> str:
    """A base's fingerprint: its architecture and its weights, together."""
    return hashlib.sha256(f"{config_sha256}:{weights_sha256}".encode()).hexdigest()


# --------------------------------------------------------------------------- identities


def weights_identity(folder: Path, cache: Path | None = None) -> dict[str, Any]:
    """The fingerprint of a model folder's weights.

    * a folder ftcluster committed (its ``manifest.json`` lists every file's sha256): the sha256 of
      the weight files' entries there (kind ``manifest``), and ``produced_by`` from its record;
    * any other folder (a Hugging Face checkout, a local save): the sha256 of each weight file,
      hashed once per (path, size, mtime) and remembered under ``cache`` (kind ``files``).
    """
    folder = Path(folder)
    man = _json_file(folder / "manifest.json")
    files = man.get("files") if isinstance(man, dict) else None
    if isinstance(files, dict) and any(n.endswith(WEIGHT_SUFFIXES) for n in files):
        sums = {n: files[n].get("sha256") for n in sorted(files) if n.endswith(WEIGHT_SUFFIXES)}
        out: dict[str, Any] = {"kind": "manifest", "sha256": _digest(sums)}
    else:
        sums = {p.name: _file_sha256(p, cache) for p in sorted(folder.iterdir())
                if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)}
        if not sums:
            raise FtclusterError(f"{folder}: no weight files (*.safetensors, *.bin) to fingerprint; is it a model?")
        out = {"kind": "files", "sha256": _digest(sums)}
    record = _json_file(folder / "ftcluster_meta.json")
    if isinstance(record, dict):
        out["produced_by"] = produced_by(record, out["sha256"])
    return out


def produced_by(record: dict[str, Any], weights_sha256: str) -> dict[str, Any]:
    """Who made a base that ftcluster trained (a continual pre-training's ``final/``, a ``merged/``)."""
    run = record.get("run") or {}
    return {"run_uid": run.get("uid"), "name": record.get("name") or (record.get("training") or {}).get("name"),
            "kind": record.get("kind"), "step": record.get("step"), "output_uri": run.get("output_uri"),
            "weights_sha256": weights_sha256}


def base_identity(source: str, config_sha256: str, weights: dict[str, Any]) -> dict[str, Any]:
    """The ``base`` section of a record: ``weights`` from :func:`weights_identity` (or the hub/random-init
    forms the trainer builds)."""
    out = {"source": source, "config_sha256": config_sha256,
           "weights": {"kind": weights["kind"], "sha256": weights["sha256"]},
           "fingerprint": fingerprint_of(config_sha256, weights["sha256"])}
    if weights.get("produced_by"):
        out["produced_by"] = weights["produced_by"]
    return out


def data_identity(spec: Any, cache: Path | None = None) -> dict[str, Any]:
    """The fingerprint of what the run trained on: a prepared corpus's manifest (sha256 of its bytes,
    its tokens), or the sha256 of each data file (train, eval) read through fsspec."""
    from ..corpus.format import streamed
    from ..storage.uri import fs_and_path

    data = spec.data
    opts = getattr(data, "storage_options", None) or {}
    if streamed(data):
        fs, root = fs_and_path(data.train, opts)
        raw = fs.cat_file(f"{root.rstrip('/')}/manifest.json")
        man = json.loads(raw)
        return {"kind": "corpus", "sha256": hashlib.sha256(raw).hexdigest(), "tokens": man.get("tokens"),
                "source": _public(data.train)}
    files: dict[str, str] = {}
    for role in ("train", "eval"):
        uri = getattr(data, role, None)
        if uri:
            fs, path = fs_and_path(uri, opts)
            h = hashlib.sha256()
            found = fs.find(path) if fs.isdir(path) else sorted(fs.glob(path)) if any(c in path for c in "*?[") else [path]
            for one in sorted(found):  # a folder or glob: every file, in name order
                h.update(f"{one[len(path):]}\0".encode())
                with fs.open(one, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
            files[role] = h.hexdigest()
    return {"kind": "files", "sha256": _digest(files), "files": files}


# --------------------------------------------------------------------------- the record


def build_record(*, kind: str, spec: Any, run: dict[str, Any], base: dict[str, Any], tokenizer: dict[str, Any],
                 state: dict[str, Any], data: dict[str, Any] | None, trainable_params: int | None,
                 lora: dict[str, Any] | None, size_bytes: int | None, version: str,
                 merged_from: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record's dict (see the module docstring); ``state``: step, tokens_seen, train_loss, eval_loss,
    general_eval_before, general_eval_after."""
    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}; one of {', '.join(KINDS)}")
    rec = {"format": RECORD_FORMAT, "kind": kind, "name": spec.name, "run": run, "base": base,
           "tokenizer": tokenizer, "lora": lora, "trainable_params": trainable_params, "size_bytes": size_bytes,
           "data": data, "training": masked(spec.model_dump(mode="json")), "ftcluster_version": version,
           **{k: state.get(k) for k in ("step", "tokens_seen", "train_loss", "eval_loss", "general_eval_before",
                                        "general_eval_after")}}
    if merged_from is not None:
        rec["merged_from"] = merged_from
    return rec


def merged_record(adapter: dict[str, Any], base: dict[str, Any], *, adapter_uri: str, size_bytes: int,
                  version: str) -> dict[str, Any]:
    """The record of a model merged by ``ftcluster merge``: the adapter's (its training, data, metrics),
    kind ``merged``, on ``base`` (the base merged into: the adapter's own unless ``--force``), with the
    adapter's lineage under ``merged_from``."""
    run = adapter.get("run") or {}
    rec = {**adapter, "format": RECORD_FORMAT, "kind": "merged", "base": base, "size_bytes": size_bytes,
           "ftcluster_version": version,
           "merged_from": {"adapter_uri": _public(adapter_uri), "adapter_run_uid": run.get("uid"),
                           "adapter_kind": adapter.get("kind"), "step": adapter.get("step"),
                           "adapter_base_fingerprint": base_fingerprint(adapter)}}
    return rec


def lora_section(adapter_config: dict[str, Any]) -> dict[str, Any]:
    """The record's ``lora`` section from a saved ``adapter_config.json``."""
    rows = adapter_config.get("trainable_token_indices") or {}
    ids = sorted({int(i) for v in (rows.values() if isinstance(rows, dict) else [rows]) for i in v})
    target = adapter_config.get("target_modules")
    return {"r": adapter_config.get("r"), "alpha": adapter_config.get("lora_alpha"),
            "target_modules": sorted(target) if isinstance(target, list | set | tuple) else target,
            "modules_to_save": sorted(adapter_config.get("modules_to_save") or []),
            "use_rslora": bool(adapter_config.get("use_rslora")), "use_dora": bool(adapter_config.get("use_dora")),
            "new_token_rows": len(ids)}


def masked(data: Any) -> Any:
    """``data`` with every value that looks like a secret replaced by ``<masked>``."""
    from ..spec.secrets import find_secrets

    out = json.loads(json.dumps(data, default=str))
    for path, _kind in list(find_secrets(out)):
        node = out
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = "<masked>"
    return out


def path_label(path: str) -> str:
    """A base folder's path or URI as a record keeps it: a remote URI as it is; a local path (this
    machine's, meaningless on another) as ``local:<folder name>``."""
    if "://" in path and not path.startswith("file://"):
        return path
    return "local:" + (path.removeprefix("file://").rstrip("/").rsplit("/", 1)[-1] or path)


def public_uri(uri: str | None) -> str | None:
    """``uri`` when another machine can reach it (a URI with a remote scheme, a hub id), else None."""
    return _public(uri)


def _public(uri: str | None) -> str | None:
    if not uri:
        return None
    if "://" in uri:
        return None if uri.startswith("file://") else uri
    return None


# --------------------------------------------------------------------------- reading


def version_of(record: dict[str, Any]) -> int:
    """1 for this format, 0 for a record written before it (no ``format``)."""
    fmt = record.get("format")
    if fmt == RECORD_FORMAT:
        return 1
    if fmt is None:
        return 0
    raise FtclusterError(f"artifact record format {fmt!r} is newer than this ftcluster understands; upgrade ftcluster")


def base_fingerprint(record: dict[str, Any]) -> str | None:
    """The base's fingerprint, or None for a version-0 record (which knows the base's config only)."""
    base = record.get("base")
    return base.get("fingerprint") if isinstance(base, dict) else None


def base_source(record: dict[str, Any]) -> str:
    """The base as a person reads it: its source (and the run that produced it, when ftcluster did)."""
    base = record.get("base")
    if isinstance(base, dict):
        src = str(base.get("source") or "?")
        by = base.get("produced_by") or {}
        return f"{src} (from run {by.get('name')}@{by.get('step')})" if by.get("name") else src
    return str(record.get("base_model") or "?")


def forgetting(record: dict[str, Any]) -> float | None:
    """general-eval loss after minus before (positive: the model got worse on general text)."""
    b, a = record.get("general_eval_before"), record.get("general_eval_after")
    return None if b is None or a is None else float(a) - float(b)


def _digest(items: dict[str, Any] | Iterable[Any]) -> str:
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()


def _json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _file_sha256(path: Path, cache: Path | None) -> str:
    """sha256 of a (large) file, remembered under ``cache`` by path, size and mtime."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
    memo = cache / "sha256" / key if cache is not None else None
    if memo is not None and memo.is_file():
        return memo.read_text().strip()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(digest)
    return digest
