"""The drift engine: live windows of every column against the reference, per variant, on the side path.

One side-path thread calls :meth:`DriftEngine.add` with the rows the adapters extracted from one
sample and the sample's variant, and :meth:`DriftEngine.evaluate` every ``drift.interval``; any
other thread reads :meth:`report` (the ``/drift`` JSON), :meth:`summary` (the canary analysis) and
:meth:`collector` (Prometheus). Those only ever see the snapshot the last evaluation published,
swapped in whole under a lock; nothing they return is changed afterwards.

There is one reference and, per variant (``stable``, ``canary``, ...: the ``variant`` label), one
live window per column (a feature, or a prediction column). Every variant's windows share the
reference bins, the method that decides ``drifted`` and the quality rules; a variant gets its
windows the first time its rows arrive after the reference is ready, at most ``drift.max_variants``
variants (the variant the top level of ``/drift`` shows always has a place). A window keeps the last
``drift.window_size`` valid values no older than ``drift.window_seconds``: their reference bin, and
for a numeric column the value itself. ``add`` costs one dict lookup for the variant, then a bisect
and a few appends per value. ``evaluate`` computes, for a window of at least ``drift.min_samples``
values, PSI over the reference bins and the method that decides ``drifted`` (Evidently's defaults
unless ``drift.features`` says otherwise), with the other statistics that are cheap beside it. A
smaller window is "insufficient data", never "no drift".

Without a profile, the first ``drift.reference_samples`` rows become the reference
(:func:`proxy.drift.profile.build_profile`): rows of the reference variant only when one is given
(a canary must not shape the reference it is judged against; other variants' rows are dropped and
counted meanwhile), of every variant otherwise. The live windows start after them.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import threading
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.drift import stats
from proxy.drift.profile import DISTINCT_CAP, FeatureProfile, Profile, build_profile, category_of, is_missing, number_of
from proxy.errors import ConfigError
from proxy.settings import Drift, DriftFeature

ColumnKind = Literal["feature", "prediction"]

#: Evidently's defaults: a reference of more than this many values counts as large ...
LARGE_REFERENCE = 1000
#: ... and a numeric column with more than this many distinct values as continuous
CONTINUOUS_DISTINCT = 5
#: the default threshold of each method (PSI's is drift.psi_drift)
DEFAULT_THRESHOLD: dict[str, float] = {
    "jensenshannon": 0.1,
    "wasserstein": 0.1,
    "ks": 0.05,
    "chisquare": 0.05,
    "z": 0.05,
}
#: methods whose figure is a p-value: drifted when it is below the threshold; the others are
#: distances: drifted when at or above it
P_VALUE_METHODS = frozenset({"ks", "chisquare", "z"})
METHOD_NAMES = {
    "psi": "population stability index",
    "jensenshannon": "Jensen-Shannon distance",
    "wasserstein": "Wasserstein distance in reference standard deviations",
    "ks": "Kolmogorov-Smirnov test",
    "chisquare": "chi-squared test",
    "z": "two-proportion Z-test",
}
#: quality problems counted per tracked column, and those counted under feature="other"
PROBLEMS = ("missing", "type_mismatch", "out_of_range", "unseen_category")
OTHER_FEATURE = "other"
OTHER_PROBLEMS = ("unknown_feature", "over_budget", "invalid_name")
#: why rows of a whole sample were not windowed (infermon_drift_rows_dropped_total{reason}):
#: collecting (another variant's rows while the reference variant's rows build the reference),
#: variant_budget (a variant beyond drift.max_variants), invalid_variant (a name that cannot be a label)
DROP_REASONS = ("collecting", "variant_budget", "invalid_variant")
#: a column name from traffic longer than this, or holding control characters, is never tracked
#: (it would become a label value of every drift series)
MAX_NAME_LENGTH = 128

_ABSENT = object()
_INF = math.inf


@dataclass(frozen=True, slots=True)
class Choice:
    """The method that decides ``drifted`` for one column, its threshold and why."""

    method: str
    threshold: float
    why: str


def _distinct_text(fp: FeatureProfile) -> str:
    return f"more than {DISTINCT_CAP}" if fp.distinct > DISTINCT_CAP else str(fp.distinct)


def _applies(method: str, fp: FeatureProfile) -> str | None:
    """None when ``method`` can decide for this column, else the reason it cannot."""
    if method in ("ks", "wasserstein"):
        if fp.kind != "numeric":
            return f"{method} needs a numeric column and {fp.name!r} is categorical"
        if not fp.sample:
            return f"{method} needs the raw reference values and the profile kept no sample of {fp.name!r}"
    if method == "z" and fp.distinct > 2:
        return f"z compares two proportions and {fp.name!r} has {_distinct_text(fp)} distinct values"
    return None


def default_choice(fp: FeatureProfile) -> Choice:
    """Evidently's default method for a column, from the reference alone (Evidently counts distinct
    values over reference and current data together; the reference alone keeps the choice from
    changing with the window)."""
    large = fp.count > LARGE_REFERENCE
    size = f"a reference of {fp.count} values ({'more than' if large else 'at most'} {LARGE_REFERENCE})"
    continuous = fp.kind == "numeric" and fp.distinct > CONTINUOUS_DISTINCT
    if continuous:
        shape = f"numeric with {_distinct_text(fp)} distinct values (more than {CONTINUOUS_DISTINCT})"
    elif fp.kind == "numeric":
        shape = f"numeric with only {fp.distinct} distinct values"
    else:
        shape = f"categorical with {_distinct_text(fp)} distinct values"
    if continuous and not fp.sample:
        method = "jensenshannon" if large else "chisquare"
        rest = "; the profile kept no sample of raw values, so the reference bins decide"
    elif continuous:
        method = "wasserstein" if large else "ks"
        rest = ""
    elif large:
        method, rest = "jensenshannon", ""
    else:
        method, rest = ("chisquare", "") if fp.distinct > 2 else ("z", "")
    threshold = DEFAULT_THRESHOLD[method]
    rule = f"p < {threshold}" if method in P_VALUE_METHODS else f"the distance >= {threshold}"
    return Choice(method, threshold, f"{size}, {shape}: {METHOD_NAMES[method]}, drifted when {rule} "
                  f"(Evidently's default){rest}")  # fmt: skip


def choose(fp: FeatureProfile, override: DriftFeature | None, psi_drift: float) -> tuple[Choice, str | None]:
    """The deciding method of a column, and the reason an override was not applied (None if it was,
    or if there was none)."""
    base = default_choice(fp)
    if override is None or (override.method is None and override.threshold is None):
        return base, None
    key = f"drift.features.{fp.name}"
    method = override.method or base.method
    problem = _applies(method, fp)
    if problem is not None:
        return base, f"{key}.method: {problem}; {base.method} decides instead"
    threshold = override.threshold
    if threshold is None:
        threshold = psi_drift if method == "psi" else DEFAULT_THRESHOLD[method]
    rule = f"p < {threshold}" if method in P_VALUE_METHODS else f"the value >= {threshold}"
    if override.method is None:
        why = f"{key}.threshold sets {threshold} for the default method ({base.why})"
    else:
        set_threshold = f" and threshold {threshold}" if override.threshold is not None else ""
        why = f"{key} sets method {method}{set_threshold}: {METHOD_NAMES[method]}, drifted when {rule}"
    return Choice(method, threshold, why), None


def _range_labels(edges: list[float]) -> list[str]:
    if not edges:
        return ["all values"]
    out = [f"<= {edges[0]:.6g}"]
    out += [f"({lo:.6g}, {hi:.6g}]" for lo, hi in itertools.pairwise(edges)]
    out.append(f"> {edges[-1]:.6g}")
    return out


class _Spec:
    """What every variant's window of one column shares: the reference bins, the deciding method,
    and the parts of the report that come from the reference alone (built once)."""

    __slots__ = (
        "bin_labels",
        "choice",
        "closed",
        "edges",
        "fp",
        "hi",
        "index",
        "key",
        "kind",
        "lo",
        "name",
        "numeric",
        "other",
        "override_problem",
        "proportions",
        "ranges",
        "ref_sample",
    )

    def __init__(
        self, fp: FeatureProfile, kind: ColumnKind, choice: Choice, problem: str | None, key: str | None = None
    ) -> None:
        self.fp = fp
        self.name = fp.name
        self.key = key if key is not None else fp.name  # the row's key (the name, unless renamed)
        self.kind = kind
        self.choice = choice
        self.override_problem = problem
        self.numeric = fp.kind == "numeric"
        self.edges = fp.edges
        self.index = {c: i for i, c in enumerate(fp.categories)}
        self.other = len(fp.categories)
        self.lo = fp.min if fp.min is not None else -_INF
        self.hi = fp.max if fp.max is not None else _INF
        # every reference value has a bin of its own: a value outside them was never seen
        self.closed = fp.kind == "categorical" and fp.count > 0 and fp.counts[-1] == 0
        self.ref_sample = np.asarray(fp.sample, dtype=np.float64) if self.numeric else np.zeros(0)
        self.bin_labels = fp.bins()
        self.proportions = fp.proportions()
        self.ranges = _range_labels(fp.edges) if self.numeric else []


class _Column:
    """One variant's window of one column: its live values, its bin counters and its quality counters."""

    __slots__ = (
        "bin_total",
        "bins",
        "closed",
        "edges",
        "exported",
        "hi",
        "index",
        "key",
        "lo",
        "missing",
        "name",
        "numeric",
        "other",
        "out_of_range",
        "spec",
        "times",
        "type_mismatch",
        "unseen_category",
        "values",
    )

    def __init__(self, spec: _Spec, window: int) -> None:
        self.spec = spec
        # the spec's fields that add() reads, as attributes of the column itself (one lookup less)
        self.name = spec.name
        self.key = spec.key
        self.numeric = spec.numeric
        self.edges = spec.edges
        self.index = spec.index
        self.other = spec.other
        self.lo = spec.lo
        self.hi = spec.hi
        self.closed = spec.closed
        self.times: deque[float] = deque(maxlen=window)
        self.bins: deque[int] = deque(maxlen=window)
        self.values: deque[float] = deque(maxlen=window)
        self.bin_total = [0] * len(spec.proportions)
        self.missing = self.type_mismatch = self.out_of_range = self.unseen_category = 0
        self.exported = False

    def add(self, value: Any, t: float) -> None:
        if self.numeric:
            if type(value) is float and -_INF < value < _INF:
                f = value
            elif value is _ABSENT or is_missing(value):
                self.missing += 1
                return
            else:
                g = number_of(value)
                if g is None:
                    self.type_mismatch += 1
                    return
                f = g
            if f < self.lo or f > self.hi:
                self.out_of_range += 1
            b = bisect_left(self.edges, f)
            self.values.append(f)
        else:
            label = None if value is _ABSENT else category_of(value)
            if label is None:
                if value is _ABSENT or is_missing(value):
                    self.missing += 1
                else:
                    self.type_mismatch += 1
                return
            b = self.index.get(label, self.other)
            if b == self.other and self.closed:
                self.unseen_category += 1
        self.bins.append(b)
        self.times.append(t)
        self.bin_total[b] += 1

    def expire(self, cutoff: float) -> None:
        times, bins, values = self.times, self.bins, self.values
        while times and times[0] < cutoff:
            times.popleft()
            bins.popleft()
            if self.numeric:
                values.popleft()

    def quality(self) -> dict[str, int]:
        return {
            "missing": self.missing,
            "type_mismatch": self.type_mismatch,
            "out_of_range": self.out_of_range,
            "unseen_category": self.unseen_category,
        }


