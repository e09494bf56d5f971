"""End-to-end runs of the FSDP2 engine (``method: full``, ``engine: fsdp``) on CPU: real torchrun,
gloo, torch.distributed.checkpoint, storage; the helpers of test_train_runtime.

Tolerances (relative, per-step training loss):

* a resumed run on the same number of processes replays the uninterrupted one: REL_TOL (1e-5),
  as test_train_runtime (fp32 on CPU; observed equal);
* another setup on the same batches (DeepSpeed ZeRO-2, one process with twice the accumulation, a
  2 -> 1 -> 2 resume): every optimizer step sees the same sequences, but the gradients are summed
  in another order (a reduce-scatter over ranks against local accumulation, DeepSpeed's flat
  buffers), which changes fp32 roundings: observed at most 1e-7 over 16-24 steps (2026-12-07,
  CPU), so SAME_BATCHES_TOL is 1e-5 too, a hundredfold margin. A real difference (a missed
  gradient average, a wrong loss scale, a skipped clip or optimizer state) moves the loss by
  1e-3 or more within a few steps.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from ftcluster.spec.loader import load_spec  # noqa: E402
from tests.e2e.test_train_runtime import (  # noqa: E402
    FULL_SPEC,
    REL_TOL,
    ROOT,
    _children,
    _env_of,
    assert_same_curve,
    committed_steps,
    curve,
    eval_loss_of,
    finish,
    full_overrides,
    launch,
    launch_two_nodes,
    records,
    wait_for_step,
    write_payload,
)

pytestmark = [pytest.mark.train, pytest.mark.slow]

SAME_BATCHES_TOL = 1e-5  # see the module docstring
STEPS = 16


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ftc-cache")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def fsdp_spec_file(tmp: Path) -> Path:
    """FULL_SPEC (2 processes, tiny model, micro-batch 2, accumulation 2) with engine: fsdp."""
    p = tmp / "fsdp.yaml"
    text = FULL_SPEC.replace("examples/data/", f"{ROOT}/examples/data/")
    assert "deepspeed: {zero_stage: 2}\n" in text
    p.write_text(text.replace("deepspeed: {zero_stage: 2}\n", "engine: fsdp\n"))
    return p


def fsdp_overrides(out: Path, *extra: str) -> list[str]:
    return [f"output.uri={out.as_uri()}", f"training.max_steps={STEPS}", "output.checkpoint_every_steps=4",
            "output.keep_last=2", *extra]


def worst(got: dict[int, float], ref: dict[int, float]) -> float:
    assert sorted(got) == sorted(ref) == list(range(1, len(ref) + 1))
    return max(abs(got[s] - ref[s]) / abs(ref[s]) for s in ref)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir) -> tuple[Path, Path, str]:
    """An uninterrupted 2-process FSDP run: (its output folder, its spec file, its log)."""
    tmp = tmp_path_factory.mktemp("fsdp-ref")
    out, spec = tmp / "out", fsdp_spec_file(tmp)
    rc, log = finish(launch(write_payload(tmp, "ref", fsdp_overrides(out), base=spec), 2, cache_dir, tmp))
    assert rc == 0, log[-4000:]
    return out, spec, log


# --------------------------------------------------------------------------- (a) trains, exports


def test_fsdp_two_processes_export_a_consolidated_model(reference, cache_dir):
    """Two processes train; final/ is a plain Hugging Face model whose eval loss is the reported one."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, spec_file, log = reference
    assert "fsdp" in log and "2 process(es) on 1 node(s)" in log
    final = out / "final"
    with safe_open(str(final / "model.safetensors"), "pt") as fh:  # whole tensors, not one rank's shards
        emb = fh.get_tensor("model.embed_tokens.weight")
    model = AutoModelForCausalLM.from_pretrained(str(final))
    assert tuple(emb.shape) == tuple(model.get_input_embeddings().weight.shape)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert '"LlamaForCausalLM"' in (final / "config.json").read_text()  # not FSDPLlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(str(final))
    spec = load_spec(spec_file, overrides=fsdp_overrides(out))
    summary = records(out, "summary")[0]
    assert eval_loss_of(model, spec, tok) == pytest.approx(summary["eval_loss"], rel=1e-4)
    assert summary["eval_loss"] < records(out, "eval")[0]["loss"]
    assert committed_steps(out)[-1] == STEPS
    ckpt = out / "checkpoints" / f"step-{STEPS:08d}" / "engine"
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "scheduler.pt"} <= {p.name for p in ckpt.iterdir()}


