"""deploy/grafana: the committed dashboards are what build.py makes, and every query in them is sound.

Every PromQL expression (panel targets, variable queries, annotations) is written into a rule file
with its Grafana variables replaced by concrete values and checked by promtool; every metric it
reads is listed in docs/metrics.md (the agent's too) or recorded by the shipped rules. The layout,
the variables and the datasource references are checked the way Grafana would resolve them.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.deploy.promql import DEPLOY, DOCS, check_exprs, load_yaml, metric_names, needs_promtool, undocumented

GRAFANA = DEPLOY / "grafana"
DASHBOARDS = GRAFANA / "dashboards"
BUILTINS = {"__rate_interval", "__interval", "__range", "__all"}
_VAR = re.compile(r"\$\{?(\w+)\}?")


def _build_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("grafana_build", GRAFANA / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = _build_module()
BOARDS: dict[str, dict[str, Any]] = {name: json.loads(text) for name, text in BUILD.build().items()}


def _panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in board["panels"] if p["type"] != "row"]


def _exprs(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every query of the dashboard."""
    for panel in _panels(board):
        for t in panel["targets"]:
            yield f"panel {panel['title']!r} {t['refId']}", t["expr"]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.+), (\w+)\)", var["query"]["query"])
            assert m is not None, var["query"]
            yield f"variable {var['name']}", m.group(1)
    for ann in board["annotations"]["list"]:
        if "expr" in ann:
            yield f"annotation {ann['name']}", ann["expr"]


def _concrete(expr: str) -> str:
    """The expression as Prometheus gets it, with "All" selected and the rate interval at 1m."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s")
    return _VAR.sub(".*", expr)


def test_the_committed_dashboards_are_what_build_makes() -> None:
    committed = {p.name: p.read_text() for p in DASHBOARDS.glob("*.json")}
    assert committed == BUILD.build(), "run `make dashboards` and commit deploy/grafana/dashboards"


def test_the_issue_s_dashboards_are_there() -> None:
    assert set(BOARDS) == {f"infermon-{n}.json" for n in ("overview", "drift", "canary", "quality", "gpu")}
    overview = " ".join(e for _, e in _exprs(BOARDS["infermon-overview.json"]))
    for metric in (
        "infermon_requests_total",
        "infermon_request_duration_seconds_bucket",
        "infermon_time_to_first_byte_seconds_bucket",
        "infermon_stream_chunk_gap_seconds_bucket",
    ):
        assert metric in overview
    assert "infermon_canary_verdict" in " ".join(e for _, e in _exprs(BOARDS["infermon-canary.json"]))
    assert "infermon_model_score" in " ".join(e for _, e in _exprs(BOARDS["infermon-quality.json"]))
    assert "infermon_feature_drifted" in " ".join(e for _, e in _exprs(BOARDS["infermon-drift.json"]))
    assert "infermon_gpu_memory_used_bytes" in " ".join(e for _, e in _exprs(BOARDS["infermon-gpu.json"]))


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_every_query_reads_the_datasource_variable(name: str) -> None:
    board = BOARDS[name]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert "cluster" in variables
    ds = {"type": "prometheus", "uid": "${datasource}"}
    for panel in _panels(board):
        assert panel["datasource"] == ds, panel["title"]
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            assert t["datasource"] == ds
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"] == ds and var["allValue"] == ".*"


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_variables_used_are_defined_before_use(name: str) -> None:
    board = BOARDS[name]
    defined: list[str] = []
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            used = set(_VAR.findall(var["query"]["query"])) - BUILTINS
            assert used <= set(defined), (var["name"], used - set(defined))  # Grafana resolves them in order
        defined.append(var["name"])
    for where, expr in _exprs(board):
        assert set(_VAR.findall(expr)) - BUILTINS <= set(defined), where


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_panels_fit_the_grid_without_overlapping(name: str) -> None:
    board = BOARDS[name]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, panel["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, panel["title"]
        cells |= mine


def test_latency_panels_ask_for_exemplars_and_only_they() -> None:
    with_exemplars = 0
    for board in BOARDS.values():
        for panel in _panels(board):
            for t in panel["targets"]:
                wants = "infermon_request_duration_seconds_bucket" in t["expr"] and panel["type"] == "timeseries"
                assert t.get("exemplar", False) is wants, (panel["title"], t["expr"])
                with_exemplars += wants
    assert with_exemplars >= 4  # the overview's three quantiles and the canary's


def _scrape_seconds(text: str) -> float:
    return float(text[:-1]) * {"s": 1, "m": 60}[text[-1]]


def test_rates_over_agent_series_span_four_of_the_agent_s_scrapes() -> None:
    """$__rate_interval is four times the datasource's scrape interval (15 s) unless a query's Min step
    says otherwise: the agents are scraped every 30 s, so their queries must say so."""
    datasource = load_yaml(GRAFANA / "provisioning" / "datasources" / "infermon.yml")["datasources"][0]
    default = _scrape_seconds(datasource["jsonData"]["timeInterval"])
    agent_intervals = set()
    for config in ("prometheus.yml", "prometheus-kubernetes.yml"):
        doc = load_yaml(DEPLOY / "prometheus" / config)
        for job in doc["scrape_configs"]:
            if "agent" in job["job_name"]:
                agent_intervals.add(_scrape_seconds(job.get("scrape_interval", doc["global"]["scrape_interval"])))
    (agent,) = agent_intervals
    checked = 0
    for board in BOARDS.values():
        for panel in _panels(board):
            for t in panel["targets"]:
                if "$__rate_interval" in t["expr"] and re.search(r"infermon_(gpu|host)_", t["expr"]):
                    step = _scrape_seconds(t["interval"]) if "interval" in t else default
                    assert step >= agent, (panel["title"], t["expr"])
                    checked += 1
    assert checked >= 3


@needs_promtool
@pytest.mark.parametrize("name", sorted(BOARDS))
def test_promtool_parses_every_expression(tmp_path: Path, name: str) -> None:
    exprs = {where: _concrete(expr) for where, expr in _exprs(BOARDS[name])}
    result = check_exprs(tmp_path, exprs)
    assert result.returncode == 0, result.stdout + result.stderr + json.dumps(exprs, indent=1)


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_every_metric_is_documented(name: str) -> None:
    names: set[str] = set()
    for _, expr in _exprs(BOARDS[name]):
        names |= metric_names(expr)
    assert names
    assert undocumented(names) == set()


def test_the_datasource_links_exemplars_to_the_trace_datasource() -> None:
    doc = load_yaml(GRAFANA / "provisioning" / "datasources" / "infermon.yml")
    by_uid = {d["uid"]: d for d in doc["datasources"]}
    (prometheus,) = [d for d in doc["datasources"] if d["type"] == "prometheus"]
    (link,) = prometheus["jsonData"]["exemplarTraceIdDestinations"]
    # the exemplar label the proxy writes (docs/metrics.md, "Exemplars")
    assert link["name"] == "trace_id" and '{trace_id="..."}' in (DOCS / "metrics.md").read_text()
    assert by_uid[link["datasourceUid"]]["type"] in ("jaeger", "tempo")


def test_the_dashboard_provider_loads_one_folder() -> None:
    doc = load_yaml(GRAFANA / "provisioning" / "dashboards" / "infermon.yml")
    (provider,) = doc["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]


def test_build_writes_where_it_is_told(tmp_path: Path) -> None:
    assert BUILD.main([str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(BOARDS)
