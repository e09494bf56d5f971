"""`ftcluster doctor job.yaml`: check a job against the cluster it targets before submitting.

Each check returns a :class:`Check` (ok / warn / fail / skip, what was found, how to fix it).
Slurm facts come through the same :class:`~ftcluster.backends.slurm.Runner` that submits, so
the checks run locally or over SSH exactly as ``submit`` would. Checks that need a compute node
(``/dev/shm`` there, the rendezvous port, the nodes' Python) start a one-node ``srun`` and only
run with ``remote=True``, since that queues a job. Imports stay light: no torch, no s3fs until
the output check needs it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass
from typing import Any

from .errors import FtclusterError

SHM_MIN_BYTES = 1 << 30  # NCCL and DataLoader workers need more than Docker's 64 MB default
PROBE_MARK = "FTCLUSTER-PROBE "
_BAD_NODE_STATES = ("down", "drain", "drng", "fail", "maint", "futr", "inval", "unk", "resv", "boot")


@dataclass
class Check:
    """One line of the doctor's report."""

    name: str
    status: str  # ok | warn | fail | skip
    result: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _split_fix(message: str) -> tuple[str, str]:
    """ftcluster errors read 'what; how to fix': split them for the two columns."""
    what, sep, fix = message.partition("; ")
    return (what, fix) if sep else (message, "")


def _fail(name: str, err: BaseException | str, fix: str = "") -> Check:
    what, how = _split_fix(str(err).splitlines()[0] if str(err) else type(err).__name__)
    return Check(name, "fail", what, fix or how)


# --------------------------------------------------------------------------- parsing Slurm output


def slurm_seconds(text: str) -> int | None:
    """A Slurm time (MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]) in seconds; None for UNLIMITED/INFINITE."""
    text = text.strip()
    if text.upper() in ("UNLIMITED", "INFINITE", "NONE", "N/A"):
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        parts += [0] * (3 - len(parts))
        h, m, s = parts
        return ((int(days) * 24 + h) * 60 + m) * 60 + s
    if len(parts) == 1:
        return parts[0] * 60
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]
    h, m, s = parts
    return (h * 60 + m) * 60 + s


def parse_gres(text: str) -> dict[str | None, int]:
    """GPUs per type from a node's gres (sinfo %G), e.g. ``gpu:h100:8(S:0-1),shard:4`` -> {"h100": 8}.

    Untyped GPUs (``gpu:2``) count under None.
    """
    out: dict[str | None, int] = {}
    for item in re.split(r",(?![^()]*\))", text.strip()):
        item = re.sub(r"\(.*?\)", "", item).strip()
        fields = item.split(":")
        if fields[0] != "gpu" or len(fields) < 2:
            continue
        count = re.match(r"\d+", fields[-1])
        if not count:
            continue
        gtype = fields[1] if len(fields) >= 3 else None
        out[gtype] = out.get(gtype, 0) + int(count.group())
    return out


def gpus_of_type(gres: dict[str | None, int], gpu_type: str | None) -> int:
    """GPUs usable for a request of ``gpu_type`` (None: any type)."""
    if gpu_type is None:
        return sum(gres.values())
    return sum(n for t, n in gres.items() if t is not None and t.lower() == gpu_type.lower())


def memory_mb(text: str) -> int:
    """Slurm memory (``128G``, ``500M``, plain MB) in MB."""
    m = re.match(r"^(\d+)([KMGT]?)$", text.strip().upper())
    if not m:
        return 0
    n, unit = int(m.group(1)), m.group(2)
    return {"K": n // 1024, "": n, "M": n, "G": n * 1024, "T": n * 1024 * 1024}[unit]


def _kv(line: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in line.split() if "=" in kv)


# --------------------------------------------------------------------------- the probe run on a node

def probe_code(nproc: int, method: str) -> str:
    """Python run on a compute node (or locally): /dev/shm, the next job's rendezvous port, packages."""
    from .plan import PORT_BASE, PORT_SPAN

    mods = ["torch", "transformers", "peft", "s3fs"] + (["deepspeed"] if method == "full" else [])
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
        "try:",
        "    import ftcluster; o['ftcluster'] = ftcluster.__version__",
        "except ImportError: o['ftcluster'] = None",
        f"print({PROBE_MARK!r} + json.dumps(o))",
    ])


