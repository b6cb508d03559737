"""Automated canary analysis: each variant compared with the baseline on errors, latency and predictions.

The request path's finished requests reach :meth:`CanaryAnalyzer.ingest` in batches (the observer
appends one tuple per request to a list it hands over once a second; :meth:`observe` takes one at a
time); the side path feeds :meth:`CanaryAnalyzer.add_predictions`, and the drift engine's per-variant
windows are read at each evaluation (``drift``). Everything kept is bounded: per variant the request
counts of the last ``interval`` seconds in time buckets, the latencies of the last ``window`` successful
requests, the last ``window`` predictions, and at most ``max_variants`` variants. :meth:`evaluate`
(one thread, off the request path) copies the windows under the lock, runs the tests outside it and
publishes a snapshot that :meth:`report` and the Prometheus collector read from any thread.

Checks, each pass, inconclusive or fail:

- errors: one-sided pooled two-proportion z-test (canary's error rate greater than the baseline's);
  fail when p < 1 - confidence and the rate exceeds the baseline's by more than ``error_tolerance``;
- latency: one-sided Mann-Whitney U (canary slower) on the latencies of successful requests; fail when
  p < 1 - confidence and the canary's median over the baseline's exceeds ``latency_tolerance``;
- predictions: Jensen-Shannon distance between the variants' prediction distributions (class counts,
  or numbers binned on the baseline's quantiles); fail when the distance reaches
  ``prediction_threshold`` and a chi-squared test of homogeneity is significant at the same
  confidence (so the sampling noise of a few dozen predictions is not a difference);
- drift: the drift engine's verdicts on each variant's own live windows against the reference; fail
  when a prediction column drifted for the canary and not for the baseline, or when the share of the
  canary's feature columns that drifted reaches ``drift_share`` (Evidently's dataset drift, 0.5) and
  the baseline's does not. Columns are compared only where both sides have a decision;
- quality: the model-quality scores from delayed labels (``quality``): for classification, a
  one-sided two-proportion test on the share of wrong answers, failing when p < 1 - confidence and
  the canary's accuracy is more than ``accuracy_tolerance`` below the baseline's; for regression,
  failing when the canary's mean absolute error exceeds the baseline's ``mae_tolerance`` times.

Too few requests (``min_requests`` per side) or predictions (``min_predictions``) leave a check
inconclusive. The verdict is -1 when any check fails, 1 when the errors and latency checks pass and
the predictions, drift and quality checks pass or have no data on either side, else 0: never a
pass on too little data.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.canary.stats import hodges_lehmann, mann_whitney_u, two_proportion_test
from proxy.drift.stats import chi2_contingency, js_distance

PASS = 1
INCONCLUSIVE = 0
FAIL = -1
OUTCOME_NAMES = {PASS: "pass", INCONCLUSIVE: "inconclusive", FAIL: "fail"}
CHECKS = ("errors", "latency", "predictions", "drift", "quality")
#: checks that need payload sampling, drift or labels: with no data on either side they hold nothing back
OPTIONAL_CHECKS = ("predictions", "drift", "quality")

#: the request counts of one interval are kept in this many time buckets (the window's edge is
#: exact to 1/BUCKETS of the interval)
BUCKETS = 60

#: the largest prediction_threshold: the Jensen-Shannon distance (natural log) of two distributions
#: with nothing in common is sqrt(ln 2) = 0.8326, so a threshold above this could never be reached
MAX_PREDICTION_THRESHOLD = 0.83

Prediction = str | bool | int | float
#: one finished request, as the request path hands it over: (variant, time, latency in seconds, error)
Finished = tuple[str, float, float, bool]


class VariantDriftLike(Protocol):
    """What the analysis reads of one variant's drift windows (the drift engine's ``VariantDrift``)."""

    @property
    def evaluated_features(self) -> tuple[str, ...]: ...
    @property
    def evaluated_predictions(self) -> tuple[str, ...]: ...
    @property
    def drifted_features(self) -> tuple[str, ...]: ...
    @property
    def drifted_predictions(self) -> tuple[str, ...]: ...
    @property
    def rows(self) -> int: ...


#: the drift engine's per-variant summary (``DriftEngine.summary``), read at each evaluation
DriftSource = Callable[[], Mapping[str, VariantDriftLike]]
#: the quality scores' per-variant summary (``ScoresEngine.summary``): {variant: {"task", "metric",
#: "value" (None when not computed), "labels", "window", "reason"}}
QualitySource = Callable[[], Mapping[str, Mapping[str, Any]]]


@dataclass(frozen=True)
class CanaryConfig:
    """The analysis settings; every bad value is a ValueError naming the key and the fix."""

    #: the variant every other one is compared with
    baseline: str = "stable"
    #: seconds of traffic each evaluation looks at
    interval: float = 300.0
    #: latencies (and predictions) kept per variant: the most recent this many
    window: int = 10_000
    #: confidence of the one-sided tests: a difference is significant when p < 1 - confidence
    confidence: float = 0.98
    #: the canary's median latency may be this many times the baseline's (1.2: 20% slower)
    latency_tolerance: float = 1.2
    #: the canary's error rate may exceed the baseline's by this much (absolute, 0.01: one point)
    error_tolerance: float = 0.01
    #: Jensen-Shannon distance (natural log, 0 .. 0.83) from which predictions differ
    prediction_threshold: float = 0.1
    #: requests each side needs before the errors and latency checks conclude
    min_requests: int = 50
    #: predictions each side needs before the predictions check concludes
    min_predictions: int = 50
    #: variants tracked at most (labels on the metrics); requests of others are counted and dropped
    max_variants: int = 16
    #: numeric predictions are binned on this many quantiles of the baseline's
    prediction_bins: int = 10
    #: whole-number predictions with at most this many distinct values are compared as class ids
    max_classes: int = 64
    #: the share of feature columns that must drift for a variant's inputs to count as drifted
    drift_share: float = 0.5
    #: the canary's accuracy may be this much below the baseline's (absolute, 0.02: two points)
    accuracy_tolerance: float = 0.02
    #: the canary's mean absolute error may be this many times the baseline's
    mae_tolerance: float = 1.1

    def __post_init__(self) -> None:
        def bad(key: str, fix: str) -> ValueError:
            return ValueError(f"canary.{key} = {getattr(self, key)!r}: {fix}")

        if not self.baseline:
            raise bad("baseline", "name the variant (upstream) the others are compared with")
        if not (math.isfinite(self.interval) and self.interval > 0):
            raise bad("interval", "give the seconds of traffic to analyse, a number > 0 (default 300)")
        for key in ("window", "min_requests", "min_predictions", "max_variants", "max_classes"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(key, "give a whole number >= 1")
        if isinstance(self.prediction_bins, bool) or not isinstance(self.prediction_bins, int):
            raise bad("prediction_bins", "give a whole number >= 2")
        if self.prediction_bins < 2:
            raise bad("prediction_bins", "give a whole number >= 2")
        if not 0.5 <= self.confidence < 1.0:
            raise bad("confidence", "give a confidence in [0.5, 1), e.g. 0.98")
        if not (math.isfinite(self.latency_tolerance) and self.latency_tolerance >= 1.0):
            raise bad("latency_tolerance", "give a ratio >= 1 of canary to baseline median latency, e.g. 1.2")
        if not 0.0 <= self.error_tolerance < 1.0:
            raise bad("error_tolerance", "give an absolute error-rate increase in [0, 1), e.g. 0.01")
        if not 0.0 < self.prediction_threshold <= MAX_PREDICTION_THRESHOLD:
            raise bad(
                "prediction_threshold",
                f"give a Jensen-Shannon distance (natural log, at most sqrt(ln 2) = 0.8326) in "
                f"(0, {MAX_PREDICTION_THRESHOLD}], e.g. 0.1",
            )
        if self.min_requests > self.window:
            raise bad("min_requests", f"must not exceed canary.window ({self.window})")
        if not 0.0 < self.drift_share <= 1.0:
            raise bad("drift_share", "give a share of feature columns in (0, 1], e.g. 0.5")
        if not 0.0 <= self.accuracy_tolerance < 1.0:
            raise bad("accuracy_tolerance", "give an absolute accuracy drop in [0, 1), e.g. 0.02")
        if not (math.isfinite(self.mae_tolerance) and self.mae_tolerance >= 1.0):
            raise bad("mae_tolerance", "give a ratio >= 1 of canary to baseline mean absolute error, e.g. 1.1")

    @property
    def alpha(self) -> float:
        return 1.0 - self.confidence


@dataclass
class _Variant:
    buckets: deque[list[float]]  # [start, requests, errors]
    latencies: deque[tuple[float, float]]  # (time, seconds) of successful requests
    labels: deque[tuple[float, str]]  # (time, class label)
    numbers: deque[tuple[float, float]]  # (time, value)


@dataclass(frozen=True)
class _Window:
    """What one variant had in the interval, copied out of the lock."""

    requests: int
    errors: int
    latencies: list[float]
    labels: list[str]
    numbers: list[float]


@dataclass
class CheckResult:
    outcome: int
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "result": OUTCOME_NAMES[self.outcome], "reason": self.reason, **self.figures}


@dataclass
class Verdict:
    variant: str
    verdict: int
    reason: str
    checks: dict[str, CheckResult]
    requests: int
    baseline_requests: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "result": OUTCOME_NAMES[self.verdict],
            "reason": self.reason,
            "requests": self.requests,
            "baseline_requests": self.baseline_requests,
            "checks": {name: check.as_dict() for name, check in self.checks.items()},
        }


def _round(value: float, digits: int = 6) -> float | None:
    """A JSON-safe figure: rounded, None for NaN and infinities."""
    if not math.isfinite(value):
        return None
    return round(value, digits)


def _pvalue(p: float) -> float:
    return float(f"{p:.4g}")


class CanaryAnalyzer:
    """Per-variant windows fed from the request and side paths; verdicts from :meth:`evaluate`."""

    def __init__(
        self, config: CanaryConfig | None = None, drift: DriftSource | None = None, quality: QualitySource | None = None
    ) -> None:
        self.config = config or CanaryConfig()
        #: the drift engine's per-variant verdicts (None: payload sampling is off)
        self.drift = drift
        #: the quality scores per variant (None: feedback is off)
        self.quality = quality
        self._bucket_width = self.config.interval / BUCKETS
        self._lock = threading.Lock()
        self._variants: dict[str, _Variant] = {}
        self.dropped_variants = 0
        self._verdicts: dict[str, Verdict] = {}
        self._samples: dict[str, int] = {}
        self._evaluated_at: float | None = None

    # ----------------------------------------------------------------------------------------
    # feeding (request path and side path)

    def _variant(self, name: str) -> _Variant | None:
        state = self._variants.get(name)
        if state is None:
            if len(self._variants) >= self.config.max_variants:
                return None
            window = self.config.window
            state = _Variant(
                buckets=deque(maxlen=BUCKETS + 2),
                latencies=deque(maxlen=window),
                labels=deque(maxlen=window),
                numbers=deque(maxlen=window),
            )
            self._variants[name] = state
        return state

    def track(self, names: Sequence[str]) -> None:
        """Take the configured variants (a split's upstream names) from the start, within
        ``max_variants``: each gets a verdict at every evaluation, inconclusive while it has no
        traffic, rather than none at all, and traffic-named variants cannot take their places."""
        with self._lock:
            for name in names:
                self._variant(name)

    def observe(self, variant: str, status: int, latency_s: float, error: bool, now: float | None = None) -> None:
        """One finished request of ``variant``. ``error`` says whether it counts as an error (the
        caller's rule, e.g. a 5xx or a failed upstream); only successful requests give latencies,
        so fast failures cannot make a canary look quick. ``status`` is accepted for the caller's
        convenience and not otherwise used yet."""
        self.ingest([(variant, time.monotonic() if now is None else now, latency_s, error)])

    def ingest(self, batch: Sequence[Finished]) -> None:
        """Finished requests in time order, ``(variant, time, latency_s, error)``, on the clock
        :meth:`evaluate` is given: O(1) each, one lock for the batch, never raises on odd figures."""
        width = self._bucket_width
        with self._lock:
            name: str | None = None
            state: _Variant | None = None
            for variant, t, latency_s, error in batch:
                if variant != name:
                    name, state = variant, self._variant(variant)
                if state is None:
                    self.dropped_variants += 1  # a request of a variant over canary.max_variants
                    continue
                buckets = state.buckets
                if not buckets or t >= buckets[-1][0] + width:
                    buckets.append([t - (t % width), 0.0, 0.0])
                bucket = buckets[-1]
                bucket[1] += 1.0
                if error:
                    bucket[2] += 1.0
                elif latency_s >= 0.0 and math.isfinite(latency_s):
                    state.latencies.append((t, latency_s))

    def add_predictions(self, variant: str, values: Sequence[Prediction], now: float | None = None) -> None:
        """Predictions of one response of ``variant`` (side path): strings and booleans are class
        labels, numbers are numbers (whole numbers with few distinct values are compared as class
        ids at evaluation); anything else, NaN and infinities are skipped."""
        t = time.monotonic() if now is None else now
        labels: list[tuple[float, str]] = []
        numbers: list[tuple[float, float]] = []
        for value in values[: self.config.window]:
            if isinstance(value, bool):
                labels.append((t, "true" if value else "false"))
            elif isinstance(value, str):
                labels.append((t, value[:128]))
            elif isinstance(value, int | float):
                number = float(value)
                if math.isfinite(number):
                    numbers.append((t, number))
        with self._lock:
            state = self._variant(variant)
            if state is None:
                return
            state.labels.extend(labels)
            state.numbers.extend(numbers)

    # ----------------------------------------------------------------------------------------
    # evaluation (one thread, off the request path)

    def _windows(self, now: float) -> dict[str, _Window]:
        since = now - self.config.interval
        bucket_since = since - (since % self._bucket_width)
        out: dict[str, _Window] = {}
        with self._lock:
            copies = {
                name: (list(v.buckets), list(v.latencies), list(v.labels), list(v.numbers))
                for name, v in self._variants.items()
            }
        for name, (buckets, latencies, labels, numbers) in copies.items():
            recent = [b for b in buckets if b[0] >= bucket_since]
            out[name] = _Window(
                requests=int(sum(b[1] for b in recent)),
                errors=int(sum(b[2] for b in recent)),
                latencies=[v for t, v in latencies if t >= since],
                labels=[v for t, v in labels if t >= since],
                numbers=[v for t, v in numbers if t >= since],
            )
        return out

    def evaluate(self, now: float | None = None) -> dict[str, Verdict]:
        """Compare every non-baseline variant with the baseline over the last ``interval`` seconds
        (``now`` on the clock :meth:`ingest` was given, ``time.monotonic`` by default), publish the
        verdicts for :meth:`report` and the collector, and return them."""
        t = time.monotonic() if now is None else now
        windows = self._windows(t)
        drift = dict(self.drift()) if self.drift is not None else None
        quality = dict(self.quality()) if self.quality is not None else None
        base_name = self.config.baseline
        empty = _Window(0, 0, [], [], [])
        base = windows.get(base_name, empty)
        verdicts = {
            name: self._judge(name, window, base, drift, quality)
            for name, window in sorted(windows.items())
            if name != base_name
        }
        samples = {name: w.requests for name, w in windows.items()}
        with self._lock:
            self._verdicts = verdicts
            self._samples = samples
            self._evaluated_at = time.time()
        return verdicts

    def _judge(
        self,
        name: str,
        canary: _Window,
        base: _Window,
        drift: Mapping[str, VariantDriftLike] | None,
        quality: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Verdict:
        checks = {
            "errors": self._errors(canary, base),
            "latency": self._latency(canary, base),
            "predictions": self._predictions(canary, base),
            "drift": self._drift(name, drift),
            "quality": self._quality(name, quality),
        }
        failed = [c for c in CHECKS if checks[c].outcome == FAIL]
        pending = [c for c in ("errors", "latency") if checks[c].outcome != PASS]
        for optional in OPTIONAL_CHECKS:
            # a check with no data on either side (no sampling) holds nothing back; one side short does
            check = checks[optional]
            if check.outcome == INCONCLUSIVE and not check.figures.get("no_data"):
                pending.append(optional)
        if failed:
            verdict = FAIL
            reason = f"{name} fails: " + "; ".join(checks[c].reason for c in failed)
        elif pending:
            verdict = INCONCLUSIVE
            reason = f"{name} is inconclusive: " + "; ".join(checks[c].reason for c in pending)
        else:
            verdict = PASS
            passed = ", ".join(c for c in CHECKS if checks[c].outcome == PASS)
            reason = (
                f"{name} passes ({passed}) over {canary.requests} requests against "
                f"{base.requests} of {self.config.baseline}"
            )
        return Verdict(name, verdict, reason, checks, canary.requests, base.requests)

    def _too_few(self, what: str, have_canary: int, have_base: int, need: int) -> str | None:
        short = []
        if have_canary < need:
            short.append(f"the canary has {have_canary}")
        if have_base < need:
            short.append(f"{self.config.baseline} has {have_base}")
        if not short:
            return None
        return f"too few {what} ({' and '.join(short)}, {need} needed per side)"

    def _errors(self, canary: _Window, base: _Window) -> CheckResult:
        cfg = self.config
        rate_c = canary.errors / canary.requests if canary.requests else 0.0
        rate_b = base.errors / base.requests if base.requests else 0.0
        figures: dict[str, Any] = {
            "rate": _round(rate_c),
            "baseline_rate": _round(rate_b),
            "errors": canary.errors,
            "baseline_errors": base.errors,
            "sample_size": canary.requests,
            "baseline_size": base.requests,
            "tolerance": cfg.error_tolerance,
            "alpha": _round(cfg.alpha),
        }
        short = self._too_few("requests", canary.requests, base.requests, cfg.min_requests)
        if short:
            return CheckResult(INCONCLUSIVE, f"errors: {short}", figures)
        z, p = two_proportion_test(canary.errors, canary.requests, base.errors, base.requests, "greater")
        increase = rate_c - rate_b
        figures.update(z=_round(z, 4), p_value=_pvalue(p), increase=_round(increase))
        text = f"error rate {rate_c:.2%} against {rate_b:.2%} (p={p:.3g})"
        if p < cfg.alpha and increase > cfg.error_tolerance:
            return CheckResult(FAIL, f"errors: {text}, more than {cfg.error_tolerance:.2%} above", figures)
        return CheckResult(PASS, f"errors: {text}", figures)

    def _latency(self, canary: _Window, base: _Window) -> CheckResult:
        cfg = self.config
        xs = np.asarray(canary.latencies, dtype=np.float64)
        ys = np.asarray(base.latencies, dtype=np.float64)
        med_c = float(np.median(xs)) if xs.size else math.nan
        med_b = float(np.median(ys)) if ys.size else math.nan
        figures: dict[str, Any] = {
            "median_s": _round(med_c),
            "baseline_median_s": _round(med_b),
            "sample_size": int(xs.size),
            "baseline_size": int(ys.size),
            "tolerance": cfg.latency_tolerance,
            "alpha": _round(cfg.alpha),
        }
        short = self._too_few("latencies", int(xs.size), int(ys.size), cfg.min_requests)
        if short:
            return CheckResult(INCONCLUSIVE, f"latency: {short}", figures)
        u, p = mann_whitney_u(xs, ys, "greater")
        # the canary's median over the baseline's; a zero baseline median: 1 when both are 0
        effect = med_c / med_b if med_b > 0.0 else (1.0 if med_c <= 0.0 else math.inf)
        shift = hodges_lehmann(xs, ys)
        figures.update(u=u, p_value=_pvalue(p), effect=_round(effect, 4), shift_s=_round(shift))
        text = f"median latency {med_c * 1000:.4g} ms against {med_b * 1000:.4g} ms (x{effect:.3g}, p={p:.3g})"
        if p < cfg.alpha and effect > cfg.latency_tolerance:
            return CheckResult(FAIL, f"latency: {text}, slower than x{cfg.latency_tolerance:g} allows", figures)
        return CheckResult(PASS, f"latency: {text}", figures)

    def _predictions(self, canary: _Window, base: _Window) -> CheckResult:
        cfg = self.config
        kind, counts_c, counts_b = self._histograms(canary, base)
        n_c, n_b = int(counts_c.sum()), int(counts_b.sum())
        figures: dict[str, Any] = {
            "kind": kind,
            "sample_size": n_c,
            "baseline_size": n_b,
            "threshold": cfg.prediction_threshold,
            "alpha": _round(cfg.alpha),
        }
        if n_c == 0 and n_b == 0:
            figures["no_data"] = True
            return CheckResult(INCONCLUSIVE, "predictions: none sampled", figures)
        short = self._too_few("predictions", n_c, n_b, cfg.min_predictions)
        if short:
            return CheckResult(INCONCLUSIVE, f"predictions: {short}", figures)
        distance = js_distance(counts_c, counts_b)
        _, p, _ = chi2_contingency(counts_b, counts_c)
        figures.update(distance=_round(distance, 4), p_value=_pvalue(p), bins=int(counts_c.size))
        text = f"Jensen-Shannon distance {distance:.3g} over {counts_c.size} {kind} bins (p={p:.3g})"
        if distance >= cfg.prediction_threshold and p < cfg.alpha:
            return CheckResult(FAIL, f"predictions: {text}, at or over {cfg.prediction_threshold:g}", figures)
        return CheckResult(PASS, f"predictions: {text}", figures)

    def _quality(self, name: str, quality: Mapping[str, Mapping[str, Any]] | None) -> CheckResult:
        cfg = self.config
        base_name = cfg.baseline
        figures: dict[str, Any] = {}
        if quality is None:
            figures["no_data"] = True
            return CheckResult(INCONCLUSIVE, "quality: feedback is off (no labels)", figures)
        c, b = quality.get(name), quality.get(base_name)
        if c is None and b is None:
            figures["no_data"] = True
            return CheckResult(INCONCLUSIVE, "quality: no labels for either variant yet", figures)
        figures.update(
            metric=(c or b or {}).get("metric"),
            window=(c or b or {}).get("window"),
            labels=int(c.get("labels", 0)) if c else 0,
            baseline_labels=int(b.get("labels", 0)) if b else 0,
        )
        for side, entry in ((name, c), (base_name, b)):
            if entry is None or entry.get("value") is None:
                why = "no labels" if entry is None else str(entry.get("reason", "no score"))
                return CheckResult(INCONCLUSIVE, f"quality: {side} has no score yet ({why})", figures)
        assert c is not None and b is not None
        if c.get("metric") != b.get("metric"):
            text = f"quality: {name} is scored by {c.get('metric')}, {base_name} by {b.get('metric')}"
            return CheckResult(INCONCLUSIVE, text, figures)
        value_c, value_b = float(c["value"]), float(b["value"])
        figures.update(value=_round(value_c), baseline_value=_round(value_b))
        n_c, n_b = figures["labels"], figures["baseline_labels"]
        if c["metric"] == "accuracy":
            # wrong answers of each side: is the canary's share greater?
            wrong_c, wrong_b = round((1.0 - value_c) * n_c), round((1.0 - value_b) * n_b)
            z, p = two_proportion_test(wrong_c, n_c, wrong_b, n_b, "greater")
            drop = value_b - value_c
            figures.update(tolerance=cfg.accuracy_tolerance, alpha=_round(cfg.alpha))
            figures.update(z=_round(z, 4), p_value=_pvalue(p))
            text = f"accuracy {value_c:.2%} against {value_b:.2%} over {n_c} and {n_b} labels (p={p:.3g})"
            if p < cfg.alpha and drop > cfg.accuracy_tolerance:
                return CheckResult(FAIL, f"quality: {text}, more than {cfg.accuracy_tolerance:.2%} below", figures)
            return CheckResult(PASS, f"quality: {text}", figures)
        ratio = value_c / value_b if value_b > 0.0 else (1.0 if value_c <= 0.0 else math.inf)
        figures.update(tolerance=cfg.mae_tolerance, ratio=_round(ratio, 4))
        text = f"{c['metric']} {value_c:.4g} against {value_b:.4g} (x{ratio:.3g}) over {n_c} and {n_b} labels"
        if ratio > cfg.mae_tolerance:
            return CheckResult(FAIL, f"quality: {text}, above x{cfg.mae_tolerance:g}", figures)
        return CheckResult(PASS, f"quality: {text}", figures)

    def _histograms(self, canary: _Window, base: _Window) -> tuple[str, np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        """(kind, canary counts, baseline counts) over the same bins: class labels when the window
        holds more labels than numbers, else numbers (as class ids when whole and few, else on baseline quantiles)."""
        cfg = self.config
        if len(canary.labels) + len(base.labels) > len(canary.numbers) + len(base.numbers):
            return ("classes", *_class_counts(canary.labels, base.labels))
        xs = np.asarray(canary.numbers, dtype=np.float64)
        ys = np.asarray(base.numbers, dtype=np.float64)
        both = np.concatenate((xs, ys))
        if both.size and np.all(both == np.round(both)):
            distinct = np.unique(both)
            if distinct.size <= cfg.max_classes:
                return (
                    "classes",
                    np.bincount(np.searchsorted(distinct, xs), minlength=distinct.size),
                    np.bincount(np.searchsorted(distinct, ys), minlength=distinct.size),
                )
        if ys.size == 0 or xs.size == 0:
            return "values", np.array([float(xs.size)]), np.array([float(ys.size)])
        edges = np.unique(np.quantile(ys, np.linspace(0.0, 1.0, cfg.prediction_bins + 1)[1:-1]))
        counts_c = np.bincount(np.searchsorted(edges, xs, side="right"), minlength=edges.size + 1)
        counts_b = np.bincount(np.searchsorted(edges, ys, side="right"), minlength=edges.size + 1)
        return "values", counts_c, counts_b

    def _drift(self, name: str, drift: Mapping[str, VariantDriftLike] | None) -> CheckResult:
        cfg = self.config
        base_name = cfg.baseline
        figures: dict[str, Any] = {"drift_share": cfg.drift_share}
        if drift is None:
            figures["no_data"] = True
            return CheckResult(INCONCLUSIVE, "drift: payload sampling is off (no drift windows)", figures)
        c, b = drift.get(name), drift.get(base_name)
        c_features = set(c.evaluated_features) if c is not None else set()
        c_predictions = set(c.evaluated_predictions) if c is not None else set()
        b_features = set(b.evaluated_features) if b is not None else set()
        b_predictions = set(b.evaluated_predictions) if b is not None else set()
        figures.update(rows=c.rows if c is not None else 0, baseline_rows=b.rows if b is not None else 0)
        if not (c_features or c_predictions or b_features or b_predictions):
            figures["no_data"] = True
            return CheckResult(
                INCONCLUSIVE, "drift: no window has enough rows yet (or the reference is still collecting)", figures
            )
        features = c_features & b_features
        predictions = c_predictions & b_predictions
        if not (features or predictions):
            short = name if not (c_features or c_predictions) else base_name
            return CheckResult(
                INCONCLUSIVE, f"drift: {short}'s windows hold fewer rows than drift.min_samples", figures
            )
        assert c is not None and b is not None
        drifted_c = sorted(f for f in c.drifted_features if f in features)
        drifted_b = sorted(f for f in b.drifted_features if f in features)
        share_c = len(drifted_c) / len(features) if features else 0.0
        share_b = len(drifted_b) / len(features) if features else 0.0
        pred_c = sorted(p for p in c.drifted_predictions if p in predictions)
        pred_b = sorted(p for p in b.drifted_predictions if p in predictions)
        new_predictions = [p for p in pred_c if p not in pred_b]
        figures.update(
            features=len(features),
            predictions=len(predictions),
            share=_round(share_c, 4),
            baseline_share=_round(share_b, 4),
            drifted_features=drifted_c,
            baseline_drifted_features=drifted_b,
            drifted_predictions=pred_c,
            baseline_drifted_predictions=pred_b,
        )
        problems = []
        if new_predictions:
            names = ", ".join(new_predictions)
            problems.append(f"predictions {names} drifted from the reference and {base_name}'s did not")
        inputs_c, inputs_b = share_c >= cfg.drift_share, share_b >= cfg.drift_share
        if features and inputs_c and not inputs_b:
            problems.append(
                f"{len(drifted_c)} of {len(features)} features drifted ({share_c:.0%}, {base_name}: {share_b:.0%}; "
                f"canary.drift_share {cfg.drift_share:g})"
            )
        if problems:
            return CheckResult(FAIL, "drift: " + "; ".join(problems), figures)
        text = (
            f"drift: {len(drifted_c)} of {len(features)} features and {len(pred_c)} of {len(predictions)} "
            f"predictions drifted ({base_name}: {len(drifted_b)} and {len(pred_b)})"
        )
        return CheckResult(PASS, text, figures)

    # ----------------------------------------------------------------------------------------
    # reading (any thread)

    def verdicts(self) -> dict[str, Verdict]:
        with self._lock:
            return dict(self._verdicts)

    def report(self) -> dict[str, Any]:
        """The last evaluation as JSON-able data (the /canary document)."""
        cfg = self.config
        with self._lock:
            verdicts = dict(self._verdicts)
            samples = dict(self._samples)
            evaluated_at = self._evaluated_at
            dropped = self.dropped_variants
        return {
            "baseline": cfg.baseline,
            "interval_s": cfg.interval,
            "confidence": cfg.confidence,
            "evaluated_at": evaluated_at,
            "requests": samples,
            "dropped_variants": dropped,
            "variants": {name: v.as_dict() for name, v in verdicts.items()},
        }

    def collector(self) -> Collector:
        return CanaryCollector(self)


def _class_counts(canary: Sequence[str], base: Sequence[str]) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    count_c, count_b = Counter(canary), Counter(base)
    labels = sorted(set(count_c) | set(count_b))
    return (
        np.array([count_c[k] for k in labels], dtype=np.float64),
        np.array([count_b[k] for k in labels], dtype=np.float64),
    )


class CanaryCollector(Collector):
    """``infermon_canary_verdict{variant}``, ``infermon_canary_check{variant,check}`` and
    ``infermon_canary_samples{variant}`` from the analyzer's last evaluation."""

    def __init__(self, analyzer: CanaryAnalyzer) -> None:
        self._analyzer = analyzer

    def collect(self) -> Iterator[Metric]:
        analyzer = self._analyzer
        with analyzer._lock:
            verdicts = dict(analyzer._verdicts)
            samples = dict(analyzer._samples)
        verdict = GaugeMetricFamily(
            "infermon_canary_verdict",
            "Canary analysis verdict of each variant against the baseline: 1 pass, 0 inconclusive, -1 fail",
            labels=["variant"],
        )
        check = GaugeMetricFamily(
            "infermon_canary_check",
            "Outcome of each canary check (errors, latency, predictions, drift, quality): 1 pass, 0 inconclusive, "
            "-1 fail",
            labels=["variant", "check"],
        )
        count = GaugeMetricFamily(
            "infermon_canary_samples",
            "Requests of each variant in the canary analysis interval at the last evaluation",
            labels=["variant"],
        )
        for name, v in sorted(verdicts.items()):
            verdict.add_metric([name], float(v.verdict))
            for check_name, result in v.checks.items():
                check.add_metric([name, check_name], float(result.outcome))
        for name, n in sorted(samples.items()):
            count.add_metric([name], float(n))
        yield verdict
        yield check
        yield count
