"""Pipelines: several job specs submitted as one, each stage after the stages it depends on.

The hybrid pattern as one submission: a full continual pre-training run, then LoRA adapters
trained on the model it produces::

    pipeline: cpt-then-lora
    stages:
      - {name: cpt, spec: full-slurm-2node.yaml}
      - {name: adapters, spec: lora-variants-slurm.yaml, model_from: cpt}

``model_from`` points a stage's ``model.path`` at what an earlier stage publishes
(``<output.uri>/final`` for a full fine-tune, ``<output.uri>/merged`` for LoRA with
``merge_at_end``) and implies ``after``. Loading checks every stage spec (with its ``set``
overrides and the CLI's ``--set``, which applies to every stage) and the links between
stages; problems point at the pipeline file's line, or at the stage file's. Pure: rendering
lives in :mod:`ftcluster.render.pipeline`, the Slurm submission in :mod:`ftcluster.backends.pipeline`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Problem, SpecError
from .problems import problem_at, sort_unique, validation_messages
from .yamlio import LoadedDoc, apply_overrides, load_file, parse_key

PIPELINE_KEYS = ("pipeline", "stages")


@dataclass
class Stage:
    """One validated stage: its job spec (with overrides and model_from applied) and its links."""

    name: str
    spec: Any
    after: tuple[str, ...]
    model_from: str | None
    spec_file: str
    sets: dict[str, Any] = field(default_factory=dict)  # the stage's own `set`, as applied
    run: str = "train"  # or "prepare-data": the job tokenizes the spec's data.prepare.source into data.train

    @property
    def prepares(self) -> bool:
        return self.run == "prepare-data"


@dataclass
class Pipeline:
    """A validated pipeline: stages in submission order (each after the ones it depends on)."""

    name: str
    source: str
    stages: list[Stage]
    overrides: tuple[str, ...] = ()
    description: str | None = None

    @property
    def backend(self) -> str:
        return self.stages[0].spec.backend

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def is_pipeline(data: dict[str, Any]) -> bool:
    """A pipeline file has ``pipeline:`` or ``stages:`` at the top; a job spec has neither."""
    return any(k in data for k in PIPELINE_KEYS)


def load(path: str | Path, overrides: list[str] | None = None):
    """Load a job spec or a pipeline file (told apart by a top-level ``pipeline:`` key)."""
    from .loader import validate_doc

    doc = load_file(path)
    if is_pipeline(doc.data):
        return load_pipeline_doc(doc, overrides)
    if overrides:
        apply_overrides(doc, list(overrides))
    return validate_doc(doc, overrides)


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> Pipeline:
    """Load and check a pipeline file and every stage spec it names; raises SpecError with every problem."""
    return load_pipeline_doc(load_file(path), overrides)


def model_source(spec: Any) -> tuple[str | None, str]:
    """(URI of the model a stage publishes, or None; why not)."""
    if spec.variants:
        names = ", ".join(v.name for v in spec.variants)
        return None, (f"it has variants ({names}), so it publishes one model per variant; model_from needs "
                      "a stage that produces one model")
    from ..storage.layout import OutputLayout

    if spec.method == "full":
        return OutputLayout(spec.output.uri).artifact("final"), ""
    if spec.lora.merge_at_end:
        return OutputLayout(spec.output.uri).artifact("merged"), ""
    return None, "it is a LoRA run that publishes only an adapter; set lora.merge_at_end: true in that stage"


def load_pipeline_doc(doc: LoadedDoc, overrides: list[str] | None = None) -> Pipeline:
    """Check a parsed pipeline document and load its stages."""
    from pydantic import ValidationError

    from .schema import PipelineSpec

    try:
        ps = PipelineSpec.model_validate(doc.data)
    except ValidationError as exc:
        raise SpecError(sort_unique([problem_at(doc, p, m) for p, m in validation_messages(exc, doc.data, PipelineSpec)],
                                    doc.source)) from None
    base_dir = Path(doc.source).parent
    problems: list[Problem] = []
    stages: list[Stage] = []
    for i, st in enumerate(ps.stages):
        stage, found = _load_stage(doc, i, st, stages, list(overrides or ()), base_dir)
        problems += found
        if stage is not None:
            problems += _check_links(doc, i, stage, stages)
            stages.append(stage)
    if problems:
        raise SpecError(sort_unique(problems, doc.source))
    return Pipeline(ps.pipeline, doc.source, stages, tuple(overrides or ()), ps.description)


def _load_stage(doc: LoadedDoc, i: int, st: Any, done: list[Stage], overrides: list[str],
                base_dir: Path) -> tuple[Stage | None, list[Problem]]:
    from .loader import validate_doc
    from .relpaths import spec_folder
    from .variants import OVERLAP, locate, overlap, set_dotted

    where = ("stages", i)
    file = st.spec if os.path.isabs(st.spec) else os.path.normpath(base_dir / st.spec)
    if not Path(file).is_file():
        return None, [problem_at(doc, where + ("spec",), f"{file}: no such file; the path is relative to the pipeline file")]
    try:
        sdoc = load_file(file)
        if is_pipeline(sdoc.data):
            return None, [problem_at(doc, where + ("spec",), f"{file} is a pipeline; a stage names a job spec")]
    except SpecError as err:
        return None, err.problems
    problems: list[Problem] = []
    applied: dict[str, Any] = {}
    nested = overlap(list(st.set))
    for key, value in st.set.items():  # spec file < the stage's set (and model_from) < --set
        err = OVERLAP.format(key=key, outer=nested[key]) if key in nested else set_dotted(sdoc.data, key, value)
        if err:
            problems.append(problem_at(doc, where + ("set", key), err))
        else:
            applied[key] = value
    label = f"stage {st.name or sdoc.data.get('name')!r}"
    if st.model_from:
        upstream = next((s for s in done if s.name == st.model_from), None)
        uri, why = model_source(upstream.spec) if upstream else (None, "")
        if upstream is not None and upstream.prepares:
            uri, why = None, "it prepares a corpus (run: prepare-data) and trains no model"
        if why:
            problems.append(problem_at(doc, where + ("model_from",), f"cannot take the model of stage {st.model_from!r}: {why}"))
        elif uri and upstream is not None:
            _point_model_at(sdoc.data, uri, upstream.spec.output.storage_options)
    if overrides:
        try:
            apply_overrides(sdoc, overrides)
        except SpecError as err:
            return None, problems + err.problems

    def relocate(path: tuple[Any, ...], msg: str) -> Problem | None:
        if sdoc.is_overridden(path):  # the command line's --set has the last word: the problem is there
            return None
        keys = [parse_key(k) or (k,) for k in applied]
        if path and any(path[: len(k)] == k or k[: len(path)] == path for k in keys):
            return locate(doc, where, applied, path, msg, label)
        if st.model_from and path[:1] == ("model",):
            return problem_at(doc, where + ("model_from",), f"model: {msg}")
        return None

    def folder_of(path: tuple[Any, ...]) -> str | None:
        """Stage spec values are relative to the stage file, its ``set`` to the pipeline file, and
        model_from's model (the upstream's output, rewritten already) and --set to the cwd."""
        if sdoc.is_overridden(path) or (st.model_from and path[:1] == ("model",)):
            return None
        if any(path[: len(k)] == k for k in (parse_key(k) or (k,) for k in applied)):
            return spec_folder(doc.source)
        return spec_folder(file)

    try:
        spec = validate_doc(sdoc, overrides, relocate, folder_of)
    except SpecError as err:
        return None, problems + err.problems
    if problems:
        return None, problems
    name = st.name or spec.name
    if st.run == "prepare-data" and spec.data.prepare is None:
        return None, [problem_at(doc, where + ("run",), f"{file} has no data.prepare: add data.prepare.source (the raw "
                                                     "corpus to tokenize into data.train), or drop `run: prepare-data`")]
    # A stage training on a corpus an earlier stage prepares waits for it, as model_from implies `after`.
    preparers = [s.name for s in done if s.prepares and s.spec.data.train == spec.data.train] \
        if st.run == "train" else []
    if preparers or st.run == "prepare-data":
        spec._corpus_from = preparers[-1] if preparers else name
    deps: list[str] = [*st.after, *([st.model_from] if st.model_from else []), *preparers]
    after = tuple(dict.fromkeys(deps))
    return Stage(name, spec, after, st.model_from, file, applied, st.run), []


def precedence(spec: Any, stage: Stage | None = None, pipeline_file: str | None = None) -> list[str]:
    """Which settings a job is built from, each over the ones before (``submit --dry-run`` prints them):
    spec file < the pipeline stage's ``set`` < each variant's ``set`` < every ``--set``, in order."""
    lines = ["settings, each over the ones before it:", f"  spec file {spec._source_file or '<spec>'}"]
    if stage is not None and (stage.sets or stage.model_from):
        keys = [*stage.sets, *(["model.path (model_from)"] if stage.model_from else [])]
        lines.append(f"  stage {stage.name} in {pipeline_file}: set {', '.join(keys)}")
    if any(v.set for v in spec.variants):
        lines.append("  each variant's set: " + "; ".join(f"{v.name}: {', '.join(v.set) or '-'}" for v in spec.variants))
    lines += [f"  --set {item}" for item in spec._overrides]
    return lines


def _point_model_at(data: dict[str, Any], uri: str, storage_options: dict[str, Any]) -> None:
    """model.path = ``uri``; the stage's other model sources go; the upstream's storage options carry over."""
    model = data.get("model")
    if not isinstance(model, dict):
        model = {}
    for key in ("hub_id", "revision", "random_init"):
        model.pop(key, None)
    model["path"] = uri
    if not model.get("storage_options") and storage_options:
        model["storage_options"] = dict(storage_options)
    data["model"] = model
    tok = data.get("tokenizer")
    if isinstance(tok, dict):  # the upstream model's own tokenizer (added tokens included), not a new one
        tok.pop("train_vocab_size", None)


def _check_links(doc: LoadedDoc, i: int, stage: Stage, done: list[Stage]) -> list[Problem]:
    """Names unique, dependencies on earlier stages only, one backend, one output folder per stage."""
    from .variants import resolve_variants

    where = ("stages", i)
    has_name = "name" in doc.data["stages"][i]
    problems = []
    earlier = {s.name: s for s in done}
    if stage.name in earlier:
        problems.append(problem_at(doc, where + (("name",) if has_name else ("spec",)),
                                   f"stage name {stage.name!r} is taken by an earlier stage; give this stage its own `name:`"))
    listed = doc.data["stages"][i].get("after") or []
    for j, ref in enumerate(stage.after):
        if ref not in earlier:
            field = ("after", j) if ref in listed else ("model_from",)
            known = ", ".join(earlier) or "none"
            problems.append(problem_at(doc, where + field, f"no earlier stage is named {ref!r} (earlier stages: {known}); "
                                                           "a stage can wait only for stages listed before it"))
    if done and stage.spec.backend != done[0].spec.backend:
        problems.append(problem_at(doc, where + ("spec",), f"this stage runs on backend {stage.spec.backend} but stage "
                                                           f"{done[0].name!r} on {done[0].spec.backend}; a pipeline runs on "
                                                           "one backend: set the same backend in every stage spec"))
    mine = [] if stage.prepares else [stage.spec.output.uri] + [v.output.uri for v in resolve_variants(stage.spec)]
    for other in (d for d in done if not d.prepares):
        theirs = {other.spec.output.uri} | {v.output.uri for v in resolve_variants(other.spec)}
        clash = [u for u in mine if u in theirs]
        if clash:
            hint = ("; --set output.uri applies to every stage, so set it in each stage's `set` instead"
                    if any(o.partition("=")[0].strip().startswith("output") for o in stage.spec._overrides) else "")
            problems.append(problem_at(doc, where + ("spec",), f"writes to {clash[0]}, as stage {other.name!r} does; give "
                                                               f"each stage its own output.uri (in its spec or its `set`){hint}"))
    return problems


def pipeline_json_schema() -> dict[str, Any]:
    """The JSON Schema of a pipeline file, generated from :class:`~ftcluster.spec.schema.PipelineSpec`."""
    from .schema import PipelineSpec

    schema = PipelineSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "ftcluster pipeline"
    return schema


def describe(pipe: Pipeline) -> str:
    """One line for ``ftcluster validate``."""
    parts = []
    for s in pipe.stages:
        r = s.spec.resources
        if s.prepares:
            tasks = s.spec.data.prepare.tasks
            parts.append(f"{s.name} (prepare-data, {tasks} task{'s' if tasks > 1 else ''}"
                         + (f", after {','.join(s.after)})" if s.after else ")"))
            continue
        bits = [f"{s.spec.method}", f"{r.nodes}x{r.nproc_per_node}"]
        if s.spec.variants:
            bits.append(f"{len(s.spec.variants)} variants")
        if s.after:
            bits.append(f"after {','.join(s.after)}")
        if s.model_from:
            bits.append(f"model from {s.model_from}")
        parts.append(f"{s.name} ({', '.join(bits)})")
    return f"pipeline {pipe.name}, backend {pipe.backend}: " + " -> ".join(parts)
