"""Variants: several versions of one job, run as one Slurm job array.

A spec's ``variants:`` list names each version and gives it dotted-key overrides::

    variants:
      - {name: r8,  set: {lora.r: 8,  lora.alpha: 16}}
      - {name: r64, set: {lora.r: 64, lora.alpha: 128, training.learning_rate: 1.0e-4}}

Each resolved variant is the job's spec (without ``variants``) plus its ``set``, named
``<name>-<variant>`` and writing to ``<output.uri>/<variant>``, and is validated like any
job when the file is loaded. Problems point at the variant's own line and field
(``variants[1].set.lora.r``). All variants of one array share what the launch script or
manifests fix for every task: method, backend, resources, environment and the cluster
sections; changing those is an error that says what to do instead.
"""

from __future__ import annotations

import copy
from typing import Any

from ..errors import Problem, SpecError
from .envbuild import build_env
from .problems import dotted_path, problem_at, sort_unique, validation_messages
from .registry import entries
from .yamlio import LoadedDoc, parse_key, set_path

NAME_LIMIT = 50  # spec.py's job-name rule: Kubernetes appends suffixes such as -worker-12

ONE_SHAPE = "one array runs one shape; put variants that need a different one in a separate job spec"
FIXED: dict[str, str] = {
    "name": "a variant's job name is <name>-<variant>; rename the variant instead",
    "method": f"LoRA and full fine-tuning launch differently; {ONE_SHAPE}",
    "engine": f"DeepSpeed and FSDP jobs launch differently; {ONE_SHAPE}",
    "backend": "all variants are submitted together, to one backend",
    "resources": f"every array task gets the same nodes, GPUs and time limit; {ONE_SHAPE}",
    "env": "the launch script sets one environment for every task; set env at the top level",
    # and each backend's section, in the words of its registry entry (section_reason)
    "variants": "variants do not nest",
    "array_parallelism": "it applies to the whole array; set it at the top level",
}
OVERLAP = ("{outer} is also set, and a mapping replaces the whole section; put {key} inside the {outer} "
           "mapping, or set single fields with dotted keys only")
OUTPUT_URI = "each variant writes to <output.uri>/<variant> by itself; set output.uri at the top level"


def section_reason(head: str) -> str | None:
    """Why a variant may not change the section ``head`` of a backend (ftcluster.spec.registry), or None."""
    for e in entries(plugins=False):  # a plugin cannot add a section to the schema
        if e.section == head:
            return e.variants_note or f"{e.name} settings are shared by every variant; set {head} at the top level"
    return None


def fixed_reason(key: str, value: Any) -> str | None:
    """Why a variant may not set ``key`` (a dotted path), or None when it may."""
    head = key.split(".", 1)[0]
    if head in FIXED:
        return FIXED[head]
    if (why := section_reason(head)) is not None:
        return why
    if key == "output.uri" or (key == "output" and isinstance(value, dict) and "uri" in value):
        return OUTPUT_URI
    return None


def set_dotted(data: dict[str, Any], key: str, value: Any) -> str | None:
    """Set the field ``key`` (``a.b.c``, ``a.list[0]``) in nested data, creating missing mappings;
    returns a problem text or None."""
    path = parse_key(key)
    if not path:
        return f"{key!r} is not a field path; write dotted names such as lora.r (list items as lora.target_modules[0])"
    return set_path(data, path, copy.deepcopy(value))


def overlap(keys: list[str]) -> dict[str, str]:
    """Keys that another key of the same ``set`` contains (``lora`` and ``lora.r``): the later would
    silently undo the earlier. Maps each such inner key to its outer one."""
    out = {}
    for key in keys:
        outer = next((k for k in keys if key.startswith((k + ".", k + "["))), None)
        if outer:
            out[key] = outer
    return out


def variant_uri(base: str, variant: str) -> str:
    """Where a variant writes: ``<output.uri>/<variant>``."""
    from ..storage.layout import OutputLayout

    return OutputLayout(base).variant(variant).root


def locate(doc: LoadedDoc, prefix: tuple[Any, ...], sets: dict[str, Any], path: tuple[Any, ...], msg: str,
           label: str) -> Problem:
    """Place a problem found in a spec built from ``sets`` overrides at the override that caused it.

    ``prefix`` is where the overrides live in ``doc`` (e.g. ``("variants", 1)``). A problem on
    a field the overrides set (or inside it) points at that key; one on a section the
    overrides change points at the key too; anything else (a check across fields) points at
    the ``prefix`` item and names the resolved field.
    """
    if doc.is_overridden(path):  # set on the command line (after the overrides): --set has the last word
        return problem_at(doc, path, f"{label}: {msg}")
    keys = [(parse_key(k) or (k,), k) for k in sets]
    if path:
        for parts, key in keys:
            if path[: len(parts)] == parts:
                return problem_at(doc, prefix + ("set", key) + path[len(parts):], msg)
        for parts, key in keys:
            if parts[: len(path)] == path:
                return problem_at(doc, prefix + ("set", key), f"{dotted_path(path)}: {msg}")
        return problem_at(doc, prefix, f"{label}: {dotted_path(path)}: {msg}")
    return problem_at(doc, prefix, f"{label}: {msg}")


