"""Following a run on a terminal: its log lines, with a live progress bar below them.

``submit --wait`` and ``logs -f`` stream the run's log; when stdout is a terminal they also
read the run's ``metrics.jsonl`` (under the output URI, through ftcluster.storage: a local
folder for local runs, the same URI the Slurm job writes to) and show the newest training
record as a rich progress bar (step / total, loss, tokens/s, ETA). The log lines still print
above the bar. Not on a terminal, the log lines are printed exactly as they are, nothing else,
so scripts see the same text as before.

The training runtime flushes metrics.jsonl every ``training.log_every_steps``, so the bar moves
at that pace; reading it is best effort (a store that cannot be read just leaves the bar still).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterable
from typing import Any

from ..storage.uri import fs_and_path, is_local

LOCAL_POLL_S, REMOTE_POLL_S = 1.0, 10.0
STEP_IN_LOG = re.compile(r"\bstep (\d+)/(\d+)\b")  # the runtime's plain progress line (train/metrics.py)


def latest_train_record(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The newest ``kind: train`` record of a metrics.jsonl, or None (missing, unreadable, none yet)."""
    try:
        fs, path = fs_and_path(uri, storage_options)
        text = fs.cat_file(path).decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 - best effort: the bar just does not move
        return None
    for line in reversed(text.splitlines()):
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line being written
        if isinstance(rec, dict) and rec.get("kind") == "train" and "step" in rec:
            return rec
    return None


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "-:--"
    s = int(max(0, s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def describe_record(rec: dict[str, Any]) -> str:
    parts = []
    if rec.get("loss") is not None:
        parts.append(f"loss {rec['loss']:.4f}")
    if rec.get("tokens_per_s") is not None:
        parts.append(f"{rec['tokens_per_s']:,.0f} tok/s")
    parts.append(f"eta {_fmt_s(rec.get('eta_s'))}")
    return " | ".join(parts)


class ProgressBar:
    """A rich progress bar fed from a metrics.jsonl by a polling thread; log lines print above it."""

    def __init__(self, metrics_uri: str, storage_options: dict[str, Any], total: int | None, console: Any = None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.uri, self.options = metrics_uri, storage_options
        self.poll = LOCAL_POLL_S if is_local(metrics_uri) else REMOTE_POLL_S
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), console=console or Console(),
                                 transient=False, refresh_per_second=4)
        self.task = self.progress.add_task("train", total=total, completed=0, info="waiting for the first steps")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="ftcluster-progress", daemon=True)

    def __enter__(self) -> ProgressBar:
        self.progress.start()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.refresh()  # the last record, so the bar ends where the run ended
        self.progress.stop()

    def print(self, line: str) -> None:
        from rich.text import Text

        self.progress.console.print(Text(line.rstrip("\n")), soft_wrap=True, highlight=False)

    def saw_total(self, total: int) -> None:
        """The runtime's own count (its log says ``step N/TOTAL``) wins over the spec's max_steps."""
        if self.progress.tasks[0].total != total:
            self.progress.update(self.task, total=total)

    def refresh(self) -> None:
        rec = latest_train_record(self.uri, self.options)
        if rec is not None:
            self.progress.update(self.task, completed=int(rec["step"]), info=describe_record(rec))

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.poll)


def show(lines: Iterable[str], echo: Callable[[str], None], bar: ProgressBar | None) -> None:
    """Print ``lines`` (with their line ends); above ``bar`` when there is one."""
    if bar is None:
        for line in lines:
            echo(line)
        return
    with bar:
        for line in lines:
            bar.print(line)
            m = STEP_IN_LOG.search(line)
            if m:  # the total, also when the spec gave epochs instead of training.max_steps
                bar.saw_total(int(m.group(2)))
