"""Assemble a plan: the spec's own layout, the alternatives, and a recommendation."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ...errors import FtclusterError
from .. import speedups as speedup_rules
from ..engines import ENGINES, engine_for, engine_for_method
from ..facts import global_batch
from ..speedups import Speedups
from .data import DataEstimate, estimate_tokens, sequences
from .gpus import STAND_IN, Gpu, load_gpus, normalise, spec_gpu
from .layout import Layout, Workload
from .memory import Memory, host_bytes_per_node, per_gpu_memory, usable_bytes, zero3_keeps
from .shape import ModelShape, count_lora, spec_shape
from .speed import step_seconds

WORLDS = ((1, 1), (1, 2), (1, 4), (1, 8), (2, 8), (4, 8), (8, 8), (16, 8))
MICRO_BATCHES = (1, 2, 4, 8, 16)
LARGE_CORPUS_TOKENS = 100_000_000  # text corpora above this are continual pre-training, not style/domain tuning
DEFAULT_GPU = "h100"


@dataclass
class Option:
    """One layout, evaluated."""

    layout: Layout
    memory: Memory
    gpu_memory: int
    usable: int
    params_total: int
    params_trainable: int
    step_time_s: float
    tokens_per_step: int
    steps: int | None
    price_per_hour: float
    host_bytes_per_node: int = 0

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.usable

    @property
    def run_time_s(self) -> float | None:
        return None if self.steps is None else self.steps * self.step_time_s

    @property
    def cost_usd(self) -> float | None:
        t = self.run_time_s
        return None if t is None else t / 3600 * self.layout.world * self.price_per_hour

    @property
    def usd_per_million_tokens(self) -> float:
        return self.step_time_s / 3600 * self.layout.world * self.price_per_hour * 1e6 / self.tokens_per_step


@dataclass
class Plan:
    """Everything ``ftcluster plan`` reports for one job spec."""

    name: str
    shape: ModelShape
    gpu: Gpu
    gpu_assumed: bool
    data: DataEstimate
    requested: Option
    alternatives: list[Option]
    recommendation: Option | None
    reason: str
    notes: list[str] = field(default_factory=list)
    change: str = ""  # how to turn the spec into the recommendation: --set flags (:func:`change_text`)


@dataclass(frozen=True)
class MemoryModel:
    """How the planner models a training engine (an engine recipe names one by its
    ``memory_model``; ``Layout.method`` is its name): which parameters train and the ZeRO
    layouts (stage, offload optimizer, offload parameters) it tries."""

    name: str
    trains: str  # "all" parameters, or an "adapter" on a frozen base
    zero_choices: tuple[tuple[int | None, bool, bool], ...]

    @property
    def has_zero(self) -> bool:
        return any(stage is not None for stage, _, _ in self.zero_choices)


MEMORY_MODELS: dict[str, MemoryModel] = {
    "lora": MemoryModel("lora", "adapter", ((None, False, False),)),
    "full": MemoryModel("full", "all", ((0, False, False), (1, False, False), (2, False, False), (3, False, False),
                                        (2, True, False), (3, True, False), (3, True, True))),
}


def memory_model_of(spec: Any) -> str:
    """The planner's memory model for ``spec``: its engine recipe's (``EngineRecipe.planner_model``)."""
    return engine_for(spec).planner_model


def planned_models() -> list[str]:
    """The memory models the planner compares: one per registered engine, in registration order."""
    return list(dict.fromkeys(r.planner_model for r in ENGINES.values()))


def speedups_of(spec: Any, shape: ModelShape, fused_ce: bool | None = None,
                decided: Speedups | None = None) -> tuple[bool, bool]:
    """(fused_ce, zero3_keep) as the runtime will choose them (:mod:`ftcluster.plan.speedups`, which
    the runtime imports): the fused loss for a Llama model on a GPU unless the spec's env sets
    FTCLUSTER_FUSED_CE=0 (the planner assumes liger-kernel is installed where the job runs;
    ``fused_ce`` overrides); ZeRO-3 keep unless FTCLUSTER_ZERO3_KEEP=0 or a DeepSpeed config_file
    (whose keys win) is given. ``decided`` is the launch plan's decision (``plan.speedups``);
    without one it is decided here by the same function."""
    decided = decided or speedup_rules.decide(spec)
    if fused_ce is None:
        fused_ce = decided.fused_ce_for(shape.model_type)
    return bool(fused_ce), decided.zero3_keep


def varlen_of(spec: Any, decided: Speedups | None = None) -> bool:
    """The runtime's variable-length attention (:func:`ftcluster.plan.speedups.varlen_on`): on a GPU
    for an SDPA model unless the spec's env sets FTCLUSTER_VARLEN=0. It is FlashAttention-2's varlen
    kernel, so the planner models it as ``flash_attention_2`` (causal work, GQA's key/values kept,
    no mask); per-example attention does less work still, which the planner leaves out (it does not
    know the lengths)."""
    return (decided or speedup_rules.decide(spec)).varlen


def engine_settings(spec: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Layout keywords, Workload keywords) from the spec's engine section, as its recipe reads it
    (``EngineRecipe.planner_settings``): ZeRO stage and offload, LoRA rank and targets, ..."""
    settings = engine_for(spec).planner_settings(spec)
    layout_keys = {f.name for f in fields(Layout)}
    return ({k: v for k, v in settings.items() if k in layout_keys},
            {k: v for k, v in settings.items() if k not in layout_keys})