def parse_probe(stdout: str) -> dict[str, Any] | None:
    for line in stdout.splitlines():
        if line.startswith(PROBE_MARK):
            return json.loads(line[len(PROBE_MARK):])
    return None


def _shm_check(shm: int, nproc: int, where: str) -> Check:
    gib = shm / (1 << 30)
    if shm >= SHM_MIN_BYTES:
        return Check("/dev/shm", "ok", f"{gib:.1f} GiB on {where}")
    fix = ("give the node/container a bigger /dev/shm (Docker: --shm-size=16g; Kubernetes: kubernetes.shm_size); "
           "NCCL and DataLoader workers fail with 'Bus error' otherwise")
    return Check("/dev/shm", "fail" if nproc > 1 else "warn", f"only {shm // (1 << 20)} MiB on {where}", fix)


def _python_check(probe: dict[str, Any], python: str, where: str, field: str) -> Check:
    if probe.get("ftcluster") is None:
        return Check("python", "fail", f"{python} on {where} cannot import ftcluster",
                     f"pip install 'ftcluster[train]' into that environment, or point {field} at one that has it")
    if probe.get("missing"):
        return Check("python", "fail", f"{python} on {where} lacks {', '.join(probe['missing'])}",
                     f"pip install 'ftcluster[train]' there (or set {field})")
    return Check("python", "ok", f"{python} on {where}: ftcluster {probe['ftcluster']} with the [train] extra")


# --------------------------------------------------------------------------- checks


def check_spec(path: str, overrides: list[str]) -> tuple[Check, Any]:
    from .errors import SpecError
    from .loader import load_spec

    try:
        spec = load_spec(path, overrides)
    except SpecError as err:
        n = len(err.problems)
        return Check("spec", "fail", f"{n} problem(s), first: {err.problems[0]}",
                     f"`ftcluster validate {path}` lists every problem with its fix"), None
    except FtclusterError as err:
        return _fail("spec", err), None
    return Check("spec", "ok", f"{spec.name} ({spec.method}), world size {spec.world_size}, backend {spec.backend}"), spec


def check_render(spec: Any) -> Check:
    """The launch files build: what `submit --dry-run` shows (`render` for Kubernetes)."""
    from .backends import get_backend
    from .render import default_target, render

    try:
        if spec.backend == "kubernetes":
            files = render(spec, default_target(spec))
        else:
            files = get_backend(spec.backend).submit_dryrun(spec).files
    except FtclusterError as err:
        return _fail("launch files", err)
    return Check("launch files", "ok", ", ".join(files))


def check_output(spec: Any, timeout: float = 60.0) -> Check:
    """Write, read back and delete a small probe object at output.uri with this shell's credentials."""
    uri = spec.output.uri.rstrip("/")
    name = f".ftcluster-doctor-{secrets.token_hex(4)}"
    result: dict[str, Any] = {}

    def probe() -> None:
        try:
            import fsspec

            fs, path = fsspec.core.url_to_fs(uri, **spec.output.storage_options)
            created = []
            if "file" in fs.protocol or "local" in fs.protocol:  # object stores need no folders (and
                parent = path                                   # makedirs would create a bucket)
                while not fs.exists(parent):
                    created.append(parent)
                    parent = parent.rsplit("/", 1)[0]
                fs.makedirs(path, exist_ok=True)
            target = f"{path}/{name}"
            fs.pipe_file(target, b"ftcluster doctor probe\n")
            ok = fs.cat_file(target) == b"ftcluster doctor probe\n"
            fs.rm_file(target)
            for folder in created:  # leave the filesystem as it was
                fs.rmdir(folder)
            result["ok"] = ok
        except BaseException as exc:  # reported as the check's result
            result["error"] = exc

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        return Check("output", "fail", f"{uri}: no answer within {timeout:.0f}s",
                     "check the endpoint (output.storage_options.client_kwargs.endpoint_url) and the network")
    err = result.get("error")
    if isinstance(err, ImportError):
        return Check("output", "fail", f"{uri}: {err}", "pip install 'ftcluster[train]' (it brings s3fs/gcsfs)")
    if err is not None:
        msg = " ".join(str(err).split()) or type(err).__name__
        return Check("output", "fail", f"{uri}: cannot write a probe object ({type(err).__name__}: {msg[:200]})",
                     _storage_fix(uri))
    if not result.get("ok"):
        return Check("output", "fail", f"{uri}: the probe object read back different bytes", "check the storage")
    return Check("output", "ok", f"{uri}: wrote, read and deleted {name}")


