"""The Backend base class: the hooks a backend must fill, and what it gets from the base once."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ftcluster.backends.base import Backend, RunStatus, SubmitRequest, load_status, save_status
from ftcluster.errors import BackendError, RunNotFoundError


class Recorder(Backend):
    """Fills every hook; schedule writes the run folder through the base and can be told to fail."""

    name = "recorder"

    def __init__(self, root: Path, fail: bool = False):
        super().__init__(root)
        self.fail, self.calls = fail, []

    def compile(self, spec):
        self.calls.append(("compile", spec))
        return f"plan of {spec}"

    def submit_dryrun(self, plan, run_id=None):
        self.calls.append(("submit_dryrun", plan))
        return SubmitRequest(self.name, run_id or "r-1", self.new_run_dir(None, run_id or "r-1"), ["true"],
                             {"job.txt": f"{plan}\n"})

    def schedule(self, request):
        self.calls.append(("schedule", request.run_id))
        with self.creating_run_folder(request) as run_dir:
            if self.fail:
                raise BackendError("the cluster said no")
            st = RunStatus(request.run_id, self.name, "job", "PENDING", str(run_dir), submitted_at=time.time())
            save_status(run_dir, st)
        return st

    def status(self, run_ref):
        return load_status(self.run_folder(run_ref))

    def logs(self, run_ref, follow=False):
        return iter([])

    def cancel(self, run_ref):
        return self.status(run_ref)

    def preflight(self, spec, remote=False):
        return []


@pytest.mark.parametrize("hook", ["submit_dryrun", "schedule", "status", "logs", "cancel", "preflight"])
def test_a_backend_missing_a_hook_cannot_be_made(hook, tmp_path):
    hooks = {h: Recorder.__dict__[h] for h in ("submit_dryrun", "schedule", "status", "logs", "cancel", "preflight")}
    partial = type("Partial", (Backend,), {k: v for k, v in hooks.items() if k != hook})
    with pytest.raises(TypeError, match=hook):
        partial(tmp_path)
    type("Complete", (Backend,), hooks)(tmp_path)  # with all of them it can
    with pytest.raises(TypeError):
        Backend()  # the base alone is not a backend


def test_submit_is_schedule_of_the_dry_run(tmp_path):
    b = Recorder(tmp_path)
    st = b.submit("spec-a")
    # the backend is handed the compiled plan, once: it never compiles the spec again
    assert b.calls == [("compile", "spec-a"), ("submit_dryrun", "plan of spec-a"), ("schedule", "r-1")]
    assert (tmp_path / "r-1" / "job.txt").read_text() == "plan of spec-a\n"  # the dry run's files, written by the base
    assert b.status("r-") == st  # a unique prefix finds the run under the backend's root


def test_dry_run_has_no_side_effects(tmp_path):
    req = Recorder(tmp_path).submit_dryrun("plan of spec-a")
    assert "$ true" in req.describe() and not any(tmp_path.iterdir())


def test_failed_schedule_leaves_no_run_folder(tmp_path):
    with pytest.raises(BackendError, match="the cluster said no"):
        Recorder(tmp_path, fail=True).submit("spec-a")
    assert not any(tmp_path.iterdir())
    with pytest.raises(RunNotFoundError):
        Recorder(tmp_path).status("r-1")


def test_list_shows_only_this_backends_runs(tmp_path):
    b = Recorder(tmp_path)
    b.submit("spec-a")
    other = tmp_path / "other-run"
    other.mkdir()
    save_status(other, RunStatus("other-run", "slurm", "x", "PENDING", str(other)))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "status.json").write_text("{not json")
    assert [st.run_id for st in b.list()] == ["r-1"]


def test_every_backend_fills_the_contract():
    from ftcluster.backends import get_backend

    for name in ("local", "slurm", "pipeline"):
        b = get_backend(name)
        assert isinstance(b, Backend) and b.name == name
