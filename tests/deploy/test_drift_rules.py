"""deploy/prometheus/drift.rules.yml: the fleet PSI Prometheus computes equals proxy.drift.stats.psi.

The promtool unit tests are generated here: bin counters of three replicas (one restarts mid-window)
per variant, reference ratios from real profiles, and as expected values the PSI that the Python
code computes from the same summed counts. Every series grows by a constant step per scrape, so the
counts in the window are the same whether the range selector includes its start (Prometheus 2) or
not (Prometheus 3). Two scenarios: one variant with every edge case (an empty bin, a bin without a
series, a feature without rows), and a stable and a canary variant where only the canary drifts.
"""

from __future__ import annotations

import math
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


#: per variant, per feature, per replica, per bin: live rows per scrape interval (None: that replica
#: has no such series)
Live = dict[str, dict[str, list[list[int | None]]]]

ONE_VARIANT: Live = {
    "stable": {
        # shifted to the upper bins, and nobody saw a value of bin 0 (an empty bin: clamped to 1e-4): drifted
        "age": [[0, 2, 5, 9], [0, 1, 4, 8], [0, 1, 6, 10]],
        # close to the reference: not drifted
        "city": [[10, 6, 3, 1], [9, 6, 2, 1], [11, 5, 4, 1]],
        # bin "2" has no series on any replica: it counts as 0 rows, as the reference still has it
        "kids": [[3, 4, None], [2, 3, None], [3, 3, None]],
        # no live rows in the window: no PSI, no drifted value (not enough data is not "no drift")
        "idle": [[0, 0], [0, 0], [0, 0]],
    }
}
#: the same reference for both; stable's traffic looks like it, the canary's ages shifted up
TWO_VARIANTS: Live = {
    "stable": {
        "age": [[5, 5, 5, 5], [4, 5, 4, 5], [5, 4, 5, 4]],
        "city": [[10, 6, 3, 1], [9, 6, 2, 1], [11, 5, 4, 1]],
    },
    "canary": {
        "age": [[0, 2, 5, 9], [0, 1, 4, 8], [0, 1, 6, 10]],
        "city": [[10, 6, 2, 1], [10, 5, 3, 1], [9, 6, 3, 1]],
    },
}
SCENARIOS = {"one variant": ONE_VARIANT, "two variants, the canary drifts": TWO_VARIANTS}
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


def _reference(refs: dict[str, FeatureProfile], feature: str) -> tuple[list[float], list[str]]:
    if feature == "idle":
        return IDLE_REFERENCE, [str(i) for i in range(len(IDLE_REFERENCE))]
    return refs[feature].proportions(), refs[feature].bins()


def _empty_term(e: float) -> float:
    """One bin's PSI term when the live window has no row in it, as stats.psi computes it."""
    a, e = PSI_EPSILON, max(e, PSI_EPSILON)
    return (a - e) * math.log(a / e)


