"""Kubernetes renderers: Kubeflow PyTorchJob (``kubeflow.org/v1``) and Trainer v2 TrainJob
(``trainer.kubeflow.org/v1alpha1``) plus ftcluster's ClusterTrainingRuntime.

Objects are built as plain data and dumped with ruamel.yaml (apiVersion, kind, metadata, name
first, every other key sorted; no timestamps). One file per job, ``<name>.yaml``, holds
one self-contained object: the resolved spec and DeepSpeed config travel in the pod template as
the ``FTCLUSTER_PAYLOAD`` environment variable (as in the Slurm script), not in a separate
ConfigMap, so creating the job is atomic, a GitOps repository has no ordering between objects,
and deleting the job removes everything it brought. The TrainJob target adds the shared runtime
as its own file. Every file starts with the ``# header`` lines and each object with ``---``, so
files concatenate into one applyable stream. Field-by-field mapping and the reasons behind each choice:
docs/kubernetes.md. Checked in tests against the vendored CRD schemas (tests/schemas/).
"""

from __future__ import annotations

from typing import Any

from ..errors import RenderError
from ..plan.launch import LaunchPlan
from ..spec.envbuild import PAYLOAD_LIMIT, PAYLOAD_VAR
from ..spec.kubenames import (
    GRACE_SECONDS,
    HASH_LABEL,
    K8S_ENV,
    PYTORCHJOB_ONLY,
    QUEUE_LABEL,
    RESERVED_ENV,
    RESERVED_MOUNTS,
    RUNTIME_MAX_RESTARTS,
    SECRET_ENV_DIR,
    SHM_PATH,
    SHM_VOLUME,
    secret_volume_name,
)

DEFAULT_RUNTIME = "ftcluster-torch"
PATCH_MANAGER = "ftcluster.dev/render"
# The Job failure message of the runtime's pod failure policy rule for exit 1 (Kubernetes' job
# controller: "Container node for pod NS/NAME failed with exit code 1 matching FailJob rule at index 1").
USER_ERROR_MESSAGE = "failed with exit code 1 matching FailJob rule"
GPU_RESOURCE = "nvidia.com/gpu"


# --------------------------------------------------------------------------- public entry points


def render_pytorchjob(plan: LaunchPlan, header: list[str]) -> dict[str, str]:
    """``<name>.yaml``: the PyTorchJob, payload included."""
    _require_image(plan.spec)
    _require_fixed_nodes(plan.spec)
    return {f"{plan.name}.yaml": dump_yaml([pytorchjob(plan)], header)}


def render_trainjob(plan: LaunchPlan, header: list[str]) -> dict[str, str]:
    """``ftcluster-torch.clustertrainingruntime.yaml`` and ``<name>.yaml`` (the TrainJob, payload
    included).

    The runtime is cluster-scoped and the same for every job, so it gets its own file (GitOps
    repositories keep it in one platform-owned place); it is rendered only when the spec uses
    ftcluster's runtime, never for a runtime someone else owns. Fields a TrainJob cannot carry
    are an error, or a header note when a PyTorchJob spec is rendered as a TrainJob on purpose.
    """
    _require_image(plan.spec)
    _require_fixed_nodes(plan.spec)
    notes = _trainjob_gaps(plan.spec)
    files = {}
    runtime = plan.spec.kubernetes.runtime
    if runtime == DEFAULT_RUNTIME:  # first: the Trainer webhook rejects a TrainJob whose runtime is missing
        files[f"{runtime}.clustertrainingruntime.yaml"] = dump_yaml([cluster_training_runtime(runtime)], header)
    files[f"{plan.name}.yaml"] = dump_yaml([trainjob(plan)], header + notes)
    return files


def render_prepare_job(pp: Any, header: list[str]) -> dict[str, str]:
    """``<name>-prepare.yaml``: the batch/v1 indexed Job of ``ftcluster prepare-data`` (:func:`prepare_job`)."""
    _require_image(pp.spec)
    return {f"{pp.name}.yaml": dump_yaml([prepare_job(pp)], header)}


# --------------------------------------------------------------------------- objects


