"""`ftcluster doctor` for the kubernetes backend: the cluster answers, serves the job's CRD, lets
this identity do what ftcluster does (SelfSubjectAccessReview per verb), Kueue has the queue the
job names, and the image's pull secret is named. Reads nothing secret: it never gets a Secret."""

from __future__ import annotations

from typing import Any

from ...errors import FtclusterError
from ...preflight.checks import Check, failed
from .client import KINDS, KUEUE, PERMISSIONS, TIMEOUT, Connection, api_error, crd_missing


def preflight(backend: Any, spec: Any) -> list[Check]:
    """Every check for ``spec`` on the backend's cluster; a cluster that cannot be reached stops the rest."""
    try:
        conn = backend._conn()
    except FtclusterError as err:
        return [failed("kube context", err)]
    checks = [Check("kube context", "ok", f"context {conn.context}, server {conn.server}")]
    reach = _reachable(conn)
    checks.append(reach)
    if reach.status == "fail":
        return checks
    ns = spec.kubernetes.namespace
    checks += [_crd(conn, spec), _permissions(conn, spec, ns), _kueue(conn, spec, ns), _pull_secret(spec)]
    return checks


def _api_groups(conn: Connection) -> dict[str, list[str]]:
    """{group: served versions} from discovery (``GET /apis``, open to every authenticated user).

    Requested by hand: the generated ApisApi asks for ``/apis/``, which kube-apiserver serves but
    the CRD-only test server does not, and this path is the canonical one."""
    import json

    method, url, headers, body, _ = conn.api.param_serialize("GET", "/apis", header_params={"Accept": "application/json"},
                                                             auth_settings=["BearerToken"])
    resp = conn.api.call_api(method, url, header_params=headers, body=body, _request_timeout=TIMEOUT)
    resp.read()
    if resp.status != 200:
        from kubernetes.client.exceptions import ApiException

        raise ApiException(status=resp.status, reason=resp.reason, body=resp.data.decode("utf-8", "replace"))
    groups = json.loads(resp.data).get("groups") or []
    return {g["name"]: [v["version"] for v in g.get("versions", [])] for g in groups}


def _reachable(conn: Connection) -> Check:
    try:
        groups = _api_groups(conn)
    except Exception as exc:
        return failed("API server", api_error(exc, conn, "get", resource="/apis"))
    return Check("API server", "ok", f"answers ({len(groups)} API groups)")


def _served(conn: Connection, group: str, version: str) -> set[str] | None:
    """Resource names served at group/version (discovery, open to every authenticated user), or None."""
    from kubernetes.client.exceptions import ApiException

    try:
        found = conn.custom().get_api_resources(group, version, _request_timeout=TIMEOUT)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return {r.name for r in found.resources or []}


def _group_versions(conn: Connection, group: str) -> list[str]:
    return _api_groups(conn).get(group, [])


def _crd(conn: Connection, spec: Any) -> Check:
    kind = KINDS[spec.kubernetes.kind]
    try:
        served = _served(conn, kind.group, kind.version)
        versions = _group_versions(conn, kind.group)
        if kind.kind == "TrainJob" and served is not None and "clustertrainingruntimes" not in served:
            served = None
    except Exception as exc:
        return failed("CRDs", api_error(exc, conn, "get", resource="/apis"))
    if served is None or kind.plural not in served:
        return failed("CRDs", crd_missing(kind, conn))
    return Check("CRDs", "ok", f"{kind.kind} served ({kind.group} versions {', '.join(versions) or kind.version})")


def _needed(spec: Any) -> list[tuple[str, str, str]]:
    """(verb, group, resource) ftcluster uses for this spec's kind."""
    kind = KINDS[spec.kubernetes.kind]
    out = []
    for (group, resource), verbs in sorted(PERMISSIONS.items()):
        if group in ("kubeflow.org", "trainer.kubeflow.org") and resource != kind.plural:
            continue
        if group == KUEUE[0] and not spec.kubernetes.queue:
            continue
        out += [(verb, group, resource) for verb in verbs]
    return out


def _permissions(conn: Connection, spec: Any, ns: str) -> Check:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api = client.AuthorizationV1Api(conn.core)
    denied = []
    for verb, group, resource in _needed(spec):
        plural, _, sub = resource.partition("/")
        review = client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(
            resource_attributes=client.V1ResourceAttributes(namespace=ns, verb=verb, group=group, resource=plural,
                                                            subresource=sub or None)))
        try:
            answer = api.create_self_subject_access_review(review, _request_timeout=TIMEOUT)
        except ApiException as exc:
            if exc.status in (404, 500):  # an API server without authorization.k8s.io (e.g. a CRD-only test server)
                return Check("permissions", "skip", "the API server cannot review access (no authorization.k8s.io)")
            return failed("permissions", api_error(exc, conn, "create", resource="selfsubjectaccessreviews"))
        except Exception as exc:
            return failed("permissions", api_error(exc, conn, "create", resource="selfsubjectaccessreviews"))
        if not (answer.status and answer.status.allowed):  # the server always fills status; none: not allowed
            denied.append(f"{verb} {resource}{'.' + group if group else ''}")
    if denied:
        return Check("permissions", "fail", f"not allowed in namespace {ns}: {', '.join(denied)}",
                     "bind the Role in manifests/team/ to this identity (or ask the cluster admin)")
    return Check("permissions", "ok", f"{len(_needed(spec))} verbs allowed in namespace {ns}")


def _kueue(conn: Connection, spec: Any, ns: str) -> Check:
    from kubernetes.client.exceptions import ApiException

    queue = spec.kubernetes.queue
    group, version, plural = KUEUE
    try:
        served = _served(conn, group, version)
    except Exception as exc:
        return failed("Kueue", api_error(exc, conn, "get", resource="/apis"))
    if not queue:
        return Check("Kueue", "skip", f"no kubernetes.queue{' (Kueue is installed)' if served else ''}")
    if served is None or plural not in served:
        return Check("Kueue", "warn", f"kubernetes.queue is {queue!r} but Kueue ({group}/{version}) is not installed: "
                     "the label does nothing and the job starts unqueued", "install Kueue, or drop kubernetes.queue")
    try:
        conn.custom().get_namespaced_custom_object(group, version, ns, plural, queue, _request_timeout=TIMEOUT)
    except ApiException as exc:
        if exc.status == 404:
            return Check("Kueue", "warn", f"no LocalQueue {queue!r} in namespace {ns}: Kueue keeps the job suspended "
                         "for ever", "create it (manifests/kueue/team/) or fix kubernetes.queue")
        return failed("Kueue", api_error(exc, conn, "get", resource="localqueues.kueue.x-k8s.io", namespace=ns))
    except Exception as exc:
        return failed("Kueue", api_error(exc, conn, "get", resource="localqueues.kueue.x-k8s.io", namespace=ns))
    return Check("Kueue", "ok", f"LocalQueue {queue} exists in {ns}")


def _pull_secret(spec: Any) -> Check:
    k = spec.kubernetes
    if k.image_pull_secrets:
        return Check("image pull secret", "ok", f"{k.image} pulled with {', '.join(k.image_pull_secrets)}")
    return Check("image pull secret", "warn", f"no kubernetes.image_pull_secrets for {k.image}",
                 "fine for a public image or node-level registry credentials; a private registry needs one")
