"""Training engines, one module each, built by name from their torch-free recipes.

:mod:`ftcluster.plan.engines` registers a recipe per engine (method, spec section, checkpoint
kind, artifacts, what it adds to the payload); the recipe's ``builder`` names the module here
(``ftcluster.train.engines.<name>``) whose ``build(inputs: EngineInputs) -> (engine, keep_alive)``
constructs it. :mod:`.base` holds what they share (the :class:`~.base.Engine` protocol, the
learning-rate schedule, the token cross entropy); :mod:`.lora`, :mod:`.deepspeed` and :mod:`.fsdp`
are the engines (the last two train ``method: full``, chosen by the spec's ``engine``). Adding one
is a module here plus one ``register`` call in ``plan/engines.py``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

from ...errors import TrainError
from ...plan.engines import EngineRecipe, engine_for
from .base import Engine, EngineInputs


def builder(recipe: EngineRecipe) -> ModuleType:
    """The module that builds ``recipe``'s engine (it defines ``build(inputs)``)."""
    module = importlib.import_module(recipe.builder)
    if not callable(getattr(module, "build", None)):
        raise TrainError(f"engine {recipe.name!r}: {recipe.builder} defines no build(inputs)")
    return module


def build_engine(spec: Any, payload: dict[str, Any], tokenizer: Any, dtype: Any, ctx: Any, cache_dir: Path,
                 total_steps: int) -> tuple[Engine, Any]:
    """The engine that trains ``spec`` (:func:`~ftcluster.plan.engines.engine_for`), and an object to
    keep alive as long as it (ZeRO-3's HF config; None for most engines)."""
    recipe = engine_for(spec)
    engine, keep = builder(recipe).build(EngineInputs(spec=spec, payload=payload, tokenizer=tokenizer, dtype=dtype,
                                                      ctx=ctx, cache_dir=cache_dir, total_steps=total_steps))
    if engine.kind != recipe.checkpoint_kind:  # checkpoints record the kind; resume compares it
        raise TrainError(f"engine {recipe.name!r}: built a {engine.kind!r} engine, its recipe says "
                         f"{recipe.checkpoint_kind!r}")
    return engine, keep
