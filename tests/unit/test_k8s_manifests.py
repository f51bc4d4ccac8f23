"""deploy/k8s, checked against Kubernetes' own schemas (no cluster runs here).

kubernetes-validate carries the OpenAPI schemas of each Kubernetes release;
strict mode refuses fields the schema does not know, so a misspelt key fails
here instead of being dropped by the API server.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

K8S = Path(__file__).parents[2] / "deploy" / "k8s"
# The oldest Kubernetes release still supported upstream, and the newest the validator knows.
VERSIONS = ["1.33", kubernetes_validate.latest_version()]


def manifests() -> list[tuple[str, dict[str, Any]]]:
    """Every resource of the kustomization, with the file it is in."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [
        (name, doc)
        for name in kustomization["resources"]
        for doc in yaml.safe_load_all((K8S / name).read_text())
        if doc
    ]


def test_the_kustomization_names_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_kubernetes(version: str) -> None:
    checked = []
    for name, doc in manifests():
        kubernetes_validate.validate(doc, version, strict=True)
        checked.append(f"{name}:{doc['kind']}")
    assert len(checked) >= 7, checked


def test_the_validator_refuses_a_misspelt_field() -> None:
    statefulset = next(d for _, d in manifests() if d["kind"] == "StatefulSet")
    broken = copy.deepcopy(statefulset)
    broken["spec"]["template"]["spec"]["containers"][0]["enviroment"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[0], strict=True)


def test_each_pod_is_one_member_with_a_recovery_volume_of_its_own() -> None:
    """The layout tests/integration/test_multihost.py runs: member i of N, its own directory.

    Recovery partitions are shared out among the first pods (leadflow.runner.
    prepare_recovery), so the volume must be per pod (a volumeClaimTemplate),
    never one volume all pods mount.
    """
    sts = next(d for _, d in manifests() if d["kind"] == "StatefulSet")
    container = sts["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    recovery = env["LEADFLOW_RECOVERY_DIR"]
    mount = next(m for m in container["volumeMounts"] if recovery.startswith(m["mountPath"]))
    claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
    assert mount["name"] in claims
    assert all(v["name"] != mount["name"] for v in sts["spec"]["template"]["spec"]["volumes"])
    assert '--process-id "$i" --addresses "$addrs"' in container["args"][0]
    assert env["LEADFLOW_CLUSTER_SIZE"] == str(sts["spec"]["replicas"])
    assert sts["spec"]["podManagementPolicy"] == "Parallel"  # all members up together
