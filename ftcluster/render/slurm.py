"""Slurm target: one plain, reviewable ``sbatch`` script per job.

All logic lives here; ``templates/sbatch.sh.j2`` (shipped compiled, see
:mod:`ftcluster.render.template`) only places lines that are already formatted and
shell-quoted (Jinja2 with ``StrictUndefined``, so a misspelled variable is an error, not an
empty string). The script:

* carries sorted, ``shlex.quote``d ``#SBATCH`` lines (submitit's layout);
* runs one ``srun`` task per node, each a torchrun (``ftcluster.train.launch``) with c10d
  rendezvous on the first node at a port derived from the job id (REFERENCE.md: a fixed
  29500 collides when two jobs share a node);
* carries the resolved spec in the ``FTCLUSTER_PAYLOAD`` variable, which srun passes to
  every node, so no shared filesystem is needed;
* traps USR2 (``--signal=B:USR2@<s>``) and TERM in the batch shell, forwards them to the
  step so every rank checkpoints, and requeues when the step reports a checkpoint-and-stop
  (exit 143).
"""

from __future__ import annotations

import re
import shlex
from typing import Any

from ..errors import RenderError
from ..plan.launch import PORT_BASE, PORT_SPAN
from ..spec.envbuild import PAYLOAD_LIMIT, PAYLOAD_VAR
from .template import sbatch_template

PAYLOAD_EOF = "FTCLUSTER_PAYLOAD_EOF"
LAUNCHER = "ftcluster.train.launch"  # torchrun that forwards SIGUSR2 and exits 143 after a checkpoint-and-stop

def _where(spec: Any) -> str:
    return spec._source_file or "<spec>"


def _one_line(spec: Any, field: str, value: Any) -> str:
    """``value`` as text; a line break (which would end an #SBATCH line or an export) is an error."""
    text = str(value)
    if any(c in text for c in "\n\r\0"):
        raise RenderError(f"{_where(spec)}: {field}: contains a line break or NUL ({text!r}); "
                          "Slurm options and environment values must be one line")
    return text


def _directive(spec: Any, field: str, option: str, value: Any = None) -> str:
    """``--option=value`` for a shell command line (``shlex.quote``)."""
    if value is None:
        return f"--{option}"
    return f"--{option}={shlex.quote(_one_line(spec, field, value))}"


def _sbatch_directive(spec: Any, field: str, option: str, value: Any = None) -> str:
    """``--option=value`` for an ``#SBATCH`` line. sbatch splits these itself (``_get_argument`` in
    src/sbatch/opt.c): quotes group as in the shell, but a backslash escapes the next character even
    inside single quotes, so backslashes are doubled before ``shlex.quote``."""
    if value is None:
        return f"--{option}"
    return f"--{option}={shlex.quote(_one_line(spec, field, value).replace(chr(92), chr(92) * 2))}"


def sbatch_directives(plan: Any) -> list[str]:
    """The ``#SBATCH`` options (without the prefix), sorted, every value quoted as sbatch reads it."""
    return sorted(_sbatch_directive(plan.spec, o.field, o.name, o.value) for o in plan.slurm.sbatch)


def job_env(plan: Any) -> dict[str, str]:
    """Exported in the batch shell (srun passes it on): plan env (defaults < spec env) < slurm.env."""
    env = {**plan.env, **plan.spec.slurm.env}
    for name, value in env.items():
        _one_line(plan.spec, f"env.{name}", value)
    return dict(sorted(env.items()))


LITERAL_NOTE = "# shellcheck disable=SC2016  # single-quoted on purpose: literal text, not an expansion"


def _with_note(line: str) -> list[str]:
    """``line``, preceded by a shellcheck note when a single-quoted word holds ``$`` or a backtick."""
    return [LITERAL_NOTE, line] if re.search(r"'[^']*[$`][^']*'", line) else [line]


def _payload(plan: Any) -> str:
    text = plan.payload_json()
    if len(text.encode()) > PAYLOAD_LIMIT:
        raise RenderError(f"{_where(plan.spec)}: the resolved spec is {len(text.encode())} bytes, over the "
                          f"{PAYLOAD_LIMIT}-byte limit for one environment variable; shorten deepspeed.config_file "
                          "or split the variants into several jobs")
    if any(line.strip() == PAYLOAD_EOF for line in text.splitlines()):  # cannot happen with indented JSON
        raise RenderError(f"{_where(plan.spec)}: the payload contains the heredoc delimiter {PAYLOAD_EOF}")
    return text


