"""The kubernetes backend against a real API server (.ci/k8s-up.sh: the upstream
apiextensions-apiserver on etcd, with the vendored PyTorchJob / TrainJob CRDs).

Real: every custom-resource call (create with fieldValidation=Strict, dryRun=All, get, list by
label, watch, delete with foreground propagation), the CRDs' OpenAPI validation, and the status
conditions a controller would write (this test writes them with patch_namespaced_custom_object_status,
as the Training Operator / Trainer would). The stand-in (tests/support/k8s_standin.py) serves only what that
server lacks: core/v1 pods and their logs, and SelfSubjectAccessReview; each test says which it uses.
Every call the backend makes is recorded; the last test compares them with the least-privilege Role.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from ftcluster.backends.kubernetes.backend import KubernetesBackend
from ftcluster.backends.kubernetes.client import PERMISSIONS, connect
from ftcluster.errors import BackendError
from ftcluster.spec.loader import load_spec
from tests.support.k8s_standin import Pod, StandIn, status_body

ROOT = Path(__file__).resolve().parents[2]
ROLE = ROOT / "manifests" / "team" / "role.yaml"
CALLS: list[tuple[str, str]] = []  # (method, url) of every call any backend in this module made
SECRET_VALUE = "do-not-leak-8d1f0c"


def _role_rules() -> list[dict]:
    return yaml.safe_load(ROLE.read_text())["rules"]


def _recording(api_client) -> None:
    inner = api_client.call_api

    def call_api(method, url, *args, **kwargs):
        CALLS.append((method, url))
        return inner(method, url, *args, **kwargs)

    api_client.call_api = call_api


@pytest.fixture
def standin():
    with StandIn(_role_rules()) as s:
        yield s


@pytest.fixture
def ns() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"  # the server checks no namespace existence: one per test keeps them apart


@pytest.fixture
def make_backend(live_k8s, standin, ftc_home, monkeypatch):
    """A backend on the real server, with core/v1 and access reviews on the stand-in."""
    from kubernetes import client

    monkeypatch.setenv("KUBECONFIG", live_k8s)

    def make(namespace: str | None = None, core_url: str | None = None, api_url: str | None = None):
        def connector(context):
            conn = connect(context)
            if api_url:  # this test's custom-resource calls go to the stand-in's canned answers
                conn.api = client.ApiClient(client.Configuration(host=api_url))
            conn.core = client.ApiClient(client.Configuration(host=core_url or standin.url))
            _recording(conn.api)
            _recording(conn.core)
            return conn
        return KubernetesBackend(root=ftc_home / "runs", namespace=namespace, connector=connector, poll=0.1)
    return make


@pytest.fixture
def admin(live_k8s):
    """The test's own client (a stand-in for the cluster's controllers); not recorded."""
    from kubernetes import client, config

    cfg = client.Configuration()
    config.load_kube_config(config_file=live_k8s, client_configuration=cfg, persist_config=False)
    return client.CustomObjectsApi(client.ApiClient(cfg))


def _spec(example: str, ns: str, *extra: str):
    return load_spec(ROOT / "examples" / example, overrides=[f"kubernetes.namespace={ns}", *extra])


def _set_status(admin, kind: str, ns: str, name: str, conditions: list[tuple[str, str]], **status) -> None:
    group, version, plural = {"PyTorchJob": ("kubeflow.org", "v1", "pytorchjobs"),
                              "TrainJob": ("trainer.kubeflow.org", "v1alpha1", "trainjobs")}[kind]
    conds = [{"type": t, "status": "True", "reason": t, "message": m, "lastTransitionTime": "2026-11-30T12:00:00Z",
              "lastUpdateTime": "2026-11-30T12:00:00Z"} for t, m in conditions]
    if kind == "TrainJob":
        for c in conds:
            c.pop("lastUpdateTime")
    admin.patch_namespaced_custom_object_status(group, version, ns, plural, name,
                                                {"status": {"conditions": conds, **status}},
                                                _content_type="application/merge-patch+json")


# --------------------------------------------------------------------------- submit


def test_submit_creates_exactly_the_rendered_object(make_backend, admin, ns, monkeypatch):
    """Real server: the stored object is the rendered file's object; the run folder records cluster,
    namespace and UID; no secret value reaches the object or the run folder."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_VALUE)
    b = make_backend()
    req = b.submit_dryrun(b.compile(_spec("lora-pytorchjob.yaml", ns)))
    st = b.schedule(req)
    assert st.state == "PENDING" and st.job_id == f"{ns}/legal-style-lora"
    stored = admin.get_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", "legal-style-lora")
    (rendered,) = [d for d in yaml.safe_load_all(req.files["legal-style-lora.yaml"]) if d]
    assert stored["spec"]["runPolicy"].pop("suspend") is False  # the CRD's default, added by the server
    assert stored["spec"] == rendered["spec"]
    assert stored["metadata"]["labels"] == rendered["metadata"]["labels"]
    record = json.loads((Path(st.run_dir) / "kubernetes.json").read_text())
    assert record["uid"] == stored["metadata"]["uid"] and record["namespace"] == ns
    assert record["server"].startswith("https://127.0.0.1:") and record["context"]
    assert (Path(st.run_dir) / "legal-style-lora.yaml").read_text() == req.files["legal-style-lora.yaml"]
    env = stored["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "AWS_SECRET_ACCESS_KEY",
            "valueFrom": {"secretKeyRef": {"name": "s3-credentials", "key": "secret-access-key"}}} in env
    blobs = [json.dumps(stored)] + [p.read_text() for p in Path(st.run_dir).iterdir()]
    assert not any(SECRET_VALUE in b for b in blobs)
    assert "kubectl.kubernetes.io/last-applied-configuration" not in json.dumps(stored)


