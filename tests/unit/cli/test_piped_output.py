"""Piped or redirected, the CLI's tables and help keep every value whole and every row on one line
(a script greps them); on a terminal they fit its width. Each test runs the real CLI with stdout a
pipe and no $COLUMNS, as `ftcluster status | grep ...` does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ftcluster.backends.base import RunStatus, save_status
from ftcluster.ui.tables import UNBOUNDED, table, terminal_width

ROOT = Path(__file__).resolve().parents[3]
LONG = ("the job was requeued after node n-0042 failed its health check; it resumes from checkpoint step 1200 "
        "under s3://bucket/runs/cpt-llama-8b/checkpoints")


def piped(*args: str, env: dict[str, str] | None = None) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    out = subprocess.run([sys.executable, "-m", "ftcluster.cli", *args], capture_output=True, text=True, cwd=ROOT,
                         env={**clean, **(env or {})}, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_width_is_unbounded_when_not_a_terminal(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)

    class Pipe:
        def isatty(self) -> bool:
            return False

    assert terminal_width(Pipe()) == UNBOUNDED
    monkeypatch.setenv("COLUMNS", "80")
    assert terminal_width(Pipe()) == 80  # an explicit width still wins
    assert len(table(["RUN", "MESSAGE"], [["r-1", LONG]]).splitlines()) == 3  # wrapped at 80


def test_status_piped_keeps_each_run_on_one_line(tmp_path):
    home = tmp_path / "home"
    run = home / "runs" / "cpt-20261207-120000-ab12"
    run.mkdir(parents=True)
    save_status(run, RunStatus(run_id=run.name, backend="local", name="cpt", state="FAILED", run_dir=str(run),
                               job_id="4242", message=LONG))
    lines = piped("status", env={"FTCLUSTER_HOME": str(home)}).splitlines()
    assert len(lines) == 2, lines  # the header and the run
    assert lines[1].startswith(run.name) and lines[1].endswith(LONG)


def test_plan_piped_cuts_no_cell():
    out = piped("plan", "examples/full-slurm-2node.yaml", "--offline")
    header = next(line for line in out.splitlines() if "method" in line and "GPUs" in line)
    assert "GiB/GPU" in header and "cost" in header
    rows = [line for line in out.splitlines() if "ZeRO-" in line and "$" in line]
    assert rows and all("…" not in r for r in rows)
    assert any("ZeRO-2+off" in r for r in rows)  # the widest method cell, whole


def test_help_piped_shows_whole_summaries():
    out = piped("--help")
    assert "Check a job against its cluster and storage before submitting; exit 1 if any check fails." in out
    assert "..." not in out.split("Commands:")[1]
    summary = next(line for line in out.splitlines() if line.strip().startswith("validate"))
    assert summary.rstrip().endswith("file:line:column."), summary
