"""Grafana dashboards for infermon, built as plain JSON: ``make dashboards`` (or ``python deploy/grafana/build.py``).

Writes deploy/grafana/dashboards/*.json, which are committed; tests/deploy/test_grafana_dashboards.py
builds them again and fails when the committed files differ, checks every PromQL expression with
promtool and every metric name against docs/metrics.md.

Every dashboard has a Prometheus datasource variable and a ``cluster`` variable (the external label
of each Prometheus, for a central view through federation, Thanos or Mimir; "All" also matches
series without it). Latency panels of ``infermon_request_duration_seconds`` ask for exemplars; the
Prometheus datasource links their ``trace_id`` to the trace datasource
(deploy/grafana/provisioning/datasources/infermon.yml).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
#: the agents' scrape interval in deploy/prometheus (job infermon-agent): the GPU dashboard's queries
#: take it as their Min step, so that $__rate_interval spans four of the agent's scrapes, not four of
#: the datasource's 15 s (two agent samples, and a gap for every scrape missed)
AGENT_SCRAPE_INTERVAL = "30s"
Json = dict[str, Any]


# -- variables -------------------------------------------------------------------------------------


def datasource_var() -> Json:
    return {
        "name": "datasource",
        "label": "Prometheus",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "refresh": 1,
        "regex": "",
    }


def query_var(name: str, query: str, label: str | None = None, multi: bool = True) -> Json:
    """A label-values variable; "All" is ``.*``, which also matches series without the label."""
    return {
        "name": name,
        "label": label or name,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": f"{name}-values"},
        "definition": query,
        "refresh": 2,
        "includeAll": True,
        "allValue": ".*",
        "multi": multi,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
        "hide": 0,
        "regex": "",
    }


def cluster_var(metric: str) -> Json:
    return query_var("cluster", f"label_values({metric}, cluster)")


def model_vars() -> list[Json]:
    """cluster, namespace, model, version, variant: each narrowed by the ones before it."""
    base = 'infermon_requests_total{cluster=~"$cluster"}'
    return [
        cluster_var("infermon_requests_total"),
        query_var("namespace", f"label_values({base}, namespace)"),
        query_var(
            "model", 'label_values(infermon_requests_total{cluster=~"$cluster", namespace=~"$namespace"}, model)'
        ),
        query_var(
            "version",
            'label_values(infermon_requests_total{cluster=~"$cluster", namespace=~"$namespace", model=~"$model"},'
            " version)",
        ),
        query_var(
            "variant",
            'label_values(infermon_requests_total{cluster=~"$cluster", namespace=~"$namespace", model=~"$model"},'
            " variant)",
        ),
    ]


#: the selector of the model dashboards' variables
SEL = 'cluster=~"$cluster", namespace=~"$namespace", model=~"$model", version=~"$version", variant=~"$variant"'
#: the same for series of one proxy that carry no model label (drift, canary, probes)
SEL_TARGET = 'cluster=~"$cluster", namespace=~"$namespace"'


# -- panels ----------------------------------------------------------------------------------------


def target(expr: str, legend: str, *, exemplar: bool = False, instant: bool = False, ref: str = "A") -> Json:
    out: Json = {"refId": ref, "datasource": DS, "expr": expr, "legendFormat": legend, "range": not instant}
    if instant:
        out["instant"] = True
        out["format"] = "table"
    if exemplar:
        out["exemplar"] = True
    return out


def timeseries(
    title: str,
    targets: Sequence[Json],
    unit: str = "short",
    description: str = "",
    *,
    stack: bool = False,
    min_zero: bool = True,
    max_value: float | None = None,
) -> Json:
    defaults: Json = {
        "unit": unit,
        "custom": {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10 if stack else 0,
            "showPoints": "never",
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        },
    }
    if min_zero:
        defaults["min"] = 0
    if max_value is not None:
        defaults["max"] = max_value
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": list(targets),
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat(title: str, expr: str, unit: str = "short", description: str = "", thresholds: Sequence[Json] = ()) -> Json:
    steps = [{"color": "green", "value": None}, *thresholds]
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": [target(expr, "", instant=False)],
        "fieldConfig": {
            "defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "textMode": "auto",
        },
    }


def table(title: str, expr: str, description: str = "", hide: Sequence[str] = ("Time", "__name__")) -> Json:
    return {
        "type": "table",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": [target(expr, "", instant=True)],
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {"showHeader": True},
        "transformations": [{"id": "organize", "options": {"excludeByName": {name: True for name in hide}}}],
    }


def row(title: str) -> Json:
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


def layout(items: Iterable[Json | tuple[Json, ...]]) -> list[Json]:
    """Rows of panels: a row panel takes a line; a tuple of panels shares 24 columns, 8 high."""
    panels: list[Json] = []
    y = 0
    for item in items:
        if isinstance(item, dict):
            panels.append({**item, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
            y += 1
            continue
        width = 24 // len(item)
        for i, panel in enumerate(item):
            panels.append({**panel, "gridPos": {"h": 8, "w": width, "x": i * width, "y": y}})
        y += 8
    for n, panel in enumerate(panels, start=1):
        panel["id"] = n
    return panels


def dashboard(
    uid: str,
    title: str,
    description: str,
    variables: list[Json],
    items: Iterable[Json | tuple[Json, ...]],
    refresh: str = "30s",
) -> Json:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["infermon"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": refresh,
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [datasource_var(), *variables]},
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                },
                {
                    "name": "infermon alerts",
                    "datasource": DS,
                    "enable": True,
                    "iconColor": "red",
                    "expr": 'ALERTS{alertstate="firing", alertname=~"Infermon.+", cluster=~"$cluster"}',
                    "titleFormat": "{{alertname}}",
                    "textFormat": "{{severity}}",
                    "step": "60s",
                },
            ]
        },
        "links": [
            {
                "type": "dashboards",
                "tags": ["infermon"],
                "title": "infermon",
                "asDropdown": True,
                "includeVars": True,
                "keepTime": True,
            }
        ],
        "panels": layout(items),
    }


def quantiles(metric: str, by: str, sel: str, qs: Sequence[float], legend: str) -> list[Json]:
    return [
        target(
            f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{sel}}}[{RATE}])))",
            f"p{round(q * 100)} {legend}",
            exemplar=metric == "infermon_request_duration_seconds",
            ref=chr(ord("A") + i),
        )
        for i, q in enumerate(qs)
    ]


# -- the dashboards --------------------------------------------------------------------------------


def overview() -> Json:
    by = "model, variant"
    return dashboard(
        "infermon-overview",
        "infermon / Overview",
        "Traffic, errors and latency per model and variant, as the clients see them through the infermon proxies.",
        model_vars(),
        [
            (
                stat("Requests / s", f"sum(rate(infermon_requests_total{{{SEL}}}[{RATE}]))", "reqps"),
                stat(
                    "5xx share",
                    f'sum(rate(infermon_requests_total{{{SEL}, code=~"5.."}}[{RATE}])) / '
                    f"sum(rate(infermon_requests_total{{{SEL}}}[{RATE}]))",
                    "percentunit",
                    thresholds=[{"color": "orange", "value": 0.001}, {"color": "red", "value": 0.01}],
                ),
                stat(
                    "p99 latency",
                    f"histogram_quantile(0.99, sum by (le) (rate(infermon_request_duration_seconds_bucket"
                    f"{{{SEL}}}[{RATE}])))",
                    "s",
                ),
                stat(
                    "Upstreams down",
                    f"count(infermon_upstream_up{{{SEL_TARGET}}} == 0) or vector(0)",
                    "short",
                    thresholds=[{"color": "red", "value": 1}],
                ),
            ),
            row("Traffic and errors"),
            (
                timeseries(
                    "Requests by model and variant",
                    [
                        target(
                            f"sum by ({by}) (rate(infermon_requests_total{{{SEL}}}[{RATE}]))", "{{model}} {{variant}}"
                        )
                    ],
                    "reqps",
                ),
                timeseries(
                    "Answers by status",
                    [target(f"sum by (code) (rate(infermon_requests_total{{{SEL}}}[{RATE}]))", "{{code}}")],
                    "reqps",
                    stack=True,
                ),
            ),
            (
                timeseries(
                    "5xx share by model and variant",
                    [
                        target(
                            f'sum by ({by}) (rate(infermon_requests_total{{{SEL}, code=~"5.."}}[{RATE}])) / '
                            f"sum by ({by}) (rate(infermon_requests_total{{{SEL}}}[{RATE}]))",
                            "{{model}} {{variant}}",
                        )
                    ],
                    "percentunit",
                    "5xx answers (the model server's and the proxy's 502/503/504) over all answers.",
                ),
                timeseries(
                    "Upstream failures by kind",
                    [
                        target(
                            f"sum by (kind, variant) (rate(infermon_upstream_errors_total{{{SEL}}}[{RATE}]))",
                            "{{kind}} {{variant}}",
                        )
                    ],
                    "reqps",
                    "connect: refused or unreachable; timeout; reset: closed mid-exchange; protocol.",
                ),
                timeseries(
                    "Clients giving up",
                    [
                        target(
                            f"sum by ({by}) (rate(infermon_client_aborts_total{{{SEL}}}[{RATE}]))",
                            "{{model}} {{variant}}",
                        )
                    ],
                    "reqps",
                    "A rise often means the model got slower than the clients' timeouts.",
                ),
            ),
            row("Latency"),
            (
                timeseries(
                    "Request duration (end to end)",
                    quantiles("infermon_request_duration_seconds", by, SEL, (0.5, 0.9, 0.99), "{{model}} {{variant}}"),
                    "s",
                    "First request byte to last response byte. The points are exemplars: a sampled "
                    "request of that bucket, linked to its trace.",
                ),
                timeseries(
                    "Model server time to response head",
                    quantiles("infermon_upstream_header_seconds", by, SEL, (0.5, 0.99), "{{model}} {{variant}}"),
                    "s",
                    "The upstream's share: request start on the upstream connection to its response head.",
                ),
            ),
            row("Streams (LLM)"),
            (
                timeseries(
                    "Time to first token",
                    quantiles(
                        "infermon_time_to_first_byte_seconds", by, SEL, (0.5, 0.9, 0.99), "{{model}} {{variant}}"
                    ),
                    "s",
                    "First request byte to first response body byte: for a stream, the first token.",
                ),
                timeseries(
                    "Gap between chunks",
                    quantiles("infermon_stream_chunk_gap_seconds", by, SEL, (0.5, 0.99), "{{model}} {{variant}}"),
                    "s",
                    "Time between consecutive body reads of a stream: the token pace.",
                ),
                timeseries(
                    "Tokens / s",
                    [
                        target(
                            f"sum by (model, kind) (rate(infermon_llm_tokens_total{{{SEL}}}[{RATE}]))",
                            "{{model}} {{kind}}",
                        )
                    ],
                    "short",
                ),
            ),
            row("Saturation"),
            (
                timeseries(
                    "Requests in flight",
                    [target(f"sum by (instance) (infermon_requests_in_flight{{{SEL_TARGET}}})", "{{instance}}")],
                ),
                timeseries(
                    "Upstream connections",
                    [
                        target(
                            f"sum by (upstream) (infermon_upstream_connections{{{SEL_TARGET}}})", "open {{upstream}}"
                        ),
                        target(
                            f"sum by (upstream) (infermon_upstream_idle_connections{{{SEL_TARGET}}})",
                            "idle {{upstream}}",
                            ref="B",
                        ),
                    ],
                ),
                timeseries(
                    "Upstream up",
                    [target(f"min by (upstream) (infermon_upstream_up{{{SEL_TARGET}}})", "{{upstream}}")],
                    "short",
                    "1: the readiness check of every replica's upstream passes.",
                    max_value=1,
                ),
                timeseries(
                    "Proxy CPU",
                    [
                        target(
                            "sum by (instance) (rate(process_cpu_seconds_total"
                            f'{{job="infermon", {SEL_TARGET}}}[{RATE}]))',
                            "{{instance}}",
                        )
                    ],
                    "percentunit",
                ),
            ),
        ],
    )


def drift() -> Json:
    sel = f'{SEL_TARGET}, variant=~"$variant"'
    return dashboard(
        "infermon-drift",
        "infermon / Drift",
        "Data drift of each variant's traffic against the reference profile: each replica's verdict and the fleet PSI.",
        [
            cluster_var("infermon_feature_drifted"),
            query_var("namespace", 'label_values(infermon_feature_drifted{cluster=~"$cluster"}, namespace)'),
            query_var(
                "variant",
                'label_values(infermon_feature_drifted{cluster=~"$cluster", namespace=~"$namespace"}, variant)',
            ),
            query_var(
                "feature",
                'label_values(infermon_feature_drifted{cluster=~"$cluster", namespace=~"$namespace"}, feature)',
            ),
        ],
        [
            (
                stat(
                    "Drifted features",
                    f"count(max by (variant, feature) (infermon_feature_drifted{{{sel}}}) == 1) or vector(0)",
                    thresholds=[{"color": "orange", "value": 1}],
                ),
                stat("Samples / s", f"sum(rate(infermon_samples_total{{{SEL_TARGET}}}[{RATE}]))", "short"),
                stat(
                    "Samples lost",
                    f'sum(rate(infermon_samples_dropped_total{{{SEL_TARGET}, reason=~"queue_full|internal"}}[{RATE}]))'
                    " or vector(0)",
                    "short",
                    thresholds=[{"color": "red", "value": 0.001}],
                ),
            ),
            (
                table(
                    "Drift verdicts (share of replicas)",
                    f'avg by (variant, feature) (infermon_feature_drifted{{{sel}, feature=~"$feature"}})',
                    "1: every replica finds the feature drifted; absent: not enough rows in the window.",
                ),
                timeseries(
                    "Fleet PSI (last hour, all replicas)",
                    [
                        target(
                            'infermon:feature_psi:1h{cluster=~"$cluster", variant=~"$variant", feature=~"$feature"}',
                            "{{variant}} {{feature}}",
                        )
                    ],
                    "short",
                    "From deploy/prometheus/drift.rules.yml. 0.1 to 0.25: a moderate shift; above 0.25: drift.",
                ),
            ),
            (
                timeseries(
                    "PSI per replica",
                    [
                        target(
                            "max by (variant, feature) "
                            f'(infermon_feature_drift{{{sel}, feature=~"$feature", method="psi"}})',
                            "{{variant}} {{feature}}",
                        )
                    ],
                    "short",
                ),
                timeseries(
                    "Test p-values (KS, chi-square, z)",
                    [
                        target(
                            f'min by (variant, feature, method) (infermon_feature_drift{{{sel}, feature=~"$feature", '
                            'method=~"ks|chisquare|z"})',
                            "{{variant}} {{feature}} {{method}}",
                        )
                    ],
                    "short",
                    "Drift when the p-value is below the feature's threshold (0.05 by default).",
                    max_value=1,
                ),
            ),
            (
                timeseries(
                    "Rows in the live windows",
                    [
                        target(
                            f'sum by (variant, feature) (infermon_drift_window_rows{{{sel}, feature=~"$feature"}})',
                            "{{variant}} {{feature}}",
                        )
                    ],
                ),
                timeseries(
                    "Data quality problems",
                    [
                        target(
                            f"sum by (variant, feature, problem) (rate(infermon_feature_quality_total{{{sel}, "
                            f'feature=~"$feature"}}[{RATE}]))',
                            "{{variant}} {{feature}} {{problem}}",
                        )
                    ],
                ),
                timeseries(
                    "Samples dropped by reason",
                    [
                        target(
                            f"sum by (reason) (rate(infermon_samples_dropped_total{{{SEL_TARGET}}}[{RATE}]))",
                            "{{reason}}",
                        )
                    ],
                    stack=True,
                ),
            ),
        ],
    )


def canary() -> Json:
    sel = f'{SEL_TARGET}, model=~"$model"'
    by = "variant"
    return dashboard(
        "infermon-canary",
        "infermon / Canary against stable",
        "Each variant side by side: the proxy's verdict and its checks, traffic, errors, latency, probes and shadow.",
        [
            cluster_var("infermon_requests_total"),
            query_var("namespace", 'label_values(infermon_requests_total{cluster=~"$cluster"}, namespace)'),
            query_var(
                "model", 'label_values(infermon_requests_total{cluster=~"$cluster", namespace=~"$namespace"}, model)'
            ),
        ],
        [
            (
                timeseries(
                    "Verdict",
                    [target(f"min by (variant) (infermon_canary_verdict{{{SEL_TARGET}}})", "{{variant}}")],
                    "short",
                    "1 pass, 0 inconclusive, -1 fail (the worst replica).",
                    min_zero=False,
                ),
                timeseries(
                    "Checks",
                    [
                        target(
                            f"min by (variant, check) (infermon_canary_check{{{SEL_TARGET}}})", "{{variant}} {{check}}"
                        )
                    ],
                    "short",
                    min_zero=False,
                ),
                timeseries(
                    "Split weight", [target(f"max by (variant) (infermon_split_weight{{{SEL_TARGET}}})", "{{variant}}")]
                ),
            ),
            (
                timeseries(
                    "Requests by variant",
                    [target(f"sum by ({by}) (rate(infermon_requests_total{{{sel}}}[{RATE}]))", "{{variant}}")],
                    "reqps",
                ),
                timeseries(
                    "5xx share by variant",
                    [
                        target(
                            f'sum by ({by}) (rate(infermon_requests_total{{{sel}, code=~"5.."}}[{RATE}])) / '
                            f"sum by ({by}) (rate(infermon_requests_total{{{sel}}}[{RATE}]))",
                            "{{variant}}",
                        )
                    ],
                    "percentunit",
                ),
                timeseries(
                    "p99 latency by variant",
                    quantiles("infermon_request_duration_seconds", by, sel, (0.5, 0.99), "{{variant}}"),
                    "s",
                ),
            ),
            (
                timeseries(
                    "Golden probes passing",
                    [target(f"avg by (variant) (infermon_probe_success{{{SEL_TARGET}}})", "{{variant}}")],
                    "percentunit",
                    "The share of probes whose last run matched, per upstream.",
                    max_value=1,
                ),
                timeseries(
                    "Shadow agreement",
                    [target(f"avg by (shadow) (infermon_shadow_agreement_ratio{{{SEL_TARGET}}})", "{{shadow}}")],
                    "percentunit",
                    max_value=1,
                ),
                timeseries(
                    "Canary requests in the analysis window",
                    [target(f"sum by (variant) (infermon_canary_samples{{{SEL_TARGET}}})", "{{variant}}")],
                ),
            ),
        ],
    )


def quality() -> Json:
    sel = 'cluster=~"$cluster", namespace=~"$namespace", model=~"$model", variant=~"$variant", window=~"$window"'
    metric = 'metric=~"$metric"'
    return dashboard(
        "infermon-quality",
        "infermon / Model quality",
        "Scores from delayed labels (POST /feedback) per model, version, variant and window.",
        [
            cluster_var("infermon_model_score"),
            query_var("namespace", 'label_values(infermon_model_score{cluster=~"$cluster"}, namespace)'),
            query_var(
                "model", 'label_values(infermon_model_score{cluster=~"$cluster", namespace=~"$namespace"}, model)'
            ),
            query_var("variant", 'label_values(infermon_model_score{cluster=~"$cluster", model=~"$model"}, variant)'),
            query_var("window", 'label_values(infermon_model_score{cluster=~"$cluster", model=~"$model"}, window)'),
            query_var("metric", 'label_values(infermon_model_score{cluster=~"$cluster", model=~"$model"}, metric)'),
        ],
        [
            (
                timeseries(
                    "Scores",
                    [
                        target(
                            f"avg by (model, version, variant, window, metric) (infermon_model_score{{{sel}, {metric}, "
                            'metric!="join_rate"})',
                            "{{metric}} {{model}} {{version}} {{variant}} {{window}}",
                        )
                    ],
                ),
                timeseries(
                    "Join rate",
                    [
                        target(
                            f'avg by (model, variant, window) (infermon_model_score{{{sel}, metric="join_rate"}})',
                            "{{model}} {{variant}} {{window}}",
                        )
                    ],
                    "percentunit",
                    "Predictions of the window that got a label.",
                    max_value=1,
                ),
            ),
            (
                timeseries(
                    "Labels in the window",
                    [
                        target(
                            f"sum by (model, variant, window) (infermon_model_score_labels{{{sel}}})",
                            "{{model}} {{variant}} {{window}}",
                        )
                    ],
                ),
                timeseries(
                    "Label delay",
                    quantiles(
                        "infermon_feedback_delay_seconds",
                        "model",
                        'cluster=~"$cluster", namespace=~"$namespace", model=~"$model"',
                        (0.5, 0.99),
                        "{{model}}",
                    ),
                    "s",
                    "Prediction to label, for joined labels.",
                ),
                timeseries(
                    "Labels by outcome",
                    [
                        target(
                            f"sum by (outcome) (rate(infermon_feedback_total{{{SEL_TARGET}}}[{RATE}]))", "{{outcome}}"
                        )
                    ],
                    stack=True,
                ),
            ),
            (
                table(
                    "Confusion matrix (last value)",
                    f"sum by (model, variant, window, actual, predicted) (infermon_model_confusion{{{sel}}})",
                ),
                timeseries(
                    "Per-class F1",
                    [
                        target(
                            f"avg by (model, variant, window, class) (infermon_model_class_score{{{sel}, "
                            'metric="f1"})',
                            "{{model}} {{class}} {{window}}",
                        )
                    ],
                    max_value=1,
                ),
            ),
        ],
    )


def gpu() -> Json:
    board = _gpu()
    for panel in board["panels"]:
        for t in panel.get("targets", []):
            t["interval"] = AGENT_SCRAPE_INTERVAL  # "Min step": what $__rate_interval takes as the scrape interval
    return board


def _gpu() -> Json:
    sel = 'cluster=~"$cluster", hostname=~"$hostname", gpu=~"$gpu"'
    legend = "{{hostname}} GPU {{gpu}}"
    return dashboard(
        "infermon-gpu",
        "infermon / GPUs and nodes",
        "The node agents: GPU utilisation, memory, heat, power, errors and the host.",
        [
            cluster_var("infermon_gpu_info"),
            query_var("hostname", 'label_values(infermon_gpu_info{cluster=~"$cluster"}, hostname)', "node"),
            query_var("gpu", 'label_values(infermon_gpu_info{cluster=~"$cluster", hostname=~"$hostname"}, gpu)'),
        ],
        [
            (
                stat("GPUs", 'sum(infermon_gpu_devices{cluster=~"$cluster"})'),
                stat(
                    "Collectors down",
                    'count(infermon_gpu_collector_up{cluster=~"$cluster", reason!="library_not_found"} == 0)'
                    " or vector(0)",
                    thresholds=[{"color": "red", "value": 1}],
                ),
                stat(
                    "XID errors (1h)",
                    f"sum(increase(infermon_gpu_xid_errors_total{{{sel}}}[1h])) or vector(0)",
                    thresholds=[{"color": "red", "value": 1}],
                ),
                stat("Mean utilisation", f"avg(infermon_gpu_utilization_ratio{{{sel}}})", "percentunit"),
            ),
            row("GPUs"),
            (
                timeseries(
                    "Utilisation",
                    [target(f"infermon_gpu_utilization_ratio{{{sel}}}", legend)],
                    "percentunit",
                    max_value=1,
                ),
                timeseries(
                    "Memory used",
                    [
                        target(
                            f"infermon_gpu_memory_used_bytes{{{sel}}} / infermon_gpu_memory_total_bytes{{{sel}}}",
                            legend + " {{mig_profile}}",
                        )
                    ],
                    "percentunit",
                    max_value=1,
                ),
                timeseries(
                    "Memory per pod",
                    [
                        target(
                            f"sum by (hostname, gpu, pod_uid) (infermon_gpu_pod_memory_used_bytes{{{sel}}})",
                            "{{hostname}} GPU {{gpu}} {{pod_uid}}",
                        )
                    ],
                    "bytes",
                    stack=True,
                ),
            ),
            (
                timeseries("Temperature", [target(f"infermon_gpu_temperature_celsius{{{sel}}}", legend)], "celsius"),
                timeseries("Power", [target(f"infermon_gpu_power_watts{{{sel}}}", legend)], "watt"),
                timeseries(
                    "Clocks held down",
                    [
                        target(
                            f'infermon_gpu_clock_event_reason{{{sel}, reason!="gpu_idle"}} == 1', legend + " {{reason}}"
                        )
                    ],
                    "short",
                    max_value=1,
                ),
            ),
            (
                timeseries("SM clock", [target(f"infermon_gpu_sm_clock_hz{{{sel}}}", legend)], "hertz"),
                timeseries(
                    "PCIe throughput",
                    [target(f"infermon_gpu_pcie_throughput_bytes_per_second{{{sel}}}", legend + " {{direction}}")],
                    "Bps",
                ),
                timeseries(
                    "XID errors",
                    [
                        target(
                            f"sum by (hostname, gpu, xid) (increase(infermon_gpu_xid_errors_total{{{sel}}}[{RATE}]))",
                            legend + " XID {{xid}}",
                        )
                    ],
                    "short",
                ),
            ),
            row("Nodes"),
            (
                timeseries(
                    "Host CPU",
                    [
                        target(
                            f'sum by (cluster, instance) (rate(infermon_host_cpu_seconds_total{{cluster=~"$cluster", '
                            f'mode!="idle"}}[{RATE}])) / on (cluster, instance) '
                            'max by (cluster, instance) (infermon_host_cpus{cluster=~"$cluster"})',
                            "{{instance}}",
                        )
                    ],
                    "percentunit",
                    max_value=1,
                ),
                timeseries(
                    "Host memory available",
                    [
                        target(
                            'infermon_host_memory_bytes{cluster=~"$cluster", state="available"} '
                            '/ ignoring (state) infermon_host_memory_bytes{cluster=~"$cluster", state="total"}',
                            "{{instance}}",
                        )
                    ],
                    "percentunit",
                    max_value=1,
                ),
                timeseries(
                    "Network",
                    [
                        target(
                            "sum by (instance) "
                            f'(rate(infermon_host_network_receive_bytes_total{{cluster=~"$cluster"}}[{RATE}]))',
                            "in {{instance}}",
                        ),
                        target(
                            "sum by (instance) "
                            f'(rate(infermon_host_network_transmit_bytes_total{{cluster=~"$cluster"}}[{RATE}]))',
                            "out {{instance}}",
                            ref="B",
                        ),
                    ],
                    "Bps",
                ),
                timeseries(
                    "Collection time",
                    [target('infermon_gpu_collection_duration_seconds{cluster=~"$cluster"}', "{{instance}}")],
                    "s",
                    "A slow driver shows here first; the agent's /healthz turns 503 after three missed intervals.",
                ),
            ),
        ],
    )


DASHBOARDS = {"overview": overview, "drift": drift, "canary": canary, "quality": quality, "gpu": gpu}


def render(board: Json) -> str:
    return json.dumps(board, indent=2, sort_keys=False, ensure_ascii=False) + "\n"


def build() -> dict[str, str]:
    """File name -> its JSON text, for every dashboard."""
    return {f"infermon-{name}.json": render(make()) for name, make in DASHBOARDS.items()}


def main(argv: Sequence[str] = ()) -> int:
    out = Path(argv[0]) if argv else OUT
    out.mkdir(parents=True, exist_ok=True)
    for name, text in build().items():
        (out / name).write_text(text)
        print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
