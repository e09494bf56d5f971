"""The launch plan is the one currency: ``compile_plan`` computes each fact once, and the
renderers, the planner and the backends read it from the plan.

Counters sit in the functions that compute a fact (the Slurm request, the resolved DeepSpeed config,
the speed-up decisions, the engine's contribution) and count their calls across ``compile_plan``,
``render`` (Slurm and Kubernetes, with and without variants) and the planner. A renderer or
planner that derives a fact again from the spec makes a count too high.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from ftcluster.plan import deepspeed as ds_mod
from ftcluster.plan import engines, facts, launch
from ftcluster.plan import slurm_request as sr_mod
from ftcluster.plan import speedups as sp_mod
from ftcluster.plan.planner import advise
from ftcluster.plan.planner.shape import PRESET_SHAPES, shape_from_config
from ftcluster.render import render
from ftcluster.spec.loader import load_spec, load_spec_text

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples"
FULL = (EXAMPLES / "full-slurm-2node.yaml").read_text(encoding="utf-8")
FULL_VARIANTS = FULL + """\
variants:
  - name: z3
  - name: z2
    set: {deepspeed.zero_stage: 2}
  - name: lr
    set: {training.learning_rate: 1.0e-5}
"""


@pytest.fixture
def calls(monkeypatch) -> Counter:
    """Count how often each fact is computed. The counters sit inside the functions that compute
    them (what they build, looked up in their own module at call time), so a caller that imported
    the function by name is counted too: ``slurm_request`` builds a ``SlurmRequest``,
    ``resolved_deepspeed_config`` calls ``deepspeed_config``, ``speedups.decide`` builds a
    ``Speedups``; each engine recipe's ``plan_extra`` is wrapped, and ``compile_plan`` itself."""
    counter: Counter = Counter()

    def counted(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **kw: Any) -> Any:
            counter[name] += 1
            return fn(*a, **kw)
        return wrapper

    for mod, attr, name in ((sr_mod, "SlurmRequest", "slurm_request"), (ds_mod, "deepspeed_config", "deepspeed"),
                            (sp_mod, "Speedups", "decide"), (launch, "compile_plan", "compile_plan")):
        monkeypatch.setattr(mod, attr, counted(name, getattr(mod, attr)))
    for recipe in list(engines.ENGINES.values()):
        monkeypatch.setitem(engines.ENGINES, recipe.name,
                            dataclasses.replace(recipe, plan_extra=counted("plan_extra", recipe.plan_extra)))
    return counter


def _full(text: str = FULL):
    return load_spec_text(text, str(EXAMPLES / "full.yaml"))


def test_compile_plan_computes_each_fact_once(calls):
    plan = launch.compile_plan(_full())
    assert calls == {"slurm_request": 1, "deepspeed": 1, "decide": 1, "plan_extra": 1,
                     "compile_plan": 1}
    assert plan.deepspeed is not None and plan.payload["deepspeed"] is plan.deepspeed
    assert plan.engine == "deepspeed" and plan.artifacts == ("final",) and plan.done_artifact == "final"
    assert plan.done_uri == "s3://ft-runs/cpt-llama-8b/final" and plan.output.root == "s3://ft-runs/cpt-llama-8b"
    assert plan.global_batch == 2 * 4 * 16 == plan.deepspeed["train_batch_size"]
    assert plan.array is None and plan.slurm.sbatch_value("nodes") == "2"


def test_render_slurm_compiles_once_and_asks_slurm_once(calls):
    render(_full(), "slurm")
    assert calls == {"compile_plan": 1, "slurm_request": 1, "deepspeed": 1, "decide": 1,
                     "plan_extra": 1}


