"""The storage layer's retry policy (which errors fail at once, which are retried) and its folder layout."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fsspec.implementations.local import LocalFileSystem

from ftcluster.errors import StorageError
from ftcluster.storage import retry
from ftcluster.storage.commit import CheckpointStore
from ftcluster.storage.layout import OutputLayout, parse_step_dir
from tests.support.s3fixture import drop_aws_credentials

FAST = retry.RetryPolicy(0.01, 0.02)


def client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": "x"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "PutObject")


def wrapped(inner: BaseException) -> OSError:
    """As s3fs raises it: an OSError whose cause is the botocore error."""
    try:
        try:
            raise inner
        except Exception as exc:
            raise OSError(5, "translated") from exc
    except OSError as outer:
        return outer


# ----------------------------------------------------------------------------- classifier


def test_permanent_errors_are_classified_with_a_fix():
    botocore = pytest.importorskip("botocore.exceptions")
    cases = {
        "no valid credentials": [botocore.NoCredentialsError(), botocore.PartialCredentialsError(provider="env",
                                                                                                 cred_var="secret"),
                                 client_error("InvalidAccessKeyId", 403), client_error("SignatureDoesNotMatch", 403),
                                 wrapped(client_error("InvalidAccessKeyId", 403))],
        "access denied": [client_error("AccessDenied", 403), client_error("Whatever", 403), PermissionError("no")],
        "the bucket does not exist": [client_error("NoSuchBucket", 404), wrapped(client_error("NoSuchBucket", 404))],
        "not found": [FileNotFoundError("s3://b/x")],
        "malformed endpoint or URL": [ValueError("Invalid endpoint: htp:/x")],
    }
    for problem, errors in cases.items():
        for exc in errors:
            got = retry.classify(exc, "s3://bucket/run")
            assert got is not None and got.problem == problem, (exc, got)
    assert "AWS_ACCESS_KEY_ID" in retry.classify(botocore.NoCredentialsError(), "s3://b").fix
    assert "GOOGLE_APPLICATION_CREDENTIALS" in retry.classify(client_error("InvalidToken", 401), "gs://b").fix


def test_transient_errors_are_retried():
    botocore = pytest.importorskip("botocore.exceptions")
    for exc in [ConnectionRefusedError(), ConnectionResetError(), TimeoutError(), OSError("EIO"), RuntimeError("?"),
                client_error("SlowDown", 503), client_error("Throttling", 400), client_error("TooManyRequests", 429),
                client_error("InternalError", 500), wrapped(client_error("SlowDown", 503)),
                botocore.EndpointConnectionError(endpoint_url="http://x"),
                botocore.ReadTimeoutError(endpoint_url="http://x")]:
        assert retry.classify(exc, "s3://b") is None, exc


def test_call_retries_transient_errors_then_succeeds():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise ConnectionResetError("reset by peer")
        return "ok"

    assert retry.call(flaky, "s3://b/x", "upload", deadline=time.monotonic() + 30, policy=FAST) == "ok"
    assert len(calls) == 4


def test_call_fails_at_once_on_a_permanent_error_with_one_line():
    calls = []

    def denied():
        calls.append(1)
        raise PermissionError("Access Denied")

    t0 = time.monotonic()
    with pytest.raises(StorageError) as err:  # no deadline and a 30 s backoff: only fail-fast ends this quickly
        retry.call(denied, "s3://b/run/final/", "upload", deadline=None, policy=retry.RetryPolicy(30, 30))
    assert time.monotonic() - t0 < 1 and calls == [1]
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("s3://b/run/final/: upload failed: access denied (PermissionError")
    assert msg.endswith("give these credentials read/write access to the bucket and prefix")


def test_call_gives_up_at_the_deadline_naming_the_limit():
    def down():
        raise ConnectionRefusedError("refused")

    with pytest.raises(StorageError, match=r"^s3://b/x: reading failed for \d+ s \(limit 0.3 s\): "
                                           r"ConnectionRefusedError: refused; check the endpoint"):
        retry.call(down, "s3://b/x", "reading", deadline=time.monotonic() + 0.3, policy=FAST, limit_s=0.3)


def test_a_periodic_commit_with_a_permanent_error_fails_instead_of_retrying_forever(tmp_path):
    class ReadOnly(LocalFileSystem):
        cachable = False

        def put_file(self, *a, **k):
            raise PermissionError("read-only bucket")

    local = tmp_path / "snap"
    local.mkdir()
    (local / "state.json").write_text("{}")
    st = CheckpointStore(f"file://{tmp_path}/out", {}, fs=ReadOnly(), retry_base_s=30, retry_cap_s=30)
    fut = st.commit_async(1, local, {})  # periodic: transient errors would be retried without end
    exc = fut.exception(timeout=10)
    assert isinstance(exc, StorageError) and "access denied" in str(exc) and st.failures == 0


@pytest.mark.s3
def test_s3_without_credentials_fails_within_seconds_with_one_line(s3, tmp_path, monkeypatch):  # noqa: F811
    drop_aws_credentials(monkeypatch, tmp_path)
    st = CheckpointStore(s3.uri("runs/a"), s3.storage_options)  # the default 600 s deadline
    t0 = time.monotonic()
    with pytest.raises(StorageError) as err:
        st.restore_latest(tmp_path / "r")
    assert time.monotonic() - t0 < 10
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{s3.uri('runs/a')}/checkpoints/: reading the checkpoint store failed: "
                                              "no valid credentials")
    assert "AWS_ACCESS_KEY_ID" in msg
    local = tmp_path / "snap"
    local.mkdir()
    (local / "state.json").write_text("{}")
    t0 = time.monotonic()
    st.commit_async(1, local, {}, final=True)
    with pytest.raises(StorageError, match="upload failed: no valid credentials"):
        st.wait(timeout=60)
    assert time.monotonic() - t0 < 10


@pytest.mark.s3
@pytest.mark.parametrize("case, problem", [
    ("missing bucket", "the bucket does not exist"),
    ("malformed endpoint", "malformed endpoint or URL"),
    ("endpoint without a scheme", "malformed endpoint or URL"),
])
def test_s3_permanent_errors_fail_a_final_upload_within_seconds(s3, tmp_path, case, problem):  # noqa: F811
    uri, opts = s3.uri("runs/a"), s3.storage_options
    if case == "missing bucket":
        uri = "s3://ftcluster-no-such-bucket/runs/a"
    elif case == "malformed endpoint":
        opts = {"client_kwargs": {"endpoint_url": "htp:/not a url"}}
    else:
        opts = {"client_kwargs": {"endpoint_url": "localhost:9000"}}
    st = CheckpointStore(uri, opts, retry_max_s=600)  # a deadline that only fail-fast beats
    local = tmp_path / "snap"
    local.mkdir()
    (local / "state.json").write_text("{}")
    t0 = time.monotonic()
    st.commit_async(1, local, {}, final=True)
    with pytest.raises(StorageError) as err:
        st.wait(timeout=60)
    assert time.monotonic() - t0 < 10
    msg = str(err.value)
    assert "\n" not in msg and f"upload failed: {problem}" in msg, msg


def test_the_output_store_deadline_is_the_spec_option_only(monkeypatch):
    """output.final_upload_timeout (default 600 s) is validated; no environment variable changes it."""
    from ftcluster.errors import SpecError
    from ftcluster.spec.loader import load_spec_text

    base = "name: d\nmethod: lora\nmodel: {random_init: {preset: tiny}}\ndata: {train: x.jsonl, seq_len: 64}\n"
    assert load_spec_text(base + "output: {uri: /tmp/o}\n").output.final_upload_timeout == 600
    monkeypatch.setenv("FTCLUSTER_FINAL_UPLOAD_TIMEOUT", "5")
    assert load_spec_text(base + "output: {uri: /tmp/o, final_upload_timeout: 90}\n").output.final_upload_timeout == 90
    with pytest.raises(SpecError, match="output.final_upload_timeout: Input should be greater than 0"):
        load_spec_text(base + "output: {uri: /tmp/o, final_upload_timeout: 0}\n")
    src = (Path(__file__).resolve().parents[3] / "ftcluster" / "train" / "checkpoint.py").read_text()
    assert "retry_max_s=out.final_upload_timeout" in src  # the runtime's output store takes it


# ----------------------------------------------------------------------------- layout


def test_output_layout_names_every_folder():
    out = OutputLayout("s3://bucket/runs/a/")
    assert out.root == "s3://bucket/runs/a"
    assert out.checkpoints == "s3://bucket/runs/a/checkpoints"
    assert out.checkpoint(40) == "s3://bucket/runs/a/checkpoints/step-00000040"
    assert out.checkpoint(123456789) == "s3://bucket/runs/a/checkpoints/step-123456789"
    assert out.step_adapter(40) == "s3://bucket/runs/a/adapters/step-00000040"
    assert [out.artifact(a) for a in ("final", "merged", "adapter")] == [
        "s3://bucket/runs/a/final", "s3://bucket/runs/a/merged", "s3://bucket/runs/a/adapter"]
    assert out.metrics == "s3://bucket/runs/a/metrics.jsonl"
    assert out.metrics_from(30) == "s3://bucket/runs/a/metrics-from-step-00000030.jsonl"
    assert out.variant("lr-1e-4").artifact("final") == "s3://bucket/runs/a/lr-1e-4/final"
    with pytest.raises(ValueError, match="unknown artifact 'weights'"):
        out.artifact("weights")  # type: ignore[arg-type]
    assert parse_step_dir("step-00000040") == 40 and parse_step_dir("step-40") is None


def test_the_store_writes_where_the_layout_says(tmp_path: Path):
    local = tmp_path / "snap"
    local.mkdir()
    (local / "a.bin").write_bytes(b"x")
    st = CheckpointStore(f"file://{tmp_path}/out", {})
    st.commit_async(3, local, {}).result(timeout=30)
    paths = OutputLayout(str(tmp_path / "out"))
    assert Path(paths.checkpoint(3), "a.bin").read_bytes() == b"x"
    assert st.is_published("final") is False