def workload_of(spec: Any, shape: ModelShape, fused_ce: bool | None = None, launch: Any = None) -> Workload:
    """The workload of ``spec``; ``launch`` (its :class:`~ftcluster.plan.launch.LaunchPlan`) gives the
    global batch and the speed-up decisions, else they are computed by the same functions."""
    tr = spec.training
    decided = launch.speedups if launch is not None else speedup_rules.decide(spec)
    fused, keep = speedups_of(spec, shape, fused_ce, decided)
    return Workload(shape=shape, seq_len=spec.data.seq_len, precision=tr.precision,
                    attn_implementation="flash_attention_2" if decided.varlen else spec.model.attn_implementation,
                    global_batch=launch.global_batch if launch is not None else global_batch(spec),
                    fused_ce=fused, zero3_keep=keep,
                    compiled=decided.compile_for(shape.model_type, getattr(tr, "compile", False)),
                    **engine_settings(spec)[1])


def requested_layout(spec: Any, gpu: str, memory_model: str | None = None) -> Layout:
    r, tr = spec.resources, spec.training
    return Layout(method=memory_model or memory_model_of(spec), nodes=r.nodes, gpus_per_node=r.nproc_per_node,
                  micro_batch_size=tr.micro_batch_size, gradient_accumulation_steps=tr.gradient_accumulation_steps,
                  gradient_checkpointing=tr.gradient_checkpointing, gpu=gpu, **engine_settings(spec)[0])


def resolve_gpu(spec: Any, override: str | Gpu | None, table: dict[str, Gpu]) -> tuple[Gpu, bool]:
    """The GPU to plan for: --gpu (a name, or the :class:`Gpu` itself), else resources.gpu_type (with
    resources.gpu_memory_gb when given: :func:`~.gpus.spec_gpu`), else the default (assumed)."""
    if isinstance(override, Gpu):
        return override, False
    if override is None:
        r = spec.resources
        g = spec_gpu(r.gpu_type, getattr(r, "gpu_memory_gb", None), table)
        if g is not None:
            return g, False
    raw = override or spec.resources.gpu_type
    if raw is None:
        return table[DEFAULT_GPU], True
    name = normalise(raw)
    if name not in table:
        raise FtclusterError(f"GPU type {raw!r} is not in the planner's table ({', '.join(sorted(table))}); "
                             "give its memory in resources.gpu_memory_gb, add it to the price file (memory_gb, "
                             "bf16_tflops, price_per_hour) or pass --gpu")
    return table[name], False


