"""The folder names under ``output.uri``: the one place that knows them (docs/storage.md, "Layout").

::

    <output.uri>/
      metrics.jsonl              metrics, one JSON object per line
      checkpoints/step-NNNNNNNN/ resumable state, committed by its manifest.json
      adapters/step-NNNNNNNN/    LoRA: the adapter at each checkpoint
      adapter/ merged/ final/    the end-of-run artifacts
      (each folder above: committed by its manifest.json; adapters and artifacts carry ftcluster_meta.json)
      <variant name>/            a variant's own output.uri (job arrays)
      .ftcluster/lease.json      the running writer's lease (storage/lease.py); .ftcluster/lease.lock on a local disk
"""

from __future__ import annotations

import re
from typing import Literal

Artifact = Literal["final", "merged", "adapter"]
ARTIFACTS: tuple[str, ...] = ("final", "merged", "adapter")
CHECKPOINTS = "checkpoints"
ADAPTERS = "adapters"
METRICS = "metrics.jsonl"
MANIFEST = "manifest.json"
LEASE = ".ftcluster/lease.json"  # one writer per output.uri (storage/lease.py)
LEASE_LOCK = ".ftcluster/lease.lock"  # a local disk: the flock that serializes replacing the lease
META = "ftcluster_meta.json"  # in each published adapter/artifact: the spec it trained with, step, eval loss
STEP_DIR = re.compile(r"^step-(\d{8,})$")


def step_dir(step: int) -> str:
    """``step-NNNNNNNN``: zero-padded to 8 digits so that names sort by step."""
    return f"step-{int(step):08d}"


def parse_step_dir(name: str) -> int | None:
    m = STEP_DIR.match(name)
    return int(m.group(1)) if m else None


def checkpoint_name(step: int) -> str:
    """``checkpoints/step-NNNNNNNN``, relative to the output URI."""
    return f"{CHECKPOINTS}/{step_dir(step)}"


def artifact_name(name: Artifact) -> str:
    """An end-of-run artifact's folder, relative to the output URI."""
    if name not in ARTIFACTS:
        raise ValueError(f"unknown artifact {name!r}; one of {', '.join(ARTIFACTS)}")
    return name


def step_adapter_name(step: int) -> str:
    """LoRA: ``adapters/step-NNNNNNNN``, the adapter published with checkpoint ``step``."""
    return f"{ADAPTERS}/{step_dir(step)}"


class OutputLayout:
    """Paths of a run's outputs under one root (a URI, or an fsspec path: it only joins names).

    Every method returns the path without a trailing '/'.
    """

    def __init__(self, root: str):
        self.root = root.rstrip("/")

    def _join(self, name: str) -> str:
        return f"{self.root}/{name}"

    @property
    def checkpoints(self) -> str:
        return self._join(CHECKPOINTS)

    def checkpoint(self, step: int) -> str:
        return self._join(checkpoint_name(step))

    def artifact(self, name: Artifact) -> str:
        return self._join(artifact_name(name))

    def step_adapter(self, step: int) -> str:
        return self._join(step_adapter_name(step))

    @property
    def lease(self) -> str:
        return self._join(LEASE)

    @property
    def metrics(self) -> str:
        return self._join(METRICS)

    def metrics_from(self, step: int) -> str:
        """Where a resumed run writes its metrics when the stored history could not be read."""
        return self._join(f"{METRICS.rsplit('.', 1)[0]}-from-{step_dir(step)}.jsonl")

    def variant(self, name: str) -> OutputLayout:
        """The layout of a variant's outputs (its output.uri is ``<uri>/<variant name>``)."""
        return OutputLayout(self._join(name))
