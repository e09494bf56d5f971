"""The run's resumable state, as parts a checkpoint saves: the :class:`Stateful` protocol,
:class:`TrainState` (step, tokens, time, metadata: a checkpoint's ``state.json``) and
:class:`RngState` (this process's random generators: its ``rank-NNNNN.pt``, beside the data
position). The engine saves itself into a folder instead (``Engine.save``/``load``); the
:class:`~.checkpoint.CheckpointManager` composes them all.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..artifacts.record import new_run_uid


@runtime_checkable
class Stateful(Protocol):
    """A part of the run a checkpoint saves as a small picklable dict and restores in place."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainState:
    """Where training stands; saved by rank 0 as the checkpoint's ``state.json`` (with the run's identity)."""

    step: int = 0
    tokens_seen: int = 0
    elapsed_before: float = 0.0  # training time of the earlier attempts (state.json's elapsed_s on resume)
    general_eval_before: float | None = None  # the forgetting baseline, measured before the first step
    last_loss: float | None = None  # the last logged train loss (meta of the checkpoint and its adapter)
    run_uid: str = field(default_factory=new_run_uid)  # the run's id in its artifacts' records, kept on resume
    _t0: float | None = field(default=None, repr=False, compare=False)

    def start_clock(self) -> None:
        """Training time of this attempt runs from now (after set-up)."""
        self._t0 = time.monotonic()

    def elapsed(self) -> float:
        """Training time up to now, over every attempt."""
        return self.elapsed_before + (0.0 if self._t0 is None else time.monotonic() - self._t0)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "elapsed_s": self.elapsed(),
                "general_eval_before": self.general_eval_before, "last_loss": self.last_loss,
                "run_uid": self.run_uid}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        self.general_eval_before, self.last_loss = state.get("general_eval_before"), state.get("last_loss")
        self.run_uid = state.get("run_uid") or self.run_uid  # a checkpoint from before run ids keeps this one


class RngState:
    """This process's random generators (python, numpy, torch, and CUDA's on a GPU)."""

    resharding = "fresh"  # a rank the checkpoint did not have keeps its seeded generators (checkpoint.py)

    def __init__(self, device: Any):
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        import numpy as np
        import torch

        st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            st["cuda"] = torch.cuda.get_rng_state(self.device)
        return st

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import numpy as np
        import torch

        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