class Evaluator:
    """Evaluates layouts of one workload on one GPU type."""

    def __init__(self, w: Workload, gpu: Gpu, spec: Any, seqs: int | None, lora_cfg: tuple[int, Any, float]):
        self.w, self.gpu, self.spec, self.seqs = w, gpu, spec, seqs
        base = w.shape.total_params()
        r, targets, dropout = lora_cfg
        self.lora_w = _replace(w, lora_r=r, lora_targets=targets, lora_dropout=dropout)
        c = count_lora(w.shape, r, targets if isinstance(targets, str) else list(targets), w.modules_to_save,
                       w.added_tokens)
        adapter = (base + c.trainable, c.trainable, c.adapter, c.saved_copies)
        self.counts = {name: (base, base, 0, 0) if m.trains == "all" else adapter for name, m in MEMORY_MODELS.items()}

    def steps(self, lay: Layout) -> int | None:
        tr = self.spec.training
        if tr.max_steps:
            return tr.max_steps
        if self.seqs is None:
            return None
        per_epoch = self.seqs // (lay.micro_batch_size * lay.world)
        return max(1, math.ceil(tr.epochs * per_epoch / lay.gradient_accumulation_steps))

    def evaluate(self, lay: Layout) -> Option:
        w = self.lora_w if MEMORY_MODELS[lay.method].trains == "adapter" else self.w
        total, trainable, adapter, copies = self.counts[lay.method]
        keep = zero3_keeps(w, lay, total, self.gpu.memory_bytes)
        mem = per_gpu_memory(w, lay, total, trainable, adapter, copies, keep=keep)
        step = step_seconds(w, lay, self.gpu, total, trainable, keep=keep)
        return Option(lay, mem, self.gpu.memory_bytes, usable_bytes(self.gpu.memory_bytes, lay.world), total,
                      trainable, step, lay.micro_batch_size * lay.gradient_accumulation_steps * lay.world * w.seq_len,
                      self.steps(lay), self.gpu.price_per_hour, host_bytes_per_node(total, lay, w.act_bytes))

    def least_recompute(self, o: Option) -> Option:
        """``o`` (checkpointing every layer, fitting) with the smallest share of layers, in
        eighths, that still fits: selective checkpointing recomputes only what memory needs.
        (No checkpointing at all is a candidate of its own.)"""
        if o.layout.gradient_checkpointing < 1 or not o.fits:
            return o
        for eighths in range(1, 8):
            selective = self.evaluate(o.layout.with_(gradient_checkpointing=eighths / 8))
            if selective.fits:
                return selective
        return o

    def options(self, method: str, req: Layout) -> list[Option]:
        """Every candidate of ``method`` evaluated, checkpointing refined to the least share that fits."""
        return [self.least_recompute(self.evaluate(lay)) for lay in self.candidates(method, req)]

    def candidates(self, method: str, req: Layout) -> list[Layout]:
        """Layouts of ``method`` that keep the global batch (micro-batch x accumulation x GPUs)."""
        worlds = list(WORLDS)
        if (req.nodes, req.gpus_per_node) not in worlds:
            worlds.append((req.nodes, req.gpus_per_node))
        zero = MEMORY_MODELS[method].zero_choices
        if method == req.method and req.engine == "fsdp":  # FSDP2 shards everything: ZeRO-3 or ZeRO-2's memory
            zero = tuple(z for z in zero if z[0] in (2, 3))
        out = []
        gb = self.w.global_batch
        for nodes, gpn in worlds:
            world = nodes * gpn
            for mb in sorted(set(MICRO_BATCHES) | {req.micro_batch_size}):
                if mb * world > max(gb, world):  # more sequences per step than the job asks for
                    continue
                accum = max(1, round(gb / (mb * world)))
                for ckpt in (True, False):
                    for stage, off_o, off_p in zero:
                        out.append(Layout(method, nodes, gpn, mb, accum, ckpt, stage, off_o, off_p, self.gpu.name,
                                          req.engine if method == req.method else "deepspeed"))
        return out


def _cheapest(options: list[Option]) -> Option | None:
    fitting = [o for o in options if o.fits]
    if not fitting:
        return None
    return min(fitting, key=lambda o: (round(o.usd_per_million_tokens, 6), o.layout.world, o.memory.total))