def test_strict_validation_rejects_an_unknown_field(make_backend, admin, ns):
    """Real server: a field the CRD does not declare is an error (fieldValidation=Strict), not dropped;
    nothing is left behind (no object, no run folder)."""
    b = make_backend()
    req = b.submit_dryrun(b.compile(_spec("lora-pytorchjob.yaml", ns)))
    name = req.meta["job_file"]
    req.files[name] = req.files[name].replace("  runPolicy:\n", "  runPolicy:\n    cleanPodPolicyy: All\n")
    with pytest.raises(BackendError) as err:
        b.schedule(req)
    msg = str(err.value)
    assert "\n" not in msg and "unknown field" in msg and "cleanPodPolicyy" in msg
    assert not req.run_dir.exists()
    assert admin.list_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs")["items"] == []


def test_server_dry_run_stores_nothing(make_backend, admin, ns, live_k8s, ftc_home):
    """Real server: dryRun=All validates and stores nothing, through the API and the CLI."""
    b = make_backend()
    req = b.submit_dryrun(b.compile(_spec("full-trainjob.yaml", ns)))
    assert "nothing was stored" in b.server_dry_run(req)
    assert not req.run_dir.exists()
    res = subprocess.run([sys.executable, "-m", "ftcluster.cli", "submit", "examples/full-trainjob.yaml", "--dry-run",
                          "--server", "--namespace", ns], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "KUBECONFIG": live_k8s, "FTCLUSTER_HOME": str(ftc_home)})
    assert res.returncode == 0, res.stderr
    assert "kubectl create --validate=strict -f knowledge-inject-1b.yaml" in res.stdout
    assert res.stdout.rstrip().endswith("nothing was stored")
    assert admin.list_namespaced_custom_object("trainer.kubeflow.org", "v1alpha1", ns, "trainjobs")["items"] == []
    assert not (ftc_home / "runs").exists()


def test_name_conflict_is_one_line(make_backend, ns):
    """Real server: a second job of the same name is refused (409) with the fix; its run folder goes."""
    b = make_backend()
    b.submit(_spec("lora-pytorchjob.yaml", ns))
    req = b.submit_dryrun(b.compile(_spec("lora-pytorchjob.yaml", ns)))
    with pytest.raises(BackendError, match="already exists in namespace") as err:
        b.schedule(req)
    assert "cancel it" in str(err.value) and "\n" not in str(err.value)
    assert not req.run_dir.exists()


# --------------------------------------------------------------------------- status, wait, cancel, list


