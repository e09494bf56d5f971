"""The Slurm backend's pre-flight checks (`ftcluster doctor` on a spec with ``backend: slurm``).

Slurm facts come through the same :class:`~.slurm.Runner` that submits, so the checks run
locally or over SSH exactly as ``submit`` would. Checks that need a compute node (``/dev/shm``
there, the rendezvous port, the nodes' Python) start a one-node ``srun`` with the job's
placement options and setup (from :func:`ftcluster.plan.slurm_request.slurm_request`) and only run
with ``remote=True``, since that queues a job.
"""

from __future__ import annotations

import os
import re
import shlex
from typing import Any

from ...errors import FtclusterError
from ...plan.slurm_request import PLACEMENT, slurm_request
from ...preflight.checks import (
    Check,
    failed,
    fused_loss_check,
    parse_probe,
    probe_code,
    python_check,
    shm_check,
)

_BAD_NODE_STATES = ("down", "drain", "drng", "fail", "maint", "futr", "inval", "unk", "resv", "boot")


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


def probe_command(spec: Any, partition: str, code: str, request: Any = None) -> tuple[list[str], str]:
    """The one-node srun (argv without the script) and the bash script that runs ``code`` with the job's
    python, after the job's setup lines, on a node the job could get. ``request`` is the job's
    Slurm request when the caller has its launch plan (``plan.slurm``); else computed from the spec."""
    request = request if request is not None else slurm_request(spec)
    argv = ["srun", "-N1", "-n1", "-t", "2", "-J", "ftcluster-doctor", "--quiet", f"--partition={partition}"]
    argv += [f"--{o.name}={o.value}" for o in request.sbatch if o.name in PLACEMENT and o.name != "partition"]
    argv += request.srun_args()
    script = "\n".join(request.setup_lines + [f"exec {shlex.quote(spec.slurm.python)} -c {shlex.quote(code)}"])
    return argv, script


def check_passthrough(spec: Any) -> Check:
    names = spec.slurm.env_passthrough
    if not names:
        return Check("env passthrough", "skip", "slurm.env_passthrough is empty")
    missing = [n for n in names if n not in os.environ]
    if missing:
        return Check("env passthrough", "fail", f"not set in this shell: {', '.join(missing)}",
                     "export them before submitting, or remove them from slurm.env_passthrough")
    return Check("env passthrough", "ok", f"{len(names)} variable(s) set: {', '.join(names)}")


class SlurmPreflight:
    """The Slurm checks, sharing one runner (and one ssh connection).

    ``runner`` is the :class:`~.slurm.Runner` that submits (locally or over SSH), so each check
    sees the cluster exactly as ``submit`` would.
    """

    def __init__(self, spec: Any, runner: Any):
        self.spec = spec
        self.run = runner
        self.where = f"via ssh {spec.slurm.login}" if spec.slurm.login else "locally"
        self.partition: dict[str, str] = {}  # set by check_partition; later checks run only after it passed

    def client(self) -> Check:
        try:
            version = self.run(["sbatch", "--version"])
            self.run(["squeue", "--version"])
            ping = self.run(["scontrol", "ping"])
        except FtclusterError as err:
            return failed("slurm", err)
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
            return failed("nodes", f"sinfo failed: {(proc.stderr or proc.stdout).strip()[:200]}")
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
        code = probe_code(spec.resources.nproc_per_node, spec)
        argv, script = probe_command(spec, self.partition["PartitionName"], code)
        run = type(self.run)(login=self.run.login, timeout=max(self.run.timeout, 300))
        try:
            proc = run(argv + ["bash", "-c", script])
        except FtclusterError as err:
            return [failed("node probe", err)]
        probe = parse_probe(proc.stdout)
        if probe is None:
            tail = " ".join((proc.stderr + proc.stdout).split())[-200:] or f"exit {proc.returncode}"
            return [Check("python", "fail", f"{s.python} did not run on a node of "
                          f"{self.partition['PartitionName']} ({tail})",
                          "fix slurm.python / slurm.setup / slurm.modules so the interpreter starts on the nodes")]
        host = probe.get("host", "a node")
        checks = [shm_check(probe["shm"], spec.resources.nproc_per_node, host)]
        if probe.get("port_free"):
            checks.append(Check("rendezvous port", "ok", f"{probe['port']} (derived from the next job id) is free "
                                f"on {host}"))
        else:
            checks.append(Check("rendezvous port", "warn", f"{probe['port']} (derived from the next job id) is in "
                                f"use on {host}", "torchrun will fail to bind if it is still taken at start; resubmit"))
        checks.append(python_check(probe, s.python, host, "slurm.python"))
        if spec.resources.gpus_per_node and spec.env.get("FTCLUSTER_FUSED_CE") != "0":
            checks.append(fused_loss_check(probe, host))  # the planner assumed the fused loss on GPUs
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
            out.append(failed("slurm", err))
        return out
