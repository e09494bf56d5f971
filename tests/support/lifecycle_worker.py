"""A stand-in training worker for the process-lifecycle tests, started by the real launcher.

torchrun runs it as ``python -u lifecycle_worker.py --spec PAYLOAD`` (see :func:`make_python`),
so everything above it (local backend, supervisor, ``ftcluster.train.launch``, torchrun) is
real and only the training is not. Like the real entry point it ties itself to the launcher
first and stops on SIGUSR2/SIGTERM through the runtime's StopFlag. ``LIFECYCLE_DIR``: where it
writes ``worker-<rank>.pid``. ``LIFECYCLE_MODE``:

* ``steps`` (default): 0.1 s steps; on a stop, marks itself preempted and exits 143;
* ``finish``: ignores a stop and exits 0 after ``LIFECYCLE_STEPS`` steps (a stop during the finish);
* ``upload``: commits a checkpoint to the spec's output (an unreachable S3 endpoint in the
  tests) and waits for it: the upload retries without end and a stop is never acted on;
* ``fail``: exits 1 after one step.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from ftcluster.train.lifeline import tie_to_parent

PYTHON = '''#!{python}
# The interpreter the local backend runs as `local.python`: the real launcher, with the
# training module replaced by lifecycle_worker.py.
import runpy, sys
args = sys.argv[1:]
assert args[:2] == ["-m", "ftcluster.train.launch"], args
rest = args[2:]
i = rest.index("ftcluster.train")
rest[i - 1:i + 1] = [{worker!r}]
sys.argv = ["ftcluster.train.launch", *rest]
runpy.run_module("ftcluster.train.launch", run_name="__main__", alter_sys=True)
'''


def make_python(folder: Path) -> Path:
    path = folder / "lifecycle-python"
    path.write_text(PYTHON.format(python=sys.executable, worker=str(Path(__file__).resolve())))
    path.chmod(0o755)
    return path


def main() -> int:
    tie_to_parent()
    from ftcluster.train.launch import mark_preempted
    from ftcluster.train.signals import PREEMPTED_EXIT, StopFlag

    args = sys.argv[1:]
    spec = json.loads(Path(args[args.index("--spec") + 1]).read_text())["spec"]
    rank = int(os.environ.get("RANK", "0"))
    (Path(os.environ["LIFECYCLE_DIR"]) / f"worker-{rank}.pid").write_text(str(os.getpid()))
    mode = os.environ.get("LIFECYCLE_MODE", "steps")
    stop = StopFlag().install()
    if mode == "upload":
        from ftcluster.storage.commit import CheckpointStore

        local = Path(os.environ["LIFECYCLE_DIR"]) / f"ckpt-{rank}"
        local.mkdir(exist_ok=True)
        (local / "state.bin").write_bytes(b"x" * 1000)
        store = CheckpointStore(spec["output"]["uri"], spec["output"].get("storage_options"), retry_cap_s=1.0)
        print(f"rank {rank}: uploading", flush=True)
        store.commit_async(1, local, {}).result()
        return 0
    for step in range(int(os.environ.get("LIFECYCLE_STEPS", "100000"))):
        time.sleep(0.1)
        if mode == "fail":
            print(f"rank {rank}: failing", flush=True)
            return 1
        if stop.local and mode != "finish":
            mark_preempted()
            print(f"rank {rank}: stopped at step {step}", flush=True)
            return PREEMPTED_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
