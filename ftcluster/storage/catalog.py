"""What a run's output URI holds, read-only: its committed checkpoints, step adapters and end-of-run
artifacts, and their metadata (docs/storage.md, "Layout").

The one place that decides *committed* and *done* for every reader (the CLI, ``ftcluster sample``,
pipelines, the checkpoint store):

* a folder is **committed** iff its ``manifest.json`` exists: the commit protocol writes the manifest
  last (:mod:`.commit`), so anything without one is an upload in progress or the leftover of a crash;
* a run is **done** iff its last artifact is committed: artifacts commit in order, and the training
  engine's recipe names the last (``ftcluster.plan.engines.engine_for(spec).last_artifact(spec)``;
  the storage layer sits below the plan, so the name is an argument here).

A :class:`Catalog` never writes. It reads through fsspec, so the URI may be a local path, ``file://``,
``s3://`` or ``gs://``; ``storage_options`` are the spec's ``output.storage_options``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .layout import ADAPTERS, ARTIFACTS, CHECKPOINTS, MANIFEST, META, OutputLayout, parse_step_dir, step_dir

#: The end-of-run artifacts that are whole models (loadable without the base), best first.
WHOLE_MODELS = ("merged", "final")


@dataclass(frozen=True)
class Item:
    """One committed folder under the output URI."""

    kind: str  # "checkpoint", "step_adapter" or "artifact"
    name: str  # relative to the output URI: "checkpoints/step-00000010", "adapters/step-00000010", "final"
    uri: str  # the folder's URI (no trailing '/')
    step: int | None = None  # checkpoints and step adapters

    @property
    def whole_model(self) -> bool:
        """Loadable alone (``merged``/``final``), not an adapter on a base model."""
        return self.kind == "artifact" and self.name in WHOLE_MODELS


class Catalog:
    """The committed contents of one output URI (see the module docstring)."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None, *, fs: Any = None,
                 root: str | None = None):
        """``fs`` and ``root`` (its path of ``uri``): a filesystem already open on the URI (the store's)."""
        self.uri = uri.rstrip("/")
        if fs is None or root is None:
            from .uri import fs_and_path

            fs, root = fs_and_path(uri, storage_options)
        self.fs = fs
        self.paths = OutputLayout(root)  # fs paths
        self.uris = OutputLayout(self.uri)  # the same, as URIs

    # -- one folder --------------------------------------------------------------
    def is_committed(self, name: str) -> bool:
        """Whether ``{uri}/{name}/`` is committed: its manifest exists."""
        return bool(self.fs.exists(f"{self.paths.root}/{name.strip('/')}/{MANIFEST}"))

    def done(self, last_artifact: str) -> bool:
        """Whether the run is done: ``last_artifact`` (the engine recipe's ``last_artifact(spec)``) is committed."""
        return self.is_committed(last_artifact)

    def manifest(self, name: str) -> dict[str, Any] | None:
        """The manifest of the committed folder ``name``, or None (not committed, or unreadable)."""
        return self._json(f"{name.strip('/')}/{MANIFEST}")

    def meta(self, item: Item | str) -> dict[str, Any] | None:
        """The ``ftcluster_meta.json`` of a committed adapter or artifact (the spec it trained with, its
        step and eval loss), or None when it has none."""
        name = item.name if isinstance(item, Item) else item
        return self._json(f"{name.strip('/')}/{META}")

    # -- listings ------------------------------------------------------------------
    def checkpoints(self) -> list[Item]:
        """Committed checkpoints, oldest step first."""
        return self._steps(CHECKPOINTS, "checkpoint")

    def step_adapters(self) -> list[Item]:
        """LoRA: the committed adapter of each checkpoint, oldest step first."""
        return self._steps(ADAPTERS, "step_adapter")

    def artifacts(self) -> list[Item]:
        """The committed end-of-run artifacts (``final``, ``merged``, ``adapter``), in that order."""
        return [Item("artifact", name, f"{self.uri}/{name}") for name in ARTIFACTS if self.is_committed(name)]

    def items(self) -> list[Item]:
        """Everything committed: checkpoints, step adapters, then artifacts."""
        return self.checkpoints() + self.step_adapters() + self.artifacts()

    def newest_model(self) -> Item | None:
        """What to sample from: ``merged``, else ``final`` (whole models), else ``adapter``, else the newest
        committed step adapter; None when nothing is committed yet."""
        for name in (*WHOLE_MODELS, "adapter"):
            if self.is_committed(name):
                return Item("artifact", name, f"{self.uri}/{name}")
        adapters = self.step_adapters()
        return adapters[-1] if adapters else None

    # -- reading ---------------------------------------------------------------------
    def _steps(self, folder: str, kind: str) -> list[Item]:
        try:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(f"{self.paths.root}/{folder}", detail=False)]
        except FileNotFoundError:
            return []
        steps = sorted(s for s in (parse_step_dir(n) for n in names) if s is not None)
        out = []
        for step in steps:
            name = f"{folder}/{step_dir(step)}"
            if self.is_committed(name):
                out.append(Item(kind, name, f"{self.uri}/{name}", step))
        return out

    def _json(self, rel: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self.fs.cat_file(f"{self.paths.root}/{rel}"))
        except (FileNotFoundError, ValueError):
            return None
        return data if isinstance(data, dict) else None