class _Variant:
    """One variant's windows (none until its rows arrive after the reference is ready) and the
    counts of its values that no column took."""

    __slots__ = ("columns", "features", "invalid_names", "name", "omitted", "over_budget", "predictions",
                 "unknown", "windowed")  # fmt: skip

    def __init__(self, name: str) -> None:
        self.name = name
        self.windowed = False
        self.columns: list[_Column] = []
        self.features: list[_Column] = []
        self.predictions: list[_Column] = []
        self.omitted: list[str] = []  # columns whose bin series drift.max_series left out
        self.unknown = 0
        self.over_budget = 0
        self.invalid_names = 0

    def other(self) -> dict[str, int]:
        return {"unknown_feature": self.unknown, "over_budget": self.over_budget, "invalid_name": self.invalid_names}


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What one evaluation found for one column."""

    report: dict[str, Any]
    statistics: dict[str, float]
    drifted: bool | None
    rows: int


def _evaluate(col: _Column, cfg: Drift) -> _Outcome:
    spec = col.spec
    fp = spec.fp
    n = len(col.bins)
    nbins = len(spec.proportions)
    live = np.bincount(np.fromiter(col.bins, dtype=np.int64, count=n), minlength=nbins) if n else np.zeros(nbins)
    live_counts = [int(c) for c in live]
    choice = spec.choice
    threshold = choice.threshold
    report: dict[str, Any] = {
        "name": spec.name,
        "kind": spec.kind,
        "type": fp.kind,
        "method": choice.method,
        "threshold": threshold,
        "why": choice.why,
    }
    if spec.override_problem:
        report["config_problem"] = spec.override_problem
    # the reference's parts are the spec's lists, shared by every variant and evaluation: nobody
    # changes a published report, and report() copies each shared list once
    histogram: dict[str, Any] = {"bins": spec.bin_labels, "reference": spec.proportions, "live": live_counts}
    if spec.numeric:
        histogram["edges"] = spec.edges
        histogram["ranges"] = spec.ranges
    statistics: dict[str, float] = {}
    drifted: bool | None = None
    if fp.count == 0:
        status = "no reference data"
    elif n < cfg.min_samples:
        status = "insufficient data"
    else:
        status = "evaluated"
        statistics = _statistics(col, live_counts, n)
        value = statistics[choice.method]
        drifted = value < threshold if choice.method in P_VALUE_METHODS else value >= threshold
    report["status"] = status
    report["drifted"] = drifted
    report["window_rows"] = n
    report["min_samples"] = cfg.min_samples
    report["statistics"] = statistics
    if "psi" in statistics:
        value = statistics["psi"]
        level = "drift" if value >= cfg.psi_drift else "warn" if value >= cfg.psi_warn else "ok"
        report["psi"] = {"value": value, "warn": cfg.psi_warn, "drift": cfg.psi_drift, "level": level}
    report["histogram"] = histogram
    report["quality"] = col.quality()
    report["bins_exported"] = col.exported
    return _Outcome(report, statistics, drifted, n)


def _statistics(col: _Column, live_counts: list[int], n: int) -> dict[str, float]:
    """PSI, Jensen-Shannon and chi-squared over the bins; for a numeric column with a reference
    sample normed Wasserstein and the KS statistic (its p-value only where KS decides: that is the
    costly one); the Z-test where the reference has at most two values."""
    spec = col.spec
    fp = spec.fp
    ref = fp.counts
    out: dict[str, float] = {
        "psi": stats.psi(ref, live_counts),
        "jensenshannon": stats.js_distance(ref, live_counts),
    }
    chi, p, dof = stats.chi2_contingency(ref, live_counts)
    out["chisquare_statistic"] = chi
    out["chisquare"] = p
    out["chisquare_dof"] = float(dof)
    values = np.fromiter(col.values, dtype=np.float64, count=n) if spec.numeric else None
    if values is not None and spec.ref_sample.size:
        out["wasserstein"] = stats.normed_wasserstein(spec.ref_sample, values, fp.std or 0.0)
        if spec.choice.method == "ks":
            out["ks_statistic"], out["ks"] = stats.ks_2samp(spec.ref_sample, values)
        else:
            out["ks_statistic"] = stats.ks_statistic(spec.ref_sample, values)
    if fp.distinct <= 2:
        # the first reference value against the rest; for a numeric column the value itself, so a
        # constant reference still tells a live value apart from it
        numeric = values is not None and fp.min is not None
        hits = int(np.count_nonzero(values == fp.min)) if numeric else live_counts[0]
        out["z_statistic"], out["z"] = stats.z_test(ref[0], sum(ref), hits, n)
    return out


def _rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True)
class VariantDrift:
    """One variant's drift at the last evaluation (:meth:`DriftEngine.summary`)."""

    variant: str
    evaluated: tuple[str, ...]  # columns with a decision (enough rows, a reference)
    evaluated_features: tuple[str, ...]  # those of them that are features ...
    evaluated_predictions: tuple[str, ...]  # ... and predictions
    drifted_features: tuple[str, ...]  # feature columns whose deciding method flags drift
    drifted_predictions: tuple[str, ...]  # prediction columns that drifted
    insufficient: tuple[str, ...]  # columns below drift.min_samples
    rows: int  # the most rows any column of this variant has in its window
    evaluated_at: float | None  # wall-clock time (time.time()) of that evaluation