def test_variants_resolve_deepspeed_once_per_distinct_spec(calls):
    """A job array of three variants: the job's config and each variant's, once each (four), for the
    sbatch script and for the Kubernetes jobs alike."""
    spec = _full(FULL_VARIANTS)
    files = render(spec, "slurm")
    assert calls == {"compile_plan": 1, "slurm_request": 1, "deepspeed": 4, "decide": 1,
                     "plan_extra": 4}
    assert "#SBATCH --array=0-2" in files["cpt-llama-8b.sbatch"]
    calls.clear()
    kspec = _full(FULL_VARIANTS.replace("backend: slurm", "backend: kubernetes\nkubernetes: {image: img:1}"))
    files = render(kspec, "pytorchjob")
    assert len(files) == 3
    assert calls["compile_plan"] == 1 and calls["deepspeed"] == 4 and calls["plan_extra"] == 4
    assert calls["decide"] == 4  # the job's, then each variant's own plan


def test_lora_variants_example(calls):
    spec = load_spec(EXAMPLES / "lora-variants-slurm.yaml")
    plan = launch.compile_plan(spec)
    assert calls == {"compile_plan": 1, "slurm_request": 1, "decide": 1, "plan_extra": 5}
    assert plan.array == "0-3%2" == plan.slurm.sbatch_value("array") == facts.array_value(spec)
    assert plan.log_pattern == facts.slurm_output(spec.slurm.output, True) and "%A_%a" in plan.log_pattern
    assert plan.output_uri == spec.output.uri and plan.output.root == spec.output.uri.rstrip("/")
    assert plan.deepspeed is None and plan.engine == "lora" and plan.artifacts == ("adapter",)
    assert [p.spec._variant for p in plan.variant_plans] == list(plan.variants) == ["r16", "r64", "qv", "legal"]
    assert [p.output.root for p in plan.variant_plans][1] == "s3://ft-runs/support-lora/r64"
    assert calls["plan_extra"] == 5  # the variants' plans reuse what the compile resolved
    calls.clear()
    files = render(spec, "slurm")
    assert calls == {"compile_plan": 1, "slurm_request": 1, "decide": 1, "plan_extra": 5}
    assert "#SBATCH --array=0-3%2" in files["support-lora.sbatch"]


def test_the_planner_reads_the_plan(calls):
    """``ftcluster plan``: one compile, one speed-up decision; the planner's global batch and
    speed-ups are the plan's (a doctored plan changes the planner's answer)."""
    spec = _full()
    shape = shape_from_config({"model_type": "llama", **PRESET_SHAPES["llama-3-8b"]})
    p = advise.build_plan(spec, network=False, count_data=False, shape=shape)
    assert calls == {"compile_plan": 1, "slurm_request": 1, "deepspeed": 1, "decide": 1,
                     "plan_extra": 1}
    plan = launch.compile_plan(spec)
    w = advise.workload_of(spec, shape, launch=plan)
    assert w.global_batch == plan.global_batch == facts.global_batch(spec)
    assert (w.fused_ce, w.zero3_keep) == (plan.speedups.fused_ce_for("llama"), plan.speedups.zero3_keep) == (True, True)
    assert w.attn_implementation == "flash_attention_2" and plan.speedups.varlen
    assert p.requested.layout.method == plan.recipe.planner_model == "full"
    # The plan decides: a plan whose decisions differ changes what the planner models.
    off = dataclasses.replace(plan, speedups=dataclasses.replace(plan.speedups, fused_ce=False, varlen=False),
                              global_batch=7)
    w_off = advise.workload_of(spec, shape, launch=off)
    assert (w_off.fused_ce, w_off.attn_implementation, w_off.global_batch) == (False, "sdpa", 7)
    p_off = advise.build_plan(spec, network=False, count_data=False, shape=shape, launch=off)
    assert p_off.requested.memory.logits > p.requested.memory.logits