def _word(arg: str, variables: dict[str, str]) -> str:
    """One shell word: a placeholder becomes a double-quoted expansion, the rest is shlex-quoted."""
    for placeholder, var in variables.items():
        if placeholder in arg:
            before, _, after = arg.partition(placeholder)
            return "".join(shlex.quote(p) for p in (before,) if p) + f'"${{{var}}}"' + (
                _word(after, variables) if after else "")
    return shlex.quote(arg)


def launch_lines(plan: Any) -> list[str]:
    """The srun command, one option per line (joined with `` \\`` by the template)."""
    spec, sl = plan.spec, plan.spec.slurm
    # Not --kill-on-bad-exit=1: it SIGKILLs the other nodes' launchers the moment one exits non-zero,
    # and srun then returns their 137, which hides whether the first failure was a fault (170:
    # requeue) or an error of the code or data (1: never). The other nodes learn of a failure within
    # seconds (a collective error) or by the watchdog (training.hang_timeout) and exit with the job's
    # verdict; --wait kills what is left after that (docs/lifecycle.md, "Faults").
    wait = int(spec.training.hang_timeout) + 60
    # With resources.min_nodes the job may get fewer nodes than it asks for: every count is the allocation's.
    nodes = '"${SLURM_JOB_NUM_NODES}"' if plan.min_nodes else str(plan.nnodes)
    srun = ["srun", "--kill-on-bad-exit=0", f"--wait={wait}", "--nodes=" + nodes, "--ntasks-per-node=1",
            "--export=ALL"]
    if spec.resources.cpus_per_node:  # Slurm 22.05+ srun no longer inherits --cpus-per-task from sbatch
        srun.append(f"--cpus-per-task={spec.resources.cpus_per_node}")
    lines = [" ".join(srun)]
    lines += [_directive(spec, o.field, o.name, o.value) for o in plan.slurm.srun]  # container
    python = _one_line(spec, "slurm.python", sl.python)
    argv = plan.torchrun_args(rdzv_endpoint="@ENDPOINT@", rdzv_id="@JOB_ID@", python=python,
                              spec_arg=["--spec-env", PAYLOAD_VAR], launcher=LAUNCHER)
    words = [_word(a, {"@ENDPOINT@": "ftc_rdzv_endpoint", "@JOB_ID@": "SLURM_JOB_ID", "@NNODES@": "SLURM_JOB_NUM_NODES"})
             for a in argv]
    lines.append(" ".join(words[:3]))  # python -m ftcluster.train.launch
    group: list[str] = []
    for w in words[3:]:
        if w.startswith("-") and group:
            lines.append(" ".join(group))
            group = []
        group.append(w)
    lines.append(" ".join(group))
    return lines


def _summary(plan: Any) -> str:
    spec = plan.spec
    kind = plan.recipe.label or plan.recipe.name
    if plan.min_nodes:  # resources.min_nodes: as many nodes as Slurm gives, at least min_nodes
        text = (f"{spec.name}: {kind}, {plan.min_nodes}-{plan.nnodes} node(s) x {plan.nproc_per_node} process(es) "
                f"= world size {plan.min_nodes * plan.nproc_per_node}-{plan.world_size}")
    else:
        text = (f"{spec.name}: {kind}, {plan.nnodes} node(s) x {plan.nproc_per_node} process(es) "
                f"= world size {plan.world_size}")
    if plan.variants:
        text += f"; job array of {len(plan.variants)} variants ({', '.join(plan.variants)})"
    return text


def render_slurm(plan: Any, header: list[str]) -> dict[str, str]:
    """Render ``plan`` as ``{"<name>.sbatch": script}``. Pure and deterministic."""
    return {f"{plan.spec.name}.sbatch": sbatch_template().render(**template_variables(plan, header))}