def prepare_job(pp: Any) -> dict[str, Any]:
    """The prepare Job: ``completionMode: Indexed``, one pod per task (``completions = parallelism = tasks``),
    each running the worker, which takes its task from ``JOB_COMPLETION_INDEX``. Image, env, Secrets,
    volumes, node selector and tolerations are the training job's; resources are one node's CPUs and memory,
    no GPU. Kueue admits it through the same queue label."""
    k = pp.spec.kubernetes
    pod = _pod_spec(pp, command=pp.worker_args("python3", None), resources_of=pp.job)
    pod["containers"][0]["name"] = "prepare"
    pod["restartPolicy"] = "Never"  # a failed index is retried by the Job (backoffLimit), not in place
    spec: dict[str, Any] = {"completionMode": "Indexed", "completions": pp.tasks, "parallelism": pp.tasks,
                            "backoffLimit": 10 if k.backoff_limit is None else k.backoff_limit,
                            "template": {"metadata": _pod_metadata(pp), "spec": pod}}
    if k.ttl_seconds_after_finished is not None:
        spec["ttlSecondsAfterFinished"] = k.ttl_seconds_after_finished
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": _metadata(pp, pp.name, job=True), "spec": spec}


def pytorchjob(plan: LaunchPlan) -> dict[str, Any]:
    """The PyTorchJob: a Master and ``nodes - 1`` Workers, one torchrun per pod."""
    k = plan.spec.kubernetes
    template = {"metadata": _pod_metadata(plan), "spec": _pod_spec(plan)}
    replicas = {"Master": {"replicas": 1, "restartPolicy": k.restart_policy, "template": template}}
    if plan.nnodes > 1:
        replicas["Worker"] = {"replicas": plan.nnodes - 1, "restartPolicy": k.restart_policy, "template": template}
    # restartPolicy ExitCode retries 128-255 (a preemption's 143, an infrastructure fault's 170) and
    # never 1-127 (an error of the code or data); the retries are resources.max_restarts by default.
    backoff = plan.spec.resources.max_restarts if k.backoff_limit is None else k.backoff_limit
    run_policy: dict[str, Any] = {"backoffLimit": backoff, "cleanPodPolicy": "Running"}
    if k.ttl_seconds_after_finished is not None:
        run_policy["ttlSecondsAfterFinished"] = k.ttl_seconds_after_finished
    if plan.spec.resources.time_limit_seconds:
        run_policy["activeDeadlineSeconds"] = plan.spec.resources.time_limit_seconds
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": _metadata(plan, plan.name, job=True),
        "spec": {
            # A string in the CRD; an explicit integer, never `auto` (kubeflow/trainer #1790, #1992).
            "nprocPerNode": str(plan.nproc_per_node),
            "pytorchReplicaSpecs": replicas,
            "runPolicy": run_policy,
        },
    }


def trainjob(plan: LaunchPlan) -> dict[str, Any]:
    """The TrainJob: trainer fields plus a runtime patch for volumes, scheduling and metadata."""
    spec = plan.spec
    k = spec.kubernetes
    pod = _pod_spec(plan, trainjob=True)
    container = pod.pop("containers")[0]
    pod_patch = {key: pod[key] for key in ("imagePullSecrets", "nodeSelector", "serviceAccountName",
                                            "terminationGracePeriodSeconds", "tolerations", "volumes") if key in pod}
    if container["volumeMounts"]:  # the runtime mounts /dev/shm itself; only extra volumes go here
        pod_patch["containers"] = [{"name": "node", "volumeMounts": container["volumeMounts"]}]
    job_spec: dict[str, Any] = {
        "runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime", "name": k.runtime},
        "trainer": {
            "command": container["command"],
            "env": container["env"],
            "image": container["image"],
            "numNodes": plan.nnodes,
            "numProcPerNode": plan.nproc_per_node,
        },
        "runtimePatches": [{
            "manager": PATCH_MANAGER,
            "trainingRuntimeSpec": {"template": {
                "metadata": {"labels": _labels(plan)},
                "spec": {"replicatedJobs": [{
                    "name": "node",
                    "template": {"spec": {"template": {"metadata": _pod_metadata(plan), "spec": pod_patch}}},
                }]},
            }},
        }],
    }
    if "resources" in container:
        job_spec["trainer"]["resourcesPerNode"] = container["resources"]
    if spec.resources.time_limit_seconds:
        job_spec["activeDeadlineSeconds"] = spec.resources.time_limit_seconds
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": _metadata(plan, plan.name, job=True),
        "spec": job_spec,
    }


