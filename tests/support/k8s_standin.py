"""A loopback stand-in for the few Kubernetes API endpoints the CRD-only test server lacks.

The real API server in CI (.ci/k8s-up.sh: apiextensions-apiserver + etcd) serves custom resources
exactly as a cluster does, but not core/v1 or authorization.k8s.io. The kubernetes backend needs
three such endpoints, and this server speaks only those, in the wire format kube-apiserver uses:

- ``GET /api/v1/namespaces/NS/pods?labelSelector=k=v,...``: a PodList (equality selectors);
- ``GET /api/v1/namespaces/NS/pods/NAME/log?container=C[&follow=true]``: the log text, streamed
  until the test marks the pod finished when following;
- ``POST /apis/authorization.k8s.io/v1/selfsubjectaccessreviews``: allowed or not by the rules of a
  Role (the one in manifests/team/role.yaml unless a test gives others);
- ``POST /apis/batch/v1/namespaces/NS/jobs``: the prepare-data Job, created as sent (recorded in ``jobs`` with
  its query), since the CRD-only server has no batch/v1.

``canned`` answers chosen requests with a fixed status and kube-apiserver's own Status body, so
the forbidden / unknown-namespace error paths can be tested. Nothing else is served (404).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse


@dataclass
class Pod:
    namespace: str
    name: str
    labels: dict[str, str]
    phase: str = "Running"
    container: str = "pytorch"
    log: list[str] = field(default_factory=list)
    created: str = "2026-11-30T12:00:00Z"
    done: threading.Event = field(default_factory=threading.Event)


def status_body(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """A metav1.Status as kube-apiserver writes it."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "details": details or {}, "code": code}


def rule_allows(rules: list[dict[str, Any]], group: str, resource: str, verb: str) -> bool:
    for r in rules:
        if (group in r.get("apiGroups", []) and resource in r.get("resources", [])
                and (verb in r.get("verbs", []) or "*" in r.get("verbs", []))):
            return True
    return False


class StandIn:
    def __init__(self, rules: list[dict[str, Any]]):
        self.rules = rules
        self.pods: list[Pod] = []
        self.canned: dict[tuple[str, str], tuple[int, dict[str, Any]]] = {}
        self.reviews: list[dict[str, Any]] = []
        self.jobs: list[tuple[dict[str, str], dict[str, Any]]] = []  # (query, body) of each Job created
        handler = type("Handler", (_Handler,), {"standin": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        for p in self.pods:
            p.done.set()
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    standin: StandIn

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, code: int, body: Any, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _canned(self, method: str, path: str) -> bool:
        hit = self.standin.canned.get((method, path))
        if hit:
            self._send(hit[0], hit[1])
        return bool(hit)

    def do_GET(self) -> None:  # noqa: N802
        url = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        parts = url.path.strip("/").split("/")
        if self._canned("GET", url.path):
            return
        if parts[:3] == ["api", "v1", "namespaces"] and len(parts) == 5 and parts[4] == "pods":
            return self._pods(parts[3], query.get("labelSelector", ""))
        if parts[:3] == ["api", "v1", "namespaces"] and len(parts) == 7 and parts[4] == "pods" and parts[6] == "log":
            return self._log(parts[3], parts[5], query)
        self._send(404, status_body(404, "NotFound", "the server could not find the requested resource"))

    def do_POST(self) -> None:  # noqa: N802
        url = urlparse(self.path)
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self._canned("POST", url.path):
            return
        if url.path == "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews":
            attrs = body["spec"]["resourceAttributes"]
            resource = attrs["resource"] + (f"/{attrs['subresource']}" if attrs.get("subresource") else "")
            allowed = rule_allows(self.standin.rules, attrs.get("group", ""), resource, attrs["verb"])
            self.standin.reviews.append(attrs)
            return self._send(201, {**body, "status": {"allowed": allowed}})
        parts = url.path.strip("/").split("/")
        if parts[:4] == ["apis", "batch", "v1", "namespaces"] and len(parts) == 6 and parts[5] == "jobs":
            self.standin.jobs.append(({k: v[-1] for k, v in parse_qs(url.query).items()}, body))
            return self._send(201, {**body, "metadata": {**body.get("metadata", {}), "uid": "job-uid"}})
        self._send(404, status_body(404, "NotFound", "the server could not find the requested resource"))

    def _pods(self, ns: str, selector: str) -> None:
        want = dict(kv.split("=", 1) for kv in selector.split(",") if kv)
        items = [{"metadata": {"name": p.name, "namespace": ns, "labels": p.labels, "creationTimestamp": p.created},
                  "spec": {"containers": [{"name": p.container, "image": "x"}]}, "status": {"phase": p.phase}}
                 for p in self.standin.pods if p.namespace == ns and all(p.labels.get(k) == v for k, v in want.items())]
        self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})

    def _log(self, ns: str, name: str, query: dict[str, str]) -> None:
        pod = next((p for p in self.standin.pods if p.namespace == ns and p.name == name), None)
        if pod is None:
            return self._send(404, status_body(404, "NotFound", f'pods "{name}" not found', {"name": name, "kind": "pods"}))
        if query.get("container") != pod.container:
            return self._send(400, status_body(400, "BadRequest", f"container {query.get('container')} is not valid "
                                                                   f"for pod {name}"))
        if query.get("follow") != "true":
            return self._send(200, "".join(pod.log).encode(), "text/plain")
        # Following: stream what there is, then what the test appends, until it marks the pod done.
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        sent = 0
        while True:
            finished = pod.done.is_set()
            while sent < len(pod.log):
                self.wfile.write(pod.log[sent].encode())
                self.wfile.flush()
                sent += 1
            if finished:
                break
            time.sleep(0.05)
        self.close_connection = True
