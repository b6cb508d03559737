"""Canary verdicts on built scenarios fed straight into the analyzer, and what it exports."""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from scipy import stats as scipy_stats

from proxy.canary.analysis import FAIL, INCONCLUSIVE, PASS, CanaryAnalyzer, CanaryConfig

NOW = 10_000.0
SEED = 20240917


def feed(
    analyzer: CanaryAnalyzer,
    variant: str,
    n: int,
    *,
    error_rate: float = 0.0,
    latency: float = 0.05,
    spread: float = 0.2,
    classes: tuple[list[str], list[float]] | None = None,
    seed: int = SEED,
) -> None:
    """n requests over the last minute: errors at a fixed rate, log-normal latencies around ``latency``."""
    rng = np.random.default_rng(seed)
    errors = round(n * error_rate)
    lat = latency * rng.lognormal(0.0, spread, n)
    for i in range(n):
        t = NOW - 60.0 + 60.0 * i / n
        analyzer.observe(variant, 500 if i < errors else 200, float(lat[i]), i < errors, now=t)
    if classes is not None:
        labels, weights = classes
        picks = rng.choice(len(labels), size=n, p=np.asarray(weights) / sum(weights))
        analyzer.add_predictions(variant, [labels[k] for k in picks], now=NOW - 1.0)


def verdict_of(analyzer: CanaryAnalyzer, variant: str = "canary") -> int:
    return analyzer.evaluate(now=NOW)[variant].verdict


CLASSES = (["cat", "dog", "bird"], [0.6, 0.3, 0.1])


def test_identical_variants_pass() -> None:
    analyzer = CanaryAnalyzer()
    feed(analyzer, "stable", 2000, error_rate=0.01, classes=CLASSES, seed=1)
    feed(analyzer, "canary", 2000, error_rate=0.01, classes=CLASSES, seed=2)
    result = analyzer.evaluate(now=NOW)["canary"]
    assert result.verdict == PASS, result.reason
    assert {c: r.outcome for c, r in result.checks.items()} == {
        "errors": PASS,
        "latency": PASS,
        "predictions": PASS,
        "drift": INCONCLUSIVE,  # no drift windows (sampling off): it holds nothing back
        "quality": INCONCLUSIVE,  # no labels (feedback off): the same
    }
    assert result.reason.startswith("canary passes")


def test_higher_error_rate_fails() -> None:
    analyzer = CanaryAnalyzer()
    feed(analyzer, "stable", 2000, error_rate=0.01, seed=1)
    feed(analyzer, "canary", 2000, error_rate=0.06, seed=2)
    result = analyzer.evaluate(now=NOW)["canary"]
    assert result.verdict == FAIL
    errors = result.checks["errors"]
    assert errors.outcome == FAIL
    assert errors.figures["rate"] == pytest.approx(0.06)
    assert errors.figures["baseline_rate"] == pytest.approx(0.01)
    assert errors.figures["p_value"] < 0.02
    assert "error rate 6.00% against 1.00%" in result.reason


def test_significant_error_increase_within_tolerance_passes() -> None:
    # 1.5% against 1.0% over 20000 requests each is significant, but only half a point more
    analyzer = CanaryAnalyzer()
    feed(analyzer, "stable", 20000, error_rate=0.010, seed=1)
    feed(analyzer, "canary", 20000, error_rate=0.015, seed=2)
    errors = analyzer.evaluate(now=NOW)["canary"].checks["errors"]
    assert errors.figures["p_value"] < 0.02
    assert errors.outcome == PASS


def test_slower_canary_fails() -> None:
    analyzer = CanaryAnalyzer()
    feed(analyzer, "stable", 1000, latency=0.050, seed=1)
    feed(analyzer, "canary", 1000, latency=0.080, seed=2)
    result = analyzer.evaluate(now=NOW)["canary"]
    assert result.verdict == FAIL
    latency = result.checks["latency"]
    assert latency.outcome == FAIL
    assert latency.figures["effect"] == pytest.approx(1.6, rel=0.05)
    assert latency.figures["shift_s"] == pytest.approx(0.030, rel=0.2)
    assert "slower than x1.2 allows" in result.reason


def test_slightly_slower_within_tolerance_passes() -> None:
    # 10% slower: significant on 5000 requests, inside the 20% the tolerance allows
    analyzer = CanaryAnalyzer()
    feed(analyzer, "stable", 5000, latency=0.050, seed=1)
    feed(analyzer, "canary", 5000, latency=0.055, seed=2)
    result = analyzer.evaluate(now=NOW)["canary"]
    latency = result.checks["latency"]
    assert latency.figures["p_value"] < 0.02
    assert latency.figures["effect"] == pytest.approx(1.1, rel=0.03)
    assert latency.outcome == PASS
    assert result.verdict == PASS


def test_faster_canary_passes() -> None:
    analyzer = CanaryAnalyzer()
    feed(analyzer, "stable", 1000, latency=0.080, seed=1)
    feed(analyzer, "canary", 1000, latency=0.050, seed=2)
    assert verdict_of(analyzer) == PASS


def test_different_classes_fail_even_when_fast_and_error_free() -> None:
    analyzer = CanaryAnalyzer()
    feed(analyzer, "stable", 2000, classes=CLASSES, seed=1)
    feed(analyzer, "canary", 2000, classes=(["cat", "dog", "bird"], [0.2, 0.3, 0.5]), seed=2)
    result = analyzer.evaluate(now=NOW)["canary"]
    assert result.checks["errors"].outcome == PASS
    assert result.checks["latency"].outcome == PASS
    predictions = result.checks["predictions"]
    assert predictions.outcome == FAIL
    assert predictions.figures["kind"] == "classes"
    assert predictions.figures["distance"] >= 0.1
    assert result.verdict == FAIL


def test_numeric_predictions_are_binned_on_the_baseline_quantiles() -> None:
    rng = np.random.default_rng(SEED)
    analyzer = CanaryAnalyzer()
    feed(analyzer, "stable", 500, seed=1)
    feed(analyzer, "canary", 500, seed=2)
    analyzer.add_predictions("stable", rng.normal(0.0, 1.0, 2000).tolist(), now=NOW)
    analyzer.add_predictions("canary", rng.normal(0.0, 1.0, 2000).tolist(), now=NOW)
    same = analyzer.evaluate(now=NOW)["canary"].checks["predictions"]
    assert same.outcome == PASS
    assert same.figures["kind"] == "values"
    assert same.figures["bins"] == 10
    analyzer.add_predictions("canary", rng.normal(1.0, 1.0, 10_000).tolist(), now=NOW)
    shifted = analyzer.evaluate(now=NOW)["canary"].checks["predictions"]
    assert shifted.outcome == FAIL


def test_whole_number_predictions_are_class_ids() -> None:
    analyzer = CanaryAnalyzer()
    analyzer.add_predictions("stable", [0, 1, 2] * 100, now=NOW)
    analyzer.add_predictions("canary", [0, 1, 2] * 100, now=NOW)
    check = analyzer.evaluate(now=NOW)["canary"].checks["predictions"]
    assert check.figures["kind"] == "classes"
    assert check.figures["bins"] == 3
    assert check.figures["distance"] == 0.0


def test_a_few_predictions_are_noise_not_a_difference() -> None:
    # 60 predictions a side from the same distribution: the distance alone can pass 0.1
    analyzer = CanaryAnalyzer()
    feed(analyzer, "stable", 60, classes=(list("abcdefgh"), [1.0] * 8), seed=1)
    feed(analyzer, "canary", 60, classes=(list("abcdefgh"), [1.0] * 8), seed=2)
    check = analyzer.evaluate(now=NOW)["canary"].checks["predictions"]
    assert check.figures["distance"] >= 0.1
    assert check.outcome == PASS


def test_no_traffic_is_inconclusive() -> None:
    analyzer = CanaryAnalyzer()
    analyzer.observe("canary", 200, 0.05, False, now=NOW)
    result = analyzer.evaluate(now=NOW)["canary"]
    assert result.verdict == INCONCLUSIVE
    assert all(r.outcome == INCONCLUSIVE for r in result.checks.values())
    assert "too few requests" in result.reason
    assert "stable has 0" in result.reason


