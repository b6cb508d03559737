"""deploy/flagger and deploy/argo: the progressive-rollout manifests, checked offline.

What a cluster would check first is checked here: apiVersion and kind, the fields the Flagger and Argo
Rollouts CRDs require (spec.required, items.required, the interval patterns), that every template a
resource references exists and gets every variable it uses, that every query, once its template
variables are filled in, parses as PromQL (`promtool check rules`), and that it only uses the metrics
and labels infermon exports. The verdict's mapping onto Argo's Successful / Failed / Inconclusive is
replayed with Argo's own counting rules (failureLimit, inconclusiveLimit, count) over every sequence
of verdicts a run can see.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
FLAGGER_TEMPLATES = DEPLOY / "flagger" / "metric-template.yaml"
FLAGGER_CANARY = DEPLOY / "flagger" / "canary.yaml"
ARGO_TEMPLATE = DEPLOY / "argo" / "analysis-template.yaml"
ARGO_ROLLOUT = DEPLOY / "argo" / "rollout.yaml"
PROMTOOL = shutil.which("promtool")
# CI installs promtool (Debian's prometheus package): there a missing promtool is a failure, not a skip
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None and not os.environ.get("CI"), reason="promtool not installed (apt-get install prometheus)"
)

#: the metrics the manifests may use, with their labels: infermon's exposition plus the `pod` and
#: `namespace` labels Prometheus adds to every series of a scraped pod
SCRAPE_LABELS = frozenset({"pod", "namespace"})
CONTRACT: dict[str, frozenset[str]] = {
    "infermon_canary_verdict": frozenset({"variant"}),
    "infermon_canary_check": frozenset({"variant", "check"}),
    "infermon_feature_drifted": frozenset({"variant", "feature"}),
    "infermon_requests_total": frozenset({"model", "version", "variant", "method", "code"}),
    "infermon_request_duration_seconds_bucket": frozenset(
        {"model", "version", "variant", "method", "code_class", "le"}
    ),
}
VERDICTS = (-1, 0, 1)  # fail, inconclusive, pass

# sample values for the template variables
NAMESPACE = "ml"
TARGET = "iris"
GATEWAY = "iris-infermon"  # the verdict template's infermon, the one that sees both variants
#: the template of one-infermon topologies, which the sidecar Canary does not use
VERDICT = "infermon-canary-verdict"
#: Flagger's pod names: the canary's <target>-<hash>-<hash>, the primary's <target>-primary-<hash>-<hash>
CANARY_POD = re.compile(r"iris-[0-9a-zA-Z]+(-[0-9a-zA-Z]+)")
PRIMARY_POD = re.compile(r"iris-primary-[0-9a-zA-Z]+(-[0-9a-zA-Z]+)")

# Flagger CRD (flagger.app/v1beta1): Canary spec.analysis.interval and metrics[].interval pattern
FLAGGER_INTERVAL = re.compile(r"^[0-9]+(m|s)")
FLAGGER_PROVIDERS = {"prometheus", "influxdb", "datadog", "externalmetrics", "stackdriver", "cloudwatch",
                     "newrelic", "graphite", "dynatrace", "keptn", "splunk"}  # fmt: skip
# Argo Rollouts CRD: the keys one canary step may have (exactly one of them)
ARGO_STEP_KINDS = {"analysis", "experiment", "pause", "plugin", "setCanaryScale", "setHeaderRoute",
                   "setMirrorRoute", "setWeight"}  # fmt: skip
DURATION = re.compile(r"^[0-9]+(ms|s|m|h)$")


def _docs(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} has no YAML document"
    assert all(isinstance(d, dict) for d in docs)
    return docs


def _only(path: Path, kind: str) -> dict[str, Any]:
    docs = _docs(path)
    assert len(docs) == 1 and docs[0]["kind"] == kind, path
    return docs[0]


def _flagger_templates() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in _docs(FLAGGER_TEMPLATES)}


# -- apiVersion, kind, required fields --------------------------------------------------------------


def test_every_document_has_the_api_version_and_kind_of_its_crd() -> None:
    expected = {
        FLAGGER_TEMPLATES: ("flagger.app/v1beta1", "MetricTemplate"),
        FLAGGER_CANARY: ("flagger.app/v1beta1", "Canary"),
        ARGO_TEMPLATE: ("argoproj.io/v1alpha1", "AnalysisTemplate"),
        ARGO_ROLLOUT: ("argoproj.io/v1alpha1", "Rollout"),
    }
    for path, (api, kind) in expected.items():
        for doc in _docs(path):
            assert (doc["apiVersion"], doc["kind"]) == (api, kind), path
            assert isinstance(doc["metadata"]["name"], str) and doc["metadata"]["name"], path
            assert "spec" in doc, path
    # every YAML file under deploy/flagger and deploy/argo is one of these
    assert set((DEPLOY / "flagger").glob("*.y*ml")) | set((DEPLOY / "argo").glob("*.y*ml")) == set(expected)


def test_flagger_metric_templates() -> None:
    templates = _flagger_templates()
    assert set(templates) == {
        VERDICT, "infermon-error-rate", "infermon-latency-p99", "infermon-latency-ratio", "infermon-drift"
    }
    assert len(_docs(FLAGGER_TEMPLATES)) == len(templates)  # no name twice
    for name, t in templates.items():
        spec = t["spec"]
        assert {"provider", "query"} <= set(spec), name  # spec.required
        assert spec["provider"]["type"] == "prometheus" and spec["provider"]["type"] in FLAGGER_PROVIDERS
        assert spec["provider"]["address"].startswith("http"), name
        assert isinstance(spec["query"], str)
        for field in re.findall(r"\{\{\s*([a-z]+)", spec["query"]):
            assert field in {"namespace", "target", "interval", "variables"}, (name, field)
        # the window is the Canary's, the scope the Canary's namespace and target
        assert "{{ interval }}" in spec["query"] and "{{ namespace }}" in spec["query"], name
        # the sidecar templates select the target's pods; the verdict, the infermon that sees both
        assert ("{{ variables.infermon }}" if name == VERDICT else "{{ target }}") in spec["query"], name


def test_flagger_canary() -> None:
    canary = _only(FLAGGER_CANARY, "Canary")
    spec = canary["spec"]
    assert {"targetRef", "analysis"} <= set(spec)  # spec.required
    assert {"apiVersion", "kind", "name"} <= set(spec["targetRef"])
    assert "port" in spec["service"]  # service.required
    analysis = spec["analysis"]
    # analysis oneOf: interval + threshold + one of iterations / stepWeight / stepWeights
    assert {"interval", "threshold"} <= set(analysis)
    assert sum(k in analysis for k in ("iterations", "stepWeight", "stepWeights")) == 1
    assert FLAGGER_INTERVAL.match(analysis["interval"])
    assert analysis["threshold"] >= 1
    templates = _flagger_templates()
    metrics = {m["name"]: m for m in analysis["metrics"]}
    assert len(metrics) == len(analysis["metrics"])
    # a sidecar sees only its own pod: every template but the one-infermon verdict
    assert {m["templateRef"]["name"] for m in metrics.values()} == set(templates) - {VERDICT}
    for name, m in metrics.items():
        ref = m["templateRef"]["name"]
        # the templates use {{ interval }}: a metric without one would render an empty range
        assert FLAGGER_INTERVAL.match(m["interval"]), name
        # missingkey=error: every {{ variables.x }} of the template must be given
        used = set(re.findall(r"\{\{\s*variables\.(\w+)\s*\}\}", templates[ref]["spec"]["query"]))
        assert used <= set(m.get("templateVariables", {})), (name, used)
        assert all(isinstance(v, str) for v in m.get("templateVariables", {}).values())
        tr = m["thresholdRange"]
        assert set(tr) <= {"min", "max"} and tr, name
        assert all(isinstance(v, (int, float)) for v in tr.values()), name


def _flagger_passes(threshold_range: dict[str, float], value: float) -> bool:
    """Flagger's runMetricChecks: a value below min or above max halts the advancement."""
    return not ("min" in threshold_range and value < threshold_range["min"]) and not (
        "max" in threshold_range and value > threshold_range["max"]
    )