def pick(options: list[Option], req: Layout) -> Option | None:
    """The layout to suggest: the cheapest that fits on the GPUs the spec asks for (the user chose
    them; cost per token barely changes with the count), else the cheapest on the fewest GPUs."""
    same = [o for o in options if (o.layout.nodes, o.layout.gpus_per_node) == (req.nodes, req.gpus_per_node)]
    best = _cheapest(same)
    if best is not None:
        return best
    fitting = [o for o in options if o.fits]
    if not fitting:
        return None
    fewest = min(o.layout.world for o in fitting)
    return _cheapest([o for o in fitting if o.layout.world == fewest])


def intent(spec: Any, data: DataEstimate, variant_formats: list[str]) -> tuple[str, str]:
    """('lora' | 'full' | 'hybrid', why), following common practice."""
    fmt = spec.data.format
    tok = spec.tokenizer
    real_model = spec.model.random_init is None
    if real_model and (tok.path or tok.hub_id or tok.train_vocab_size):
        return "full", "a different tokenizer changes the embeddings, which LoRA leaves frozen: full fine-tuning"
    formats = set(variant_formats) | {fmt}
    if "text" in formats and formats & {"instruction", "chat"}:
        return "hybrid", ("raw text and instruction/chat data in one job: the hybrid pattern, one full run on the "
                          "text, then LoRA adapters for the tasks (see examples/pipeline-cpt-then-lora.yaml)")
    if fmt == "text":
        big = data.tokens is not None and data.tokens >= LARGE_CORPUS_TOKENS
        if big or (data.tokens is None and spec.method == "full"):
            size = f"{data.tokens / 1e9:.1f}B-token " if data.tokens else ""
            return "full", f"continual pre-training on a large {size}text corpus (knowledge injection): full fine-tuning"
        size = f"{data.tokens / 1e6:.1f}M tokens of " if data.tokens else ""
        return "lora", (f"domain/style tuning on {size}text: LoRA is enough; choose full fine-tuning if the "
                        "point is to inject new knowledge")
    return "lora", f"{fmt} tuning: LoRA is the usual choice (quality close to full fine-tuning at a fraction of the memory)"