def test_status_follows_the_conditions_a_controller_writes(make_backend, admin, ns):
    """Real server (status subresource written as the operators would): Created -> Running ->
    Succeeded; Failed with its message; Suspended by Kueue; TrainJob's Complete."""
    b = make_backend()
    st = b.submit(_spec("lora-pytorchjob.yaml", ns))
    assert b.status(st.run_id).message.startswith("submitted; no controller")
    _set_status(admin, "PyTorchJob", ns, "legal-style-lora", [("Created", "created")])
    assert b.status(st.run_id).state == "PENDING"
    _set_status(admin, "PyTorchJob", ns, "legal-style-lora", [("Created", ""), ("Running", "")],
                replicaStatuses={"Master": {"active": 1}})
    now = b.status(st.run_id)
    assert (now.state, now.message) == ("RUNNING", "Master 1 active")
    _set_status(admin, "PyTorchJob", ns, "legal-style-lora", [("Created", ""), ("Restarting", "pod evicted")])
    assert b.status(st.run_id).message == "restarting: pod evicted"
    _set_status(admin, "PyTorchJob", ns, "legal-style-lora", [("Created", ""), ("Succeeded", "")],
                replicaStatuses={"Master": {"active": None, "succeeded": 1}})  # merge patch: None removes
    done = b.status(st.run_id)
    assert (done.state, done.message) == ("SUCCEEDED", "Master 1 succeeded") and done.ended_at

    failed = b.submit(_spec("lora-pytorchjob.yaml", ns, "name=failing"))
    _set_status(admin, "PyTorchJob", ns, "failing", [("Created", ""), ("Failed", "Master exited with code 1")])
    assert (b.status(failed.run_id).state, b.status(failed.run_id).message) == ("FAILED", "Master exited with code 1")

    queued = b.submit(_spec("full-trainjob.yaml", ns))  # kubernetes.queue: team-a
    _set_status(admin, "TrainJob", ns, "knowledge-inject-1b", [("Suspended", "suspended by Kueue")])
    q = b.status(queued.run_id)
    assert q.state == "PENDING" and q.message.startswith("queued by Kueue (LocalQueue team-a)")
    _set_status(admin, "TrainJob", ns, "knowledge-inject-1b", [("Created", ""), ("Complete", "")])
    assert b.status(queued.run_id).state == "SUCCEEDED"


@pytest.mark.parametrize("example, kind, name, done", [
    ("lora-pytorchjob.yaml", "PyTorchJob", "legal-style-lora", "Succeeded"),
    ("full-trainjob.yaml", "TrainJob", "knowledge-inject-1b", "Complete"),
])
def test_wait_follows_a_watch(make_backend, admin, ns, example, kind, name, done):
    """Real server: wait() returns when the watch delivers the terminal condition (no polling)."""
    b = make_backend()
    st = b.submit(_spec(example, ns))

    def controller():
        time.sleep(0.5)
        _set_status(admin, kind, ns, name, [("Created", "")])
        time.sleep(0.5)
        _set_status(admin, kind, ns, name, [("Created", ""), (done, "")])

    t = threading.Thread(target=controller)
    t.start()
    before = len(CALLS)
    final = b.wait(st.run_id, timeout=60)
    t.join()
    assert final.state == "SUCCEEDED"
    assert any("watch=true" in url.lower() for _, url in CALLS[before:])


def test_submit_wait_cli_exits_with_the_job_status(live_k8s, admin, ns, ftc_home):
    """Real server for the job and its watch; no pods there (core/v1), so the log part says so and
    the wait still ends on the Failed condition with exit 1."""
    proc = subprocess.Popen([sys.executable, "-m", "ftcluster.cli", "submit", "examples/lora-pytorchjob.yaml", "--wait",
                             "-n", ns], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "KUBECONFIG": live_k8s, "FTCLUSTER_HOME": str(ftc_home)})
    deadline = time.time() + 60
    while time.time() < deadline:
        if admin.list_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs")["items"]:
            break
        time.sleep(0.2)
    time.sleep(1)
    _set_status(admin, "PyTorchJob", ns, "legal-style-lora", [("Created", ""), ("Failed", "OOMKilled")])
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert "FAILED - OOMKilled" in err