def test_flagger_advances_on_a_pass_only() -> None:
    metrics = {m["templateRef"]["name"]: m for m in _only(FLAGGER_CANARY, "Canary")["spec"]["analysis"]["metrics"]}
    # the verdict template's documented range: only a pass advances
    assert {v: _flagger_passes({"min": 1}, v) for v in VERDICTS} == {-1: False, 0: False, 1: True}
    assert "thresholdRange:\n  min: 1" in FLAGGER_TEMPLATES.read_text() or "thresholdRange min: 1" in (
        FLAGGER_TEMPLATES.read_text()
    )
    # error rate in percent, p99 in milliseconds, the median ratio: upper bounds
    assert set(metrics["infermon-error-rate"]["thresholdRange"]) == {"max"}
    assert 0 < metrics["infermon-error-rate"]["thresholdRange"]["max"] < 100
    assert set(metrics["infermon-latency-p99"]["thresholdRange"]) == {"max"}
    assert metrics["infermon-latency-ratio"]["thresholdRange"] == {"max": 1.2}
    # one column drifted on the canary and not on the primary halts the advancement
    drift = metrics["infermon-drift"]["thresholdRange"]
    assert {v: _flagger_passes(drift, v) for v in (-2, 0, 1)} == {-2: True, 0: True, 1: False}


