"""Process-level setup: the process group torchrun describes, the device, logging.

:class:`DistContext` carries rank/world/node facts and two kinds of small collectives:
``all_sum`` on a CPU (gloo) control group, which never synchronises the GPU, and
``all_sum_device`` for tensors on the device.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("ftcluster.train")



@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    nnodes: int
    device: Any
    ctl_group: Any = None  # gloo group for small CPU collectives (None: the default group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.world_size > 1:
            dist.barrier(group=self.ctl_group)

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum small numbers over ranks on the CPU control group (no GPU sync)."""
        import torch
        import torch.distributed as dist

        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.ctl_group)
        return t.tolist()

    def all_sum_device(self, t: Any) -> Any:
        import torch.distributed as dist

        if self.world_size > 1:
            dist.all_reduce(t)
        return t


def init_distributed(spec: Any) -> DistContext:
    """Join the process group torchrun describes (NCCL on GPU, gloo on CPU)."""
    import torch
    import torch.distributed as dist

    env = os.environ
    rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    local_rank, local_world = int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", 1))
    node_rank = int(env.get("GROUP_RANK", 0))
    use_cuda = spec.resources.gpus_per_node > 0 and torch.cuda.is_available()
    if spec.resources.gpus_per_node > 0 and not use_cuda and rank == 0:
        log.warning("resources.gpus_per_node=%d but no GPU is visible to torch: training on CPU",
                    spec.resources.gpus_per_node)
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        threads = max(1, (os.cpu_count() or 1) // local_world)
        if "OMP_NUM_THREADS" not in env:  # torchrun sets 1 when it starts several processes
            torch.set_num_threads(threads)
    ctx = DistContext(rank, world, local_rank, local_world, node_rank, max(1, world // local_world), device)
    if "MASTER_ADDR" in env and not dist.is_initialized():
        from .speedups import nccl_defaults

        nccl_defaults(use_cuda, world)
        # Long timeout: a rank can wait at a barrier while another uploads a final checkpoint.
        timeout = datetime.timedelta(seconds=float(env.get("FTCLUSTER_DIST_TIMEOUT_S", "3600")))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timeout,
                                device_id=device if use_cuda else None)
        if use_cuda:
            ctx.ctl_group = dist.new_group(backend="gloo", timeout=timeout)
    return ctx


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is now, so lines go above rich's progress bar (which swaps it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter("%(asctime)s [ftcluster.train" + (f" rank {rank}" if rank else "")
                                           + "] %(message)s", "%H:%M:%S"))
    for logger in (log, logging.getLogger("ftcluster.storage")):  # the storage layer logs commits and retries
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    # Deprecation chatter from libraries (e.g. peft calling is_gradient_checkpointing) is not actionable here.
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass
