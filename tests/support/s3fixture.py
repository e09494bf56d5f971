"""A real S3 endpoint for tests: moto's server on loopback, behind a TCP proxy tests can take down.

``moto.server`` runs once per session as a subprocess (as .ci/s3-up.sh starts it). Each test
gets its own bucket and its own :class:`TcpProxy` in front of the server; ``s3.stop()`` closes
the proxy's listener and drops every open connection (clients see "connection refused", as with
an endpoint that is down) and ``s3.start()`` listens again on the same port. moto keeps its
data meanwhile, so an outage loses nothing, like a real store. Credentials come from the
environment (``AWS_ACCESS_KEY_ID=testing`` ...), never from storage_options.

Use it by importing the fixtures into a test module: ``from s3fixture import moto_server, s3``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest

ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-west-2",  # us-east-1 makes s3fs send a LocationConstraint moto rejects
    "AWS_EC2_METADATA_DISABLED": "true",
    # botocore's own retries (5 attempts, ~6 s against a refused port) would only slow the outage
    # tests down; the code under test retries by itself.
    "AWS_MAX_ATTEMPTS": "1",
}
UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
         "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TcpProxy:
    """Forwards 127.0.0.1:port to a target port; stop() makes the port refuse connections."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = 0
        self.bytes_to_client = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._socks: set[socket.socket] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(128)
        self.port = ls.getsockname()[1]
        self._listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def stop(self) -> None:
        ls, self._listener = self._listener, None
        if ls is not None:
            ls.close()
        with self._lock:
            socks, self._socks = self._socks, set()
        for s in socks:
            _close(s)

    @property
    def running(self) -> bool:
        return self._listener is not None

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return  # listener closed
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                _close(client)
                continue
            with self._lock:
                if self._listener is not ls:  # stopped meanwhile
                    _close(client)
                    _close(upstream)
                    return
                self._socks.update((client, upstream))
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, to_client: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
                if to_client:
                    with self._lock:
                        self.bytes_to_client += len(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)
            with self._lock:
                self._socks.discard(src)
                self._socks.discard(dst)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


@dataclass
class S3Env:
    """One test's S3: a bucket on the moto server, reached through ``proxy``."""

    bucket: str
    proxy: TcpProxy
    direct_url: str
    env: dict[str, str] = field(default_factory=lambda: dict(ENV))

    @property
    def endpoint_url(self) -> str:
        return self.proxy.url

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"client_kwargs": {"endpoint_url": self.endpoint_url}}

    def uri(self, path: str = "") -> str:
        return f"s3://{self.bucket}/{path}".rstrip("/")

    def stop(self) -> None:
        """Take the endpoint down: new connections are refused, open ones are dropped."""
        self.proxy.stop()

    def start(self) -> None:
        """Bring the endpoint back on the same port."""
        self.proxy.start()

    def client(self):
        """A boto3 client that talks to moto directly (not through the proxy), for checks."""
        import boto3

        return boto3.client("s3", endpoint_url=self.direct_url, region_name=ENV["AWS_DEFAULT_REGION"],
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def keys(self, prefix: str = "") -> list[str]:
        out, token = [], None
        c = self.client()
        while True:
            kw = {"Bucket": self.bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = c.list_objects_v2(**kw)
            out += [o["Key"] for o in page.get("Contents", [])]
            token = page.get("NextContinuationToken")
            if not token:
                return sorted(out)


def _wait_up(url: str, proc: subprocess.Popen, log: str) -> None:
    end = time.monotonic() + 30
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}: {open(log).read()[-2000:]}")
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto server did not answer on {url} within 30 s")


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    """The URL of a moto S3 server on loopback (one per test session)."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    port = free_port()
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **ENV})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_up(url, proc, str(log))
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def s3(moto_server, monkeypatch):
    """A fresh bucket behind a fresh proxy, with the AWS environment set for this test."""
    import s3fs

    for k in UNSET:
        monkeypatch.delenv(k, raising=False)
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    proxy = TcpProxy(int(moto_server.rsplit(":", 1)[1]))
    proxy.start()
    env = S3Env(bucket=f"ftc-{uuid.uuid4().hex[:12]}", proxy=proxy, direct_url=moto_server)
    env.client().create_bucket(Bucket=env.bucket,
                               CreateBucketConfiguration={"LocationConstraint": ENV["AWS_DEFAULT_REGION"]})
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield env
    finally:
        proxy.stop()
        s3fs.S3FileSystem.clear_instance_cache()


def drop_aws_credentials(monkeypatch, tmp_path) -> None:
    """No credentials anywhere botocore looks: the environment, and credential/config files that do not exist."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
