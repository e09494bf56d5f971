"""Every trained artifact under a prefix, from the small records only (``ftcluster adapters list``).

One listing of the prefix (fsspec ``find``: on S3 a flat paginated listing, not one request per
folder) finds each committed folder, i.e. one with a ``manifest.json``; its manifest carries the
artifact's record (``meta``, the same dict as its ``ftcluster_meta.json``) and its size, and the
manifests are read in one concurrent ``cat``. Weights are never read. A prefix may be one run's
output, a pipeline's or an array's common root, or a bucket folder of many runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..errors import FtclusterError
from ..storage.layout import ADAPTERS, ARTIFACTS, MANIFEST, META, parse_step_dir
from .record import base_fingerprint, base_source, forgetting, short

MODELS = ("adapter", "merged", "final")  # what `list` shows by default; step adapters with steps=True


@dataclass(frozen=True)
class Entry:
    """One committed artifact."""

    name: str  # relative to the listed prefix ("qa/adapter"; "." for the prefix itself)
    uri: str
    kind: str  # adapter | step_adapter | merged | final
    record: dict[str, Any]
    size_bytes: int | None  # the record's (its files), else the manifest's total (a step adapter's record has none)
    created_unix: float | None

    def row(self) -> dict[str, Any]:
        """The entry as ``--json`` prints it: the listing's columns, then the whole record."""
        rec = self.record
        return {"name": self.name, "uri": self.uri, "kind": self.kind, "base": base_fingerprint(rec),
                "step": rec.get("step"), "tokens_seen": rec.get("tokens_seen"), "eval_loss": rec.get("eval_loss"),
                "forgetting": forgetting(rec), "size_bytes": self.size_bytes, "created_unix": self.created_unix,
                "record": rec}


def kind_of(folder: str, record: dict[str, Any]) -> str | None:
    """The artifact kind of a committed folder: its record's, else its place in the output layout
    (checkpoints have none: they are not artifacts)."""
    if record.get("kind"):
        return str(record["kind"])
    parts = folder.rstrip("/").rsplit("/", 2)
    last = parts[-1]
    if last in ARTIFACTS:
        return last
    if len(parts) >= 2 and parts[-2] == ADAPTERS and parse_step_dir(last) is not None:
        return "step_adapter"
    return None


def scan(uri: str, storage_options: dict[str, Any] | None = None, *, steps: bool = False) -> list[Entry]:
    """The committed artifacts under ``uri`` (adapters, merged and final models; with ``steps`` each
    checkpoint's adapter too), sorted by name."""
    from ..storage.uri import fs_and_path

    fs, root = fs_and_path(uri, storage_options)
    root = root.rstrip("/")
    try:
        paths = fs.find(root, withdirs=False)
    except FileNotFoundError:
        paths = []
    present = set(paths)
    folders = sorted(p[: -len(MANIFEST) - 1] for p in present
                     if p.endswith("/" + MANIFEST) and f"{p[: -len(MANIFEST)]}{META}" in present)
    if not steps:  # a checkpoint's adapter is known by its place: its manifest is not even read
        folders = [f for f in folders if kind_of(f, {}) != "step_adapter"]
    if not folders:
        return []
    blobs = fs.cat([f"{f}/{MANIFEST}" for f in folders], on_error="return")
    out: list[Entry] = []
    for folder in folders:
        data = blobs.get(f"{folder}/{MANIFEST}")
        man = _parse(data)
        if man is None:
            continue
        record = _record(man)
        kind = kind_of(folder, record)
        if kind is None or (kind == "step_adapter" and not steps):
            continue
        rel = folder[len(root) + 1:] if folder != root else "."
        out.append(Entry(rel, uri.rstrip("/") + ("" if rel == "." else "/" + rel), kind, record,
                         record.get("size_bytes") or man.get("total_bytes"), man.get("created_unix")))
    return out


def read_one(uri: str, storage_options: dict[str, Any] | None = None) -> Entry:
    """The artifact committed at ``uri`` itself; FtclusterError saying what is there otherwise."""
    from ..storage.uri import fs_and_path

    fs, root = fs_and_path(uri, storage_options)
    root = root.rstrip("/")
    try:
        man = _parse(fs.cat_file(f"{root}/{MANIFEST}"))
    except FileNotFoundError:
        man = None
    if man is None:
        found = scan(uri, storage_options)
        hint = (f"; it holds {len(found)}: {', '.join(e.name for e in found[:4])}{' ...' if len(found) > 4 else ''}"
                if found else "; run `ftcluster adapters list` on its prefix to see what is there")
        raise FtclusterError(f"{uri}: no committed artifact here (no {MANIFEST}){hint}")
    record = _record(man)
    kind = kind_of(root, record)
    if kind is None:
        raise FtclusterError(f"{uri}: a committed checkpoint, not an adapter or model; its adapter is "
                             f"{uri.rstrip('/').rsplit('/', 2)[0]}/{ADAPTERS}/{root.rsplit('/', 1)[-1]}")
    return Entry(".", uri.rstrip("/"), kind, record, record.get("size_bytes") or man.get("total_bytes"),
                 man.get("created_unix"))