def resolve_variants(spec: Any, doc: LoadedDoc | None = None) -> tuple[Any, ...]:
    """The resolved, validated spec of every variant of ``spec`` (empty when it has none).

    ``doc`` is the YAML the spec came from, for file:line:column in problems; without it
    (a spec built in Python) problems name the field only. Cached on the spec.
    Raises :class:`~ftcluster.errors.SpecError` listing every problem of every variant.
    """
    if spec._resolved is not None:
        return spec._resolved
    if not spec.variants:
        return ()
    if doc is None:
        doc = LoadedDoc(data=spec.model_dump(mode="json"), source=spec._source_file or "<spec>")
    base = {k: v for k, v in doc.data.items() if k not in ("variants", "array_parallelism")}
    problems: list[Problem] = []
    resolved = []
    seen: dict[str, int] = {}
    for i, variant in enumerate(spec.variants):
        found, vspec = _resolve_one(spec, doc, base, i, variant, seen)
        problems += found
        if vspec is not None:
            resolved.append(vspec)
    if problems:
        raise SpecError(sort_unique(problems, doc.source))
    spec._resolved = tuple(resolved)
    return spec._resolved


def _resolve_one(spec: Any, doc: LoadedDoc, base: dict[str, Any], i: int, variant: Any,
                 seen: dict[str, int]) -> tuple[list[Problem], Any]:
    from pydantic import ValidationError

    from .schema import job_adapter

    where = ("variants", i)
    label = f"variant {variant.name!r}"
    problems: list[Problem] = []
    if variant.name in seen:
        problems.append(problem_at(doc, where + ("name",), f"{variant.name!r} is already the name of variants[{seen[variant.name]}]; "
                                                           "give every variant its own name"))
    seen.setdefault(variant.name, i)
    full = f"{spec.name}-{variant.name}"
    if len(full) > NAME_LIMIT:
        problems.append(problem_at(doc, where + ("name",), f"the variant's job name {full!r} has {len(full)} characters, more than "
                                                           f"{NAME_LIMIT}; shorten the variant name or the job name"))
    data = copy.deepcopy(base)
    applied = {}
    nested = overlap(list(variant.set))
    for key, value in variant.set.items():
        why = fixed_reason(key, value)
        err = OVERLAP.format(key=key, outer=nested[key]) if key in nested else None
        err = err or (None if why else set_dotted(data, key, value))
        msg = f"cannot vary within one array: {why}" if why else err
        if msg:  # not applied; the other overrides are still checked
            problems.append(problem_at(doc, where + ("set", key), msg))
        else:
            applied[key] = value
    folders = _rebase_sets(spec, data, applied)
    problems += _reapply_command_line(doc, data, i, applied, label)
    data["name"] = full
    if isinstance(data.get("output"), dict):
        data["output"]["uri"] = variant_uri(spec.output.uri, variant.name)
    try:
        vspec = job_adapter().validate_python(data)
    except ValidationError as exc:
        problems += [locate(doc, where, applied, path, msg, label) for path, msg in validation_messages(exc, data)
                     if not (path == ("name",) and len(full) > NAME_LIMIT)]
        return problems, None
    if problems:
        return problems, None
    from .relpaths import runs_here
    from .terms import inline_terms

    terms = inline_terms(vspec, doc, here=runs_here(vspec.backend, vspec))  # the base's list, or the variant's file
    if terms is not None:
        if "tokenizer.add_tokens" in applied and terms.file == doc.source:  # at the variant's value
            terms = problem_at(doc, where + ("set", "tokenizer.add_tokens"), f"{label}: {terms.message}")
        return [terms], None
    vspec._source_file, vspec._overrides, vspec._variant = spec._source_file, spec._overrides, variant.name
    vspec._path_folders = {**spec._path_folders, **folders}
    changed = _env_change(spec, vspec)
    if changed:
        return [problem_at(doc, where, f"{label}: changes the environment every array task shares ({changed}); use the same "
                                       "kind of model and tokenizer source (path or hub_id) in every variant, or make it a "
                                       "separate job")], None
    return [], vspec


def _rebase_sets(spec: Any, data: dict[str, Any], applied: dict[str, Any]) -> dict[str, str]:
    """A variant's ``set`` is in the spec file: its relative paths are relative to the file's folder, like the
    spec's own (ftcluster.spec.relpaths; those are rewritten in ``data`` already). Before the command line's values."""
    from .relpaths import rebase_data, spec_folder

    folder = spec_folder(spec._source_file or "<spec>")
    keys = [parse_key(k) or (k,) for k in applied]

    def folder_of(path: tuple[str, ...]) -> str | None:
        return folder if any(path[: len(k)] == k for k in keys) else None

    return rebase_data(data, folder_of)


def _reapply_command_line(doc: LoadedDoc, data: dict[str, Any], i: int, applied: dict[str, Any],
                          label: str) -> list[Problem]:
    """The command line has the last word: apply the ``--set`` overrides again, in order, over the
    variant's ``set`` (they are in the shared spec already, but the variant may have set the same
    field). ``--set variants[i].KEY`` is a key of this variant's ``set``."""
    problems = []
    for path, value, _ in doc.applied:
        if path[:3] == ("variants", i, "set") and len(path) == 4 and path[3] in applied:
            err = set_dotted(data, path[3], value)
        elif path[0] not in ("variants", "array_parallelism"):
            err = set_path(data, path, copy.deepcopy(value))
        else:
            continue
        if err:
            problems.append(Problem("--set", None, None, dotted_path(path), f"{label}: {err}"))
    return problems


def _env_change(spec: Any, vspec: Any) -> str:
    a, b = build_env(spec), build_env(vspec)
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k, 'unset')} -> {b.get(k, 'unset')}" for k in diff)
