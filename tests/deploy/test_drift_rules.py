"""deploy/prometheus/drift.rules.yml: the fleet PSI Prometheus computes equals proxy.drift.stats.psi.

The promtool unit test is generated here: bin counters of three replicas (one restarts mid-window),
reference ratios from real profiles, and as expected value the PSI that the Python code computes from
the same summed counts. Every series grows by a constant step per scrape, so the counts in the window
are the same whether the range selector includes its start (Prometheus 2) or not (Prometheus 3).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.drift.profile import OTHER_BIN, FeatureProfile, build_profile
from proxy.drift.stats import PSI_EPSILON, psi

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "drift.rules.yml"
PROMTOOL = shutil.which("promtool")
# CI installs promtool (Debian's prometheus package): there a missing promtool is a failure, not a skip
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None and not os.environ.get("CI"), reason="promtool not installed (apt-get install prometheus)"
)
STEPS = 90  # one scrape a minute, 0m .. 90m
WINDOW = 60  # the rules' [1h], in steps
TOLERANCE = 1e-9  # the Go and C logarithms and the order of the sums may differ in the last bits


def _rules() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return {r.get("record") or r["alert"]: r for g in doc["groups"] for r in g["rules"]}


def _references() -> dict[str, FeatureProfile]:
    """Reference profiles of a numeric and a categorical feature, made as `infermon baseline build` makes them."""
    r = random.Random(0)
    cities = ["paris"] * 50 + ["lyon"] * 30 + ["nice"] * 15 + ["lille"] * 3 + ["brest"] * 2
    rows = [{"age": r.gauss(40, 10), "city": cities[i % 100], "kids": i % 3} for i in range(1000)]
    profile = build_profile(rows, bins=4, top_k=3)
    refs = {f.name: f for f in profile.features}
    assert refs["age"].bins() == ["0", "1", "2", "3"]
    assert refs["city"].bins() == ["paris", "lyon", "nice", OTHER_BIN]
    assert refs["kids"].bins() == ["0", "1", "2"]
    return refs


#: live rows per scrape interval, per feature, per replica, per bin (None: that replica has no such series)
LIVE: dict[str, list[list[int | None]]] = {
    # shifted to the upper bins, and nobody saw a value of bin 0 (an empty bin: clamped to 1e-4): drifted
    "age": [[0, 2, 5, 9], [0, 1, 4, 8], [0, 1, 6, 10]],
    # close to the reference: not drifted
    "city": [[10, 6, 3, 1], [9, 6, 2, 1], [11, 5, 4, 1]],
    # bin "2" has no series on any replica: it counts as 0 rows, as the reference still has it
    "kids": [[3, 4, None], [2, 3, None], [3, 3, None]],
    # no live rows in the window: no PSI, no drifted value (not enough data is not "no drift")
    "idle": [[0, 0], [0, 0], [0, 0]],
}
IDLE_REFERENCE = [0.5, 0.5]
RESTARTS = {2: 40}  # replica 2 restarts at minute 40: its counters start again from 0


def _values(start: int, step: int, restart: int | None) -> str:
    out = []
    for t in range(STEPS + 1):
        if restart is not None and t >= restart:
            out.append(step * (t - restart + 1))  # the first scrape after the restart already counts a step
        else:
            out.append(start + step * t)
    return " ".join(str(v) for v in out)


def _ratio(v: float) -> str:
    return repr(float(v))


def _unit_test() -> tuple[dict[str, Any], dict[str, float]]:
    refs = _references()
    series: list[dict[str, str]] = []
    expected: dict[str, float] = {}
    for feature, replicas in LIVE.items():
        ref = IDLE_REFERENCE if feature == "idle" else refs[feature].proportions()
        labels = [str(i) for i in range(len(ref))] if feature == "idle" else refs[feature].bins()
        summed = [0] * len(ref)
        for replica, steps in enumerate(replicas):
            instance = f"10.0.0.{replica + 1}:9464"
            for b, (label, step) in enumerate(zip(labels, steps, strict=True)):
                sel = f'feature="{feature}",bin="{label}",instance="{instance}",job="infermon"'
                series.append(
                    {"series": f"infermon_feature_reference_ratio{{{sel}}}", "values": f"{_ratio(ref[b])}x{STEPS}"}
                )
                if step is None:
                    continue
                series.append(
                    {
                        "series": f"infermon_feature_bin_total{{{sel}}}",
                        "values": _values(100 * (replica + 1) + b, step, RESTARTS.get(replica)),
                    }
                )
                summed[b] += step * WINDOW  # the rows of the last hour
        if sum(summed):
            expected[feature] = psi(ref, summed)  # what one replica's engine computes from these counts
    tests: list[dict[str, Any]] = []
    for feature, value in expected.items():
        # the difference, rounded to 1e-9, is exactly 0 when they agree; a failure shows it
        tests.append(
            {
                "expr": f'round(infermon:feature_psi:1h{{feature="{feature}"}} - {value!r}, {TOLERANCE!r})',
                "eval_time": f"{STEPS}m",
                "exp_samples": [{"labels": f'{{feature="{feature}"}}', "value": 0}],
            }
        )
    drifted = {f: int(v >= 0.25) for f, v in expected.items()}
    tests += [
        {
            "expr": "count(infermon:feature_psi:1h)",
            "eval_time": f"{STEPS}m",
            "exp_samples": [{"labels": "{}", "value": len(expected)}],
        },
        {
            "expr": "infermon:feature_drifted:1h",
            "eval_time": f"{STEPS}m",
            "exp_samples": [
                {"labels": f'infermon:feature_drifted:1h{{feature="{f}"}}', "value": d} for f, d in drifted.items()
            ],
        },
        # the rows of the window, every replica together, the restart included
        {
            "expr": "infermon:feature_rows:increase1h",
            "eval_time": f"{STEPS}m",
            "exp_samples": [
                {
                    "labels": f'infermon:feature_rows:increase1h{{feature="{f}"}}',
                    "value": sum(s or 0 for steps in r for s in steps) * WINDOW,
                }
                for f, r in LIVE.items()
            ],
        },
        # the empty bin and the bin without a series are both a share of exactly 0
        {
            "expr": 'infermon:feature_bin_ratio:1h{feature="age",bin="0"} '
            'or infermon:feature_bin_ratio:1h{feature="kids",bin="2"} '
            'or infermon:feature_bin_ratio:1h{feature="idle"}',
            "eval_time": f"{STEPS}m",
            "exp_samples": [
                {"labels": 'infermon:feature_bin_ratio:1h{feature="age",bin="0"}', "value": 0},
                {"labels": 'infermon:feature_bin_ratio:1h{feature="kids",bin="2"}', "value": 0},
            ],
        },
        {
            "expr": 'infermon:feature_reference_ratio:max{feature="kids"}',
            "eval_time": f"{STEPS}m",
            "exp_samples": [
                {"labels": f'infermon:feature_reference_ratio:max{{feature="kids",bin="{b}"}}', "value": v}
                for b, v in zip(refs["kids"].bins(), refs["kids"].proportions(), strict=True)
            ],
        },
    ]
    alert = _rules()["InfermonFeatureDrift"]
    firing = [f for f, d in drifted.items() if d]
    alerts = [
        {
            "eval_time": f"{STEPS}m",
            "alertname": "InfermonFeatureDrift",
            "exp_alerts": [
                {
                    "exp_labels": {"severity": "warning", "feature": f},
                    "exp_annotations": {
                        k: v.replace("{{ $labels.feature }}", f) for k, v in alert["annotations"].items()
                    },
                }
                for f in firing
            ],
        },
        {"eval_time": f"{STEPS}m", "alertname": "InfermonReferenceMismatch", "exp_alerts": []},
    ]
    unit = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": tests, "alert_rule_test": alerts}],
    }
    return unit, expected


def test_the_scenario_covers_what_it_claims() -> None:
    _, expected = _unit_test()
    assert set(expected) == {"age", "city", "kids"}  # idle has no PSI
    assert expected["age"] >= 0.25 and expected["city"] < 0.1 and expected["kids"] >= 0.25  # kids: the lost bin


def test_the_rules_clamp_as_the_python_psi_does() -> None:
    rules = _rules()
    expr = rules["infermon:feature_psi:1h"]["expr"]
    clamps = [part.split(")")[0].split(",")[-1].strip() for part in expr.split("clamp_min(")[1:]]
    assert len(clamps) == 4 and all(float(c) == PSI_EPSILON for c in clamps)
    assert "ln(" in expr
    assert "[1h]" in rules["infermon:feature_bin:increase1h"]["expr"]
    assert set(rules) >= {
        "infermon:feature_bin:increase1h",
        "infermon:feature_bin_ratio:1h",
        "infermon:feature_psi:1h",
        "infermon:feature_drifted:1h",
        "InfermonFeatureDrift",
    }


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None, "promtool is missing: CI must install it (apt-get install prometheus)"
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, check=False)


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 8 rules found" in result.stdout


@needs_promtool
def test_fleet_psi_equals_the_python_psi(tmp_path: Path) -> None:
    unit, expected = _unit_test()
    path = tmp_path / "drift.test.yml"
    path.write_text(yaml.safe_dump(unit, sort_keys=False, width=1000))
    result = _promtool("test", "rules", str(path))
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\nexpected PSI: {expected}"
