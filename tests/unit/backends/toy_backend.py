"""A backend that lives outside ftcluster, for the registry's tests: "one folder plus one registration"."""

from __future__ import annotations

import time

from ftcluster.backends.base import Backend, RunStatus, SubmitRequest, load_status, new_run_id, save_status
from ftcluster.preflight.checks import Check
from ftcluster.spec.registry import BackendEntry

ENTRY = BackendEntry(name="toy", factory="tests.unit.backends.toy_backend:ToyBackend",
                     preflight="tests.unit.backends.toy_backend:preflight", render_target="slurm",
                     description="a test backend")


class ToyBackend(Backend):
    """Renders the Slurm script and "runs" by recording it: every hook filled, nothing started."""

    name = "toy"

    def submit_dryrun(self, plan, run_id=None):
        from ftcluster.render import render_plan

        spec = plan.spec
        run_id = run_id or new_run_id(spec.name)
        files = render_plan(plan)  # the registry's default target for this backend
        return SubmitRequest(self.name, run_id, self.new_run_dir(spec, run_id), ["toy-submit", *files], files,
                             meta={"name": spec.name, "output_uri": plan.output_uri})

    def schedule(self, request):
        with self.creating_run_folder(request) as run_dir:
            st = RunStatus(request.run_id, self.name, request.meta["name"], "SUCCEEDED", str(run_dir),
                           submitted_at=time.time(), output_uri=request.meta["output_uri"])
            save_status(run_dir, st)
        return st

    def status(self, run_ref):
        return load_status(self.run_folder(run_ref))

    def logs(self, run_ref, follow=False):
        return iter(["toy log\n"])

    def cancel(self, run_ref):
        return self.status(run_ref)

    def preflight(self, spec, remote=False):  # the entry's function is used instead
        return [Check("toy method", "fail", "the entry's preflight should have been used")]


def preflight(spec, remote=False, **options):
    return [Check("toy cluster", "ok", f"{spec.name} would run on the toy cluster (remote={remote})")]