def test_too_few_requests_never_pass() -> None:
    analyzer = CanaryAnalyzer()
    feed(analyzer, "stable", 1000, seed=1)
    feed(analyzer, "canary", 49, seed=2)
    result = analyzer.evaluate(now=NOW)["canary"]
    assert result.verdict == INCONCLUSIVE
    assert "the canary has 49" in result.checks["errors"].reason
    feed(analyzer, "canary", 49, seed=3)  # 98 now
    assert verdict_of(analyzer) == PASS


def test_too_few_predictions_hold_the_verdict_back() -> None:
    analyzer = CanaryAnalyzer()
    feed(analyzer, "stable", 1000, classes=CLASSES, seed=1)
    feed(analyzer, "canary", 1000, seed=2)
    analyzer.add_predictions("canary", ["cat"] * 10, now=NOW)
    result = analyzer.evaluate(now=NOW)["canary"]
    assert result.checks["predictions"].outcome == INCONCLUSIVE
    assert result.verdict == INCONCLUSIVE
    assert "too few predictions" in result.reason


def test_traffic_older_than_the_interval_is_forgotten() -> None:
    analyzer = CanaryAnalyzer(CanaryConfig(interval=120.0))
    feed(analyzer, "stable", 1000, seed=1)
    feed(analyzer, "canary", 1000, error_rate=0.2, seed=2)
    assert verdict_of(analyzer) == FAIL
    later = analyzer.evaluate(now=NOW + 600.0)["canary"]
    assert later.verdict == INCONCLUSIVE
    assert later.requests == 0


def test_windows_are_bounded() -> None:
    analyzer = CanaryAnalyzer(CanaryConfig(window=100, max_variants=2))
    for i in range(1000):
        analyzer.observe("stable", 200, 0.01, False, now=NOW - 1.0 + i / 1000)
    analyzer.observe("third", 200, 0.01, False, now=NOW)
    analyzer.add_predictions("stable", ["a"] * 1000, now=NOW)
    state = analyzer._variants["stable"]
    assert len(state.latencies) == 100
    assert len(state.labels) == 100
    assert "third" in analyzer._variants  # the second variant fits ...
    analyzer.observe("fourth", 200, 0.01, False, now=NOW)
    assert "fourth" not in analyzer._variants  # ... a third does not, and is counted
    assert analyzer.dropped_variants == 1
    # the request count is not capped by the latency window
    assert analyzer.evaluate(now=NOW)["third"].baseline_requests == 1000


def test_report_is_json_with_every_figure() -> None:
    analyzer = CanaryAnalyzer()
    feed(analyzer, "stable", 500, error_rate=0.01, classes=CLASSES, seed=1)
    feed(analyzer, "canary", 500, error_rate=0.01, classes=CLASSES, seed=2)
    analyzer.evaluate(now=NOW)
    report = json.loads(json.dumps(analyzer.report(), allow_nan=False))
    assert report["baseline"] == "stable"
    assert report["requests"] == {"stable": 500, "canary": 500}
    canary = report["variants"]["canary"]
    assert canary["verdict"] == 1
    assert canary["result"] == "pass"
    errors = canary["checks"]["errors"]
    assert {"rate", "baseline_rate", "p_value", "sample_size", "baseline_size", "tolerance"} <= errors.keys()
    latency = canary["checks"]["latency"]
    assert {"median_s", "baseline_median_s", "p_value", "effect", "shift_s", "tolerance"} <= latency.keys()
    assert {"distance", "p_value", "threshold", "kind"} <= canary["checks"]["predictions"].keys()


def test_collector_exports_verdicts_and_checks() -> None:
    analyzer = CanaryAnalyzer()
    feed(analyzer, "stable", 1000, seed=1)
    feed(analyzer, "canary", 1000, latency=0.1, seed=2)
    registry = CollectorRegistry()
    registry.register(analyzer.collector())
    assert "infermon_canary_verdict{" not in generate_latest(registry).decode()
    analyzer.evaluate(now=NOW)
    text = generate_latest(registry).decode()
    assert 'infermon_canary_verdict{variant="canary"} -1.0' in text
    assert 'infermon_canary_check{check="latency",variant="canary"} -1.0' in text
    assert 'infermon_canary_check{check="errors",variant="canary"} 1.0' in text
    assert 'infermon_canary_check{check="predictions",variant="canary"} 0.0' in text
    assert 'infermon_canary_samples{variant="stable"} 1000.0' in text