def cluster_training_runtime(name: str = DEFAULT_RUNTIME) -> dict[str, Any]:
    """ftcluster's ClusterTrainingRuntime: torch plugin, one JobSet replicated job ``node``
    (container ``node``) with a memory-backed ``/dev/shm``, gang restarts on failure.

    Job-independent on purpose: it is cluster-scoped and shared by every TrainJob. Restarts:
    any failed pod fails its Job (backoffLimit 0) and JobSet recreates every node (at most
    RUNTIME_MAX_RESTARTS times: an infrastructure fault's exit 170, docs/lifecycle.md); a pod that
    exits 1 (an error of the code or data) fails the TrainJob at once (a restart would fail the same
    way); a pod stopped by a disruption (preemption, eviction, drain) fails its Job through the pod
    failure policy, and that restart does not count against maxRestarts.
    """
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "ClusterTrainingRuntime",
        "metadata": {"name": name, "labels": {
            "app.kubernetes.io/managed-by": "ftcluster",
            "app.kubernetes.io/name": name,
            "trainer.kubeflow.org/framework": "torch",
        }},
        "spec": {
            "mlPolicy": {"numNodes": 1, "torch": {}},
            "template": {"spec": {
                "failurePolicy": {
                    "maxRestarts": RUNTIME_MAX_RESTARTS,
                    "restartStrategy": "Recreate",
                    # First match wins: the Job's failure message names the pod failure policy's rule.
                    "rules": [{"name": "userError", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"],
                               "onJobFailureMessagePatterns": [USER_ERROR_MESSAGE]},
                              {"name": "disruptedPod", "action": "RestartJobSetAndIgnoreMaxRestarts",
                               "onJobFailureReasons": ["PodFailurePolicy"]}],
                },
                "replicatedJobs": [{
                    "name": "node",
                    "replicas": 1,
                    "template": {
                        "metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                        "spec": {
                            "backoffLimit": 0,
                            "podFailurePolicy": {"rules": [
                                {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget"}]},
                                {"action": "FailJob", "onExitCodes": {"containerName": "node", "operator": "In",
                                                                      "values": [1]}},
                            ]},
                            "template": {"spec": {
                                "restartPolicy": "Never",
                                "containers": [{"name": "node", "volumeMounts": [
                                    {"name": SHM_VOLUME, "mountPath": SHM_PATH}]}],
                                # No sizeLimit here: a TrainJob sets its own through runtimePatches;
                                # without one the tmpfs is bounded by the pod's memory limit.
                                "volumes": [{"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}}],
                            }},
                        },
                    },
                }],
            }},
        },
    }


# --------------------------------------------------------------------------- pieces


def _require_fixed_nodes(spec: Any) -> None:
    if spec.resources.min_nodes is not None and spec.resources.min_nodes < spec.resources.nodes:
        raise RenderError(
            f"{spec._source_file or '<spec>'}: resources.min_nodes: Kubernetes targets start exactly resources.nodes "
            "pods (the operators gang-schedule them); remove min_nodes, or use the Slurm backend for a job that may "
            "run on fewer nodes")


def _require_image(spec: Any) -> None:
    if not spec.kubernetes.image:
        raise RenderError(
            f"{spec._source_file or '<spec>'}: kubernetes.image: Kubernetes targets need a training image with "
            "ftcluster[train]; set kubernetes.image to a pinned tag in the spec or pass "
            "--set kubernetes.image=REGISTRY/IMAGE:TAG")


def _trainjob_gaps(spec: Any) -> list[str]:
    """Explicitly set ``kubernetes`` fields a TrainJob cannot carry per job.

    A spec whose ``kubernetes.kind`` is TrainJob cannot set them (a spec error); a PyTorchJob spec
    rendered as a TrainJob on purpose gets a note in the file header instead, so the gap is
    visible in review rather than silently dropped.
    """
    k = spec.kubernetes  # with kind: TrainJob these are spec errors (KubernetesSpec), so never set here
    gaps = [f for f in sorted(PYTORCHJOB_ONLY) if f in k.model_fields_set and getattr(k, f) is not None]
    notes = [f"Not expressible in a TrainJob (kubernetes.{f}={getattr(k, f)}): {PYTORCHJOB_ONLY[f]}." for f in gaps]
    if spec.resources.max_restarts != RUNTIME_MAX_RESTARTS:
        notes.append(f"Not expressible in a TrainJob (resources.max_restarts={spec.resources.max_restarts}): the "
                     f"ClusterTrainingRuntime's failurePolicy.maxRestarts ({RUNTIME_MAX_RESTARTS}) applies to every "
                     "TrainJob.")
    return notes


def _labels(plan: Any) -> dict[str, str]:
    """Labels on every object: ftcluster's own, then the user's (which may not replace ours)."""
    ours = {
        "app.kubernetes.io/managed-by": "ftcluster",
        "app.kubernetes.io/name": plan.name,
        HASH_LABEL: plan.hash,
    }
    # The spec rejects invalid keys and values and keys of ours (KubernetesSpec).
    return {**plan.spec.kubernetes.labels, **ours}


def _metadata(plan: Any, name: str, job: bool = False) -> dict[str, Any]:
    k = plan.spec.kubernetes
    labels = _labels(plan)
    meta: dict[str, Any] = {"name": name, "namespace": k.namespace, "labels": labels}
    if job:
        if k.queue:  # a different queue label is a spec error
            # Kueue's webhook suspends the job on creation and resumes it on admission; ftcluster
            # never writes `suspend`, so GitOps tools do not fight Kueue over it.
            labels[QUEUE_LABEL] = k.queue
        if k.annotations:
            meta["annotations"] = dict(k.annotations)
    return meta


def _pod_metadata(plan: Any) -> dict[str, Any]:
    k = plan.spec.kubernetes
    annotations = dict(k.annotations)
    if k.disable_istio_sidecar:
        annotations["sidecar.istio.io/inject"] = "false"  # sidecars break rendezvous (REFERENCE.md)
    meta: dict[str, Any] = {"labels": _labels(plan)}
    if annotations:
        meta["annotations"] = annotations
    return meta


def _payload(plan: Any) -> str:
    """The payload JSON for ``FTCLUSTER_PAYLOAD``, within the size one environment variable may have.

    (The whole object must also stay under etcd's 1.5 MiB request limit; one variable's 128 KiB
    keeps it far below that.)
    """
    text = plan.payload_json()
    if len(text.encode()) > PAYLOAD_LIMIT:
        raise RenderError(f"{plan.spec._source_file or '<spec>'}: the resolved spec is {len(text.encode())} bytes, over "
                          f"the {PAYLOAD_LIMIT}-byte limit for one environment variable ({PAYLOAD_VAR} in the pod "
                          "template); shorten deepspeed.config_file or split the variants into several jobs")
    return text


def _env(plan: Any) -> list[dict[str, Any]]:
    """Plain variables (K8S_ENV < plan env < kubernetes.env), then Secret references, then the
    payload (last: it is long); never a secret value."""
    spec = plan.spec
    k = spec.kubernetes
    plain = {**K8S_ENV, **plan.env, **k.env}
    # The spec rejects these in kubernetes.env, and in env when its backend is kubernetes; this catches
    # the rest (a Slurm spec rendered for Kubernetes, a backend's own variables).
    for name in sorted(plain):
        if name in RESERVED_ENV:
            where = "kubernetes.env" if name in k.env else "env"
            raise RenderError(f"{spec._source_file or '<spec>'}: {where}.{name}: set by the Kubeflow operator "
                              "for torchrun; remove it")
    out: list[dict[str, Any]] = [{"name": n, "value": plain[n]} for n in sorted(plain)]
    seen = set(plain)
    for item in k.secret_env:
        if item.name in seen or item.name in RESERVED_ENV:
            raise RenderError(f"{spec._source_file or '<spec>'}: kubernetes.secret_env: {item.name} is defined "
                              "twice (or reserved); give each variable one source")
        seen.add(item.name)
        out.append({"name": item.name, "valueFrom": {"secretKeyRef": {"name": item.secret, "key": item.key}}})
    out.append({"name": PAYLOAD_VAR, "value": _payload(plan)})
    return out


def k8s_memory(memory: str) -> str:
    """Slurm-style memory (``256G``: binary units; no suffix means MiB) as a Kubernetes quantity."""
    number, unit = memory[:-1], memory[-1]
    if unit.isdigit():
        return f"{memory}Mi"
    return f"{number}{unit}i"


def _resources(spec: Any) -> dict[str, Any]:
    """Requests for CPU, memory and GPUs; limits for memory and GPUs (no CPU limit: CFS
    throttling slows data loading and NCCL progress threads)."""
    r = spec.resources
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if r.cpus_per_node:
        requests["cpu"] = str(r.cpus_per_node)
    if r.memory:
        requests["memory"] = limits["memory"] = k8s_memory(r.memory)
    if r.gpus_per_node:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(r.gpus_per_node)
    out = {}
    if limits:
        out["limits"] = limits
    if requests:
        out["requests"] = requests
    return out


def _volumes_and_mounts(plan: Any, trainjob: bool) -> tuple[list[dict], list[dict]]:
    spec = plan.spec
    k = spec.kubernetes
    volumes: list[dict[str, Any]] = [{"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": k.shm_size}}]
    # In a TrainJob the runtime already mounts dshm at /dev/shm; the patch only sizes the volume.
    mounts: list[dict[str, Any]] = [] if trainjob else [{"name": SHM_VOLUME, "mountPath": SHM_PATH}]
    for v in k.volumes:
        if v.pvc:
            source: dict[str, Any] = {"persistentVolumeClaim": {"claimName": v.pvc}}
        elif v.host_path:
            source = {"hostPath": {"path": v.host_path}}
        else:
            source = {"configMap": {"name": v.config_map}}
        volumes.append({"name": v.name, **source})
        mount = {"name": v.name, "mountPath": v.mount_path}
        if v.read_only:
            mount["readOnly"] = True
        mounts.append(mount)
    if trainjob:
        for secret in k.env_from_secrets:
            name = secret_volume_name(secret)
            volumes.append({"name": name, "secret": {"secretName": secret}})
            mounts.append({"name": name, "mountPath": f"{SECRET_ENV_DIR}/{secret}", "readOnly": True})
    # The spec rejects these clashes; this catches a PyTorchJob spec rendered as a TrainJob (secret volumes).
    _check_unique([v["name"] for v in volumes], "volume name", spec)
    _check_unique([m["mountPath"] for m in mounts] + ([SHM_PATH] if trainjob else []), "mount path", spec)
    return volumes, mounts


