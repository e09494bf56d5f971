"""Validation problems: pydantic errors as (field path, message) pairs, and located :class:`Problem` lines.

The one place that turns a ``ValidationError`` into fixable text (did-you-mean hints, the
method-only sections, model validators' ``field.path: message`` lines) and a field path into
file:line:column. The loader, variants and pipelines all report through it.
"""

from __future__ import annotations

import json
import re
import typing
from typing import Any

from ..errors import Problem
from .yamlio import LoadedDoc

# A model validator's line "field.path: message"; list items as name[3] (volumes[0].name).
_FIELD_PREFIX = re.compile(r"^([A-Za-z_][A-Za-z0-9_-]*(?:\[\d+\])*(?:\.[A-Za-z_0-9][A-Za-z0-9_-]*(?:\[\d+\])*)*): (.*)$", re.S)
_PATH_PART = re.compile(r"\[(\d+)\]|([^.\[]+)")
_METHOD_ONLY = {
    "lora": "LoRA options apply only to method: lora; remove the `lora` section or set method: lora",
    "deepspeed": "DeepSpeed/ZeRO options apply only to method: full (LoRA runs on one GPU, or data parallel, without ZeRO); remove the `deepspeed` section or set method: full",
    "fsdp": "FSDP options apply only to method: full with engine: fsdp (LoRA runs data parallel); remove the `fsdp` section or set method: full",
    "engine": "engine chooses how a full fine-tune trains (deepspeed or fsdp); remove it or set method: full",
}


def _model_at(path: tuple[Any, ...], method: str | None, root: Any = None):
    """The pydantic model class that holds fields at ``path`` (for did-you-mean hints)."""
    from pydantic import BaseModel

    from .schema import FullJob, LoraJob

    cls: Any = root or (FullJob if method == "full" else LoraJob)
    for part in path:
        if isinstance(part, int):
            continue
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return None
        cls = _unwrap_model(field.annotation, BaseModel)
        if cls is None:
            return None
    return cls


def _unwrap_model(tp: Any, base: type) -> Any:
    if isinstance(tp, type) and issubclass(tp, base):
        return tp
    for arg in typing.get_args(tp):
        found = _unwrap_model(arg, base)
        if found is not None:
            return found
    return None


def _fmt_value(v: Any) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _message(err: dict[str, Any], path: tuple[Any, ...], method: str | None, root: Any = None) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        name = str(path[-1])
        if len(path) == 1 and name in _METHOD_ONLY:
            return _METHOD_ONLY[name]
        import difflib  # only for this hint: importing it costs start-up time on every valid spec

        cls = _model_at(path[:-1], method, root)
        fields = sorted(cls.model_fields) if cls is not None else []
        close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        valid = f"valid fields: {', '.join(fields)}" if fields else "remove it"
        return f"unknown field {name!r}; {hint}{valid}"
    if kind == "missing":
        return "required field is missing; add it (see `ftcluster schema`)"
    typed = _type_fix(err, path, method, root)
    if typed:
        return typed
    msg = err["msg"]
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
    elif "input" in err and not isinstance(err["input"], (dict, list)):
        msg = f"{msg} (got {_fmt_value(err['input'])})"
    return msg


_TYPE_FIXES = {
    "int_parsing": "expected an integer, e.g. {ex}", "int_type": "expected an integer, e.g. {ex}",
    "int_from_float": "expected a whole number, e.g. {ex}",
    "float_parsing": "expected a number, e.g. {ex}", "float_type": "expected a number, e.g. {ex}",
    "bool_parsing": "expected true or false", "bool_type": "expected true or false",
    "string_type": "expected text{quote}",
    "list_type": "expected a list, e.g. [a, b] or one `- item` line per item",
    "dict_type": "expected a mapping: indented `key: value` lines",
    "model_type": "expected a mapping: indented `key: value` lines{fields}",
    "model_attributes_type": "expected a mapping: indented `key: value` lines{fields}",
}
_EXAMPLES = {"int": 8, "float": 0.5}


def _field_default(path: tuple[Any, ...], method: str | None, root: Any) -> Any:
    cls = _model_at(path[:-1], method, root) if path and isinstance(path[-1], str) else None
    field = getattr(cls, "model_fields", {}).get(path[-1]) if cls is not None else None
    return None if field is None else field.default


