"""metrics.jsonl: kept in a local file, uploaded whole (it is small) in the background, best effort."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .layout import METRICS, OutputLayout
from .uri import fs_and_path, one_line, put_bytes

log = logging.getLogger("ftcluster.storage")


class MetricsWriter:
    """Keeps metrics.jsonl in a local file and uploads the whole (small) file in the background.

    Best effort: an upload that fails is logged and the next one carries everything (no retry
    policy here on purpose: the next log step is the retry). On resume (``resume_step > 0``) the
    stored file is downloaded first and records after ``resume_step`` (from the interrupted
    attempt, about to be redone) are dropped. If the stored file cannot be read, this run writes
    ``metrics-from-step-N.jsonl`` instead of overwriting the history.
    """

    def __init__(self, uri: str, storage_options: dict[str, Any] | None, local_dir: Path, resume_step: int = 0):
        self.fs, root = fs_and_path(uri, storage_options)
        paths, uris = OutputLayout(root), OutputLayout(uri)
        self.local_path = Path(local_dir) / METRICS
        self.local_path.parent.mkdir(parents=True, exist_ok=True)
        self.remote, self.display = paths.metrics, uris.metrics
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ftcluster-metrics")
        self._pending: Future | None = None
        self._lock = threading.Lock()
        self._warned = False
        kept: list[str] = []
        if resume_step > 0:
            try:
                old = self.fs.cat_file(self.remote).decode("utf-8")
                kept = [ln for ln in old.splitlines() if ln.strip() and _record_step(ln) <= resume_step]
            except FileNotFoundError:
                pass
            except Exception as exc:  # noqa: BLE001 - keep training; do not clobber the stored history
                self.remote, self.display = paths.metrics_from(resume_step), uris.metrics_from(resume_step)
                log.warning("could not read %s (%s); this run writes %s", uris.metrics, one_line(exc), self.display)
        self.local_path.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")

    def upload(self) -> Future:
        """Schedule an upload of the current file; coalesces with one that has not started yet."""
        with self._lock:
            if self._pending is not None and not self._pending.running() and not self._pending.done():
                return self._pending
            self._pending = self._pool.submit(self._upload)
            return self._pending

    def _upload(self) -> None:
        try:
            put_bytes(self.fs, self.remote, self.local_path.read_bytes())
            self._warned = False
        except Exception as exc:  # noqa: BLE001 - best effort; the next upload carries everything
            if not self._warned:
                log.warning("could not upload %s (%s); will retry at the next log", self.display, one_line(exc))
                self._warned = True

    def close(self, timeout: float | None = 60.0) -> None:
        """A last upload, waited for up to ``timeout`` seconds."""
        fut = self.upload()
        with contextlib.suppress(Exception):
            fut.result(timeout=timeout)
        self._pool.shutdown(wait=False)


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0) or 0)
    except (ValueError, AttributeError, TypeError):
        return 0