def _command(plan: LaunchPlan, trainjob: bool) -> list[str]:
    """podexec (exit 128+signal when stopped; Secret folders as env) around torchrun, which
    takes the rendezvous from the PET_* variables the operator sets."""
    wrapper = ["python3", "-m", "ftcluster.podexec"]
    if trainjob:
        for secret in plan.spec.kubernetes.env_from_secrets:
            wrapper += ["--env-dir", f"{SECRET_ENV_DIR}/{secret}"]
    torchrun = plan.torchrun_args(rdzv_endpoint=None, rdzv_id=None, python="python3",
                                  spec_arg=["--spec-env", PAYLOAD_VAR],
                                  launcher="torch.distributed.run")  # podexec maps signals to 143
    return wrapper + ["--"] + torchrun


def _pod_spec(plan: Any, trainjob: bool = False, command: list[str] | None = None,
              resources_of: Any = None) -> dict[str, Any]:
    """The pod of a job; ``command`` and ``resources_of`` (a spec) replace the training command and requests
    (the prepare Job's)."""
    k = plan.spec.kubernetes
    volumes, mounts = _volumes_and_mounts(plan, trainjob)
    container: dict[str, Any] = {
        "name": "node" if trainjob else "pytorch",  # names the operators require
        "image": k.image,
        "imagePullPolicy": k.image_pull_policy,
        "command": command or _command(plan, trainjob),
        "env": _env(plan),
        "volumeMounts": mounts,
    }
    resources = _resources(resources_of or plan.spec)
    if resources:
        container["resources"] = resources
    if k.env_from_secrets and not trainjob:
        container["envFrom"] = [{"secretRef": {"name": s}} for s in k.env_from_secrets]
    pod: dict[str, Any] = {"containers": [container], "terminationGracePeriodSeconds": GRACE_SECONDS,
                           "volumes": volumes}
    if k.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in k.image_pull_secrets]
    if k.service_account:
        pod["serviceAccountName"] = k.service_account
    if k.priority_class:
        pod["priorityClassName"] = k.priority_class
    if k.node_selector:
        pod["nodeSelector"] = dict(k.node_selector)
    if k.tolerations:
        pod["tolerations"] = [_toleration(t) for t in k.tolerations]
    return pod


