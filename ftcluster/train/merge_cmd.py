"""``ftcluster merge RUN|URI [--base URI] -o URI``: merge an adapter into its base and commit the merged
model to any fsspec store (``python -m ftcluster.train.merge_cmd``; the core CLI runs it apart).

Steps: the adapter (a folder, or a run's output: its ``adapter/``, else its newest step adapter) is
fetched and verified against its manifest; the base is the one its record names (the spec's
``model``: a folder or URI fetched once, ``random_init`` rebuilt from its seed, a hub id downloaded by
huggingface_hub) or ``--base``; the lineage check refuses a base with another fingerprint unless
``--force``; :func:`.merge.merge_folder` merges tensor by tensor into a local staging folder (memory:
about one tensor); the record (kind ``merged``, the adapter's lineage under ``merged_from``) is
written beside the weights; the folder is committed to ``-o`` with the commit protocol (every file,
then ``manifest.json`` last), so a reader never sees a half-written model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .. import __version__
from ..artifacts.record import merged_record, short
from ..errors import FtclusterError, TrainError
from ..storage.layout import MANIFEST, META

log = logging.getLogger("ftcluster.train")


def _base_folder(record: dict[str, Any], adapter_folder: Path, base: str | None,
                 storage_options: dict[str, Any] | None, cache: Path, work: Path) -> tuple[Path, dict[str, Any]]:
    """(the base model's local folder, its identity) for the merge."""
    from ..spec.loader import spec_from_dict
    from ..storage.fetch import fetch_dir
    from .adapters import adapter_tokenizer
    from .lineage import base_of_folder, base_of_spec
    from .merge import materialize_random_init

    if base is not None:
        folder = fetch_dir(base, storage_options, cache / "models")
        return folder, base_of_folder(folder, base, cache)
    spec = spec_from_dict(record["training"])
    tokenizer = adapter_tokenizer(adapter_folder, record)
    identity = base_of_spec(spec, tokenizer, cache)
    m = spec.model
    if m.path:
        return fetch_dir(m.path, m.storage_options, cache / "models"), identity
    if m.random_init is not None:
        return materialize_random_init(spec, tokenizer, work / "base"), identity
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(m.hub_id, revision=m.revision, allow_patterns=["*.json", "*.safetensors"])), identity


def merge(uri: str, output: str, *, base: str | None = None, force: bool = False, overwrite: bool = False,
          dtype: str | None = None, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Merge the adapter at ``uri`` into its base and commit it to ``output``; returns the merged record."""
    from ..storage.commit import CheckpointStore
    from ..storage.uri import fs_and_path
    from .adapters import cache_root, fetch_adapter
    from .lineage import check
    from .merge import merge_folder

    parent, _, name = output.rstrip("/").rpartition("/")
    if not name or not parent:
        raise TrainError(f"-o {output}: give a folder URI or path below a parent, e.g. s3://bucket/models/qa-merged")
    fs, path = fs_and_path(output, storage_options)
    if fs.exists(f"{path.rstrip('/')}/{MANIFEST}") and not overwrite:
        raise TrainError(f"{output}: a committed model is there already; pass --overwrite to replace it, or pick "
                         "another -o")
    adapter = fetch_adapter(uri, storage_options)
    cache = cache_root()
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ftcluster-merge-", dir=os.environ.get("FTCLUSTER_LOCAL_DIR")) as tmp:
        work = Path(tmp)
        folder, identity = _base_folder(adapter.record, adapter.folder, base, storage_options, cache, work)
        check(adapter.record, identity, force=force, what=adapter.uri, given=base)
        staging = work / "merged"
        info = merge_folder(folder, adapter.folder, staging, dtype=dtype)  # writes the adapter's tokenizer too
        size = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
        record = merged_record(adapter.record, identity, adapter_uri=adapter.uri, size_bytes=size, version=__version__)
        (staging / META).write_text(json.dumps(record, indent=1, sort_keys=True, default=str))
        store = CheckpointStore(parent, storage_options)
        try:
            store.publish(name, staging, record, final=True, delete_local=False).result()
        finally:
            store.close()
    log.info("merged %s into base %s (%s): %d tensors, %d with a LoRA update, %.2f GB, peak memory %.2f GB, "
             "%.1f s -> %s", adapter.uri, short(identity["fingerprint"]), identity["source"], info.tensors,
             info.lora_merged, size / 1e9, info.peak_rss_bytes / 1e9, time.monotonic() - began, output)
    return record


class _Lines(logging.Formatter):
    """Progress as plain lines, warnings as ``warning: ...`` (the CLI's style)."""

    def format(self, record: logging.LogRecord) -> str:
        return ("warning: " if record.levelno >= logging.WARNING else "") + record.getMessage()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ftcluster.train.merge_cmd", description=__doc__.splitlines()[0])
    ap.add_argument("uri", help="the adapter folder, or a LoRA run's output URI")
    ap.add_argument("-o", "--output", required=True, help="where to commit the merged model (folder URI)")
    ap.add_argument("--base", default=None, help="the base model folder (default: the one the record names)")
    ap.add_argument("--force", action="store_true", help="merge into a base the adapter was not trained on")
    ap.add_argument("--overwrite", action="store_true", help="replace a committed model at --output")
    ap.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: the base's)")
    ap.add_argument("--storage-options", default="{}", help="JSON: fsspec options for the URIs")
    args = ap.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Lines())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    logging.getLogger("ftcluster.storage").setLevel(logging.WARNING)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        merge(args.uri, args.output, base=args.base, force=args.force, overwrite=args.overwrite, dtype=args.dtype,
              storage_options=json.loads(args.storage_options))
    except FtclusterError as err:
        if os.environ.get("FTCLUSTER_DEBUG") == "1":
            raise
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
