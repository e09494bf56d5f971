"""The README's "Try what you trained" block shows what the quickstart really produces: the quickstart
is run as the README runs it (its spec unchanged; only the output and run folders are this test's), and
`ftcluster sample` with the README's prompt prints the README's answer."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def readme_sample() -> tuple[list[str], str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Try what you trained\n\n```text\n(.*?)```", text, re.S).group(1).splitlines()
    sample = next(line for line in block if line.startswith("$ ftcluster sample "))
    answer = block[block.index(next(line for line in block if line.startswith("sampling from"))) + 1:]
    return shlex.split(sample)[4:], "\n".join(answer).strip()  # the words after the run id, the answer


@pytest.mark.train
@pytest.mark.slow
def test_readme_shows_what_the_quickstart_answers(tmp_path):
    pytest.importorskip("peft")
    args, answer = readme_sample()
    assert args[0] == "--prompt" and answer
    env = {**os.environ, "FTCLUSTER_HOME": str(tmp_path / "home"), "FTCLUSTER_CACHE": str(tmp_path / "cache")}
    out = f"file://{tmp_path / 'out'}"

    def ftc(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ftcluster.cli", *argv], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=600)

    run = ftc("submit", "examples/quickstart.yaml", "--wait", "--set", f"output.uri={out}")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    got = ftc("sample", out, *args)
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == answer
