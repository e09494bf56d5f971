"""Training engines, by name: torch-free recipes in the spirit of torchtitan's ``TrainSpec``.

A recipe says what an engine is to every layer that does not run it: which ``method`` it serves
and which spec section configures it, what it adds to the launch plan and payload (DeepSpeed: the
resolved config), which artifacts a run publishes (the last one committed means "done"), which
checkpoint kind it writes, and where its builder lives in the training runtime
(``ftcluster.train.engines.<name>``, imported only by the runtime, where torch is). The planner,
the renderers, the doctor and the runtime ask :func:`engine_for` instead of spelling the engine
out; adding an engine is a builder module under ``ftcluster/train/engines/`` plus one
:func:`register` call here (docs/ARCHITECTURE.md).

:func:`ftcluster.plan.launch.compile_plan` asks the recipe once per spec and keeps the answers in
the launch plan (``plan.engine``, ``plan.deepspeed`` from :attr:`EngineRecipe.plan_extra`,
``plan.artifacts``). The planner's hook is by name (the planner imports this module, so this one
names the planner's memory model rather than importing it): :attr:`EngineRecipe.memory_model` is
the key of :data:`ftcluster.plan.planner.advise.MEMORY_MODELS` and the ``Layout.method`` the planner
models the engine with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..spec.terms import added_count
from . import deepspeed as ds_config  # the module: its function is looked up at call time


@dataclass(frozen=True)
class EngineRecipe:
    """One training engine as the torch-free layers see it."""

    name: str  # the engine's name: ftcluster.train.engines.<name> builds it
    method: str  # the spec's method it trains ("lora", "full")
    section: str | None  # the spec section that configures it ("lora", "deepspeed"), if any
    checkpoint_kind: str  # recorded in each checkpoint's state.json: a checkpoint resumes only into the same kind
    artifacts: Callable[[Any], tuple[str, ...]]  # what a run publishes at its end, in commit order
    plan_extra: Callable[[Any], dict[str, Any]]  # what the engine adds to the payload (config it resolves)
    description: str = ""
    memory_model: str = ""  # the planner's memory model (ftcluster.plan.planner.advise.MEMORY_MODELS key); default: method
    label: str = ""  # how a launch file's summary line names it ("LoRA", "DeepSpeed full fine-tune")
    runtime_modules: tuple[str, ...] = ()  # packages it needs where the job runs, beyond the common ones (the doctor's probe)
    # What the planner needs from the engine's spec section: keyword values of the planner's Layout
    # (zero_stage, offload_optimizer, offload_params) and Workload (lora_r, lora_targets, ...).
    planner_settings: Callable[[Any], dict[str, Any]] = lambda spec: {}
    # The ``--set`` flags that turn the spec's engine section into a planner Layout's settings (the
    # planner's advice); None: the section has none (LoRA's layouts differ in resources only).
    layout_flags: Callable[[Any, Any], list[str]] | None = None

    @property
    def planner_model(self) -> str:
        """The planner's memory model for this engine (a ``Layout.method``)."""
        return self.memory_model or self.method

    @property
    def builder(self) -> str:
        """The runtime module whose ``build`` constructs the engine (imported by ftcluster.train only)."""
        return f"ftcluster.train.engines.{self.name}"

    def last_artifact(self, spec: Any) -> str:
        """The artifact committed last at the end of a run: its commit means the run is done."""
        return self.artifacts(spec)[-1]


ENGINES: dict[str, EngineRecipe] = {}


def register(recipe: EngineRecipe) -> EngineRecipe:
    """Add an engine; its name must be new."""
    if recipe.name in ENGINES:
        raise ValueError(f"engine {recipe.name!r} is registered twice")
    ENGINES[recipe.name] = recipe
    return recipe


def engine_for(spec: Any) -> EngineRecipe:
    """The engine that trains ``spec``: the one its ``engine`` field names (``method: full``:
    deepspeed or fsdp), else the one registered for its method."""
    name = getattr(spec, "engine", None)
    if name is not None:
        recipe = ENGINES.get(name)
        if recipe is None or recipe.method != spec.method:
            raise ValueError(f"no training engine {name!r} for method {spec.method!r}")
        return recipe
    return engine_for_method(spec.method)


def engine_for_method(method: str) -> EngineRecipe:
    """The first engine registered for ``method`` (its default: ``full`` -> deepspeed)."""
    for recipe in ENGINES.values():
        if recipe.method == method:
            return recipe
    raise ValueError(f"no training engine for method {method!r}")