def _fmt_gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def build_plan(spec: Any, *, gpu: str | Gpu | None = None, price: float | None = None, network: bool = True,
               count_data: bool = True, alternatives: bool = True, shape: ModelShape | None = None,
               fused_ce: bool | None = None, launch: Any = None) -> Plan:
    """Plan a job spec. ``network`` allows reading a remote config.json and listing remote data;
    ``shape`` gives the model's shape when the spec cannot (a pipeline stage's model_from);
    ``fused_ce`` overrides whether the runtime's fused loss is assumed (:func:`speedups_of`).
    ``launch`` is the spec's launch plan (compiled here when not given): the global batch, the
    speed-up decisions and the engine are read from it."""
    if launch is None:
        from ..launch import compile_plan

        launch = compile_plan(spec)
    shape = shape or spec_shape(spec, network=network)
    if shape is None:
        where = spec.model.path or spec.model.hub_id
        raise FtclusterError(f"model: cannot read the model's shape from {where!r} (no config.json there or "
                             "offline, and not a model the planner knows by name); put config.json in reach "
                             "or use model.random_init")
    table = load_gpus()
    g, assumed = resolve_gpu(spec, gpu, table)
    if price is not None:
        g = _replace_gpu(g, price)
    data = (estimate_tokens(spec.data, spec.tokenizer.train_vocab_size, network=network) if count_data
            else DataEstimate(None, None, "not counted"))
    seqs = sequences(data, spec.data.seq_len, spec.data.packing)
    w = workload_of(spec, shape, fused_ce, launch)
    if spec.data.packing and w.attn_implementation == "flash_attention_2":
        w = replace(w, attention_span=data.attention_span(spec.data.seq_len))
    ev = Evaluator(w, g, spec, seqs, (w.lora_r, w.lora_targets, w.lora_dropout))
    req_layout = requested_layout(spec, g.name, launch.recipe.planner_model)
    req = ev.evaluate(req_layout)
    notes = list(shape.notes)
    if assumed:
        notes.append(f"no resources.gpu_type: planned for {g.name}; pass --gpu to choose")
    elif gpu is None and spec.resources.gpu_memory_gb is not None and (
            spec.resources.gpu_type is None or normalise(spec.resources.gpu_type) not in table):
        notes.append(f"{g.name}: memory from resources.gpu_memory_gb, speed and price of {STAND_IN} assumed "
                     "(add the type to the price file for its own)")
    if w.fused_ce and fused_ce is None:
        notes.append("assumes the runtime's fused linear cross-entropy (liger-kernel installed where the job runs); "
                     "without it set env FTCLUSTER_FUSED_CE: '0' or pass --fused-ce off")
    if getattr(spec.training, "fp8", None):
        notes.append(f"training.fp8 ({spec.training.fp8}) is not modelled: memory and step time here are bf16's "
                     "(float8 casts keep bf16 weights; their speed-up is not measured here yet)")
    if w.compiled:
        notes.append("compiled decoder layers (training.compile) modelled from measured runs: their activations as "
                     "with fused kernels; their compute 1.25x faster for LoRA, 1.14x for FSDP2, unchanged for "
                     "DeepSpeed ZeRO-0/1/2 (docs/planner.md)")
    if spec.resources.gpus_per_node == 0:
        notes.append("a CPU-only job: memory is compared with a GPU's only to show what GPUs it would need")
    if not alternatives:
        return Plan(spec.name, shape, g, assumed, data, req, [], None, "", notes)
    variant_formats = [v.data.format for v in (getattr(spec, "_resolved", None) or ())]
    method, why = intent(spec, data, variant_formats)
    every = {m: ev.options(m, req_layout) for m in planned_models()}
    alts = _curate(req, every, ev)
    chosen_method = "full" if method == "hybrid" else method
    rec = pick(every[chosen_method], req_layout)
    if rec is None:
        other = "full" if chosen_method == "lora" else "lora"
        rec = pick(every[other], req_layout)
        why += f"; but no {chosen_method} layout fits on {g.name}, so {other}"
    return Plan(spec.name, shape, g, assumed, data, req, alts, rec, why, notes,
                change_text(spec, rec.layout) if rec is not None else "")


def stage_specs(spec: Any, network: bool = False) -> list[tuple[Any, ModelShape | None]]:
    """(spec, shape) per job of a job spec or pipeline: a stage with model_from trains the model an
    earlier stage produces, so it has that stage's shape."""
    from ...spec.pipeline import Pipeline

    if not isinstance(spec, Pipeline):
        return [(spec, None)]
    shapes: dict[str, ModelShape | None] = {}
    out = []
    for st in spec.stages:
        if st.prepares:  # tokenizing on CPUs: nothing for the GPU planner
            continue
        shape = shapes.get(st.model_from) if st.model_from else None
        shape = shape or spec_shape(st.spec, network=network)
        shapes[st.name] = shape
        out.append((st.spec, shape))
    return out


def _replace(w: Workload, **kw: Any) -> Workload:
    from dataclasses import replace

    return replace(w, **kw)


def _replace_gpu(g: Gpu, price: float) -> Gpu:
    from dataclasses import replace

    return replace(g, price_per_hour=price)


