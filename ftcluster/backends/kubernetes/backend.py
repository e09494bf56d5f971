"""The kubernetes backend: PyTorchJob (Training Operator v1) and TrainJob (Trainer v2) through the
official client.

``submit`` creates exactly the object ``ftcluster render`` writes (the same bytes a GitOps
repository would hold: one self-contained object per job, the payload inside its pod template),
always with ``fieldValidation=Strict`` so a field the cluster's CRD does not know is an error
rather than silently dropped. ``status`` maps the job's conditions, ``logs`` reads the pod of a
rank (core/v1), ``cancel`` deletes the job with foreground propagation, ``list`` finds
ftcluster's jobs by label. Every call it makes is one the least-privilege Role in
``manifests/team/`` grants (tests/e2e/test_k8s_backend.py checks both ways).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ...errors import BackendError
from ..base import (
    Backend,
    RunStatus,
    SubmitRequest,
    list_runs,
    load_status,
    new_run_id,
    save_status,
    write_atomic,
)
from .client import KINDS, MANAGED_BY, TIMEOUT, Connection, Kind, api_error, connect, job_state

if TYPE_CHECKING:
    from urllib3 import BaseHTTPResponse

# The client declares a custom object (and a watch event) as ``object``/``str`` (response_type="object"):
# it is the decoded JSON, a dict. These aliases name that for the casts below.
Obj = dict[str, Any]

RECORD = "kubernetes.json"  # beside status.json: cluster, context, namespace, kind, name, UID
# Pod labels the operators set: the pod of node rank N.
POD_SELECTOR = {
    "PyTorchJob": lambda name, rank: (f"training.kubeflow.org/job-name={name},training.kubeflow.org/replica-type="
                                      f"{'master' if rank == 0 else 'worker'},training.kubeflow.org/replica-index="
                                      f"{0 if rank == 0 else rank - 1}"),
    "TrainJob": lambda name, rank: f"jobset.sigs.k8s.io/jobset-name={name},batch.kubernetes.io/job-completion-index={rank}",
}


class KubernetesBackend(Backend):
    """Submit and manage PyTorchJobs and TrainJobs on a Kubernetes cluster.

    ``context`` picks a kubeconfig context (default: the current one; in a pod, the service
    account); ``namespace`` is where ``list`` looks (default: the context's). ``connector``
    replaces :func:`~.kube_api.connect` (tests point core/v1 at a stand-in with it).
    """

    name = "kubernetes"

    def __init__(self, root: Path | None = None, context: str | None = None, namespace: str | None = None,
                 connector: Callable[[str | None], Connection] | None = None, poll: float = 2.0):
        super().__init__(root)
        self.context = context
        self.namespace = namespace
        self._connector = connector or (lambda ctx: connect(ctx))
        self._conns: dict[str | None, Connection] = {}
        self.poll = poll

    def _conn(self, context: str | None = None) -> Connection:
        context = context or self.context
        if context not in self._conns:
            self._conns[context] = self._connector(context)
        return self._conns[context]

    def connect(self) -> Connection:
        """The connection (kubeconfig and context loaded; nothing sent): BackendError when there is none."""
        return self._conn()

    # -- submit -----------------------------------------------------------------
    def submit_dryrun(self, plan: Any, run_id: str | None = None) -> SubmitRequest:
        """The rendered job and the equivalent kubectl command; contacts nothing."""
        from ...render import default_target, render_plan

        spec = plan.spec

        if spec.backend != self.name:  # rendered for its own backend, it would not hold the Kubernetes job
            raise BackendError(f"{spec._source_file or '<spec>'}: backend {spec.backend}: the kubernetes backend submits "
                               "a spec loaded for it; load it with the override backend=kubernetes (--backend "
                               "kubernetes, ftcluster.api.with_backend(spec, 'kubernetes'))")
        if spec.variants:
            raise BackendError(f"{spec._source_file or '<spec>'}: variants: the kubernetes backend submits one job at a "
                               "time; render them (ftcluster render --target ... -o DIR) and apply the folder, or "
                               "submit each with --set")
        kind = KINDS[spec.kubernetes.kind]
        files = render_plan(plan, default_target(spec))
        job_file = f"{spec.name}.yaml"
        run_id = run_id or new_run_id(spec.name)
        argv = ["kubectl", "create", "--validate=strict", "-f", job_file]
        if self.context:
            argv[1:1] = ["--context", self.context]
        meta = {"name": spec.name, "kind": kind.kind, "namespace": spec.kubernetes.namespace, "job_file": job_file,
                "spec_hash": plan.hash, "output_uri": plan.output_uri, "queue": spec.kubernetes.queue}
        run_dir = self.new_run_dir(spec, run_id)
        # Only the job is created: the ClusterTrainingRuntime a TrainJob file set includes is cluster-scoped and
        # platform-owned (manifests/base), applied once by someone allowed to.
        return SubmitRequest("kubernetes", run_id, run_dir, argv, {job_file: files[job_file]}, {}, None, meta)

    def prepare_dryrun(self, pp: Any, run_id: str | None = None) -> SubmitRequest:
        """``ftcluster prepare-data --submit``: the batch/v1 indexed Job and the equivalent kubectl command;
        contacts nothing."""
        from ...render import render_prepare

        spec = pp.spec
        files = render_prepare(pp, "pytorchjob")  # any Kubernetes target: the prepare job is a batch/v1 Job
        (job_file, _), = files.items()
        argv = ["kubectl", "create", "--validate=strict", "-f", job_file]
        if self.context:
            argv[1:1] = ["--context", self.context]
        meta = {"name": pp.name, "kind": "Job", "namespace": spec.kubernetes.namespace, "job_file": job_file,
                "spec_hash": pp.hash, "output_uri": spec.data.train, "queue": spec.kubernetes.queue}
        run_id = run_id or new_run_id(pp.name)
        return SubmitRequest("kubernetes", run_id, self.new_run_dir(spec, run_id), argv, files, {}, None, meta)

    def schedule_prepare(self, req: SubmitRequest) -> RunStatus:
        """Create the prepare Job (batch/v1, field validation Strict). No run folder: ``ftcluster status``
        follows Kubeflow jobs only; follow it with ``kubectl get job`` (the status's message says how).
        Needs ``create`` on ``batch/jobs`` (granted by the Role in manifests/team). A built-in API, so
        through ``conn.core`` (the same client as ``conn.api`` outside tests)."""
        from kubernetes import client

        conn, ns, name = self._conn(), req.meta["namespace"], req.meta["name"]
        try:
            client.BatchV1Api(conn.core).create_namespaced_job(ns, cast(Any, self._body(req)), field_validation="Strict",
                                                              field_manager="ftcluster", _request_timeout=TIMEOUT)
        except Exception as exc:
            raise api_error(exc, conn, "create", resource="jobs.batch", namespace=ns, name=name) from None
        return RunStatus(req.run_id, "kubernetes", name, "PENDING", "", job_id=f"{ns}/{name}",
                         submitted_at=time.time(), spec_hash=req.meta["spec_hash"], output_uri=req.meta["output_uri"],
                         message=f"follow it: kubectl -n {ns} get job {name}; kubectl -n {ns} logs -f job/{name}")

    def _body(self, req: SubmitRequest) -> dict[str, Any]:
        """The object in the job file, parsed from the very text a GitOps user would commit."""
        from ruamel.yaml import YAML

        docs = [d for d in YAML(typ="safe", pure=True).load_all(req.files[req.meta["job_file"]]) if d]
        (body,) = docs
        return body

    def _create(self, req: SubmitRequest, dry_run: bool) -> dict[str, Any]:
        kind, ns, conn = KINDS[req.meta["kind"]], req.meta["namespace"], self._conn()
        try:
            return cast(Obj, conn.custom().create_namespaced_custom_object(
                kind.group, kind.version, ns, kind.plural, self._body(req), field_validation="Strict",
                field_manager="ftcluster", dry_run="All" if dry_run else None, _request_timeout=TIMEOUT))
        except Exception as exc:
            raise api_error(exc, conn, "create", kind, namespace=ns, name=req.meta["name"]) from None

    def server_dry_run(self, req: SubmitRequest) -> str:
        """Send the job with ``dryRun=All``: the API server validates and admits it (schema, CEL,
        webhooks, strict fields) and stores nothing. Returns a one-line summary."""
        self._create(req, dry_run=True)
        conn = self._conn()
        return (f"server dry run: {conn.server} (context {conn.context}) accepts {req.meta['kind']} "
                f"{req.meta['namespace']}/{req.meta['name']}; nothing was stored")

    def schedule(self, req: SubmitRequest) -> RunStatus:
        """Create the job; the run folder only stays when the API server accepted it."""
        self._conn()  # no kubeconfig / bad context: fail before anything is written
        with self.creating_run_folder(req):  # removed again if the API server refuses the job
            created = self._create(req, dry_run=False)
        conn, meta = self._conn(), created.get("metadata", {})
        record = {"server": conn.server, "context": conn.context, "namespace": req.meta["namespace"],
                  "kind": req.meta["kind"], "name": req.meta["name"], "uid": meta.get("uid"),
                  "queue": req.meta["queue"]}
        write_atomic(req.run_dir / RECORD, json.dumps(record, indent=1, sort_keys=True))
        st = RunStatus(req.run_id, "kubernetes", req.meta["name"], "PENDING", str(req.run_dir),
                       job_id=f"{req.meta['namespace']}/{req.meta['name']}", submitted_at=time.time(),
                       spec_hash=req.meta["spec_hash"], output_uri=req.meta["output_uri"])
        save_status(req.run_dir, st)
        return st

    # -- query ------------------------------------------------------------------
    def _run(self, run_ref: str) -> tuple[Path, RunStatus, dict[str, Any]]:
        run_dir = self.run_folder(run_ref)
        st = load_status(run_dir)
        try:
            record = json.loads((run_dir / RECORD).read_text())
        except (OSError, ValueError):
            raise BackendError(f"{run_dir}: no {RECORD}; not a kubernetes run, or its folder is damaged") from None
        return run_dir, st, record

    def _get(self, record: dict[str, Any]) -> dict[str, Any] | None:
        """The job object, or None when it is gone (or replaced by another of the same name)."""
        from kubernetes.client.exceptions import ApiException

        kind, conn = KINDS[record["kind"]], self._conn(record.get("context"))
        try:
            obj = cast(Obj, conn.custom().get_namespaced_custom_object(
                kind.group, kind.version, record["namespace"], kind.plural, record["name"], _request_timeout=TIMEOUT))
        except ApiException as exc:
            if exc.status == 404 and "namespaces" not in (exc.body or ""):
                return None
            raise api_error(exc, conn, "get", kind, namespace=record["namespace"], name=record["name"]) from None
        except Exception as exc:
            raise api_error(exc, conn, "get", kind, namespace=record["namespace"], name=record["name"]) from None
        if record.get("uid") and obj.get("metadata", {}).get("uid") != record["uid"]:
            return None
        return obj

    def _refresh(self, run_dir: Path, st: RunStatus, obj: dict[str, Any] | None) -> RunStatus:
        if obj is None:
            if not st.terminal:
                st.state, st.message = "UNKNOWN", "the job is no longer on the cluster (deleted by someone else or its TTL)"
        else:
            st.state, st.message = job_state(obj)
            if st.terminal and not st.ended_at:
                st.ended_at = time.time()
        save_status(run_dir, st)
        return st

    def status(self, run_ref: str) -> RunStatus:
        run_dir, st, record = self._run(run_ref)
        if st.terminal:
            return st
        return self._refresh(run_dir, st, self._get(record))

    def wait(self, run_ref: str, timeout: float | None = None, poll: float = 1.0) -> RunStatus:
        """Block until the job ends, following it with a watch (not polling, so ``poll`` is unused): each
        event the API server sends updates the run folder; a deleted job ends the wait (UNKNOWN).
        Returns the final status (or the last one at ``timeout``)."""
        from kubernetes import watch

        run_dir, st, record = self._run(run_ref)
        kind, conn = KINDS[record["kind"]], self._conn(record.get("context"))
        deadline = None if timeout is None else time.monotonic() + timeout
        st = self._refresh(run_dir, st, self._get(record)) if not st.terminal else st
        while not st.terminal and st.state != "UNKNOWN":
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return st
            w = watch.Watch()
            try:
                events = w.stream(conn.custom().list_namespaced_custom_object, kind.group, kind.version,
                                  record["namespace"], kind.plural, field_selector=f"metadata.name={record['name']}",
                                  timeout_seconds=int(min(left or 300, 300)) or 1)
                for event in cast("Iterator[Obj]", events):  # {"type", "object": the job as JSON, "raw_object"}
                    obj = cast(Obj, event["object"])
                    st = self._refresh(run_dir, st, None if event["type"] == "DELETED" else obj)
                    if st.terminal or st.state == "UNKNOWN":
                        break
            except Exception as exc:
                raise api_error(exc, conn, "watch", kind, namespace=record["namespace"]) from None
            finally:
                w.stop()
        return st

    def logs(self, run_ref: str, follow: bool = False, rank: int = 0) -> Iterator[str]:
        """The log of node rank ``rank``'s pod (0: the master); ``follow`` streams it until the pod
        ends, waiting for the pod to start first."""
        run_dir, st, record = self._run(run_ref)
        kind, conn = KINDS[record["kind"]], self._conn(record.get("context"))
        while True:
            pod = self._pod(conn, kind, record, rank)
            phase = (pod or {}).get("phase")
            if pod and phase != "Pending":
                yield from self._pod_log(conn, kind, record, pod["name"], follow)
                return
            if not follow or self.status(str(run_dir)).terminal:
                if not pod:
                    yield f"(no pod for rank {rank} of {record['kind']} {record['name']} yet: {st.message or st.state})\n"
                return
            time.sleep(self.poll)

    def _pod(self, conn: Connection, kind: Kind, record: dict[str, Any], rank: int) -> dict[str, Any] | None:
        """The newest pod of ``rank`` (a restarted job has several over time), as {name, phase}."""
        selector = POD_SELECTOR[kind.kind](record["name"], rank)
        try:
            pods = conn.core_v1().list_namespaced_pod(record["namespace"], label_selector=selector,
                                                      _request_timeout=TIMEOUT)
        except Exception as exc:
            raise api_error(exc, conn, "list", resource="pods", namespace=record["namespace"]) from None
        # (created, name, pod); a pod the API server returns always has metadata (the model makes it optional)
        items = sorted(((p.metadata.creation_timestamp or 0, p.metadata.name, p) for p in pods.items or [] if p.metadata),
                       key=lambda t: t[:2])
        if not items:
            return None
        _, name, newest = items[-1]
        return {"name": name, "phase": newest.status.phase if newest.status else None}

    def _pod_log(self, conn: Connection, kind: Kind, record: dict[str, Any], pod: str, follow: bool) -> Iterator[str]:
        try:
            # _preload_content=False: the raw urllib3 response, to stream (the client declares str, the preloaded text)
            resp = cast("BaseHTTPResponse", conn.core_v1().read_namespaced_pod_log(
                pod, record["namespace"], container=kind.container, follow=follow, _preload_content=False,
                _request_timeout=None if follow else TIMEOUT))
        except Exception as exc:
            raise api_error(exc, conn, "get", resource="pods/log", namespace=record["namespace"], name=pod) from None
        pending = b""
        try:
            for chunk in resp.stream(4096):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line.decode("utf-8", "replace") + "\n"
            if pending:
                yield pending.decode("utf-8", "replace")
        finally:
            resp.release_conn()

    def cancel(self, run_ref: str) -> RunStatus:
        """Delete the job with foreground propagation: its pods (and a TrainJob's JobSet) go first, so
        nothing it brought outlives it. Pods get SIGTERM and the grace period to checkpoint. The run
        folder records CANCELLED; the status returned is the one the job had when asked."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        run_dir, st, record = self._run(run_ref)
        if st.terminal:
            return st
        kind, conn = KINDS[record["kind"]], self._conn(record.get("context"))
        # preconditions: never delete a newer job that reuses the name
        body = client.V1DeleteOptions(propagation_policy="Foreground",
                                      preconditions=client.V1Preconditions(uid=record["uid"]) if record.get("uid") else None)
        try:
            conn.custom().delete_namespaced_custom_object(kind.group, kind.version, record["namespace"], kind.plural,
                                                          record["name"], body=body, _request_timeout=TIMEOUT)
        except ApiException as exc:
            if exc.status not in (404, 409):  # already gone / replaced: nothing of ours to delete
                raise api_error(exc, conn, "delete", kind, namespace=record["namespace"], name=record["name"]) from None
        except Exception as exc:
            raise api_error(exc, conn, "delete", kind, namespace=record["namespace"], name=record["name"]) from None
        requested = RunStatus(**{**st.to_dict(), "message": "deletion requested (foreground propagation)"})
        st.state, st.message, st.ended_at = "CANCELLED", "deleted (foreground propagation)", time.time()
        save_status(run_dir, st)
        return requested  # as the other backends: the state when the cancel was asked for

    def list(self) -> list[RunStatus]:
        """ftcluster's jobs in the namespace (label app.kubernetes.io/managed-by=ftcluster), each matched
        to its run folder by UID when this machine submitted it."""
        conn = self._conn()
        namespace = self.namespace or conn.namespace
        by_uid = {}
        for d in list_runs(self.root):
            try:
                by_uid[json.loads((d / RECORD).read_text()).get("uid")] = d
            except (OSError, ValueError):
                continue
        out = []
        for kind in KINDS.values():
            for obj in self._list_kind(conn, kind, namespace):
                meta = obj.get("metadata", {})
                state, message = job_state(obj)
                run_dir = by_uid.get(meta.get("uid"))
                out.append(RunStatus(run_dir.name if run_dir else f"{kind.kind.lower()}/{meta['name']}", "kubernetes",
                                     meta["name"], state, str(run_dir or ""), job_id=f"{namespace}/{meta['name']}",
                                     message=message,
                                     spec_hash=(meta.get("labels") or {}).get("ftcluster.dev/spec-hash", "")))
        return sorted(out, key=lambda r: r.run_id)

    def _list_kind(self, conn: Connection, kind: Kind, namespace: str) -> list[dict[str, Any]]:
        from kubernetes.client.exceptions import ApiException

        try:
            found = cast(Obj, conn.custom().list_namespaced_custom_object(
                kind.group, kind.version, namespace, kind.plural, label_selector=MANAGED_BY, _request_timeout=TIMEOUT))
            return found.get("items", [])
        except ApiException as exc:
            if exc.status == 404:  # this cluster does not serve the kind: no such jobs
                return []
            raise api_error(exc, conn, "list", kind, namespace=namespace) from None
        except Exception as exc:
            raise api_error(exc, conn, "list", kind, namespace=namespace) from None

    # -- doctor -----------------------------------------------------------------
    def preflight(self, spec: Any, remote: bool = False) -> list[Any]:
        """Checks for ``ftcluster doctor``: see :mod:`.kube_doctor`."""
        from .preflight import preflight

        return preflight(self, spec)