def template_variables(plan: Any, header: list[str]) -> dict[str, Any]:
    """What ``templates/sbatch.sh.j2`` places: lines already formatted and shell-quoted."""
    spec, sl = plan.spec, plan.spec.slurm
    request = plan.slurm
    launch = launch_lines(plan)
    return dict(
        header=[_one_line(spec, "header", h) for h in header],
        summary=_summary(plan),
        directives=sbatch_directives(plan),
        modules=[x for line in request.modules for x in _with_note(line)],
        setup=list(request.setup),
        exports=[x for k, v in job_env(plan).items() for x in _with_note(f"export {k}={shlex.quote(v)}")],
        passthrough=list(sl.env_passthrough),
        payload_var=PAYLOAD_VAR,
        payload_eof=PAYLOAD_EOF,
        payload=_payload(plan),
        variants=list(plan.variants),
        array_name=shlex.quote(_one_line(spec, "name", spec.name)),
        port_base=PORT_BASE,
        port_span=PORT_SPAN,
        literal_note=LITERAL_NOTE,
        launch=launch,
        launch_note=any(len(_with_note(line)) > 1 for line in launch),
        requeue=sl.requeue,
        max_restarts=spec.resources.max_restarts,
    )


# --------------------------------------------------------------------------- ftcluster prepare-data


def render_prepare_slurm(pp: Any, header: list[str]) -> dict[str, str]:
    """``<name>-prepare.sbatch``: a job array of ``data.prepare.tasks`` tasks, each running the prepare
    worker for its share of the source files (:mod:`ftcluster.plan.prepare`). Same spec, same bytes.
    Its software environment, exports, secrets and payload are the training script's, from the same
    spec sections; it has no rendezvous, no signal forwarding and no requeue (a task that died is
    simply run again: committed files are skipped)."""
    spec, sl = pp.spec, pp.spec.slurm
    lines = ["#!/bin/bash", *(f"# {_one_line(spec, 'header', h)}" for h in header),
             f"# {pp.name}: ftcluster prepare-data as a job array of {pp.tasks} task(s); task N prepares source "
             f"files N, N+{pp.tasks}, ...",
             "# Every task writes manifest.json if it finds every source file committed: the last to finish does",
             "# (no separate final job).",
             *(f"#SBATCH {_sbatch_directive(spec, o.field, o.name, o.value)}" for o in
               sorted(pp.slurm.sbatch, key=lambda o: _sbatch_directive(spec, o.field, o.name, o.value))),
             "", "set -euo pipefail", ""]
    if pp.slurm.modules or pp.slurm.setup:
        lines += ["# ---- software environment (as for training; `set +u` for module and activate scripts)",
                  "set +u", *(x for m in pp.slurm.modules for x in _with_note(m)), *pp.slurm.setup, "set -u", ""]
    env = {**pp.env, **sl.env}
    lines.append("# ---- environment: ftcluster defaults < env < slurm.env")
    lines += [x for k, v in sorted(env.items()) for x in _with_note(f"export {k}={shlex.quote(_one_line(spec, f'env.{k}', v))}")]
    if sl.env_passthrough:
        lines += ["", "# ---- taken from the submitting shell (slurm.env_passthrough; secrets go here, never in this file)",
                  f"for ftc_var in {' '.join(sl.env_passthrough)}; do",
                  '  if [ -z "${!ftc_var+set}" ]; then',
                  '    echo "ftcluster: $ftc_var is not set; export it in the shell that runs sbatch (listed in '
                  'slurm.env_passthrough)" >&2',
                  "    exit 1", "  fi", "done"]
    lines += ["", "# ---- the resolved spec the worker prepares from",
              f"{PAYLOAD_VAR}=$(cat <<'{PAYLOAD_EOF}'", _payload(pp), PAYLOAD_EOF, ")", f"export {PAYLOAD_VAR}", ""]
    srun = ["srun", "--nodes=1", "--ntasks=1", "--export=ALL"]
    if spec.resources.cpus_per_node or pp.workers:
        srun.append(f"--cpus-per-task={pp.workers or spec.resources.cpus_per_node}")
    srun += [_directive(spec, o.field, o.name, o.value) for o in pp.slurm.srun]  # container
    argv = pp.worker_args(_one_line(spec, "slurm.python", sl.python), "@TASK@")
    words = [_word(a, {"@TASK@": "SLURM_ARRAY_TASK_ID"}) for a in argv]
    lines += ['echo "ftcluster: prepare task ${SLURM_ARRAY_TASK_ID} of ' + str(pp.tasks) + ' (job ${SLURM_JOB_ID})"',
              " ".join(srun) + " \\", "  " + " ".join(words)]
    return {f"{pp.name}.sbatch": "\n".join(lines) + "\n"}