def test_speedup_decisions_follow_the_plan_environment():
    spec = _full(FULL.replace("env:\n", "env:\n  FTCLUSTER_VARLEN: '0'\n  FTCLUSTER_FUSED_CE: 'off'\n"))
    d = launch.compile_plan(spec).speedups
    assert (d.fused_ce, d.varlen, d.zero3_keep, d.compile) == (False, False, True, False)
    assert d.nccl_proto == "Simple"  # 16 GPUs, NCCL_PROTO not set
    backend = launch.compile_plan(_full(), {"FTCLUSTER_ZERO3_KEEP": "0", "NCCL_PROTO": "LL"}).speedups
    assert backend.zero3_keep is False and backend.nccl_proto is None
    cpu = launch.compile_plan(load_spec(EXAMPLES / "quickstart.yaml")).speedups  # gpus_per_node: 0
    assert not (cpu.fused_ce or cpu.varlen or cpu.zero3_keep or cpu.nccl_proto)


def test_every_engine_names_a_planner_memory_model_and_a_label():
    for recipe in engines.ENGINES.values():
        assert recipe.planner_model in advise.MEMORY_MODELS, recipe.name
        assert recipe.label
    assert advise.planned_models() == ["lora", "full"]


def test_speedups_see_the_backends_env_section():
    """The sbatch script exports slurm.env: a switch set there is one the runtime sees, so the plan
    (and the planner) decide with it; a backend env given to compile_plan is used instead."""
    spec = _full(FULL.replace("  partition: gpu\n", "  partition: gpu\n  env: {FTCLUSTER_FUSED_CE: '0'}\n"))
    assert launch.compile_plan(spec).speedups.fused_ce is False
    assert launch.compile_plan(spec, {}).speedups.fused_ce is True
    shape = shape_from_config({"model_type": "llama", **PRESET_SHAPES["llama-3-8b"]})
    assert advise.build_plan(spec, network=False, count_data=False, shape=shape).requested.memory.logits > \
        advise.build_plan(_full(), network=False, count_data=False, shape=shape).requested.memory.logits
    assert sp_mod.decide(spec) == launch.compile_plan(spec).speedups  # the validate/submit check decides the same


def test_backends_take_the_plans_slurm_request(calls):
    """The submitit path and the doctor's probe use the request they are handed (``plan.slurm``)
    rather than mapping the spec again."""
    from ftcluster.backends.slurm.preflight import probe_command

    spec = load_spec(EXAMPLES / "lora-slurm.yaml")
    plan = launch.compile_plan(spec)
    doctored = dataclasses.replace(plan.slurm, setup=("echo from-the-plan",))
    calls.clear()
    argv, script = probe_command(spec, "gpu", "print(1)", doctored)
    assert "echo from-the-plan" in script.splitlines() and calls["slurm_request"] == 0
    assert probe_command(spec, "gpu", "print(1)") == probe_command(spec, "gpu", "print(1)", plan.slurm)
    pytest.importorskip("submitit")
    from ftcluster.backends.slurm.submitit import submitit_parameters

    calls.clear()
    assert submitit_parameters(spec, doctored)["slurm_setup"][-1] == "echo from-the-plan"
    assert submitit_parameters(spec, plan.slurm) == submitit_parameters(spec)
    assert calls["slurm_request"] == 1  # only the call without a request


def test_the_planner_reads_the_engine_sections_through_the_recipe(monkeypatch):
    """The planner's layout and workload take the engine's settings from its recipe
    (``planner_settings``), not from the spec's ``deepspeed``/``lora`` sections directly."""
    spec = _full()
    layout = advise.requested_layout(spec, "h200")
    assert (layout.method, layout.zero_stage, layout.offload_optimizer) == ("full", 3, False)
    recipe = engines.ENGINES["deepspeed"]
    monkeypatch.setitem(engines.ENGINES, "deepspeed", dataclasses.replace(
        recipe, memory_model="lora", planner_settings=lambda s: {"zero_stage": None, "lora_r": 4}))
    shape = shape_from_config({"model_type": "llama", **PRESET_SHAPES["llama-3-8b"]})
    assert advise.requested_layout(spec, "h200").method == "lora"
    assert advise.requested_layout(spec, "h200").zero_stage is None
    assert advise.workload_of(spec, shape).lora_r == 4


