"""Names Kubernetes and ftcluster's manifests reserve, and the API server's rules for labels.

Shared by the spec (its validators reject a clash while the file is loaded, with file:line:col)
and the Kubernetes renderer (which uses the same names to build the manifests). Standard
library only.
"""

from __future__ import annotations

import re
from typing import Any

from .envbuild import PAYLOAD_VAR

SHM_VOLUME = "dshm"
SHM_PATH = "/dev/shm"
SECRET_ENV_DIR = "/var/run/ftcluster/secret-env"  # TrainJob: one mounted Secret per env_from_secrets entry
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
HASH_LABEL = "ftcluster.dev/spec-hash"
# The ClusterTrainingRuntime's failurePolicy.maxRestarts: shared by every TrainJob (a TrainJob cannot
# patch it), so it is the default of resources.max_restarts (ftcluster.spec.schema.ResourcesSpec).
RUNTIME_MAX_RESTARTS = 2
OWN_LABELS = ("app.kubernetes.io/managed-by", "app.kubernetes.io/name", HASH_LABEL)  # set on every object

# A stopped pod (preemption, Kueue eviction, drain) gets SIGTERM, then SIGKILL after the grace
# period. torchrun gives its workers TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default 30) to save a
# checkpoint before it kills them; both are raised here, the shutdown timeout 30 s inside the grace.
GRACE_SECONDS = 300
K8S_ENV = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(GRACE_SECONDS - 30)}
# Set by the Training Operator / Trainer torch plugin for torchrun; a user value would clash
# (the Trainer webhook rejects PET_* in trainer.env).
RESERVED_ENV = frozenset({PAYLOAD_VAR, "PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR",
                          "PET_MASTER_PORT", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK"})
# Fields of `kubernetes:` that TrainJob v1alpha1 cannot carry per job (they live in the runtime).
PYTORCHJOB_ONLY = {
    "restart_policy": "restarts are set by the ClusterTrainingRuntime's JobSet failurePolicy "
                      f"(ftcluster-torch: every node restarts together after an infrastructure fault, at most "
                      f"{RUNTIME_MAX_RESTARTS} times; exit 1 fails the TrainJob)",
    "backoff_limit": "restarts are set by the ClusterTrainingRuntime's JobSet failurePolicy.maxRestarts",
    "ttl_seconds_after_finished": "TrainJob has no TTL field",
    "priority_class": "TrainJob cannot set a Pod priorityClassName per job; set it in the runtime, "
                      "or with Kueue use the label kueue.x-k8s.io/priority-class in kubernetes.labels",
    "image_pull_policy": "TrainJob has no per-job imagePullPolicy (Kubernetes pulls tagged images IfNotPresent)",
}
LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
RESERVED_MOUNTS = f"ftcluster reserves {SHM_VOLUME} and {SHM_PATH}"


def secret_volume_name(secret: str) -> str:
    """A volume name (DNS-1123 label) for a Secret name (DNS-1123 subdomain: may hold dots)."""
    return re.sub(r"[^a-z0-9-]", "-", f"secret-env-{secret}")[:63].rstrip("-")


def label_key_problem(key: str) -> str | None:
    """Why ``key`` is not a valid label or annotation key ([prefix/]name), as the API server checks it."""
    prefix, _, name = key.rpartition("/")
    ok = (0 < len(name) <= 63 and LABEL_NAME.match(name)
          and (not prefix or (len(prefix) <= 253 and DNS_SUBDOMAIN.match(prefix))))
    return None if ok else ("not a valid key; use [dns-prefix/]name with letters, digits, '-', '_', '.' "
                            "(name at most 63 characters)")


def label_value_problem(value: str) -> str | None:
    if len(value) > 63 or not LABEL_NAME.match(value):
        return f"label values are at most 63 letters, digits, '-', '_', '.', starting and ending alphanumeric (got {value!r})"
    return None


def _key_field(field: str, key: str) -> str:
    """``labels.team`` for a key the problem text can name as a field path (so the error points at
    the key's line), else ``labels: 'a.b/c'`` (the error points at the mapping)."""
    return f"{field}.{key}" if re.match(r"^[A-Za-z_][A-Za-z0-9_-]*$", key) else f"{field}: {key!r}"


def section_problems(k: Any) -> list[str]:
    """Clashes inside a ``kubernetes:`` section (a KubernetesSpec), as "field.path: message" lines."""
    out = []
    for key, value in k.labels.items():
        why = label_key_problem(key) or label_value_problem(value)
        if key in OWN_LABELS:
            why = "set by ftcluster; remove it from kubernetes.labels"
        if key == QUEUE_LABEL and k.queue and value != k.queue:
            why = "differs from kubernetes.queue; set the queue in one place"
        if why:
            out.append(f"{_key_field('labels', key)}: {why}")
    out += [f"{_key_field('annotations', key)}: {label_key_problem(key)}" for key in k.annotations
            if label_key_problem(key)]
    if k.kind == "TrainJob":
        out += [f"{f}: applies to PyTorchJob only; {why}. Remove it, or set kubernetes.kind: PyTorchJob"
                for f, why in sorted(PYTORCHJOB_ONLY.items())
                if f in k.model_fields_set and getattr(k, f) is not None]
    return out + _volume_problems(k)


def _volume_problems(k: Any) -> list[str]:
    trainjob = k.kind == "TrainJob"
    secrets = k.env_from_secrets if trainjob else []  # TrainJob mounts each Secret as a volume
    names = {SHM_VOLUME} | {secret_volume_name(s) for s in secrets}
    paths = {SHM_PATH} | {f"{SECRET_ENV_DIR}/{s}" for s in secrets}
    out = []
    for i, v in enumerate(k.volumes):
        for field, what, value, seen in (("name", "volume name", v.name, names),
                                         ("mount_path", "mount path", v.mount_path, paths)):
            if value in seen:
                out.append(f"volumes[{i}].{field}: {what} {value!r} is used twice ({RESERVED_MOUNTS}); rename it")
            seen.add(value)
    return out


def reserved_by(name: str) -> str:
    """Who sets a reserved environment variable in the pods."""
    if name == PAYLOAD_VAR:
        return "set by ftcluster (it carries the resolved spec)"
    return "set by the Kubeflow operator for torchrun"


def env_problems(spec: Any, env: dict[str, str]) -> list[str]:
    """Environment clashes of a job spec on Kubernetes, as "field.path: message" lines (full paths).

    ``env`` is the job's environment (:func:`ftcluster.spec.envbuild.build_env`). The top-level ``env`` is
    checked only when the job runs on Kubernetes; the renderer checks it for other targets.
    """
    k = spec.kubernetes
    out = [f"kubernetes.env.{n}: {reserved_by(n)}; remove it" for n in sorted(set(k.env) & RESERVED_ENV)]
    if spec.backend == "kubernetes":
        out += [f"env.{n}: {reserved_by(n)}; remove it" for n in sorted(set(spec.env) & RESERVED_ENV)]
    seen = set(K8S_ENV) | set(env) | set(k.env) | RESERVED_ENV
    for i, item in enumerate(k.secret_env):
        if item.name in seen:
            out.append(f"kubernetes.secret_env[{i}].name: {item.name} is defined twice (or reserved); "
                       "give each variable one source")
        seen.add(item.name)
    return out
