"""End-to-end runs of the training runtime on CPU: real torchrun, gloo, peft, DeepSpeed, storage.

Tolerance for resumed runs: on CPU in fp32 a resumed run replays the uninterrupted one
step for step, so its per-step losses must match within a relative 1e-5 (observed: equal).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("deepspeed")


from ftcluster.plan.launch import compile_plan  # noqa: E402
from ftcluster.spec.loader import load_spec  # noqa: E402

pytestmark = pytest.mark.train

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
REL_TOL = 1e-5


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One tokenizer/model cache for the module: the BPE is trained once."""
    return tmp_path_factory.mktemp("ftc-cache")


def write_payload(tmp: Path, name: str, overrides: list[str], base: Path = QUICKSTART) -> Path:
    spec = load_spec(base, overrides=overrides)
    path = tmp / f"{name}.payload.json"
    path.write_text(compile_plan(spec).payload_json())
    return path


def full_overrides(out: Path, stage: int, *extra: str) -> list[str]:
    """Overrides of FULL_SPEC (a 2-process DeepSpeed full fine-tune of the tiny model on CPU)."""
    return [f"output.uri={out.as_uri()}", f"deepspeed.zero_stage={stage}", *extra]


FULL_SPEC = """\
name: full-cpu
method: full
model: {random_init: {preset: tiny}}
tokenizer: {train_vocab_size: 512}
data:
  train: examples/data/instruct.jsonl
  eval: examples/data/instruct_eval.jsonl
  format: instruction
  seq_len: 128
training: {learning_rate: 1.0e-3, warmup_steps: 2, max_steps: 12, micro_batch_size: 2,
           gradient_accumulation_steps: 2, log_every_steps: 1, precision: bf16}
deepspeed: {zero_stage: 2}
resources: {gpus_per_node: 0, procs_per_node: 2}
output: {uri: file:///replaced, checkpoint_every_steps: 5, keep_last: 2}
"""


def full_spec_file(tmp: Path) -> Path:
    p = tmp / "full.yaml"
    p.write_text(FULL_SPEC.replace("examples/data/", f"{ROOT}/examples/data/"))  # relative would be to tmp
    return p


def launch(payload: Path, nproc: int, cache: Path, tmp: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "FTCLUSTER_CACHE": str(cache), "FTCLUSTER_LOCAL_DIR": str(tmp / "local"),
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "120"}
    cmd = [sys.executable, "-m", "ftcluster.train.launch", "--standalone", f"--nproc-per-node={nproc}",
           "--max-restarts=0", "-m", "ftcluster.train", "--spec", str(payload)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **popen)


def launch_two_nodes(payload: Path, cache: Path, tmp: Path, named: bool = False) -> list[subprocess.Popen]:
    """Two "nodes" on this host: a launcher each (one process), c10d rendezvous, a node-local folder each;
    ``named``: each launcher's node is called node0 / node1 (FTCLUSTER_NODE_NAME, as SLURMD_NODENAME names a
    Slurm node)."""
    port = _free_port()
    procs = []
    for node in (0, 1):
        env = {**os.environ, "FTCLUSTER_CACHE": str(cache), "FTCLUSTER_LOCAL_DIR": str(tmp / f"disk{node}"),
               "HF_HUB_OFFLINE": "1", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "120",
               **({"FTCLUSTER_NODE_NAME": f"node{node}"} if named else {})}
        cmd = [sys.executable, "-m", "ftcluster.train.launch", "--nnodes=2", "--nproc-per-node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={payload.stem}",
               "--max-restarts=0", "-m", "ftcluster.train", "--spec", str(payload)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    return procs


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def records(out: Path, kind: str | None = None) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in recs if kind is None or r["kind"] == kind]


def curve(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(out, "train")}


def assert_same_curve(got: dict[int, float], ref: dict[int, float]) -> None:
    assert sorted(got) == sorted(ref) == list(range(1, len(ref) + 1))
    worst = max(abs(got[s] - ref[s]) / abs(ref[s]) for s in ref)
    assert worst <= REL_TOL, f"resumed loss curve differs by {worst:.2e} (relative)"


