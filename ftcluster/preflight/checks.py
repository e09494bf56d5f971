"""Pre-flight checks: the rows of `ftcluster doctor`, shared by the doctor and every backend.

A backend's ``preflight(spec)`` returns :class:`Check` rows; the doctor adds the spec, launch
file and storage rows around them. This module sits below both (it imports neither), and
runs nothing: the probe code is text that a backend runs where the job would run (this
machine, or a compute node through ``srun``), and :func:`parse_probe` reads its answer.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

SHM_MIN_BYTES = 1 << 30  # NCCL and DataLoader workers need more than Docker's 64 MB default
PROBE_MARK = "FTCLUSTER-PROBE "


@dataclass
class Check:
    """One line of the doctor's report."""

    name: str
    status: str  # ok | warn | fail | skip
    result: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def split_fix(message: str) -> tuple[str, str]:
    """ftcluster errors read 'what; how to fix': split them for the two columns."""
    what, sep, fix = message.partition("; ")
    return (what, fix) if sep else (message, "")


def failed(name: str, err: BaseException | str, fix: str = "") -> Check:
    """A failed check from an error (its first line; the part after '; ' is the fix)."""
    what, how = split_fix(str(err).splitlines()[0] if str(err) else type(err).__name__)
    return Check(name, "fail", what, fix or how)


def within(fn: Callable[[], Any], timeout: float) -> tuple[Any, BaseException | None]:
    """Run ``fn()`` for at most ``timeout`` seconds in a daemon thread (a store that never answers
    must not hang the doctor): (its value, None) or (None, its error); TimeoutError if it is still
    running then (the thread is left behind; it holds nothing the caller needs)."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported as the check's result
            result["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"no answer within {timeout:.0f}s")
    return result.get("value"), result.get("error")


def probe_code(nproc: int, spec: Any) -> str:
    """Python run where the job runs: /dev/shm, the next job's rendezvous port, packages (the
    common ones and the runtime modules of ``spec``'s engine recipe: DeepSpeed for a DeepSpeed job)."""
    from ..plan.engines import engine_for
    from ..plan.launch import PORT_BASE, PORT_SPAN

    mods = ["torch", "transformers", "peft", "s3fs", *engine_for(spec).runtime_modules]
    return "\n".join([
        "import importlib.util as u, json, os, socket",
        "o = {}",
        "s = os.statvfs('/dev/shm'); o['shm'] = s.f_frsize * s.f_blocks",
        "j = os.environ.get('SLURM_JOB_ID')",
        f"o['port'] = {PORT_BASE} + (int(j) + 1) % {PORT_SPAN} if j else None",
        "o['host'] = socket.gethostname()",
        "if o['port']:",
        "    k = socket.socket()",
        "    try: k.bind(('', o['port'])); o['port_free'] = True",
        "    except OSError: o['port_free'] = False",
        "    finally: k.close()",
        f"o['missing'] = [m for m in {mods!r} if u.find_spec(m) is None]",
        "o['liger'] = u.find_spec('liger_kernel') is not None",
        "try:",
        "    import ftcluster; o['ftcluster'] = ftcluster.__version__",
        "except ImportError: o['ftcluster'] = None",
        f"print({PROBE_MARK!r} + json.dumps(o))",
    ])


def parse_probe(stdout: str) -> dict[str, Any] | None:
    """The answer of :func:`probe_code`, or None if it did not print one."""
    for line in stdout.splitlines():
        if line.startswith(PROBE_MARK):
            return json.loads(line[len(PROBE_MARK):])
    return None


def shm_check(shm: int, nproc: int, where: str) -> Check:
    """/dev/shm of ``shm`` bytes: enough for ``nproc`` processes?"""
    gib = shm / (1 << 30)
    if shm >= SHM_MIN_BYTES:
        return Check("/dev/shm", "ok", f"{gib:.1f} GiB on {where}")
    fix = ("give the node/container a bigger /dev/shm (Docker: --shm-size=16g; Kubernetes: kubernetes.shm_size); "
           "NCCL and DataLoader workers fail with 'Bus error' otherwise")
    return Check("/dev/shm", "fail" if nproc > 1 else "warn", f"only {shm // (1 << 20)} MiB on {where}", fix)


def fused_loss_check(probe: dict[str, Any], where: str) -> Check:
    """GPU jobs: is Liger-Kernel there? The planner assumes its fused loss on GPUs (docs/planner.md)."""
    if probe.get("liger", True):
        return Check("fused loss", "ok", f"liger-kernel on {where}: 128k-vocabulary logits never materialise")
    return Check("fused loss", "warn", f"no liger-kernel on {where}: the runtime computes the plain loss, which "
                 "needs more memory than the plan assumed",
                 "pip install 'ftcluster[train,gpu]' there, or set env FTCLUSTER_FUSED_CE: '0' so the plan matches")


def python_check(probe: dict[str, Any], python: str, where: str, field: str) -> Check:
    """The probe's interpreter has ftcluster and the [train] extra?"""
    if probe.get("ftcluster") is None:
        return Check("python", "fail", f"{python} on {where} cannot import ftcluster",
                     f"pip install 'ftcluster[train]' into that environment, or point {field} at one that has it")
    if probe.get("missing"):
        return Check("python", "fail", f"{python} on {where} lacks {', '.join(probe['missing'])}",
                     f"pip install 'ftcluster[train]' there (or set {field})")
    return Check("python", "ok", f"{python} on {where}: ftcluster {probe['ftcluster']} with the [train] extra")
