"""A DeepSpeed full fine-tune resumes on another number of processes (issue #22): real torchrun on
CPU, gloo, a tiny random-init model, a streamed prepared corpus.

2 -> 1 -> 2 processes: a 2-process run is stopped (SIGUSR2) after a checkpoint, resumed on 1
process (the DeepSpeed engine converts the ZeRO checkpoint into a universal one and loads its
single partition from it) and stopped again, then resumed on 2 processes to the end. The loss
curve must continue the uninterrupted 2-process run's.

The data: a streamed corpus (and, once, records read in memory): both positions are global (the
same blocks follow, regrouped), and the global batch is kept by accumulation (2 processes x
micro-batch 2 = 1 process x micro-batch 2 x 2 accumulation steps; in memory 2 x 2 x 2 = 1 x 2 x 4),
so every optimizer step sees the same blocks as the reference's. (In memory, that holds within an
epoch; these runs stay in the first: tests/unit/train/test_train_data.py covers the epoch's end.)

Tolerance: relative 1e-4 per step. In fp32 on CPU a same-size resume replays the run bit for bit
(test_train_runtime: 1e-5, observed 0); here the gradients are the same numbers summed in another
order (1 rank accumulating 2 micro-batches instead of a 2-rank all-reduce, and ZeRO's flat
partitions of another size), and the fp32 master weights and Adam moments are restored exactly
(the universal checkpoint stores them in fp32), so only rounding differs: observed 0.0, and 8.8e-8
with CPU offload or in-memory data. A weights-only resume (fresh Adam moments and LR schedule)
after the world-size change gives 7.9e-2.
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")

from tests.e2e.test_train_runtime import (  # noqa: E402
    ROOT,
    committed_steps,
    curve,
    finish,
    launch,
    launch_two_nodes,
    records,
    wait_for_step,
    write_payload,
)
from tests.support.corpora import documents, tokenized_corpus  # noqa: E402

pytestmark = [pytest.mark.train, pytest.mark.slow]

RESHARD_TOL = 1e-4
STEPS = 24

SPEC = """\
name: ds-reshard
method: full
model: {random_init: {preset: tiny}}
data: {train: CORPUS, format: text, seq_len: 64}
training: {learning_rate: 1.0e-3, warmup_steps: 2, max_steps: 24, micro_batch_size: 2, log_every_steps: 1,
           precision: fp32, eval_every_steps: 1000}