def table_rows(entries: list[Entry]) -> tuple[list[str], list[list[str]], list[str]]:
    """(headers, rows, legend lines) of ``adapters list``: short columns that fit 80 with names of
    about 20 characters; the legend names each base fingerprint once."""
    headers = ["NAME", "BASE", "R", "STEP", "TOKENS", "EVAL", "FORGET", "SIZE"]
    rows, bases = [], {}
    for e in entries:
        rec = e.record
        fp = base_fingerprint(rec)
        bases.setdefault(short(fp)[:8] if fp else "-", base_source(rec))
        lora = rec.get("lora") or {}
        f = forgetting(rec)
        rows.append([e.name, short(fp)[:8] if fp else "-", str(lora.get("r") or "-"), _num(rec.get("step")),
                     _count(rec.get("tokens_seen")), _loss(rec.get("eval_loss")),
                     "-" if f is None else f"{f:+.2f}", human_bytes(e.size_bytes)])
    legend = [f"base {fp}: {src}" for fp, src in sorted(bases.items())]
    return headers, rows, legend


def show_lines(entry: Entry) -> list[str]:
    """``adapters show``: the record as labelled lines (``--json`` prints it whole)."""
    rec = entry.record
    base: dict[str, Any] = rec["base"] if isinstance(rec.get("base"), dict) else {}
    tok = rec.get("tokenizer") or {}
    lora = rec.get("lora") or {}
    data = rec.get("data") or {}
    run = rec.get("run") or {}
    by = base.get("produced_by") or {}
    f = forgetting(rec)
    lines = [
        f"uri:          {entry.uri}",
        f"kind:         {entry.kind}   format: {rec.get('format') or 'legacy (no lineage)'}",
        f"run:          {rec.get('name') or (rec.get('training') or {}).get('name')}  id {run.get('uid') or '-'}",
        f"base:         {base_source(rec)}",
        f"  fingerprint {base.get('fingerprint') or '-'}",
        f"  config      {base.get('config_sha256') or rec.get('base_config_sha256') or '-'}",
        f"  weights     {(base.get('weights') or {}).get('kind', '-')} {(base.get('weights') or {}).get('sha256', '-')}",
    ]
    if by:
        lines.append(f"  made by     run {by.get('name')} (id {by.get('run_uid') or '-'}), its {by.get('kind')} at step "
                     f"{by.get('step')}")
    lines += [
        f"tokenizer:    {tok.get('vocab', '-')} tokens ({len(tok.get('added') or [])} added: "
        f"{', '.join((tok.get('added') or [])[:6]) or 'none'}{' ...' if len(tok.get('added') or []) > 6 else ''})  "
        f"sha256 {short(tok.get('sha256'))}",
    ]
    if lora:
        lines.append(f"lora:         r={lora.get('r')} alpha={lora.get('alpha')} on {lora.get('target_modules')}"
                     + (f", modules_to_save {lora['modules_to_save']}" if lora.get("modules_to_save") else "")
                     + (f", {lora['new_token_rows']} new token rows" if lora.get("new_token_rows") else "")
                     + (" (rslora)" if lora.get("use_rslora") else ""))
    lines += [
        f"trainable:    {_num(rec.get('trainable_params'))} parameters   size {human_bytes(entry.size_bytes)}",
        f"data:         {data.get('kind', '-')} sha256 {short(data.get('sha256'))}"
        + (f", {data['tokens']:,} tokens" if data.get("tokens") else ""),
        f"trained:      step {_num(rec.get('step'))}, {_num(rec.get('tokens_seen'))} tokens, train loss "
        f"{_loss(rec.get('train_loss'))}, eval loss {_loss(rec.get('eval_loss'))}",
        f"forgetting:   general-eval loss {_loss(rec.get('general_eval_before'))} -> "
        f"{_loss(rec.get('general_eval_after'))}" + ("" if f is None else f" ({f:+.3f})"),
    ]
    if rec.get("merged_from"):
        lines.append(f"merged from:  {json.dumps(rec['merged_from'], sort_keys=True)}")
    return lines


def human_bytes(n: int | None) -> str:
    """``1.3MB``: decimal units, as object stores bill them."""
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1000
    return f"{size:.1f}TB"


def _record(man: dict[str, Any]) -> dict[str, Any]:
    meta = man.get("meta")
    return meta if isinstance(meta, dict) else {}


def _parse(data: Any) -> dict[str, Any] | None:
    if not isinstance(data, bytes | str):
        return None
    try:
        out = json.loads(data)
    except ValueError:
        return None
    return out if isinstance(out, dict) else None


def _num(v: Any) -> str:
    return "-" if v is None else f"{int(v):,}"


def _count(v: Any) -> str:
    if v is None:
        return "-"
    v = float(v)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if v >= div:
            return f"{v / div:.1f}{unit}"
    return f"{v:.0f}"


def _loss(v: Any) -> str:
    return "-" if v is None else f"{float(v):.3f}"
