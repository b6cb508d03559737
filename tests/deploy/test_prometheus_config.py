"""deploy/prometheus/*.yml: the scrape configurations load, find what they should, and name the jobs the alerts read.

Debian's promtool is built without Kubernetes discovery, so the pod-discovery file is checked with
its discovery swapped for a static target, and its relabelling is replayed here, with Prometheus'
semantics (anchored regular expressions, ``;``-joined source labels, ``$1`` replacements), on the
targets Kubernetes discovery makes of a model pod with the sidecar, an agent pod and others.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.promql import (
    DEPLOY,
    DOCS,
    RULE_FILES,
    check_exprs,
    documented_metrics,
    load_yaml,
    needs_promtool,
    promtool,
)

PROMETHEUS = DEPLOY / "prometheus"
STATIC = PROMETHEUS / "prometheus.yml"
KUBERNETES = PROMETHEUS / "prometheus-kubernetes.yml"
FEDERATION = PROMETHEUS / "federation.yml"


def _jobs_the_alerts_read() -> set[str]:
    jobs = set()
    for path in RULE_FILES:
        for group in load_yaml(path)["groups"]:
            for rule in group["rules"]:
                jobs |= set(re.findall(r'\bup\{job="([^"]+)"\}', rule["expr"]))
    return jobs


def _kubernetes_as_static(tmp_path: Path) -> Path:
    doc = load_yaml(KUBERNETES)
    for scrape in doc["scrape_configs"]:
        assert scrape.pop("kubernetes_sd_configs") == [{"role": "pod"}]
        scrape["static_configs"] = [{"targets": ["10.1.0.1:9464"]}]
    for am in doc["alerting"]["alertmanagers"]:
        am.pop("kubernetes_sd_configs")
        am["static_configs"] = [{"targets": ["10.1.0.9:9093"]}]
    assert [Path(f).name for f in doc["rule_files"]] == [p.name for p in RULE_FILES]
    doc["rule_files"] = [str(p) for p in RULE_FILES]
    path = tmp_path / "prometheus-kubernetes.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@needs_promtool
@pytest.mark.parametrize("path", [STATIC, FEDERATION], ids=lambda p: p.name)
def test_promtool_checks_the_config(path: Path) -> None:
    result = promtool("check", "config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is valid prometheus config file syntax" in result.stdout


@needs_promtool
def test_promtool_checks_the_kubernetes_config_but_its_discovery(tmp_path: Path) -> None:
    result = promtool("check", "config", str(_kubernetes_as_static(tmp_path)))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_the_remote_write_example_is_valid(tmp_path: Path) -> None:
    text = (DOCS / "integrations.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S) if "remote_write" in b]
    assert len(blocks) == 1
    doc = load_yaml(STATIC)
    doc.update(yaml.safe_load(blocks[0]))
    doc["rule_files"] = [str(p) for p in RULE_FILES]
    assert {r["url"].rsplit("/", 1)[-1] for r in doc["remote_write"]} == {"receive", "push"}
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    result = promtool("check", "config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", [STATIC, KUBERNETES], ids=lambda p: p.name)
def test_both_load_the_rules_and_name_a_cluster_and_a_region(path: Path) -> None:
    doc = load_yaml(path)
    assert set(doc["global"]["external_labels"]) == {"cluster", "region"}
    assert [Path(f).name for f in doc["rule_files"]] == [p.name for p in RULE_FILES]
    assert doc["alerting"]["alertmanagers"]


def test_the_static_jobs_are_the_ones_the_alerts_read() -> None:
    jobs = {s["job_name"] for s in load_yaml(STATIC)["scrape_configs"]}
    assert jobs == _jobs_the_alerts_read() == {"infermon", "infermon-agent"}


# -- Prometheus' relabelling, replayed --------------------------------------------------------------


def _relabel(labels: dict[str, str], configs: list[dict[str, Any]]) -> dict[str, str] | None:
    """What Prometheus keeps of a discovered target (None: dropped); the actions the files use."""
    out = dict(labels)
    for cfg in configs:
        action = cfg.get("action", "replace")
        value = cfg.get("separator", ";").join(out.get(name, "") for name in cfg.get("source_labels", []))
        match = re.fullmatch(cfg.get("regex", "(.*)"), value)
        if (action == "keep" and match is None) or (action == "drop" and match is not None):
            return None
        if action == "replace" and match is not None:
            out[cfg["target_label"]] = match.expand(cfg.get("replacement", "$1").replace("$1", r"\1"))
        assert action in ("keep", "drop", "replace"), action
    return {k: v for k, v in out.items() if not k.startswith("__") and v}


def _pod_targets(
    name: str, labels: dict[str, str], ports: list[tuple[str, str, int]], phase: str = "Running"
) -> list[dict[str, str]]:
    """The targets role: pod makes: one per container port, with its meta labels."""
    pod = {
        "__meta_kubernetes_namespace": "ml",
        "__meta_kubernetes_pod_name": name,
        "__meta_kubernetes_pod_node_name": "gpu-node-1",
        "__meta_kubernetes_pod_phase": phase,
        **{f"__meta_kubernetes_pod_label_{re.sub(r'[^a-zA-Z0-9_]', '_', k)}": v for k, v in labels.items()},
    }
    return [
        {
            **pod,
            "__address__": f"10.1.0.7:{port}",
            "__meta_kubernetes_pod_container_name": container,
            "__meta_kubernetes_pod_container_port_name": port_name,
        }
        for container, port_name, port in ports
    ]


def _scraped(targets: list[dict[str, str]]) -> list[dict[str, str]]:
    out = []
    for scrape in load_yaml(KUBERNETES)["scrape_configs"]:
        for target in targets:
            kept = _relabel({"job": scrape["job_name"], **target}, scrape["relabel_configs"])
            if kept is not None:
                out.append({"address": target["__address__"], **kept})
    return out


def test_pod_discovery_keeps_the_sidecars_admin_port_as_job_infermon() -> None:
    targets = _pod_targets(
        "iris-7d9f-abcde",
        {"app.kubernetes.io/name": "iris"},
        [("iris", "http", 8080), ("infermon", "http", 9463), ("infermon", "infermon-admin", 9464)],
    )
    assert _scraped(targets) == [
        {
            "address": "10.1.0.7:9464",
            "job": "infermon",
            "namespace": "ml",
            "pod": "iris-7d9f-abcde",
            "node": "gpu-node-1",
        }
    ]


def test_pod_discovery_keeps_the_agents_metrics_port_as_job_infermon_agent() -> None:
    agent = _pod_targets(
        "infermon-agent-x1", {"app.kubernetes.io/name": "infermon-agent"}, [("agent", "metrics", 9465)]
    )
    other = _pod_targets("node-exporter-x1", {"app.kubernetes.io/name": "node-exporter"}, [("ne", "metrics", 9100)])
    assert _scraped(agent + other) == [
        {"address": "10.1.0.7:9465", "job": "infermon-agent", "namespace": "ml", "pod": "infermon-agent-x1",
         "node": "gpu-node-1"}
    ]  # fmt: skip


def test_pod_discovery_leaves_out_pods_without_the_sidecar_and_finished_ones() -> None:
    plain = _pod_targets("web-1", {"app": "web"}, [("web", "http", 8080)])
    done = _pod_targets("batch-1", {"app": "batch"}, [("infermon", "infermon-admin", 9464)], phase="Succeeded")
    assert _scraped(plain + done) == []


def test_the_kubernetes_jobs_are_the_ones_the_alerts_read() -> None:
    jobs = {
        cfg["replacement"]
        for scrape in load_yaml(KUBERNETES)["scrape_configs"]
        for cfg in scrape["relabel_configs"]
        if cfg.get("target_label") == "job"
    }
    assert jobs == _jobs_the_alerts_read()


def test_the_prometheus_operator_podmonitor_names_its_job_infermon() -> None:
    monitor = load_yaml(DEPLOY / "k8s" / "overlays" / "prometheus-operator" / "podmonitor.yaml")
    relabelings = [r for e in monitor["spec"]["podMetricsEndpoints"] for r in e.get("relabelings", [])]
    assert {"targetLabel": "job", "replacement": "infermon"} in relabelings
    service = load_yaml(DEPLOY / "k8s" / "agent" / "service.yaml")
    assert service["metadata"]["name"] == "infermon-agent"  # the ServiceMonitor's job is the Service's name


@needs_promtool
def test_federation_pulls_documented_series(tmp_path: Path) -> None:
    scrape = load_yaml(FEDERATION)["scrape_configs"][0]
    assert scrape["honor_labels"] is True and scrape["metrics_path"] == "/federate"
    selectors = scrape["params"]["match[]"]
    result = check_exprs(tmp_path, {s: s for s in selectors})
    assert result.returncode == 0, result.stdout + result.stderr
    documented = documented_metrics()
    for selector in selectors:
        alternatives = re.search(r"infermon_\(([a-z_|]+)\)", selector)
        if alternatives:
            assert {f"infermon_{a}" for a in alternatives.group(1).split("|")} <= documented, selector
        for name in re.findall(r'__name__="(infermon_[a-z_]+)"', selector):
            assert name in documented
