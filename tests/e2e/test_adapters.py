"""Adapters as artifacts, on real peft models on CPU: three adapters trained by the runtime on one base
(different data, so they answer differently), their records and lineage, ``adapters list|show``, the
hot-swap set against each adapter's merged model, ``sample --adapter``, ``merge``, and the lineage
refusal on another base.

Tolerance: the merged model and the base + adapter compute in fp32 on CPU; their logits agree within
an absolute 1e-4 (observed ~1e-6: the merge adds B@A to W once, peft adds x@A@B per call).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from ftcluster.plan.launch import compile_plan  # noqa: E402
from ftcluster.spec.loader import load_spec  # noqa: E402
from tests.support.s3fixture import moto_server, s3  # noqa: E402,F401

pytestmark = pytest.mark.train

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"
ATOL = 1e-4
# Three skills of the shipped instruction set: each adapter learns one.
SKILLS = {"capitals": "capital", "spelling": "Spell", "sums": " plus "}

SPEC = """\
name: {name}
method: lora
model: {{path: {base}}}
tokenizer: {{path: {tok}}}
data:
  train: {train}
  general_eval: {general}
  format: instruction
  seq_len: 128
training: {{learning_rate: 1.0e-2, warmup_steps: 2, max_steps: 24, micro_batch_size: 8, precision: fp32,
           log_every_steps: 8, seed: 7}}