def _curate(req: Option, every: dict[str, list[Option]], ev: Evaluator) -> list[Option]:
    """A short list: per method the cheapest fitting layout at each GPU count (up to three counts
    that fit), the smallest count's best attempt when nothing fits there, and variations of the
    spec's own layout (checkpointing, micro-batch, ZeRO stage)."""
    chosen: list[Option] = []
    for opts in every.values():
        by_world: dict[tuple[int, int], list[Option]] = {}
        for o in opts:
            by_world.setdefault((o.layout.nodes, o.layout.gpus_per_node), []).append(o)
        fitting_worlds = 0
        for world in sorted(by_world, key=lambda k: (k[0] * k[1], k[0])):
            best = _cheapest(by_world[world])
            if best is None:
                if fitting_worlds == 0 and world == min(by_world, key=lambda k: k[0] * k[1]):
                    chosen.append(min(by_world[world], key=lambda o: o.memory.total))
                continue
            chosen.append(best)
            fitting_worlds += 1
            if fitting_worlds == 3:
                break
    lay = req.layout
    variations = [lay.with_(gradient_checkpointing=0.0 if lay.gradient_checkpointing else 1.0)]
    for mb in (lay.micro_batch_size // 2, lay.micro_batch_size * 2):
        if mb >= 1:
            accum = max(1, round(lay.micro_batch_size * lay.gradient_accumulation_steps / mb))
            variations.append(lay.with_(micro_batch_size=mb, gradient_accumulation_steps=accum))
    if MEMORY_MODELS[lay.method].has_zero:
        stages = (2, 3) if lay.engine == "fsdp" else (0, 1, 2, 3)  # FSDP2: resharding or not
        variations += [lay.with_(zero_stage=s, offload_optimizer=False, offload_params=False)
                       for s in stages if s != lay.zero_stage]
    chosen += [ev.evaluate(v) for v in variations]
    rec = pick(every[lay.method], lay)
    if rec is not None:
        chosen.insert(0, rec)
    seen, out = {req.layout}, [req]
    for o in chosen:
        if o.layout not in seen:
            seen.add(o.layout)
            out.append(o)
    return out


def set_flags(spec: Any, lay: Layout) -> list[str]:
    """``key=value`` overrides (``--set``) that turn ``spec``'s layout into ``lay``: only what differs,
    in spec order (method, resources, training, then the engine's section)."""
    from .layout import spec_value

    r, tr = spec.resources, spec.training
    out: list[str] = []
    if lay.method != memory_model_of(spec):
        out.append(f"method={lay.method}")
    if lay.nodes != r.nodes:
        out.append(f"resources.nodes={lay.nodes}")
    if lay.gpus_per_node != r.nproc_per_node:
        out.append(f"resources.gpus_per_node={lay.gpus_per_node}")
        if r.procs_per_node is not None:
            out.append(f"resources.procs_per_node={lay.gpus_per_node}")
    if lay.micro_batch_size != tr.micro_batch_size:
        out.append(f"training.micro_batch_size={lay.micro_batch_size}")
    if lay.gradient_accumulation_steps != tr.gradient_accumulation_steps:
        out.append(f"training.gradient_accumulation_steps={lay.gradient_accumulation_steps}")
    if float(lay.gradient_checkpointing) != float(tr.gradient_checkpointing):
        v = spec_value(lay.gradient_checkpointing)
        out.append(f"training.gradient_checkpointing={str(v).lower() if isinstance(v, bool) else f'{v:g}'}")
    if MEMORY_MODELS[lay.method].has_zero:
        # The engine's own flags (deepspeed.* or fsdp.*); a LoRA spec moving to a full layout gets
        # the default full engine's (DeepSpeed), on its default section.
        recipe = engine_for(spec) if memory_model_of(spec) == lay.method else engine_for_method(lay.method)
        target = spec if hasattr(spec, recipe.section or "") else _default_full(spec)
        if recipe.layout_flags is not None:
            out += recipe.layout_flags(target, lay)
    return out


def _default_full(spec: Any) -> Any:
    """An object with the default DeepSpeed section, for a LoRA spec's advice towards a full layout."""
    from types import SimpleNamespace

    from ...spec.schema import DeepSpeedSpec

    return SimpleNamespace(deepspeed=DeepSpeedSpec.model_validate({}))


def flags_text(flags: list[str]) -> str:
    """``--set a=1 --set b=2``, as a user pastes it."""
    return " ".join(f"--set {f}" for f in flags)


def change_text(spec: Any, lay: Layout) -> str:
    """How to turn ``spec`` into ``lay``: its ``--set`` flags, preceded by removing the spec's engine
    section when the method changes (``--set`` cannot remove a section); '' when nothing differs."""
    flags = set_flags(spec, lay)
    if not flags:
        return ""
    section = engine_for(spec).section
    if lay.method != memory_model_of(spec) and section and section in spec.model_fields_set:
        return f"remove the `{section}` section, then {flags_text(flags)}"
    return flags_text(flags)
