"""Load job YAML with line and column numbers, and apply ``--set`` overrides.

Returns plain Python data plus a map from field path (a tuple of keys and list
indices) to the 1-based (line, column) where that key or item starts, so that
validation errors can point at the exact place in the user's file.

Field paths are dotted names with list indices: ``lora.target_modules[0]``,
``variants[1].data.train``. Environment values are strings: a YAML scalar in an
environment map (``OMP_NUM_THREADS: 1``, ``--set env.DEBUG=true``) is kept as the text
the user typed (``"1"``, ``"true"``), not YAML's int or bool.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Problem, SpecError

PathKey = tuple[Any, ...]

# Maps of environment variables (every value a string), by field path.
ENV_MAPS: tuple[PathKey, ...] = (("env",), ("slurm", "env"), ("kubernetes", "env"), ("local", "env"))
_KEY = re.compile(r"[^.\[\]=]+(?:\[\d+\])*(?:\.[^.\[\]=]+(?:\[\d+\])*)*")
_KEY_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


@dataclass
class LoadedDoc:
    """A parsed YAML document with source positions."""

    data: dict[str, Any]
    source: str
    locations: dict[PathKey, tuple[int, int]] = field(default_factory=dict)
    overridden: set[PathKey] = field(default_factory=set)
    value_locations: dict[PathKey, tuple[int, int]] = field(default_factory=dict)  # where a mapping's value starts
    # The --set overrides applied, in command-line order: (field path, value, the KEY=VALUE text).
    applied: list[tuple[PathKey, Any, str]] = field(default_factory=list)

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
    untyped = _env_scalars(data)
    if untyped:  # rare: compose the text again only then (start-up time)
        root = _yaml().compose(text)
        for path in untyped:
            set_path(data, path, _typed(_node_at(root, path)))
    return LoadedDoc(data=data, source=source, locations=locs, value_locations=values)


def is_env(path: PathKey) -> bool:
    """True for a field path inside an environment map (``env.OMP_NUM_THREADS``, ``slurm.env.X``)."""
    return len(path) >= 2 and tuple(path[:-1]) in ENV_MAPS


def _env_scalars(data: dict[str, Any]) -> list[PathKey]:
    """Paths of the environment values YAML read as something other than text (1, true, 1.0e-4), in env
    maps and in the dotted keys of variants' and pipeline stages' ``set``."""
    def typed(v: Any) -> bool:
        return isinstance(v, (bool, int, float))

    out: list[PathKey] = []
    for m in ENV_MAPS:
        env: Any = data
        for part in m:
            env = env.get(part) if isinstance(env, dict) else None
        if isinstance(env, dict):
            out += [m + (k,) for k, v in env.items() if typed(v)]
    for section in ("stages", "variants"):
        items = data.get(section)
        for i, item in enumerate(items if isinstance(items, list) else []):
            sets = item.get("set") if isinstance(item, dict) else None
            if isinstance(sets, dict):
                out += [(section, i, "set", k) for k, v in sets.items() if typed(v) and is_env(parse_key(k) or ())]
    return out


def _node_at(node: Any, path: PathKey) -> Any:
    for part in path:
        if isinstance(part, int):
            node = node.value[part]
        else:
            node = next(v for k, v in node.value if str(k.value) == part)
    return node


def _typed(node: Any) -> Any:
    """A composed YAML node with every scalar as the text that was typed (null stays None)."""
    from ruamel.yaml.nodes import MappingNode, SequenceNode

    if isinstance(node, MappingNode):
        return {str(k.value): _typed(v) for k, v in node.value}
    if isinstance(node, SequenceNode):
        return [_typed(v) for v in node.value]
    return None if str(node.tag).endswith(":null") else str(node.value)


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


def dotted(path: PathKey) -> str:
    """("variants", 1, "set") -> "variants[1].set"."""
    return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in path).replace(".[", "[")


def parse_key(key: str) -> PathKey | None:
    """``variants[1].data.train`` -> ("variants", 1, "data", "train"); None when ``key`` is no field path."""
    if not _KEY.fullmatch(key):
        return None
    return tuple(int(i) if i else name for name, i in _KEY_PART.findall(key))


def set_path(data: dict[str, Any], path: PathKey, value: Any) -> str | None:
    """Set the field at ``path`` (missing mappings are created; list items must exist).

    Returns what is wrong, naming the items that do exist, or None.
    """
    target: Any = data
    for i, part in enumerate(path):
        here = dotted(path[:i])
        if isinstance(part, int):
            if not isinstance(target, list):
                what = "a mapping" if isinstance(target, dict) else repr(target)
                return f"{here} is {what}, not a list, so it has no item [{part}]; set the whole value instead"
            if part >= len(target):
                have = f"its items are [0] to [{len(target) - 1}]" if target else "it is an empty list"
                return f"{here} has no item [{part}]: {have}"
        elif not isinstance(target, dict):
            return f"{here} is not a mapping, so it has no field {part!r}"
        if i == len(path) - 1:
            target[part] = value
            return None
        nxt = target[part] if isinstance(target, list) else target.get(part)
        if nxt is None:
            if isinstance(path[i + 1], int):
                return f"{dotted(path[: i + 1])} is not set, so it has no item [{path[i + 1]}]"
            nxt = target[part] = {}
        target = nxt
    return None


def variant_key(path: PathKey) -> PathKey:
    """``variants[1].lora.r`` (or ``variants[1].set.lora.r``) -> that variant's override of ``lora.r``:
    a variant's ``set`` holds dotted keys, one per field."""
    if len(path) > 2 and path[0] == "variants" and isinstance(path[1], int) and path[2] != "name":
        rest = path[3:] if path[2] == "set" else path[2:]
        if rest:
            return (*path[:2], "set", dotted(rest))
    return path


def override_value(raw: str, env: bool) -> Any:
    """The value of ``KEY=VALUE``: YAML (a scalar, or a flow list or mapping); in an environment map,
    the text as typed (``1`` -> "1", ``true`` -> "true"; quotes still make a string)."""
    if not raw.strip():
        return "" if env else None
    try:
        if env:
            return _typed(_yaml().compose(raw))
        return _plain(_yaml().load(raw), (), {})
    except Exception:
        return raw


def apply_overrides(doc: LoadedDoc, overrides: list[str]) -> LoadedDoc:
    """Apply ``key.path=value`` overrides in order (later ones win); values are parsed as YAML
    scalars/flow values. Keys take list indices (``lora.target_modules[0]``, ``variants[1].data.train``)."""
    problems: list[Problem] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        path = parse_key(key) if sep else None
        if not path:
            problems.append(Problem("--set", None, None, item, "expected KEY.PATH=VALUE, e.g. --set training.max_steps=10 "
                                                               "or --set 'lora.target_modules[0]=q_proj'"))
            continue
        path = variant_key(path)
        value = override_value(raw, is_env(path) or tuple(path) in ENV_MAPS)
        err = set_path(doc.data, path, value)
        if err:
            problems.append(Problem("--set", None, None, key, err))
            continue
        doc.overridden.add(path)
        doc.applied.append((path, value, item))
    if problems:
        raise SpecError(problems)
    return doc