lora: {{r: {r}, alpha: 16, target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}}
resources: {{nodes: 1, gpus_per_node: 0, procs_per_node: 1}}
env: {{OMP_NUM_THREADS: "1"}}
output: {{uri: {out}, checkpoint_every_steps: 12}}
"""


def env_for(cache: Path) -> dict[str, str]:
    return {**os.environ, "FTCLUSTER_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1", "FTCLUSTER_HOME": str(cache / "home")}


def cli(*args: str, cache: Path, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftcluster.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**env_for(cache), **(env or {})}, timeout=timeout)


def make_base(folder: Path, tok_dir: Path, cache: Path, seed: int) -> Path:
    """A tiny random Llama saved as a plain Hugging Face folder (the base the adapters train on)."""
    from transformers import AutoTokenizer

    from ftcluster.train import model as M

    spec = load_spec(ROOT / "examples" / "quickstart.yaml", overrides=[f"training.seed={seed}"])
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    model = M.load_base_model(spec, tok, torch.float32, torch.device("cpu"), cache)
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """One base, three adapters trained on it through the launcher (a skill each), and a second base
    with the same architecture but other weights."""
    from ftcluster.train.tokenizer import train_tokenizer

    tmp = tmp_path_factory.mktemp("adapters")
    cache = tmp / "cache"
    quick = load_spec(ROOT / "examples" / "quickstart.yaml")
    tok = train_tokenizer(quick, 512, cache / "tokenizers")
    tok.save_pretrained(str(tmp / "tok"))
    base = make_base(tmp / "base", tmp / "tok", cache, seed=1)
    other = make_base(tmp / "other-base", tmp / "tok", cache, seed=2)
    rows = [json.loads(line) for line in (DATA / "instruct.jsonl").read_text().splitlines()]
    root = tmp / "store"
    for i, (name, word) in enumerate(SKILLS.items()):
        train = tmp / f"{name}.jsonl"
        train.write_text("".join(json.dumps(r) + "\n" for r in rows if word in r["instruction"]))
        spec_file = tmp / f"{name}.yaml"
        spec_file.write_text(SPEC.format(name=name, base=base, tok=tmp / "tok", train=train,
                                         general=DATA / "general_eval.jsonl", r=8 if i else 4,
                                         out=(root / name).as_uri()))
        payload = tmp / f"{name}.payload.json"
        payload.write_text(compile_plan(load_spec(spec_file)).payload_json())
        res = subprocess.run([sys.executable, "-m", "ftcluster.train.launch", "--standalone", "--nproc-per-node=1",
                              "--max-restarts=0", "-m", "ftcluster.train", "--spec", str(payload)], cwd=ROOT,
                             env=env_for(cache), capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return {"tmp": tmp, "cache": cache, "root": root, "base": base, "other": other}


def adapter(trained: dict, name: str) -> Path:
    return trained["root"] / name / "adapter"


def record(trained: dict, name: str) -> dict:
    return json.loads((adapter(trained, name) / "ftcluster_meta.json").read_text())


# --------------------------------------------------------------------------- the record


def test_each_adapter_records_its_base_data_and_metrics(trained):
    from ftcluster.train.lineage import base_of_folder

    recs = {name: record(trained, name) for name in SKILLS}
    base = base_of_folder(trained["base"], "x", trained["cache"])
    for name, rec in recs.items():
        assert rec["format"] == "ftcluster.artifact/1" and rec["kind"] == "adapter" and rec["name"] == name
        assert rec["base"]["fingerprint"] == base["fingerprint"]  # the same identity when loading it again
        assert rec["base"]["weights"]["kind"] == "files"
        assert rec["step"] == 24 and rec["tokens_seen"] > 0 and rec["train_loss"] is not None
        assert rec["general_eval_before"] is not None and rec["general_eval_after"] is not None
        assert rec["lora"]["r"] == (4 if name == "capitals" else 8) and rec["lora"]["new_token_rows"] == 0
        files = [p for p in adapter(trained, name).iterdir() if p.name not in ("manifest.json", "ftcluster_meta.json")]
        assert rec["size_bytes"] == sum(p.stat().st_size for p in files)
        # trainable parameters: exactly the LoRA matrices of the saved adapter
        from safetensors import safe_open

        with safe_open(str(adapter(trained, name) / "adapter_model.safetensors"), "pt") as f:
            assert rec["trainable_params"] == sum(f.get_tensor(k).numel() for k in f.keys())
        # no path of this machine outside the spec as the user wrote it
        outside = json.dumps({k: v for k, v in rec.items() if k != "training"})
        assert str(trained["tmp"]) not in outside and os.uname().nodename not in outside
    assert len({r["data"]["sha256"] for r in recs.values()}) == 3  # each trained on its own data
    assert len({r["run"]["uid"] for r in recs.values()}) == 3


def test_adapters_list_fits_80_columns_and_names_the_base(trained):
    res = cli("adapters", "list", str(trained["root"]), cache=trained["cache"], env={"COLUMNS": "80"})
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, res.stdout
    assert lines[0].split() == ["NAME", "BASE", "R", "STEP", "TOKENS", "EVAL", "FORGET", "SIZE"]
    names = [line.split()[0] for line in lines[1:4]]
    assert names == ["capitals/adapter", "spelling/adapter", "sums/adapter"]
    fp = record(trained, "sums")["base"]["fingerprint"][:8]
    assert all(line.split()[1] == fp for line in lines[1:4])
    assert lines[4] == f"base {fp}: local:base"  # one legend line per base; no path of this machine
    steps = cli("adapters", "list", str(trained["root"]), "--steps", "--json", cache=trained["cache"])
    rows = json.loads(steps.stdout)
    assert sorted(r["name"] for r in rows if r["kind"] == "step_adapter") == sorted(
        f"{n}/adapters/step-{s:08d}" for n in SKILLS for s in (12, 24))
    assert all(r["record"]["base"]["fingerprint"].startswith(fp) for r in rows)


def test_adapters_show_prints_the_lineage(trained):
    res = cli("adapters", "show", str(trained["root"] / "spelling"), cache=trained["cache"])
    assert res.returncode == 0, res.stderr
    rec = record(trained, "spelling")
    assert f"fingerprint {rec['base']['fingerprint']}" in res.stdout
    assert "lora:         r=8 alpha=16" in res.stdout and "step 24" in res.stdout
    assert f"general-eval loss {rec['general_eval_before']:.3f} -> {rec['general_eval_after']:.3f}" in res.stdout
    as_json = cli("adapters", "show", str(adapter(trained, "spelling")), "--json", cache=trained["cache"])
    assert json.loads(as_json.stdout) == rec
    missing = cli("adapters", "show", str(trained["tmp"] / "nothing"), cache=trained["cache"])
    assert missing.returncode != 0 and missing.stderr.count("\n") == 1 and "no such file" in missing.stderr


def test_adapters_list_on_s3_reads_records_only(trained, s3):  # noqa: F811 - pytest fixture
    """The same listing from a real S3 endpoint (moto), with the weights removed from the bucket: only the
    manifests (which carry the records) are read."""
    import fsspec

    fs = fsspec.filesystem("s3", **s3.storage_options)
    for name in SKILLS:
        for p in adapter(trained, name).iterdir():
            if p.suffix != ".safetensors":  # no weights there: listing must not need them
                fs.put_file(str(p), f"{s3.bucket}/runs/{name}/adapter/{p.name}")
    from ftcluster.artifacts.registry import scan

    entries = scan(f"s3://{s3.bucket}/runs", s3.storage_options)
    assert [e.name for e in entries] == [f"{n}/adapter" for n in SKILLS]
    assert [e.record for e in entries] == [record(trained, n) for n in SKILLS]


def test_adapters_check_says_which_engine_takes_each(trained, tmp_path):
    import shutil

    res = cli("adapters", "check", str(trained["root"]), "--for", "vllm", "--for", "lorax", cache=trained["cache"])
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("  vllm: loads\n") == 3 and res.stdout.count("  lorax: loads\n") == 3
    odd = tmp_path / "odd" / "adapter"
    shutil.copytree(adapter(trained, "sums"), odd)
    cfg = json.loads((odd / "adapter_config.json").read_text())
    (odd / "adapter_config.json").write_text(json.dumps({**cfg, "r": 128}))
    res = cli("adapters", "check", str(odd), cache=trained["cache"])
    assert res.returncode == 0 and res.stdout.startswith("vllm: loads with --max-lora-rank 128"), res.stdout
    res = cli("adapters", "check", str(odd), "--max-lora-rank", "64", cache=trained["cache"])
    assert res.returncode == 1 and "error: LoRA rank 128" in res.stdout, res.stdout


# --------------------------------------------------------------------------- hot-swap and merge


@pytest.fixture(scope="module")
def merged(trained) -> dict[str, Path]:
    """``ftcluster merge`` of each adapter, into a file:// store."""
    out = {}
    for name in SKILLS:
        dest = trained["tmp"] / "merged" / name
        res = cli("merge", str(trained["root"] / name), "-o", dest.as_uri(), cache=trained["cache"])
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        out[name] = dest
    return out


