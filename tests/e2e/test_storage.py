"""Checkpoint store, artifact publishing, metrics upload and fetch_dir: on local disk and a real S3 (moto).

Slow or failing filesystems are fsspec filesystems injected into the store (``fs=``): a gate
(threading.Event) holds uploads, so nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fsspec.implementations.local import LocalFileSystem

from ftcluster.errors import StorageError
from ftcluster.storage.commit import CheckpointStore
from ftcluster.storage.fetch import fetch_dir
from ftcluster.storage.layout import MANIFEST
from ftcluster.storage.metrics import MetricsWriter
from ftcluster.storage.uri import fs_and_path
from tests.support.s3fixture import drop_aws_credentials


def snapshot(root: Path, step: int, size: int = 1000) -> Path:
    """A checkpoint-like folder with nested files whose bytes depend on the step."""
    d = root / f"local-{step}"
    (d / "engine" / "ds").mkdir(parents=True)
    (d / "state.json").write_text(json.dumps({"step": step}))
    (d / "rank-00000.pt").write_bytes(bytes([step % 256]) * size)
    (d / "engine" / "ds" / "shard.bin").write_bytes(os.urandom(size))
    return d


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class RecordingFS(LocalFileSystem):
    """A local filesystem that records writes, and can hold (gate) or fail uploads."""

    cachable = False  # fsspec would hand every test the same instance (and its events) otherwise

    def __init__(self, *args, fail_first: int = 0, always_fail: bool = False, gated: bool = False, **kw):
        super().__init__(*args, **kw)
        self.ops: list[tuple[str, str]] = []
        self.fail_left = fail_first
        self.always_fail = always_fail
        self.gate = threading.Event()
        self.entered = threading.Event()
        if not gated:
            self.gate.set()
        self._mu = threading.Lock()

    def put_file(self, lpath, rpath, **kw):
        self.entered.set()
        assert self.gate.wait(60), "test gate never opened"
        with self._mu:
            if self.always_fail or self.fail_left > 0:
                self.fail_left -= 1
                raise ConnectionError(f"injected failure writing {rpath}")
            self.ops.append(("put", str(rpath)))
        return super().put_file(lpath, rpath, **kw)

    def mv(self, path1, path2, **kw):
        with self._mu:
            self.ops.append(("mv", str(path2)))
        return super().mv(path1, path2, **kw)


def store(tmp_path: Path, fs=None, **kw) -> CheckpointStore:
    kw.setdefault("keep_last", 5)
    kw.setdefault("retry_base_s", 0.01)
    kw.setdefault("retry_cap_s", 0.05)
    return CheckpointStore(f"file://{tmp_path}/out", {}, fs=fs, **kw)


# ----------------------------------------------------------------------------- paths


def test_fs_and_path_for_plain_file_memory_and_unknown(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = fs_and_path("file://./out/run")
    assert isinstance(fs, LocalFileSystem) and path == f"{tmp_path}/out/run"
    assert fs_and_path("out/run/")[1] == f"{tmp_path}/out/run"
    assert fs_and_path(f"file://{tmp_path}/x")[1] == f"{tmp_path}/x"
    fs, path = fs_and_path("memory://bucket/p/")
    assert "memory" in fs.protocol and path == "/bucket/p"
    with pytest.raises(StorageError, match="nosuchproto://x"):
        fs_and_path("nosuchproto://x/y")


def test_storage_and_data_import_no_torch():
    code = ("import sys, ftcluster.storage.commit, ftcluster.storage.fetch, ftcluster.storage.metrics, "
            "ftcluster.train.data; "
            "bad = [m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- commit protocol


def test_commit_uploads_every_file_then_the_manifest_last(tmp_path):
    fs = RecordingFS()
    st = store(tmp_path, fs)
    local = snapshot(tmp_path, 7)
    expected = files_of(local)
    result = st.commit_async(7, local, {"step": 7, "loss": 1.5}).result(timeout=60)
    st.wait()
    folder = tmp_path / "out" / "checkpoints" / "step-00000007"
    assert result["step"] == 7 and result["uri"] == f"file://{tmp_path}/out/checkpoints/step-00000007/"
    assert [op for op, _ in fs.ops] == ["put"] * len(expected) + ["mv"]  # manifest last, by rename
    assert fs.ops[-1][1] == f"{folder}/{MANIFEST}"
    man = json.loads((folder / MANIFEST).read_text())
    assert man["step"] == 7 and man["meta"] == {"step": 7, "loss": 1.5} and man["ftcluster_version"]
    assert set(man["files"]) == set(expected)
    import hashlib

    for rel, data in expected.items():
        assert (folder / rel).read_bytes() == data
        assert man["files"][rel] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert not local.exists()  # the local snapshot is deleted once committed
    assert st.committed() == [7]
    assert st.restore_latest(tmp_path / "restore") == (7, {"step": 7, "loss": 1.5})
    assert files_of(tmp_path / "restore") == expected


def test_incomplete_or_corrupt_checkpoints_are_ignored_and_restore_falls_back(tmp_path, caplog):
    st = store(tmp_path)
    content = {}
    for step in (10, 20, 30, 40):
        local = snapshot(tmp_path, step)
        content[step] = files_of(local)
        st.commit_async(step, local, {"step": step})
    st.wait()
    ck = tmp_path / "out" / "checkpoints"
    assert st.committed() == [10, 20, 30, 40]
    (ck / "step-00000040" / MANIFEST).unlink()  # upload died before the manifest
    (ck / "step-00000030" / "engine" / "ds" / "shard.bin").write_bytes(b"short")  # wrong size
    flipped = bytearray((ck / "step-00000020" / "rank-00000.pt").read_bytes())
    flipped[0] ^= 0xFF  # same size, wrong sha256: found only by the verified download
    (ck / "step-00000020" / "rank-00000.pt").write_bytes(bytes(flipped))
    (ck / "step-00000050").mkdir()
    (ck / "step-00000050" / MANIFEST).write_text("{not json")
    assert st.committed() == [10, 20]
    with caplog.at_level(logging.WARNING, logger="ftcluster.train"):
        assert st.restore_latest(tmp_path / "restore") == (10, {"step": 10})
    assert files_of(tmp_path / "restore") == content[10]
    assert "step-00000020" in caplog.text and "sha256" in caplog.text


def test_nothing_committed_restores_none(tmp_path):
    st = store(tmp_path)
    assert st.committed() == [] and st.restore_latest(tmp_path / "r") is None
    (tmp_path / "out" / "checkpoints" / "step-00000005").mkdir(parents=True)
    (tmp_path / "out" / "checkpoints" / "step-00000005" / "state.json").write_text("{}")
    assert st.restore_latest(tmp_path / "r") is None


def test_keep_last_prunes_only_committed_older_checkpoints(tmp_path):
    st = store(tmp_path, keep_last=2)
    ck = tmp_path / "out" / "checkpoints"
    in_progress = ck / "step-00000099"  # e.g. another node's part of a newer checkpoint
    in_progress.mkdir(parents=True)
    (in_progress / "part.bin").write_bytes(b"x")
    for step in (10, 20, 30):
        st.commit_async(step, snapshot(tmp_path, step), {})
        st.wait()
    assert st.committed() == [20, 30]
    assert sorted(p.name for p in ck.iterdir()) == ["step-00000020", "step-00000030", "step-00000099"]
    # A leftover older than the newest commit can never commit: it goes; newer ones stay.
    (ck / "step-00000025").mkdir()
    (ck / "step-00000025" / "state.json").write_text("{}")
    st.commit_async(40, snapshot(tmp_path, 40), {})
    st.wait()
    assert sorted(p.name for p in ck.iterdir()) == ["step-00000030", "step-00000040", "step-00000099"]


def test_saving_a_step_again_replaces_it(tmp_path):
    st = store(tmp_path)
    st.commit_async(5, snapshot(tmp_path, 5), {"try": 1})
    st.wait()
    second = snapshot(tmp_path, 5, size=10)
    (second / "engine" / "ds" / "shard.bin").unlink()
    expected = files_of(second)
    st.commit_async(5, second, {"try": 2})
    st.wait()
    assert st.restore_latest(tmp_path / "r") == (5, {"try": 2})
    assert files_of(tmp_path / "r") == expected
    assert not (tmp_path / "out" / "checkpoints" / "step-00000005" / "engine" / "ds" / "shard.bin").exists()


# ----------------------------------------------------------------------------- background and order


def test_commit_async_returns_while_the_upload_is_held_and_commits_in_order(tmp_path):
    fs = RecordingFS(gated=True)
    st = store(tmp_path, fs)
    f1 = st.commit_async(1, snapshot(tmp_path, 1), {"step": 1})
    assert fs.entered.wait(30)  # the upload has started in the background ...
    f2 = st.commit_async(2, snapshot(tmp_path, 2), {"step": 2})  # ... and the caller goes on
    assert not f1.done() and not f2.done()
    assert st.committed() == []  # nothing is committed while files are missing
    fs.gate.set()
    assert f1.result(timeout=60)["step"] == 1 and f2.result(timeout=60)["step"] == 2
    st.wait()
    assert st.committed() == [1, 2]
    manifest_1 = fs.ops.index(("mv", f"{tmp_path}/out/checkpoints/step-00000001/{MANIFEST}"))
    first_put_2 = next(i for i, (op, p) in enumerate(fs.ops) if "step-00000002" in p)
    assert manifest_1 < first_put_2  # step 2 starts uploading only after step 1 committed


def test_a_final_commit_supersedes_queued_periodic_ones(tmp_path):
    fs = RecordingFS(gated=True)
    st = store(tmp_path, fs)
    f1 = st.commit_async(1, snapshot(tmp_path, 1), {})
    assert fs.entered.wait(30)
    local2 = snapshot(tmp_path, 2)
    f2 = st.commit_async(2, local2, {})
    f3 = st.commit_async(3, snapshot(tmp_path, 3), {}, final=True)
    assert f2.cancelled()
    fs.gate.set()
    st.wait()
    assert f1.result()["step"] == 1 and f3.result()["step"] == 3
    assert st.committed() == [1, 3] and not local2.exists()


def test_periodic_commit_retries_failed_uploads_until_they_succeed(tmp_path):
    fs = RecordingFS(fail_first=5)
    st = store(tmp_path, fs)
    local = snapshot(tmp_path, 3)
    expected = files_of(local)
    assert st.commit_async(3, local, {}).result(timeout=60)["step"] == 3
    assert st.failures >= 2  # retried in rounds (several files per round)
    st.restore_latest(tmp_path / "r")
    assert files_of(tmp_path / "r") == expected


def test_final_commit_failing_past_its_deadline_raises_one_line_from_wait(tmp_path):
    st = store(tmp_path, RecordingFS(always_fail=True), retry_max_s=0.5)
    st.commit_async(9, snapshot(tmp_path, 9), {}, final=True)
    with pytest.raises(StorageError) as err:
        st.wait(timeout=60)
    msg = str(err.value)
    assert "\n" not in msg and f"file://{tmp_path}/out/checkpoints/step-00000009/" in msg
    assert "ConnectionError: injected failure" in msg and "(limit 0.5 s)" in msg
    assert st.committed() == []
    st.wait()  # the error is reported once


def test_periodic_failure_before_a_final_commit_does_not_raise(tmp_path):
    fs = RecordingFS(always_fail=True)
    st = store(tmp_path, fs, retry_max_s=0.3)
    periodic = st.commit_async(1, snapshot(tmp_path, 1), {})
    while st.failures == 0:  # it is retrying without end ...
        time.sleep(0.01)
    assert not periodic.done()
    final = st.commit_async(2, snapshot(tmp_path, 2), {}, final=True)  # ... until the run ends
    with pytest.raises(StorageError, match="step-00000002"):
        st.wait(timeout=60)
    assert isinstance(periodic.exception(), StorageError) and isinstance(final.exception(), StorageError)


def test_unreadable_store_raises_instead_of_starting_fresh(tmp_path):
    class Down(LocalFileSystem):
        cachable = False

        def find(self, *a, **k):
            raise ConnectionError("endpoint down")

    st = store(tmp_path, Down(), retry_max_s=0.2)
    with pytest.raises(StorageError, match=r"reading the checkpoint store failed for \d+ s \(limit 0.2 s\): ConnectionError: endpoint down"):
        st.restore_latest(tmp_path / "r")


def test_reserved_manifest_name_and_missing_folder_are_refused(tmp_path):
    st = store(tmp_path)
    with pytest.raises(StorageError, match="not a folder"):
        st.commit_async(1, tmp_path / "nope", {})
    local = snapshot(tmp_path, 1)
    (local / MANIFEST).write_text("{}")
    with pytest.raises(StorageError, match="reserved"):
        st.commit_async(1, local, {})


def test_multi_node_parts_commit_once_every_part_is_stored(tmp_path):
    st = store(tmp_path)
    node0, node1 = tmp_path / "n0", tmp_path / "n1"
    for k, d in enumerate((node0, node1)):
        (d / "engine").mkdir(parents=True)
        (d / f"rank-{k:05d}.pt").write_bytes(bytes([k]) * 100)
        (d / "engine" / f"shard-{k}.bin").write_bytes(bytes([k]) * 300)
    (node0 / "state.json").write_text("{}")
    expected = {**files_of(node0), **files_of(node1)}
    parts = [st.upload_part_async(4, d).result(timeout=60)["manifest_files"] for d in (node0, node1)]
    assert st.committed() == []  # uploaded, not committed
    st.commit_parts_async(4, parts, {"nodes": 2}).result(timeout=60)
    assert st.committed() == [4]
    assert st.restore_latest(tmp_path / "r") == (4, {"nodes": 2}) and files_of(tmp_path / "r") == expected
    # Node 1's part of step 8 never arrived: the final commit fails and nothing is committed.
    (node0 / "engine").mkdir(parents=True)
    (node0 / "state.json").write_text("{}")
    part0 = st.upload_part_async(8, node0).result(timeout=60)["manifest_files"]
    st.commit_parts_async(8, [part0, parts[1]], {}, final=True)
    with pytest.raises(StorageError, match="missing or of the wrong size"):
        st.wait(timeout=60)
    assert st.committed() == [4]
    with pytest.raises(StorageError, match="two nodes uploaded different files"):
        st.commit_parts_async(9, [{"a": {"size": 1}}, {"a": {"size": 2}}], {})


# ----------------------------------------------------------------------------- artifacts and metrics


def test_publish_replaces_an_artifact_and_becomes_final_after_a_final_commit(tmp_path):
    st = store(tmp_path)
    a = tmp_path / "a1"
    a.mkdir()
    (a / "adapter_model.safetensors").write_bytes(b"w1")
    (a / "old_only.json").write_text("{}")
    st.publish("adapter", a, {"step": 10}).result(timeout=60)
    b = tmp_path / "a2"
    b.mkdir()
    (b / "adapter_model.safetensors").write_bytes(b"w2-longer")
    st.publish("adapter", b, {"step": 20}).result(timeout=60)
    out = tmp_path / "out" / "adapter"
    assert sorted(p.name for p in out.iterdir()) == ["adapter_model.safetensors", MANIFEST]
    assert json.loads((out / MANIFEST).read_text())["meta"] == {"step": 20}
    assert (out / "adapter_model.safetensors").read_bytes() == b"w2-longer"
    assert not a.exists() and not b.exists()

    failing = store(tmp_path, RecordingFS(always_fail=True), retry_max_s=0.2)
    c = tmp_path / "a3"
    c.mkdir()
    (c / "x").write_text("x")
    failing.publish("adapters/step-00000001", c, {}, delete_local=False)  # periodic: never raises
    failing.commit_async(2, snapshot(tmp_path, 2), {}, final=True)
    with pytest.raises(StorageError, match="step-00000002"):
        failing.wait(timeout=60)
    failing.publish("final", c, {})  # after a final commit: final too
    with pytest.raises(StorageError, match=r"/out/final/"):
        failing.wait(timeout=60)


def test_metrics_writer_uploads_and_resumes_without_duplicates(tmp_path):
    uri = f"file://{tmp_path}/out"
    w = MetricsWriter(uri, {}, tmp_path / "work1")
    with open(w.local_path, "a") as fh:
        for step in range(1, 51):
            fh.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")
    w.upload().result(timeout=30)
    remote = tmp_path / "out" / "metrics.jsonl"
    assert len(remote.read_text().splitlines()) == 50
    # The job was preempted after step 50 but resumes from the checkpoint of step 30.
    w2 = MetricsWriter(uri, {}, tmp_path / "work2", resume_step=30)
    assert [json.loads(x)["step"] for x in w2.local_path.read_text().splitlines()] == list(range(1, 31))
    with open(w2.local_path, "a") as fh:
        fh.write(json.dumps({"step": 31}) + "\n")
    w2.close()
    assert [json.loads(x)["step"] for x in remote.read_text().splitlines()] == list(range(1, 32))
    # A fresh run (no checkpoint) starts a new file.
    w3 = MetricsWriter(uri, {}, tmp_path / "work3")
    assert w3.local_path.read_text() == ""


def test_fetch_dir_returns_local_folders_as_they_are(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    assert fetch_dir("model", {}, tmp_path / "cache") == tmp_path / "model"
    assert fetch_dir("file://./model", {}, tmp_path / "cache") == tmp_path / "model"
    assert not (tmp_path / "cache").exists()
    with pytest.raises(StorageError, match="nothere: no such file or folder"):
        fetch_dir("nothere", {}, tmp_path / "cache")


# ----------------------------------------------------------------------------- S3 (moto server)


def wait_for(pred, what: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def s3_store(s3, **kw) -> CheckpointStore:  # noqa: F811
    kw.setdefault("keep_last", 2)
    kw.setdefault("retry_base_s", 0.2)
    kw.setdefault("retry_cap_s", 1.0)
    assert set(s3.storage_options) == {"client_kwargs"}  # endpoint only; credentials from the environment
    return CheckpointStore(s3.uri("runs/a"), s3.storage_options, **kw)


@pytest.mark.s3
def test_s3_commit_prune_restore_and_publish(s3, tmp_path):  # noqa: F811
    st = s3_store(s3)
    content = {}
    for step in (100, 200, 300):
        local = snapshot(tmp_path, step, size=300_000)
        content[step] = files_of(local)
        st.commit_async(step, local, {"step": step})
    st.wait()
    assert st.committed() == [200, 300]
    assert not s3.keys("runs/a/checkpoints/step-00000100")
    assert f"runs/a/checkpoints/step-00000300/{MANIFEST}" in s3.keys()
    assert st.restore_latest(tmp_path / "r") == (300, {"step": 300})
    assert files_of(tmp_path / "r") == content[300]
    # Break the newest on the server itself: restore falls back to the older one.
    s3.client().put_object(Bucket=s3.bucket, Key="runs/a/checkpoints/step-00000300/rank-00000.pt",
                           Body=b"\0" * 1000)
    assert st.restore_latest(tmp_path / "r") == (200, {"step": 200})
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    st.publish("adapter", adapter, {"step": 300}).result(timeout=60)
    assert s3.keys("runs/a/adapter") == ["runs/a/adapter/adapter_config.json", f"runs/a/adapter/{MANIFEST}"]


@pytest.mark.s3
def test_s3_outage_periodic_commit_retries_and_commits_after_recovery(s3, tmp_path):  # noqa: F811
    st = s3_store(s3)
    st.commit_async(1, snapshot(tmp_path, 1), {}).result(timeout=60)
    local = snapshot(tmp_path, 2, size=200_000)
    expected = files_of(local)
    s3.stop()
    fut = st.commit_async(2, local, {"step": 2})
    wait_for(lambda: st.failures >= 2, "failed upload attempts during the outage")
    assert not fut.done()
    assert not s3.keys(f"runs/a/checkpoints/step-00000002/{MANIFEST}")
    s3.start()
    assert fut.result(timeout=120)["step"] == 2
    st.wait()
    assert st.committed() == [1, 2]
    assert st.restore_latest(tmp_path / "r") == (2, {"step": 2})
    assert files_of(tmp_path / "r") == expected


@pytest.mark.s3
def test_s3_final_commit_with_the_store_down_past_its_deadline_raises(s3, tmp_path):  # noqa: F811
    st = s3_store(s3, retry_max_s=2.0)
    s3.stop()
    st.commit_async(5, snapshot(tmp_path, 5), {}, final=True)
    with pytest.raises(StorageError) as err:
        st.wait(timeout=120)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{s3.uri('runs/a')}/checkpoints/step-00000005/: upload failed")
    s3.start()
    assert st.committed() == []


@pytest.mark.s3
def test_s3_restore_with_the_store_down_raises_after_retrying(s3, tmp_path):  # noqa: F811
    st = s3_store(s3, retry_max_s=1.0)
    s3.stop()
    with pytest.raises(StorageError, match=r"s3://.*/runs/a/checkpoints/: reading the checkpoint store failed"):
        st.restore_latest(tmp_path / "r")


@pytest.mark.s3
def test_s3_without_credentials_in_the_environment_fails_with_a_hint(s3, tmp_path, monkeypatch):  # noqa: F811
    drop_aws_credentials(monkeypatch, tmp_path)
    st = s3_store(s3, retry_max_s=0.5)
    with pytest.raises(StorageError, match="credentials"):
        st.restore_latest(tmp_path / "r")


@pytest.mark.s3
def test_s3_metrics_writer_resume(s3, tmp_path):  # noqa: F811
    w = MetricsWriter(s3.uri("runs/m"), s3.storage_options, tmp_path / "w1")
    w.local_path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 11)))
    w.close()
    w2 = MetricsWriter(s3.uri("runs/m"), s3.storage_options, tmp_path / "w2", resume_step=4)
    assert len(w2.local_path.read_text().splitlines()) == 4
    s3.stop()
    w3 = MetricsWriter(s3.uri("runs/m"), s3.storage_options, tmp_path / "w3", resume_step=4)
    assert w3.display.endswith("/metrics-from-step-00000004.jsonl")  # never clobbers the stored history
    w3.upload().result(timeout=60)  # best effort: logged, not raised
    s3.start()


FETCH = """
import sys, threading
from pathlib import Path
from ftcluster.storage.fetch import fetch_dir
uri, cache, opts = sys.argv[1], Path(sys.argv[2]), {"client_kwargs": {"endpoint_url": sys.argv[3]}}
out = []
ts = [threading.Thread(target=lambda: out.append(fetch_dir(uri, opts, cache))) for _ in range(4)]
[t.start() for t in ts]
[t.join() for t in ts]
assert len(out) == 4 and len(set(out)) == 1, out
print(out[0])
"""


@pytest.mark.s3
def test_s3_fetch_dir_downloads_once_for_many_processes_and_threads(s3, tmp_path):  # noqa: F811
    src = tmp_path / "model"
    src.mkdir()
    payload = {"config.json": b"{}", "model.safetensors": os.urandom(400_000), "tok/tokenizer.json": os.urandom(200_000)}
    for rel, data in payload.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    st = s3_store(s3)
    st.publish("final", src, {"step": 1}, delete_local=False).result(timeout=60)  # with a manifest to verify
    cache = tmp_path / "cache"
    before = s3.proxy.bytes_to_client
    procs = [subprocess.Popen([sys.executable, "-c", FETCH, s3.uri("runs/a/final"), str(cache), s3.endpoint_url],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    paths = {o[0].strip() for o in outs}
    assert len(paths) == 1
    got = Path(paths.pop())
    assert files_of(got) == {**payload, MANIFEST: files_of(got)[MANIFEST]}
    total = sum(len(d) for d in payload.values())
    moved = s3.proxy.bytes_to_client - before
    assert total <= moved < 1.5 * total, f"{moved} bytes moved for {total} bytes of files: downloaded more than once"
    # A new version at the same URI is fetched again into a new folder; the old copy stays intact.
    (src / "model.safetensors").write_bytes(os.urandom(1000))
    st.publish("final", src, {"step": 2}, delete_local=False).result(timeout=60)
    newer = fetch_dir(s3.uri("runs/a/final"), s3.storage_options, cache)
    assert newer != got and (newer / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()


@pytest.mark.s3
@pytest.mark.train
def test_s3_training_data_and_tokenizer_folder(s3, tmp_path):  # noqa: F811
    pytest.importorskip("transformers")
    from ftcluster.spec.loader import load_spec
    from ftcluster.train.data import load_records
    from ftcluster.train.tokenizer import load_or_train_tokenizer

    root = Path(__file__).resolve().parents[2]
    lines = (root / "examples" / "data" / "instruct.jsonl").read_text().splitlines()
    c = s3.client()
    c.put_object(Bucket=s3.bucket, Key="data/part-0.jsonl", Body="\n".join(lines[:100]) + "\n")
    c.put_object(Bucket=s3.bucket, Key="data/part-1.jsonl", Body="\n".join(lines[100:150]) + "\n")
    c.put_object(Bucket=s3.bucket, Key="data/notes.txt", Body="not data")
    expected = [json.loads(x) for x in lines[:150]]
    assert load_records(s3.uri("data/"), "auto", s3.storage_options) == expected
    assert load_records(s3.uri("data/part-*.jsonl"), "auto", s3.storage_options) == expected

    spec = load_spec(root / "examples" / "quickstart.yaml", overrides=[f"data.train={root}/examples/data/instruct.jsonl"])
    trained = load_or_train_tokenizer(spec, tmp_path / "cache" / "tokenizers")
    folder = tmp_path / "tok"
    trained.save_pretrained(str(folder))
    CheckpointStore(s3.uri("tok"), s3.storage_options).publish("v1", folder, {}).result(timeout=60)
    remote = spec.model_copy(update={
        "tokenizer": spec.tokenizer.model_copy(update={"path": s3.uri("tok/v1"), "train_vocab_size": None}),
        "model": spec.model.model_copy(update={"storage_options": s3.storage_options})})
    tok = load_or_train_tokenizer(remote, tmp_path / "cache" / "tokenizers")
    assert tok.get_vocab() == trained.get_vocab() and tok.chat_template == trained.chat_template
    assert (tmp_path / "cache" / "models").is_dir()  # fetched once per node into the shared cache
