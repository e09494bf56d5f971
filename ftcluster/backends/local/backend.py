"""The local backend: the same torchrun launch line, run on this machine.

``submit`` writes a run folder (payload, launch command, status, log) and starts a
detached supervisor (``python -m ftcluster.backends.local.supervisor RUN_DIR``) that
runs the job and records its end, so ``status``/``logs``/``cancel`` work from any
shell, after the submitting command has exited.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import BackendError, FtclusterError
from ...plan.launch import compile_plan, derived_port
from ...procs import alive
from ...storage.lease import RUN_ID_ENV
from ..base import (
    Backend,
    RunStatus,
    SubmitRequest,
    load_status,
    new_run_id,
    save_status,
    tail_file,
    write_atomic,
)
from .proctree import RUN_ENV, cancel_grace_s, run_key, run_pids, stop_all, wait_gone

if TYPE_CHECKING:
    from ...preflight.checks import Check


def free_port(preferred: int) -> int:
    """``preferred`` if free on loopback, else the next free one (the run records it)."""
    for port in list(range(preferred, min(preferred + 50, 65535))):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise BackendError(f"no free rendezvous port near {preferred} on 127.0.0.1")


class LocalBackend(Backend):
    """Run jobs as managed subprocesses on this machine."""

    name = "local"

    # -- submit -----------------------------------------------------------------
    def compile(self, spec: Any) -> Any:
        """The plan with ``local.env`` in its environment (the launch script exports it)."""
        return compile_plan(spec, spec.local.env)

    def submit_dryrun(self, plan: Any, run_id: str | None = None) -> SubmitRequest:
        """Everything that would run, with no side effects."""
        spec = plan.spec
        run_id = run_id or new_run_id(spec.name)
        run_dir = self.new_run_dir(spec, run_id)
        port = derived_port(run_id)
        python = spec.local.python or sys.executable
        argv = plan.torchrun_args(
            rdzv_endpoint=f"127.0.0.1:{port}", rdzv_id=run_id, python=python,
            spec_arg=["--spec", str(run_dir / "payload.json")],
        )
        files = {"payload.json": plan.payload_json() + "\n", "launch.sh": _launch_script(argv, plan.env, os.getcwd())}
        if plan.deepspeed is not None:
            files["deepspeed.json"] = json.dumps(plan.deepspeed, indent=1, sort_keys=True) + "\n"
        meta = {"name": spec.name, "spec_hash": plan.hash, "output_uri": plan.output_uri, "port": port,
                # Variants run one after another in this run; each picks its payload by FTCLUSTER_VARIANT.
                "steps": [{"name": v, "env": {"FTCLUSTER_VARIANT": v}} for v in plan.variants],
                "max_restarts": spec.resources.max_restarts}
        return SubmitRequest("local", run_id, run_dir, argv, files, dict(plan.env), os.getcwd(), meta)

    def schedule(self, req: SubmitRequest) -> RunStatus:
        """Write the run folder and start the supervisor."""
        _check_runtime(req.argv[0])
        port = free_port(req.meta["port"])
        if port != req.meta["port"]:
            req.argv = [a.replace(f"127.0.0.1:{req.meta['port']}", f"127.0.0.1:{port}") for a in req.argv]
            req.files["launch.sh"] = _launch_script(req.argv, req.env, req.cwd or os.getcwd())
        with self.creating_run_folder(req):
            launch = {"argv": req.argv, "env": req.env, "cwd": req.cwd, "steps": req.meta.get("steps", []),
                      "max_restarts": req.meta.get("max_restarts", 0)}
            write_atomic(req.run_dir / "launch.json", json.dumps(launch, indent=1, sort_keys=True))
            status = RunStatus(req.run_id, "local", req.meta["name"], "PENDING", str(req.run_dir),
                               submitted_at=time.time(), spec_hash=req.meta["spec_hash"],
                               output_uri=req.meta["output_uri"],
                               tasks=[{"name": s["name"], "job_id": None, "state": "PENDING", "message": ""}
                                      for s in req.meta.get("steps", [])])
            save_status(req.run_dir, status)
            with open(req.run_dir / "supervisor.log", "ab") as log:
                # RUN_ENV marks the supervisor and everything it starts as this run's (proctree);
                # RUN_ID_ENV names the run as the holder of its output's lease (storage/lease.py).
                proc = subprocess.Popen(
                    [sys.executable, "-m", "ftcluster.backends.local.supervisor", run_key(req.run_dir)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, cwd=req.cwd,
                    env={**os.environ, RUN_ENV: run_key(req.run_dir), RUN_ID_ENV: req.run_id},
                )
        write_atomic(req.run_dir / "supervisor.pid", str(proc.pid))
        return status  # no job id: a local run is named by its run id (the supervisor's pid is in the run folder)

    # -- query ------------------------------------------------------------------
    def status(self, run_ref: str) -> RunStatus:
        """The saved status, checked against the run's processes: a run is never reported ended
        (SUCCEEDED, FAILED, CANCELLED) while one of its processes is alive; it is STOPPING then."""
        run_dir = self.run_folder(run_ref)
        st = load_status(run_dir)
        if st.terminal:
            pids = run_pids(run_dir)
            return _stopping(st, f"ends as {st.state} once pid(s) {_pids(pids)} have exited") if pids else st
        # A live supervisor owns the run (it records the end after every process is gone): no
        # /proc scan then, so `status` and `list` stay cheap while runs are going.
        if not alive(_read_int(run_dir / "supervisor.pid")):
            pids = run_pids(run_dir)
            st = load_status(run_dir)  # it may have just finished
            if not st.terminal and pids:
                st.message = f"the supervisor is gone but pid(s) {_pids(pids)} of the run still run; `ftcluster " \
                             "cancel` stops them"
            elif not st.terminal:
                st.state, st.message = "FAILED", "the supervisor process is gone (machine restarted or killed)"
                st.ended_at = st.ended_at or time.time()
                save_status(run_dir, st)
        return st

    def logs(self, run_ref: str, follow: bool = False) -> Iterator[str]:
        run_dir = self.run_folder(run_ref)
        return tail_file(run_dir / "log.txt", follow, lambda: self.status(str(run_dir)).terminal)

    def cancel(self, run_ref: str) -> RunStatus:
        """Stop the run and return once every process of it has exited (bounded: the grace period
        FTCLUSTER_CANCEL_GRACE_S for the checkpoint, then SIGKILL); raise naming the pids that
        could not be stopped."""
        run_dir = self.run_folder(run_ref)
        st = self.status(str(run_dir))
        if st.terminal:
            return st
        (run_dir / "cancel-requested").write_text(str(time.time()))
        grace = cancel_grace_s()
        sup = _read_int(run_dir / "supervisor.pid")

        def run_and_supervisor() -> list[int]:
            return run_pids(run_dir) if alive(sup) else []

        if sup is not None and alive(sup):
            os.kill(sup, signal.SIGTERM)  # it forwards TERM (checkpoint, exit), SIGKILLs after the grace
            # The supervisor ends last, after the rest; +15 s for it to stop leftovers and record.
            wait_gone(run_and_supervisor, grace + 15.0, poll=0.2)
        # No supervisor (killed, or it did not finish in time): stop what is left from here.
        left = stop_all(lambda: run_pids(run_dir), 0.0 if alive(sup) else grace)
        if left:
            raise BackendError(f"{run_dir.name}: could not stop pid(s) {_pids(left)} of the run (stuck in the "
                               "kernel? see `ps -o pid,stat,cmd -p ...`); the run is not cancelled until they exit")
        st = load_status(run_dir)
        if not st.terminal:  # its supervisor was gone, so nobody recorded the end
            st.state, st.message, st.ended_at = "CANCELLED", "cancelled by the user", time.time()
            save_status(run_dir, st)
        return st

    # -- checks -----------------------------------------------------------------
    def preflight(self, spec: Any, remote: bool = False) -> list[Check]:
        """This machine: /dev/shm, a free rendezvous port and the interpreter (``local.python``)."""
        from ...preflight.checks import Check, failed, parse_probe, probe_code, python_check, shm_check

        r = spec.resources
        st = os.statvfs("/dev/shm")
        out = [shm_check(st.f_frsize * st.f_blocks, r.nproc_per_node, "this host")]
        try:
            port = free_port(derived_port(new_run_id(spec.name)))
            out.append(Check("rendezvous port", "ok", f"127.0.0.1:{port} binds"))
        except FtclusterError as err:
            out.append(failed("rendezvous port", err))
        python = spec.local.python or sys.executable
        fix = "set local.python to an interpreter with ftcluster[train]"
        try:
            proc = subprocess.run([python, "-c", probe_code(r.nproc_per_node, spec)], capture_output=True,
                                  text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return out + [Check("python", "fail", f"{python}: {exc}", fix)]
        probe = parse_probe(proc.stdout)
        if probe is None:
            return out + [Check("python", "fail", f"{python} did not run the probe (exit {proc.returncode})", fix)]
        return out + [python_check(probe, python, "this host", "local.python")]


def _pids(pids: list[int]) -> str:
    return ", ".join(map(str, pids))


def _stopping(st: RunStatus, message: str) -> RunStatus:
    """``st`` shown as STOPPING (not saved: it is what the processes say now, not a record)."""
    from dataclasses import replace

    return replace(st, state="STOPPING", message=message)


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _launch_script(argv: list[str], env: dict[str, str], cwd: str) -> str:
    lines = ["#!/bin/bash", "# The exact command the local backend runs (for reference and reruns).", "set -euo pipefail",
             f"cd {shlex.quote(cwd)}"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    lines.append("exec " + shlex.join(argv))
    return "\n".join(lines) + "\n"


def _check_runtime(python: str) -> None:
    """Fail before writing anything when the training runtime is not installed."""
    if python != sys.executable:
        return
    import importlib.util

    missing = [m for m in ("torch", "transformers", "peft") if importlib.util.find_spec(m) is None]
    if missing:
        raise BackendError(
            f"the local backend trains on this machine but {', '.join(missing)} is not installed; "
            "install the training extra: pip install 'ftcluster[train]' (see README)"
        )
