"""resources.min_nodes: a job that may run (and be requeued) on fewer nodes than it asks for.

The spec refuses what cannot work (more than nodes; a DeepSpeed checkpoint that cannot reshard),
Kubernetes and submitit refuse it with one line, and the runtime's payload for the processes the
job actually got keeps the global batch where the accumulation divides (the live Slurm test,
tests/e2e/test_slurm_e2e.py, requeues a job onto one of its two nodes)."""

from __future__ import annotations

import re
import textwrap

import pytest

from ftcluster.errors import RenderError, SpecError, TrainError
from ftcluster.plan.launch import compile_plan
from ftcluster.plan.payload import fit_to_world
from ftcluster.render import render
from ftcluster.spec.loader import load_spec_text

BASE = textwrap.dedent("""\
    name: elastic
    method: full
    backend: slurm
    model: {random_init: {preset: tiny}}
    tokenizer: {train_vocab_size: 512}
    data: {train: data.jsonl, format: text, seq_len: 128}
    training: {max_steps: 10, micro_batch_size: 2, gradient_accumulation_steps: 3}
    output: {uri: file:///tmp/out}
    kubernetes: {image: "reg/img:1"}
    """)


def spec(extra: str, overrides: list[str] | None = None):
    return load_spec_text(BASE + textwrap.dedent(extra), "job.yaml", overrides)


def test_min_nodes_above_nodes_is_a_located_error():
    with pytest.raises(SpecError) as err:
        spec("resources: {nodes: 2, min_nodes: 3, gpus_per_node: 4}\n")
    msg = str(err.value)
    assert re.match(r"^job\.yaml:10:\d+: resources\.min_nodes: 3 is more than nodes \(2\); set min_nodes at most", msg), msg
    assert "\n" not in msg


@pytest.mark.parametrize("ds", ["{zero_stage: 0}", "{zero_stage: 3, offload_optimizer: nvme, nvme_path: /nvme}"])
def test_deepspeed_that_cannot_reshard_refuses_min_nodes(ds):
    with pytest.raises(SpecError) as err:
        spec(f"resources: {{nodes: 2, min_nodes: 1, gpus_per_node: 4}}\ndeepspeed: {ds}\n")
    assert "cannot resume on another number of processes" in str(err.value)
    # FSDP2 reshards anything; the same DeepSpeed setting with a fixed node count is fine
    spec("resources: {nodes: 2, min_nodes: 1, gpus_per_node: 4}\nengine: fsdp\n")
    spec(f"resources: {{nodes: 2, gpus_per_node: 4}}\ndeepspeed: {ds}\n")


@pytest.mark.parametrize("target", ["pytorchjob", "trainjob"])
def test_kubernetes_targets_refuse_min_nodes(target):
    s = spec("resources: {nodes: 2, min_nodes: 1, gpus_per_node: 4}\n")
    with pytest.raises(RenderError) as err:
        render(s, target)
    msg = str(err.value)
    assert msg.startswith("job.yaml: resources.min_nodes: Kubernetes targets start exactly") and "\n" not in msg


def test_submitit_refuses_min_nodes():
    pytest.importorskip("submitit")
    from ftcluster.backends.slurm.submitit import submitit_parameters
    from ftcluster.errors import BackendError

    with pytest.raises(BackendError, match="resources.min_nodes: submitit asks Slurm for a fixed number of nodes"):
        submitit_parameters(spec("resources: {nodes: 2, min_nodes: 1, gpus_per_node: 4}\n"))
    assert submitit_parameters(spec("resources: {nodes: 2, gpus_per_node: 4}\n"))["nodes"] == 2


def test_payload_on_fewer_nodes_keeps_the_global_batch():
    plan = compile_plan(spec("resources: {nodes: 4, min_nodes: 1, gpus_per_node: 2}\n"))
    assert plan.global_batch == 2 * 3 * 8
    for world, accum in [(8, 3), (4, 6), (2, 12)]:
        got, note = fit_to_world(plan.payload, world)
        assert got["spec"]["training"]["gradient_accumulation_steps"] == accum
        assert got["spec"]["resources"]["nodes"] == world // 2
        ds = got["deepspeed"]
        assert ds["gradient_accumulation_steps"] == accum and ds["train_batch_size"] == 48
        assert (note is None) == (world == 8)
        if note:
            assert f"running on {world // 2} of 4 nodes" in note and "the global batch stays 48 sequences" in note
    assert plan.payload["spec"]["training"]["gradient_accumulation_steps"] == 3  # not changed in place
    # 3 nodes of 4: 8 processes x 3 = 24 micro-batches per step, 4 on each of 6 processes
    got, note = fit_to_world(plan.payload, 6)
    assert got["spec"]["training"]["gradient_accumulation_steps"] == 4 and "stays 48" in (note or "")


def test_payload_on_fewer_nodes_says_when_the_global_batch_changes():
    plan = compile_plan(spec("resources: {nodes: 3, min_nodes: 1, gpus_per_node: 1}\n",
                             ["training.gradient_accumulation_steps=1"]))
    got, note = fit_to_world(plan.payload, 2)
    assert got["spec"]["training"]["gradient_accumulation_steps"] == 1
    assert got["deepspeed"]["train_batch_size"] == 4
    assert note and "the global batch CHANGES from 6 to 4 sequences" in note


def test_payload_without_min_nodes_or_outside_torchrun_is_unchanged():
    plan = compile_plan(spec("resources: {nodes: 2, gpus_per_node: 2}\n"))
    assert fit_to_world(plan.payload, 2) == (plan.payload, None)
    elastic = compile_plan(spec("resources: {nodes: 2, min_nodes: 1, gpus_per_node: 2}\n"))
    assert fit_to_world(elastic.payload, 0) == (elastic.payload, None)
    with pytest.raises(TrainError, match="not a multiple of the 2 per node"):
        fit_to_world(elastic.payload, 3)