def test_the_pod_patterns_tell_flaggers_canary_pods_from_the_primarys() -> None:
    text = FLAGGER_TEMPLATES.read_text().replace("{{ target }}", TARGET)
    assert CANARY_POD.pattern in text and PRIMARY_POD.pattern in text
    # PromQL matches the whole label value, as fullmatch does
    for pod, canary, primary in (
        ("iris-7d9f8c6b5-x2x9q", True, False),
        ("iris-primary-5b7c9d8f7-abcde", False, True),
        ("iris-infermon-5b7c9-abcde", False, False),  # three parts after the target: never the canary
        ("iris2-7d9f8-fghij", False, False),
    ):
        assert (CANARY_POD.fullmatch(pod) is not None, PRIMARY_POD.fullmatch(pod) is not None) == (canary, primary), pod


def test_argo_analysis_template() -> None:
    t = _only(ARGO_TEMPLATE, "AnalysisTemplate")
    spec = t["spec"]
    assert "metrics" in spec  # spec.required (metrics or templates)
    args = {a["name"]: a for a in spec["args"]}  # args[].required: name
    assert len(args) == len(spec["args"])
    assert {"namespace", "variant"} <= set(args)
    for m in spec["metrics"]:
        assert {"name", "provider"} <= set(m)  # metrics[].required
        prom = m["provider"]["prometheus"]
        assert prom["address"].startswith("http") and isinstance(prom["query"], str)
        assert DURATION.match(m["interval"])
        for key in ("count", "failureLimit", "inconclusiveLimit", "consecutiveErrorLimit"):
            assert isinstance(m.get(key, 0), int), key
        # every {{args.x}} the query uses is declared
        used = set(re.findall(r"\{\{\s*args\.([\w-]+)\s*\}\}", prom["query"]))
        assert used <= set(args), used
        assert {"namespace", "variant"} <= used
        # `count > 1` requires an interval (CRD description), and a run must end for an inline step
        assert m["count"] > 1
    for name in ("window",):
        if name in args:
            assert DURATION.match(args[name]["value"])


