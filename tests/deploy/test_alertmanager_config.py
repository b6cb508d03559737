"""deploy/alertmanager: the configuration loads, routes every shipped alert where docs/alerts.md says, and renders.

``amtool config routes test`` resolves each shipped alert (each of its severities) through the real
routing tree; ``amtool template render`` renders the message templates with a notification's data.
Inhibition is exercised by a running Alertmanager in test_alerting_e2e.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.promql import DEPLOY, RULE_FILES, alerts, amtool, load_yaml, needs_amtool

CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"
TEMPLATES = DEPLOY / "alertmanager" / "infermon.tmpl"
RETRAIN = {"InfermonDriftDetected", "InfermonModelScoreLow"}
BY_SEVERITY = {"critical": ["pagerduty", "slack"], "warning": ["slack"], "info": ["slack-info"]}


def _shipped() -> set[tuple[str, str]]:
    return {(a["alert"], a["labels"]["severity"]) for path in RULE_FILES for a in alerts(path)}


def _matchers(cfg: dict[str, Any]) -> list[str]:
    out: list[str] = []

    def walk(route: dict[str, Any]) -> None:
        out.extend(route.get("matchers", []))
        for child in route.get("routes", []):
            walk(child)

    walk(cfg["route"])
    for rule in cfg["inhibit_rules"]:
        out.extend(rule["source_matchers"] + rule["target_matchers"])
    return out


@needs_amtool
def test_amtool_checks_the_config() -> None:
    result = amtool("check-config", str(CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 templates" in result.stdout and "SUCCESS" in result.stdout


@needs_amtool
@pytest.mark.parametrize(("alertname", "severity"), sorted(_shipped()))
def test_each_alert_reaches_its_receivers(alertname: str, severity: str) -> None:
    result = amtool("config", "routes", "test", f"--config.file={CONFIG}", f"alertname={alertname}",
                    f"severity={severity}", "model=iris", "version=2", "variant=stable")  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = (["retrain"] if alertname in RETRAIN else []) + BY_SEVERITY[severity]
    assert result.stdout.strip().split(",") == expected


def test_every_alertname_in_the_config_is_a_shipped_alert() -> None:
    shipped = {name for name, _ in _shipped()}
    for matcher in _matchers(load_yaml(CONFIG)):
        m = re.fullmatch(r'alertname(=~|=|!=|!~)"(.+)"', matcher)
        if m is None:
            continue
        op, value = m.groups()
        matched = {n for n in shipped if re.fullmatch(value, n)}
        assert matched, f"{matcher} matches no shipped alert"
        if op in ("=", "!="):
            assert value in shipped, matcher


def test_receivers_exist_and_secrets_come_from_files() -> None:
    cfg = load_yaml(CONFIG)
    names = {r["name"] for r in cfg["receivers"]}
    used: set[str] = set()

    def walk(route: dict[str, Any]) -> None:
        if "receiver" in route:
            used.add(route["receiver"])
        for child in route.get("routes", []):
            walk(child)

    walk(cfg["route"])
    assert used == names
    assert "slack_api_url_file" in cfg["global"] and "slack_api_url" not in cfg["global"]
    for receiver in cfg["receivers"]:
        for pd in receiver.get("pagerduty_configs", []):
            assert "routing_key_file" in pd and "routing_key" not in pd
        for hook in receiver.get("webhook_configs", []):
            assert hook["http_config"]["authorization"]["credentials_file"]


def test_the_retrain_route_fits_the_hook() -> None:
    cfg = load_yaml(CONFIG)
    (route,) = [r for r in cfg["route"]["routes"] if r["receiver"] == "retrain"]
    # one group per model version and variant; resolved notifications tell the hook a group ended
    assert {"model", "version", "variant"} <= set(route["group_by"])
    assert route["continue"] is True
    (receiver,) = [r for r in cfg["receivers"] if r["name"] == "retrain"]
    (hook,) = receiver["webhook_configs"]
    assert hook["send_resolved"] is True
    assert hook["url"].endswith(":9466/alerts")  # infermon retrain-hook's default port and path


def test_inhibition_names_labels_the_alerts_carry() -> None:
    for rule in load_yaml(CONFIG)["inhibit_rules"]:
        assert "cluster" in rule["equal"]  # one Alertmanager for several clusters: never across them


@needs_amtool
@pytest.mark.parametrize("template", ["infermon.slack.title", "infermon.slack.text", "infermon.pagerduty.description"])
def test_the_templates_render_summary_description_and_runbook(tmp_path: Path, template: str) -> None:
    data = {
        "receiver": "slack",
        "status": "firing",
        "alerts": [
            {
                "status": "firing",
                "labels": {"alertname": "InfermonUpstreamDown", "severity": "critical", "instance": "10.0.0.1:9464"},
                "annotations": {
                    "summary": "10.0.0.1:9464 cannot reach its model server",
                    "description": "The readiness check has failed for a minute.",
                    "runbook_url": "https://infermon.example/docs/alerts.md#infermonupstreamdown",
                },
                "startsAt": "2026-11-25T16:22:39Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "fingerprint": "1f2e3d4c5b6a7980",
            }
        ],
        "groupLabels": {"alertname": "InfermonUpstreamDown"},
        "commonLabels": {"alertname": "InfermonUpstreamDown", "severity": "critical", "cluster": "prod-eu-1"},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
    }
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    result = amtool("template", "render", f"--template.glob={TEMPLATES}", f"--template.data={path}",
                    f'--template.text={{{{ template "{template}" . }}}}')  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = {
        "infermon.slack.title": "[FIRING:1] InfermonUpstreamDown (prod-eu-1)",
        "infermon.slack.text": "*critical*: 10.0.0.1:9464 cannot reach its model server\n"
        "The readiness check has failed for a minute.\n"
        "<https://infermon.example/docs/alerts.md#infermonupstreamdown|runbook>",
        "infermon.pagerduty.description": "InfermonUpstreamDown: 10.0.0.1:9464 cannot reach its model server",
    }
    assert result.stdout.strip() == expected[template]
