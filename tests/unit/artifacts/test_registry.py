"""Records, listings and the lineage check, on committed folders written here (no model, no torch)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from ftcluster.artifacts import record as R
from ftcluster.artifacts.registry import read_one, scan, show_lines, table_rows
from ftcluster.errors import FtclusterError
from ftcluster.ui.tables import table


def base(weights: str = "w1", config: str = "c1", source: str = "local:base") -> dict:
    return R.base_identity(source, config, {"kind": "files", "sha256": weights})


def rec(kind: str = "adapter", b: dict | None = None, **kw) -> dict:
    out = {"format": R.RECORD_FORMAT, "kind": kind, "name": "run", "run": {"uid": "u1", "output_uri": None},
           "base": b or base(), "tokenizer": {"vocab": 512, "base_vocab": 512, "added": [], "sha256": "t" * 64},
           "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj"], "modules_to_save": [], "use_rslora": False,
                    "new_token_rows": 0},
           "step": 40, "tokens_seen": 123_456, "eval_loss": 2.0, "general_eval_before": 3.0, "general_eval_after": 3.25,
           "size_bytes": 1000, "training": {"name": "run"}}
    return {**out, **kw}


def commit(folder: Path, record: dict | None, files: dict[str, bytes] | None = None, manifest: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in (files or {"adapter_model.safetensors": b"x" * 10}).items():
        (folder / name).write_bytes(data)
    if record is not None:
        (folder / "ftcluster_meta.json").write_text(json.dumps(record))
    if manifest:
        (folder / "manifest.json").write_text(json.dumps({"meta": record or {"step": 1}, "total_bytes": 10,
                                                          "created_unix": 1.0, "files": {}}))
    return folder


@pytest.fixture
def store(tmp_path) -> Path:
    root = tmp_path / "store"
    commit(root / "qa" / "adapter", rec())
    commit(root / "qa" / "adapters" / "step-00000020", rec("step_adapter", step=20))
    commit(root / "qa" / "checkpoints" / "step-00000020", None)  # a checkpoint: not an artifact
    commit(root / "chat" / "adapter", rec(b=base("w2")))
    commit(root / "cpt" / "final", rec("final", lora=None, step=400))
    commit(root / "half" / "adapter", rec(), manifest=False)  # uploading: not committed
    legacy = {"base_model": "random_init:tiny", "base_config_sha256": "c" * 64, "step": 3, "training": {"name": "old"}}
    commit(root / "old" / "adapter", legacy)
    return root


def test_scan_lists_committed_artifacts_only(store):
    names = [e.name for e in scan(str(store))]
    assert names == ["chat/adapter", "cpt/final", "old/adapter", "qa/adapter"]
    with_steps = {e.name: e.kind for e in scan(store.as_uri(), steps=True)}
    assert with_steps["qa/adapters/step-00000020"] == "step_adapter" and len(with_steps) == 5
    assert scan(str(store / "nothing-here")) == []


def test_the_table_fits_80_columns_and_names_each_base_once(store):
    entries = scan(str(store))
    headers, rows, legend = table_rows(entries)
    text = table(headers, rows, width=80)
    assert max(len(line) for line in text.splitlines()) <= 80, text
    qa = next(r for r in rows if r[0] == "qa/adapter")
    assert qa[1:] == [base()["fingerprint"][:8], "8", "40", "123.5k", "2.000", "+0.25", "1.0KB"]
    old = next(r for r in rows if r[0] == "old/adapter")
    assert old[1] == "-" and "base -: random_init:tiny" in legend  # a record from before lineage
    assert len(legend) == 3  # two fingerprints and the unknown one


def test_read_one_says_what_is_there_instead(store):
    assert read_one(str(store / "qa" / "adapter")).record == rec()
    with pytest.raises(FtclusterError, match=r"no committed artifact here \(no manifest.json\); it holds 1: adapter"):
        read_one(str(store / "qa"))
    with pytest.raises(FtclusterError, match="a committed checkpoint, not an adapter or model; its adapter is .*"
                                             "qa/adapters/step-00000020"):
        read_one(str(store / "qa" / "checkpoints" / "step-00000020"))


def test_show_prints_lineage_of_a_trained_base(store):
    by = R.produced_by(rec("final", step=400, name="cpt-domain"), "w9")
    entry = read_one(str(commit(store / "x" / "adapter", rec(b=R.base_identity("s3://b/cpt/final", "c1", {
        "kind": "manifest", "sha256": "w9", "produced_by": by})))))
    text = "\n".join(show_lines(entry))
    assert "base:         s3://b/cpt/final (from run cpt-domain@400)" in text
    assert "made by     run cpt-domain (id u1), its final at step 400" in text
    assert "forgetting:   general-eval loss 3.000 -> 3.250 (+0.250)" in text


def test_fingerprint_covers_architecture_and_weights():
    assert base("w1")["fingerprint"] != base("w2")["fingerprint"]
    assert base("w1", "c1")["fingerprint"] != base("w1", "c2")["fingerprint"]
    assert base("w1", "c1", "local:a")["fingerprint"] == base("w1", "c1", "s3://b/a")["fingerprint"]  # not the place


def test_weights_identity_prefers_the_manifest_and_hashes_other_folders(tmp_path):
    plain = commit(tmp_path / "plain", None, {"model.safetensors": b"abc", "config.json": b"{}"}, manifest=False)
    first = R.weights_identity(plain, tmp_path / "cache")
    assert first["kind"] == "files" and R.weights_identity(plain, tmp_path / "cache") == first  # memoised, same
    (plain / "model.safetensors").write_bytes(b"abd")
    assert R.weights_identity(plain, tmp_path / "cache")["sha256"] != first["sha256"]  # size+mtime key, new hash
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "manifest.json").write_text(json.dumps({"files": {"model.safetensors": {"sha256": "s1", "size": 3},
                                                              "config.json": {"sha256": "s2", "size": 2}}}))
    (ours / "ftcluster_meta.json").write_text(json.dumps(rec("final", name="cpt")))
    got = R.weights_identity(ours)
    assert got["kind"] == "manifest" and got["produced_by"]["name"] == "cpt" and got["produced_by"]["kind"] == "final"
    with pytest.raises(FtclusterError, match="no weight files"):
        R.weights_identity(commit(tmp_path / "empty", None, {"config.json": b"{}"}, manifest=False))


def test_paths_of_this_machine_stay_out_of_the_record():
    assert R.path_label("/home/alice/models/llama") == "local:llama"
    assert R.path_label("file:///data/cpt/final/") == "local:final"
    assert R.path_label("s3://bucket/cpt/final") == "s3://bucket/cpt/final"
    assert R.public_uri("file:///tmp/out") is None and R.public_uri("gs://b/out") == "gs://b/out"
    masked = R.masked({"env": {"HF_TOKEN": "hf_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7"}, "name": "x"})
    assert masked == {"env": {"HF_TOKEN": "<masked>"}, "name": "x"}


def test_a_newer_record_format_is_refused():
    assert R.version_of(rec()) == 1 and R.version_of({"step": 1}) == 0
    with pytest.raises(FtclusterError, match="newer than this ftcluster understands"):
        R.version_of({"format": "ftcluster.artifact/2"})


def test_lineage_check_refuses_another_base_in_one_line(caplog):
    from ftcluster.train.lineage import check

    check(rec(), base(), force=False, what="s3://b/qa/adapter")  # its own base: fine
    with pytest.raises(R.LineageError) as err:
        check(rec(), base("w2", source="s3://b/other"), force=False, what="s3://b/qa/adapter")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("s3://b/qa/adapter: trained on base ")
    assert base()["fingerprint"][:12] in msg and base("w2")["fingerprint"][:12] in msg
    assert "(s3://b/other): their weights differ" in msg and "--force" in msg
    with pytest.raises(R.LineageError, match="their architecture differ"):
        check(rec(), base("w1", "c2"), force=False, what="a")
    with caplog.at_level(logging.WARNING, logger="ftcluster.train"):
        check(rec(), base("w2"), force=True, what="a")
        check({"base_model": "x", "step": 1}, base(), force=False, what="old")
    assert "--force: lineage check skipped" in caplog.text
    assert "old: its record predates lineage" in caplog.text
