"""The renderers read the launch plan: what the plan says is what the files say, even where the
spec alone would say otherwise (a doctored plan shows through), and ``render`` compiles once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from ftcluster.plan import launch
from ftcluster.plan.slurm_request import SlurmOption
from ftcluster.render import header_lines, render
from ftcluster.render.kube import render_pytorchjob
from ftcluster.render.slurm import render_slurm
from ftcluster.spec.loader import load_spec, load_spec_text

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def test_the_sbatch_script_is_the_plans_slurm_request():
    spec = load_spec(EXAMPLES / "lora-slurm.yaml")
    plan = launch.compile_plan(spec)
    req = plan.slurm
    doctored = dataclasses.replace(req, sbatch=(*req.sbatch, SlurmOption("comment", "from-the-plan", "x")),
                                   srun=(SlurmOption("container-image", "img:plan", "x"),),
                                   modules=("module load from-the-plan",), setup=("echo from-the-plan",))
    script = render_slurm(dataclasses.replace(plan, slurm=doctored), header_lines(spec, "slurm"))[f"{spec.name}.sbatch"]
    for text in ("#SBATCH --comment=from-the-plan", "--container-image=img:plan", "module load from-the-plan",
                 "echo from-the-plan"):
        assert text in script, text
    assert script != render_slurm(plan, header_lines(spec, "slurm"))[f"{spec.name}.sbatch"]
    assert render(spec, "slurm") == render_slurm(plan, header_lines(spec, "slurm"))


def test_the_summary_names_the_engine_recipe():
    spec = load_spec(EXAMPLES / "full-slurm-2node.yaml")
    plan = launch.compile_plan(spec)
    script = render_slurm(plan, ["h"])[f"{spec.name}.sbatch"]
    assert f"{spec.name}: {plan.recipe.label}, 2 node(s)" in script and plan.recipe.label == "DeepSpeed full fine-tune"


def test_kubernetes_variants_are_the_array_plans_variant_plans(monkeypatch):
    text = (EXAMPLES / "lora-variants-slurm.yaml").read_text(encoding="utf-8").replace(
        "backend: slurm", "backend: kubernetes\nkubernetes: {image: img:1}")
    spec = load_spec_text(text, str(EXAMPLES / "k.yaml"))
    compiled = []
    real = launch.compile_plan
    monkeypatch.setattr(launch, "compile_plan", lambda *a, **kw: compiled.append(a) or real(*a, **kw))
    files = render(spec, "pytorchjob")
    assert len(compiled) == 1  # the array plan; the variants' plans come from it
    plan = real(spec)
    want: dict[str, str] = {}
    for vp in plan.variant_plans:
        want.update(render_pytorchjob(vp, header_lines(spec, "pytorchjob")))
    assert files == want and len(files) == 4
    job = next(yaml.safe_load(t) for n, t in files.items() if "r64" in n)
    assert "r64" in job["metadata"]["name"]
