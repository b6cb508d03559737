"""The drift engine: method choice, thresholds, windows, the auto reference, data quality, the series
budget, the Prometheus exposition, and drift scenarios on data scikit-learn ships."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_breast_cancer, make_classification

from proxy.drift import stats
from proxy.drift.engine import DriftEngine, VariantDrift
from proxy.drift.profile import Profile, build_profile
from proxy.errors import ConfigError
from proxy.settings import Drift

SEED = 7
STABLE = "stable"
QUALITY = "infermon_feature_quality_total"
NO_DROPS = {"collecting": 0, "variant_budget": 0, "invalid_variant": 0}


def drift_cfg(**kw: Any) -> Drift:
    return Drift.model_validate(kw)


def rows_of(columns: dict[str, Sequence[Any]]) -> list[dict[str, Any]]:
    names = list(columns)
    return [dict(zip(names, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def one_column_profile(values: Sequence[Any], name: str = "x", **kw: Any) -> Profile:
    return build_profile(rows_of({name: values}), **kw)


def column(report: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [c for c in report["columns"] if c["name"] == name]
    assert len(found) == 1, [c["name"] for c in report["columns"]]
    return found[0]


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(engine: DriftEngine) -> tuple[str, Samples]:
    registry = CollectorRegistry()
    registry.register(engine.collector())
    text = generate_latest(registry).decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return text, samples


def sample_value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


# --------------------------------------------------------------------------------------------
# which method decides


def normal(n: int, seed: int = SEED, loc: float = 0.0, scale: float = 1.0) -> list[float]:
    return [float(v) for v in np.random.default_rng(seed).normal(loc, scale, size=n)]


def cycle(values: Sequence[Any], n: int) -> list[Any]:
    return [values[i % len(values)] for i in range(n)]


METHOD_TABLE: list[tuple[str, list[Any], str, float]] = [
    # more than 1,000 reference values: continuous numeric -> normed Wasserstein, others -> JS
    ("continuous, 1001 values", normal(1001), "wasserstein", 0.1),
    ("numeric with 5 values, 1500", cycle([0, 1, 2, 3, 4], 1500), "jensenshannon", 0.1),
    ("categorical, 1500", cycle(["a", "b", "c", "d"], 1500), "jensenshannon", 0.1),
    ("binary, 1500", cycle([0, 1], 1500), "jensenshannon", 0.1),
    # at most 1,000: continuous -> KS; others chi-squared, or Z when binary (or constant)
    ("continuous, exactly 1000 values", normal(1000), "ks", 0.05),
    ("numeric with 6 values, 600", cycle([0, 1, 2, 3, 4, 5], 600), "ks", 0.05),
    ("numeric with 5 values, 600", cycle([0, 1, 2, 3, 4], 600), "chisquare", 0.05),
    ("categorical with 3 values, 600", cycle(["a", "b", "c"], 600), "chisquare", 0.05),
    ("binary numeric, 600", cycle([0, 1], 600), "z", 0.05),
    ("binary categorical, 600", cycle(["yes", "no"], 600), "z", 0.05),
    ("constant, 600", [7.0] * 600, "z", 0.05),
]


@pytest.mark.parametrize(("case", "values", "method", "threshold"), METHOD_TABLE, ids=[c[0] for c in METHOD_TABLE])
def test_default_method_follows_evidently(case: str, values: list[Any], method: str, threshold: float) -> None:
    engine = DriftEngine(drift_cfg(), one_column_profile(values))
    col = column(engine.report(), "x")
    assert (col["method"], col["threshold"]) == (method, threshold), case
    assert "Evidently's default" in col["why"]
    assert f"reference of {len(values)} values" in col["why"]


def test_a_profile_without_a_sample_decides_on_its_bins() -> None:
    engine = DriftEngine(drift_cfg(), one_column_profile(normal(500), sample_size=0))
    col = column(engine.report(), "x")
    assert col["method"] == "chisquare"
    assert "no sample" in col["why"]


def test_overrides_set_method_and_threshold() -> None:
    profile = build_profile(rows_of({"a": normal(600), "b": normal(600, seed=2), "c": cycle(["u", "v", "w"], 600)}))
    cfg = drift_cfg(
        features={"a": {"method": "psi"}, "b": {"threshold": 0.01}, "c": {"method": "jensenshannon", "threshold": 0.2}}
    )
    report = DriftEngine(cfg, profile).report()
    a, b, c = (column(report, n) for n in "abc")
    assert (a["method"], a["threshold"]) == ("psi", cfg.psi_drift)
    assert (b["method"], b["threshold"]) == ("ks", 0.01)
    assert (c["method"], c["threshold"]) == ("jensenshannon", 0.2)
    assert a["why"].startswith("drift.features.a sets method psi")
    assert "drift.features.b.threshold sets 0.01" in b["why"]


def test_bad_overrides_are_config_errors_naming_the_key() -> None:
    profile = build_profile(rows_of({"a": normal(100), "c": cycle(["u", "v", "w"], 100)}))
    with pytest.raises(ConfigError, match=r"drift\.features\.c\.method: ks needs a numeric column"):
        DriftEngine(drift_cfg(features={"c": {"method": "ks"}}), profile)
    with pytest.raises(ConfigError, match=r"drift\.features\.a\.method: z compares two proportions"):
        DriftEngine(drift_cfg(features={"a": {"method": "z"}}), profile)
    with pytest.raises(ConfigError, match=r"drift\.features\.nope: .* has no column 'nope' \(its columns: a, c\)"):
        DriftEngine(drift_cfg(features={"nope": {"method": "psi"}}), profile)


# --------------------------------------------------------------------------------------------
# thresholds and decisions


def test_p_value_methods_flag_below_the_threshold_distances_at_or_above() -> None:
    reference = normal(600)
    live = normal(200, seed=3, loc=0.2)
    profile = one_column_profile(reference)
    fp = profile.features[0]
    sample = [float(v) for v in fp.sample]
    _, p = stats.ks_2samp(sample, live)
    wd = stats.normed_wasserstein(sample, live, fp.std or 0.0)
    live_bins = np.bincount(np.searchsorted(fp.edges, live, side="left"), minlength=len(fp.counts))
    psi = stats.psi(fp.counts, [float(c) for c in live_bins])

    def decide(method: str, threshold: float) -> dict[str, Any]:
        engine = DriftEngine(drift_cfg(features={"x": {"method": method, "threshold": threshold}}), profile)
        engine.add([{"x": v} for v in live], [], t=0.0, variant=STABLE)
        engine.evaluate(now=1.0)
        return column(engine.report(), "x")

    at_p = decide("ks", p)
    assert at_p["statistics"]["ks"] == pytest.approx(p, rel=1e-12)
    assert at_p["drifted"] is False  # p < p is false
    assert decide("ks", p * (1 + 1e-9))["drifted"] is True
    assert decide("wasserstein", wd)["drifted"] is True  # wd >= wd
    assert decide("wasserstein", wd * (1 + 1e-9))["drifted"] is False
    at_psi = decide("psi", psi)
    assert at_psi["drifted"] is True
    assert at_psi["statistics"]["psi"] == pytest.approx(psi, rel=1e-12)


def test_psi_levels_use_warn_and_drift() -> None:
    profile = one_column_profile(normal(1000))
    for shift, level in ((0.0, "ok"), (0.25, "warn"), (1.0, "drift")):  # PSI 0.046, 0.11, 1.18
        engine = DriftEngine(drift_cfg(), profile)
        engine.add([{"x": v} for v in normal(1000, seed=11, loc=shift)], [], t=0.0, variant=STABLE)
        engine.evaluate(now=0.0)
        assert column(engine.report(), "x")["psi"]["level"] == level, shift


def test_insufficient_data_is_never_no_drift() -> None:
    engine = DriftEngine(drift_cfg(min_samples=50), one_column_profile(normal(600)))
    engine.add([{"x": v} for v in normal(49, seed=5, loc=3.0)], [], t=0.0, variant=STABLE)
    engine.evaluate(now=1.0)
    col = column(engine.report(), "x")
    assert col["status"] == "insufficient data"
    assert col["drifted"] is None
    assert col["statistics"] == {}
    assert (col["window_rows"], col["min_samples"]) == (49, 50)
    assert sum(col["histogram"]["live"]) == 49
    assert engine.report()["insufficient"] == ["x"]
    _, samples = scrape(engine)
    assert sample_value(samples, "infermon_feature_drifted", variant=STABLE, feature="x") is None
    assert sample_value(samples, "infermon_feature_drift", variant=STABLE, feature="x", method="psi") is None
    assert sample_value(samples, "infermon_drift_window_rows", variant=STABLE, feature="x") == 49
    engine.add([{"x": 3.0}], [], t=0.5, variant=STABLE)
    engine.evaluate(now=1.0)
    col = column(engine.report(), "x")
    assert (col["status"], col["drifted"]) == ("evaluated", True)
    _, samples = scrape(engine)
    assert sample_value(samples, "infermon_feature_drifted", variant=STABLE, feature="x") == 1.0


# --------------------------------------------------------------------------------------------
# windows


def test_time_window_expires_old_values() -> None:
    engine = DriftEngine(drift_cfg(window_seconds=60, min_samples=1), one_column_profile(normal(600)))
    engine.add([{"x": 0.1}] * 30, [], t=1000.0, variant=STABLE)
    engine.add([{"x": 0.2}] * 20, [], t=1050.0, variant=STABLE)
    engine.evaluate(now=1059.0)
    assert column(engine.report(), "x")["window_rows"] == 50
    engine.evaluate(now=1060.5)  # the first 30 are now older than 60 s
    assert column(engine.report(), "x")["window_rows"] == 20
    engine.evaluate(now=1200.0)
    col = column(engine.report(), "x")
    assert (col["window_rows"], col["status"]) == (0, "insufficient data")


def test_count_window_keeps_the_last_values_and_bin_counters_keep_all() -> None:
    engine = DriftEngine(drift_cfg(window_size=40, min_samples=10), one_column_profile(normal(600)))
    engine.add([{"x": v} for v in normal(100, seed=9)], [], t=0.0, variant=STABLE)
    engine.evaluate(now=0.0)
    col = column(engine.report(), "x")
    assert col["window_rows"] == 40
    assert sum(col["histogram"]["live"]) == 40
    _, samples = scrape(engine)
    bins = [v for (name, labels), v in samples.items() if name == "infermon_feature_bin_total"]
    assert sum(bins) == 100


# --------------------------------------------------------------------------------------------
# the reference from the first samples


def test_the_first_samples_become_the_reference() -> None:
    engine = DriftEngine(drift_cfg(reference_samples=100, min_samples=10), None)
    assert engine.columns() is None
    first = [{"a": v, "b": "u" if v > 0 else "w"} for v in normal(160, seed=4)]
    engine.add(first[:60], [{"prediction": 1.0}] * 60, t=0.0, variant=STABLE)
    ref = engine.report()["reference"]
    assert (ref["source"], ref["status"], ref["rows"], ref["target"], ref["progress"]) == (
        "first 100 samples",
        "collecting",
        60,
        100,
        0.6,
    )
    assert engine.columns() is None
    engine.add(first[60:], [{"prediction": 1.0}] * 100, t=1.0, variant=STABLE)
    assert engine.columns() == ["a", "b"]
    engine.evaluate(now=2.0)
    report = engine.report()
    assert report["reference"]["status"] == "ready"
    assert report["reference"]["rows"] == 100
    a = column(report, "a")
    assert a["window_rows"] == 60  # the rows after the first 100
    assert a["method"] == "ks"
    pred = column(report, "prediction")
    assert (pred["kind"], pred["window_rows"]) == ("prediction", 60)
    # the same reference as build_profile makes of the same rows
    expected = build_profile(first[:100], bins=10, top_k=20)
    assert a["histogram"]["reference"] == expected.features[0].proportions()


def test_names_that_cannot_be_labels_are_never_tracked() -> None:
    engine = DriftEngine(drift_cfg(reference_samples=10), None)
    long_name = "x" * 129
    rows = [{"a": float(i), long_name: 1.0, "bad\nname": 2.0, "": 3.0} for i in range(10)]
    engine.add(rows, [], t=0.0, variant=STABLE)
    engine.evaluate(now=0.0)
    report = engine.report()
    assert [c["name"] for c in report["columns"]] == ["a"]
    assert report["other"]["invalid_name"] == 30
    text, _ = scrape(engine)
    assert long_name not in text and "bad\\nname" not in text


def test_auto_reference_keeps_to_max_features_and_reports_bad_overrides() -> None:
    cfg = drift_cfg(reference_samples=20, max_features=2, features={"c": {"method": "ks"}, "zz": {"method": "psi"}})
    engine = DriftEngine(cfg, None)
    rows = [{"a": float(i), "c": "u" if i % 2 else "v", "d": 1.0} for i in range(30)]
    engine.add(rows, [], t=0.0, variant=STABLE)
    engine.evaluate(now=0.0)
    report = engine.report()
    assert [c["name"] for c in report["columns"]] == ["a", "c"]
    assert report["other"]["over_budget"] == 20 + 0  # "d" in the 20 reference rows
    assert report["other"]["unknown_feature"] == 10  # "d" after them: not in the reference
    c = column(report, "c")
    assert c["method"] == "z"
    assert "drift.features.c.method: ks needs a numeric column" in c["config_problem"]
    assert any("drift.features.zz" in p for p in report["config_problems"])


# --------------------------------------------------------------------------------------------
# data quality


def quality_profile() -> Profile:
    n = 200
    return build_profile(
        rows_of(
            {
                "x": [float(i % 11) for i in range(n)],  # 0 .. 10
                "c": cycle(["a", "b", "c"], n),  # every value kept: a closed set
                "d": [f"v{i % 30}" for i in range(n)],  # 30 values, top 5 kept: others exist
            }
        ),
        top_k=5,
    )


def test_quality_counters() -> None:
    engine = DriftEngine(drift_cfg(), quality_profile())
    live: list[dict[str, Any]] = [
        {"x": None, "c": "a", "d": "v1"},  # x missing
        {"x": "", "c": "", "d": None},  # all three missing
        {"x": math.nan, "c": "b", "d": "v2"},  # x missing
        {},  # all three missing (absent)
        {"x": "abc", "c": [1], "d": {"k": 1}},  # all three type mismatches
        {"x": True, "c": "a", "d": "v1"},  # a bool is not a number
        {"x": math.inf, "c": "a", "d": "v1"},
        {"x": -1, "c": "zzz", "d": "zzz"},  # x out of range; c unseen; d: not counted (others exist)
        {"x": 10.5, "c": 1, "d": "v3"},  # x out of range; c unseen ("1")
        {"x": 10, "c": "c", "d": "v4", "extra": 1, "more": "x"},  # in range; two unknown names
    ]
    engine.add(live, [], t=0.0, variant=STABLE)
    engine.evaluate(now=0.0)
    report = engine.report()
    expected = {
        "x": {"missing": 4, "type_mismatch": 3, "out_of_range": 2, "unseen_category": 0},
        "c": {"missing": 2, "type_mismatch": 1, "out_of_range": 0, "unseen_category": 2},
        "d": {"missing": 2, "type_mismatch": 1, "out_of_range": 0, "unseen_category": 0},
    }
    for name, counts in expected.items():
        assert column(report, name)["quality"] == counts, name
    assert report["other"] == {"unknown_feature": 2, "over_budget": 0, "invalid_name": 0, "rows_dropped": NO_DROPS}
    _, samples = scrape(engine)
    for name, counts in expected.items():
        for problem, count in counts.items():
            found = sample_value(samples, QUALITY, variant=STABLE, feature=name, problem=problem)
            assert found == count, (name, problem)
    assert sample_value(samples, QUALITY, variant=STABLE, feature="other", problem="unknown_feature") == 2
    # out-of-range values are still binned (first and last bin), so the bin counters see every valid value
    bins = [v for (n, labels), v in samples.items() if n == "infermon_feature_bin_total" and ("feature", "x") in labels]
    assert sum(bins) == 3  # -1, 10.5 and 10


def test_with_a_profile_only_its_columns_are_tracked_within_max_features() -> None:
    profile = build_profile(rows_of({"a": normal(50), "b": normal(50, seed=1), "c": normal(50, seed=2)}))
    engine = DriftEngine(drift_cfg(max_features=2), profile)
    engine.add([{"a": 0.0, "b": 0.0, "c": 0.0, "new": 1}], [], t=0.0, variant=STABLE)
    engine.evaluate(now=0.0)
    report = engine.report()
    assert [c["name"] for c in report["columns"]] == ["a", "b"]
    assert report["untracked_columns"] == ["c"]
    assert report["other"] == {"unknown_feature": 1, "over_budget": 1, "invalid_name": 0, "rows_dropped": NO_DROPS}
    assert engine.columns() == ["a", "b", "c"]  # the profile's order still names bare rows


# --------------------------------------------------------------------------------------------
# series budget and exposition


def test_series_budget_exports_the_bins_of_the_first_columns_that_fit() -> None:
    profile = quality_profile()
    x_bins = len(profile.features[0].counts)
    # x's bin counters and its reference ratios fit, c's do not
    engine = DriftEngine(drift_cfg(max_series=2 * x_bins + 1, min_samples=5), profile)
    engine.add([{"x": float(i % 11), "c": "a", "d": "v1"} for i in range(20)], [], t=0.0, variant=STABLE)
    engine.evaluate(now=0.0)
    report = engine.report()
    assert report["series"] == {
        "budget": 2 * x_bins + 1,
        "exported": 2 * x_bins,
        "omitted": 2 * (4 + 6),  # c: 3 categories + other; d: 5 + other; counters and ratios
        "omitted_columns": ["c", "d"],
    }
    assert [column(report, n)["bins_exported"] for n in "xcd"] == [True, False, False]
    assert column(report, "c")["statistics"]["chisquare"] < 0.05  # its drift is still computed
    _, samples = scrape(engine)
    exported = {dict(labels)["feature"] for (n, labels) in samples if n == "infermon_feature_bin_total"}
    assert exported == {"x"}
    ratios = {dict(labels)["feature"] for (n, labels) in samples if n == "infermon_feature_reference_ratio"}
    assert ratios == {"x"}
    assert sample_value(samples, "infermon_drift_bin_series_omitted") == 20
    assert sample_value(samples, "infermon_feature_drift", variant=STABLE, feature="c", method="psi") is not None


def test_exposition_has_every_metric_and_never_nan() -> None:
    profile = build_profile(
        rows_of({"num": normal(300), "cat": cycle(["a", "b"], 300), "const": [1.0] * 300}),
        predictions=[],
    )
    engine = DriftEngine(drift_cfg(min_samples=10), profile)
    _, samples = scrape(engine)  # before any evaluation: nothing measured, nothing broken
    assert not any(name == "infermon_feature_drift" for name, _ in samples)
    engine.add([{"num": v, "cat": "a", "const": 1.0} for v in normal(50, seed=8)], [], t=0.0, variant=STABLE)
    engine.evaluate(now=0.0)
    text, samples = scrape(engine)
    assert "NaN" not in text and "Inf" not in text
    names = {name for name, _ in samples}
    for wanted in (
        "infermon_feature_drift",
        "infermon_feature_drifted",
        "infermon_drift_window_rows",
        "infermon_feature_quality_total",
        "infermon_feature_bin_total",
        "infermon_feature_reference_ratio",
        "infermon_drift_bin_series_omitted",
    ):
        assert wanted in names, wanted
    methods = {dict(labels)["method"] for n, labels in samples if n == "infermon_feature_drift"}
    assert {"psi", "jensenshannon", "chisquare", "wasserstein", "ks", "ks_statistic", "z"} <= methods
    # the constant column: every statistic finite, PSI 0
    assert sample_value(samples, "infermon_feature_drift", variant=STABLE, feature="const", method="psi") == 0.0
    assert sample_value(samples, "infermon_feature_drifted", variant=STABLE, feature="const") == 0.0
    cat = [
        v
        for (n, labels), v in samples.items()
        if n == "infermon_feature_reference_ratio" and ("feature", "cat") in labels
    ]
    ratio = sum(cat)
    assert ratio == pytest.approx(1.0)
    report = engine.report()
    assert report["evaluated_at"] == "1970-01-01T00:00:00.000000Z"
    assert report["window"] == {"size": 1000, "seconds": 3600.0, "min_samples": 10, "interval": 10.0}
    num = column(report, "num")
    assert num["histogram"]["ranges"][0].startswith("<= ")
    assert len(num["histogram"]["ranges"]) == len(num["histogram"]["bins"]) == len(num["histogram"]["reference"])


def test_report_and_collector_from_other_threads() -> None:
    engine = DriftEngine(drift_cfg(min_samples=5, window_size=50), one_column_profile(normal(300)))
    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        try:
            while not stop.is_set():
                report = engine.report()
                report["columns"].clear()  # a copy: the engine's snapshot is untouched
                scrape(engine)
                for drift in engine.summary().values():
                    assert drift.rows <= 50
        except BaseException as exc:
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        values = normal(800, seed=12)
        for i in range(0, 800, 20):
            engine.add([{"x": v} for v in values[i : i + 20]], [], t=float(i), variant=STABLE)
            engine.evaluate(now=float(i))
    finally:
        stop.set()
        reader.join(timeout=10)
    assert not errors
    assert column(engine.report(), "x")["window_rows"] == 50
    assert engine.summary()[STABLE].rows == 50


# --------------------------------------------------------------------------------------------
# scenarios


def shifted_scenario(
    x: np.ndarray[Any, Any], names: list[str], cfg: Drift, sample_size: int = 1000
) -> tuple[set[str], dict[str, Any]]:
    """Reference from a seeded half of the rows, the other half with two features shifted by one
    reference std and one rescaled by 1.5; the names flagged, and the report."""
    order = np.random.default_rng(0).permutation(len(x))
    half = len(x) // 2
    ref, live = x[order[:half]].copy(), x[order[half:]].copy()
    shift = [names[1], names[5]]
    scale = names[9]
    for name in shift:
        j = names.index(name)
        live[:, j] += ref[:, j].std()
    live[:, names.index(scale)] *= 1.5
    profile = build_profile(rows_of({n: ref[:, j].tolist() for j, n in enumerate(names)}), sample_size=sample_size)
    engine = DriftEngine(cfg, profile)
    batch = [dict(zip(names, row, strict=True)) for row in live.tolist()]
    for i in range(0, len(batch), 32):  # as samples arrive, 32 rows a second
        engine.add(batch[i : i + 32], [], t=i / 32, variant=STABLE)
    engine.evaluate(now=len(batch) / 32)
    report = engine.report()
    return set(report["drifted"]), report


def test_breast_cancer_shifted_and_rescaled_features_are_flagged_and_only_those() -> None:
    data = load_breast_cancer()
    names = [str(n) for n in data.feature_names]
    flagged, report = shifted_scenario(np.asarray(data.data, dtype=np.float64), names, drift_cfg())
    assert flagged == {names[1], names[5], names[9]}
    # a reference of 284 rows: KS decides every (continuous) feature
    assert {c["method"] for c in report["columns"]} == {"ks"}
    for name in flagged:
        assert column(report, name)["statistics"]["ks"] < 1e-6


def test_large_reference_scenario_uses_normed_wasserstein() -> None:
    x, _ = make_classification(n_samples=8000, n_features=12, n_informative=6, random_state=3)
    names = [f"f{j}" for j in range(x.shape[1])]
    # the whole live half in the window, and a reference sample as large: a normed Wasserstein
    # distance between two samples of 1,000 already wanders near 0.1 by chance
    cfg = drift_cfg(window_size=4000)
    flagged, report = shifted_scenario(np.asarray(x, dtype=np.float64), names, cfg, sample_size=4000)
    assert flagged == {"f1", "f5", "f9"}
    assert {c["method"] for c in report["columns"]} == {"wasserstein"}
    quiet = [column(report, n)["statistics"]["wasserstein"] for n in names if n not in flagged]
    assert max(quiet) < 0.1


# --------------------------------------------------------------------------------------------
# review findings (issue 8)


def test_feature_names_from_traffic_are_bounded_in_length_too() -> None:
    """Issue 8: every traffic-fed series stays bounded. Without a profile the first samples name the
    features, and a KServe v1 instance keyed by feature name takes the request's keys as they came:
    one client early on makes a 100,000-character feature name, and it becomes the ``feature`` label
    of every series of that column (bins, ratios, methods, quality) and a key of /drift. The count
    of names is capped (drift.max_features), their length is not (the labels cap theirs at 128,
    string values are clipped at 256)."""
    long_name = "k" * 100_000
    engine = DriftEngine(drift_cfg(reference_samples=20, min_samples=5), None)
    rows = [{long_name: float(i % 7), "age": float(i)} for i in range(40)]
    engine.add(rows, [], t=0.0, variant=STABLE)
    engine.evaluate(now=0.0)
    text, samples = scrape(engine)
    longest = max(len(dict(labels).get("feature", "")) for _, labels in samples)
    assert longest <= 256, f"a feature label of {longest} characters; the exposition is {len(text)} bytes"


def test_auto_reference_never_exports_a_feature_and_a_prediction_under_one_name() -> None:
    """Without a profile, feature and prediction columns are collected under one name budget but
    profiled apart, so a name seen as a feature in some samples and as a prediction in others (an
    optional field, a mapping adapter whose request lacks it) becomes two columns of one name: every
    series of it is written twice (``infermon_feature_drift{feature="score",method="psi"}`` ...),
    which the exposition format forbids. A loaded profile refuses the same name twice."""
    engine = DriftEngine(drift_cfg(reference_samples=10, min_samples=2), None)
    for i in range(20):
        row = {"age": float(i)} if i % 2 else {"score": float(i)}
        engine.add([row], [{"score": 0.1 * i}], t=0.0, variant=STABLE)
    engine.evaluate(now=0.0)
    text, _ = scrape(engine)
    series = [line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")]
    duplicated = sorted({s for s in series if series.count(s) > 1})
    assert duplicated == [], duplicated[:3]


# --------------------------------------------------------------------------------------------
# variants: one window per (variant, column), one reference


CANARY = "canary"


def two_column_profile() -> Profile:
    """x: 600 normal values (KS decides), c: three categories (chi-squared decides)."""
    return build_profile(rows_of({"x": normal(600), "c": cycle(["a", "b", "c"], 600)}))


def live_bins(fp: Any, values: Sequence[float]) -> list[int]:
    return [int(n) for n in np.bincount(np.searchsorted(fp.edges, values, side="left"), minlength=len(fp.counts))]


def test_two_variants_only_the_shifted_one_drifts() -> None:
    profile = two_column_profile()
    engine = DriftEngine(drift_cfg(min_samples=50), profile)
    steady, shifted = normal(300, seed=21), normal(200, seed=22, loc=1.0)
    engine.add([{"x": v, "c": cycle(["a", "b", "c"], 300)[i]} for i, v in enumerate(steady)], [], 1.0, STABLE)
    engine.add([{"x": v, "c": "a"} for v in shifted], [], 1.0, CANARY)
    engine.evaluate(now=2.0)
    report = engine.report()
    assert report["variant"] == STABLE
    assert report["drifted"] == [] and column(report, "x")["window_rows"] == 300  # the top level: stable's
    stable, canary = report["variants"][STABLE], report["variants"][CANARY]
    assert "columns" not in stable  # stable's columns are the top level's
    assert (stable["drifted"], stable["rows"], stable["window_rows"]) == ([], 300, {"x": 300, "c": 300})
    assert (canary["drifted"], canary["rows"], canary["window_rows"]) == (["x", "c"], 200, {"x": 200, "c": 200})
    assert [c["name"] for c in canary["columns"]] == ["x", "c"]
    x = profile.features[0]
    for name, values in ((STABLE, steady), (CANARY, shifted)):
        cols = report["columns"] if name == STABLE else canary["columns"]
        got = next(c for c in cols if c["name"] == "x")
        assert got["histogram"]["live"] == live_bins(x, values)
        assert got["statistics"]["psi"] == pytest.approx(stats.psi(x.counts, live_bins(x, values)), rel=1e-12)
        _, p = stats.ks_2samp([float(v) for v in x.sample], values)
        assert got["statistics"]["ks"] == pytest.approx(p, rel=1e-9)
    text, samples = scrape(engine)
    drifted = "infermon_feature_drifted"
    assert sample_value(samples, drifted, variant=STABLE, feature="x") == 0.0
    assert sample_value(samples, drifted, variant=STABLE, feature="c") == 0.0
    assert sample_value(samples, drifted, variant=CANARY, feature="x") == 1.0
    assert sample_value(samples, drifted, variant=CANARY, feature="c") == 1.0
    assert sample_value(samples, "infermon_drift_window_rows", variant=CANARY, feature="x") == 200
    canary_psi = next(c for c in canary["columns"] if c["name"] == "x")["statistics"]["psi"]
    assert sample_value(samples, "infermon_feature_drift", variant=CANARY, feature="x", method="psi") == canary_psi
    assert f'infermon_feature_drift{{feature="x",method="psi",variant="canary"}} {canary_psi!r}' in text
    assert sample_value(samples, "infermon_feature_bin_total", variant=CANARY, feature="c", bin="a") == 200
    assert sample_value(samples, "infermon_feature_bin_total", variant=STABLE, feature="c", bin="a") == 100
    # the variant label comes first; the reference ratio has none, one series per bin
    order = {f.name: [list(s.labels) for s in f.samples] for f in engine.families()}
    assert order["infermon_feature_drift"][0] == ["variant", "feature", "method"]
    assert order["infermon_feature_drifted"][0] == order["infermon_drift_window_rows"][0] == ["variant", "feature"]
    assert order["infermon_feature_quality"][0] == ["variant", "feature", "problem"]
    assert order["infermon_feature_bin"][0] == ["variant", "feature", "bin"]
    assert order["infermon_feature_reference_ratio"][0] == ["feature", "bin"]
    ratios = [labels for n, labels in samples if n == "infermon_feature_reference_ratio"]
    assert len(ratios) == len(x.counts) + 4 and all("variant" not in dict(lb) for lb in ratios)
    for name in (STABLE, CANARY):
        other = sample_value(samples, QUALITY, variant=name, feature="other", problem="unknown_feature")
        assert other == 0


def test_a_variant_gets_its_windows_with_its_first_rows() -> None:
    engine = DriftEngine(drift_cfg(min_samples=5), two_column_profile())
    assert list(engine.report()["variants"]) == [STABLE]  # the top-level variant has its windows from the start
    engine.add([{"x": 0.0, "c": "a", "new": 1}] * 3, [], 0.0, CANARY)
    engine.evaluate(now=0.0)
    report = engine.report()
    assert list(report["variants"]) == [STABLE, CANARY]
    canary = report["variants"][CANARY]
    assert canary["insufficient"] == ["x", "c"] and canary["other"]["unknown_feature"] == 3
    assert report["variants"][STABLE]["other"]["unknown_feature"] == 0
    assert report["other"]["unknown_feature"] == 0  # the top level counts stable's


def test_variant_budget_counts_the_rows_of_further_variants() -> None:
    engine = DriftEngine(drift_cfg(max_variants=2, min_samples=5), two_column_profile())
    engine.add([{"x": 0.1, "c": "a"}] * 10, [], 0.0, CANARY)
    engine.add([{"x": 0.1, "c": "a"}] * 7, [], 0.0, "blue")  # a third variant: over the budget
    engine.add([{"x": 0.1, "c": "a"}] * 4, [], 0.0, "blue")
    engine.add([], [{"prediction": 1.0}] * 2, 0.0, "green")  # a sample of predictions only: its rows count too
    engine.add([{"x": 0.1, "c": "a"}] * 6, [], 0.0, STABLE)
    engine.evaluate(now=0.0)
    report = engine.report()
    assert set(report["variants"]) == {STABLE, CANARY}
    assert report["variants"][STABLE]["rows"] == 6 and report["variants"][CANARY]["rows"] == 10
    assert report["other"]["rows_dropped"] == {"collecting": 0, "variant_budget": 13, "invalid_variant": 0}
    text, samples = scrape(engine)
    assert sample_value(samples, "infermon_drift_rows_dropped_total", reason="variant_budget") == 13
    assert sample_value(samples, "infermon_drift_rows_dropped_total", reason="collecting") == 0
    assert 'variant="blue"' not in text and 'variant="green"' not in text


def test_the_top_level_variant_keeps_its_place_in_the_budget() -> None:
    """Without a profile nobody has windows until the reference is built; the first other variants
    to come must not take the place of the one /drift shows at the top."""
    engine = DriftEngine(drift_cfg(max_variants=2, reference_samples=10, min_samples=5), None)
    rows = [{"x": float(i)} for i in range(10)]
    engine.add(rows, [], 0.0, CANARY)  # every variant's rows build this reference: canary's too
    engine.add(rows[:3], [], 0.0, "blue")  # the second place is stable's
    engine.add(rows[:5], [], 0.0, STABLE)
    engine.add(rows[:2], [], 0.0, CANARY)
    engine.evaluate(now=0.0)
    report = engine.report()
    assert report["reference"]["status"] == "ready" and report["reference"]["variant"] is None
    assert report["variants"][STABLE]["rows"] == 5 and report["variants"][CANARY]["rows"] == 2
    assert report["other"]["rows_dropped"]["variant_budget"] == 3


def test_variant_names_that_cannot_be_labels_are_refused() -> None:
    engine = DriftEngine(drift_cfg(min_samples=5), two_column_profile())
    for name in ("v" * 129, "bad\nvariant", ""):
        engine.add([{"x": 0.1, "c": "a"}] * 4, [], 0.0, name)
    engine.evaluate(now=0.0)
    report = engine.report()
    assert list(report["variants"]) == [STABLE]
    assert report["other"]["rows_dropped"] == {"collecting": 0, "variant_budget": 0, "invalid_variant": 12}
    text, samples = scrape(engine)
    assert sample_value(samples, "infermon_drift_rows_dropped_total", reason="invalid_variant") == 12
    assert "vvvv" not in text and "bad\\nvariant" not in text


def test_the_reference_is_built_from_the_reference_variant_only() -> None:
    engine = DriftEngine(drift_cfg(reference_samples=100, min_samples=20), None, reference_variant=STABLE)
    stable_rows = [{"a": v} for v in normal(130, seed=31)]
    canary_rows = [{"a": v} for v in normal(80, seed=32, loc=3.0)]
    engine.add(canary_rows[:30], [{"prediction": 1.0}] * 30, 0.0, CANARY)  # while collecting: dropped, counted
    engine.add(stable_rows[:60], [], 0.0, STABLE)
    engine.add(canary_rows[30:50], [], 0.0, CANARY)
    ref = engine.report()["reference"]
    assert (ref["status"], ref["rows"], ref["variant"]) == ("collecting", 60, STABLE)
    assert engine.columns() is None
    engine.evaluate(now=0.5)
    assert engine.summary() == {}  # nothing to summarise while the reference is collected
    engine.add(stable_rows[60:], [], 1.0, STABLE)  # 40 complete the reference, 30 go to stable's window
    engine.add(canary_rows[50:], [], 1.0, CANARY)  # after it: canary's window
    engine.evaluate(now=2.0)
    report = engine.report()
    assert report["reference"]["status"] == "ready" and report["reference"]["rows"] == 100
    assert report["other"]["rows_dropped"] == {"collecting": 50, "variant_budget": 0, "invalid_variant": 0}
    expected = build_profile(stable_rows[:100], bins=10, top_k=20)
    a = column(report, "a")
    assert a["histogram"]["reference"] == expected.features[0].proportions()
    assert [c["name"] for c in report["columns"]] == ["a"]  # canary's predictions never reached the reference
    assert (a["window_rows"], a["drifted"]) == (30, False)
    canary = report["variants"][CANARY]
    assert (canary["window_rows"], canary["drifted"]) == ({"a": 30}, ["a"])
    _, samples = scrape(engine)
    assert sample_value(samples, "infermon_drift_rows_dropped_total", reason="collecting") == 50


def test_without_a_reference_variant_every_variant_builds_the_reference() -> None:
    engine = DriftEngine(drift_cfg(reference_samples=20, min_samples=5), None)
    engine.add([{"a": 1.0}] * 10, [], 0.0, CANARY)
    engine.add([{"a": 2.0}] * 10, [], 0.0, STABLE)
    engine.evaluate(now=0.0)
    report = engine.report()
    assert column(report, "a")["histogram"]["reference"] == [0.5, 0.5]
    assert report["other"]["rows_dropped"]["collecting"] == 0


def test_series_budget_spans_variants_and_counts_the_ratio_once() -> None:
    profile = two_column_profile()
    xb, cb = len(profile.features[0].counts), len(profile.features[1].counts)
    # stable: x and c with their ratios (2 xb + 2 cb); canary: x fits (xb, its ratio is there), c does not
    budget = 2 * xb + 2 * cb + xb + cb - 1
    engine = DriftEngine(drift_cfg(max_series=budget, min_samples=5), profile)
    engine.add([{"x": 0.0, "c": "b"}] * 6, [], 0.0, CANARY)
    engine.add([{"x": 0.0, "c": "b"}] * 6, [], 0.0, "blue")  # nothing left: neither column's bins
    engine.evaluate(now=0.0)
    report = engine.report()
    assert report["series"] == {
        "budget": budget,
        "exported": 3 * xb + 2 * cb,
        "omitted": cb + xb + cb,
        "omitted_columns": [],
    }
    variants = report["variants"]
    assert (variants[STABLE]["omitted_columns"], variants[CANARY]["omitted_columns"]) == ([], ["c"])
    assert variants["blue"]["omitted_columns"] == ["x", "c"]
    assert [c["bins_exported"] for c in variants[CANARY]["columns"]] == [True, False]
    assert variants[CANARY]["drifted"] == ["x", "c"]  # an omitted column's drift is still computed
    _, samples = scrape(engine)
    exported = {(dict(lb)["variant"], dict(lb)["feature"]) for n, lb in samples if n == "infermon_feature_bin_total"}
    assert exported == {(STABLE, "x"), (STABLE, "c"), (CANARY, "x")}
    series = sum(1 for n, _ in samples if n in ("infermon_feature_bin_total", "infermon_feature_reference_ratio"))
    assert series == report["series"]["exported"] <= budget
    assert sample_value(samples, "infermon_drift_bin_series_omitted") == 2 * cb + xb


def test_summary_gives_each_variant_from_the_last_evaluation() -> None:
    rows = rows_of({"x": normal(600), "c": cycle(["a", "b", "c"], 600)})
    for i, row in enumerate(rows):
        row["score"] = float(i % 2)
    profile = build_profile(rows, predictions=["score"])
    engine = DriftEngine(drift_cfg(min_samples=50), profile, reference_variant=STABLE)
    before = engine.summary()
    assert before == {
        STABLE: VariantDrift(STABLE, (), (), (), (), (), ("x", "c", "score"), 0, None),
    }
    engine.add([{"x": v, "c": "abc"[i % 3]} for i, v in enumerate(normal(200, seed=41))],
               [{"score": float(i % 2)} for i in range(200)], 10.0, STABLE)  # fmt: skip
    engine.add([{"x": v, "c": "abc"[i % 3]} for i, v in enumerate(normal(120, seed=42, loc=2.0))],
               [{"score": 1.0} for _ in range(120)], 10.0, CANARY)  # fmt: skip
    engine.add([{"x": 0.0}] * 10, [], 10.0, "blue")
    assert engine.summary() == before  # unchanged until an evaluation publishes
    engine.evaluate(now=1234.5)
    got = engine.summary()
    assert got == {
        STABLE: VariantDrift(STABLE, ("x", "c", "score"), ("x", "c"), ("score",), (), (), (), 200, 1234.5),
        CANARY: VariantDrift(CANARY, ("x", "c", "score"), ("x", "c"), ("score",), ("x",), ("score",), (), 120, 1234.5),
        "blue": VariantDrift("blue", (), (), (), (), (), ("x", "c", "score"), 10, 1234.5),
    }
    got.clear()  # a copy
    assert len(engine.summary()) == 3