@pytest.mark.parametrize("example, resource, name", [
    ("lora-pytorchjob.yaml", ("kubeflow.org", "v1", "pytorchjobs"), "legal-style-lora"),
    ("full-trainjob.yaml", ("trainer.kubeflow.org", "v1alpha1", "trainjobs"), "knowledge-inject-1b"),
])
def test_cancel_deletes_with_foreground_propagation(make_backend, admin, ns, example, resource, name):
    """Real server: cancel sends a foreground delete. With no garbage collector on this server the
    object stays, marked for deletion with the foregroundDeletion finalizer, which is exactly what
    a cluster's GC then acts on (pods first, then the job)."""
    b = make_backend()
    st = b.submit(_spec(example, ns))
    asked = b.cancel(st.run_id)
    assert asked.state == "PENDING" and asked.message.startswith("deletion requested")
    obj = admin.get_namespaced_custom_object(*resource[:2], ns, resource[2], name)
    assert obj["metadata"]["deletionTimestamp"] and "foregroundDeletion" in obj["metadata"]["finalizers"]
    assert b.status(st.run_id).state == "CANCELLED"


def test_list_shows_ftclusters_jobs_by_label(make_backend, admin, ns):
    """Real server: both kinds, by label, matched to run folders; other objects are not listed."""
    b = make_backend(namespace=ns)
    a = b.submit(_spec("lora-pytorchjob.yaml", ns))
    t = b.submit(_spec("full-trainjob.yaml", ns))
    foreign = yaml.safe_load_all(b.submit_dryrun(b.compile(_spec("lora-pytorchjob.yaml", ns, "name=foreign"))).files["foreign.yaml"])
    obj = next(d for d in foreign if d)
    obj["metadata"]["labels"] = {"team": "other"}
    admin.create_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", obj)
    runs = b.list()
    assert sorted(r.run_id for r in runs) == sorted([a.run_id, t.run_id])
    assert {r.job_id for r in runs} == {f"{ns}/legal-style-lora", f"{ns}/knowledge-inject-1b"}


# --------------------------------------------------------------------------- logs (stand-in pods)


def test_logs_of_a_rank(make_backend, standin, ns):
    """Job on the real server; its pods and their logs on the stand-in (core/v1): rank 0 is the
    master pod, rank N the worker N-1; follow streams until the pod ends."""
    b = make_backend()
    st = b.submit(_spec("full-slurm-2node.yaml", ns, "backend=kubernetes",
                        "kubernetes.image=registry.example.com/ftcluster-train:0.1.0"))
    labels = {"training.kubeflow.org/job-name": "cpt-llama-8b", "training.kubeflow.org/replica-index": "0"}
    master = Pod(ns, "cpt-llama-8b-master-0", {**labels, "training.kubeflow.org/replica-type": "master"},
                 log=["step 1\n", "step 2\n"])
    worker = Pod(ns, "cpt-llama-8b-worker-0", {**labels, "training.kubeflow.org/replica-type": "worker"},
                 log=["worker says hi\n"])
    standin.pods += [master, worker]
    assert list(b.logs(st.run_id)) == ["step 1\n", "step 2\n"]
    assert list(b.logs(st.run_id, rank=1)) == ["worker says hi\n"]
    assert "no pod for rank 2" in "".join(b.logs(st.run_id, rank=2))

    def more():
        time.sleep(0.3)
        master.log.append("step 3\n")
        time.sleep(0.3)
        master.done.set()

    threading.Thread(target=more).start()
    assert list(b.logs(st.run_id, follow=True)) == ["step 1\n", "step 2\n", "step 3\n"]


# --------------------------------------------------------------------------- faults


def test_connection_faults_are_one_line(tmp_path, monkeypatch, live_k8s):
    """Real client, no server needed: no kubeconfig, an unknown context, a server that does not answer."""
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(BackendError, match="no kubeconfig .* not found"):
        connect()
    monkeypatch.setenv("KUBECONFIG", live_k8s)
    with pytest.raises(BackendError, match="has no context 'nope'; choose one of"):
        connect("nope")
    dead = tmp_path / "dead.kubeconfig"
    dead.write_text(Path(live_k8s).read_text().replace(f"127.0.0.1:{os.environ.get('K8S_PORT', '16443')}",
                                                       "127.0.0.1:9"))
    monkeypatch.setenv("KUBECONFIG", str(dead))
    b = KubernetesBackend(root=tmp_path / "runs")
    with pytest.raises(BackendError, match="cannot reach the Kubernetes API server https://127.0.0.1:9") as err:
        b.submit(_spec("lora-pytorchjob.yaml", "default"))
    assert "\n" not in str(err.value) and not list((tmp_path / "runs").glob("*"))