def _argo_outcome(metric: dict[str, Any], value: int) -> str:
    """Argo's EvaluateResult for one measurement whose result is [value]."""

    def holds(condition: str) -> bool:
        m = re.fullmatch(r"result\[0\]\s*(==|>=|<=|<|>)\s*(-?\d+(?:\.\d+)?)", condition.strip())
        assert m, f"condition outside what this test can replay: {condition}"
        op, bound = m.group(1), float(m.group(2))
        return {"==": value == bound, ">=": value >= bound, "<=": value <= bound, "<": value < bound,
                ">": value > bound}[op]  # fmt: skip

    success = holds(metric["successCondition"]) if metric.get("successCondition") else None
    failure = holds(metric["failureCondition"]) if metric.get("failureCondition") else None
    if success is None and failure is None:
        return "Successful"
    if failure is None:
        failure = not success
    if success is None:
        success = not failure
    if failure:
        return "Failed"
    return "Successful" if success else "Inconclusive"


def _argo_run(metric: dict[str, Any], verdicts: tuple[int, ...]) -> str:
    """Argo's assessMetricStatus after each measurement, until the metric completes."""
    failed = inconclusive = 0
    for i, v in enumerate(verdicts, start=1):
        outcome = _argo_outcome(metric, v)
        failed += outcome == "Failed"
        inconclusive += outcome == "Inconclusive"
        phase = None
        if failed > metric.get("failureLimit", 0):
            phase = "Failed"
        if inconclusive > metric.get("inconclusiveLimit", 0):
            phase = "Inconclusive"  # Argo checks it after the failure limit: it wins
        if phase:
            return phase
        if i >= metric["count"]:
            return "Successful"
    return "Running"


def test_argo_maps_the_verdict_onto_pass_fail_and_inconclusive() -> None:
    metric = _only(ARGO_TEMPLATE, "AnalysisTemplate")["spec"]["metrics"][0]
    assert {v: _argo_outcome(metric, v) for v in VERDICTS} == {-1: "Failed", 0: "Inconclusive", 1: "Successful"}
    count, limit = metric["count"], metric["inconclusiveLimit"]
    assert metric["failureLimit"] == 0  # one fail is enough
    assert 1 <= limit < count - limit  # some inconclusive tolerated, but a pass needs a majority of passes
    for verdicts in itertools.product(VERDICTS, repeat=count):
        phase = _argo_run(metric, verdicts)
        if phase == "Successful":
            # too little data never promotes: no fail, and at most `limit` inconclusive
            assert -1 not in verdicts and verdicts.count(1) >= count - limit, verdicts
        first_fail = verdicts.index(-1) if -1 in verdicts else None
        over_limit = [i for i, v in enumerate(verdicts) if v == 0][limit : limit + 1]
        if first_fail is not None and not (over_limit and over_limit[0] < first_fail):
            assert phase == "Failed", verdicts
    assert _argo_run(metric, (1,) * count) == "Successful"
    assert _argo_run(metric, (0,) * count) == "Inconclusive"
    assert _argo_run(metric, (1,) * (count - 1) + (-1,)) == "Failed"


def test_argo_rollout() -> None:
    rollout = _only(ARGO_ROLLOUT, "Rollout")
    spec = rollout["spec"]
    assert "selector" in spec and "template" in spec
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    template = _only(ARGO_TEMPLATE, "AnalysisTemplate")
    required_args = {a["name"] for a in template["spec"]["args"] if "value" not in a and "valueFrom" not in a}
    steps = spec["strategy"]["canary"]["steps"]
    weights: list[int] = []
    analysed_after: list[int] = []
    for step in steps:
        assert len(step) == 1 and set(step) <= ARGO_STEP_KINDS, step
        if "setWeight" in step:
            assert isinstance(step["setWeight"], int) and 0 < step["setWeight"] <= 100
            weights.append(step["setWeight"])
        if "pause" in step:
            assert DURATION.match(step["pause"]["duration"])
        if "analysis" in step:
            a = step["analysis"]
            assert [t["templateName"] for t in a["templates"]] == [template["metadata"]["name"]]
            given = {arg["name"]: arg for arg in a["args"]}  # args[].required: name
            assert required_args <= set(given), required_args - set(given)
            assert set(given) <= {arg["name"] for arg in template["spec"]["args"]}
            assert given["namespace"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
            analysed_after.append(weights[-1])
    assert weights == sorted(weights) and len(set(weights)) == len(weights)
    assert analysed_after == weights  # every weight is analysed before the next one


# -- the queries: PromQL and the metric contract ---------------------------------------------------


def _render_flagger(query: str, interval: str, variables: dict[str, str]) -> str:
    values = {"namespace": NAMESPACE, "target": TARGET, "interval": interval}

    def sub(m: re.Match[str]) -> str:
        key = m.group(1)
        if key.startswith("variables."):
            return variables[key.removeprefix("variables.")]
        return values[key]

    return re.sub(r"\{\{\s*([\w.]+)\s*\}\}", sub, query)


def _render_argo(query: str, args: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*args\.([\w-]+)\s*\}\}", lambda m: args[m.group(1)], query)