deepspeed: {zero_stage: 2}
env: {OMP_NUM_THREADS: "1"}
resources: {gpus_per_node: 0, procs_per_node: 2}
output: {uri: file:///replaced, checkpoint_every_steps: 3, keep_last: 2}
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("reshard-corpus")
    uri = tmp / "corpus"
    tokenized_corpus(uri, documents(tmp / "raw", mb=0.2, files=1), shard_tokens=40_000)
    return uri


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ftc-cache")


def two_procs(stage: int, extra: tuple[str, ...] = ()) -> list[str]:
    """2 processes, no accumulation (``extra`` comes last: it may set its own)."""
    return [f"deepspeed.zero_stage={stage}", "resources.procs_per_node=2", "training.gradient_accumulation_steps=1",
            *extra]


def one_proc(stage: int, extra: tuple[str, ...] = ()) -> list[str]:
    """1 process, 2 accumulation steps: the same global batch."""
    return [f"deepspeed.zero_stage={stage}", "resources.procs_per_node=1", "training.gradient_accumulation_steps=2",
            *extra]


OFFLOAD = ("deepspeed.offload_optimizer=cpu",)
OFFLOAD3 = ("deepspeed.offload_optimizer=cpu", "deepspeed.offload_params=cpu")


def stop_after(payload: Path, nproc: int, out: Path, step: int, cache: Path, tmp: Path) -> tuple[int, str]:
    """Run until ``step`` is logged, SIGUSR2 the agent: it saves the step it stopped at and exits 143."""
    proc = launch(payload, nproc, cache, tmp)
    wait_for_step(proc, out, step, timeout=600)
    os.kill(proc.pid, signal.SIGUSR2)
    rc, log = finish(proc, timeout=600)
    assert rc == 143, log[-3000:]
    stopped = records(out, "preempted")[-1]["step"]
    assert committed_steps(out)[-1] == stopped
    return stopped, log


# Records read in memory instead of a stream (ShardedBatches: the position within the epoch's
# permutation is global too). 24 steps of 8 sequences stay inside the first epoch, where the order
# is the same whatever the grouping (docs/training.md: only the epoch's left-out tail can differ).
MEMORY = ("data.train=" + str(ROOT / "examples" / "data" / "instruct.jsonl"), "data.format=instruction",
          "data.seq_len=128", "tokenizer.train_vocab_size=512")


@pytest.mark.parametrize(("stage", "offload", "memory"),
                         [(2, (), False), (3, (), False), (1, (), False), (2, OFFLOAD, False), (3, OFFLOAD3, False),
                          (2, (), True)],
                         ids=["zero2", "zero3", "zero1", "zero2-offload", "zero3-offload", "zero2-in-memory"])
def test_zero_run_resumes_on_one_process_then_on_two(tmp_path, corpus, cache_dir, stage, offload, memory):
    spec = tmp_path / "full.yaml"
    spec.write_text(SPEC.replace("CORPUS", str(corpus)))
    ref, out = tmp_path / "ref", tmp_path / "run"
    if memory:  # 2 x micro-batch 2 x 2 accumulation = 1 x 2 x 4: 8 sequences a step
        offload = (*offload, *MEMORY, "training.gradient_accumulation_steps=ACC")
    glob = 8 if memory else 4

    def two(stage: int, offload: tuple[str, ...]) -> list[str]:
        return [s.replace("ACC", "2") for s in two_procs(stage, offload)]

    def one(stage: int, offload: tuple[str, ...]) -> list[str]:
        return [s.replace("ACC", "4") for s in one_proc(stage, offload)]

    def payload(name: str, out: Path, sets: list[str]) -> Path:
        return write_payload(tmp_path, name, [*sets, f"output.uri={out.as_uri()}"], base=spec)

    rc, log = finish(launch(payload("ref", ref, two(stage, offload)), 2, cache_dir, tmp_path), timeout=900)
    assert rc == 0, log[-3000:]

    rng = random.Random()
    first, _ = stop_after(payload("run2", out, two(stage, offload)), 2, out, rng.randint(2, 5), cache_dir, tmp_path)
    second, log1 = stop_after(payload("run1", out, one(stage, offload)), 1, out, first + rng.randint(2, 5), cache_dir,
                              tmp_path)
    assert f"resuming checkpoint step {first} of 2 process(es) on 1; global batch unchanged: {glob} sequences" in log1
    assert f"DeepSpeed ZeRO-{stage} checkpoint of 2 processes converted to a universal checkpoint for 1" in log1
    assert "the same blocks follow, regrouped" in log1  # the data position (stream or in memory) followed
    rc, log2 = finish(launch(payload("run2b", out, two(stage, offload)), 2, cache_dir, tmp_path), timeout=900)
    assert rc == 0, log2[-3000:]
    assert f"resuming checkpoint step {second} of 1 process(es) on 2" in log2
    assert f"DeepSpeed ZeRO-{stage} checkpoint of 1 processes converted to a universal checkpoint for 2" in log2

    for line in (log1 + log2).splitlines():
        if "converted to a universal checkpoint" in line:
            print(line.split("] ")[-1].strip())
    got, want = curve(out), curve(ref)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    worst = max(abs(got[s] - want[s]) / abs(want[s]) for s in want)
    print(f"ZeRO-{stage} 2 -> 1 -> 2 (stops after steps {first}, {second}): worst relative loss difference "
          f"{worst:.2e}")
    assert worst <= RESHARD_TOL, f"the 2 -> 1 -> 2 loss curve differs by {worst:.2e} (relative): {got} vs {want}"
    assert want[STEPS] < want[1] - 0.5  # it learned: a curve that matched by standing still would not

    # The final model exports and loads, and its weights are those of the reference run.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out / "final"), dtype=torch.float32)
    refm = AutoModelForCausalLM.from_pretrained(str(ref / "final"), dtype=torch.float32)
    ids = torch.arange(1, 33).unsqueeze(0)
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, refm(input_ids=ids).logits
    assert torch.isfinite(a).all()
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-3), float((a - b).abs().max())


def test_one_process_resumes_on_two_nodes_each_converting_its_own_copy(tmp_path, corpus, cache_dir):
    """Several nodes: the restored checkpoint is node-local (each node downloads all of it), so each
    node's local rank 0 converts its own copy; node 1 (its own FTCLUSTER_LOCAL_DIR) could not load
    otherwise. 1 process (2 accumulation steps) -> 2 nodes x 1 process (ZeRO-3), against a
    2-process reference; tolerance as above."""
    spec = tmp_path / "full.yaml"
    spec.write_text(SPEC.replace("CORPUS", str(corpus)))
    ref, out = tmp_path / "ref", tmp_path / "run"

    def payload(name: str, out: Path, sets: list[str]) -> Path:
        return write_payload(tmp_path, name, [*sets, f"output.uri={out.as_uri()}"], base=spec)

    rc, log = finish(launch(payload("ref", ref, two_procs(3)), 2, cache_dir, tmp_path), timeout=900)
    assert rc == 0, log[-3000:]
    first, _ = stop_after(payload("run1", out, one_proc(3)), 1, out, random.Random().randint(3, 8), cache_dir, tmp_path)

    nodes = payload("run2n", out, ["resources.nodes=2", "deepspeed.zero_stage=3", "resources.procs_per_node=1",
                                   "training.gradient_accumulation_steps=1"])
    res = [finish(p, timeout=900) for p in launch_two_nodes(nodes, cache_dir, tmp_path)]
    both = res[0][1] + res[1][1]
    assert [rc for rc, _ in res] == [0, 0], res[0][1][-3000:] + res[1][1][-3000:]
    assert f"resuming checkpoint step {first} of 1 process(es) on 2; global batch unchanged: 4 sequences" in both
    assert "DeepSpeed ZeRO-3 checkpoint of 1 processes converted to a universal checkpoint for 2" in both
    got, want = curve(out), curve(ref)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    worst = max(abs(got[s] - want[s]) / abs(want[s]) for s in want)
    print(f"ZeRO-3 1 -> 2 nodes (stop after step {first}): worst relative loss difference {worst:.2e}")
    assert worst <= RESHARD_TOL, f"the 1 -> 2-node loss curve differs by {worst:.2e} (relative)"
