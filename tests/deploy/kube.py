"""Offline checks of Kubernetes resources: the API's own schemas (kubernetes-validate, strict: an
unknown or misspelt field is an error) for several Kubernetes versions, and the rendering of the
kustomize layouts with ``kubectl kustomize``.

Custom resources have no schema there. Their pod templates are checked as what they become: an Argo
Rollout's ``spec.template`` and a KServe predictor's pod fields as a core ``PodTemplate``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

#: native sidecars are beta and on by default from 1.29, stable in 1.33
VERSIONS = ("1.29", "1.33")
#: the classic sidecar also works before native sidecars existed
CLASSIC_VERSIONS = ("1.28", *VERSIONS)
CORE_GROUPS = {"", "apps", "batch", "networking.k8s.io", "policy", "autoscaling", "rbac.authorization.k8s.io"}
KUBECTL = shutil.which("kubectl")
# the CI machine has kubectl (with its built-in kustomize): there a missing one is a failure, not a skip
needs_kubectl = pytest.mark.skipif(KUBECTL is None and not os.environ.get("CI"), reason="kubectl not installed")

#: the PodSpec fields a KServe predictor may carry beside its own (ComponentExtensionSpec) fields
_KSERVE_OWN = {
    "minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType", "containerConcurrency",
    "timeout", "canaryTrafficPercent", "logger", "batcher", "labels", "annotations", "deploymentStrategy",
    "autoScaling", "storageUris", "workerSpec",
}  # fmt: skip


def group(doc: dict[str, Any]) -> str:
    api = str(doc.get("apiVersion", ""))
    return api.rpartition("/")[0] if "/" in api else ""


def _as_pod_template(name: str, metadata: dict[str, Any] | None, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": name},
        "template": {"metadata": metadata or {}, "spec": spec},
    }


def checkable(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The core resource that stands for ``doc`` in a schema check, or None for a CRD without pods."""
    kind = doc.get("kind")
    name = doc.get("metadata", {}).get("name", "x")
    if group(doc) in CORE_GROUPS:
        return doc
    if kind == "Rollout" and group(doc) == "argoproj.io":
        template = doc["spec"]["template"]
        return _as_pod_template(name, template.get("metadata"), template["spec"])
    if kind == "InferenceService" and group(doc) == "serving.kserve.io":
        predictor = doc["spec"]["predictor"]
        return _as_pod_template(name, None, {k: v for k, v in predictor.items() if k not in _KSERVE_OWN})
    return None


def validate(doc: dict[str, Any], versions: tuple[str, ...] = VERSIONS) -> None:
    """Strict schema validation against each version; a failure names the resource, version and path."""
    import kubernetes_validate

    target = checkable(doc)
    assert target is not None, f"no schema check for {doc.get('apiVersion')} {doc.get('kind')}"
    for version in versions:
        try:
            kubernetes_validate.validate(target, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            name = f"{doc['kind']}/{doc['metadata']['name']}"
            raise AssertionError(f"{name} on Kubernetes {version}: {path}: {exc.message}") from None


def validate_all(docs: list[dict[str, Any]], versions: tuple[str, ...] = VERSIONS) -> int:
    """Validate every resource that has a schema; the number validated."""
    count = 0
    for doc in docs:
        if checkable(doc) is not None:
            validate(doc, versions)
            count += 1
    return count


def load_all(text: str) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    assert all(isinstance(d, dict) for d in docs)
    return docs


def kustomize(path: Path) -> list[dict[str, Any]]:
    assert KUBECTL is not None, "kubectl is missing: CI must have it (kubectl kustomize renders deploy/k8s)"
    result = subprocess.run(
        [KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return load_all(result.stdout)


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_containers(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for key in ("initContainers", "containers") for c in pod.get(key) or []}


def resolve_port(pod: dict[str, Any], target: int | str, protocol: str = "TCP") -> int | None:
    """The container port a Service's ``targetPort`` or a NetworkPolicy's ``port`` means in ``pod``, as
    Kubernetes before 1.32 resolves it (and NetworkPolicy implementations of that time): a name is
    looked up among ``containers`` only, never among native sidecars (init containers with
    ``restartPolicy: Always``); a number is itself. None when nothing matches (no endpoints, no rule)."""
    if isinstance(target, int):
        return target
    for container in pod.get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == target and port.get("protocol", "TCP") == protocol:
                return int(port["containerPort"])
    return None
