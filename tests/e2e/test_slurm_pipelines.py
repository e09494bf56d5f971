"""Job arrays and pipelines on the live Slurm (.ci/slurm-up.sh): what sbatch accepts, which variant
each task trains, the throttle, afterok dependencies, all-or-nothing submission and status.

The training program is tests/support/train_shim.py (``slurm.python``): launched exactly like the real
one, it picks its payload with the real ``select_payload`` and records what it picked.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ftcluster.render import render
from ftcluster.spec.loader import load_spec

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slurm


@pytest.fixture(autouse=True)
def _live_slurm(live_slurm):
    """Every test here needs the live Slurm (see conftest.live_slurm)."""


def ftc(*args: str, home: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "ftcluster.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "FTCLUSTER_HOME": str(home)}, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def status(run: str, home: Path) -> dict:
    return json.loads(ftc("status", run, "--json", home=home).stdout)


def wait_for(run: str, home: Path, until, timeout: float = 90) -> dict:
    deadline = time.time() + timeout
    st = status(run, home)
    while not until(st):
        assert time.time() < deadline, f"gave up waiting: {st}"
        time.sleep(0.5)
        st = status(run, home)
    return st


def scontrol(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout


@pytest.fixture
def lab(tmp_path):
    """Spec files for this lab: a full fine-tune and a LoRA job with 3 variants, trained by the shim."""
    from tests.support.train_shim import make_shim

    shim = make_shim(tmp_path)
    common = f"""\
        backend: slurm
        resources: {{gpus_per_node: 0, procs_per_node: 1}}
        slurm:
          partition: debug
          python: {shim}
          output: {tmp_path}/slurm-%x-%j.out
          env: {{SHIM_SLEEP: '{{sleep}}', SHIM_FAIL: '{{fail}}'}}
        """
    full = f"""\
        name: cpt
        method: full
        model: {{random_init: {{preset: tiny}}}}
        data: {{train: {ROOT}/examples/data/text.jsonl, format: text, seq_len: 64}}
        output: {{uri: file://{tmp_path}/out/cpt}}
        """
    lora = f"""\
        name: adapters
        method: lora
        model: {{random_init: {{preset: tiny}}}}
        data: {{train: {ROOT}/examples/data/instruct.jsonl, seq_len: 64}}
        output: {{uri: file://{tmp_path}/out/adapters}}
        array_parallelism: 2
        variants:
          - {{name: r2, set: {{lora.r: 2}}}}
          - {{name: r4, set: {{lora.r: 4}}}}
          - {{name: r8, set: {{lora.r: 8}}}}
        """

    def write(name: str, text: str, sleep: float = 0, fail: str = "") -> Path:
        path = tmp_path / name
        text = textwrap.dedent(text) + textwrap.dedent(common)
        path.write_text(text.replace("{sleep}", str(sleep)).replace("{fail}", fail))
        return path

    class Lab:
        root = tmp_path
        home = tmp_path / "home"

        @staticmethod
        def full(sleep: float = 0, fail: str = "") -> Path:
            return write("full.yaml", full, sleep, fail)

        @staticmethod
        def lora(sleep: float = 0, fail: str = "") -> Path:
            return write("lora.yaml", lora, sleep, fail)

        @staticmethod
        def pipeline(extra: str = "") -> Path:
            path = tmp_path / "pipe.yaml"
            path.write_text(textwrap.dedent(f"""\
                pipeline: cpt-then-lora
                stages:
                  - {{name: cpt, spec: full.yaml}}
                  - {{name: lora, spec: lora.yaml, model_from: cpt{extra}}}
                """))
            return path

        @staticmethod
        def picked(variant: str) -> dict:
            return json.loads((tmp_path / "out" / "adapters" / variant / "selected.json").read_text())

    return Lab


def test_array_script_is_accepted_by_sbatch(lab):
    (name, script), = render(load_spec(lab.lora()), "slurm").items()
    directives = re.findall(r"^#SBATCH (\S+)$", script, re.M)
    assert "--array=0-2%2" in directives
    assert f"--output={lab.root}/slurm-%x-%A_%a.out" in directives
    res = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "to start at" in res.stderr, res.stderr


def test_array_tasks_each_train_their_variant_two_at_a_time(lab):
    res = ftc("submit", str(lab.lora(sleep=4)), home=lab.home)
    run = res.stdout.split()[1]
    seen = set()  # task states and reasons seen while it runs

    def done(s: dict) -> bool:
        seen.update((t["state"], t["message"]) for t in s["tasks"])
        return s["state"] in ("SUCCEEDED", "FAILED", "CANCELLED")

    st = wait_for(run, lab.home, done)
    assert ("PENDING", "JobArrayTaskLimit") in seen and ("RUNNING", "") in seen, seen
    assert st["state"] == "SUCCEEDED", st
    job = st["job_id"]
    assert [(t["name"], t["job_id"], t["state"]) for t in st["tasks"]] == [
        ("r2", f"{job}_0", "SUCCEEDED"), ("r4", f"{job}_1", "SUCCEEDED"), ("r8", f"{job}_2", "SUCCEEDED")]
    picked = {v: lab.picked(v) for v in ("r2", "r4", "r8")}
    assert [(p["variant"], p["array_task"], p["name"], p["lora_r"]) for p in picked.values()] == [
        ("r2", "0", "adapters-r2", 2), ("r4", "1", "adapters-r4", 4), ("r8", "2", "adapters-r8", 8)]
    # never more than two at once
    for t in [p["start"] + 0.01 for p in picked.values()]:
        assert sum(p["start"] <= t < p["end"] for p in picked.values()) <= 2
    logs = ftc("logs", run, home=lab.home).stdout
    for i, v in enumerate(("r2", "r4", "r8")):
        assert f"==> {v} (task {job}_{i}) <==" in logs and f"shim trains adapters-{v}" in logs


def test_pipeline_second_stage_waits_for_the_first(lab):
    lab.full(sleep=4)
    lab.lora()
    res = ftc("submit", str(lab.pipeline()), home=lab.home)
    run = res.stdout.split()[1]
    st = status(run, lab.home)
    cpt_id, lora_id = st["job_id"].split(",")
    assert re.search(rf"(?:^|\s)Dependency=afterok:{cpt_id}(?:_\*)?\(", scontrol(lora_id)), scontrol(lora_id)
    assert [t["name"] for t in st["tasks"]] == ["cpt", "lora", "lora/r2", "lora/r4", "lora/r8"]
    # slurmctld sets Reason=Dependency on its next scheduling pass (Reason=None just after sbatch)
    pattern = re.compile(rf"^\s+lora/r2\s+{lora_id}_0\s+PENDING\s+Dependency", re.M)
    deadline = time.monotonic() + 30
    while True:
        table = ftc("status", run, home=lab.home).stdout
        if pattern.search(table) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert pattern.search(table), table
    st = wait_for(run, lab.home, lambda s: s["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"))
    assert st["state"] == "SUCCEEDED" and {t["state"] for t in st["tasks"]} == {"SUCCEEDED"}, st
    cpt_end = json.loads((lab.root / "out" / "cpt" / "selected.json").read_text())["end"]
    for v in ("r2", "r4", "r8"):
        picked = lab.picked(v)
        assert picked["model_path"] == f"file://{lab.root}/out/cpt/final"  # model_from
        assert picked["start"] >= cpt_end  # afterok
    assert "===== stage lora" in ftc("logs", run, home=lab.home).stdout


def test_pipeline_whose_second_sbatch_fails_leaves_nothing(lab):
    lab.full()
    lab.lora()
    res = ftc("submit", str(lab.pipeline(", set: {slurm.partition: nosuch}")), home=lab.home, check=False)
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "pipeline cpt-then-lora not submitted: stage lora: sbatch rejected the job" in res.stderr
    queued = re.search(r"cancelled the jobs already queued \((\d+)\)", res.stderr).group(1)
    assert "JobState=CANCELLED" in scontrol(queued)  # held, so it never ran
    assert not list((lab.home / "runs").glob("*")) if (lab.home / "runs").exists() else True
    assert not (lab.root / "out").exists()


def test_failed_stage_cancels_its_dependents(lab):
    lab.full(fail="cpt")
    lab.lora()
    run = ftc("submit", str(lab.pipeline()), home=lab.home).stdout.split()[1]
    st = wait_for(run, lab.home, lambda s: s["state"] in ("SUCCEEDED", "FAILED", "CANCELLED")
                  and all(t["state"] != "PENDING" for t in s["tasks"]))
    assert st["state"] == "FAILED" and st["message"].startswith("stage cpt FAILED"), st
    assert {t["name"]: t["state"] for t in st["tasks"]}["lora"] == "CANCELLED"  # --kill-on-invalid-dep
    assert not (lab.root / "out" / "adapters").exists()


def test_cancel_a_pipeline_and_one_stage_status(lab):
    lab.full(sleep=30)
    lab.lora()
    run = ftc("submit", str(lab.pipeline()), home=lab.home).stdout.split()[1]
    wait_for(run, lab.home, lambda s: s["tasks"][0]["state"] == "RUNNING")
    one = status(f"{run}/lora", lab.home)
    assert one["backend"] == "slurm" and one["state"] == "PENDING" and len(one["tasks"]) == 3
    assert "cancel requested" in ftc("cancel", run, home=lab.home).stdout
    st = wait_for(run, lab.home, lambda s: s["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"))
    assert st["state"] == "CANCELLED" and {t["state"] for t in st["tasks"]} == {"CANCELLED"}, st


def test_rendered_submit_script_is_all_or_nothing(lab, tmp_path):
    lab.full()
    lab.lora()
    bad = tmp_path / "bad"
    ftc("render", str(lab.pipeline(", set: {slurm.partition: nosuch}")), "-o", str(bad), home=lab.home)
    res = subprocess.run(["bash", str(bad / "submit-pipeline.sh")], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "pipeline not submitted; cancelled:" in res.stderr
    cancelled = res.stderr.strip().split()[-1]
    assert "JobState=CANCELLED" in scontrol(cancelled)
    good = tmp_path / "good"
    ftc("render", str(lab.pipeline()), "-o", str(good), home=lab.home)
    res = subprocess.run(["bash", str(good / "submit-pipeline.sh")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    ids = dict(kv.split("=") for kv in res.stdout.split(":", 1)[1].split())
    try:
        assert re.search(rf"Dependency=afterok:{ids['cpt']}", scontrol(ids["lora"]))
        assert "Reason=JobHeldUser" not in scontrol(ids["cpt"])  # released
    finally:
        subprocess.run(["scancel", ids["lora"], ids["cpt"]], check=False)


def test_array_tasks_run_as_name_variant_and_status_has_their_times(lab):
    """docs/pipelines.md: a variant runs as job <name>-<variant>; `status --json` has started_at/ended_at."""
    run = ftc("submit", str(lab.lora(sleep=3)), home=lab.home).stdout.split()[1]
    names: set[str] = set()

    def done(s: dict) -> bool:
        out = subprocess.run(["squeue", "-h", "-j", s["job_id"], "-t", "RUNNING", "-o", "%j"], capture_output=True,
                             text=True).stdout
        names.update(out.split())
        return s["state"] in ("SUCCEEDED", "FAILED", "CANCELLED")

    st = wait_for(run, lab.home, done)
    assert st["state"] == "SUCCEEDED", st
    assert names & {"adapters-r2", "adapters-r4", "adapters-r8"}, names  # squeue shows the new name (after setup)
    for i, v in enumerate(("r2", "r4", "r8")):  # the controller still knows the tasks (MinJobAge)
        assert f"JobName=adapters-{v} " in scontrol(f"{st['job_id']}_{i}")
    for row in [st, *st["tasks"]]:
        assert row["started_at"] and row["ended_at"], row
        assert row["ended_at"] >= row["started_at"] >= st["submitted_at"] - 1, row
    assert st["started_at"] == min(t["started_at"] for t in st["tasks"])


def test_status_of_a_finished_job_has_its_start_and_end(lab):
    run = ftc("submit", str(lab.full(sleep=2)), home=lab.home).stdout.split()[1]
    st = wait_for(run, lab.home, lambda s: s["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"))
    assert st["state"] == "SUCCEEDED", st
    assert st["started_at"] and st["ended_at"], st
    assert st["submitted_at"] - 1 <= st["started_at"] and st["ended_at"] - st["started_at"] >= 2, st
    shown = scontrol(st["job_id"])
    assert time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(st["started_at"])) in shown, shown
