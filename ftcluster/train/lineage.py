"""Which base an artifact was trained on, and the check that an adapter goes on that base
(docs/adapters.md, "Lineage").

A base's identity (:func:`ftcluster.artifacts.record.base_identity`) is computed the same way when a
run records it and when an adapter is later loaded, merged or sampled: the config fingerprint from
the base's own ``config.json`` (or the random-init config the spec builds), before any added token
grows it, and the weights' fingerprint (an ftcluster manifest's checksums, the weight files' sha256,
the hub id and commit, or the random-init seed).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from ..artifacts.record import (
    LineageError,
    base_fingerprint,
    base_identity,
    base_source,
    path_label,
    short,
    version_of,
    weights_identity,
)

log = logging.getLogger("ftcluster.train")


def base_of_spec(spec: Any, tokenizer: Any, cache_dir: Path) -> dict[str, Any]:
    """The ``base`` section for the spec's ``model`` (on rank 0; a remote path is fetched once per node)."""
    from .model import config_fingerprint, llama_config, model_source

    m = spec.model
    if m.random_init is not None:
        config = config_fingerprint(llama_config(m.random_init, tokenizer, m.attn_implementation))
        seed = hashlib.sha256(f"random_init:{config}:seed={spec.training.seed}".encode()).hexdigest()
        return base_identity(model_source(spec), config, {"kind": "random_init", "sha256": seed})
    if m.path:
        from ..storage.fetch import fetch_dir

        folder = fetch_dir(m.path, m.storage_options, cache_dir / "models")
        return base_of_folder(folder, m.path, cache_dir)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(m.hub_id, revision=m.revision, trust_remote_code=m.trust_remote_code)
    commit = getattr(config, "_commit_hash", None) or m.revision or "unpinned"
    weights = hashlib.sha256(f"hub:{m.hub_id}@{commit}".encode()).hexdigest()
    return base_identity(model_source(spec), config_fingerprint(config), {"kind": "hub", "sha256": weights})


def base_of_folder(folder: Path, source: str, cache_dir: Path | None = None) -> dict[str, Any]:
    """The ``base`` section of a model folder (a Hugging Face save, or an ftcluster ``final/``/``merged/``);
    ``source``: its path or URI as given (a local one is kept as ``local:<name>``, :func:`path_label`)."""
    from transformers import AutoConfig

    from .model import config_fingerprint

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    return base_identity(path_label(source), config_fingerprint(config),
                         weights_identity(folder, cache_dir / "fingerprints" if cache_dir else None))


def check(record: dict[str, Any], base: dict[str, Any], *, force: bool, what: str, given: str | None = None) -> None:
    """Refuse ``what`` (an adapter, by its URI) on ``base`` when its record names another base
    (:class:`LineageError`, one line naming both and the way out); with ``force``, a warning line
    saying what was skipped. A record too old to know its base's weights is a warning, not a refusal.
    ``given``: the base as the user named it (``--base``), for the message."""
    trained_on = base_fingerprint(record)
    if version_of(record) == 0 or trained_on is None:
        why = ("its record predates lineage (ftcluster_meta.json without 'format')" if version_of(record) == 0
               else "its record has no base fingerprint (it could not be computed when it was trained)")
        log.warning("%s: %s: not checked that %s is the base it was trained on", what, why,
                    given or base.get("source"))
        return
    if trained_on == base["fingerprint"]:
        return
    differs = ("architecture" if record["base"].get("config_sha256") != base.get("config_sha256") else "weights")
    line = (f"{what}: trained on base {short(trained_on)} ({base_source(record)}), not on base "
            f"{short(base['fingerprint'])} ({given or base_source({'base': base})}): their {differs} differ")
    if not force:
        raise LineageError(f"{line}; load it on the base it was trained on (--base), or pass --force to skip "
                           "this check")
    log.warning("%s; --force: lineage check skipped, the outputs are not those the adapter was trained for", line)