def _type_fix(err: dict[str, Any], path: tuple[Any, ...], method: str | None, root: Any) -> str | None:
    """A type error as 'expected X, e.g. Y (got Z)': the fix, with an example (the field's default where it fits)."""
    kind = err["type"]
    got = _got(err)
    if kind == "literal_error":
        import difflib  # only for this hint (start-up time)

        options = re.findall(r"'([^']*)'|(\d+)", str((err.get("ctx") or {}).get("expected", "")))
        names = [a or b for a, b in options]
        close = difflib.get_close_matches(str(err.get("input")), names, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"expected one of {', '.join(names)}{got}{hint}" if names else None
    template = _TYPE_FIXES.get(kind)
    if template is None:
        return None
    default = _field_default(path, method, root)
    base = "int" if kind.startswith("int") else "float"
    ex = default if isinstance(default, (int, float)) and not isinstance(default, bool) and default else _EXAMPLES[base]
    if base == "int" and not isinstance(ex, int):
        ex = _EXAMPLES["int"]
    quote = ""
    if kind == "string_type" and got and not isinstance(err["input"], bool) and err["input"] is not None:
        quote = f'; quote it, e.g. "{err["input"]}"'
    fields = ""
    if kind.startswith("model"):
        cls = _model_at(path, method, root)
        names = sorted(getattr(cls, "model_fields", {}))
        fields = f" with fields such as {', '.join(names[:6])}" if names else ""
    return template.format(ex=ex, quote=quote, fields=fields) + got


def _split_custom(err: dict[str, Any], loc: tuple[Any, ...]) -> list[tuple[tuple[Any, ...], str, dict[str, Any]]]:
    """Model validators report 'field.path: message' lines; attach each to its field."""
    if err["type"] != "value_error":
        return [(loc, "", err)]
    out = []
    for line in err["msg"].removeprefix("Value error, ").split("\n"):
        m = _FIELD_PREFIX.match(line)
        if m:
            sub = tuple(int(i) if i else name for i, name in _PATH_PART.findall(m.group(1)))
            # A top-level validator names full paths (data.seq_len); nested ones name their own field.
            full = sub if loc == () else loc + sub
            out.append((full, m.group(2), err))
        else:
            out.append((loc, line, err))
    return out


def validation_messages(exc: Any, data: dict[str, Any], root: Any = None) -> list[tuple[tuple[Any, ...], str]]:
    """A pydantic ValidationError on a job spec (or on a ``root`` model) as (field path, message) pairs."""
    method = data.get("method") if isinstance(data.get("method"), str) else None
    out: list[tuple[tuple[Any, ...], str]] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            got = data.get("method")
            msg = ("required field is missing; set method: lora (adapters) or method: full (DeepSpeed full fine-tune)"
                   if got is None else f"must be 'lora' or 'full' (got {_fmt_value(got)})")
            out.append((("method",), msg))
            continue
        if loc and loc[0] in ("lora", "full"):
            loc = loc[1:]  # the discriminator tag pydantic puts first
        # A union's members tag the path (lora.target_modules.list[str]): one line per field instead.
        tagged = any(_union_tag(p) for p in loc)
        loc = tuple(p for p in loc if not _union_tag(p))
        for path, custom, e in _split_custom(err, loc):
            msg = custom or _message(e, path, method, root)
            if tagged and out and out[-1][0] == path:
                before = out.pop()[1].removesuffix(_got(e))
                rest = msg.removeprefix("expected ")
                if before == "expected true or false" and rest.startswith("one of "):  # bool | Literal[...]
                    msg = "expected true, false or " + rest.removeprefix("one of ")
                else:
                    msg = before + " or " + rest
            out.append((path, msg))
    return out


def _union_tag(part: Any) -> bool:
    """A union member's tag pydantic puts in an error's path (``list[str]``, ``bool``, ``literal['auto']``)."""
    return isinstance(part, str) and ("[" in part or part in ("bool", "int", "float", "str"))


def _got(err: dict[str, Any]) -> str:
    return f" (got {_fmt_value(err['input'])})" if "input" in err and not isinstance(err["input"], (dict, list)) else ""


def problems_from_validation(exc: Any, doc: LoadedDoc) -> list[Problem]:
    """Convert a pydantic ValidationError into located :class:`Problem` lines."""
    problems = [problem_at(doc, path, msg) for path, msg in validation_messages(exc, doc.data)]
    return sort_unique(problems, doc.source)


def sort_unique(problems: list[Problem], source: str) -> list[Problem]:
    """Problems in file order (the spec's own file first), each once."""
    seen, unique = set(), []
    problems = sorted(problems, key=lambda p: (p.file != source, p.line or 0, p.column or 0))
    for p in problems:
        if str(p) not in seen:
            seen.add(str(p))
            unique.append(p)
    return unique


def dotted_path(path: tuple[Any, ...]) -> str:
    """("variants", 1, "set", "lora.r") -> "variants[1].set.lora.r"."""
    return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in path).replace(".[", "[")


def problem_at(doc: LoadedDoc, path: tuple[Any, ...], msg: str) -> Problem:
    """A problem on field ``path`` of ``doc``, at its line and column (or at ``--set`` when an override set it)."""
    dotted = dotted_path(path)
    key = tuple(path)
    # A section that only --set wrote (deepspeed.zero_stage=2 -> `deepspeed`) is the override's too.
    set_inside = key not in doc.locations and any(tuple(o[:len(key)]) == key for o in doc.overridden)
    if doc.is_overridden(path) or set_inside:
        return Problem("--set", None, None, dotted, msg)
    line, col = doc.locate(path)
    return Problem(doc.source, line, col, dotted, msg)
