"""``--set`` and ``set:`` overrides: list indices, precedence (spec file < variant/stage set < --set),
environment values as typed, and the order shown by ``submit --dry-run`` (issue #13)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ftcluster.errors import SpecError
from ftcluster.spec.loader import load_spec, load_spec_text
from ftcluster.spec.pipeline import load
from ftcluster.spec.variants import resolve_variants
from tests.support.specs import TINY_LORA

ROOT = Path(__file__).resolve().parents[3]
VARIANTS = ROOT / "examples" / "lora-variants-slurm.yaml"

BASE = TINY_LORA  # tests/support/specs.py


def set_problems(path: Path, overrides: list[str]) -> list[str]:
    with pytest.raises(SpecError) as info:
        load(path, overrides)
    return [str(p).replace(f"{path.parent}/", "") for p in info.value.problems]


# ---------------------------------------------------------------- list indices


def test_set_addresses_list_items():
    spec = load_spec(VARIANTS, ["variants[1].data.train=s3://other/train.jsonl", "variants[3].set.data.format=chat"])
    by_name = {v._variant: v for v in resolve_variants(spec)}
    assert by_name["r64"].data.train == "s3://other/train.jsonl"
    assert by_name["r64"].lora.r == 64  # the variant's own set is kept
    assert by_name["r16"].data.train == "s3://datasets/support/train.jsonl"
    assert by_name["legal"].data.format == "chat"

    spec = load_spec(VARIANTS, ["lora.target_modules=[q_proj, k_proj]", "lora.target_modules[1]=v_proj",
                                "variants[0].name=base"])
    assert spec.lora.target_modules == ["q_proj", "v_proj"]
    assert spec.variants[0].name == "base"


def test_variant_set_keys_take_list_indices_too(tmp_path):
    spec = load_spec_text(BASE + textwrap.dedent("""\
        lora: {target_modules: [q_proj, k_proj]}
        variants:
          - {name: kv, set: {"lora.target_modules[0]": v_proj}}
        """))
    assert resolve_variants(spec)[0].lora.target_modules == ["v_proj", "k_proj"]


def test_set_index_out_of_range_names_the_items_that_exist():
    with pytest.raises(SpecError) as info:
        load_spec(VARIANTS, ["variants[4].data.train=x", "lora.target_modules[0]=q_proj", "lora.r[0]=1",
                             "slurm.setup[3]=echo", "a[b]=1"])
    assert [str(p) for p in info.value.problems] == [
        "--set: variants[4].data.train: variants has no item [4]: its items are [0] to [3]",
        "--set: lora.target_modules[0]: lora.target_modules is 'all-linear', not a list, so it has no item [0]; "
        "set the whole value instead",
        "--set: lora.r[0]: lora.r is 16, not a list, so it has no item [0]; set the whole value instead",
        "--set: slurm.setup[3]: slurm.setup has no item [3]: its items are [0] to [0]",
        "--set: a[b]=1: expected KEY.PATH=VALUE, e.g. --set training.max_steps=10 or --set "
        "'lora.target_modules[0]=q_proj'",
    ]


# ---------------------------------------------------------------- precedence


def test_command_line_beats_every_variant_set():
    spec = load_spec(VARIANTS, ["lora.r=4", "variants[1].lora.r=8"])
    assert [(v._variant, v.lora.r) for v in resolve_variants(spec)] == [("r16", 4), ("r64", 8), ("qv", 4), ("legal", 4)]
    # in command-line order: a later --set for every variant wins over an earlier one for variant 1
    spec = load_spec(VARIANTS, ["variants[1].lora.r=8", "lora.r=4"])
    assert {v.lora.r for v in resolve_variants(spec)} == {4}
    # the variant's other overrides stay
    assert resolve_variants(spec)[1].lora.alpha == 128


def test_command_line_problem_in_a_variant_points_at_the_command_line(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text(BASE + "variants:\n  - {name: a, set: {lora.r: 8}}\n")
    assert set_problems(p, ["variants[0].lora.r=0"]) == ["--set: variants[0].set.lora.r: Input should be greater than 0 (got 0)"]


PIPE = """\
pipeline: p
stages:
  - name: one
    spec: job.yaml
    set: {training.max_steps: 5, output.uri: file:///tmp/ftc-stage}
"""


def test_command_line_beats_a_pipeline_stage_set(tmp_path):
    (tmp_path / "job.yaml").write_text(BASE.replace("method: lora", "method: lora\nbackend: slurm"))
    (tmp_path / "pipe.yaml").write_text(PIPE)
    pipe = load(tmp_path / "pipe.yaml", ["output.uri=file:///tmp/ftc-cli", "training.max_steps=3"])
    spec = pipe.stages[0].spec
    assert (spec.output.uri, spec.training.max_steps) == ("file:///tmp/ftc-cli", 3)
    # a bad --set value is reported at the command line, not at the stage's set
    assert set_problems(tmp_path / "pipe.yaml", ["training.max_steps=-1"]) == [
        "--set: training.max_steps: Input should be greater than 0 (got -1)"]


def test_dry_run_lists_the_settings_in_order(tmp_path):
    (tmp_path / "job.yaml").write_text(BASE.replace("method: lora", "method: lora\nbackend: slurm"))
    (tmp_path / "pipe.yaml").write_text(PIPE)
    env = {**os.environ, "FTCLUSTER_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}

    def dry_run(path: Path, *sets: str) -> list[str]:
        argv = [sys.executable, "-m", "ftcluster.cli", "submit", "--dry-run", "--no-plan-check", str(path)]
        proc = subprocess.run(argv + [a for s in sets for a in ("--set", s)], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=120)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        start = lines.index("# settings, each over the ones before it:")
        return [ln.replace(str(tmp_path) + "/", "") for ln in lines[start + 1:start + 6] if ln.startswith("#   ")]

    assert dry_run(VARIANTS, "lora.r=4", "variants[1].lora.r=8") == [
        "#   spec file " + str(VARIANTS),
        "#   each variant's set: r16: -; r64: lora.r, lora.alpha, training.learning_rate; qv: lora.target_modules; "
        "legal: data.train, data.eval, data.format",
        "#   --set lora.r=4",
        "#   --set variants[1].lora.r=8",
    ]
    got = dry_run(tmp_path / "pipe.yaml", "training.max_steps=3")
    assert got == ["#   spec file job.yaml", "#   stage one in pipe.yaml: set training.max_steps, output.uri",
                   "#   --set training.max_steps=3"]


# ---------------------------------------------------------------- environment values


@pytest.mark.parametrize("typed, stored", [("1", "1"), ("true", "true"), ("True", "True"), ("1.0e-4", "1.0e-4"),
                                           ("0x10", "0x10"), ("'007'", "007"), ("", "")])
def test_set_env_keeps_the_value_as_typed(typed, stored):
    spec = load_spec_text(BASE, overrides=[f"env.OMP_NUM_THREADS={typed}", f"slurm.env.A={typed}",
                                           f"local.env.B={typed}"])
    assert (spec.env["OMP_NUM_THREADS"], spec.slurm.env["A"], spec.local.env["B"]) == (stored, stored, stored)


def test_env_maps_in_files_keep_scalars_as_typed(tmp_path):
    spec = load_spec_text(BASE + textwrap.dedent("""\
        env: {OMP_NUM_THREADS: 1, DEBUG: true, LR: 1.0e-4, NAME: x}
        slurm: {env: {A: 2}}
        local: {env: {B: yes, C: 010}}
        kubernetes: {env: {D: 3}}
        """))
    assert spec.env == {"OMP_NUM_THREADS": "1", "DEBUG": "true", "LR": "1.0e-4", "NAME": "x"}
    assert (spec.slurm.env, spec.local.env, spec.kubernetes.env) == ({"A": "2"}, {"B": "yes", "C": "010"}, {"D": "3"})
    # the same in a pipeline stage's set
    (tmp_path / "job.yaml").write_text(BASE.replace("method: lora", "method: lora\nbackend: slurm"))
    (tmp_path / "pipe.yaml").write_text("pipeline: p\nstages:\n  - {spec: job.yaml, set: {env.OMP_NUM_THREADS: 4}}\n")
    assert load(tmp_path / "pipe.yaml").stages[0].spec.env == {"OMP_NUM_THREADS": "4"}
    # a null stays an error (nothing was typed)
    with pytest.raises(SpecError) as info:
        load_spec_text(BASE + "env: {A: null}\n")
    assert "env.A" in str(info.value)