def _toleration(t: Any) -> dict[str, Any]:
    out = {"key": t.key, "operator": t.operator, "value": t.value, "effect": t.effect,
           "tolerationSeconds": t.toleration_seconds}
    return {key: value for key, value in out.items() if value is not None}


def _check_unique(items: list[str], what: str, spec: Any) -> None:
    dup = sorted({x for x in items if items.count(x) > 1})
    if dup:
        raise RenderError(f"{spec._source_file or '<spec>'}: kubernetes.volumes: {what} {dup[0]!r} is used twice "
                          f"({RESERVED_MOUNTS}); rename it")


# --------------------------------------------------------------------------- YAML


_FIRST_KEYS = ("apiVersion", "kind", "metadata", "name")


def _key_order(key: str) -> tuple[int, str]:
    return (_FIRST_KEYS.index(key), "") if key in _FIRST_KEYS else (len(_FIRST_KEYS), key)


def _for_yaml(obj: Any) -> Any:
    """Mappings in a fixed order (apiVersion, kind, metadata, name, then the rest sorted);
    multi-line strings as literal blocks (the payload stays reviewable)."""
    from ruamel.yaml.scalarstring import LiteralScalarString

    if isinstance(obj, dict):
        return {key: _for_yaml(obj[key]) for key in sorted(obj, key=_key_order)}
    if isinstance(obj, list):
        return [_for_yaml(x) for x in obj]
    if isinstance(obj, str) and "\n" in obj:
        return LiteralScalarString(obj)
    return obj