def _storage_fix(uri: str) -> str:
    if uri.startswith(("s3://", "s3a://")):
        return ("check the bucket exists and this shell's credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE or an instance role) may write there; endpoint: output.storage_options.client_kwargs")
    if uri.startswith(("gs://", "gcs://")):
        return "check the bucket exists and GOOGLE_APPLICATION_CREDENTIALS (or workload identity) may write there"
    return "check the folder's parent exists and you may write there, or change output.uri"


def check_passthrough(spec: Any) -> Check:
    names = spec.slurm.env_passthrough
    if not names:
        return Check("env passthrough", "skip", "slurm.env_passthrough is empty")
    missing = [n for n in names if n not in os.environ]
    if missing:
        return Check("env passthrough", "fail", f"not set in this shell: {', '.join(missing)}",
                     "export them before submitting, or remove them from slurm.env_passthrough")
    return Check("env passthrough", "ok", f"{len(names)} variable(s) set: {', '.join(names)}")


class SlurmDoctor:
    """The Slurm checks, sharing one runner (and one ssh connection)."""

    def __init__(self, spec: Any, runner: Any = None):
        from .backends.slurm import Runner

        self.spec = spec
        self.run = runner or Runner(login=spec.slurm.login)
        self.where = f"via ssh {spec.slurm.login}" if spec.slurm.login else "locally"
        self.partition: dict[str, str] | None = None

    def client(self) -> Check:
        try:
            version = self.run(["sbatch", "--version"])
            self.run(["squeue", "--version"])
            ping = self.run(["scontrol", "ping"])
        except FtclusterError as err:
            return _fail("slurm", err)
        if ping.returncode != 0 or " UP" not in ping.stdout:
            return Check("slurm", "fail", f"slurmctld does not answer {self.where} "
                         f"({(ping.stdout + ping.stderr).strip()[:160] or 'no output'})",
                         "check `scontrol ping` on the login node; is slurmctld up?")
        return Check("slurm", "ok", f"{version.stdout.strip()} {self.where}; {ping.stdout.strip()}")

    def check_partition(self) -> Check:
        name = self.spec.slurm.partition
        proc = self.run(["scontrol", "show", "partition", "-o"] + ([name] if name else []))
        if proc.returncode != 0 or not proc.stdout.strip():
            avail = self._partition_names()
            return Check("partition", "fail", f"partition {name!r} not found {self.where}",
                         f"set slurm.partition to one of: {', '.join(avail) or '(none visible)'}")
        parts = [_kv(line) for line in proc.stdout.splitlines() if "PartitionName=" in line]
        if name is None:
            defaults = [p for p in parts if p.get("Default") == "YES"]
            if not defaults:
                return Check("partition", "fail", "slurm.partition is not set and the cluster has no default",
                             f"set slurm.partition to one of: {', '.join(p['PartitionName'] for p in parts)}")
            parts = defaults
        self.partition = parts[0]
        p = self.partition
        if p.get("State") != "UP":
            return Check("partition", "fail", f"{p['PartitionName']} is {p.get('State')}",
                         "pick another partition or ask the admins when it comes back")
        return Check("partition", "ok", f"{p['PartitionName']}: {p.get('TotalNodes', '?')} nodes, "
                     f"MaxTime={p.get('MaxTime')}, State=UP")

    def _partition_names(self) -> list[str]:
        proc = self.run(["sinfo", "-h", "-o", "%R"])
        return sorted(set(proc.stdout.split())) if proc.returncode == 0 else []

    def check_nodes(self) -> Check:
        """Enough usable nodes with the requested GPUs (gres type/count), CPUs and memory."""
        r = self.spec.resources
        pname = self.partition["PartitionName"]
        proc = self.run(["sinfo", "-h", "-N", "-p", pname, "-o", "%N|%G|%t|%c|%m"])
        if proc.returncode != 0:
            return _fail("nodes", f"sinfo failed: {(proc.stderr or proc.stdout).strip()[:200]}")
        nodes = {}
        for line in proc.stdout.splitlines():
            fields = line.strip().split("|")
            if len(fields) == 5:
                nodes[fields[0]] = fields
        usable = [f for f in nodes.values() if not f[2].rstrip("*~#!%$@^-+").startswith(_BAD_NODE_STATES)]
        want_mem = memory_mb(r.memory) if r.memory else 0
        need = r.gpus_per_node
        what = (f"{need} x gpu{':' + r.gpu_type if r.gpu_type else ''}" if need else "a CPU-only task") + (
            f", {r.cpus_per_node} CPUs" if r.cpus_per_node else "") + (f", {r.memory}" if r.memory else "")
        fit = [f for f in usable
               if gpus_of_type(parse_gres(f[1]), r.gpu_type) >= need
               and (not r.cpus_per_node or int(f[3].rstrip("+") or 0) >= r.cpus_per_node)
               and memory_mb(f[4].rstrip("+") or "0") >= want_mem]
        if len(fit) >= r.nodes:
            return Check("nodes", "ok", f"{len(fit)} of {len(nodes)} nodes in {pname} fit {what}; the job needs {r.nodes}")
        have = sorted({f"{f[1]} cpus={f[3]} mem={f[4]}M" for f in usable}) or ["no usable node"]
        most = max((gpus_of_type(parse_gres(f[1]), r.gpu_type) for f in usable), default=0)
        fix = f"the job needs {r.nodes} node(s) with {what}; "
        if need > most:
            fix += (f"lower resources.gpus_per_node to {most} (and raise resources.nodes)" if most else
                    "check resources.gpu_type") + " or pick a partition with such nodes (`sinfo -o '%P %G %D'`)"
        else:
            fix += "lower resources.nodes/cpus_per_node/memory or pick a bigger partition"
        return Check("nodes", "fail", f"{len(fit)} usable node(s) in {pname} fit {what} (nodes have: "
                     f"{'; '.join(have)[:160]})", fix)

    def check_time(self) -> Check:
        p, r = self.partition, self.spec.resources
        max_s = slurm_seconds(p.get("MaxTime", "UNLIMITED"))
        want = r.time_limit_seconds
        if want is None:
            return Check("time limit", "warn", f"no resources.time_limit: {p['PartitionName']}'s DefaultTime="
                         f"{p.get('DefaultTime')} applies", "set resources.time_limit so the requeue signal is timed")
        if max_s is not None and want > max_s:
            return Check("time limit", "fail", f"{r.time_limit} exceeds {p['PartitionName']} MaxTime={p['MaxTime']}",
                         f"lower resources.time_limit to at most {p['MaxTime']}; the job requeues and resumes anyway")
        if want <= self.spec.slurm.signal_seconds:
            return Check("time limit", "fail", f"{r.time_limit} is not longer than slurm.signal_seconds "
                         f"({self.spec.slurm.signal_seconds})", "raise resources.time_limit or lower slurm.signal_seconds")
        return Check("time limit", "ok", f"{r.time_limit} within MaxTime={p.get('MaxTime')}")

    def probe_node(self) -> list[Check]:
        """One `srun -N1` on the partition running the probe with the job's setup and python."""
        s, spec = self.spec.slurm, self.spec
        argv = ["srun", "-N1", "-n1", "-p", self.partition["PartitionName"], "-t", "2", "-J", "ftcluster-doctor",
                "--quiet"]
        for flag, value in (("-A", s.account), ("--qos", s.qos), ("--reservation", s.reservation),
                            ("--container-image", s.container_image)):
            if value:
                argv += [flag, value]
        if s.container_mounts:
            argv += ["--container-mounts", ",".join(s.container_mounts)]
        setup = [f"module load {shlex.quote(m)}" for m in s.modules] + list(s.setup)
        code = probe_code(spec.resources.nproc_per_node, spec.method)
        script = "\n".join(setup + [f"exec {shlex.quote(s.python)} -c {shlex.quote(code)}"])
        run = type(self.run)(login=self.run.login, timeout=max(self.run.timeout, 300))
        try:
            proc = run(argv + ["bash", "-c", script])
        except FtclusterError as err:
            return [_fail("node probe", err)]
        probe = parse_probe(proc.stdout)
        if probe is None:
            tail = " ".join((proc.stderr + proc.stdout).split())[-200:] or f"exit {proc.returncode}"
            return [Check("python", "fail", f"{s.python} did not run on a node of "
                          f"{self.partition['PartitionName']} ({tail})",
                          "fix slurm.python / slurm.setup / slurm.modules so the interpreter starts on the nodes")]
        host = probe.get("host", "a node")
        checks = [_shm_check(probe["shm"], spec.resources.nproc_per_node, host)]
        if probe.get("port_free"):
            checks.append(Check("rendezvous port", "ok", f"{probe['port']} (derived from the next job id) is free "
                                f"on {host}"))
        else:
            checks.append(Check("rendezvous port", "warn", f"{probe['port']} (derived from the next job id) is in "
                                f"use on {host}", "torchrun will fail to bind if it is still taken at start; resubmit"))
        checks.append(_python_check(probe, s.python, host, "slurm.python"))
        return checks

    def checks(self, remote: bool) -> list[Check]:
        out = [self.client()]
        if out[0].status == "fail":
            return out + [Check("partition", "skip", "Slurm is not reachable")]
        try:
            out.append(self.check_partition())
            if self.partition is None or out[-1].status == "fail":
                return out
            out += [self.check_nodes(), self.check_time()]
            if remote:
                out += self.probe_node()
            else:
                out.append(Check("node probe", "skip", "/dev/shm, rendezvous port and the nodes' python",
                                 "run with --remote (queues a 1-node, 2-minute job)"))
        except FtclusterError as err:
            out.append(_fail("slurm", err))
        return out


