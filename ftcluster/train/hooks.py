"""What a checkpoint boundary does besides the save: the LoRA step adapter, then the record.

:class:`Checkpointing` is the loop's :class:`~.loop.Checkpoints` in a run (and the finish's
final save): the :class:`~.checkpoint.CheckpointManager` saves, :class:`~.outputs.Outputs`
publishes the step's adapter (LoRA), and the reporter writes a ``checkpoint`` record with the
seconds training waited for both (``ckpt_blocked_s``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .checkpoint import CheckpointManager
from .outputs import Outputs


class Checkpointing:
    def __init__(self, ckpt: CheckpointManager, outputs: Outputs, reporter: Any,
                 last_eval: Callable[[], float | None]):
        self.ckpt, self.outputs, self.reporter, self.last_eval = ckpt, outputs, reporter, last_eval

    def flags(self) -> tuple[int, int]:
        return self.ckpt.time_due(), self.ckpt.busy()

    def maybe_save(self, *, time_due: bool, uploading: bool, before: Callable[[], None]) -> bool:
        if not self.ckpt.maybe_save(time_due=time_due, uploading=uploading, before=before):
            return False
        self.after(final=False)
        return True

    def save(self, *, final: bool) -> None:
        self.ckpt.save(final=final)
        self.after(final)

    def after(self, final: bool) -> None:
        """After the manager's save: the LoRA step adapter, then the checkpoint record."""
        state, t0 = self.ckpt.state, time.monotonic()
        step = state.step
        self.outputs.after_checkpoint(state, self.last_eval())
        blocked, wait = self.ckpt.last_blocked_s + time.monotonic() - t0, self.ckpt.last_wait_s
        # Checkpoints closer together than their writes take wait for the previous one's writes.
        waited = f", {wait:.2f} s of it waiting for the previous checkpoint's writes" if wait >= 0.01 else ""
        self.reporter.event({"kind": "checkpoint", "step": step, "final": final, "ckpt_blocked_s": round(blocked, 4),
                             "ckpt_wait_s": round(wait, 4)},
                            f"checkpoint step {step} saved locally ({blocked:.2f} s{waited}); uploading in the background")
