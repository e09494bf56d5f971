"""Talking to a Kubernetes API server for the kubernetes backend: connection, the job kinds,
one-line errors with the fix, and job conditions mapped to ftcluster's states.

The official ``kubernetes`` client (the ``[k8s]`` extra) is imported here only, and only when a
backend method runs, so ``ftcluster render`` never needs it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from ...errors import BackendError

MANAGED_BY = "app.kubernetes.io/managed-by=ftcluster"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE = ("kueue.x-k8s.io", "v1beta1", "localqueues")
# (connect, read) seconds for one request; a watch or a followed log sets its own.
TIMEOUT = (5, 30)
# A one-line help for the permission errors: where the least-privilege Role lives.
ROLE_HINT = "manifests/team/role.yaml grants exactly what ftcluster needs"
# Every (API group, resource) -> verbs the backend calls, in one namespace: the source of the
# least-privilege Role (manifests/generate.py) and of doctor's access reviews. The tests record every
# call the backend makes and fail if this grants more or less.
PERMISSIONS = {
    ("kubeflow.org", "pytorchjobs"): ("create", "delete", "get", "list", "watch"),
    ("trainer.kubeflow.org", "trainjobs"): ("create", "delete", "get", "list", "watch"),
    ("", "pods"): ("list",),  # find the pod of a rank by the operator's labels
    ("", "pods/log"): ("get",),
    ("kueue.x-k8s.io", "localqueues"): ("get",),  # doctor: the queue label names an existing LocalQueue
    ("batch", "jobs"): ("create",),  # prepare-data --submit: the indexed Job that tokenizes a corpus
}


@dataclass(frozen=True)
class Kind:
    """A job kind ftcluster submits: where it is served, its pods' container, who provides it."""

    kind: str
    group: str
    version: str
    plural: str
    container: str
    provider: str

    @property
    def resource(self) -> str:
        return f"{self.plural}.{self.group}"


KINDS = {
    "PyTorchJob": Kind("PyTorchJob", "kubeflow.org", "v1", "pytorchjobs", "pytorch",
                       "the Kubeflow Training Operator v1.9 (kubectl apply --server-side -k "
                       "'github.com/kubeflow/trainer.git/manifests/overlays/standalone?ref=v1.9.4'), "
                       "or render --target trainjob for Trainer v2"),
    "TrainJob": Kind("TrainJob", "trainer.kubeflow.org", "v1alpha1", "trainjobs", "node",
                     "Kubeflow Trainer v2 (kubectl apply --server-side -k "
                     "'github.com/kubeflow/trainer.git/manifests/overlays/manager?ref=v2.3.0'), "
                     "or set kubernetes.kind: PyTorchJob for the Training Operator v1"),
}


@dataclass
class Connection:
    """Clients for one cluster. ``core`` serves the built-in APIs (core/v1 pods and logs, batch/v1 jobs) and
    authorization; it is the same ApiClient as ``api`` except in tests, where those come from a stand-in."""

    api: Any
    core: Any
    server: str
    context: str
    namespace: str = "default"
    calls: list[Any] = field(default_factory=list)

    def custom(self):
        from kubernetes import client

        return client.CustomObjectsApi(self.api)

    def core_v1(self):
        from kubernetes import client

        return client.CoreV1Api(self.core)


def _kubeconfig_paths(kubeconfig: str | None) -> list[Path]:
    raw = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p]


def connect(context: str | None = None, kubeconfig: str | None = None) -> Connection:
    """A connection from the kubeconfig (``context`` or its current one), or the in-cluster
    service account when there is no kubeconfig and the process runs in a pod."""
    try:
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException
    except ImportError:
        raise BackendError("the kubernetes backend needs the Kubernetes client; pip install 'ftcluster[k8s]'") from None
    cfg = client.Configuration()
    paths = [p for p in _kubeconfig_paths(kubeconfig) if p.is_file()]
    if paths:
        files = os.pathsep.join(str(p) for p in paths)
        try:
            # The client is untyped: these are the kubeconfig's context entries, {"name", "context": {...}}.
            contexts, current = cast("tuple[list[dict[str, Any]], dict[str, Any]]",
                                     config.list_kube_config_contexts(config_file=files))
            names = [c["name"] for c in contexts or []]
            if context and context not in names:
                raise BackendError(f"kubeconfig {files} has no context {context!r}; choose one of "
                                   f"{', '.join(names) or '(none)'} (kubectl config get-contexts)")
            chosen = next((c for c in contexts if c["name"] == context), current) if context else current
            config.load_kube_config(config_file=files, context=context, client_configuration=cfg, persist_config=False)
        except ConfigException as exc:
            raise BackendError(f"kubeconfig {files}: {str(exc).splitlines()[0]}; fix it or pick a context with "
                               "--context (kubectl config get-contexts)") from None
        name, namespace = chosen["name"], chosen.get("context", {}).get("namespace") or "default"
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        try:
            config.load_incluster_config(client_configuration=cfg)
        except ConfigException as exc:
            raise BackendError(f"in-cluster config: {exc}; mount the service account token or use a kubeconfig") from None
        name = "in-cluster"
        ns_file = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        namespace = ns_file.read_text().strip() if ns_file.is_file() else "default"
    else:
        where = ", ".join(str(p) for p in _kubeconfig_paths(kubeconfig))
        raise BackendError(f"no kubeconfig ({where} not found) and not inside a cluster; set KUBECONFIG or "
                           "create ~/.kube/config (e.g. your provider's `get-credentials` command)")
    cfg.retries = 1  # fail fast on an unreachable server; urllib3 would retry 3 times
    api = client.ApiClient(cfg)
    return Connection(api=api, core=api, server=cfg.host, context=name, namespace=namespace)


