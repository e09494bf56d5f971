"""A stand-in for the training program (the interpreter the launch line names), for backend tests.

It is invoked exactly like the real one (``<python> -m torch.distributed.run ... -m ftcluster.train
--spec PATH`` or ``--spec-env VAR``), ignores the launcher flags, picks its payload with the real
:func:`ftcluster.plan.payload.select_payload` and records what it picked in ``<output.uri>/selected.json``
(plus start and end times), so tests can check which variant each task trained.
``SHIM_SLEEP`` seconds of "training"; ``SHIM_FAIL=<variant or job name>`` makes that one exit 3.
"""

from __future__ import annotations

import sys
from pathlib import Path

SHIM = '''#!{python}
import json, os, sys, time
args = sys.argv[1:]
if "--spec" in args:
    payload = json.loads(open(args[args.index("--spec") + 1]).read())
else:
    payload = json.loads(os.environ[args[args.index("--spec-env") + 1]])
from ftcluster.plan.payload import select_payload
chosen = select_payload(payload, os.environ)
spec = chosen["spec"]
out = spec["output"]["uri"].removeprefix("file://")
os.makedirs(out, exist_ok=True)
record = {{"variant": chosen.get("variant"), "name": spec["name"], "lora_r": (spec.get("lora") or {{}}).get("r"),
          "model_path": spec["model"].get("path"), "start": time.time(),
          "array_task": os.environ.get("SLURM_ARRAY_TASK_ID"), "job": os.environ.get("SLURM_JOB_ID")}}
print("shim trains", record["name"], flush=True)
time.sleep(float(os.environ.get("SHIM_SLEEP", "0")))
record["end"] = time.time()
with open(os.path.join(out, "selected.json"), "w") as fh:
    json.dump(record, fh)
fail = os.environ.get("SHIM_FAIL")
sys.exit(3 if fail and fail in (chosen.get("variant"), spec["name"]) else 0)
'''


def make_shim(folder: Path) -> Path:
    """Write the shim as an executable file in ``folder`` and return its path."""
    path = folder / "shim-python"
    path.write_text(SHIM.format(python=sys.executable))
    path.chmod(0o755)
    return path
