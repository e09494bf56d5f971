"""One mapping from the spec to Slurm options (ftcluster.plan.slurm_request), and the three places that
use it agreeing: the rendered sbatch script (the reference), submitit, and the doctor's probe."""

from __future__ import annotations

import shlex
import shutil
import textwrap
from pathlib import Path

import pytest

from ftcluster.backends.slurm.preflight import probe_command, slurm_seconds
from ftcluster.plan.slurm_request import slurm_request
from ftcluster.render import render
from ftcluster.spec.loader import load_spec, load_spec_text
from tests.support.fixtures import need_tool

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.yaml") if "pipeline:" not in p.read_text())

# Beyond the examples: values that need quoting, a flag, a backslash, a container.
QUOTED = textwrap.dedent("""\
    name: quoted
    method: lora
    backend: slurm
    model: {random_init: {preset: tiny}}
    tokenizer: {train_vocab_size: 512}
    data: {train: examples/data/instruct.jsonl, seq_len: 64}
    output: {uri: "file:///tmp/out"}
    resources: {nodes: 2, gpus_per_node: 4, gpu_type: h100, cpus_per_node: 32, memory: 200G, time_limit: "01:30:00"}
    slurm:
      partition: "gpu a"
      constraint: "ib&nvlink"
      reservation: maint
      modules: [cuda/12.4, "my module"]
      setup: ["source /opt/venv/bin/activate"]
      extra_directives: {exclusive: null, comment: 'back\\\\slash it''s', mail-type: END}
      container_image: "nvcr.io#nvidia/pytorch:24.01-py3"
      container_mounts: ["/data:/data:ro", "/a b:/c"]
    """)


def specs():
    out = [pytest.param(load_spec(p), id=p.stem) for p in EXAMPLES]
    return out + [pytest.param(load_spec_text(QUOTED, "quoted.yaml"), id="quoted")]


def sbatch_options(script: str) -> dict[str, str | None]:
    """``#SBATCH --name=value`` lines as {name: value} (None for a flag), read as sbatch reads them:
    shell-like quotes, and a backslash escapes the next character even inside single quotes."""
    out = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            lexer = shlex.shlex(line.removeprefix("#SBATCH ").replace("\\\\", "\0"), posix=True)
            lexer.whitespace_split = True
            for word in lexer:
                name, eq, value = word.removeprefix("--").partition("=")
                out[name] = value.replace("\0", "\\") if eq else None
    return out


def no_variants(spec):
    """Submitit runs no job arrays, and always passes a time limit: the same spec without those."""
    res = spec.resources.model_copy(update={"time_limit": spec.resources.time_limit or "01:00:00"})
    copy = spec.model_copy(update={"variants": [], "array_parallelism": None, "resources": res})
    copy._source_file = spec._source_file
    return copy


SUBMITIT_ONLY = {"output", "error", "open-mode", "signal", "ntasks-per-node", "wckey"}


@pytest.mark.parametrize("spec", specs())
def test_submitit_asks_slurm_for_what_the_sbatch_script_asks(spec, tmp_path):
    pytest.importorskip("submitit")
    need_tool(shutil.which("srun"), "srun", "apt-get install slurm-client (`make test` installs it)")
    from ftcluster.backends.slurm.submitit import SUBMITIT_OWN, executor_for

    spec = no_variants(spec)
    script = render(spec, "slurm")[f"{spec.name}.sbatch"]
    ex = executor_for(spec, folder=tmp_path, cluster="slurm")
    text = ex._executor._make_submission_file_text("true", "uid")  # exactly what submitit hands to sbatch
    ours, theirs = sbatch_options(script), sbatch_options(text)
    for name, value in ours.items():
        if name in SUBMITIT_OWN:
            continue
        if name == "time":  # submitit writes minutes
            assert slurm_seconds(theirs["time"]) == slurm_seconds(value)
        elif name == "cpus-per-task":  # one task per process there, one per node here
            assert theirs[name] == str(max(1, int(value) // spec.resources.nproc_per_node))
        else:
            assert theirs.get(name, "<missing>") == value, name
    assert set(theirs) - set(ours) <= SUBMITIT_ONLY
    setup = text.split("# setup\n", 1)[1].split("\n\n", 1)[0].splitlines() if "# setup\n" in text else []
    assert setup == slurm_request(spec).setup_lines
    for line in setup:  # the same lines, in the same order, in the rendered script
        assert line in script.splitlines()
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    rendered = shlex.split(" ".join(line.strip().removesuffix("\\") for line in script.splitlines()
                                    if line.strip().startswith("--container")))
    assert rendered == slurm_request(spec).srun_args()
    assert all(arg in shlex.split(srun) for arg in rendered)


@pytest.mark.parametrize("spec", specs())
def test_the_sbatch_script_carries_exactly_the_request(spec):
    script = render(spec, "slurm")[f"{spec.name}.sbatch"]
    want = {o.name: o.value for o in slurm_request(spec).sbatch}
    assert sbatch_options(script) == want


def test_doctor_probe_lands_where_the_job_would():
    spec = load_spec_text(QUOTED, "quoted.yaml")
    argv, script = probe_command(spec, "gpu a", "print(1)")
    assert "--constraint=ib&nvlink" in argv and "--reservation=maint" in argv and "--partition=gpu a" in argv
    assert "--container-mounts=/data:/data:ro,/a b:/c" in argv
    assert script.splitlines()[:3] == ["module load cuda/12.4", "module load 'my module'",
                                       "source /opt/venv/bin/activate"]
