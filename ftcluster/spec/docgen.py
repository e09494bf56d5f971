"""Generate docs/spec.md (the field reference) from the pydantic models: one source of truth.

    python -m ftcluster.spec.docgen > docs/spec.md
"""

from __future__ import annotations

import json
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .schema import DeepSpeedSpec, FsdpSpec, FullJob, LoraJob


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:  # a checked type (spec.OneLine) reads as what it annotates
        return _type_name(args[0])
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join(_type_name(a) for a in args if a is not type(None)) + (" \\| null" if type(None) in args else "")
    if origin in (list, tuple):
        return f"list[{_type_name(args[0])}]" if args else "list"
    if origin is dict:
        return f"map[{_type_name(args[0])}, {_type_name(args[1])}]"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _field_type(field: Any) -> str:
    """A field's type; a name of the backend registry (schema.BackendName) lists the names."""
    names = next((m.names() for m in field.metadata if hasattr(m, "names")), None)
    return " \\| ".join(json.dumps(n) for n in names) if names else _type_name(field.annotation)


def _default(field: Any) -> str:
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "(section)"
        return f"`{json.dumps(value)}`"
    if field.default is PydanticUndefined:
        return ""
    return f"`{json.dumps(field.default)}`"


def _section(cls: type[BaseModel], prefix: str, out: list[str], seen: set[str]) -> None:
    rows, nested = [], []
    for name, field in cls.model_fields.items():
        path = f"{prefix}{name}"
        rows.append(f"| `{path}` | {_field_type(field)} | {_default(field)} | {field.description or ''} |")
        sub = _model_in(field.annotation)
        if sub is not None and path not in seen:
            nested.append((sub, path + ("[]." if typing.get_origin(field.annotation) is list else ".")))
    out += [f"\n### `{prefix.rstrip('.') or 'top level'}`\n", (cls.__doc__ or "").strip().splitlines()[0], "",
            "| field | type | default | description |", "|---|---|---|---|", *rows]
    for sub, path in nested:
        seen.add(path)
        _section(sub, path, out, seen)


def _model_in(tp: Any) -> type[BaseModel] | None:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for a in typing.get_args(tp):
        found = _model_in(a)
        if found is not None:
            return found
    return None


def render_markdown() -> str:
    out = ["# Job spec reference", "",
           "Generated from the pydantic models by `python -m ftcluster.spec.docgen`; do not edit by hand.",
           "The same descriptions feed `ftcluster schema` (JSON Schema for editors). Unknown keys are errors.",
           "", "`method: lora` takes a `lora:` section; `method: full` takes `engine` and the section of that engine: `deepspeed:`",
           "(the default) or `fsdp:`. The rest is shared.",
           "", "Relative local paths (`data.*`, `data.prepare.source`, `model.path`, `tokenizer.path`, `tokenizer.add_tokens` as a file, `output.uri` as a path or `file://`,",
           "`deepspeed.nvme_path`, `local.runs_dir`, `local.python`) are relative to the spec file's folder, like",
           "`deepspeed.config_file`, wherever you run ftcluster from; values given with `--set` are relative to the",
           "current directory. ftcluster rewrites them against the directory you submit from, where the job's",
           "processes start. Where the job runs on another machine (`backend: kubernetes`, Slurm through",
           "`slurm.login`) the paths name files there and are kept as written."]
    out.append("\n## method: lora")
    _section(LoraJob, "", out, set())
    out.append("\n## method: full (only the fields that differ)")
    engine = FullJob.model_fields["engine"]
    out += ["", "| field | type | default | description |", "|---|---|---|---|",
            f"| `engine` | `deepspeed` or `fsdp` | `{engine.default}` | {engine.description} |"]
    _section(DeepSpeedSpec, "deepspeed.", out, set())
    _section(FsdpSpec, "fsdp.", out, set())
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render_markdown(), end="")