def test_feeding_collecting_and_evaluating_from_several_threads() -> None:
    analyzer = CanaryAnalyzer()
    registry = CollectorRegistry()
    registry.register(analyzer.collector())
    stop = threading.Event()
    failures: list[BaseException] = []

    def scrape() -> None:
        try:
            while not stop.is_set():
                generate_latest(registry)
                analyzer.report()
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        feeders = [
            threading.Thread(target=feed, args=(analyzer, v, 3000), kwargs={"seed": s})
            for s, v in enumerate(("stable", "canary"))
        ]
        for t in feeders:
            t.start()
        for _ in range(5):
            analyzer.evaluate(now=NOW)
        for t in feeders:
            t.join(timeout=30)
    finally:
        stop.set()
        scraper.join(timeout=30)
    assert not failures
    assert analyzer.evaluate(now=NOW)["canary"].requests == 3000


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("confidence", 1.0, "canary.confidence"),
        ("latency_tolerance", 0.9, "canary.latency_tolerance"),
        ("min_requests", 0, "canary.min_requests"),
        ("interval", -1.0, "canary.interval"),
        ("baseline", "", "canary.baseline"),
        ("prediction_threshold", 0.0, "canary.prediction_threshold"),
    ],
)
def test_bad_config_names_the_key(key: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CanaryConfig(**{key: value})  # type: ignore[arg-type]


@dataclass(frozen=True)
class Windows:
    """One variant's drift verdicts, shaped as the drift engine's summary gives them."""

    evaluated_features: tuple[str, ...] = ()
    evaluated_predictions: tuple[str, ...] = ()
    drifted_features: tuple[str, ...] = ()
    drifted_predictions: tuple[str, ...] = ()
    rows: int = 0


FEATURES = ("f1", "f2", "f3", "f4")


def drift_case(stable: Windows | None, canary: Windows | None, share: float = 0.5) -> tuple[int, dict[str, object]]:
    """(verdict, the drift check) for two healthy variants with these drift windows."""
    summary = {k: v for k, v in (("stable", stable), ("canary", canary)) if v is not None}
    analyzer = CanaryAnalyzer(CanaryConfig(drift_share=share), drift=lambda: summary)
    feed(analyzer, "stable", 400)
    feed(analyzer, "canary", 400, seed=SEED + 1)
    result = analyzer.evaluate(now=NOW)["canary"]
    return result.verdict, result.checks["drift"].as_dict()


def test_drift_check_fails_a_canary_whose_predictions_drifted_alone() -> None:
    base = Windows(FEATURES, ("prediction",), rows=1000)
    verdict, check = drift_case(base, Windows(FEATURES, ("prediction",), drifted_predictions=("prediction",), rows=300))
    assert (verdict, check["outcome"]) == (FAIL, FAIL), check["reason"]
    assert check["drifted_predictions"] == ["prediction"] and check["baseline_drifted_predictions"] == []
    assert "prediction" in str(check["reason"])
    # the same prediction drifted on both sides: the inputs moved, not the canary
    both = Windows(FEATURES, ("prediction",), drifted_predictions=("prediction",), rows=1000)
    assert drift_case(both, both)[0] == PASS


def test_drift_check_fails_when_the_canarys_inputs_drifted_and_the_baselines_did_not() -> None:
    base = Windows(FEATURES, drifted_features=("f1",), rows=1000)  # 25%: under the share
    verdict, check = drift_case(base, Windows(FEATURES, drifted_features=("f1", "f2"), rows=300))
    assert (verdict, check["outcome"]) == (FAIL, FAIL), check["reason"]
    assert (check["share"], check["baseline_share"], check["features"]) == (0.5, 0.25, 4)
    # one drifted feature of four is not a drifted dataset, and neither is a shift both sides share
    assert drift_case(base, Windows(FEATURES, drifted_features=("f2",)))[0] == PASS
    everywhere = Windows(FEATURES, drifted_features=FEATURES)
    assert drift_case(everywhere, everywhere)[0] == PASS
    # a stricter share
    assert drift_case(base, Windows(FEATURES, drifted_features=("f1", "f2")), share=0.75)[0] == PASS


def test_drift_check_compares_only_columns_both_sides_decided() -> None:
    # stable decided f1..f4; the canary only f1 and f2 (the others had too few rows): f3's drift on
    # stable does not count, the canary's f1+f2 are 2 of 2 common columns
    base = Windows(FEATURES, drifted_features=("f3",))
    verdict, check = drift_case(base, Windows(("f1", "f2"), drifted_features=("f1", "f2")))
    assert verdict == FAIL and check["features"] == 2 and check["baseline_drifted_features"] == []


def test_drift_check_is_inconclusive_until_both_sides_have_windows() -> None:
    # the canary's windows are short of drift.min_samples: the verdict waits
    verdict, check = drift_case(Windows(FEATURES, rows=1000), Windows(rows=20))
    assert (verdict, check["outcome"]) == (INCONCLUSIVE, INCONCLUSIVE)
    assert "canary" in str(check["reason"]) and "no_data" not in check
    verdict, check = drift_case(None, Windows(FEATURES, rows=300))
    assert verdict == INCONCLUSIVE and "stable" in str(check["reason"])
    # nothing evaluated anywhere (the reference still collecting): no data, holds nothing back
    verdict, check = drift_case(None, None)
    assert (verdict, check["outcome"], check["no_data"]) == (PASS, INCONCLUSIVE, True)


def test_ingest_takes_a_batch_as_observe_takes_one() -> None:
    one, batch = CanaryAnalyzer(CanaryConfig(max_variants=2)), CanaryAnalyzer(CanaryConfig(max_variants=2))
    finished = [
        (("stable", "canary", "third")[i % 3], NOW - 60.0 + i * 0.1, 0.01 * (1 + i % 7), i % 11 == 0)
        for i in range(600)
    ]
    for variant, t, latency, error in finished:
        one.observe(variant, 500 if error else 200, latency, error, now=t)
    batch.ingest(finished)
    a, b = one.evaluate(now=NOW)["canary"], batch.evaluate(now=NOW)["canary"]
    assert a.as_dict() == b.as_dict()
    assert one.dropped_variants == batch.dropped_variants == 200  # every request of the third variant


def test_a_tracked_variant_without_requests_has_a_verdict() -> None:
    analyzer = CanaryAnalyzer(CanaryConfig(max_variants=2))
    analyzer.track(["stable", "canary", "blue"])  # the configured variants, before any traffic
    feed(analyzer, "stable", 500, seed=1)
    verdicts = analyzer.evaluate(now=NOW)
    assert verdicts["canary"].verdict == INCONCLUSIVE and verdicts["canary"].requests == 0
    assert "blue" not in verdicts  # over max_variants: tracking does not lift the bound
    assert analyzer.report()["requests"] == {"stable": 500, "canary": 0}
    # a traffic-named variant cannot take a configured one's place
    analyzer.observe("green", 200, 0.05, False, now=NOW)
    assert "green" not in analyzer.evaluate(now=NOW)


def test_prediction_threshold_is_a_natural_log_distance() -> None:
    """Jensen-Shannon with the natural log (scipy's default base) never exceeds sqrt(ln 2) = 0.8326:
    a threshold above it (one meant for base 2, whose maximum is 1) could never fail a canary."""
    import math

    from proxy.drift.stats import js_distance

    disjoint = js_distance(np.array([1.0, 0.0]), np.array([0.0, 1.0]))
    assert disjoint == pytest.approx(math.sqrt(math.log(2.0)))
    analyzer = CanaryAnalyzer(CanaryConfig(prediction_threshold=0.83))
    analyzer.add_predictions("stable", ["cat"] * 200, now=NOW)
    analyzer.add_predictions("canary", ["dog"] * 200, now=NOW)
    assert analyzer.evaluate(now=NOW)["canary"].checks["predictions"].outcome == FAIL  # the most it can be
    with pytest.raises(ValueError, match=r"canary\.prediction_threshold"):
        CanaryConfig(prediction_threshold=0.9)
    from proxy.settings import ProxyConfig

    with pytest.raises(ValueError, match=r"canary\.prediction_threshold"):
        ProxyConfig.model_validate({"canary": {"prediction_threshold": 0.9}})


def quality_case(
    stable: dict[str, object] | None, canary: dict[str, object] | None, **cfg: float
) -> tuple[int, dict[str, object]]:
    """(verdict, the quality check) for two healthy variants with these quality summaries."""
    summary = {k: v for k, v in (("stable", stable), ("canary", canary)) if v is not None}
    analyzer = CanaryAnalyzer(CanaryConfig(**cfg), quality=lambda: summary)  # type: ignore[arg-type]
    feed(analyzer, "stable", 400)
    feed(analyzer, "canary", 400, seed=SEED + 1)
    result = analyzer.evaluate(now=NOW)["canary"]
    return result.verdict, result.checks["quality"].as_dict()


def accuracy(value: float | None, labels: int, reason: str = "") -> dict[str, object]:
    entry: dict[str, object] = {"task": "classification", "metric": "accuracy", "value": value, "labels": labels}
    entry["window"] = "1h"
    if value is None:
        entry["reason"] = reason
    return entry


def test_quality_check_fails_a_canary_significantly_less_accurate() -> None:
    verdict, check = quality_case(accuracy(0.95, 1000), accuracy(0.85, 400))
    assert (verdict, check["outcome"]) == (FAIL, FAIL), check["reason"]
    assert (check["value"], check["baseline_value"], check["labels"], check["baseline_labels"]) == (
        0.85, 0.95, 400, 1000
    )  # fmt: skip
    # the pooled one-sided z-test on wrong answers, 60 of 400 against 50 of 1000, by hand and scipy's normal
    pooled = 110 / 1400
    z = (60 / 400 - 50 / 1000) / math.sqrt(pooled * (1 - pooled) * (1 / 400 + 1 / 1000))
    assert abs(float(check["z"]) - z) < 1e-3  # type: ignore[arg-type]
    assert math.isclose(float(check["p_value"]), float(scipy_stats.norm.sf(z)), rel_tol=1e-3)  # type: ignore[arg-type]


def test_quality_check_passes_within_the_tolerance_or_without_significance() -> None:
    # one point less accurate: within accuracy_tolerance 0.02
    assert quality_case(accuracy(0.95, 5000), accuracy(0.94, 5000))[0] == PASS
    # ten points less on 30 labels: not significant at 0.98
    verdict, check = quality_case(accuracy(0.9, 30), accuracy(0.8, 30))
    assert (verdict, check["outcome"]) == (PASS, PASS) and float(check["p_value"]) > 0.02  # type: ignore[arg-type]
    # a stricter tolerance catches the one point on many labels
    assert quality_case(accuracy(0.95, 50_000), accuracy(0.94, 50_000), accuracy_tolerance=0.005)[0] == FAIL
    # a more accurate canary passes
    assert quality_case(accuracy(0.9, 1000), accuracy(0.97, 1000))[0] == PASS


def test_quality_check_compares_mean_absolute_errors() -> None:
    def mae(value: float, labels: int = 200) -> dict[str, object]:
        return {"task": "regression", "metric": "mae", "value": value, "labels": labels, "window": "1h"}

    verdict, check = quality_case(mae(10.0), mae(12.0))
    assert (verdict, check["ratio"]) == (FAIL, 1.2), check["reason"]
    assert quality_case(mae(10.0), mae(10.5))[0] == PASS
    assert quality_case(mae(10.0), mae(12.0), mae_tolerance=1.25)[0] == PASS


def test_quality_check_waits_for_scores_and_holds_nothing_back_without_labels() -> None:
    # the canary's window has too few labels: its score is absent, the verdict waits
    verdict, check = quality_case(accuracy(0.95, 1000), accuracy(None, 12, "12 labels, 30 needed"))
    assert (verdict, check["outcome"]) == (INCONCLUSIVE, INCONCLUSIVE)
    assert "12 labels" in str(check["reason"]) and "canary" in str(check["reason"])
    assert quality_case(None, accuracy(0.9, 100))[0] == INCONCLUSIVE
    # no labels for anyone, or feedback off: no data, nothing held back
    verdict, check = quality_case(None, None)
    assert (verdict, check["outcome"], check["no_data"]) == (PASS, INCONCLUSIVE, True)
    off = CanaryAnalyzer(CanaryConfig())
    feed(off, "stable", 400)
    feed(off, "canary", 400, seed=SEED + 1)
    assert off.evaluate(now=NOW)["canary"].checks["quality"].figures["no_data"] is True