def dump_yaml(objects: list[dict[str, Any]], header: list[str]) -> str:
    """Kubernetes objects as one YAML stream: ``# header`` lines, then ``---`` and an object, for
    each object in order, with keys in :func:`_key_order` at every level. Same objects, same bytes."""
    import io

    from ruamel.yaml import YAML

    y = YAML(typ="rt", pure=True)
    y.indent(mapping=2, sequence=4, offset=2)
    y.width = 4096  # never fold long strings (commands, JSON lines)
    out = io.StringIO()
    out.write("".join(f"# {part}\n" for line in header for part in line.splitlines()))
    for obj in objects:
        out.write("---\n")
        y.dump(_for_yaml(obj), out)
    return out.getvalue()


# --------------------------------------------------------------------------- kustomize


def kustomization(resources: list[str], header: list[str], note: str = "") -> str:
    """A ``kustomization.yaml`` listing ``resources`` in order (text: it is four fixed lines)."""
    lines = [f"# {part}" for line in header + ([note] if note else []) for part in line.splitlines()]
    lines += ["apiVersion: kustomize.config.k8s.io/v1beta1", "kind: Kustomization", "resources:"]
    return "\n".join(lines + [f"  - {r}" for r in resources]) + "\n"


def with_kustomization(files: dict[str, str], header: list[str]) -> dict[str, str]:
    """A folder a team commits as it is (``ftcluster render --kustomize``): the job files and a
    kustomization listing them. The shared ClusterTrainingRuntime is left out: it is cluster-scoped
    and platform-owned (manifests/base), and one owned by every job's application would be fought over."""
    jobs = {name: text for name, text in files.items() if not name.endswith(".clustertrainingruntime.yaml")}
    note = ("TrainJobs here need the ClusterTrainingRuntime from manifests/base (applied once per cluster)."
            if len(jobs) < len(files) else "")
    return {**jobs, "kustomization.yaml": kustomization(sorted(jobs), header, note)}
