"""The suite's shared fixtures and options, a pytest plugin (tests/conftest.py registers it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="Rewrite tests/golden/ from the current renderers instead of comparing.")


@pytest.fixture
def update_golden(request) -> bool:
    return request.config.getoption("--update-golden")


@pytest.fixture
def ftc_home(tmp_path, monkeypatch) -> Path:
    """An isolated FTCLUSTER_HOME so run folders do not leak between tests."""
    home = tmp_path / "ftc-home"
    monkeypatch.setenv("FTCLUSTER_HOME", str(home))
    return home


@pytest.fixture(autouse=True)
def own_tmpdir(request, tmp_path_factory, monkeypatch) -> None:
    """Each test's subprocesses get a TMPDIR of their own, inside pytest's temp folder (pytest keeps
    the last three sessions' and removes older ones): what a process leaves there when the test
    kills it (a SIGKILLed launcher's ``ftcluster-exit-*``, torchrun's folders) goes with it, not into
    /tmp. This process keeps its own temp folder (``tempfile`` read TMPDIR once already). Not for tests
    on the live services: their processes run on other machines, or need short socket paths."""
    if {"live_slurm", "live_k8s", "sshd"} & set(request.fixturenames):
        return
    monkeypatch.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmpdir")))


@pytest.fixture(autouse=True)
def one_run_per_test(request, monkeypatch) -> None:
    """What a test starts by hand (torchrun with no backend) is one run: ``FTCLUSTER_RUN_ID`` names it, so a
    rerun after a crash the test caused takes that run's own output lease back at once, as a requeued job
    does (ftcluster/storage/lease.py). The local and Slurm backends set their own run's id; a test of two
    runs on one output sets an id per run."""
    import hashlib

    monkeypatch.setenv("FTCLUSTER_RUN_ID", "test-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:10])


@pytest.fixture
def live_slurm() -> None:
    """Tests that need the live Slurm (.ci/test.sh starts it): skip without it, fail under STRICT=1."""
    if not os.environ.get("SLURM_CONF"):
        if os.environ.get("STRICT") == "1":
            pytest.fail("STRICT=1 but SLURM_CONF is unset (.ci/test.sh starts Slurm)")
        pytest.skip("SLURM_CONF unset: start the test cluster with .ci/slurm-up.sh")


@pytest.fixture
def live_k8s() -> str:
    """The kubeconfig of the test API server (.ci/k8s-up.sh; .ci/test.sh exports FTCLUSTER_TEST_KUBECONFIG):
    skip without it, fail under STRICT=1. A variable of its own, never KUBECONFIG, so the tests cannot
    create objects in whatever cluster a developer's shell points at."""
    path = os.environ.get("FTCLUSTER_TEST_KUBECONFIG")
    if not path or not Path(path).is_file():
        if os.environ.get("STRICT") == "1":
            pytest.fail("STRICT=1 but FTCLUSTER_TEST_KUBECONFIG is unset or missing (.ci/test.sh starts the API server)")
        pytest.skip("FTCLUSTER_TEST_KUBECONFIG unset: start the test API server with .ci/k8s-up.sh")
    return path


@pytest.fixture
def repo_root() -> Path:
    return ROOT


def pytest_configure(config):
    os.environ.setdefault("FTCLUSTER_CANCEL_GRACE_S", "30")


def need_tool(path: str | None, name: str, install: str) -> str:
    """An optional tool the test needs: skip with the install hint when it is missing, fail under
    STRICT=1 (CI installs every tool)."""
    if path:
        return path
    if os.environ.get("STRICT") == "1":
        pytest.fail(f"STRICT=1 but {name} is missing: {install}")
    pytest.skip(f"{name} not found: {install}")


SERVICE_MARKS = {"live_slurm": "slurm", "live_k8s": "k8s", "moto_server": "s3", "s3": "s3", "sshd": "ssh"}


def pytest_collection_modifyitems(config, items):
    """Tests under tests/e2e/ are marked ``e2e``; a test that uses a live service's fixture gets that
    service's mark, so ``make test-fast`` (``-m "not e2e and not slow and ..."``) leaves them out."""
    for item in items:
        if "/tests/e2e/" in str(item.path):
            item.add_marker(pytest.mark.e2e)
        for fixture, mark in SERVICE_MARKS.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(getattr(pytest.mark, mark))
