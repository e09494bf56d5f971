"""The Slurm backend: sbatch / squeue / sacct / scontrol / scancel through one injected runner.

The runner is the only thing that executes commands, so the same backend drives a local
Slurm client or a login node over SSH (``slurm.login: user@host``), and tests can point
it at a live cluster. The rendered script goes to ``sbatch`` on stdin, so nothing needs
copying to the login node first.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import BackendError
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
from .array import array_log_pattern, array_logs, refresh_array
from .state import (
    STATE_MAP,
    controller_unreachable,
    fault_restarts,
    faults_in_log,
    first_line,
    query_state,
    sbatch_job_id,
)

if TYPE_CHECKING:
    from ...preflight.checks import Check

@dataclass
class Runner:
    """Runs Slurm client commands locally, or on ``login`` over SSH (see :mod:`.ssh`).

    ``env`` adds environment variables for the command (sbatch exports them to the job);
    over SSH they travel on stdin, not in argv. ssh's own failures (exit 255) and a
    command missing on the remote PATH (exit 127) raise a one-line BackendError.
    """

    login: str | None = None
    timeout: float = 60.0

    def __call__(self, argv: list[str], stdin: str | None = None,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        if self.login:
            return self._remote(self.login, argv, stdin, env or {})
        if shutil.which(argv[0]) is None:
            raise BackendError(
                f"`{argv[0]}` is not on PATH: run ftcluster on a Slurm login node, or set slurm.login: user@host "
                "to submit over SSH"
            )
        return self._exec(argv, argv, stdin, {**os.environ, **env} if env else None)

    def _remote(self, login: str, argv: list[str], stdin: str | None,
                env: dict[str, str]) -> subprocess.CompletedProcess:
        from . import ssh

        cmd = ssh.ssh_argv(login, ssh.remote_command(argv, sorted(env)))
        if env:
            stdin = ssh.env_preamble(env) + (stdin or "")
        proc = self._exec(cmd, argv, stdin, None)
        if proc.returncode == 255:
            raise ssh.ssh_error(login, proc.stderr)
        if proc.returncode == 127 and ssh.BEGIN in proc.stdout:
            raise BackendError(
                f"`{argv[0]}` is not on PATH on {self.login}, even in a login shell (bash -l); load Slurm in "
                "~/.bash_profile there (e.g. `module load slurm`)"
            )
        proc.stdout = ssh.strip_preamble(proc.stdout)
        return proc

    def _exec(self, cmd: list[str], argv: list[str], stdin: str | None,
              env: dict[str, str] | None) -> subprocess.CompletedProcess:
        where = f" on {self.login}" if self.login else ""
        try:
            return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=self.timeout, env=env,
                                  errors="surrogateescape",
                                  stdin=None if stdin is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise BackendError(
                f"`{shlex.join(argv)}`{where} did not answer within {self.timeout:.0f}s; is slurmctld up?") from None
        except FileNotFoundError:
            raise BackendError(f"cannot run {cmd[0]!r}; is it installed?") from None


def _spec_file(spec: Any) -> str | None:
    """The job file as the user named it (for the hint to run the doctor on it), or None."""
    source = getattr(spec, "_source_file", None)
    return source if source and not source.startswith("<") else None


class SlurmBackend(Backend):
    """Submit and manage jobs on Slurm."""

    name = "slurm"

    def __init__(self, runner: Runner | None = None, root: Path | None = None):
        super().__init__(root)
        self._runner = runner

    def runner(self, login: str | None) -> Runner:
        """What runs Slurm commands for a job submitted through ``login`` (the injected runner, if any)."""
        return self._runner or Runner(login=login)

    # -- submit -----------------------------------------------------------------
    def submit_dryrun(self, plan: Any, run_id: str | None = None) -> SubmitRequest:
        """The sbatch command and script, with no side effects."""
        from ...render import render_plan

        return self._sbatch_request(plan.spec, plan.spec.name, render_plan(plan, "slurm"), list(plan.variants),
                                    plan.log_pattern, plan.output_uri, plan.hash, run_id)

    def prepare_dryrun(self, pp: Any, run_id: str | None = None) -> SubmitRequest:
        """``ftcluster prepare-data --submit``: the sbatch command and job array script (one task per
        ``data.prepare.tasks``, followed like a job array of variants ``task-N``), no side effects."""
        from ...render import render_prepare

        return self._sbatch_request(pp.spec, pp.name, render_prepare(pp, "slurm"),
                                    [f"task-{i}" for i in range(pp.tasks)], pp.log_pattern, pp.spec.data.train,
                                    pp.hash, run_id)

    def _sbatch_request(self, spec: Any, name: str, files: dict[str, str], variants: list[str], log_pattern: str,
                        output_uri: str, spec_hash: str, run_id: str | None) -> SubmitRequest:
        (script_name, _), = files.items()
        run_id = run_id or new_run_id(name)
        run_dir = self.new_run_dir(spec, run_id)
        argv = ["sbatch", "--parsable"]
        meta = {"name": name, "script": script_name, "login": spec.slurm.login,
                "variants": variants, "sbatch_args": [], "output_pattern": log_pattern,
                "output_uri": output_uri, "env_passthrough": list(spec.slurm.env_passthrough),
                "spec_hash": spec_hash, "spec_file": _spec_file(spec)}
        if spec.slurm.login:  # what runs, in short: ssh LOGIN bash -lc 'exec sbatch --parsable' < script
            return SubmitRequest("slurm", run_id, run_dir, ["ssh", spec.slurm.login, *argv], files, {}, os.getcwd(),
                                 meta, stdin_file=script_name)
        # sbatch reads the script on stdin when it runs; a file argument is the same and can be pasted.
        return SubmitRequest("slurm", run_id, run_dir, [*argv, script_name], files, {}, os.getcwd(), meta)

    def schedule(self, req: SubmitRequest) -> RunStatus:
        """Run sbatch; the run folder only stays when the submission succeeded."""
        script = req.files[req.meta["script"]]
        with self.creating_run_folder(req):
            # Over SSH the submitting environment is the remote shell: send the passthrough variables along
            # (on stdin, see .ssh); locally sbatch inherits them from this process anyway.
            login = req.meta["login"]
            env = {n: os.environ[n] for n in req.meta.get("env_passthrough", ()) if n in os.environ} if login else {}
            # The run's id reaches the job the same way (sbatch's default --export=ALL): the holder of its
            # output's lease, kept across requeues with the job id (storage/lease.py).
            env[RUN_ID_ENV] = req.run_id
            proc = self.runner(login)(["sbatch", "--parsable", *req.meta.get("sbatch_args", ())], stdin=script, env=env)
            if proc.returncode != 0:
                unreachable = controller_unreachable(proc.stderr + proc.stdout)
                if unreachable:  # the doctor's "slurm" row says the same, with what to check
                    where = f"via ssh {login}" if login else "from this machine"
                    raise BackendError(f"no Slurm controller reachable {where} (sbatch: {unreachable}); run "
                                       f"ftcluster doctor {req.meta.get('spec_file') or 'JOB.yaml'}")
                raise BackendError(f"sbatch rejected the job: {first_line(proc.stderr or proc.stdout)}")
            job_id = sbatch_job_id(proc.stdout)
        status = RunStatus(req.run_id, "slurm", req.meta["name"], "PENDING", str(req.run_dir), job_id=job_id,
                           submitted_at=time.time(), spec_hash=req.meta["spec_hash"], output_uri=req.meta["output_uri"])
        extra = {"log": self._log_path(req, job_id), "login": login, "cwd": req.cwd}
        if req.meta.get("variants"):  # a job array: one log per task (see .slurm_array)
            extra.update(variants=req.meta["variants"], log=array_log_pattern(req.meta, job_id, req.cwd))
        write_atomic(req.run_dir / "slurm.json", json.dumps(extra, indent=1, sort_keys=True))
        save_status(req.run_dir, status)
        return status

    def _log_path(self, req: SubmitRequest, job_id: str) -> str:
        """The job's stdout file: Slurm's own answer (StdOut=), else the pattern resolved by hand.

        Over SSH a relative path is relative to the remote home, where sbatch ran.
        """
        login = req.meta["login"]
        try:
            proc = self.runner(login)(["scontrol", "show", "job", "-o", job_id])
            m = re.search(r"(?:^|\s)StdOut=(\S+)", proc.stdout) if proc.returncode == 0 else None
        except BackendError:
            m = None
        if m:
            return m.group(1)
        log = req.meta["output_pattern"].replace("%x", req.meta["name"]).replace("%j", job_id)
        return log if login else str(Path(req.cwd or ".") / log)

    # -- query ------------------------------------------------------------------
    def _extra(self, run_dir: Path) -> dict[str, Any]:
        try:
            return json.loads((run_dir / "slurm.json").read_text())
        except (OSError, ValueError):
            return {}

    def status(self, run_ref: str) -> RunStatus:
        run_dir = self.run_folder(run_ref)
        st = load_status(run_dir)
        if st.terminal or not st.job_id:
            return st
        extra = self._extra(run_dir)
        run = self.runner(extra.get("login"))
        if extra.get("variants"):
            return refresh_array(st, run_dir, extra, run)
        info = query_state(run, st.job_id)
        raw = info.raw_state
        if raw is None:
            st.message = f"Slurm no longer knows job {st.job_id} (no accounting, past MinJobAge); last state {st.state}"
            st.state = "UNKNOWN"
            return st
        st.state = STATE_MAP.get(raw, "RUNNING")
        st.message = "" if raw in ("RUNNING", "PENDING", "COMPLETED") else raw
        if info.exit_code is not None:
            st.returncode = info.exit_code
        st.started_at = st.started_at or info.started_at  # the first start, when the job was requeued
        self._faults(st, extra, run)
        if st.terminal:
            st.ended_at = info.ended_at or time.time()
        save_status(run_dir, st)
        return st

    def _faults(self, st: RunStatus, extra: dict[str, Any], run: Any) -> None:
        """The fault restarts (the job's Comment) and, where the log is on this machine, each attempt's
        first failure as the log names it (docs/lifecycle.md, "Faults")."""
        restarts = fault_restarts(run, st.job_id or "")
        if restarts is not None:
            st.restarts = max(st.restarts, restarts)
        log = Path(extra.get("log", ""))
        if not extra.get("login") and extra.get("log") and log.is_file():
            st.faults = faults_in_log(log.read_text(errors="replace"))
        if st.restarts:
            note = f"restarted {st.restarts} time(s) after infrastructure faults"
            if st.faults:
                note += f", first: {st.faults[0]['what']}"
            st.message = f"{st.message}; {note}" if st.message else note

    def logs(self, run_ref: str, follow: bool = False) -> Iterator[str]:
        run_dir = self.run_folder(run_ref)
        extra = self._extra(run_dir)
        done = lambda: self.status(str(run_dir)).state in ("SUCCEEDED", "FAILED", "CANCELLED", "UNKNOWN")  # noqa: E731
        if extra.get("variants"):
            return array_logs(extra, follow, lambda: self.status(str(run_dir)),
                              lambda log, f, d: self._tail(extra, log, f, d))
        return self._tail(extra, extra.get("log", ""), follow, done)

    def _tail(self, extra: dict[str, Any], log: str, follow: bool, done) -> Iterator[str]:
        if extra.get("login"):
            return self._remote_tail(extra["login"], log, follow, done)
        return tail_file(Path(log), follow, done)

    def _remote_tail(self, login: str, log: str, follow: bool, is_done, poll: float = 1.0) -> Iterator[str]:
        """Like :func:`tail_file`, reading the log on the login node: `tail -c +OFFSET` over the shared
        ssh connection, so each poll costs one round trip, not a new login."""
        run = self.runner(login)
        pos = 0
        while True:
            proc = run(["tail", "-c", f"+{pos + 1}", "--", log])
            if proc.returncode == 0 and proc.stdout:
                raw = proc.stdout.encode("utf-8", errors="surrogateescape")  # exact bytes: the next offset
                pos += len(raw)
                yield from raw.decode("utf-8", errors="replace").splitlines(keepends=True)
            if not follow:
                return
            if is_done():
                follow = False
                continue
            time.sleep(poll)

    def cancel(self, run_ref: str) -> RunStatus:
        run_dir = self.run_folder(run_ref)
        st = self.status(str(run_dir))
        if st.terminal or not st.job_id:
            return st
        # scancel sends SIGTERM to every step first; the runtime checkpoints on it (KillWait later).
        proc = self.runner(self._extra(run_dir).get("login"))(["scancel", st.job_id])
        if proc.returncode != 0:
            raise BackendError(f"scancel {st.job_id} failed: {first_line(proc.stderr)}")
        return st

    # -- checks -----------------------------------------------------------------
    def preflight(self, spec: Any, remote: bool = False) -> list[Check]:
        """The cluster (client, partition, nodes, time limit; with ``remote`` a one-node probe job) and the
        submitting shell's passthrough variables (see :mod:`.slurm_preflight`)."""
        from .preflight import SlurmPreflight, check_passthrough

        return SlurmPreflight(spec, self.runner(spec.slurm.login)).checks(remote) + [check_passthrough(spec)]