def test_forbidden_and_unknown_namespace(make_backend, standin, ns):
    """Stand-in only (the real test server has no RBAC and no namespace check): kube-apiserver's own
    403 and 404 Status bodies become one line naming the verb and resource, or the namespace."""
    path = f"/apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs"
    standin.canned[("POST", path)] = (403, status_body(
        403, "Forbidden", f'pytorchjobs.kubeflow.org is forbidden: User "system:serviceaccount:{ns}:ci" cannot create '
                          f'resource "pytorchjobs" in API group "kubeflow.org" in the namespace "{ns}"',
        {"group": "kubeflow.org", "kind": "pytorchjobs"}))
    b = make_backend(api_url=standin.url)
    with pytest.raises(BackendError, match=f"forbidden: cannot create pytorchjobs.kubeflow.org in namespace {ns}"):
        b.submit(_spec("lora-pytorchjob.yaml", ns))
    standin.canned[("POST", path)] = (404, status_body(404, "NotFound", f'namespaces "{ns}" not found',
                                                       {"name": ns, "kind": "namespaces"}))
    with pytest.raises(BackendError, match=f"namespace '{ns}' does not exist"):
        b.submit(_spec("lora-pytorchjob.yaml", ns))


@pytest.fixture(scope="module")
def crdless_server(tmp_path_factory):
    """A second real API server with no CRDs installed (CRDS=), on other ports."""
    if not os.environ.get("FTCLUSTER_TEST_KUBECONFIG"):
        pytest.skip("needs the test API server (.ci/k8s-up.sh)")
    lab = tmp_path_factory.mktemp("k8s-nocrd")
    env = {**os.environ, "LAB": str(lab), "CRDS": "", "K8S_PORT": "16453", "ETCD_PORT": "12391"}
    res = subprocess.run(["bash", ".ci/k8s-up.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    yield str(lab / "admin.kubeconfig")
    subprocess.run(["bash", ".ci/k8s-down.sh"], cwd=ROOT, env=env, capture_output=True, timeout=60)


def test_missing_crd_says_what_to_install(crdless_server, monkeypatch, tmp_path):
    """Real server without the CRDs: submit and doctor name the operator to install."""
    monkeypatch.setenv("KUBECONFIG", crdless_server)
    b = KubernetesBackend(root=tmp_path / "runs")
    with pytest.raises(BackendError, match="does not serve PyTorchJob .*install the Kubeflow Training Operator v1.9"):
        b.submit(_spec("lora-pytorchjob.yaml", "default"))
    with pytest.raises(BackendError, match="does not serve TrainJob .*install Kubeflow Trainer v2"):
        b.submit(_spec("full-trainjob.yaml", "default"))
    checks = {c.name: c for c in b.preflight(_spec("full-trainjob.yaml", "default"))}
    assert checks["CRDs"].status == "fail" and "Kubeflow Trainer v2" in checks["CRDs"].fix + checks["CRDs"].result


def test_prepare_data_submit_creates_its_indexed_job(make_backend, standin, ns):
    """`ftcluster prepare-data --submit` on Kubernetes: the batch/v1 indexed Job, as rendered, through the
    built-in-API client (the stand-in here: the test server serves CRDs only); the Role must grant it."""
    from ftcluster.plan.prepare import compile_prepare
    from ftcluster.render.kube import prepare_job
    from ftcluster.spec.loader import load_spec_text
    from tests.unit.render.test_render_prepare import KUBE

    spec = load_spec_text(KUBE.replace("namespace: ml", f"namespace: {ns}"), "cpt.yaml")
    b = make_backend()
    st = b.schedule_prepare(b.prepare_dryrun(compile_prepare(spec)))
    ((query, body),) = standin.jobs
    assert body == prepare_job(compile_prepare(spec)) and body["spec"]["completionMode"] == "Indexed"
    assert query["fieldValidation"] == "Strict" and st.job_id == f"{ns}/cpt-prepare"


# --------------------------------------------------------------------------- doctor and RBAC


def test_doctor_preflight(make_backend, standin, ns):
    """Real server for reachability and CRD discovery; the stand-in answers the access reviews with
    the Role in manifests/team/ (all allowed), then with a Role lacking `watch`."""
    b = make_backend()
    spec = _spec("lora-pytorchjob.yaml", ns)
    checks = {c.name: c for c in b.preflight(spec)}
    assert checks["API server"].status == "ok" and checks["CRDs"].status == "ok"
    assert "kubeflow.org versions v1" in checks["CRDs"].result
    assert checks["permissions"].status == "ok", checks["permissions"]
    assert checks["Kueue"].status == "warn"  # not installed, or (after the test below) no LocalQueue team-a here
    assert checks["image pull secret"].status == "warn"
    assert {(r["verb"], r["resource"]) for r in standin.reviews} >= {("create", "pytorchjobs"), ("get", "pods")}
    standin.rules = [dict(r, verbs=[v for v in r["verbs"] if v != "watch"]) for r in standin.rules]
    denied = {c.name: c for c in b.preflight(spec)}["permissions"]
    assert denied.status == "fail" and "watch pytorchjobs.kubeflow.org" in denied.result


LOCALQUEUE_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "localqueues.kueue.x-k8s.io"},
    "spec": {"group": "kueue.x-k8s.io", "scope": "Namespaced",
             "names": {"plural": "localqueues", "singular": "localqueue", "kind": "LocalQueue"},
             "versions": [{"name": "v1beta1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                 "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]},
}


def test_doctor_checks_the_kueue_local_queue(make_backend, live_k8s, ns):
    """Real server: a LocalQueue CRD (Kueue's group and version, schema left open: only its
    existence matters here) is installed; the queue label's LocalQueue is missing (warning), then found."""
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    cfg = client.Configuration()
    config.load_kube_config(config_file=live_k8s, client_configuration=cfg, persist_config=False)
    api = client.ApiClient(cfg)
    try:
        client.ApiextensionsV1Api(api).create_custom_resource_definition(LOCALQUEUE_CRD)
    except ApiException as exc:
        assert exc.status == 409, exc.body
    b = make_backend()
    spec = _spec("lora-pytorchjob.yaml", ns)  # kubernetes.queue: team-a
    for _ in range(100):  # Established takes a moment
        kueue = {c.name: c for c in b.preflight(spec)}["Kueue"]
        if "not installed" not in kueue.result:
            break
        time.sleep(0.1)
    assert kueue.status == "warn" and "no LocalQueue 'team-a'" in kueue.result
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        "kueue.x-k8s.io", "v1beta1", ns, "localqueues",
        {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "LocalQueue", "metadata": {"name": "team-a"},
         "spec": {"clusterQueue": "cluster-queue"}})
    kueue = {c.name: c for c in b.preflight(spec)}["Kueue"]
    assert kueue.status == "ok" and "LocalQueue team-a exists" in kueue.result