def committed_steps(out: Path) -> list[int]:
    from ftcluster.storage.commit import CheckpointStore

    store = CheckpointStore(out.as_uri())
    try:
        return store.committed()
    finally:
        store.close()


def wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before step {step}:\n{proc.stdout.read()}")
        done = [r["step"] for r in records(out, "train")] if (out / "metrics.jsonl").exists() else []
        if done and max(done) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def eval_loss_of(model, spec, tokenizer) -> float:
    """Token-mean loss of ``model`` on the spec's eval set, computed here, independently of the run."""
    from ftcluster.train import data as D
    from ftcluster.train.engines.base import token_ce_sum

    recs = D.load_records(spec.data.eval, spec.data.file_format, spec.data.storage_options)
    ds = D.PackedDataset(D.build_examples(recs, tokenizer, spec.data), spec.data.seq_len, spec.data.packing,
                         tokenizer.pad_token_id)
    ce = n = 0.0
    model.eval()
    with torch.no_grad():
        for b in D.eval_batches(ds, spec.training.micro_batch_size):
            c, k = token_ce_sum(model, b, torch.device("cpu"))
            ce, n = ce + float(c), n + float(k)
    return ce / n


# --------------------------------------------------------------------------- (a) quickstart


def test_quickstart_trains_and_leaves_a_loadable_adapter(tmp_path, cache_dir):
    """`ftcluster submit examples/quickstart.yaml --wait` through the real local backend."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from ftcluster.train import model as M

    out = tmp_path / "out"
    env = {**os.environ, "FTCLUSTER_HOME": str(tmp_path / "home"), "FTCLUSTER_CACHE": str(cache_dir)}
    res = subprocess.run([sys.executable, "-m", "ftcluster.cli", "submit", str(QUICKSTART), "--wait",
                          "--set", f"output.uri={out.as_uri()}"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert re.search(r"^curves: ftcluster plot \S+ -o quickstart\S*\.png$", res.stderr, re.M), res.stderr[-1000:]
    spec = load_spec(QUICKSTART, overrides=[f"output.uri={out.as_uri()}"])
    steps = spec.training.max_steps
    assert sorted(curve(out)) == list(range(1, steps + 1))
    evals = records(out, "eval")
    assert evals[0]["step"] == 0 and evals[-1]["step"] == steps
    assert evals[-1]["loss"] < evals[0]["loss"] - 1.0, evals  # it learned, visibly
    general = {r["when"]: r["loss"] for r in records(out, "general_eval")}
    assert set(general) == {"before", "after"}

    adapter = out / "adapter"
    assert {"adapter_model.safetensors", "adapter_config.json", "manifest.json", "ftcluster_meta.json"} <= {
        p.name for p in adapter.iterdir()}
    meta = json.loads((adapter / "ftcluster_meta.json").read_text())
    assert meta["step"] == steps and meta["base"]["source"] == "random_init:tiny"
    assert meta["format"] == "ftcluster.artifact/1" and meta["kind"] == "adapter"
    tok = AutoTokenizer.from_pretrained(str(adapter))
    base = M.load_base_model(spec, tok, torch.float32, torch.device("cpu"), cache_dir)
    from ftcluster.train.lineage import base_of_spec

    assert meta["base"] == base_of_spec(spec, tok, cache_dir)  # the same identity when loading it again
    init = M.apply_lora(M.load_base_model(spec, tok, torch.float32, torch.device("cpu"), cache_dir), spec.lora,
                        spec.training.seed)
    init_w = {n: p.detach().clone() for n, p in init.named_parameters() if "lora_" in n}
    model = PeftModel.from_pretrained(base, str(adapter))
    trained = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert trained.keys() == init_w.keys() and trained
    assert all(not torch.equal(trained[n], init_w[n]) for n in trained)
    assert all(trained[n].abs().sum() > 0 for n in trained if "lora_B" in n)
    # The adapter on disk is the one that produced the reported final eval loss.
    assert eval_loss_of(model, spec, tok) == pytest.approx(evals[-1]["loss"], rel=1e-4)
    # ftcluster plot draws this run (an output path) and prints the numbers behind the picture
    png = tmp_path / "quickstart.png"
    res = subprocess.run([sys.executable, "-m", "ftcluster.cli", "plot", str(out), "-o", str(png)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    row = res.stdout.splitlines()[1]
    assert str(out) in row and f" {steps} " in row and f"{evals[-1]['loss']:.4f}" in row, res.stdout
    assert f"{general['before']:.4f} -> {general['after']:.4f}" in row, res.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


# --------------------------------------------------------------------------- a tiny LoRA run: what it says, what it leaves


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory, cache_dir) -> tuple[Path, str, Path]:
    """A 3-step LoRA run with a general-text eval and a merged model, through the launcher, with
    its own TMPDIR and no FTCLUSTER_LOCAL_DIR (the node-local folder is the default one):
    (output folder, its log, its TMPDIR)."""
    tmp = tmp_path_factory.mktemp("tiny-lora")
    out, tmpdir = tmp / "out", tmp / "tmp"
    tmpdir.mkdir()
    payload = write_payload(tmp, "tiny", [f"output.uri={out.as_uri()}", "training.max_steps=3",
                                          "training.warmup_steps=1", "training.eval_every_steps=null",
                                          "output.checkpoint_every_steps=2", "lora.merge_at_end=true"])
    env = {k: v for k, v in os.environ.items() if k != "FTCLUSTER_LOCAL_DIR"}
    env.update({"FTCLUSTER_CACHE": str(cache_dir), "TMPDIR": str(tmpdir), "HF_HUB_OFFLINE": "1",
                "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    res = subprocess.run([sys.executable, "-m", "ftcluster.train.launch", "--standalone", "--nproc-per-node=1",
                          "--max-restarts=0", "-m", "ftcluster.train", "--spec", str(payload)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out, res.stdout + res.stderr, tmpdir


def test_forgetting_check_is_explained_and_kept_in_the_artifacts_metadata(tiny_lora):
    import re

    out, log, _ = tiny_lora
    general = {r["when"]: r for r in records(out, "general_eval")}
    before, after = general["before"]["loss"], general["after"]["loss"]
    assert general["after"]["drift"] == pytest.approx(after - before)
    line = next(ln for ln in log.splitlines() if "general_eval (after)" in ln)
    want = (rf"general_eval \(after\) loss {after:.4f} at step 3: forgetting check on general text, "
            rf"[+-]\d+\.\d\d \([+-]\d+%\) since before training")
    assert re.search(want, line), line
    assert f"{after - before:+.2f} ({(after - before) / before:+.0%})" in line
    assert "general_eval (before)" in log and "forgetting check on general text" in log
    for artifact in ("adapter", "merged"):
        meta = json.loads((out / artifact / "ftcluster_meta.json").read_text())
        assert meta["general_eval_before"] == pytest.approx(before), artifact
        assert meta["general_eval_after"] == pytest.approx(after), artifact


def test_a_run_leaves_nothing_in_the_temp_folder(tiny_lora):
    """The node-local folder (TMPDIR/ftcluster/<name>-<hash>), the launcher's exit folder and torchrun's log folder go
    once everything is committed; the run's outputs are in the store."""
    out, _, tmpdir = tiny_lora
    assert (out / "adapter" / "manifest.json").exists() and (out / "merged" / "manifest.json").exists()
    left = sorted(str(p.relative_to(tmpdir)) for p in tmpdir.rglob("*"))
    assert not left, left  # torchrun's torchelastic_* folder too


