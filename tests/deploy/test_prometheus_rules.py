"""deploy/prometheus/infermon.rules.yml: every alert fires when it should and stays quiet otherwise.

The promtool unit tests are built here, one scenario per rule group, from series shaped like what a
proxy and an agent export (the labels of docs/metrics.md and docs/agent.md, the job and instance a
scrape adds). Each alert is checked at a time before its ``for`` has passed (not firing), after it
(firing), and beside series that must never fire (a healthy model, a node without GPUs, a reason
that does not count). Counters grow by a constant step per scrape, so the ratios and quantiles are
the same whether a range includes its first sample (Prometheus 2) or not (Prometheus 3).

The annotations are left out of the promtool files (their texts are checked by the rule lint below
and rendered by the real Prometheus of test_alerting_e2e.py); the labels are compared exactly.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.promql import (
    DOCS,
    RULE_FILES,
    RUNBOOK_BASE,
    alerts,
    load_yaml,
    metric_names,
    needs_promtool,
    promtool,
    undocumented,
)

RULES = RULE_FILES[0]
SEVERITIES = {"critical", "warning", "info"}
PROXY = {"job": "infermon", "instance": "10.0.0.1:9464"}
PROXY_B = {"job": "infermon", "instance": "10.0.0.2:9464"}
PROXY_C = {"job": "infermon", "instance": "10.0.0.3:9464"}
PROXY_D = {"job": "infermon", "instance": "10.0.0.4:9464"}


def _sel(name: str, **labels: str) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return f"{name}{{{inner}}}"


def _series(name: str, values: str, **labels: str) -> dict[str, str]:
    return {"series": _sel(name, **labels), "values": values}


def _alert(name: str, at: str, *fired: dict[str, str]) -> dict[str, Any]:
    return {"eval_time": at, "alertname": name, "exp_alerts": [{"exp_labels": dict(f)} for f in fired]}


def _expr(alert: str) -> str:
    """The expression of the (first) rule of ``alert`` in the shipped file."""
    expr: str = next(a["expr"] for a in alerts(RULES) if a["alert"] == alert)
    return expr


def _zero(expr: str, at: str, labels: str) -> dict[str, Any]:
    """``expr`` equals the value it is compared with (``expr`` is ``a - value``), to 1e-9."""
    return {"eval_time": at, "expr": f"round({expr}, 1e-9)", "exp_samples": [{"labels": labels, "value": 0}]}


# -- requests, errors, latency, the error budget -------------------------------------------------

IRIS = {"model": "iris", "version": "1", "variant": "stable"}
CALM = {"model": "calm", "version": "1", "variant": "stable"}
#: per scrape interval (1m): iris answers 100 2xx and 5 5xx (4.8 % errors), calm 100 2xx and never a 5xx;
#: iris' durations: 10 within 0.5 s, 10 more within 2.5 s, 80 within 5 s, 5 slower
REQUESTS = [
    _series("infermon_requests_total", "0+100x300", **IRIS, method="POST", code="200", **PROXY),
    _series("infermon_requests_total", "0+5x300", **IRIS, method="POST", code="500", **PROXY),
    _series("infermon_requests_total", "0+100x300", **CALM, method="POST", code="200", **PROXY),
    _series("infermon_requests_total", "0+3x300", **CALM, method="POST", code="499", **PROXY),  # not errors
    *(
        _series("infermon_request_duration_seconds_bucket", f"0+{n}x300", **IRIS, method="POST", code_class="2xx",
                le=le, **PROXY)
        for le, n in (("0.5", 10), ("2.5", 20), ("5.0", 100), ("+Inf", 105))
    ),
    *(
        _series("infermon_request_duration_seconds_bucket", f"0+{n}x300", **CALM, method="POST", code_class="2xx",
                le=le, **PROXY)
        for le, n in (("0.5", 103), ("2.5", 103), ("5.0", 103), ("+Inf", 103))
    ),
    # a stream: the first token within 1 s for half of them, 2.5 s for the rest; gaps of 10 ms or 50 ms
    *(
        _series("infermon_time_to_first_byte_seconds_bucket", f"0+{n}x300", **IRIS, method="POST",
                code_class="2xx", le=le, **PROXY)
        for le, n in (("0.5", 0), ("1.0", 50), ("2.5", 100), ("+Inf", 100))
    ),
    *(
        _series("infermon_stream_chunk_gap_seconds_bucket", f"0+{n}x300", **IRIS, le=le, **PROXY)
        for le, n in (("0.01", 600), ("0.05", 1000), ("+Inf", 1000))
    ),
]  # fmt: skip
BURN = {
    "1h": {"severity": "critical", "long_window": "1h", "short_window": "5m", **IRIS},
    "6h": {"severity": "critical", "long_window": "6h", "short_window": "30m", **IRIS},
    "1d": {"severity": "warning", "long_window": "1d", "short_window": "2h", **IRIS},
    "3d": {"severity": "warning", "long_window": "3d", "short_window": "6h", **IRIS},
}
REQUEST_TESTS: dict[str, Any] = {
    "input_series": REQUESTS,
    "promql_expr_test": [
        *(
            _zero(f'infermon:request_errors:ratio_rate{w}{{model="iris"}} - {5 / 105!r}', "200m", _sel("", **IRIS))
            for w in ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
        ),
        # a model without a single 5xx: 0, not absent (499 is not an error)
        {
            "eval_time": "10m",
            "expr": 'infermon:request_errors:ratio_rate5m{model="calm"}',
            "exp_samples": [{"labels": _sel("infermon:request_errors:ratio_rate5m", **CALM), "value": 0}],
        },
        _zero('infermon:requests:rate5m{model="iris"} - 1.75', "10m", _sel("", **IRIS)),
        # p50 of iris: rank 52.5 of 105 in the (2.5, 5] bucket holding ranks 20..100
        _zero(
            'infermon:request_duration_seconds:quantile_rate5m{model="iris",quantile="0.5"}'
            f" - {2.5 + 32.5 / 80 * 2.5!r}",
            "10m",
            _sel("", **IRIS, quantile="0.5"),
        ),
        # p99 of iris lands above the last finite bound: histogram_quantile answers that bound
        _zero(
            'infermon:request_duration_seconds:quantile_rate5m{model="iris",quantile="0.99"} - 5',
            "10m",
            _sel("", **IRIS, quantile="0.99"),
        ),
        _zero(
            f'infermon:request_duration_seconds:quantile_rate5m{{model="calm",quantile="0.99"}} - {0.5 * 0.99!r}',
            "10m",
            _sel("", **CALM, quantile="0.99"),
        ),
        _zero(
            f'infermon:time_to_first_byte_seconds:quantile_rate5m{{quantile="0.5"}} - {0.5 + 50 / 50 * 0.5!r}',
            "10m",
            _sel("", **IRIS, quantile="0.5"),
        ),
        _zero(
            f'infermon:stream_chunk_gap_seconds:quantile_rate5m{{quantile="0.99"}} - {0.01 + 390 / 400 * 0.04!r}',
            "10m",
            _sel("", **IRIS, quantile="0.99"),
        ),
    ],
    "alert_rule_test": [
        _alert("InfermonErrorBudgetBurn", "2m"),  # true from 1m on, for 2m
        _alert("InfermonErrorBudgetBurn", "5m", BURN["1h"]),
        _alert("InfermonErrorBudgetBurn", "20m", BURN["1h"], BURN["6h"]),
        _alert("InfermonErrorBudgetBurn", "70m", BURN["1h"], BURN["6h"], BURN["1d"]),
        _alert("InfermonErrorBudgetBurn", "200m", BURN["1h"], BURN["6h"], BURN["1d"], BURN["3d"]),
        _alert("InfermonLatencyP99High", "8m"),
        _alert("InfermonLatencyP99High", "15m", {"severity": "warning", "quantile": "0.99", **IRIS}),
    ],
}

# the errors stop at 30m: the short windows end the pages soon after, though the long ones still see them
RECOVERY_TESTS: dict[str, Any] = {
    "input_series": [
        _series("infermon_requests_total", "0+100x200", **IRIS, method="POST", code="200", **PROXY),
        _series("infermon_requests_total", "0+10x30 300+0x170", **IRIS, method="POST", code="500", **PROXY),
    ],
    "alert_rule_test": [
        _alert("InfermonErrorBudgetBurn", "25m", BURN["1h"], BURN["6h"]),
        _alert("InfermonErrorBudgetBurn", "45m", BURN["6h"]),  # 5m window clean; the 30m one not yet
        _alert("InfermonErrorBudgetBurn", "75m", BURN["1d"]),  # the ticket: 4 % of the day's requests failed
    ],
}


# -- the upstream and the targets ----------------------------------------------------------------

SERVICE_TESTS: dict[str, Any] = {
    "input_series": [
        _series("infermon_upstream_up", "1 1 1 0x10", upstream="stable", **PROXY),
        _series("infermon_upstream_up", "1x13", upstream="canary", **PROXY),
        _series("infermon_upstream_up", "1x13", upstream="stable", **PROXY_B),
        _series("infermon_upstream_up", "1 1 1 0x10", upstream="canary", **PROXY_B),
        _series("infermon_upstream_up", "1 0 1 0 1 0 1 0 1 0 1 0 1 0", upstream="stable", **PROXY_C),  # flaps
        _series("up", "1 1 0x11", **PROXY),
        _series("up", "1x13", **PROXY_B),
        _series("up", "0x13", job="infermon-agent", instance="10.0.1.1:9465"),
        _series("up", "1x13", job="infermon-agent", instance="10.0.1.2:9465"),
        _series("up", "0x13", job="node-exporter", instance="10.0.1.1:9100"),  # not infermon's
    ],
    "alert_rule_test": [
        _alert("InfermonUpstreamDown", "3m"),  # 0 from 3m, for 1m
        _alert(
            "InfermonUpstreamDown",
            "5m",
            {"severity": "critical", "upstream": "stable", "variant": "stable", **PROXY},
            {"severity": "warning", "upstream": "canary", "variant": "canary", **PROXY_B},
        ),
        _alert("InfermonProxyDown", "3m"),
        _alert("InfermonProxyDown", "5m", {"severity": "critical", **PROXY}),
        _alert("InfermonAgentDown", "4m"),
        _alert(
            "InfermonAgentDown", "6m", {"severity": "warning", "job": "infermon-agent", "instance": "10.0.1.1:9465"}
        ),
    ],
}


# -- what the monitoring loses -------------------------------------------------------------------

TELEMETRY_TESTS: dict[str, Any] = {
    "input_series": [
        # 5 of 155 samples lost to a full queue (3.2 %); the 50 oversized ones are the rules at work
        _series("infermon_samples_total", "0+100x40", **PROXY),
        _series("infermon_samples_dropped_total", "0+5x40", reason="queue_full", **PROXY),
        _series("infermon_samples_dropped_total", "0+50x40", reason="oversized", **PROXY),
        _series("infermon_samples_total", "0+100x40", **PROXY_B),
        _series("infermon_samples_dropped_total", "0x40", reason="queue_full", **PROXY_B),
        _series("infermon_samples_dropped_total", "0+50x40", reason="unparsable", **PROXY_B),
        # 2 % of the spans lost to the collector; drops at shutdown do not count
        _series("infermon_trace_spans_recorded_total", "0+100x40", **PROXY),
        _series("infermon_trace_spans_dropped_total", "0+2x40", reason="export_failed", **PROXY),
        _series("infermon_trace_spans_dropped_total", "0x40", reason="queue_full", **PROXY),
        _series("infermon_trace_spans_recorded_total", "0+100x40", **PROXY_B),
        _series("infermon_trace_spans_dropped_total", "0x40", reason="export_failed", **PROXY_B),
        _series("infermon_trace_spans_dropped_total", "0+50x40", reason="shutdown", **PROXY_B),
        # a queue that stays full: 97 spans of 100 exported, 3 never queued, and they are not in
        # infermon_trace_spans_recorded_total (it counts the spans handed to the queue)
        _series("infermon_trace_spans_recorded_total", "0+97x40", **PROXY_C),
        _series("infermon_trace_spans_dropped_total", "0+3x40", reason="queue_full", **PROXY_C),
        _series("infermon_trace_spans_dropped_total", "0x40", reason="export_failed", **PROXY_C),
        # a collector so slow that nothing gets into the queue any more: every span lost, 100 %
        _series("infermon_trace_spans_recorded_total", "0x40", **PROXY_D),
        _series("infermon_trace_spans_dropped_total", "0+10x40", reason="queue_full", **PROXY_D),
    ],
    "promql_expr_test": [
        # the alert's value is the share of the spans kept by sampling that were lost
        *(
            _zero(
                f"({_expr('InfermonSpansDropped')}) - {share}"
                f' and on (instance) infermon_trace_spans_recorded_total{{instance="{p["instance"]}"}}',
                "20m",
                _sel("", **p),
            )
            for p, share in ((PROXY, 0.02), (PROXY_C, 0.03), (PROXY_D, 1))
        ),
    ],
    "alert_rule_test": [
        _alert("InfermonSamplesDropped", "10m"),
        _alert("InfermonSamplesDropped", "20m", {"severity": "warning", **PROXY}),
        _alert("InfermonSpansDropped", "10m"),
        _alert(
            "InfermonSpansDropped",
            "20m",
            {"severity": "warning", **PROXY},
            {"severity": "warning", **PROXY_C},
            {"severity": "warning", **PROXY_D},
        ),
    ],
}


# -- the model: drift, quality, canary, probes ----------------------------------------------------

QUALITY_SET = {"model": "churn", "version": "3", "variant": "stable"}
FEW_LABELS = {"model": "fraud", "version": "1", "variant": "stable"}
MODEL_TESTS: dict[str, Any] = {
    "input_series": [
        # age: two replicas of three say drifted; city: one of three; the canary's age: its only replica
        *(
            _series("infermon_feature_drifted", f"{v}x40", variant="stable", feature="age", **p)
            for v, p in ((1, PROXY), (1, PROXY_B), (0, PROXY_C))
        ),
        *(
            _series("infermon_feature_drifted", f"{v}x40", variant="stable", feature="city", **p)
            for v, p in ((1, PROXY), (0, PROXY_B), (0, PROXY_C))
        ),
        _series("infermon_feature_drifted", "1x40", variant="canary", feature="age", **PROXY),
        # stable serves iris version 2 (and a little of version 1); the canary has had no 2xx answer
        _series(
            "infermon_requests_total",
            "0+30x40",
            model="iris",
            version="2",
            variant="stable",
            method="POST",
            code="200",
            **PROXY,
        ),
        _series(
            "infermon_requests_total",
            "0+3x40",
            model="iris",
            version="1",
            variant="stable",
            method="POST",
            code="200",
            **PROXY_B,
        ),
        _series(
            "infermon_requests_total",
            "0+3x40",
            model="iris",
            version="3",
            variant="canary",
            method="POST",
            code="500",
            **PROXY,
        ),
        # churn: accuracy of the hour 0.80 against 0.95 over the day, MAE 2.0 against 1.0; F1 barely moved
        *(
            _series("infermon_model_score", f"{v}x60", metric=m, window=w, **QUALITY_SET, **PROXY)
            for m, w, v in (
                ("accuracy", "1h", 0.8),
                ("accuracy", "1d", 0.95),
                ("f1_macro", "1h", 0.9),
                ("f1_macro", "1d", 0.92),
                ("mae", "1h", 2.0),
                ("mae", "1d", 1.0),
                ("join_rate", "1h", 0.1),
                ("join_rate", "1d", 0.9),
            )
        ),
        _series("infermon_model_score_labels", "500x60", window="1h", **QUALITY_SET, **PROXY),
        _series("infermon_model_score_labels", "5000x60", window="1d", **QUALITY_SET, **PROXY),
        # fraud: a bad hour on 50 labels only
        _series("infermon_model_score", "0.5x60", metric="accuracy", window="1h", **FEW_LABELS, **PROXY),
        _series("infermon_model_score", "0.9x60", metric="accuracy", window="1d", **FEW_LABELS, **PROXY),
        _series("infermon_model_score_labels", "50x60", window="1h", **FEW_LABELS, **PROXY),
        # the canary fails from 2m on; stable passes
        _series("infermon_canary_verdict", "1 1 -1x20", variant="canary", **PROXY),
        _series("infermon_canary_verdict", "1x22", variant="stable", **PROXY),
        _series("infermon_canary_verdict", "1 1 0x20", variant="canary", **PROXY_B),  # inconclusive
        # probe p1 fails from 1m on against both upstreams; p2 passes
        _series("infermon_probe_success", "1 0x20", probe="p1", variant="stable", **PROXY),
        _series("infermon_probe_success", "1 0x20", probe="p1", variant="canary", **PROXY),
        _series("infermon_probe_success", "1x21", probe="p2", variant="stable", **PROXY),
    ],
    "alert_rule_test": [
        _alert("InfermonDriftDetected", "10m"),
        _alert(
            "InfermonDriftDetected",
            "20m",
            {"severity": "warning", "variant": "stable", "feature": "age", "model": "iris", "version": "2"},
            {"severity": "warning", "variant": "canary", "feature": "age"},
        ),
        _alert("InfermonModelScoreLow", "20m"),
        _alert(
            "InfermonModelScoreLow",
            "40m",
            {"severity": "warning", "metric": "accuracy", **QUALITY_SET, **PROXY},
            {"severity": "warning", "metric": "mae", **QUALITY_SET, **PROXY},
        ),
        _alert("InfermonCanaryFailing", "5m"),
        _alert("InfermonCanaryFailing", "8m", {"severity": "warning", "variant": "canary", **PROXY}),
        _alert("InfermonProbeFailing", "2m"),
        _alert(
            "InfermonProbeFailing",
            "4m",
            {"severity": "critical", "probe": "p1", "variant": "stable", **PROXY},
            {"severity": "warning", "probe": "p1", "variant": "canary", **PROXY},
        ),
    ],
}


# -- GPUs and the agent --------------------------------------------------------------------------

AGENT = {"job": "infermon-agent", "instance": "10.0.1.1:9465"}
GPU0 = {"gpu": "0", "uuid": "GPU-aaaa", "model_name": "NVIDIA H100 80GB HBM3", "hostname": "node-1", **AGENT}
GPU1 = {"gpu": "1", "uuid": "GPU-bbbb", "model_name": "NVIDIA H100 80GB HBM3", "hostname": "node-1", **AGENT}
CRITICAL_XIDS = "48|61|62|64|74|79|95|119|120|140"
GPU_TESTS: dict[str, Any] = {
    "input_series": [
        _series("infermon_gpu_memory_used_bytes", "79e9x30", **GPU0),
        _series("infermon_gpu_memory_total_bytes", "80e9x30", **GPU0),
        _series("infermon_gpu_memory_used_bytes", "72e9x30", **GPU1),  # 90 %: a preallocating server
        _series("infermon_gpu_memory_total_bytes", "80e9x30", **GPU1),
        _series("infermon_gpu_temperature_celsius", "90x30", **GPU0),
        _series("infermon_gpu_temperature_celsius", "60x30", **GPU1),
        _series("infermon_gpu_clock_event_reason", "1x30", reason="hw_thermal_slowdown", **GPU0),
        _series("infermon_gpu_clock_event_reason", "1x30", reason="sw_power_cap", **GPU1),  # not heat
        _series("infermon_gpu_clock_event_reason", "0x30", reason="hw_thermal_slowdown", **GPU1),
        # XID 79 appears at 15m with its first event; XID 13 grows at 13m; XID 31 happened before the window
        _series("infermon_gpu_xid_errors_total", "_x15 1x25", xid="79", **GPU0),
        _series("infermon_gpu_xid_errors_total", "0x12 1x27", xid="13", **GPU1),
        _series("infermon_gpu_xid_errors_total", "2x40", xid="31", **GPU0),
        _series("infermon_gpu_row_remap_pending", "1x30", **GPU0),
        _series("infermon_gpu_row_remap_pending", "0x30", **GPU1),
        _series("infermon_gpu_collector_up", "1x30", reason="", **AGENT),
        _series(
            "infermon_gpu_collector_up",
            "0x30",
            reason="driver_not_loaded",
            job="infermon-agent",
            instance="10.0.1.2:9465",
        ),
        _series(
            "infermon_gpu_collector_up",
            "0x30",
            reason="library_not_found",
            job="infermon-agent",
            instance="10.0.1.3:9465",
        ),  # a node without GPUs
        _series("infermon_gpu_last_collection_timestamp_seconds", "0+60x30", **AGENT),
        _series(
            "infermon_gpu_last_collection_timestamp_seconds",
            "0 60 120x28",
            job="infermon-agent",
            instance="10.0.1.4:9465",
        ),  # hung after 2m
    ],
    "alert_rule_test": [
        _alert("InfermonGpuMemoryNearlyFull", "10m"),
        _alert("InfermonGpuMemoryNearlyFull", "20m", {"severity": "warning", **GPU0}),
        _alert("InfermonGpuTooHot", "3m"),
        _alert("InfermonGpuTooHot", "6m", {"severity": "warning", **GPU0}),
        _alert("InfermonGpuThermalThrottling", "3m"),
        _alert("InfermonGpuThermalThrottling", "6m", {"severity": "warning", "reason": "hw_thermal_slowdown", **GPU0}),
        _alert("InfermonGpuXidErrors", "14m", {"severity": "warning", "xid": "13", **GPU1}),
        _alert(
            "InfermonGpuXidErrors",
            "16m",
            {"severity": "critical", "xid": "79", **GPU0},
            {"severity": "warning", "xid": "13", **GPU1},
        ),
        _alert("InfermonGpuXidErrors", "30m"),  # no new event in the last 10 minutes
        _alert("InfermonGpuRowRemapPending", "5m"),
        _alert("InfermonGpuRowRemapPending", "12m", {"severity": "warning", **GPU0}),
        _alert("InfermonGpuCollectorDown", "3m"),
        _alert(
            "InfermonGpuCollectorDown",
            "6m",
            {
                "severity": "warning",
                "reason": "driver_not_loaded",
                "job": "infermon-agent",
                "instance": "10.0.1.2:9465",
            },
        ),
        _alert("InfermonGpuCollectorStale", "6m"),  # stale from 4m (more than 60 s), for 5m
        _alert(
            "InfermonGpuCollectorStale",
            "10m",
            {"severity": "warning", "job": "infermon-agent", "instance": "10.0.1.4:9465"},
        ),
    ],
}

SCENARIOS = {
    "requests": REQUEST_TESTS,
    "recovery": RECOVERY_TESTS,
    "service": SERVICE_TESTS,
    "telemetry": TELEMETRY_TESTS,
    "model": MODEL_TESTS,
    "gpu": GPU_TESTS,
}


def _without_annotations(tmp_path: Path) -> Path:
    doc = load_yaml(RULES)
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    path = tmp_path / "infermon.rules.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False, width=1000))
    return path


def _unit(rules: Path, scenario: dict[str, Any]) -> dict[str, Any]:
    return {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", **scenario}],
    }


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    count = sum(len(g["rules"]) for g in load_yaml(RULES)["groups"])
    assert f"SUCCESS: {count} rules found" in result.stdout


@needs_promtool
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_alerts_fire_and_stay_quiet(tmp_path: Path, scenario: str) -> None:
    path = tmp_path / f"{scenario}.test.yml"
    path.write_text(yaml.safe_dump(_unit(_without_annotations(tmp_path), SCENARIOS[scenario]), sort_keys=False))
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    for scenario in SCENARIOS.values():
        for test in scenario.get("alert_rule_test", []):
            (fired if test["exp_alerts"] else quiet).add(test["alertname"])
    names = {a["alert"] for a in alerts(RULES)}
    assert names - fired == set(), "never seen firing"
    assert names - quiet == set(), "never seen quiet"


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_alerts_have_a_severity_a_summary_a_description_and_their_runbook(path: Path) -> None:
    runbook = (DOCS / "alerts.md").read_text()
    headings = set(re.findall(r"^### (Infermon\w+)$", runbook, flags=re.M))
    for alert in alerts(path):
        name = alert["alert"]
        assert alert["labels"]["severity"] in SEVERITIES, name
        assert set(alert["annotations"]) == {"summary", "description", "runbook_url"}, name
        assert alert["annotations"]["runbook_url"] == f"{RUNBOOK_BASE}#{name.lower()}", name
        assert name in headings, f"{name} has no section in docs/alerts.md"


def test_docs_describe_exactly_the_shipped_alerts() -> None:
    runbook = (DOCS / "alerts.md").read_text()
    headings = set(re.findall(r"^### (Infermon\w+)$", runbook, flags=re.M))
    shipped = {a["alert"] for path in RULE_FILES for a in alerts(path)}
    assert headings == shipped


def test_annotations_name_only_labels_the_alert_has() -> None:
    """A ``{{ $labels.x }}`` outside a ``with`` must be one of the labels the firing test saw."""
    seen: dict[str, set[str]] = {}
    for scenario in SCENARIOS.values():
        for test in scenario.get("alert_rule_test", []):
            for exp in test["exp_alerts"]:
                labels = set(exp["exp_labels"])
                seen[test["alertname"]] = seen.get(test["alertname"], labels) & labels
    for alert in alerts(RULES):
        text = " ".join(alert["annotations"].values())
        bare = re.sub(r"\{\{-? with \$labels\.\w+ \}\}.*?\{\{ end \}\}", "", text, flags=re.S)
        used = set(re.findall(r"\$labels\.(\w+)", bare))
        assert used <= seen[alert["alert"]], (alert["alert"], used - seen[alert["alert"]])


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_rules_read_only_documented_metrics(path: Path) -> None:
    names: set[str] = set()
    for group in load_yaml(path)["groups"]:
        for rule in group["rules"]:
            names |= metric_names(rule["expr"])
    assert names
    assert undocumented(names) == set()


def test_the_slo_alerts_follow_the_workbook() -> None:
    """Each burn rate with its long and short window; the short one is a twelfth of the long one."""
    burns = {(a["labels"]["long_window"], a["labels"]["short_window"]): a for a in alerts(RULES)
             if a["alert"] == "InfermonErrorBudgetBurn"}  # fmt: skip
    assert set(burns) == {("1h", "5m"), ("6h", "30m"), ("1d", "2h"), ("3d", "6h")}
    factors = {"1h": "14.4", "6h": "6", "1d": "3", "3d": "1"}
    for (long, short), alert in burns.items():
        expr = alert["expr"]
        assert f"ratio_rate{long} > ({factors[long]} * 0.001)" in expr
        assert f"ratio_rate{short} > ({factors[long]} * 0.001)" in expr
        assert alert["labels"]["severity"] == ("critical" if long in ("1h", "6h") else "warning")


def test_the_documented_way_to_point_the_runbook_links_elsewhere_works(tmp_path: Path) -> None:
    """docs/alerts.md, "Runbook links": its command moves every link to another base, anchors kept."""
    section = (DOCS / "alerts.md").read_text().split("## Runbook links", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```\n(.*?)```", section, flags=re.S)
    argv = shlex.split(block.replace("\\\n", " "))
    assert argv[:2] == ["sed", "-i"] and argv[-1] == "deploy/prometheus/*.rules.yml", argv
    new_base = re.fullmatch(r"s#(.+?)#(.+?)#", argv[2])
    assert new_base is not None and new_base.group(1).replace("\\", "") == RUNBOOK_BASE
    copies = []
    for path in RULE_FILES:
        copies.append(tmp_path / path.name)
        shutil.copy(path, copies[-1])
    subprocess.run([*argv[:-1], *map(str, copies)], check=True, timeout=30)
    for copy in copies:
        assert RUNBOOK_BASE not in copy.read_text()
        for alert in alerts(copy):
            assert alert["annotations"]["runbook_url"] == f"{new_base.group(2)}#{alert['alert'].lower()}"
