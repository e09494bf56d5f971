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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .faults import PROGRESS

log = logging.getLogger("ftcluster.train")


def cpu_threads(env: Mapping[str, str], local_world: int, root: Path = Path("/"),
                affinity: int | None = None) -> int | None:
    """Intra-op threads for one of ``local_world`` processes on this node; None where the user chose
    (``OMP_NUM_THREADS`` set by the user, the spec's ``env`` or ``resources.cpus_per_node``).

    The CPUs the run really has are the fewest of: the CPUs this process may run on
    (``sched_getaffinity``: cpusets, ``taskset``, Slurm's binding), the cgroup's CPU quota
    (containers, Kubernetes limits, Slurm's cgroup plugin) and Slurm's allocation. The host's core
    count, torch's default, oversubscribes them: many threads spinning on a couple of cores made a
    CPU run several times slower.
    """
    if "OMP_NUM_THREADS" in env and not _torchrun_default_omp(env, root):
        return None
    cpus = [affinity if affinity is not None else _affinity()]
    quota = cgroup_cpu_quota(root)
    if quota is not None:
        cpus.append(quota)
    slurm = env.get("SLURM_CPUS_PER_TASK") or env.get("SLURM_CPUS_ON_NODE") or ""
    if slurm.isdigit() and int(slurm) > 0:  # one task per node (the sbatch script): the node's share
        cpus.append(int(slurm))
    return max(1, min(cpus) // max(1, local_world))


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _torchrun_default_omp(env: Mapping[str, str], root: Path) -> bool:
    """Whether ``OMP_NUM_THREADS=1`` is torchrun's default for several processes per node (it sets
    it when its own environment has none) rather than the user's choice. The agent (this worker's
    parent) was started with the user's environment; /proc shows that one, not torchrun's changes."""
    if env.get("OMP_NUM_THREADS") != "1" or int(env.get("LOCAL_WORLD_SIZE", "1")) <= 1:
        return False
    try:
        parent = (root / "proc" / str(os.getppid()) / "environ").read_bytes()
    except OSError:
        return False  # cannot tell: keep the value
    return not any(item.startswith(b"OMP_NUM_THREADS=") for item in parent.split(b"\0"))


def cgroup_cpu_quota(root: Path = Path("/")) -> int | None:
    """CPUs this process's cgroup may use (quota / period, rounded up), the tightest over its
    ancestors; None without a quota. cgroup v2 (``cpu.max``) and v1 (``cpu.cfs_quota_us``)."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    fs = root / "sys/fs/cgroup"
    found: list[int] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2 unified hierarchy
            dirs, read = [fs], _v2_quota
        elif "cpu" in controllers.split(","):
            dirs, read = [fs / controllers, fs / "cpu", fs / "cpu,cpuacct"], _v1_quota
        else:
            continue
        for base in dict.fromkeys(dirs):  # the mount point's name varies between distributions
            parts = [p for p in path.split("/") if p]
            for depth in range(len(parts), -1, -1):  # the cgroup, then its ancestors up to the mount
                quota = read(base.joinpath(*parts[:depth]))
                if quota is not None:
                    found.append(quota)
    return min(found) if found else None


def _v2_quota(d: Path) -> int | None:
    try:
        quota, period = (d / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else max(1, -(-int(quota) // int(period)))


def _v1_quota(d: Path) -> int | None:
    try:
        quota = int((d / "cpu.cfs_quota_us").read_text())
        period = int((d / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else max(1, -(-quota // period))



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
            with PROGRESS.waiting_in("a barrier"):
                dist.barrier(group=self.ctl_group)

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum small numbers over ranks on the CPU control group (no GPU sync)."""
        import torch
        import torch.distributed as dist

        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        with PROGRESS.waiting_in("an all-reduce"):
            dist.all_reduce(t, group=self.ctl_group)
        return t.tolist()

    def all_sum_device(self, t: Any) -> Any:
        import torch.distributed as dist

        if self.world_size > 1:
            with PROGRESS.waiting_in("an all-reduce"):
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
        # Whatever imports DeepSpeed here (the engine; accelerate's unwrap when a LoRA run saves its merged
        # model) finds the accelerator named, instead of probing and warning "Setting accelerator to CPU".
        env.setdefault("DS_ACCELERATOR", "cpu")
        threads = cpu_threads(env, local_world)
        if threads is not None:
            torch.set_num_threads(threads)
    ctx = DistContext(rank, world, local_rank, local_world, node_rank, max(1, world // local_world), device)
    if "MASTER_ADDR" in env and not dist.is_initialized():
        from .speedups import nccl_defaults

        nccl_defaults(use_cuda, world)
        hang = float(spec.training.hang_timeout)
        fault_env(env, hang)
        timeout = datetime.timedelta(seconds=collective_timeout(env, hang))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timeout,
                                device_id=device if use_cuda else None)
        if use_cuda:
            ctx.ctl_group = dist.new_group(backend="gloo", timeout=timeout)
    return ctx


def collective_timeout(env: Mapping[str, str], hang_timeout: float) -> float:
    """The process group's timeout: the backstop behind the watchdog (:mod:`.faults`), which names a
    silent or stuck rank after ``training.hang_timeout``. It must outlast the waits the watchdog lets
    pass (ranks at a barrier while one uploads the final checkpoint or downloads the base model), so it
    is ``FTCLUSTER_DIST_TIMEOUT_S`` when set, else the larger of an hour and four hang timeouts."""
    if env.get("FTCLUSTER_DIST_TIMEOUT_S"):
        return float(env["FTCLUSTER_DIST_TIMEOUT_S"])
    return max(3600.0, 4 * hang_timeout)


def fault_env(env: Any, hang_timeout: float) -> None:
    """NCCL's own fault handling, set from ``training.hang_timeout`` (a user's value stays): errors
    and timeouts tear the process down (the launcher then reports the rank), NCCL's watchdog
    heartbeat gives up after the hang timeout, and a timeout dumps the flight recorder (its last
    collectives per rank) beside the run's log: the run folder on the local backend
    (``FTCLUSTER_RUN_DIR``), else ``FTCLUSTER_FAULT_DIR`` or the node's temporary folder."""
    import tempfile

    where = env.get("FTCLUSTER_RUN_DIR") or env.get("FTCLUSTER_FAULT_DIR") or tempfile.gettempdir()
    env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    env.setdefault("TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC", str(int(hang_timeout)))
    env.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    env.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
    env.setdefault("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", str(Path(where) / "nccl-trace-rank-"))


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
    # torchao (imported by transformers and peft when installed) says at import which of its GPU kernels
    # a CPU host cannot load, and registers types torch calls deprecated: not actionable here.
    import torch

    if not torch.cuda.is_available():
        logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
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