# --------------------------------------------------------------------------- errors


def _status_body(exc: Any) -> dict[str, Any]:
    try:
        return json.loads(getattr(exc, "body", None) or "{}")
    except ValueError:
        return {}


def api_error(exc: BaseException, conn: Connection, verb: str, kind: Kind | None = None,
              resource: str | None = None, namespace: str | None = None, name: str | None = None) -> BackendError:
    """One line naming what failed and how to fix it, for any exception a client call raised."""
    from kubernetes.client.exceptions import ApiException

    resource = resource or (kind.resource if kind else "?")
    where = f"in namespace {namespace}" if namespace else "cluster-wide"
    if not isinstance(exc, ApiException):
        reason = getattr(exc, "reason", None) or exc
        return BackendError(f"cannot reach the Kubernetes API server {conn.server} (context {conn.context}): "
                            f"{str(reason).splitlines()[0][:200]}; check the cluster is up and reachable "
                            f"(`kubectl --context {conn.context} cluster-info`: VPN, proxy, server URL)")
    body = _status_body(exc)
    message = (body.get("message") or exc.reason or "").splitlines()[0] if (body.get("message") or exc.reason) else ""
    code = exc.status
    if code == 401:
        return BackendError(f"the API server {conn.server} rejected the credentials of context {conn.context} "
                            "(401 Unauthorized); refresh them (log in again / renew the token)")
    if code == 403:
        return BackendError(f"forbidden: cannot {verb} {resource} {where} ({message}); ask for a Role that grants "
                            f"`{verb}` on {resource} ({ROLE_HINT})")
    if code == 404:
        details = body.get("details") or {}
        if details.get("kind") == "namespaces" or message.startswith("namespaces "):
            return BackendError(f"namespace {namespace or details.get('name')!r} does not exist on {conn.server}; "
                                "create it (kubectl create namespace ...) or set kubernetes.namespace / --namespace")
        if kind and (verb in ("create", "list", "watch") or not details.get("name")):
            return crd_missing(kind, conn)  # a missing object's 404 names it; a missing resource's does not
        if not name:
            return BackendError(f"{conn.server} does not serve {resource} ({message}); is this a full Kubernetes API server?")
        return BackendError(f"{kind.kind if kind else resource} {name!r} not found {where}; "
                            "it was deleted (or never created); `ftcluster list --backend kubernetes` shows what exists")
    if code == 409:
        what = kind.kind if kind else resource
        return BackendError(f"a {what} named {name!r} already exists {where}; cancel it (ftcluster cancel RUN, or "
                            f"kubectl delete {kind.plural if kind else resource} {name} -n {namespace}) or rename the job "
                            "(--set name=...)")
    if code in (400, 422):
        return BackendError(f"the API server rejected the {kind.kind if kind else resource}: {message[:500]}; "
                            "the cluster's CRD does not accept this field or value (check the operator version "
                            "against docs/kubernetes.md, or fix the spec)")
    return BackendError(f"the API server answered {code} to {verb} {resource} {where}: {message[:300]}")


def crd_missing(kind: Kind, conn: Connection) -> BackendError:
    return BackendError(f"{conn.server} (context {conn.context}) does not serve {kind.kind} "
                        f"({kind.group}/{kind.version}): its CRD is not installed; install {kind.provider}")


# --------------------------------------------------------------------------- states


def _true(conditions: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    for c in conditions:
        if c.get("type") == kind and str(c.get("status")) == "True":
            return c
    return None


def _replicas(status: dict[str, Any]) -> str:
    """``Master 1 active, Worker 2 succeeded`` (PyTorchJob) or the same for a TrainJob's jobs."""
    parts = []
    rs = status.get("replicaStatuses") or {}
    items = [(k, v) for k, v in sorted(rs.items())]
    items += [(j.get("name", "?"), j) for j in status.get("jobsStatus") or []]
    for name, counts in items:
        shown = [f"{counts[key]} {key}" for key in ("active", "ready", "succeeded", "failed") if counts.get(key)]
        if shown:
            parts.append(f"{name} {' '.join(shown)}")
    return ", ".join(parts)


def job_state(obj: dict[str, Any]) -> tuple[str, str]:
    """(ftcluster state, message) from a PyTorchJob's or TrainJob's conditions and replica statuses.

    Kubeflow v1 writes Created, Running, Restarting, Succeeded, Failed, Suspended; Trainer v2
    writes Created, Suspended, Complete, Failed. A suspended job with a Kueue queue label is
    waiting for Kueue to admit it.
    """
    status = obj.get("status") or {}
    conditions = status.get("conditions") or []
    replicas = _replicas(status)
    done = _true(conditions, "Succeeded") or _true(conditions, "Complete")
    if done:
        return "SUCCEEDED", replicas
    failed = _true(conditions, "Failed")
    if failed:
        return "FAILED", failed.get("message") or failed.get("reason") or "failed"
    spec = obj.get("spec") or {}
    suspended = _true(conditions, "Suspended") or (spec.get("runPolicy") or {}).get("suspend") or spec.get("suspend")
    if suspended:
        queue = ((obj.get("metadata") or {}).get("labels") or {}).get(QUEUE_LABEL)
        return "PENDING", (f"queued by Kueue (LocalQueue {queue}): suspended until admitted" if queue else "suspended")
    restarting = _true(conditions, "Restarting")
    if restarting:
        return "RUNNING", f"restarting: {restarting.get('message') or restarting.get('reason', '')}".rstrip(": ")
    if _true(conditions, "Running"):
        return "RUNNING", replicas
    if _true(conditions, "Created"):
        return "PENDING", f"created; pods starting{': ' + replicas if replicas else ''}"
    return "PENDING", "submitted; no controller has reported on it yet (is the operator running?)"
