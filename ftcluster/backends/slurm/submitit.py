"""Run an ftcluster job from Python through submitit (``pip install 'ftcluster[slurm]'``).

    import ftcluster
    from ftcluster.backends.slurm.submitit import submit

    job = submit(ftcluster.load_spec("job.yaml"), folder="runs/%j")
    print(job.job_id, job.result())

:func:`executor_for` maps the spec's resources and ``slurm:`` section (through
:func:`ftcluster.plan.slurm_request.slurm_request`, as the sbatch renderer does) to a
``submitit.AutoExecutor``; :func:`submit` submits a :class:`TrainTask`, a checkpointable callable
that trains in-process (one task per training process: ``tasks_per_node = procs per node``,
no torchrun). Preemption and time limits use submitit's own mechanism: the job gets
``--signal=USR2@slurm.signal_seconds``; the training runtime's handler turns that signal into a
synchronised save that is committed to ``output.uri``; then the task hands the signal back to
submitit, which calls :meth:`TrainTask.checkpoint` and requeues; the requeued job resumes from
object storage. Nothing ever goes through a shared filesystem except submitit's own folder.

This module imports submitit when it is imported; the core package never imports it.
"""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path
from typing import Any

try:
    import submitit
    from submitit.helpers import Checkpointable, DelayedSubmission, TorchDistributedEnvironment
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("ftcluster.backends.slurm.submitit needs submitit: pip install 'ftcluster[slurm]'") from exc

from ...errors import BackendError
from ...exitcodes import PREEMPTED_EXIT

__all__ = ["TrainTask", "executor_for", "submit", "submitit_parameters"]

# As in the sbatch script: override the rendezvous host (node names that do not resolve) and port.
RDZV_HOST_ENV, RDZV_PORT_ENV = "FTCLUSTER_RDZV_HOST", "FTCLUSTER_RDZV_PORT"
DEFAULT_ENTRY = "ftcluster.train.runtime:run"
MAX_NUM_TIMEOUT = 100
RANK_WAIT_S = 300
SIGTERM_GRACE_S = 2.0  # submitit gives up requeueing after this many time-limit hits (its default is 3)


def _default_folder(spec: Any) -> Path:
    from ..base import ftcluster_home

    return ftcluster_home() / "submitit" / spec.name / "%j"


def executor_for(spec: Any, folder: str | Path | None = None, cluster: str | None = None,
                 request: Any = None) -> submitit.AutoExecutor:
    """A ``submitit.AutoExecutor`` with the spec's resources and Slurm settings.

    ``request`` is the spec's :class:`~ftcluster.plan.slurm_request.SlurmRequest` when the caller
    has its launch plan (``plan.slurm``); otherwise it is computed from the spec.

    ``cluster`` is passed to submitit (None: Slurm when ``srun`` is on PATH, else local processes;
    ``"debug"`` runs in this process). ``folder`` holds submitit's pickles and logs; ``%j`` is the
    job id. Default: ``$FTCLUSTER_HOME/submitit/<name>/%j``.
    """
    if spec.resources.time_limit_seconds is None:
        raise BackendError("resources.time_limit: submitit always passes --time (5 minutes unless told); set "
                           "resources.time_limit, e.g. 08:00:00 (the job requeues and resumes when it runs out)")
    if spec.variants:
        raise BackendError("variants: submitting job arrays through submitit is not supported; submit each variant "
                           "spec, or use `ftcluster submit` (one sbatch --array)")
    kwargs: dict[str, Any] = {"slurm_max_num_timeout": MAX_NUM_TIMEOUT}
    if "python" in spec.slurm.model_fields_set:  # default: the interpreter that pickles the task (submitit's)
        kwargs["slurm_python"] = spec.slurm.python
    ex = submitit.AutoExecutor(folder=str(folder or _default_folder(spec)), cluster=cluster, **kwargs)
    ex.update_parameters(**submitit_parameters(spec, request))
    return ex


# The sbatch options of slurm_request() that submitit writes its own way: its layout is one task per
# training process (not one torchrun per node), it adds its own log, signal and requeue handling.
SUBMITIT_OWN = {"ntasks-per-node", "signal", "open-mode", "output", "requeue", "array"}
_AS_PARAMETER = {"gres": "slurm_gres", "mem": "slurm_mem", "partition": "slurm_partition",
                 "account": "slurm_account", "qos": "slurm_qos", "constraint": "slurm_constraint"}


