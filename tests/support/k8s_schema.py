"""Offline validation of rendered Kubernetes objects, strict enough that a typo fails.

- Custom resources (PyTorchJob, TrainJob, ClusterTrainingRuntime) are checked with jsonschema
  against the ``openAPIV3Schema`` of the CRDs vendored in ``tests/schemas/`` (provenance in
  ``tests/schemas/SOURCES.md``). The API server *prunes* fields a structural schema does not
  declare, silently, so a misspelt field would vanish on ``kubectl apply``; here every object
  schema that does not say ``x-kubernetes-preserve-unknown-fields`` gets
  ``additionalProperties: false`` and an unknown field is an error.
  ``x-kubernetes-int-or-string`` becomes integer-or-string; ``x-kubernetes-list-type: map`` /
  ``set`` become uniqueness checks (the API server rejects duplicate env names, volume names, ...);
  ``nullable`` allows null. Other ``x-kubernetes-*`` keys are dropped; CEL rules
  (``x-kubernetes-validations``) are not evaluated, except the name rule checked below.
- ``metadata`` (left open by the CRDs; the API server checks it as ObjectMeta) is checked here:
  known keys only, label keys and values, names (DNS-1035 for the job kinds, as their webhooks
  and CEL rules require).
- Core objects (ConfigMap) and the complete pod templates inside the custom resources are checked
  with ``kubernetes-validate`` (strict: unknown fields are errors) for the Kubernetes versions in
  ``K8S_VERSIONS``. ``kubernetes-validate`` has no schema for custom kinds, so only the kinds in
  ``CORE_KINDS`` are sent to it and anything else is refused here, never passed silently.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"
CRD_FILES = {
    ("kubeflow.org/v1", "PyTorchJob"): "kubeflow.org_pytorchjobs.yaml",
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainer.kubeflow.org_trainjobs.yaml",
    ("trainer.kubeflow.org/v1alpha1", "ClusterTrainingRuntime"): "trainer.kubeflow.org_clustertrainingruntimes.yaml",
}
CORE_KINDS = {("v1", "ConfigMap"), ("v1", "PodTemplate"), ("batch/v1", "Job")}  # Job: prepare-data
# The oldest Kubernetes Trainer v2 supports (its install guide asks for >= 1.31), and the newest
# version kubernetes-validate knows.
K8S_VERSIONS = ("1.31", "latest")
DNS1035_KINDS = {"PyTorchJob", "TrainJob"}

_LABEL = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                   "labels": _STRING_MAP, "annotations": _STRING_MAP},
}


class SchemaError(AssertionError):
    """An object does not validate; the message lists every problem as `path: message`."""


def to_json_schema(node: Any) -> Any:
    """A CRD structural schema node as strict JSON Schema (see the module docstring)."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key == "properties":
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = to_json_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [to_json_schema(sub) for sub in value]
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if node.get("x-kubernetes-list-type") == "map":
        out["listMapKeys"] = node.get("x-kubernetes-list-map-keys", [])
    if out.get("type") == "object" and "additionalProperties" not in out \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False  # the API server would prune unknown fields silently
    return out


def _list_map_keys(validator, keys, instance, schema):
    """`x-kubernetes-list-type: map`: no two items may share the key fields."""
    from jsonschema import ValidationError

    if not validator.is_type(instance, "array"):
        return
    seen: dict[tuple, int] = {}
    for i, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        key = tuple(item.get(k) for k in keys)
        if key in seen:
            yield ValidationError(f"items {seen[key]} and {i} have the same {'/'.join(keys)} {key!r}")
        seen[key] = i