def _unit_test(live: Live) -> tuple[dict[str, Any], dict[tuple[str, str], float]]:
    refs = _references()
    series: list[dict[str, str]] = []
    expected: dict[tuple[str, str], float] = {}
    features = list(dict.fromkeys(f for per_variant in live.values() for f in per_variant))
    replicas = len(next(iter(next(iter(live.values())).values())))
    for feature in features:  # one reference: the ratio has no variant label
        ref, labels = _reference(refs, feature)
        for replica in range(replicas):
            for b, label in enumerate(labels):
                sel = f'feature="{feature}",bin="{label}",instance="10.0.0.{replica + 1}:9464",job="infermon"'
                series.append(
                    {"series": f"infermon_feature_reference_ratio{{{sel}}}", "values": f"{_ratio(ref[b])}x{STEPS}"}
                )
    for variant, per_feature in live.items():
        for feature, steps_of in per_feature.items():
            ref, labels = _reference(refs, feature)
            summed = [0] * len(ref)
            for replica, steps in enumerate(steps_of):
                instance = f"10.0.0.{replica + 1}:9464"
                for b, (label, step) in enumerate(zip(labels, steps, strict=True)):
                    if step is None:
                        continue
                    sel = f'variant="{variant}",feature="{feature}",bin="{label}",instance="{instance}",job="infermon"'
                    series.append(
                        {
                            "series": f"infermon_feature_bin_total{{{sel}}}",
                            "values": _values(100 * (replica + 1) + b, step, RESTARTS.get(replica)),
                        }
                    )
                    summed[b] += step * WINDOW  # the rows of the last hour
            if sum(summed):
                expected[(variant, feature)] = psi(ref, summed)  # what one replica's engine computes from these
    at = f"{STEPS}m"
    tests: list[dict[str, Any]] = []
    for (variant, feature), value in expected.items():
        # the difference, rounded to 1e-9, is exactly 0 when they agree; a failure shows it
        sel = f'variant="{variant}",feature="{feature}"'
        tests.append(
            {
                "expr": f"round(infermon:feature_psi:1h{{{sel}}} - {value!r}, {TOLERANCE!r})",
                "eval_time": at,
                "exp_samples": [{"labels": f"{{{sel}}}", "value": 0}],
            }
        )
    drifted = {key: int(v >= 0.25) for key, v in expected.items()}
    tests += [
        {
            "expr": "count(infermon:feature_psi:1h)",
            "eval_time": at,
            "exp_samples": [{"labels": "{}", "value": len(expected)}],
        },
        {
            "expr": "infermon:feature_drifted:1h",
            "eval_time": at,
            "exp_samples": [
                {"labels": f'infermon:feature_drifted:1h{{variant="{v}",feature="{f}"}}', "value": d}
                for (v, f), d in drifted.items()
            ],
        },
        # the rows of the window, every replica together, the restart included
        {
            "expr": "infermon:feature_rows:increase1h",
            "eval_time": at,
            "exp_samples": [
                {
                    "labels": f'infermon:feature_rows:increase1h{{variant="{v}",feature="{f}"}}',
                    "value": sum(s or 0 for steps in r for s in steps) * WINDOW,
                }
                for v, per_feature in live.items()
                for f, r in per_feature.items()
            ],
        },
        # each reference bin's term when the window has none of its rows: t(1e-4, e), one per bin
        {
            "expr": "count(infermon:feature_bin_psi:empty)",
            "eval_time": at,
            "exp_samples": [{"labels": "{}", "value": sum(len(_reference(refs, f)[0]) for f in features)}],
        },
        {
            "expr": 'infermon:feature_reference_ratio:max{feature="age"}',
            "eval_time": at,
            "exp_samples": [
                {"labels": f'infermon:feature_reference_ratio:max{{feature="age",bin="{b}"}}', "value": v}
                for b, v in zip(refs["age"].bins(), refs["age"].proportions(), strict=True)
            ],
        },
    ]
    for label, e in zip(refs["age"].bins(), refs["age"].proportions(), strict=True):
        sel = f'feature="age",bin="{label}"'
        tests.append(
            {
                "expr": f"round(infermon:feature_bin_psi:empty{{{sel}}} - {_empty_term(e)!r}, {TOLERANCE!r})",
                "eval_time": at,
                "exp_samples": [{"labels": f"{{{sel}}}", "value": 0}],
            }
        )
    if "kids" in live.get("stable", {}):
        # the empty bin is a share of exactly 0; the bin without a series, and the feature without
        # rows, have no share at all (their terms come from infermon:feature_bin_psi:empty)
        tests.append(
            {
                "expr": 'infermon:feature_bin_ratio:1h{feature="age",bin="0"} '
                'or infermon:feature_bin_ratio:1h{feature="kids",bin="2"} '
                'or infermon:feature_bin_ratio:1h{feature="idle"}',
                "eval_time": at,
                "exp_samples": [
                    {"labels": 'infermon:feature_bin_ratio:1h{variant="stable",feature="age",bin="0"}', "value": 0}
                ],
            }
        )
    alert = _rules()["InfermonFeatureDrift"]

    def annotate(text: str, variant: str, feature: str) -> str:
        return text.replace("{{ $labels.feature }}", feature).replace("{{ $labels.variant }}", variant)

    alerts = [
        {
            "eval_time": at,
            "alertname": "InfermonFeatureDrift",
            "exp_alerts": [
                {
                    "exp_labels": {"severity": "warning", "variant": v, "feature": f},
                    "exp_annotations": {k: annotate(text, v, f) for k, text in alert["annotations"].items()},
                }
                for (v, f), d in drifted.items()
                if d
            ],
        },
        {"eval_time": at, "alertname": "InfermonReferenceMismatch", "exp_alerts": []},
    ]
    unit = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": tests, "alert_rule_test": alerts}],
    }
    return unit, expected


def test_the_scenarios_cover_what_they_claim() -> None:
    _, one = _unit_test(ONE_VARIANT)
    assert set(one) == {("stable", "age"), ("stable", "city"), ("stable", "kids")}  # idle has no PSI
    assert one["stable", "age"] >= 0.25 and one["stable", "city"] < 0.1
    assert one["stable", "kids"] >= 0.25  # kids: the lost bin
    _, two = _unit_test(TWO_VARIANTS)
    assert two["canary", "age"] >= 0.25  # only the canary's age drifted
    assert max(two["stable", "age"], two["stable", "city"], two["canary", "city"]) < 0.1


def test_the_rules_clamp_as_the_python_psi_does() -> None:
    rules = _rules()
    expr = rules["infermon:feature_psi:1h"]["expr"]
    clamps = [part.split(")")[0].split(",")[-1].strip() for part in expr.split("clamp_min(")[1:]]
    assert len(clamps) == 4 and all(float(c) == PSI_EPSILON for c in clamps)
    assert "ln(" in expr
    empty = rules["infermon:feature_bin_psi:empty"]["expr"]
    assert empty.count("1e-4") == 4 and float("1e-4") == PSI_EPSILON
    assert "[1h]" in rules["infermon:feature_bin:increase1h"]["expr"]
    assert "variant" in rules["infermon:feature_bin:increase1h"]["expr"]
    assert set(rules) >= {
        "infermon:feature_bin:increase1h",
        "infermon:feature_bin_ratio:1h",
        "infermon:feature_bin_psi:empty",
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
    assert "SUCCESS: 9 rules found" in result.stdout


@needs_promtool
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_fleet_psi_equals_the_python_psi(tmp_path: Path, scenario: str) -> None:
    unit, expected = _unit_test(SCENARIOS[scenario])
    path = tmp_path / "drift.test.yml"
    path.write_text(yaml.safe_dump(unit, sort_keys=False, width=1000))
    result = _promtool("test", "rules", str(path))
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\nexpected PSI: {expected}"