def test_fsdp_tied_embeddings_export_one_shared_matrix(tmp_path, cache_dir):
    """A tied output layer stays in the root FSDP group with its embedding (Llama-3.2-1B's shape ties
    them): the export is a tied model again, and it is the one that gave the reported eval loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, spec_file = tmp_path / "out", fsdp_spec_file(tmp_path)
    sets = [f"output.uri={out.as_uri()}", "training.max_steps=4", "output.checkpoint_every_steps=2",
            "model.random_init.tie_word_embeddings=true"]
    rc, log = finish(launch(write_payload(tmp_path, "tied", sets, base=spec_file), 2, cache_dir, tmp_path))
    assert rc == 0, log[-3000:]
    model = AutoModelForCausalLM.from_pretrained(str(out / "final"))
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tok = AutoTokenizer.from_pretrained(str(out / "final"))
    got = eval_loss_of(model, load_spec(spec_file, overrides=sets), tok)
    assert got == pytest.approx(records(out, "summary")[0]["eval_loss"], rel=1e-4)


def test_fsdp_fp8_trains_checkpoints_and_exports_a_plain_model(tmp_path, cache_dir):
    """training.fp8 (torchao's float8 linear layers, emulated on the CPU): the run commits checkpoints with
    the usual keys and exports a plain bf16/fp32 Llama whose eval loss is the reported one within what
    the float8 rounding of the reported (float8) evaluation changes."""
    pytest.importorskip("torchao")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, spec_file = tmp_path / "out", fsdp_spec_file(tmp_path)
    sets = [f"output.uri={out.as_uri()}", "training.max_steps=6", "output.checkpoint_every_steps=3",
            "training.fp8=tensorwise"]
    rc, log = finish(launch(write_payload(tmp_path, "fp8", sets, base=spec_file), 2, cache_dir, tmp_path))
    assert rc == 0, log[-3000:]
    assert "training.fp8: 14 linear layers of the decoder layers compute in float8 (tensorwise scaling" in log
    assert "Failed to load" not in log and "_pytree" not in log  # torchao's CPU-host chatter kept out
    assert committed_steps(out)[-2:] == [3, 6]
    model = AutoModelForCausalLM.from_pretrained(str(out / "final"))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert all(type(m).__name__ != "Float8Linear" for m in model.modules())
    tok = AutoTokenizer.from_pretrained(str(out / "final"))
    got = eval_loss_of(model, load_spec(spec_file, overrides=sets), tok)
    assert got == pytest.approx(records(out, "summary")[0]["eval_loss"], rel=1e-2)


# --------------------------------------------------------------------------- (b) the same losses as ZeRO-2 and 1 process


def test_fsdp_loss_curve_equals_zero2_and_one_process(reference, tmp_path, cache_dir):
    """On identical batches, FSDP's per-step loss is DeepSpeed ZeRO-2's (2 processes) and a 1-process
    FSDP run's with twice the accumulation (the same global batch)."""
    pytest.importorskip("deepspeed")
    ref_out, _, _ = reference
    ds_out, one_out = tmp_path / "zero2", tmp_path / "one"
    ds = launch(write_payload(tmp_path, "zero2", full_overrides(ds_out, 2, f"training.max_steps={STEPS}",
                                                                 "output.checkpoint_every_steps=null"),
                              base=_ds_spec_file(tmp_path)), 2, cache_dir, tmp_path)
    rc, log = finish(ds)
    assert rc == 0, log[-3000:]
    one = fsdp_overrides(one_out, "resources.procs_per_node=1", "training.gradient_accumulation_steps=4")
    rc, log = finish(launch(write_payload(tmp_path, "one", one, base=fsdp_spec_file(tmp_path)), 1, cache_dir,
                            tmp_path))
    assert rc == 0, log[-3000:]
    fsdp = curve(ref_out)
    assert fsdp[STEPS] < fsdp[1] - 0.2  # it trains: the comparison is not between flat curves
    zero2, single = worst(curve(ds_out), fsdp), worst(curve(one_out), fsdp)
    print(f"relative difference from 2-process FSDP: ZeRO-2 {zero2:.1e}, 1 process {single:.1e}")
    assert zero2 <= SAME_BATCHES_TOL, f"FSDP and ZeRO-2 differ by {zero2:.2e} (relative)"
    assert single <= SAME_BATCHES_TOL, f"FSDP on 1 and on 2 processes differ by {single:.2e} (relative)"


def _ds_spec_file(tmp: Path) -> Path:
    p = tmp / "full.yaml"
    p.write_text(FULL_SPEC.replace("examples/data/", f"{ROOT}/examples/data/"))
    return p


def test_fsdp_with_compiled_layers_and_checkpointing_trains_the_same_steps(reference, tmp_path, cache_dir,
                                                                             monkeypatch):
    """training.compile (regional, before fully_shard) and gradient checkpointing of every layer (inside
    FSDP's per-layer hooks) change how a step runs, not what it computes."""
    monkeypatch.setenv("FTCLUSTER_COMPILE_BACKEND", "aot_eager")  # inductor would build C++ on this CPU
    ref_out, _, _ = reference
    out = tmp_path / "out"
    sets = fsdp_overrides(out, "training.compile=true", "training.gradient_checkpointing=true")
    rc, log = finish(launch(write_payload(tmp_path, "compiled", sets, base=fsdp_spec_file(tmp_path)), 2, cache_dir,
                            tmp_path))
    assert rc == 0, log[-3000:]
    assert "2 decoder layers compiled (torch.compile, backend aot_eager)" in log
    assert "graph(s) compiled in the first step for 2 layers" in log, log[-3000:]  # loop's compile_report
    assert "fell back to eager" not in log
    assert worst(curve(out), curve(ref_out)) <= SAME_BATCHES_TOL


# --------------------------------------------------------------------------- (c) stop on one rank, resume


def test_fsdp_sigterm_on_one_rank_then_resume(reference, tmp_path, cache_dir):
    """SIGTERM to rank 1 only: both ranks stop at the same step and commit its DCP checkpoint (written
    in the background); the rerun resumes from it and replays the uninterrupted run."""
    ref_out, _, _ = reference
    out = tmp_path / "run"
    payload = write_payload(tmp_path, "run", fsdp_overrides(out), base=fsdp_spec_file(tmp_path))
    k = random.Random().randint(5, 11)
    proc = launch(payload, 2, cache_dir, tmp_path)
    wait_for_step(proc, out, k)
    rank1 = [p for p in _children(proc.pid) if _env_of(p).get("RANK") == "1"]
    assert len(rank1) == 1
    os.kill(rank1[0], signal.SIGTERM)
    rc, log = finish(proc)
    assert rc == 143, log[-3000:]
    stopped = records(out, "preempted")[-1]
    assert stopped["signal"] == "peer" and stopped["step"] >= k
    assert committed_steps(out)[-1] == stopped["step"]

    rc, log = finish(launch(payload, 2, cache_dir, tmp_path))
    assert rc == 0, log[-3000:]
    assert f"resumed from checkpoint step {stopped['step']} " in log
    assert_same_curve(curve(out), curve(ref_out))


# --------------------------------------------------------------------------- two "nodes"


def test_fsdp_two_nodes_commit_parts_and_resume(tmp_path, cache_dir):
    """Two torchrun agents as two nodes with node-local folders: each node's folder holds its rank's
    DCP file (node 0's also .metadata), the committed step folder holds both, and a rerun after a
    stop on node 1 loads from that merged folder and replays the uninterrupted run."""
    spec = fsdp_spec_file(tmp_path)
    common = ["resources.nodes=2", "resources.procs_per_node=1"]

    def two_nodes(payload: Path) -> list[subprocess.Popen]:
        return launch_two_nodes(payload, cache_dir, tmp_path)

    ref_out, out = tmp_path / "ref", tmp_path / "run"
    ref = [finish(p) for p in two_nodes(write_payload(tmp_path, "ref", fsdp_overrides(ref_out, *common), base=spec))]
    assert [rc for rc, _ in ref] == [0, 0], ref[0][1][-3000:] + ref[1][1][-3000:]
    import json

    man = json.loads((ref_out / "checkpoints" / f"step-{STEPS:08d}" / "manifest.json").read_text())
    assert {"engine/.metadata", "engine/__0_0.distcp", "engine/__1_0.distcp", "rank-00000.pt",
            "rank-00001.pt"} <= set(man["files"])

    payload = write_payload(tmp_path, "run", fsdp_overrides(out, *common), base=spec)
    procs = two_nodes(payload)
    k = random.Random().randint(5, 11)
    wait_for_step(procs[0], out, k)
    os.kill(procs[1].pid, signal.SIGUSR2)  # one agent only (c10d puts rank 0 on either)
    res = [finish(p) for p in procs]
    assert [rc for rc, _ in res] == [143, 143], res[0][1][-3000:] + res[1][1][-3000:]
    stopped = records(out, "preempted")[-1]["step"]
    assert stopped >= k and committed_steps(out)[-1] == stopped

    res = [finish(p) for p in two_nodes(payload)]
    assert [rc for rc, _ in res] == [0, 0], res[0][1][-3000:] + res[1][1][-3000:]
    assert f"resumed from checkpoint step {stopped} " in res[0][1] + res[1][1]
    assert_same_curve(curve(out), curve(ref_out))


# --------------------------------------------------------------------------- (d) 2 -> 1 -> 2 processes


def test_fsdp_resumes_on_another_number_of_processes(tmp_path, cache_dir):
    """2 processes to a stop, 1 process (twice the accumulation: the same global batch) to a later
    stop, 2 processes to the end: DCP reshards the model and optimizer each time and the streamed
    corpus continues at the same block (records read in memory do too, regrouped: test_ds_reshard.py),
    so the losses follow an uninterrupted 2-process run's within SAME_BATCHES_TOL."""
    from tests.e2e.test_stream_train import SPEC as STREAM_SPEC
    from tests.support.corpora import documents, tokenized_corpus

    corpus = tmp_path / "corpus"
    tokenized_corpus(corpus, documents(tmp_path / "raw", mb=0.3, files=2), shard_tokens=40_000)
    lora = "lora: {r: 8, alpha: 16, dropout: 0.0, target_modules: [q_proj, v_proj, down_proj, lm_head]}"
    assert lora in STREAM_SPEC
    text = STREAM_SPEC.replace("CORPUS", str(corpus)).replace("method: lora", "method: full").replace(
        lora, "engine: fsdp").replace("learning_rate: 1.0e-2", "learning_rate: 2.0e-3")
    spec = tmp_path / "cpt-fsdp.yaml"
    spec.write_text(text)
    two = ["resources.procs_per_node=2", "training.max_steps=24"]
    one = ["resources.procs_per_node=1", "training.max_steps=24", "training.gradient_accumulation_steps=2"]

    ref_out, out = tmp_path / "ref", tmp_path / "run"
    rc, log = finish(launch(write_payload(tmp_path, "ref", [*two, f"output.uri={ref_out.as_uri()}"], base=spec), 2,
                            cache_dir, tmp_path))
    assert rc == 0, log[-3000:]

    def stop_after(sets: list[str], nproc: int, step: int) -> tuple[int, str]:
        payload = write_payload(tmp_path, "run", [*sets, f"output.uri={out.as_uri()}"], base=spec)
        proc = launch(payload, nproc, cache_dir, tmp_path)
        wait_for_step(proc, out, step)
        os.kill(proc.pid, signal.SIGUSR2)
        rc, log = finish(proc)
        assert rc == 143, log[-3000:]
        stopped = records(out, "preempted")[-1]["step"]
        assert committed_steps(out)[-1] == stopped
        return stopped, log

    first, _ = stop_after(two, 2, random.Random().randint(3, 8))
    second, log = stop_after(one, 1, first + random.Random().randint(3, 6))
    assert f"resuming checkpoint step {first} of 2 process(es) on 1" in log
    assert "the same blocks follow, regrouped" in log
    rc, log = finish(launch(write_payload(tmp_path, "run", [*two, f"output.uri={out.as_uri()}"], base=spec), 2,
                            cache_dir, tmp_path))
    assert rc == 0, log[-3000:]
    assert f"resuming checkpoint step {second} of 1 process(es) on 2" in log
    got, want = curve(out), curve(ref_out)
    assert want[24] < want[1] - 0.5  # it learns the corpus
    assert worst(got, want) <= SAME_BATCHES_TOL, f"the 2 -> 1 -> 2 curve differs by {worst(got, want):.2e}"
    assert max(abs(got[s] - want[s]) / want[s] for s in range(1, first + 1)) <= REL_TOL  # before any change


# --------------------------------------------------------------------------- added tokens; a resume builds no full copy


def test_fsdp_added_tokens_grow_train_and_export_and_a_resume_skips_rank_0s_copy(tmp_path, cache_dir):
    """tokenizer.add_tokens with engine: fsdp: the meta-device build grows the embedding (515 tokens:
    576 rows, a multiple of 64), rank 0 broadcasts the grown rows, the new rows train, and final/ holds the
    grown matrix. A resume takes its weights from the DCP checkpoint: rank 0 builds no full copy."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    terms = ["habeas corpus", "res judicata", "Varnholt rule"]
    out, spec_file = tmp_path / "out", fsdp_spec_file(tmp_path)
    sets = [*fsdp_overrides(out), "training.max_steps=12", "output.checkpoint_every_steps=2",
            f"tokenizer.add_tokens={terms}".replace("'", '"')]
    payload = write_payload(tmp_path, "terms", sets, base=spec_file)
    proc = launch(payload, 2, cache_dir, tmp_path)
    wait_for_step(proc, out, 3)
    os.kill(proc.pid, signal.SIGUSR2)
    rc, first = finish(proc)
    assert rc == 143, first[-3000:]
    assert "broadcast into every rank's shards" in first and "growing the embedding and output matrices to 576" in first
    stopped = records(out, "preempted")[-1]["step"]
    rc, log = finish(launch(payload, 2, cache_dir, tmp_path))
    assert rc == 0, log[-3000:]
    assert f"resumed from checkpoint step {stopped} " in log
    assert "broadcast into every rank's shards" not in log  # the checkpoint filled the shards
    final = out / "final"
    tok = AutoTokenizer.from_pretrained(str(final))
    assert len(tok) == 515 and tok.convert_tokens_to_ids("Varnholt rule") == 514
    with safe_open(str(final / "model.safetensors"), "pt") as fh:
        emb, head = fh.get_tensor("model.embed_tokens.weight"), fh.get_tensor("lm_head.weight")
    assert emb.shape[0] == head.shape[0] == 576
    for w in (emb, head):
        assert torch.equal(w[515:], w[515].expand(61, -1))  # padding rows: one value, never trained
    # The data never holds the terms: their output rows still learn (their logits are pushed down).
    assert not torch.allclose(head[512:515], head[515].expand(3, -1))
    model = AutoModelForCausalLM.from_pretrained(str(final))
    assert model.config.ftcluster_vocab == 515
    from ftcluster.train.model import mask_padding_logits

    mask_padding_logits(model, 515)  # as the run (and ftcluster sample) computes its losses
    spec = load_spec(spec_file, overrides=sets)
    assert eval_loss_of(model, spec, tok) == pytest.approx(records(out, "summary")[0]["eval_loss"], rel=1e-4)