@pytest.mark.parametrize("example, backend", [("quickstart.yaml", "local"), ("lora-slurm.yaml", "slurm"),
                                              ("full-slurm-2node.yaml", "slurm"),
                                              ("lora-pytorchjob.yaml", "kubernetes")])
def test_a_backend_is_handed_the_plan_and_compiles_nothing_again(calls, example, backend, tmp_path, monkeypatch):
    """``submit --dry-run``: the API compiles once (``Backend.compile``) and the backend's ``submit_dryrun(plan)``
    renders from that plan; a backend that compiled or rendered the spec again would count twice."""
    from ftcluster import api

    monkeypatch.setenv("FTCLUSTER_HOME", str(tmp_path))
    spec = load_spec(EXAMPLES / example, [f"backend={backend}"])
    calls.clear()
    req = api.submit_dryrun(spec)
    assert req.backend == backend and req.files
    # one compile: each fact once (compile_plan itself may be a reference taken before the counter was set)
    assert calls["slurm_request"] == 1 and calls["decide"] == 1 and calls["compile_plan"] <= 1, calls
    b = api.backend_for(spec)
    plan = b.compile(spec)
    calls.clear()
    again = b.submit_dryrun(plan, run_id=req.run_id)
    assert again.files == req.files
    assert not +calls, calls  # nothing computed again: every fact comes from the plan


def _fsdp(**fsdp: Any):
    """examples/full-slurm-2node.yaml with engine: fsdp in place of its deepspeed section."""
    text = FULL.split("deepspeed:\n", 1)
    rest = text[1].split("\n", 1)[1]  # the section's single line (zero_stage: 3) goes with it
    section = "".join(f"  {k}: {str(v).lower()}\n" for k, v in fsdp.items())
    return _full(text[0] + "engine: fsdp\n" + (f"fsdp:\n{section}" if section else "") + rest)


def test_an_fsdp_job_gets_its_recipe_and_no_deepspeed_anywhere():
    """engine: fsdp picks the fsdp recipe; the plan, the payload, the launch files and the doctor's
    probe carry nothing of DeepSpeed (no config, no module to find)."""
    from ftcluster.preflight.checks import probe_code

    spec = _fsdp()
    assert engines.engine_for(spec).name == "fsdp" and engines.engine_for(_full()).name == "deepspeed"
    plan = launch.compile_plan(spec)
    assert plan.engine == "fsdp" and plan.deepspeed is None and plan.artifacts == ("final",)
    import json

    payload = json.loads(plan.payload_json())
    assert payload["deepspeed"] is None and payload["spec"]["engine"] == "fsdp"
    assert "deepspeed" not in payload["spec"] and payload["spec"]["fsdp"] == {"reshard_after_forward": True,
                                                                              "cpu_offload": False}
    script = "\n".join(str(f) for f in render(spec, target="slurm").values())
    assert "cpt-llama-8b: FSDP2 full fine-tune, 2 node(s)" in script
    assert "zero_stage" not in script and "DeepSpeed" not in script.replace("DeepSpeed config every rank", "")
    assert "'deepspeed'" not in probe_code(8, spec) and "'deepspeed'" in probe_code(8, _full())
    assert plan.speedups.zero3_keep is False and launch.compile_plan(_full()).speedups.zero3_keep is True


def test_the_planner_models_fsdp_as_the_zero_stage_it_matches_and_advises_fsdp_flags():
    spec = _fsdp()
    lay = advise.requested_layout(spec, "h200")
    assert (lay.method, lay.zero_stage, lay.offload_optimizer, lay.offload_params) == ("full", 3, False, False)
    lay2 = advise.requested_layout(_fsdp(reshard_after_forward=False, cpu_offload=True), "h200")
    assert (lay2.zero_stage, lay2.offload_optimizer, lay2.offload_params) == (2, True, False)
    flags = advise.set_flags(spec, lay2)
    assert flags == ["fsdp.reshard_after_forward=false", "fsdp.cpu_offload=true"]
    assert advise.set_flags(_full(), lay2) == ["deepspeed.zero_stage=2", "deepspeed.offload_optimizer=cpu"]
