"""Plain-text tables for ``status``, ``list`` and ``doctor`` that never cut an id or a word.

rich's tables shrink every column to fit the terminal and then fold or ellipsize cells, which
cut run ids mid-token (not copy-pasteable) at 80 columns. Here the key columns (run ids, names,
states) are always printed whole, at their natural width; one column (the message) takes the
rest of the line and wraps at word boundaries. When less than ``MIN_WRAP`` characters are left
for it, it moves to indented detail lines under its row instead; when even the key columns do not
fit (a very long run id), each row is stacked: its id alone on a line, the rest indented below. A word longer than the space
it gets is printed whole too (the line runs long rather than splitting a path or URI).
"""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
from collections.abc import Callable, Sequence

MIN_WRAP = 24  # narrower than this, a wrapped column reads badly: it becomes detail lines
UNBOUNDED = 100_000  # the width when not on a terminal: whole values, one line per row (for grep, awk, logs)
GAP = "  "
INDENT = "    "


def terminal_width(stream=None) -> int:
    """$COLUMNS; else, on a terminal, its width; else (piped or redirected) :data:`UNBOUNDED`, so every
    row stays one line with its values whole, as a script reading the output expects."""
    if os.environ.get("COLUMNS", "").isdigit():
        return int(os.environ["COLUMNS"])
    stream = stream or sys.stdout
    if not (hasattr(stream, "isatty") and stream.isatty()):
        return UNBOUNDED
    return shutil.get_terminal_size((80, 24)).columns


def _wrap(text: str, width: int) -> list[str]:
    """``text`` wrapped at spaces to ``width``; words are never split (a long one gets its own line)."""
    out: list[str] = []
    for para in text.splitlines() or [""]:
        out += textwrap.wrap(para, max(width, 1), break_long_words=False, break_on_hyphens=False) or [""]
    return out


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], width: int | None = None,
          details: Sequence[Sequence[str]] | None = None,
          style: Callable[[int, str], str] | None = None) -> str:
    """Rows under headers; every column but the last is kept whole, the last wraps or moves below.

    ``details``: per row, extra lines shown indented under it (e.g. a doctor check's fix), wrapped
    to the full width. ``style(col, padded_cell)`` may colour a key cell (it gets the padded text).
    """
    width = width or terminal_width()
    keys = len(headers) - 1
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(keys)]
    used = sum(widths) + len(GAP) * keys
    if used - len(GAP) > width:
        return _stacked(headers, rows, width, details, style)
    room = width - used
    inline = room >= MIN_WRAP or all(len(str(r[-1])) <= max(room, 0) for r in rows)
    lines = [(_join(headers[:keys], widths, None) + (GAP + headers[-1] if inline else "")).rstrip()]
    for i, row in enumerate(rows):
        head = _join(row[:keys], widths, style)
        last = str(row[-1])
        if inline:
            wrapped = _wrap(last, room)
            lines.append((head + GAP + wrapped[0]).rstrip())
            lines += [(" " * (used) + w).rstrip() for w in wrapped[1:]]
        else:
            lines.append(head.rstrip())
            if last:
                lines += [INDENT + w for w in _wrap(last, width - len(INDENT))]
        for extra in (details[i] if details else ()):
            if extra:
                lines += [INDENT + w for w in _wrap(extra, width - len(INDENT))]
    return "\n".join(lines) + "\n"


def _stacked(headers: Sequence[str], rows: Sequence[Sequence[str]], width: int,
             details: Sequence[Sequence[str]] | None, style: Callable[[int, str], str] | None) -> str:
    """Keys too wide for one line (a very long id): each row's first cell alone on its line, the other
    key cells as ``name value`` pairs under it, then the last column and the details."""
    lines = []
    for i, row in enumerate(rows):
        lines.append(style(0, str(row[0])) if style else str(row[0]))
        pairs = [(f"{h.lower()} " if h else "") + (style(c, str(row[c])) if style else str(row[c]))
                 for c, h in enumerate(headers[1:-1], start=1) if str(row[c]).strip()]
        lines.append(INDENT + GAP.join(pairs))
        for extra in [str(row[-1]), *(details[i] if details else ())]:
            if extra:
                lines += [INDENT + w for w in _wrap(extra, width - len(INDENT))]
    return "\n".join(lines) + "\n"


def _join(cells: Sequence[str], widths: list[int], style: Callable[[int, str], str] | None) -> str:
    out = []
    for col, (cell, w) in enumerate(zip(cells, widths, strict=True)):
        padded = str(cell).ljust(w)
        out.append(style(col, padded) if style else padded)
    return GAP.join(out)