@dataclass(frozen=True, slots=True)
class _Snapshot:
    report: dict[str, Any]
    families: tuple[Metric, ...]
    summary: dict[str, VariantDrift]


def valid_name(name: str) -> bool:
    """A column name that may become a label value: at most 128 printable characters."""
    return 0 < len(name) <= MAX_NAME_LENGTH and name.isprintable()


class DriftEngine:
    """Drift of every feature and prediction column against one reference, per variant, per replica.

    ``reference_variant``: without a profile, only this variant's rows build the reference (None:
    every variant's). ``default_variant``: the variant of every request when nothing splits traffic
    (``labels.variant``). The top level of :meth:`report` shows the reference variant when there is
    one, else the default variant.
    """

    def __init__(
        self,
        cfg: Drift,
        profile: Profile | None,
        reference_variant: str | None = None,
        default_variant: str = "stable",
    ) -> None:
        self.cfg = cfg
        self._lock = threading.Lock()
        self._reference_variant = reference_variant
        #: the variant the top level of /drift shows: it always has a place within drift.max_variants
        self._primary = reference_variant if reference_variant is not None else default_variant
        self._profile: Profile | None = None
        self._specs: list[_Spec] = []
        self._variants: dict[str, _Variant] = {}
        self._feature_names: frozenset[str] = frozenset()
        self._prediction_names: frozenset[str] = frozenset()
        self._untracked: frozenset[str] = frozenset()  # reference columns beyond drift.max_features
        #: auto reference: exported prediction name -> its key in the prediction rows
        self._renamed: dict[str, str] = {}
        #: rows (instances) of whole samples that no window took, by reason
        self._dropped: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        # the series budget, across variants: per spec, whether its reference ratio is exported
        # (True), left out and counted (False) or not decided yet (None)
        self._series_used = 0
        self._series_omitted = 0
        self._ratio_exported: list[bool | None] = []
        self._config_problems: list[str] = []
        # collecting the reference from the first rows
        self._collect_rows: list[dict[str, Any]] = []
        self._collect_predictions: list[dict[str, Any]] = []
        self._collect_names: dict[str, None] = {}  # names admitted so far, features and predictions
        self._reference: dict[str, Any]
        self._evaluated_at: float | None = None
        if profile is not None:
            self._check_overrides(profile)
            self._reference = {
                "source": "profile",
                "file": cfg.reference,
                "built_from": profile.source,
                "created": profile.created,
                "rows": profile.rows,
                "status": "ready",
            }
            self._install(profile)
        else:
            self._reference = self._collecting()
        self._snapshot = self._publish(self._outcomes(None))

    # -- the reference --------------------------------------------------------------------------

    def _check_overrides(self, profile: Profile) -> None:
        names = [f.name for f in (*profile.features, *profile.predictions)]
        for name, override in self.cfg.features.items():
            fp = profile.get(name)
            key = f"drift.features.{name}"
            if fp is None:
                shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
                where = self.cfg.reference or profile.source or "given"
                raise ConfigError(
                    f"{key}: the reference profile ({where}) has no column {name!r} (its columns: {shown}); "
                    "fix the name or remove the entry"
                )
            if override.method is not None:
                problem = _applies(override.method, fp)
                if problem is not None:
                    raise ConfigError(f"{key}.method: {problem}; choose another method or remove the key")

    def _collecting(self) -> dict[str, Any]:
        target = self.cfg.reference_samples
        return {
            "source": f"first {target} samples",
            "variant": self._reference_variant,
            "status": "collecting",
            "rows": len(self._collect_rows),
            "target": target,
            "progress": round(len(self._collect_rows) / target, 4),
        }

    def _install(self, profile: Profile) -> None:
        cfg = self.cfg
        self._profile = profile
        budget = cfg.max_features
        specs: list[_Spec] = []
        untracked: list[str] = []
        groups: tuple[tuple[ColumnKind, list[FeatureProfile]], ...] = (
            ("feature", profile.features),
            ("prediction", profile.predictions),
        )
        for kind, group in groups:
            for fp in group:
                if len(specs) >= budget:
                    untracked.append(fp.name)
                    continue
                choice, problem = choose(fp, cfg.features.get(fp.name), cfg.psi_drift)
                if problem:
                    self._config_problems.append(problem)
                key = self._renamed.get(fp.name) if kind == "prediction" else None
                specs.append(_Spec(fp, kind, choice, problem, key))
        known = {f.name for f in (*profile.features, *profile.predictions)}
        for name in cfg.features:
            if name not in known:
                self._config_problems.append(f"drift.features.{name}: the reference has no column {name!r}")
        self._specs = specs
        self._ratio_exported = [None] * len(specs)
        self._feature_names = frozenset(s.name for s in specs if s.kind == "feature")
        self._prediction_names = frozenset(s.key for s in specs if s.kind == "prediction")
        self._untracked = frozenset(untracked)
        # the variant the top level shows gets its windows (and its bin series) first
        self._window(self._variant(self._primary))

    def _admit(self, row: Mapping[str, Any], variant: _Variant) -> dict[str, Any]:
        """The part of a row the reference is built from: names within drift.max_features."""
        names = self._collect_names
        if len(names) >= self.cfg.max_features and names.keys() >= row.keys():
            return dict(row)
        out: dict[str, Any] = {}
        for key, value in row.items():
            if key not in names:
                if not valid_name(key):
                    variant.invalid_names += 1
                    continue
                if len(names) >= self.cfg.max_features:
                    variant.over_budget += 1
                    continue
                names[key] = None
            out[key] = value
        return out

    def _build_reference(self) -> None:
        cfg = self.cfg
        features = build_profile(self._collect_rows, bins=cfg.reference_bins, top_k=cfg.reference_top_k,
                                 source=f"first {len(self._collect_rows)} samples")  # fmt: skip
        predictions: list[FeatureProfile] = []
        if self._collect_predictions:
            predictions = build_profile(self._collect_predictions, bins=cfg.reference_bins,
                                        top_k=cfg.reference_top_k).features  # fmt: skip
        # a name seen as a feature in some samples and as a prediction in others: the prediction is
        # exported as prediction.<name>, so no series is written twice
        taken = {f.name for f in features.features}
        for i, fp in enumerate(predictions):
            if fp.name in taken:
                name = "prediction." + fp.name
                while name in taken:
                    name = "prediction." + name
                self._renamed[name] = fp.name
                predictions[i] = dataclasses.replace(fp, name=name)
                taken.add(name)
        profile = Profile(features.features, predictions, features.rows, features.source, features.created)
        self._collect_rows = []
        self._collect_predictions = []
        self._collect_names = {}
        self._install(profile)
        reference = {
            "source": f"first {cfg.reference_samples} samples",
            "variant": self._reference_variant,
            "status": "ready",
            "rows": profile.rows,
            "target": cfg.reference_samples,
            "progress": 1.0,
            "created": profile.created,
        }
        with self._lock:
            self._reference = reference

    # -- variants -------------------------------------------------------------------------------

    def _variant(self, name: str) -> _Variant:
        v = self._variants.get(name)
        if v is None:
            v = self._variants[name] = _Variant(name)
        return v

    def _fits(self, name: str) -> bool:
        """Whether a new variant fits in drift.max_variants (the top-level variant's place kept)."""
        taken = len(self._variants)
        if name != self._primary and self._primary not in self._variants:
            taken += 1
        return taken < self.cfg.max_variants

    def _window(self, v: _Variant) -> None:
        """Give a variant its windows, one per reference column; their bin series are exported in
        column order while the series total across variants fits in drift.max_series (a column's
        reference ratio is counted once, with the first variant that exports its bins)."""
        cfg = self.cfg
        ratio = self._ratio_exported
        used = self._series_used
        stopped = False
        columns: list[_Column] = []
        for i, spec in enumerate(self._specs):
            col = _Column(spec, cfg.window_size)
            size = len(spec.proportions)
            cost = size if ratio[i] else 2 * size
            if not stopped and used + cost <= cfg.max_series:
                col.exported = True
                used += cost
                if ratio[i] is False:  # counted as left out by an earlier variant
                    self._series_omitted -= size
                ratio[i] = True
            else:
                stopped = True
                v.omitted.append(spec.name)
                self._series_omitted += size
                if ratio[i] is None:
                    ratio[i] = False
                    self._series_omitted += size
            columns.append(col)
        self._series_used = used
        v.columns = columns
        v.features = [c for c in columns if c.spec.kind == "feature"]
        v.predictions = [c for c in columns if c.spec.kind == "prediction"]
        v.windowed = True

    # -- the side path --------------------------------------------------------------------------

    def columns(self) -> list[str] | None:
        """The reference's feature order (rows of bare numbers are named by it); None until there is one."""
        profile = self._profile
        return None if profile is None else profile.columns()

    def add(self, rows: list[dict[str, Any]], predictions: list[dict[str, Any]], t: float, variant: str) -> None:
        """Take the rows (and predictions) of one sample of ``variant``, seen at wall-clock time ``t``.
        Side-path thread only."""
        v = self._variants.get(variant)
        if v is None or not v.windowed:
            entered = self._enter(rows, predictions, variant)
            if entered is None:
                return
            v, rows, predictions = entered
        self._add_group(rows, v.features, self._feature_names, t, v)
        self._add_group(predictions, v.predictions, self._prediction_names, t, v)

    def _enter(
        self, rows: list[dict[str, Any]], predictions: list[dict[str, Any]], name: str
    ) -> tuple[_Variant, list[dict[str, Any]], list[dict[str, Any]]] | None:
        """The slow path of add: a variant without windows yet, or rows while the reference is
        collected. The variant and the rows left for its windows, or None when none are."""
        reference = self._reference_variant
        v = self._variants.get(name)
        if v is None:
            reason = None
            if not valid_name(name):
                reason = "invalid_variant"
            elif self._profile is None and reference is not None and name != reference:
                reason = "collecting"
            elif not self._fits(name):
                reason = "variant_budget"
            if reason is not None:
                self._dropped[reason] += max(len(rows), len(predictions))
                return None
            v = self._variant(name)
        if self._profile is None:
            if reference is not None and name != reference:
                self._dropped["collecting"] += max(len(rows), len(predictions))
                return None
            target = self.cfg.reference_samples
            take = min(len(rows), target - len(self._collect_rows))
            self._collect_rows.extend(self._admit(r, v) for r in rows[:take])
            self._collect_predictions.extend(self._admit(p, v) for p in predictions[:take])
            if len(self._collect_rows) < target:
                progress = self._collecting()
                with self._lock:
                    self._reference = progress
                return None
            self._build_reference()
            rows, predictions = rows[take:], predictions[take:]
        if not v.windowed:
            self._window(v)
        return v, rows, predictions

    def _add_group(
        self, rows: Iterable[Mapping[str, Any]], cols: list[_Column], names: frozenset[str], t: float, v: _Variant
    ) -> None:
        absent = _ABSENT
        for row in rows:
            get = row.get
            for col in cols:
                col.add(get(col.key, absent), t)
            if not names.issuperset(row):
                for key in row:
                    if key not in names:
                        if key in self._untracked:
                            v.over_budget += 1
                        else:
                            v.unknown += 1

    def evaluate(self, now: float) -> None:
        """Drop what fell out of the time window, compute every window's drift and publish it.
        Side-path thread only."""
        outcomes = self._outcomes(now - self.cfg.window_seconds)
        self._evaluated_at = now
        snapshot = self._publish(outcomes)
        with self._lock:
            self._snapshot = snapshot

    def _outcomes(self, cutoff: float | None) -> dict[str, list[_Outcome]]:
        """Every windowed variant's outcomes, its windows expired to ``cutoff`` first (None: as they are)."""
        out: dict[str, list[_Outcome]] = {}
        for name, v in self._variants.items():
            if not v.windowed:
                continue
            results = []
            for col in v.columns:
                if cutoff is not None:
                    col.expire(cutoff)
                results.append(_evaluate(col, self.cfg))
            out[name] = results
        return out

    # -- what other threads read ----------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """The /drift JSON (a copy: any thread)."""
        with self._lock:
            snapshot, reference = self._snapshot, self._reference
        out = copy.deepcopy(snapshot.report)
        out["reference"] = dict(reference)
        return out

    def summary(self) -> dict[str, VariantDrift]:
        """Each windowed variant's drift at the last evaluation (any thread); empty while the
        reference is collected."""
        with self._lock:
            return dict(self._snapshot.summary)

    def collector(self) -> Collector:
        return DriftCollector(self)

    def families(self) -> tuple[Metric, ...]:
        with self._lock:
            return self._snapshot.families

    def _publish(self, outcomes: dict[str, list[_Outcome]]) -> _Snapshot:
        return _Snapshot(self._report(outcomes), self._families(outcomes), self._summary(outcomes))

    def _summary(self, outcomes: dict[str, list[_Outcome]]) -> dict[str, VariantDrift]:
        out: dict[str, VariantDrift] = {}
        for name, results in outcomes.items():
            reports = [o.report for o in results]
            evaluated = [r for r in reports if r["status"] == "evaluated"]
            out[name] = VariantDrift(
                variant=name,
                evaluated=tuple(r["name"] for r in evaluated),
                evaluated_features=tuple(r["name"] for r in evaluated if r["kind"] == "feature"),
                evaluated_predictions=tuple(r["name"] for r in evaluated if r["kind"] == "prediction"),
                drifted_features=tuple(r["name"] for r in reports if r["drifted"] and r["kind"] == "feature"),
                drifted_predictions=tuple(r["name"] for r in reports if r["drifted"] and r["kind"] == "prediction"),
                insufficient=tuple(r["name"] for r in reports if r["status"] == "insufficient data"),
                rows=max((o.rows for o in results), default=0),
                evaluated_at=self._evaluated_at,
            )
        return out

    def _report(self, outcomes: dict[str, list[_Outcome]]) -> dict[str, Any]:
        cfg = self.cfg
        variants: dict[str, dict[str, Any]] = {}
        for name, v in self._variants.items():
            columns = [o.report for o in outcomes.get(name, ())]
            variants[name] = {
                "drifted": [c["name"] for c in columns if c["drifted"]],
                "insufficient": [c["name"] for c in columns if c["status"] == "insufficient data"],
                "rows": max((c["window_rows"] for c in columns), default=0),
                "window_rows": {c["name"]: c["window_rows"] for c in columns},
                "other": v.other(),
                "omitted_columns": list(v.omitted),
                "columns": columns,
            }
        top = variants.get(self._primary)
        if top is None:
            top = {"drifted": [], "insufficient": [], "other": _Variant(self._primary).other(),
                   "omitted_columns": [], "columns": []}  # fmt: skip
        else:
            # its columns are the top level's, not repeated: /drift of a wide profile is large enough
            top = dict(top)
            del variants[self._primary]["columns"]
        return {
            "reference": {},
            "variant": self._primary,
            "window": {
                "size": cfg.window_size,
                "seconds": cfg.window_seconds,
                "min_samples": cfg.min_samples,
                "interval": cfg.interval,
            },
            "evaluated_at": None if self._evaluated_at is None else _rfc3339(self._evaluated_at),
            "drifted": top["drifted"],
            "insufficient": top["insufficient"],
            "series": {
                "budget": cfg.max_series,
                "exported": self._series_used,
                "omitted": self._series_omitted,
                "omitted_columns": top["omitted_columns"],
            },
            "untracked_columns": sorted(self._untracked),
            "other": {**top["other"], "rows_dropped": dict(self._dropped)},
            "config_problems": list(self._config_problems),
            "columns": top["columns"],
            "variants": variants,
        }

    def _families(self, outcomes: dict[str, list[_Outcome]]) -> tuple[Metric, ...]:
        drift = GaugeMetricFamily(
            "infermon_feature_drift",
            "Drift statistic of a feature or prediction column, a variant's live window against the "
            "reference (method: psi, jensenshannon, wasserstein, ks, chisquare, z: p-values for the tests; "
            "ks_statistic, chisquare_statistic, z_statistic: their statistics).",
            labels=("variant", "feature", "method"),
        )
        drifted = GaugeMetricFamily(
            "infermon_feature_drifted",
            "1 when the column's deciding method flags drift in the variant's window, 0 when not; absent "
            "while the window holds fewer than drift.min_samples values.",
            labels=("variant", "feature"),
        )
        rows = GaugeMetricFamily(
            "infermon_drift_window_rows",
            "Values of the column in the variant's live window.",
            labels=("variant", "feature"),
        )
        quality = CounterMetricFamily(
            "infermon_feature_quality",
            "Live values with a data quality problem (missing, type_mismatch, out_of_range, unseen_category); "
            'feature="other": values of columns not tracked (unknown_feature, over_budget, invalid_name: '
            "a name longer than 128 characters or with control characters).",
            labels=("variant", "feature", "problem"),
        )
        bins = CounterMetricFamily(
            "infermon_feature_bin",
            "Live values of a variant per reference bin, every value ever seen (sum across replicas for a fleet PSI).",
            labels=("variant", "feature", "bin"),
        )
        ratio = GaugeMetricFamily(
            "infermon_feature_reference_ratio",
            "The reference proportion of each bin (one reference for every variant).",
            labels=("feature", "bin"),
        )
        omitted = GaugeMetricFamily(
            "infermon_drift_bin_series_omitted",
            "Bin series (infermon_feature_bin_total, infermon_feature_reference_ratio) left out by drift.max_series.",
            value=float(self._series_omitted),
        )
        dropped = CounterMetricFamily(
            "infermon_drift_rows_dropped",
            "Rows of samples no drift window took, by reason: collecting (another variant's rows while the "
            "reference variant's build the reference), variant_budget (beyond drift.max_variants), "
            "invalid_variant (a variant name that cannot be a label).",
            labels=("reason",),
        )
        for name, v in self._variants.items():
            for col, outcome in zip(v.columns, outcomes.get(name, ()), strict=True):
                feature = col.name
                for method, value in outcome.statistics.items():
                    if method != "chisquare_dof" and math.isfinite(value):
                        drift.add_metric((name, feature, method), value)
                if outcome.drifted is not None:
                    drifted.add_metric((name, feature), 1.0 if outcome.drifted else 0.0)
                rows.add_metric((name, feature), float(outcome.rows))
                for problem, count in col.quality().items():
                    quality.add_metric((name, feature, problem), float(count))
                if col.exported:
                    for label, count in zip(col.spec.bin_labels, col.bin_total, strict=True):
                        bins.add_metric((name, feature, label), float(count))
            for problem, count in v.other().items():
                quality.add_metric((name, OTHER_FEATURE, problem), float(count))
        for spec, exported in zip(self._specs, self._ratio_exported, strict=True):
            if exported:
                for label, share in zip(spec.bin_labels, spec.proportions, strict=True):
                    if math.isfinite(share):
                        ratio.add_metric((spec.name, label), share)
        for reason, n in self._dropped.items():
            dropped.add_metric((reason,), float(n))
        return (drift, drifted, rows, quality, bins, ratio, omitted, dropped)


class DriftCollector(Collector):
    """The drift engine's metrics, from its last published snapshot."""

    def __init__(self, engine: DriftEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        yield from self.engine.families()