@cache
def _validator(api_version: str, kind: str):
    import jsonschema
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader reads the 0.9 MB CRDs ~10x faster
    crd = yaml.load((SCHEMAS / CRD_FILES[(api_version, kind)]).read_text(encoding="utf-8"), Loader=loader)
    group, _, version = api_version.partition("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind, (api_version, kind)
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    schema = to_json_schema(versions[version]["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = OBJECT_META
    schema["properties"]["apiVersion"] = {"const": api_version}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
    cls = jsonschema.validators.extend(jsonschema.Draft7Validator, {"listMapKeys": _list_map_keys})
    cls.check_schema(schema)
    return cls(schema), crd["spec"]["scope"]


def _path(error) -> str:
    return "/".join(str(p) for p in error.absolute_path) or "<root>"


def _metadata_problems(obj: dict[str, Any], scope: str | None) -> list[str]:
    meta = obj.get("metadata") or {}
    problems = []
    name = meta.get("name", "")
    if obj.get("kind") in DNS1035_KINDS:
        if not (_DNS1035.match(name) and len(name) <= 63):
            problems.append(f"metadata/name: {name!r} must be a DNS-1035 label of at most 63 characters")
    elif not (_DNS1123_SUBDOMAIN.match(name) and len(name) <= 253):
        problems.append(f"metadata/name: {name!r} must be a DNS-1123 subdomain")
    if scope == "Cluster" and "namespace" in meta:
        problems.append("metadata/namespace: a cluster-scoped object has no namespace")
    if scope == "Namespaced" or obj.get("kind") in {k for _, k in CORE_KINDS}:
        ns = meta.get("namespace", "default")
        if not (_DNS1123_LABEL.match(ns) and len(ns) <= 63):
            problems.append(f"metadata/namespace: {ns!r} must be a DNS-1123 label")
    problems += label_problems(meta.get("labels") or {}, "metadata/labels", values=True)
    problems += label_problems(meta.get("annotations") or {}, "metadata/annotations", values=False)
    return problems


def label_problems(mapping: dict[str, str], where: str, values: bool) -> list[str]:
    """Label (or annotation) keys and label values as the API server checks them."""
    out = []
    for key, value in mapping.items():
        prefix, _, name = key.rpartition("/")
        if not (0 < len(name) <= 63 and _LABEL.match(name)) or (
                prefix and not (len(prefix) <= 253 and _DNS1123_SUBDOMAIN.match(prefix))):
            out.append(f"{where}/{key}: invalid key")
        if values and not (isinstance(value, str) and len(value) <= 63 and _LABEL.match(value)):
            out.append(f"{where}/{key}: invalid label value {value!r}")
    return out


def pod_templates(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The complete pod templates inside a custom resource, with their paths."""
    if obj["kind"] == "PyTorchJob":
        return [(f"spec/pytorchReplicaSpecs/{r}/template", spec["template"])
                for r, spec in obj["spec"]["pytorchReplicaSpecs"].items()]
    if obj["kind"] == "ClusterTrainingRuntime":
        return [(f"spec/template/spec/replicatedJobs/{i}/template/spec/template", rj["template"]["spec"]["template"])
                for i, rj in enumerate(obj["spec"]["template"]["spec"]["replicatedJobs"])]
    return []


def _core_problems(obj: dict[str, Any], where: str = "") -> list[str]:
    import kubernetes_validate

    if (obj.get("apiVersion"), obj.get("kind")) not in CORE_KINDS:
        raise SchemaError(f"{obj.get('apiVersion')}/{obj.get('kind')}: no schema here; kubernetes-validate would "
                          "pass an unknown kind silently, so add its CRD to CRD_FILES or the kind to CORE_KINDS")
    out = []
    for version in K8S_VERSIONS:
        if version == "latest":
            version = kubernetes_validate.latest_version()
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.path) or "<root>"
            out.append(f"{where}{path}: {exc.message} (Kubernetes {version})")
    return out


def problems(obj: dict[str, Any]) -> list[str]:
    """Every problem found in ``obj`` as ``path: message``; empty when it validates."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in CRD_FILES:
        validator, scope = _validator(*key)
        out = [f"{_path(e)}: {e.message}" for e in sorted(validator.iter_errors(obj), key=lambda e: list(e.path))]
        out += _metadata_problems(obj, scope)
        if not out:  # the pod templates only make sense once the outer shape is right
            for where, template in pod_templates(obj):
                pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
                out += _core_problems(pod, f"{where}: ")
        return out
    out = _core_problems(obj)
    return out + _metadata_problems(obj, None)


def validate(obj: dict[str, Any]) -> None:
    """Raise :class:`SchemaError` listing every problem in ``obj``."""
    found = problems(obj)
    if found:
        raise SchemaError(f"{obj.get('kind')} {obj.get('metadata', {}).get('name')!r} is invalid:\n  "
                          + "\n  ".join(found))