def _sbatch_text(value: str) -> str:
    """A value for an ``#SBATCH`` line that submitit will ``shlex.quote``: sbatch's own parser reads a
    backslash as an escape even inside single quotes (see ftcluster.render.slurm._sbatch_directive)."""
    return value.replace("\\", "\\\\")


def submitit_parameters(spec: Any, request: Any = None) -> dict[str, Any]:
    """``executor.update_parameters`` arguments: the spec's :func:`~ftcluster.plan.slurm_request.slurm_request`
    (the rendered sbatch script's options; ``request`` when the caller has it, e.g. ``plan.slurm``)
    in submitit's terms."""
    from ...plan.slurm_request import slurm_request

    r, s = spec.resources, spec.slurm
    request = request if request is not None else slurm_request(spec)
    ntasks = r.nproc_per_node
    params: dict[str, Any] = {"tasks_per_node": ntasks, "slurm_signal_delay_s": s.signal_seconds}
    extra: dict[str, Any] = {}
    for o in request.sbatch:
        if o.name in SUBMITIT_OWN:
            continue
        if o.name == "job-name":
            params["name"] = o.value
        elif o.value is None:  # a flag (exclusive: null): True for submitit
            extra[o.name] = True
        elif o.name == "nodes":
            if "-" in o.value:
                raise BackendError(f"{spec._source_file or '<spec>'}: resources.min_nodes: submitit asks Slurm for a "
                                   "fixed number of nodes; remove min_nodes, or submit with `ftcluster submit` (its "
                                   "sbatch script runs on MIN-MAX nodes)")
            params["nodes"] = int(o.value)
        elif o.name == "time":
            params["timeout_min"] = math.ceil(r.time_limit_seconds / 60)
        elif o.name == "gpus-per-node":
            params["gpus_per_node"] = int(o.value)
        elif o.name == "cpus-per-task":  # the sbatch script has one task per node, submitit one per process
            params["cpus_per_task"] = max(1, int(o.value) // ntasks)
        elif o.name in _AS_PARAMETER:
            params[_AS_PARAMETER[o.name]] = _sbatch_text(o.value)
        else:  # reservation, slurm.extra_directives
            extra[o.name] = _sbatch_text(o.value)
    if extra:
        params["slurm_additional_parameters"] = extra
    if request.setup_lines:
        params["slurm_setup"] = request.setup_lines
    if request.srun:
        params["slurm_srun_args"] = request.srun_args()
    return params


class TrainTask(Checkpointable):
    """Train one rank of the job in this process; checkpointable so preemption resumes.

    Each submitit task is one training process: ``__call__`` exports the torch.distributed
    environment (MASTER_ADDR = first node, MASTER_PORT derived from the job id as the sbatch
    script does, RANK/LOCAL_RANK/WORLD_SIZE from submitit) and runs
    :func:`ftcluster.train.runtime.run` (``entry``, ``module:function``, names another function with
    the same contract: ``run(payload) -> 0 | 143``). It returns ``{"status": 0, "output_uri": ...,
    "requeues": n}``.
    """

    def __init__(self, payload: dict[str, Any], env: dict[str, str] | None = None, entry: str = DEFAULT_ENTRY):
        self.payload = payload
        self.env = dict(env or {})
        self.entry = entry
        self.requeues = 0

    def _export_environment(self) -> dict[str, str]:
        from ...plan.launch import derived_port

        job = submitit.JobEnvironment()
        dist = TorchDistributedEnvironment()  # rank, world size and local rank from Slurm's task layout
        env = dict(self.env)
        env.update({
            "MASTER_ADDR": os.environ.get(RDZV_HOST_ENV) or dist.master_addr,
            "MASTER_PORT": os.environ.get(RDZV_PORT_ENV) or str(derived_port(job.job_id)),
            "RANK": str(dist.rank),
            "WORLD_SIZE": str(dist.world_size),
            "LOCAL_RANK": str(dist.local_rank),
            "LOCAL_WORLD_SIZE": str(dist.local_world_size),
            "GROUP_RANK": str(job.node),
        })
        os.environ.update(env)
        return env

    def __call__(self) -> dict[str, Any]:
        import importlib

        self._export_environment()
        module, _, func = self.entry.partition(":")
        run = getattr(importlib.import_module(module), func)
        with _SignalLog() as received:
            status = run(self.payload)
        if status == PREEMPTED_EXIT and signal.SIGUSR2 not in received.signals:
            # SIGTERM alone: `scancel`, or Slurm requeueing the job itself (`scontrol requeue`, preemption with
            # PreemptMode=REQUEUE). Requeueing here would bring a cancelled job back, so stop (submitit ignores
            # SIGTERM too). A USR2 right behind it (submitit's simulated preemption sends both) now reaches
            # submitit's own handler, which requeues; give it a moment to arrive.
            time.sleep(SIGTERM_GRACE_S)
            _exit_without_result()
        if status == PREEMPTED_EXIT:
            # USR2 (submitit's time-limit/preemption signal): the runtime saved, committed the checkpoint and
            # restored submitit's handlers. Hand the signal back: on rank 0 submitit calls self.checkpoint()
            # and requeues the job (`scontrol requeue`), then exits; other ranks' handlers return.
            _hand_back_to_submitit()  # rank 0 does not come back from this
            # Other ranks wait for the requeue to end them, as under plain submitit: a result written now
            # would be stale when the requeued job's rank 0 finishes first.
            time.sleep(RANK_WAIT_S)
            raise RuntimeError(f"rank {os.environ.get('RANK')} stopped after a committed checkpoint, but rank 0 "
                               f"did not requeue the job within {RANK_WAIT_S}s; see rank 0's log")
        elif status != 0:
            raise RuntimeError(f"training exited with status {status}")
        # Slurm counts every requeue (submitit's, `scontrol requeue`, preemption); submitit's checkpoint only its own.
        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        return {"status": status, "output_uri": self.payload["spec"]["output"]["uri"],
                "requeues": max(self.requeues, restarts)}

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """Called by submitit on rank 0 before it requeues.

        By then the runtime has already committed its checkpoint to ``output.uri`` (it handles the
        signal itself and returns only after the commit); if the signal came before the runtime
        started, there is nothing new to save. The requeued task resumes from object storage.
        """
        self.requeues += 1
        return DelayedSubmission(self, *args, **kwargs)


class _SignalLog:
    """Which signals reached this process while the runtime ran, whatever handler took them.

    The runtime's handler only says "stop"; whether to requeue depends on the signal (USR2 from
    submitit's --signal, or SIGTERM from scancel). ``signal.set_wakeup_fd`` makes the interpreter
    write each signal's number to a pipe as it arrives, without replacing any handler.
    """

    def __enter__(self) -> _SignalLog:
        self.signals: set[int] = set()
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._previous = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        return self

    def __exit__(self, *exc: Any) -> None:
        signal.set_wakeup_fd(self._previous)
        try:
            while chunk := os.read(self._r, 512):
                self.signals.update(chunk)
        except BlockingIOError:
            pass
        os.close(self._r)
        os.close(self._w)


def _exit_without_result() -> None:
    """End this task with no result: whether the job was cancelled or Slurm runs it again is decided by
    Slurm, not here. A result written now would be read as the job's outcome by ``job.result()``, even
    while a requeued job runs again; without one, submitit waits for the requeued run's result, or
    reports the job's final state (CANCELLED) with this message from the task's stderr."""
    import sys

    print(f"ftcluster: rank {os.environ.get('RANK')} stopped by SIGTERM after a committed checkpoint; if the job "
          "was cancelled, submit again to resume from output.uri (a requeued job resumes by itself)",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(PREEMPTED_EXIT)  # not an exception: submitit would record it as the job's result


def _hand_back_to_submitit() -> None:
    """Run submitit's USR2 handler once: it checkpoints and requeues on rank 0 and returns elsewhere.

    Later USR2s belong to the same stop (a preemption sends SIGTERM then USR2 within milliseconds):
    they are ignored, so the job is not checkpointed and requeued twice.
    """
    handler = signal.getsignal(signal.SIGUSR2)
    if not callable(handler):
        raise RuntimeError("training stopped after a committed checkpoint, but no submitit handler is installed "
                           "to requeue it (debug/local executor); submit again to resume")

    def once(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        handler(signum, frame)

    signal.signal(signal.SIGUSR2, once)
    signal.raise_signal(signal.SIGUSR2)


def submit(spec: Any, folder: str | Path | None = None, cluster: str | None = None) -> submitit.Job:
    """Submit ``spec`` (a loaded spec or a YAML path) as a submitit job running :class:`TrainTask`."""
    from ...plan.launch import compile_plan
    from ...spec.loader import load_spec

    if isinstance(spec, (str, Path)):
        spec = load_spec(spec)
    plan = compile_plan(spec, spec.slurm.env)
    executor = executor_for(spec, folder, cluster, plan.slurm)
    return executor.submit(TrainTask(plan.payload, plan.env))