def _lora_artifacts(spec: Any) -> tuple[str, ...]:
    return ("adapter", "merged") if spec.lora.merge_at_end else ("adapter",)


def _lora_planner(spec: Any) -> dict[str, Any]:
    lora, t = spec.lora, spec.lora.target_modules
    # The planner models the embedding and the output layer in modules_to_save (the rest is small).
    saved = tuple(m for m in lora.modules_to_save if m in ("embed_tokens", "lm_head"))
    return {"lora_r": lora.r, "lora_targets": t if isinstance(t, str) else tuple(t), "lora_dropout": lora.dropout,
            "modules_to_save": saved, "added_tokens": added_count(spec.tokenizer)}


def _deepspeed_planner(spec: Any) -> dict[str, Any]:
    ds = spec.deepspeed
    return {"zero_stage": ds.zero_stage, "offload_optimizer": ds.offload_optimizer != "none",
            "offload_params": ds.offload_params != "none", "reduce_bucket_size": ds.reduce_bucket_size,
            "overlap_comm": ds.overlap_comm}


def _fsdp_planner(spec: Any) -> dict[str, Any]:
    # The planner models FSDP2 as the ZeRO stage it matches (its own FSDP memory model is a later
    # step of #22): resharding after forward frees each layer's gathered parameters as ZeRO-3 does,
    # keeping them until backward is ZeRO-2's peak; CPUOffloadPolicy moves the sharded parameters,
    # gradients and optimizer state to the host (ZeRO-3's parameter and optimizer offload).
    f = spec.fsdp
    return {"zero_stage": 3 if f.reshard_after_forward else 2, "offload_optimizer": f.cpu_offload,
            "offload_params": f.cpu_offload and f.reshard_after_forward, "overlap_comm": True, "engine": "fsdp"}


def _fsdp_flags(spec: Any, layout: Any) -> list[str]:
    """``--set`` flags that give an fsdp job the planner's ``layout`` (modelled as a ZeRO stage):
    stage 3 reshards after forward; stages 0-2 do not (FSDP without resharding needs no more memory
    than ZeRO-0/1/2); any offload is FSDP's CPU offload."""
    f, out = spec.fsdp, []
    reshard = (layout.zero_stage or 0) == 3
    offload = bool(layout.offload_optimizer or layout.offload_params)
    if reshard != f.reshard_after_forward:
        out.append(f"fsdp.reshard_after_forward={str(reshard).lower()}")
    if offload != f.cpu_offload:
        out.append(f"fsdp.cpu_offload={str(offload).lower()}")
    return out


def _deepspeed_flags(spec: Any, layout: Any) -> list[str]:
    """``--set`` flags that give a DeepSpeed job the planner's ``layout``: its ZeRO stage and offload."""
    ds, out = spec.deepspeed, []
    if layout.zero_stage != ds.zero_stage:
        out.append(f"deepspeed.zero_stage={layout.zero_stage}")
    for key, on in (("offload_optimizer", layout.offload_optimizer), ("offload_params", layout.offload_params)):
        if on != (getattr(ds, key) != "none"):
            out.append(f"deepspeed.{key}={'cpu' if on else 'none'}")
    return out


def _deepspeed_extra(spec: Any) -> dict[str, Any]:
    return {"deepspeed": ds_config.resolved_deepspeed_config(spec)}


register(EngineRecipe(
    name="lora", method="lora", section="lora", checkpoint_kind="plain",
    artifacts=_lora_artifacts, plan_extra=lambda spec: {"deepspeed": None},
    description="LoRA adapters (peft) on a frozen base: torch AdamW, DDP across processes",
    memory_model="lora", label="LoRA", planner_settings=_lora_planner))
register(EngineRecipe(
    name="deepspeed", method="full", section="deepspeed", checkpoint_kind="deepspeed",
    artifacts=lambda spec: ("final",), plan_extra=_deepspeed_extra,
    description="full fine-tuning with DeepSpeed ZeRO 0-3",
    memory_model="full", label="DeepSpeed full fine-tune", runtime_modules=("deepspeed",),
    planner_settings=_deepspeed_planner, layout_flags=_deepspeed_flags))
register(EngineRecipe(
    name="fsdp", method="full", section="fsdp", checkpoint_kind="fsdp",
    artifacts=lambda spec: ("final",), plan_extra=lambda spec: {"deepspeed": None},
    description="full fine-tuning with PyTorch FSDP2 (fully_shard per decoder layer, torch.distributed.checkpoint)",
    memory_model="full", label="FSDP2 full fine-tune", planner_settings=_fsdp_planner, layout_flags=_fsdp_flags))
