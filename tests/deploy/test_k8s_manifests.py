"""deploy/k8s: every kustomize layout rendered with ``kubectl kustomize`` and checked offline.

Each rendered resource passes the Kubernetes API's strict schemas (kube.VERSIONS; the classic sidecar
and the agent also on 1.28). Beyond the schemas, what a cluster would only show at run time: the
containers' flags parse with infermon's own CLI and, with the container's environment and the
ConfigMap's file, load as infermon would load them; every port a probe, Service, NetworkPolicy or
monitor names exists where it must; the grace period covers the preStop pause, the drain and the
trace flush of the configuration actually shipped; the agent sees what docs/agent.md says it needs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from proxy.agent.config import AgentConfig
from proxy.cli import build_parser
from proxy.dataplane.command import load_config
from proxy.observe.tracing import K8S_ENV
from proxy.settings import ProxyConfig, split_host_port
from tests.deploy.kube import (
    CLASSIC_VERSIONS,
    VERSIONS,
    find,
    kustomize,
    needs_kubectl,
    pod_containers,
    resolve_port,
    validate_all,
)

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
LAYOUTS: dict[str, tuple[str, ...]] = {
    "base": VERSIONS,
    "agent": CLASSIC_VERSIONS,
    "overlays/classic-sidecar": CLASSIC_VERSIONS,
    "overlays/tracing": VERSIONS,
    "overlays/prometheus-operator": VERSIONS,
}
pytestmark = needs_kubectl


def _render(layout: str) -> list[dict[str, Any]]:
    return kustomize(K8S / layout)


def _pod(docs: list[dict[str, Any]], kind: str = "Deployment") -> dict[str, Any]:
    return find(docs, kind)["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def _port(container: dict[str, Any], name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert name in ports, f"{container['name']} has no port named {name} ({sorted(ports)})"
    return int(ports[name])


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _args(container: dict[str, Any]) -> argparse.Namespace:
    return build_parser().parse_args(container.get("command", [])[1:] + container["args"])


def _proxy_config(
    container: dict[str, Any], docs: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> ProxyConfig:
    """The configuration infermon builds in this container: its flags, its environment, its ConfigMap."""
    import os

    for name in list(os.environ):
        if name.startswith(("INFERMON_", "OTEL_", "K8S_")):
            monkeypatch.delenv(name)
    env = _env(container)
    mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
    pod = _pod(docs)
    for volume in pod.get("volumes", []):
        if "configMap" in volume and volume["name"] in mounts:
            data = find(docs, "ConfigMap", volume["configMap"]["name"])["data"]
            for key, text in data.items():
                path = mounts[volume["name"]] + "/" + key
                if env.get("INFERMON_CONFIG") == path:
                    local = tmp_path / key
                    local.write_text(text)
                    env["INFERMON_CONFIG"] = str(local)
    if "INFERMON_CONFIG" in env:
        assert Path(env["INFERMON_CONFIG"]).exists(), "INFERMON_CONFIG names no file of a mounted ConfigMap"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_config(_args(container))


def _prestop_seconds(container: dict[str, Any]) -> float:
    hook = container.get("lifecycle", {}).get("preStop")
    if hook is None:
        return 0.0
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return float(command[1])


def test_every_file_belongs_to_a_layout() -> None:
    import yaml

    used: set[Path] = set()
    for layout in LAYOUTS:
        folder = K8S / layout
        kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
        used.add(folder / "kustomization.yaml")
        for entry in kustomization.get("resources", []):
            path = (folder / entry).resolve()
            used.add(path / "kustomization.yaml" if path.is_dir() else path)
        for patch in kustomization.get("patches", []):
            if "path" in patch:
                used.add((folder / patch["path"]).resolve())
        for generator in kustomization.get("configMapGenerator", []):
            used |= {(folder / f).resolve() for f in generator.get("files", [])}
    assert set(K8S.rglob("*.y*ml")) == used


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_rendered_resource_passes_the_schemas(layout: str) -> None:
    docs = _render(layout)
    custom = [d for d in docs if d["apiVersion"].startswith("monitoring.coreos.com/")]
    assert validate_all(docs, LAYOUTS[layout]) == len(docs) - len(custom)


def test_the_base_runs_infermon_as_a_native_sidecar_in_front_of_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = _render("base")
    pod = _pod(docs)
    sidecar = pod["initContainers"][-1]
    model = pod_containers(pod)["model"]
    assert sidecar["name"] == "infermon" and sidecar["restartPolicy"] == "Always"
    cfg = _proxy_config(sidecar, docs, tmp_path, monkeypatch)
    # the flags, the ports and the file agree
    assert split_host_port(cfg.listen)[1] == _port(sidecar, "http")
    assert split_host_port(cfg.admin.listen)[1] == _port(sidecar, "infermon-admin")
    assert cfg.upstream_target() == ("http", "127.0.0.1", _port(model, "app-8080"))
    assert cfg.labels.model == "iris" and cfg.readiness.path == model["readinessProbe"]["httpGet"]["path"]
    # the probes ask infermon's admin port
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "infermon-admin"}
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "infermon-admin"}
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "infermon-admin"}
    # the grace period: the model's preStop pause, then infermon's drain and trace flush
    needed = _prestop_seconds(model) + cfg.drain.delay + cfg.drain.timeout + cfg.tracing.timeout
    assert pod["terminationGracePeriodSeconds"] >= needed
    assert _prestop_seconds(model) > 0
    annotations = find(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == _port(sidecar, "infermon-admin")
    assert annotations["prometheus.io/path"] == "/metrics"


def test_the_sidecar_is_locked_down_and_sized() -> None:
    for layout in ("base", "overlays/classic-sidecar"):
        pod = _pod(_render(layout))
        sidecar = pod_containers(pod)["infermon"]
        sc = sidecar["securityContext"]
        assert sc["runAsNonRoot"] is True and isinstance(sc["runAsUser"], int) and sc["runAsUser"] != 0
        assert sc["runAsUser"] != 1337  # Istio's proxy UID
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        seccomp = sc.get("seccompProfile", pod.get("securityContext", {}).get("seccompProfile"))
        assert seccomp == {"type": "RuntimeDefault"}
        resources = sidecar["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
        assert all(m.get("readOnly") for m in sidecar.get("volumeMounts", []))


def test_the_downward_api_gives_every_resource_attribute() -> None:
    sidecar = pod_containers(_pod(_render("base")))["infermon"]
    env = {e["name"]: e for e in sidecar["env"]}
    assert set(K8S_ENV) <= set(env)
    paths = {"K8S_POD_NAME": "metadata.name", "K8S_NAMESPACE_NAME": "metadata.namespace",
             "K8S_NODE_NAME": "spec.nodeName", "K8S_POD_UID": "metadata.uid"}  # fmt: skip
    for var, path in paths.items():
        assert env[var]["valueFrom"]["fieldRef"]["fieldPath"] == path
    assert env["K8S_CONTAINER_NAME"]["value"] == "infermon"


@pytest.mark.parametrize("layout", ["base", "overlays/classic-sidecar"])
def test_the_service_reaches_infermon_and_never_the_model_directly(layout: str) -> None:
    docs = _render(layout)
    pod = _pod(docs)
    service = find(docs, "Service", "iris")
    labels = find(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    containers = pod_containers(pod)
    for port in service["spec"]["ports"]:
        # on every version the layout supports: a name of a native sidecar's port gives the Service
        # no endpoints before Kubernetes 1.32
        assert resolve_port(pod, port["targetPort"]) == _port(containers["infermon"], "http")
        assert resolve_port(pod, port["targetPort"]) not in {p["containerPort"] for p in containers["model"]["ports"]}


@pytest.mark.parametrize("layout", ["base", "overlays/classic-sidecar"])
def test_the_network_policy_opens_the_proxy_to_clients_and_the_admin_port_to_prometheus_only(layout: str) -> None:
    docs = _render(layout)
    policy = find(docs, "NetworkPolicy")["spec"]
    labels = find(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    pod = _pod(docs)
    sidecar = pod_containers(pod)["infermon"]
    opened: dict[int | None, list[Any]] = {}
    for rule in policy["ingress"]:
        for port in rule["ports"]:
            # resolved as NetworkPolicy implementations did before they knew native sidecars: a port
            # that resolves to nothing opens nothing, and the policy then denies the clients too
            opened[resolve_port(pod, port["port"], port.get("protocol", "TCP"))] = rule.get("from", [])
    http, admin = _port(sidecar, "http"), _port(sidecar, "infermon-admin")
    assert set(opened) == {http, admin}  # the model's 8080 is not opened: loopback only
    assert opened[http] == []  # every client of the Service
    (prometheus,) = opened[admin]
    assert prometheus["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    assert prometheus["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}


def test_the_classic_sidecar_is_the_same_container_stopping_after_a_pause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    native = pod_containers(_pod(_render("base")))["infermon"]
    docs = _render("overlays/classic-sidecar")
    pod = _pod(docs)
    assert "initContainers" not in pod
    assert [c["name"] for c in pod["containers"]] == ["model", "infermon"]
    classic = pod["containers"][1]
    assert _prestop_seconds(classic) >= 5
    expected = {k: v for k, v in native.items() if k not in ("restartPolicy", "startupProbe")}
    assert {k: v for k, v in classic.items() if k != "lifecycle"} == expected
    # both get SIGTERM together after their preStop: infermon's pause, drain and flush must fit
    cfg = _proxy_config(classic, docs, tmp_path, monkeypatch)
    needed = _prestop_seconds(classic) + cfg.drain.delay + cfg.drain.timeout + cfg.tracing.timeout
    assert pod["terminationGracePeriodSeconds"] >= needed


def test_the_tracing_overlay_turns_tracing_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = _render("overlays/tracing")
    sidecar = pod_containers(_pod(docs))["infermon"]
    cfg = _proxy_config(sidecar, docs, tmp_path, monkeypatch)
    assert cfg.tracing.enabled and cfg.tracing.keep_errors
    assert cfg.tracing.protocol == "grpc" and cfg.tracing.sampler_arg == 0.1
    assert cfg.tracing.export_url() == "http://otel-collector.observability.svc:4317"
    assert cfg.tracing.resource_attributes == {"deployment.environment": "production", "service.namespace": "ml"}
    # the merge kept the base's environment
    assert set(K8S_ENV) <= {e["name"] for e in sidecar["env"]}
    pod = _pod(docs)
    assert pod["terminationGracePeriodSeconds"] >= 5 + cfg.drain.timeout + cfg.tracing.timeout


def test_the_agent_daemonset(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from proxy.config import load

    docs = _render("agent")
    daemonset = find(docs, "DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    (agent,) = pod["containers"]
    assert pod["hostPID"] is True
    # GPU nodes only: each term names a GPU label, and the taints of GPU pools are tolerated
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    keys = {e["key"] for term in terms for e in term["matchExpressions"]}
    assert "nvidia.com/gpu.present" in keys and all("gpu" in k or "10de" in k or "accelerator" in k for k in keys)
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    # its configuration as the agent loads it
    for name in list(os.environ):
        if name.startswith("INFERMON_"):
            monkeypatch.delenv(name)
    args = _args(agent)
    env = _env(agent)
    assert {e["name"] for e in agent["env"]} >= {"INFERMON_AGENT_HOSTNAME", "NVIDIA_VISIBLE_DEVICES"}
    cfg = load(
        AgentConfig,
        file=args.config,
        env={k: v for k, v in env.items() if k.startswith("INFERMON_AGENT_")},
        env_prefix="INFERMON_AGENT_",
        config_env="INFERMON_AGENT_CONFIG",
        flags={"listen": args.listen, "interval": args.interval, "procfs": args.procfs},
    )
    assert split_host_port(cfg.listen)[1] == _port(agent, "metrics")
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    # the host's /proc, read-only, where procfs points
    assert mounts[cfg.procfs]["readOnly"] is True
    assert volumes[mounts[cfg.procfs]["name"]]["hostPath"]["path"] == "/proc"
    # the kubelet pod-resources socket's directory, read-only, where the agent looks for it
    socket_dir = str(Path(cfg.nvml.pod_resources_socket or "").parent)
    assert mounts[socket_dir]["readOnly"] is True
    assert volumes[mounts[socket_dir]["name"]]["hostPath"]["path"] == "/var/lib/kubelet/pod-resources"
    assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    sc = agent["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["allowPrivilegeEscalation"] is False
    service = find(docs, "Service", "infermon-agent")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= daemonset["spec"]["template"]["metadata"]["labels"].items()


def test_the_prometheus_operator_monitors_select_what_exists() -> None:
    docs = _render("overlays/prometheus-operator")
    # the annotations are gone, so a Prometheus that reads both does not scrape twice
    for kind in ("Deployment", "DaemonSet"):
        annotations = find(docs, kind)["spec"]["template"]["metadata"].get("annotations", {})
        assert not any(k.startswith("prometheus.io/") for k in annotations), kind
    pod_monitor = find(docs, "PodMonitor")
    assert pod_monitor["apiVersion"] == "monitoring.coreos.com/v1"
    template = find(docs, "Deployment")["spec"]["template"]
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    sidecar = pod_containers(template["spec"])["infermon"]
    for endpoint in pod_monitor["spec"]["podMetricsEndpoints"]:
        _port(sidecar, endpoint["port"])
        assert endpoint["path"] == "/metrics"
    service_monitor = find(docs, "ServiceMonitor")
    service = find(docs, "Service", "infermon-agent")
    assert service_monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in service_monitor["spec"]["endpoints"]:
        assert endpoint["port"] in names and endpoint["path"] == "/metrics"
