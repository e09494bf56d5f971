"""``ftcluster prepare-data --submit`` on Kubernetes creates the batch/v1 indexed Job with the kubernetes client.
The CRD-only test API server has no batch/v1, so the request goes to the loopback stand-in
(tests/support/k8s_standin.py), which records what it was sent: the Job exactly as rendered, strict field
validation; a 403 is one line naming the verb and resource."""

from __future__ import annotations

import pytest

from ftcluster import api
from ftcluster.backends.kubernetes.backend import KubernetesBackend
from ftcluster.backends.kubernetes.client import Connection
from ftcluster.errors import BackendError
from ftcluster.plan.prepare import compile_prepare
from ftcluster.render.kube import prepare_job
from ftcluster.spec.loader import load_spec_text
from tests.support.k8s_standin import StandIn, status_body
from tests.unit.render.test_render_prepare import KUBE


@pytest.fixture
def backend(ftc_home):
    pytest.importorskip("kubernetes")
    from kubernetes import client

    with StandIn([]) as standin:
        def connector(context):
            api_client = client.ApiClient(client.Configuration(host=standin.url))
            return Connection(api=api_client, core=api_client, server=standin.url, context="test")
        yield KubernetesBackend(root=ftc_home / "runs", connector=connector), standin


def test_submit_creates_the_indexed_job(backend):
    b, standin = backend
    spec = load_spec_text(KUBE, "cpt.yaml")
    st = b.schedule_prepare(b.prepare_dryrun(compile_prepare(spec)))
    ((query, body),) = standin.jobs
    assert body == prepare_job(compile_prepare(spec))  # the rendered Job, as a GitOps repository would hold it
    assert query == {"fieldValidation": "Strict", "fieldManager": "ftcluster"}
    assert (st.backend, st.job_id, st.state) == ("kubernetes", "ml/cpt-prepare", "PENDING")
    assert st.message == "follow it: kubectl -n ml get job cpt-prepare; kubectl -n ml logs -f job/cpt-prepare"


def test_forbidden_is_one_line(backend):
    b, standin = backend
    standin.canned[("POST", "/apis/batch/v1/namespaces/ml/jobs")] = (403, status_body(
        403, "Forbidden", 'jobs.batch is forbidden: User "ci" cannot create resource "jobs" in API group "batch"'))
    req = api.prepare_dryrun(load_spec_text(KUBE, "cpt.yaml"))
    with pytest.raises(BackendError, match=r"^forbidden: cannot create jobs\.batch in namespace ml \(jobs\.batch is "
                                           r"forbidden: .*\); ask for a Role that grants `create` on jobs\.batch"):
        b.schedule_prepare(req)
