"""manifests/: every kustomization builds with `kubectl kustomize`; the custom resources it yields
are accepted by a real API server (server-side dry run, strict field validation); core objects
pass kubernetes-validate (strict); generated folders are up to date; versions are pinned.

Not checked here: Kueue objects against Kueue's CRDs (not vendored; the test API server has none
of Kueue's schemas), and manifests/third-party (remote bases: CI is offline).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
MANIFESTS = ROOT / "manifests"
FOLDERS = sorted(str(p.parent.relative_to(MANIFESTS)) for p in MANIFESTS.rglob("kustomization.yaml")
                 if "third-party" not in p.parts)
CORE = {("v1", "Namespace"), ("v1", "ServiceAccount"), ("rbac.authorization.k8s.io/v1", "Role"),
        ("rbac.authorization.k8s.io/v1", "RoleBinding")}
PLURALS = {"TrainJob": "trainjobs", "ClusterTrainingRuntime": "clustertrainingruntimes", "PyTorchJob": "pytorchjobs"}


def _kubectl() -> str:
    found = shutil.which("kubectl") or str(Path.home() / ".cache/ftcluster-k8s/bin/kubectl")
    if not Path(found).exists():
        if os.environ.get("STRICT") == "1":
            pytest.fail("STRICT=1 but there is no kubectl (.ci/k8s-up.sh leaves one in ~/.cache/ftcluster-k8s/bin)")
        pytest.skip("no kubectl (apt install kubectl, or .ci/k8s-up.sh leaves Debian's in ~/.cache/ftcluster-k8s/bin)")
    return found


def _build(folder: str) -> list[dict]:
    res = subprocess.run([_kubectl(), "kustomize", str(MANIFESTS / folder)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{folder}: {res.stderr}"
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def test_every_kustomization_is_covered():
    assert {"base", "team", "kueue/cluster", "kueue/team", "examples/full-trainjob", "examples/lora-pytorchjob"} <= set(FOLDERS)
    assert len([f for f in FOLDERS if f.startswith("overlays/")]) >= 4  # two clusters, each cluster + team part


@pytest.mark.parametrize("folder", FOLDERS)
def test_builds_and_core_objects_validate(folder):
    import kubernetes_validate

    objs = _build(folder)
    assert objs
    for obj in objs:
        if (obj["apiVersion"], obj["kind"]) in CORE:
            kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)
        if obj["kind"] in ("ClusterTrainingRuntime", "ClusterQueue", "ResourceFlavor", "Namespace"):
            assert "namespace" not in obj["metadata"], f"{folder}: cluster-scoped {obj['kind']} got a namespace"


def test_overlays_rename_the_team_namespace():
    objs = _build("overlays/h200-onprem/team-nlp")
    assert {o["metadata"].get("namespace") for o in objs if o["kind"] != "Namespace"} == {"nlp"}
    binding = next(o for o in objs if o["kind"] == "RoleBinding")
    assert {"kind": "ServiceAccount", "name": "ftcluster-submitter", "namespace": "nlp"} in binding["subjects"]


@pytest.mark.parametrize("folder", [f for f in FOLDERS if not f.startswith("kueue") and "team" not in f.split("/")[-1]
                                    and f != "team"])
def test_custom_resources_pass_a_server_side_dry_run(folder, live_k8s):
    """Real API server: each custom resource is created with dryRun=All and fieldValidation=Strict."""
    from kubernetes import client, config

    cfg = client.Configuration()
    config.load_kube_config(config_file=live_k8s, client_configuration=cfg, persist_config=False)
    api = client.CustomObjectsApi(client.ApiClient(cfg))
    sent = 0
    for obj in _build(folder):
        if obj["kind"] not in PLURALS:
            continue
        group, version = obj["apiVersion"].split("/")
        plural = PLURALS[obj["kind"]]
        if obj["kind"] == "ClusterTrainingRuntime":
            api.create_cluster_custom_object(group, version, plural, obj, dry_run="All", field_validation="Strict")
        else:
            api.create_namespaced_custom_object(group, version, obj["metadata"]["namespace"], plural, obj,
                                                dry_run="All", field_validation="Strict")
        sent += 1
    assert sent, f"{folder}: no custom resources"


def test_generated_folders_are_up_to_date():
    """Regenerate-then-diff: manifests/generate.py --check fails on any stale or extra file."""
    import sys

    res = subprocess.run([sys.executable, "manifests/generate.py", "--check"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_third_party_versions_are_pinned_with_a_reason():
    text = (MANIFESTS / "third-party" / "kustomization.yaml").read_text().splitlines()
    refs = [i for i, line in enumerate(text) if line.strip().startswith("- http")]
    assert len(refs) >= 3
    for i in refs:
        assert re.search(r"(\?ref=v\d+\.\d+\.\d+$)|(/download/v\d+\.\d+\.\d+/)", text[i]), text[i]
        assert text[i - 1].strip().startswith("# ") and len(text[i - 1]) > 20, f"no reason above {text[i]}"
    for path in MANIFESTS.rglob("*.yaml"):
        assert not re.search(r"(:latest\b|\?ref=(main|master)\b)", path.read_text()), path
