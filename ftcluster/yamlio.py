"""Load job YAML with line and column numbers, and apply ``--set`` overrides.

Returns plain Python data plus a map from field path (a tuple of keys and list
indices) to the 1-based (line, column) where that key or item starts, so that
validation errors can point at the exact place in the user's file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import Problem, SpecError

PathKey = tuple[Any, ...]


@dataclass
class LoadedDoc:
    """A parsed YAML document with source positions."""

    data: dict[str, Any]
    source: str
    locations: dict[PathKey, tuple[int, int]] = field(default_factory=dict)
    overridden: set[PathKey] = field(default_factory=set)
    value_locations: dict[PathKey, tuple[int, int]] = field(default_factory=dict)  # where a mapping's value starts

    def is_overridden(self, path: PathKey) -> bool:
        """True when ``path`` or one of its ancestors was set with ``--set``."""
        return any(tuple(path[: i + 1]) in self.overridden for i in range(len(path)))

    def locate(self, path: PathKey) -> tuple[int | None, int | None]:
        """Position of ``path``, or of its nearest ancestor that has one."""
        path = tuple(path)
        while path:
            if path in self.locations:
                return self.locations[path]
            path = path[:-1]
        return self.locations.get((), (None, None))

    def locate_value(self, path: PathKey) -> tuple[int | None, int | None]:
        """Position of the value at ``path`` (of its key, or an ancestor, where unknown)."""
        return self.value_locations.get(tuple(path)) or self.locate(path)


def _yaml():
    from ruamel.yaml import YAML

    y = YAML(typ="rt")
    y.allow_duplicate_keys = False
    return y


def _plain(node: Any, path: PathKey, locs: dict[PathKey, tuple[int, int]],
           values: dict[PathKey, tuple[int, int]] | None = None) -> Any:
    """Convert ruamel round-trip nodes to plain dict/list/scalars, recording positions."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if isinstance(node, CommentedMap):
        out = {}
        for key, value in node.items():
            try:
                line, col = node.lc.key(key)
                locs[path + (key,)] = (line + 1, col + 1)
                if values is not None:
                    vline, vcol = node.lc.value(key)
                    values[path + (key,)] = (vline + 1, vcol + 1)
            except (KeyError, TypeError, AttributeError):
                pass
            out[key if isinstance(key, str) else str(key)] = _plain(value, path + (str(key),), locs, values)
        return out
    if isinstance(node, CommentedSeq):
        items = []
        for i, value in enumerate(node):
            try:
                line, col = node.lc.item(i)
                locs[path + (i,)] = (line + 1, col + 1)
            except (KeyError, TypeError, AttributeError, IndexError):
                pass
            items.append(_plain(value, path + (i,), locs, values))
        return items
    return _scalar(node)


def _scalar(value: Any) -> Any:
    """ruamel keeps str/float/int subclasses that carry formatting; unwrap them."""
    from ruamel.yaml.scalarbool import ScalarBoolean

    if isinstance(value, ScalarBoolean):
        return bool(value)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return value


def _mark(exc: Exception) -> tuple[int | None, int | None]:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is None:
        return None, None
    return mark.line + 1, mark.column + 1


def parse_text(text: str, source: str) -> LoadedDoc:
    """Parse YAML text into a :class:`LoadedDoc`, raising :class:`SpecError` on bad input."""
    from ruamel.yaml.constructor import DuplicateKeyError
    from ruamel.yaml.error import MarkedYAMLError

    if not text.strip() or all(
        not ln.strip() or ln.lstrip().startswith("#") for ln in text.splitlines()
    ):
        raise SpecError([Problem(source, None, None, "", "the file is empty; start from an example in examples/ or run `ftcluster schema`")])
    try:
        node = _yaml().load(text)
    except DuplicateKeyError as exc:
        line, col = _mark(exc)
        key = str(getattr(exc, "problem", "")).split('"')
        name = key[1] if len(key) > 2 else "a key"
        raise SpecError([Problem(source, line, col, "", f"duplicate key {name!r}; each key may appear once per mapping, remove one of them")]) from None
    except MarkedYAMLError as exc:
        line, col = _mark(exc)
        what = (exc.problem or str(exc)).strip().splitlines()[0]
        raise SpecError([Problem(source, line, col, "", f"invalid YAML: {what}; check indentation and quoting")]) from None
    locs: dict[PathKey, tuple[int, int]] = {(): (1, 1)}
    values: dict[PathKey, tuple[int, int]] = {}
    data = _plain(node, (), locs, values)
    if not isinstance(data, dict):
        kind = type(data).__name__ if data is not None else "nothing"
        raise SpecError([Problem(source, 1, 1, "", f"the document must be a mapping of fields (name:, method:, ...), got {kind}")])
    return LoadedDoc(data=data, source=source, locations=locs, value_locations=values)


def load_file(path: str | Path) -> LoadedDoc:
    """Read and parse a job YAML file."""
    p = Path(path)
    source = str(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise SpecError([Problem(source, None, None, "", "no such file; check the path")]) from None
    except IsADirectoryError:
        raise SpecError([Problem(source, None, None, "", "is a directory; pass a job YAML file")]) from None
    except OSError as exc:
        raise SpecError([Problem(source, None, None, "", f"cannot read the file: {exc.strerror}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise SpecError([Problem(source, line, col, "", f"the file is not valid UTF-8 (byte 0x{raw[exc.start]:02x}); save it as UTF-8")]) from None
    return parse_text(text.lstrip("\ufeff"), source)


def apply_overrides(doc: LoadedDoc, overrides: list[str]) -> LoadedDoc:
    """Apply ``key.path=value`` overrides; values are parsed as YAML scalars/flow values."""
    problems: list[Problem] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(Problem("--set", None, None, item, "expected KEY.PATH=VALUE, e.g. --set training.max_steps=10"))
            continue
        try:
            value = _plain(_yaml().load(raw), (), {}) if raw.strip() else None
        except Exception:
            value = raw
        parts = key.split(".")
        target = doc.data
        ok = True
        for i, part in enumerate(parts[:-1]):
            nxt = target.get(part)
            if nxt is None:
                nxt = target[part] = {}
            if not isinstance(nxt, dict):
                problems.append(Problem("--set", None, None, ".".join(parts[: i + 1]), "is not a mapping, cannot set a sub-key on it"))
                ok = False
                break
            target = nxt
        if ok:
            target[parts[-1]] = value
            doc.overridden.add(tuple(parts))
    if problems:
        raise SpecError(problems)
    return doc