# --------------------------------------------------------------------------- (b) DeepSpeed ZeRO 2 and 3


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_two_processes_export_consolidated_model(tmp_path, cache_dir, stage):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    spec_file = full_spec_file(tmp_path)
    payload = write_payload(tmp_path, "full", full_overrides(out, stage), base=spec_file)
    rc, log = finish(launch(payload, 2, cache_dir, tmp_path))
    assert rc == 0, log[-4000:]
    assert "computing in fp32" in log
    final = out / "final"
    model = AutoModelForCausalLM.from_pretrained(str(final))
    tok = AutoTokenizer.from_pretrained(str(final))
    spec = load_spec(spec_file, overrides=full_overrides(out, stage))
    summary = records(out, "summary")[0]
    # The consolidated weights are the trained ones (a missed ZeRO-3 gather would not give this loss).
    assert eval_loss_of(model, spec, tok) == pytest.approx(summary["eval_loss"], rel=1e-4)
    assert summary["eval_loss"] < records(out, "eval")[0]["loss"]
    assert committed_steps(out)[-1] == spec.training.max_steps


@pytest.mark.slow
def test_lora_data_parallel_two_processes(tmp_path, cache_dir):
    """LoRA with 2 processes (DDP over gloo): both ranks train, the adapter is saved once and is the
    one that produced the reported eval loss."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from ftcluster.train import model as M

    out = tmp_path / "out"
    overrides = [f"output.uri={out.as_uri()}", "resources.procs_per_node=2", "training.max_steps=16",
                 "training.micro_batch_size=4", "training.log_every_steps=1", "training.eval_every_steps=1000",
                 "output.checkpoint_every_steps=8"]
    rc, log = finish(launch(write_payload(tmp_path, "ddp", overrides), 2, cache_dir, tmp_path))
    assert rc == 0, log[-4000:]
    assert "2 process(es) on 1 node(s)" in log
    assert sorted(curve(out)) == list(range(1, 17))
    assert committed_steps(out) == [8, 16]
    spec = load_spec(QUICKSTART, overrides=overrides)
    adapter = out / "adapter"
    tok = AutoTokenizer.from_pretrained(str(adapter))
    base = M.load_base_model(spec, tok, torch.float32, torch.device("cpu"), cache_dir)
    model = PeftModel.from_pretrained(base, str(adapter))
    evals = records(out, "eval")
    assert evals[-1]["step"] == 16 and evals[-1]["loss"] < evals[0]["loss"]
    assert eval_loss_of(model, spec, tok) == pytest.approx(evals[-1]["loss"], rel=1e-4)


# --------------------------------------------------------------------------- (c) + (e) stop, resume


@pytest.mark.slow
def test_lora_sigusr2_then_resume_skips_corrupt_checkpoints(tmp_path, cache_dir):
    """SIGUSR2 to the launcher at a random step: exit 143 with that step committed. Then the newest
    checkpoint is corrupted and a half-written newer one added: the rerun falls back to the older
    committed checkpoint and still reproduces the uninterrupted loss curve."""
    common = ["training.max_steps=40", "training.log_every_steps=1", "output.checkpoint_every_steps=10",
              "output.keep_last=3", "training.eval_every_steps=1000"]
    ref_out, out = tmp_path / "ref", tmp_path / "run"
    ref = launch(write_payload(tmp_path, "ref", common + [f"output.uri={ref_out.as_uri()}"]), 1, cache_dir, tmp_path)
    rc, log = finish(ref)
    assert rc == 0, log[-3000:]

    payload = write_payload(tmp_path, "run", common + [f"output.uri={out.as_uri()}"])
    k = random.Random().randint(12, 30)
    proc = launch(payload, 1, cache_dir, tmp_path)
    wait_for_step(proc, out, k)
    os.kill(proc.pid, signal.SIGUSR2)  # the launcher: torchrun forwards it to the worker
    rc, log = finish(proc)
    assert rc == 143, log[-3000:]
    stopped = records(out, "preempted")[-1]["step"]
    assert stopped >= k and "stop requested (SIGUSR2)" in log
    steps = committed_steps(out)
    assert steps[-1] == stopped, (steps, stopped)
    older = max(s for s in steps if s < stopped)

    # Corrupt the newest (same size, other bytes) and add a half-written newer folder.
    victim = out / "checkpoints" / f"step-{stopped:08d}" / "engine" / "trainable.safetensors"
    data = bytearray(victim.read_bytes())
    data[-100:] = bytes(100)
    victim.write_bytes(bytes(data))
    half = out / "checkpoints" / f"step-{stopped + 5:08d}"
    (half / "engine").mkdir(parents=True)
    (half / "state.json").write_text("{}")

    rc, log = finish(launch(payload, 1, cache_dir, tmp_path))
    assert rc == 0, log[-3000:]
    assert f"resumed from checkpoint step {older} " in log and "is corrupt" in log
    assert_same_curve(curve(out), curve(ref_out))


@pytest.mark.slow
def test_zero2_sigterm_on_one_rank_then_resume(tmp_path, cache_dir):
    """SIGTERM to rank 1 only: both ranks stop at the same step, commit, exit 143; the rerun
    resumes from that step and matches the uninterrupted run. Time-based checkpoints run too."""
    spec_file = full_spec_file(tmp_path)
    common = ["training.max_steps=30", "output.checkpoint_every_steps=null", "output.checkpoint_every_minutes=0.005",
              "output.keep_last=3"]
    ref_out, out = tmp_path / "ref", tmp_path / "run"
    rc, log = finish(launch(write_payload(tmp_path, "ref", full_overrides(ref_out, 2, *common), base=spec_file), 2,
                            cache_dir, tmp_path))
    assert rc == 0, log[-3000:]
    assert len([r for r in records(ref_out, "checkpoint") if not r["final"]]) >= 2, "no time-based checkpoints"

    payload = write_payload(tmp_path, "run", full_overrides(out, 2, *common), base=spec_file)
    k = random.Random().randint(8, 20)
    proc = launch(payload, 2, cache_dir, tmp_path)
    wait_for_step(proc, out, k)
    rank1 = [p for p in _children(proc.pid) if _env_of(p).get("RANK") == "1"]
    assert len(rank1) == 1
    os.kill(rank1[0], signal.SIGTERM)
    rc, log = finish(proc)
    assert rc == 143, log[-3000:]
    stopped = records(out, "preempted")[-1]
    assert stopped["signal"] == "peer" and stopped["step"] >= k  # rank 0 learned it from rank 1
    assert committed_steps(out)[-1] == stopped["step"]

    rc, log = finish(launch(payload, 2, cache_dir, tmp_path))
    assert rc == 0, log[-3000:]
    assert f"resumed from checkpoint step {stopped['step']} " in log
    assert_same_curve(curve(out), curve(ref_out))


@pytest.mark.slow
def test_two_nodes_zero3_commit_stop_and_resume(tmp_path, cache_dir):
    """Two torchrun agents as two nodes (node-local snapshot folders): each node uploads its own
    shards, rank 0 writes the manifest once both succeeded; SIGUSR2 to node 1 stops both nodes
    at the same step, and the rerun resumes from it and matches an uninterrupted run."""
    spec_file = full_spec_file(tmp_path)
    common = ["resources.nodes=2", "resources.procs_per_node=1", "training.max_steps=24",
              "output.checkpoint_every_steps=4", "output.keep_last=2"]

    def two_nodes(payload: Path) -> list[subprocess.Popen]:
        return launch_two_nodes(payload, cache_dir, tmp_path)

    ref_out, out = tmp_path / "ref", tmp_path / "run"
    ref = [finish(p) for p in two_nodes(write_payload(tmp_path, "ref", full_overrides(ref_out, 3, *common),
                                                      base=spec_file))]
    assert [rc for rc, _ in ref] == [0, 0], ref[0][1][-3000:] + ref[1][1][-3000:]
    assert "from every node" in ref[0][1] + ref[1][1]
    man = json.loads((ref_out / "checkpoints" / "step-00000024" / "manifest.json").read_text())
    assert {"rank-00000.pt", "rank-00001.pt"} <= set(man["files"])

    payload = write_payload(tmp_path, "run", full_overrides(out, 3, *common), base=spec_file)
    procs = two_nodes(payload)
    k = random.Random().randint(6, 16)
    wait_for_step(procs[0], out, k)
    os.kill(procs[1].pid, signal.SIGUSR2)  # one agent only (c10d puts rank 0 on either)
    res = [finish(p) for p in procs]
    assert [rc for rc, _ in res] == [143, 143], res[0][1][-3000:] + res[1][1][-3000:]
    stopped = records(out, "preempted")[-1]["step"]
    assert stopped >= k and committed_steps(out)[-1] == stopped

    res = [finish(p) for p in two_nodes(payload)]
    assert [rc for rc, _ in res] == [0, 0], res[0][1][-3000:] + res[1][1][-3000:]
    assert f"resumed from checkpoint step {stopped} " in res[0][1] + res[1][1]  # rank 0 is on either agent
    assert_same_curve(curve(out), curve(ref_out))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    kids = [int(p) for p in out]
    return kids + [g for k in kids for g in _children(k)]


def _env_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


# --------------------------------------------------------------------------- (d) S3 with an outage


@pytest.mark.s3
@pytest.mark.slow
def test_lora_to_s3_survives_an_outage(s3, tmp_path, cache_dir):  # noqa: F811 - pytest fixture
    """Output on S3 (moto); the endpoint goes down mid-run: training keeps going, uploads retry,
    and once it is back every checkpoint and the final adapter commit."""
    import s3fs

    uri = s3.uri("runs/lora")
    opts = json.dumps(s3.storage_options)
    payload = write_payload(tmp_path, "s3", [f"output.uri={uri}", f"output.storage_options={opts}",
                                             "training.max_steps=50", "training.log_every_steps=1",
                                             "output.checkpoint_every_steps=10", "output.keep_last=2"])
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3.direct_url})
    remote_metrics = f"{s3.bucket}/runs/lora/metrics.jsonl"

    def remote_step() -> int:
        try:
            lines = fs.cat_file(remote_metrics).decode().splitlines()
        except FileNotFoundError:
            return 0
        return max([json.loads(x)["step"] for x in lines if '"train"' in x] or [0])

    def local_step() -> int:
        found = list((tmp_path / "local").glob("*/node0/metrics.jsonl"))
        lines = found[0].read_text().splitlines() if found else []
        return max([json.loads(x)["step"] for x in lines if '"train"' in x] or [0])

    proc = launch(payload, 1, cache_dir, tmp_path)
    end = time.monotonic() + 240
    while remote_step() < 12:
        assert proc.poll() is None and time.monotonic() < end, "the run ended or stalled before the outage"
        time.sleep(0.1)
    s3.stop()
    down_at = local_step()
    while local_step() < down_at + 12 and proc.poll() is None:  # training goes on while S3 is down
        assert time.monotonic() < end
        time.sleep(0.1)
    s3.start()
    rc, log = finish(proc)
    assert rc == 0, log[-4000:]
    assert remote_step() == 50
    assert not list((tmp_path / "local").glob("*/node0"))  # the node-local folder goes once all is committed
    assert "retrying" in log  # uploads failed during the outage and were retried
    keys = s3.keys("runs/lora/")
    assert "runs/lora/adapter/manifest.json" in keys and "runs/lora/adapter/adapter_model.safetensors" in keys
    assert {k.split("/")[3] for k in keys if k.startswith("runs/lora/checkpoints/")} == {
        "step-00000040", "step-00000050"}  # committed, older ones pruned
    assert all(f"runs/lora/adapters/step-{s:08d}/manifest.json" in keys for s in range(10, 51, 10))
    assert sorted(json.loads(x)["step"] for x in fs.cat_file(remote_metrics).decode().splitlines()
                  if '"train"' in x) == list(range(1, 51))


# --------------------------------------------------------------------------- errors


def test_bad_payload_is_one_line(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text("{not json")
    res = subprocess.run([sys.executable, "-m", "ftcluster.train", "--spec", str(bad)], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 1
    assert res.stderr.strip().count("\n") == 0 and f"{bad}: not JSON" in res.stderr


def test_missing_model_path_is_one_line(tmp_path, cache_dir):
    payload = write_payload(tmp_path, "nomodel", [f"output.uri={(tmp_path / 'o').as_uri()}",
                                                  "model.random_init=null", f"model.path={tmp_path / 'none'}"])
    env = {**os.environ, "FTCLUSTER_CACHE": str(cache_dir), "FTCLUSTER_LOCAL_DIR": str(tmp_path / "local")}
    res = subprocess.run([sys.executable, "-m", "ftcluster.train", "--spec", str(payload)], capture_output=True,
                         text=True, cwd=ROOT, env=env, timeout=300)
    assert res.returncode == 1
    err = [ln for ln in res.stderr.splitlines() if ln.startswith("error")]
    assert len(err) == 1 and "none" in err[0], res.stderr[-2000:]