def _verb_and_resource(method: str, url: str) -> tuple[str, str, str] | None:
    """(verb, group, resource) of a recorded call, as RBAC sees it; None for discovery and
    access reviews (every authenticated user may: system:discovery, system:basic-user)."""
    from urllib.parse import parse_qs, urlparse

    u = urlparse(url)
    parts = u.path.strip("/").split("/")
    if parts[0] == "api":
        group, rest = "", parts[2:]
    elif parts[0] == "apis" and len(parts) > 2:
        group, rest = parts[1], parts[3:]
    else:
        return None  # /version, /apis, /apis/<group>
    if not rest or group == "authorization.k8s.io":
        return None  # /apis/<group>/<version>: discovery
    if rest[0] != "namespaces":
        raise AssertionError(f"cluster-scoped call {method} {u.path}: a namespaced Role cannot grant it")
    resource = "/".join([rest[2]] + rest[4:5]) if len(rest) > 2 else "namespaces"
    named = len(rest) > 3
    verb = {"POST": "create", "DELETE": "delete", "PATCH": "patch", "PUT": "update"}.get(method)
    if verb is None:
        verb = "get" if named else ("watch" if parse_qs(u.query).get("watch") == ["true"] else "list")
    return verb, group, resource


def test_role_grants_exactly_what_the_backend_calls():
    """Every call recorded in this module (run whole: the other tests exercise every verb) maps to a
    rule of manifests/team/role.yaml, and every rule was used. Runs last in the module."""
    if not CALLS:
        pytest.skip("no calls recorded: run the whole module against the test API server")
    used = {c for c in (_verb_and_resource(m, u) for m, u in CALLS) if c}
    granted = {(verb, group, resource) for rule in _role_rules() for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    assert used <= granted, f"called but not granted: {sorted(used - granted)}"
    assert granted <= used, f"granted but never called: {sorted(granted - used)}"
    assert granted == {(v, g, r) for (g, r), verbs in PERMISSIONS.items() for v in verbs}