def test_merge_writes_a_committed_model_with_its_lineage(trained, merged):
    rec = json.loads((merged["sums"] / "ftcluster_meta.json").read_text())
    src = record(trained, "sums")
    assert rec["kind"] == "merged" and rec["base"] == src["base"]
    assert rec["merged_from"]["adapter_run_uid"] == src["run"]["uid"] and rec["merged_from"]["step"] == 24
    man = json.loads((merged["sums"] / "manifest.json").read_text())
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= set(man["files"])
    assert man["meta"] == rec


def test_merge_commits_to_s3_and_show_reads_it_back(trained, merged, s3):  # noqa: F811 - pytest fixture
    """``-o s3://...``: the same files, committed by the commit protocol (manifest last); read back by ``show``."""
    import fsspec

    env = {"AWS_ENDPOINT_URL_S3": s3.endpoint_url}
    res = cli("merge", str(adapter(trained, "capitals")), "-o", f"s3://{s3.bucket}/models/capitals", cache=trained["cache"],
              env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    fs = fsspec.filesystem("s3", **s3.storage_options)
    man = json.loads(fs.cat_file(f"{s3.bucket}/models/capitals/manifest.json"))
    local = {p.name for p in merged["capitals"].iterdir()} - {"manifest.json"}
    assert set(man["files"]) == local and man["meta"]["kind"] == "merged"
    for name, info in man["files"].items():
        assert fs.size(f"{s3.bucket}/models/capitals/{name}") == info["size"]
    show = cli("adapters", "show", f"s3://{s3.bucket}/models/capitals", "--json", cache=trained["cache"], env=env)
    assert json.loads(show.stdout) == man["meta"]
    again = cli("merge", str(adapter(trained, "capitals")), "-o", f"s3://{s3.bucket}/models/capitals",
                cache=trained["cache"], env=env)
    assert again.returncode == 1 and "a committed model is there already; pass --overwrite" in again.stderr


def test_one_base_many_adapters_switch_like_their_merged_models(trained, merged):
    """Loaded together on one base, each adapter (switched to) computes its own merged model's logits; the
    three differ from each other, and unloading one leaves the others as they were."""
    from transformers import AutoModelForCausalLM

    from ftcluster.train.adapters import AdapterSet

    os.environ["FTCLUSTER_CACHE"] = str(trained["cache"])
    s = AdapterSet.load({n: str(adapter(trained, n)) for n in SKILLS}, device="cpu")
    assert s.names == list(SKILLS) and s.active == "capitals"
    ids = torch.tensor([s.tokenizer("What is the capital of Garovia? Spell parrot. 4 plus 12")["input_ids"]])
    got = {}
    for name in ("sums", "capitals", "spelling", "sums"):  # switch back and forth
        got[name] = s.use(name).logits(ids)
        ref = AutoModelForCausalLM.from_pretrained(str(merged[name]), dtype=torch.float32).eval()
        with torch.no_grad():
            want = ref(input_ids=ids).logits
        assert torch.allclose(got[name], want, atol=ATOL), (name, (got[name] - want).abs().max())
    for a, b in (("sums", "capitals"), ("capitals", "spelling"), ("spelling", "sums")):
        assert (got[a] - got[b]).abs().max() > 0.1, (a, b)  # different data: different models
    s.unload("capitals")
    assert s.names == ["spelling", "sums"]
    assert torch.allclose(s.use("spelling").logits(ids), got["spelling"], atol=1e-6)
    with pytest.raises(Exception, match="no adapter 'capitals' loaded"):
        s.use("capitals")
    s.add("capitals-again", str(adapter(trained, "capitals")))
    assert torch.allclose(s.use("capitals-again").logits(ids), got["capitals"], atol=1e-6)


def test_sample_compares_adapters_side_by_side(trained):
    args = ["sample", "-p", "What is the capital of Garovia?", "-n", "12"]
    for name in SKILLS:
        args += ["--adapter", f"{name}={adapter(trained, name)}"]
    res = cli(*args, cache=trained["cache"])
    assert res.returncode == 0, res.stderr[-2000:]
    heads = [line for line in res.stdout.splitlines() if line.startswith("== ")]
    assert heads == [f"== {n}  ({adapter(trained, n)})" for n in SKILLS]
    answers = res.stdout.split("== ")[1:]
    assert len({a.split("\n", 1)[1].strip() for a in answers}) >= 2  # they answer differently


# --------------------------------------------------------------------------- lineage


def test_another_base_is_refused_by_load_merge_and_sample_unless_forced(trained, caplog):
    from ftcluster.artifacts.record import LineageError
    from ftcluster.train.adapters import AdapterSet

    os.environ["FTCLUSTER_CACHE"] = str(trained["cache"])
    rec = record(trained, "sums")
    with pytest.raises(LineageError) as err:
        AdapterSet.load([str(adapter(trained, "sums"))], base=str(trained["other"]), device="cpu")
    msg = str(err.value)
    assert "\n" not in msg and rec["base"]["fingerprint"][:12] in msg and "their weights differ" in msg
    assert str(trained["other"]) in msg and "--force" in msg
    forced = AdapterSet.load([str(adapter(trained, "sums"))], base=str(trained["other"]), device="cpu", force=True)
    assert forced.names == ["sums"]
    assert "--force: lineage check skipped" in caplog.text

    dest = trained["tmp"] / "merged-wrong"
    res = cli("merge", str(adapter(trained, "sums")), "--base", str(trained["other"]), "-o", dest.as_uri(),
              cache=trained["cache"])
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("error: ") and "--force" in res.stderr
    assert not dest.exists()  # nothing written
    res = cli("sample", "-p", "hi", "-n", "2", "--adapter", str(adapter(trained, "sums")), "--base",
              str(trained["other"]), cache=trained["cache"])
    assert res.returncode == 1 and "trained on base" in res.stderr and res.stderr.count("\n") == 1, res.stderr


def test_adapters_with_another_tokenizer_cannot_share_a_base(trained, tmp_path):
    import shutil

    from ftcluster.artifacts.record import LineageError
    from ftcluster.train.adapters import AdapterSet

    os.environ["FTCLUSTER_CACHE"] = str(trained["cache"])
    odd = tmp_path / "odd"
    shutil.copytree(adapter(trained, "spelling"), odd)
    rec = json.loads((odd / "ftcluster_meta.json").read_text())
    rec["tokenizer"]["sha256"] = "0" * 64
    (odd / "ftcluster_meta.json").write_text(json.dumps(rec))
    (odd / "manifest.json").unlink()  # a plain folder now: loaded as it is
    with pytest.raises(LineageError, match="different vocabularies cannot share one base"):
        AdapterSet.load([str(adapter(trained, "sums")), str(odd)], device="cpu")


def test_spec_text_is_what_the_runs_used(trained):
    """Guard for this module's fixture: the spec template loads (a change to the schema fails here first)."""
    spec = load_spec(trained["tmp"] / "sums.yaml")
    assert spec.model.path and spec.tokenizer.path and spec.lora.r == 8
    assert textwrap.dedent(SPEC).startswith("name:")