def _queries() -> dict[str, str]:
    """Every query as the controllers would send it, with this file's sample values."""
    out: dict[str, str] = {}
    templates = _flagger_templates()
    for m in _only(FLAGGER_CANARY, "Canary")["spec"]["analysis"]["metrics"]:
        query = templates[m["templateRef"]["name"]]["spec"]["query"]
        out[f"flagger {m['name']}"] = _render_flagger(query, m["interval"], m.get("templateVariables", {}))
    # the verdict template, as a Canary of the one-infermon topology would call it
    variables = {"variant": "canary", "infermon": GATEWAY}
    out[f"flagger {VERDICT}"] = _render_flagger(templates[VERDICT]["spec"]["query"], "1m", variables)
    template = _only(ARGO_TEMPLATE, "AnalysisTemplate")
    defaults = {a["name"]: a["value"] for a in template["spec"]["args"] if "value" in a}
    for step in _only(ARGO_ROLLOUT, "Rollout")["spec"]["strategy"]["canary"]["steps"]:
        if "analysis" not in step:
            continue
        args = dict(defaults)
        for arg in step["analysis"]["args"]:
            args[arg["name"]] = arg.get("value", NAMESPACE)  # the fieldRef reads the namespace
        for metric in template["spec"]["metrics"]:
            out[f"argo {metric['name']} {sorted(args.items())}"] = _render_argo(
                metric["provider"]["prometheus"]["query"], args
            )
    return out


def test_the_queries_render_completely() -> None:
    queries = _queries()
    assert len([k for k in queries if k.startswith("flagger")]) == 5
    for name, q in queries.items():
        assert "{{" not in q and "}}" not in q, name
        assert f'namespace="{NAMESPACE}"' in q, name
        # the one-infermon queries name the variant; the sidecar ones the target's pods
        assert ('variant="canary"' in q) == ("infermon_canary_verdict" in q), name
        assert 'variant="canary"' in q or f'pod=~"{TARGET}-' in q, name


def test_the_queries_use_only_infermon_metrics_and_labels() -> None:
    seen: set[str] = set()
    for name, q in _queries().items():
        # every metric name in the query, selector or not
        names = set(re.findall(r"\binfermon_\w+", q))
        assert names and names <= set(CONTRACT), (name, names - set(CONTRACT))
        seen |= names
        for metric, selector in re.findall(r"\b(infermon_\w+)\s*\{([^}]*)\}", q):
            labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", selector))
            assert labels <= CONTRACT[metric] | SCRAPE_LABELS, (name, metric, labels)
            assert {"namespace"} <= labels and ({"variant", "pod"} & labels), (name, metric)
        for grouping in re.findall(r"\bby\s*\(([^)]*)\)", q):
            assert {g.strip() for g in grouping.split(",")} <= {"le", "pod"}, name
    assert seen >= {
        "infermon_canary_verdict",
        "infermon_requests_total",
        "infermon_request_duration_seconds_bucket",
        "infermon_feature_drifted",
    }


