"""Load and validate a job spec, turning every pydantic error into a located, fixable line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import Problem, SpecError
from .problems import dotted_path, problem_at, problems_from_validation, sort_unique, validation_messages
from .yamlio import LoadedDoc, apply_overrides, load_file, parse_text


def validate_doc(doc: LoadedDoc, overrides: list[str] | None = None, relocate: Any = None, folder_of: Any = None):
    """Validate a loaded document; returns a LoraJob or FullJob, or raises SpecError.

    ``relocate(path, message)`` may return a :class:`Problem` placed elsewhere (a pipeline
    puts problems in fields its stage overrides at the override), or None for the default.
    Relative local paths are rewritten against the current directory first
    (:func:`ftcluster.spec.relpaths.rebase_doc`); ``folder_of(path)`` says which folder a field's value
    is relative to (None: the cwd), default the spec file's folder except for ``--set`` values.
    """
    from pydantic import ValidationError

    from .relpaths import rebase_doc
    from .schema import job_adapter

    secrets = _secret_problems(doc, relocate)
    folders = rebase_doc(doc, folder_of)
    try:
        spec = job_adapter().validate_python(doc.data)
    except ValidationError as exc:
        if relocate is None and not secrets:
            raise SpecError(problems_from_validation(exc, doc)) from None
        # A secret's own field reports the secret only: pydantic's message may quote the value.
        found = [(relocate and relocate(path, msg)) or problem_at(doc, path, msg)
                 for path, msg in validation_messages(exc, doc.data)
                 if not any(tuple(path[: len(s)]) == s for s, _ in secrets)]
        raise SpecError(sort_unique(found + [p for _, p in secrets], doc.source)) from None
    if secrets:
        raise SpecError(sort_unique([p for _, p in secrets], doc.source))
    from .relpaths import runs_here
    from .terms import inline_terms

    terms = inline_terms(spec, doc, here=runs_here(spec.backend, spec))
    if terms is not None:
        raise SpecError([terms])
    spec._source_file = doc.source
    spec._overrides = tuple(overrides or ())
    spec._path_folders = folders
    if spec.variants:
        from .variants import resolve_variants

        resolve_variants(spec, doc)  # every variant is validated now, with errors located in this file
    return spec


def _secret_problems(doc: LoadedDoc, relocate: Any = None) -> list[tuple[tuple[Any, ...], Problem]]:
    """Every string value of ``doc`` that looks like a secret, as a problem at the value (never quoting it)."""
    from .secrets import find_secrets, message

    out = []
    for path, kind in find_secrets(doc.data):
        msg = message(kind, path)
        problem = relocate(path, msg) if relocate is not None else None
        if problem is None and doc.is_overridden(path):
            problem = problem_at(doc, path, msg)  # names --set
        elif problem is None:
            line, col = doc.locate_value(path)
            problem = Problem(doc.source, line, col, dotted_path(path), msg)
        out.append((path, problem))
    return out


def load_spec(path: str | Path, overrides: list[str] | None = None):
    """Load, override (``key.path=value``) and validate a job YAML file.

    Returns a :class:`~ftcluster.spec.schema.LoraJob` or :class:`~ftcluster.spec.schema.FullJob`.
    Raises :class:`~ftcluster.errors.SpecError` listing every problem with file:line:column.
    """
    doc = load_file(path)
    if overrides:
        apply_overrides(doc, list(overrides))
    return validate_doc(doc, overrides)


def load_spec_text(text: str, source: str = "<string>", overrides: list[str] | None = None):
    """Like :func:`load_spec` for YAML text."""
    doc = parse_text(text, source)
    if overrides:
        apply_overrides(doc, list(overrides))
    return validate_doc(doc, overrides)


def spec_from_dict(data: dict[str, Any]):
    """Validate an already-parsed spec dict (for the training runtime and the Python API)."""
    return validate_doc(LoadedDoc(data=data, source="<dict>"))


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the job spec, generated from the pydantic models."""
    from .schema import job_adapter

    schema = job_adapter().json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "ftcluster job"
    return schema
