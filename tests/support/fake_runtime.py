"""A stand-in for ``ftcluster.train.runtime.run`` with the same contract, for fast submitit tests.

It counts ``training.max_steps`` steps of 0.1 s, keeps its progress per rank in
``<output.uri>/rank<R>.json`` (a file:// URI), and uses the runtime's real signal handling
(:class:`ftcluster.train.signals.StopFlag`): on SIGUSR2/SIGTERM it saves and returns 143, and a
rerun resumes from the saved step. Every start is appended to ``<output.uri>/starts.log``.
Jobs import it by name (``TrainTask(..., entry="fake_runtime:run")``), so the tests put this
folder on PYTHONPATH, which sbatch exports to the job.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ftcluster.train.signals import PREEMPTED_EXIT, StopFlag


def run(payload: dict) -> int:
    spec = payload["spec"]
    out = Path(spec["output"]["uri"].removeprefix("file://"))
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ["RANK"])
    state = out / f"rank{rank}.json"
    step = json.loads(state.read_text())["step"] if state.exists() else 0
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                                          "GROUP_RANK", "SLURM_JOB_ID", "SLURM_RESTART_COUNT")}
    with (out / "starts.log").open("a") as fh:
        fh.write(json.dumps({"step": step, **env}) + "\n")
    stop = StopFlag().install()
    try:
        while step < spec["training"]["max_steps"]:
            time.sleep(0.1)
            step += 1
            if stop.local:
                state.write_text(json.dumps({"step": step, "stopped_by": stop.signal_name}))
                print(f"rank {rank}: stop at step {step} ({stop.signal_name}), saved", flush=True)
                return PREEMPTED_EXIT
            if step % 5 == 0:
                state.write_text(json.dumps({"step": step}))
        state.write_text(json.dumps({"step": step, "done": True}))
        return 0
    finally:
        stop.uninstall()