def local_checks(spec: Any) -> list[Check]:
    """The local backend: /dev/shm, a free rendezvous port and the interpreter of this machine."""
    from .backends.base import new_run_id
    from .backends.local import _free_port
    from .plan import derived_port

    r = spec.resources
    st = os.statvfs("/dev/shm")
    out = [_shm_check(st.f_frsize * st.f_blocks, r.nproc_per_node, "this host")]
    preferred = derived_port(new_run_id(spec.name))
    try:
        port = _free_port(preferred)
        out.append(Check("rendezvous port", "ok", f"127.0.0.1:{port} binds"))
    except FtclusterError as err:
        out.append(_fail("rendezvous port", err))
    python = spec.local.python or sys.executable
    try:
        proc = subprocess.run([python, "-c", probe_code(r.nproc_per_node, spec.method)], capture_output=True,
                              text=True, timeout=120)
        probe = parse_probe(proc.stdout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        probe, proc = None, None
        out.append(Check("python", "fail", f"{python}: {exc}", "set local.python to an interpreter with ftcluster[train]"))
    if probe is not None:
        out.append(_python_check(probe, python, "this host", "local.python"))
    elif proc is not None:
        out.append(Check("python", "fail", f"{python} did not run the probe (exit {proc.returncode})",
                         "set local.python to an interpreter with ftcluster[train]"))
    return out


def diagnose(path: str, overrides: list[str] | None = None, *, remote: bool = False, runner: Any = None,
             context: str | None = None) -> list[Check]:
    """Every check for the job at ``path``; a failed spec check stops the rest."""
    first, spec = check_spec(path, list(overrides or []))
    if spec is None:
        return [first]
    out = [first, check_render(spec)]
    if spec.backend == "slurm":
        out += SlurmDoctor(spec, runner).checks(remote)
        out.append(check_passthrough(spec))
    elif spec.backend == "local":
        out += local_checks(spec)
    elif spec.backend == "kubernetes":
        from .backends import get_backend

        out += get_backend("kubernetes", context=context).preflight(spec)
    else:
        out.append(Check("cluster", "skip", f"backend {spec.backend}: no cluster checks yet",
                         "`kubectl apply --dry-run=server -f` the rendered manifests"))
    out.append(check_output(spec))
    return out


def print_report(checks: list[Check]) -> None:
    """The report as a rich table: check / result / how to fix."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    style = {"ok": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}
    t = Table(box=None, show_lines=False, pad_edge=False)
    for col in ("CHECK", "", "RESULT", "HOW TO FIX"):
        t.add_column(col, overflow="fold")
    for c in checks:
        t.add_row(escape(c.name), f"[{style[c.status]}]{c.status}[/]", escape(c.result), escape(c.fix))
    Console().print(t)