def test_no_verdict_reads_as_inconclusive() -> None:
    for name, q in _queries().items():
        if "infermon_canary_verdict" in q:
            assert q.rstrip().endswith("or vector(0)"), name


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None, "promtool is missing: CI must install it (apt-get install prometheus)"
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, check=False)


@needs_promtool
def test_promtool_parses_every_query(tmp_path: Path) -> None:
    queries = _queries()
    rules = [{"record": f"infermon_rollout_query:{i}", "expr": q} for i, q in enumerate(queries.values())]
    path = tmp_path / "rollout-queries.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "rollout-queries", "rules": rules}]}, width=1000))
    result = _promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr + "\n" + "\n".join(queries)
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


@needs_promtool
def test_promtool_rejects_a_broken_query(tmp_path: Path) -> None:
    """The check above would catch a query that does not parse."""
    path = tmp_path / "broken.rules.yml"
    broken = {"record": "infermon_rollout_query:broken", "expr": 'min(infermon_canary_verdict{variant="canary"}[1m]'}
    path.write_text(yaml.safe_dump({"groups": [{"name": "broken", "rules": [broken]}]}))
    assert _promtool("check", "rules", str(path)).returncode != 0


@needs_promtool
def test_the_verdict_query_takes_the_worst_replica_and_reads_no_verdict_as_0(tmp_path: Path) -> None:
    """The Flagger verdict query, evaluated by promtool on two replicas, a neighbour and another variant."""
    query = next(q for k, q in _queries().items() if k == "flagger infermon-canary-verdict")

    def series(pod: str, variant: str, values: str, namespace: str = NAMESPACE) -> dict[str, str]:
        labels = f'namespace="{namespace}",pod="{pod}",variant="{variant}"'
        return {"series": f"infermon_canary_verdict{{{labels}}}", "values": values}

    unit = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    # replica a passes throughout; replica b passes, fails at 5m, passes again from 6m (6m itself is
                    # left out: Prometheus 2 and 3 differ on whether the window includes its start)
                    series(f"{GATEWAY}-5b7c9-abcde", "canary", "1x20"),
                    series(f"{GATEWAY}-7d9f8-fghij", "canary", "_x2 1x2 -1 1x15"),
                    # not this infermon's, not this variant, not this namespace: never counted
                    series("other-7d9f8-klmno", "canary", "-1x20"),
                    series(f"{GATEWAY}-7d9f8-fghij", "stable", "-1x20"),
                    series(f"{GATEWAY}-7d9f8-fghij", "canary", "-1x20", namespace="other"),
                ],
                "promql_expr_test": [
                    {"expr": query, "eval_time": t, "exp_samples": [{"labels": "{}", "value": v}]}
                    for t, v in (("3m", 1), ("5m", -1), ("8m", 1))
                ],
            },
            {
                "interval": "1m",
                "input_series": [series(f"{GATEWAY}-5b7c9-abcde", "stable", "1x5")],
                # no canary verdict at all: inconclusive, never a pass
                "promql_expr_test": [{"expr": query, "eval_time": "3m", "exp_samples": [{"labels": "{}", "value": 0}]}],
            },
        ],
    }
    path = tmp_path / "verdict.test.yml"
    path.write_text(yaml.safe_dump(unit, sort_keys=False, width=1000))
    result = _promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_the_sidecar_queries_compare_the_canarys_pods_with_the_primarys(tmp_path: Path) -> None:
    """The error-rate, median-ratio and drift queries of the sidecar Canary, evaluated by promtool on
    two canary pods, two primary pods and a neighbour."""
    queries = _queries()
    canary_a, canary_b = f"{TARGET}-7d9f8-fghij", f"{TARGET}-7d9f8-klmno"
    primary = f"{TARGET}-primary-5b7c9-abcde"
    neighbour = f"{TARGET}2-7d9f8-fghij"

    def requests(pod: str, code: str, per_minute: int) -> dict[str, str]:
        labels = f'namespace="{NAMESPACE}",pod="{pod}",variant="stable",code="{code}",method="POST"'
        return {"series": f"infermon_requests_total{{{labels}}}", "values": f"0+{per_minute}x10"}

    def bucket(pod: str, le: str, per_minute: int) -> dict[str, str]:
        labels = f'namespace="{NAMESPACE}",pod="{pod}",variant="stable",code_class="2xx",method="POST",le="{le}"'
        return {"series": f"infermon_request_duration_seconds_bucket{{{labels}}}", "values": f"0+{per_minute}x10"}

    def drifted(pod: str, feature: str, value: int) -> dict[str, str]:
        labels = f'namespace="{NAMESPACE}",pod="{pod}",variant="stable",feature="{feature}"'
        return {"series": f"infermon_feature_drifted{{{labels}}}", "values": f"{value}x10"}

    series = [
        # canary pods: 90 + 90 answers a minute, 18 of them 5xx: 10%; the primary's 1 in 100; the neighbour all 5xx
        requests(canary_a, "200", 81), requests(canary_a, "500", 9),
        requests(canary_b, "200", 81), requests(canary_b, "503", 9),
        requests(primary, "200", 99), requests(primary, "500", 1),
        requests(neighbour, "500", 100),
        # the canary's answers all in (0.5, 1]: median 0.75 s; the primary's in (0, 0.5]: median 0.25 s
        *(bucket(p, le, n) for p in (canary_a, canary_b) for le, n in (("0.5", 0), ("1", 60), ("+Inf", 60))),
        *(bucket(primary, le, n) for le, n in (("0.5", 60), ("1", 60), ("+Inf", 60))),
        *(bucket(neighbour, le, n) for le, n in (("0.5", 0), ("1", 0), ("+Inf", 60))),
        # both sides see the input drift on f1; only canary_b's predictions drifted
        drifted(canary_a, "f1", 1), drifted(canary_a, "prediction", 0),
        drifted(canary_b, "f1", 1), drifted(canary_b, "prediction", 1),
        drifted(primary, "f1", 1), drifted(primary, "prediction", 0),
        drifted(neighbour, "prediction", 1), drifted(neighbour, "f2", 1),
    ]  # fmt: skip

    def sample(name: str, value: float) -> dict[str, Any]:
        expected = [{"labels": "{}", "value": value}]
        return {"expr": queries[f"flagger {name}"], "eval_time": "5m", "exp_samples": expected}

    unit = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [
                    sample("infermon-error-rate", 10),
                    sample("infermon-latency-ratio", 3),  # 0.75 / 0.25
                    sample("infermon-drift", 1),  # canary_b: 2 columns, the primary: 1
                ],
            },
            {
                "interval": "1m",
                # no drift decision anywhere yet: 0, the advancement goes on
                "input_series": [requests(primary, "200", 10)],
                "promql_expr_test": [sample("infermon-drift", 0)],
            },
        ],
    }
    path = tmp_path / "sidecar.test.yml"
    path.write_text(yaml.safe_dump(unit, sort_keys=False, width=1000))
    result = _promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_flagger_service_reaches_infermon_not_the_model() -> None:
    """The Canary's targetPort is the port infermon listens on in the shipped pod, so every request
    passes the sidecar whose metrics the templates read."""
    deployment = _only(DEPLOY / "k8s" / "base" / "deployment.yaml", "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    containers = [*pod.get("initContainers", []), *pod["containers"]]
    infermon = next(c for c in containers if c["name"] == "infermon")
    args = infermon["args"]
    listen = int(args[args.index("--listen") + 1].rsplit(":", 1)[1])
    service = _only(FLAGGER_CANARY, "Canary")["spec"]["service"]
    assert service["targetPort"] == listen
    model_ports = {p["containerPort"] for c in containers if c["name"] != "infermon" for p in c.get("ports", [])}
    assert service["targetPort"] not in model_ports
