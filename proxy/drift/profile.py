"""Reference profiles: what the training data looked like, per feature, in a versioned JSON file.

A profile is built once, offline (``infermon baseline build``), and read by the drift engine at
start. Per numeric feature it keeps quantile bin edges with the reference count per bin, mean, std,
min, max and a seeded sample of raw values (for the tests that need them: KS, Wasserstein); per
categorical feature the top-K values with their counts plus one :data:`OTHER_BIN` for the rest.

Values: ``None``, ``""`` and NaN are *missing*. Numbers are ``int`` or ``float`` (not ``bool``),
compared as float64. ``+inf``, ``-inf``, integers outside the float range and non-scalar values
(lists, objects) are *type mismatches* in every column: they are neither counted nor missing, so a
feature's mismatches are ``rows - count - missing``. A column is numeric when every non-missing,
non-mismatched value is a number, categorical otherwise (or when forced). In a categorical column
numbers and booleans become strings: ``True`` -> ``"true"``, ``1`` and ``1.0`` -> ``"1"``,
``1.5`` -> ``"1.5"`` (:func:`category_of`).

The file (``"format": "infermon-profile"``, ``"version": 1``) never holds NaN or infinity; a newer
version than :data:`VERSION` is refused with a message saying so, and every load error names the
file, the feature and the key.
"""

from __future__ import annotations

import math
import numbers
import random
import sys
from array import array
from bisect import bisect_left
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
import orjson

FORMAT = "infermon-profile"
VERSION = 1
#: the bin of every categorical value outside the profile's top K (and of the value "__other__" itself)
OTHER_BIN = "__other__"
#: distinct values are counted exactly up to this; ``DISTINCT_CAP + 1`` means "more"
DISTINCT_CAP = 10_000

Kind = Literal["numeric", "categorical"]

_FIX = "rebuild it with: infermon baseline build DATA --out profile.json"
_INF = math.inf
#: floats up to this magnitude are exact integers: 2.0 -> "2"; larger ones keep repr(): "1e+16"
_EXACT_INT = float(2**53)
#: above this magnitude mean, std and quantiles are computed on values scaled by a power of two
_SCALE_ABOVE = 1e150
_ABSENT = object()
_BELOW_ONE = 1.0 - 2.0**-53


class ProfileError(Exception):
    """A profile cannot be read or built. ``str(exc)`` names the file (and key or line) and the fix."""


def is_missing(value: Any) -> bool:
    """``None``, ``""`` and NaN are missing values."""
    t = type(value)
    return value is None or (t is str and not value) or (t is float and value != value)


def number_of(value: Any) -> float | None:
    """The value as a finite float, or None: not a number (bool, str, ...), NaN, infinite, too large."""
    t = type(value)
    if t is float:
        return value if -_INF < value < _INF else None
    if t is int:
        try:
            return float(value)  # finite whenever it does not overflow
        except OverflowError:
            return None
    if t is bool or not isinstance(value, numbers.Real):
        return None
    try:
        f = float(value)
    except (OverflowError, ValueError, TypeError):
        return None
    return f if -_INF < f < _INF else None


def _float_category(f: float) -> str:
    if f.is_integer() and -_EXACT_INT <= f <= _EXACT_INT:
        return str(int(f))
    return repr(f)


def category_of(value: Any) -> str | None:
    """The categorical bin label of a value: a string as it is, ``True`` -> ``"true"``, a number in
    its shortest form (``1`` and ``1.0`` -> ``"1"``); None for a missing value or a type mismatch."""
    t = type(value)
    if t is str:
        return value or None
    if t is bool:
        return "true" if value else "false"
    f = number_of(value)
    return None if f is None else _float_category(f)


@dataclass
class FeatureProfile:
    """One feature (or prediction column) of the reference. Treat it as immutable once built."""

    name: str
    kind: Kind
    count: int  # non-missing values of the right type
    missing: int
    distinct: int  # exact up to DISTINCT_CAP; DISTINCT_CAP + 1 means "more"
    mean: float | None = None  # numeric only; None also when count is 0
    std: float | None = None  # population std (ddof=0)
    min: float | None = None
    max: float | None = None
    edges: list[float] = field(default_factory=list)  # numeric: inner edges, strictly increasing
    categories: list[str] = field(default_factory=list)  # categorical: top K, most frequent first
    counts: list[int] = field(default_factory=list)  # reference count per bin
    sample: list[float] | list[str] = field(default_factory=list)  # seeded reservoir sample
    _index: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._index = {c: i for i, c in enumerate(self.categories)}

    def bins(self) -> list[str]:
        """Bin labels: numeric ``"0"`` .. ``"n-1"``; categorical the categories, then OTHER_BIN."""
        if self.kind == "numeric":
            return [str(i) for i in range(len(self.edges) + 1)]
        return [*self.categories, OTHER_BIN]

    def bin_of(self, value: Any) -> int | None:
        """The bin of a live value, as the reference counts were made; None when the value is missing
        or of the wrong type (anything but a finite number for a numeric feature)."""
        if self.kind == "numeric":
            if type(value) is float:
                if -_INF < value < _INF:
                    return bisect_left(self.edges, value)
                return None
            f = number_of(value)
            return None if f is None else bisect_left(self.edges, f)
        label = category_of(value)
        if label is None:
            return None
        return self._index.get(label, len(self.categories))

    def proportions(self) -> list[float]:
        """The reference share of each bin (all zeros when the feature had no values)."""
        total = sum(self.counts)
        if total <= 0:
            return [0.0] * len(self.counts)
        return [c / total for c in self.counts]

    @property
    def binary(self) -> bool:
        return self.distinct == 2

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "count": self.count,
            "missing": self.missing,
            "distinct": self.distinct,
            "mean": self.mean,
            "std": self.std,
            "min": self.min,
            "max": self.max,
            "edges": self.edges,
            "categories": self.categories,
            "counts": self.counts,
            "sample": self.sample,
        }


@dataclass
class Profile:
    """A reference: its features in column order, its prediction columns, where it came from."""

    features: list[FeatureProfile]
    predictions: list[FeatureProfile] = field(default_factory=list)
    rows: int = 0
    source: str = ""  # the data it was built from, as given to build_profile
    created: str = ""  # RFC 3339, UTC

    def columns(self) -> list[str]:
        """Feature names, in column order (rows of bare numbers are read in this order)."""
        return [f.name for f in self.features]

    def get(self, name: str) -> FeatureProfile | None:
        """A feature or a prediction column by name."""
        for f in self.features:
            if f.name == name:
                return f
        for f in self.predictions:
            if f.name == name:
                return f
        return None

    def to_json(self) -> bytes:
        """The file's bytes: one key per line at the top, one line per feature."""
        for f in (*self.features, *self.predictions):
            _check_finite(f)
        head = {
            "format": FORMAT,
            "version": VERSION,
            "created": self.created,
            "source": self.source,
            "rows": self.rows,
        }
        out = [b"{"]
        for key, value in head.items():
            out.append(b"  " + orjson.dumps(key) + b": " + orjson.dumps(value) + b",")
        for key, group in (("features", self.features), ("predictions", self.predictions)):
            items = [b"    " + orjson.dumps(f.to_dict()) for f in group]
            body = b"[\n" + b",\n".join(items) + b"\n  ]" if items else b"[]"
            out.append(b"  " + orjson.dumps(key) + b": " + body + (b"," if key == "features" else b""))
        out.append(b"}\n")
        return b"\n".join(out)

    @classmethod
    def from_json(cls, data: bytes, source: str) -> Profile:
        """Parse and check a profile; ``source`` (the file name) goes into every error message."""
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise ProfileError(f"{source}: not valid JSON: {exc} ({_FIX})") from None
        return _Reader(source).profile(doc)


def load_profile(path: str) -> Profile:
    """Read a profile file; raises :class:`ProfileError` naming the file and what is wrong."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ProfileError(f"cannot read profile {path}: {exc.strerror or exc} ({_FIX})") from None
    return Profile.from_json(data, path)


# -- reading -------------------------------------------------------------------------------------


def _check_finite(f: FeatureProfile) -> None:
    for key in ("mean", "std", "min", "max"):
        v = getattr(f, key)
        if v is not None and not math.isfinite(v):
            raise ValueError(f"feature {f.name!r}: {key} is {v} (a profile never holds NaN or infinity)")
    if f.kind == "numeric":
        for key in ("edges", "sample"):
            if not all(math.isfinite(v) for v in getattr(f, key)):
                raise ValueError(f"feature {f.name!r}: {key} holds NaN or infinity")


def _is_int(v: Any) -> bool:
    return type(v) is int


def _is_number(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, what: str, fix: str = _FIX) -> ProfileError:
        return ProfileError(f"{self.source}: {where}{what} ({fix})")

    def profile(self, doc: Any) -> Profile:
        if not isinstance(doc, dict):
            raise self.fail("", f"not an infermon profile (a JSON {type(doc).__name__}, not an object)")
        fmt = doc.get("format")
        if fmt != FORMAT:
            raise self.fail("", f"not an infermon profile (format is {fmt!r}, not {FORMAT!r})")
        version = doc.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise self.fail("", f"version must be a whole number from 1, not {version!r}")
        if version > VERSION:
            raise self.fail(
                "",
                f"profile version {version} is newer than this infermon reads (version {VERSION})",
                "upgrade infermon, or rebuild the profile with this one: " + _FIX.removeprefix("rebuild it with: "),
            )
        for key in ("rows", "features"):
            if key not in doc:
                raise self.fail("", f"key {key!r} is missing")
        rows = doc["rows"]
        if not _is_int(rows) or rows < 0:
            raise self.fail("", f"rows must be a whole number >= 0, not {rows!r}")
        created = doc.get("created", "")
        source = doc.get("source", "")
        for key, value in (("created", created), ("source", source)):
            if not isinstance(value, str):
                raise self.fail("", f"{key} must be a string, not {value!r}")
        groups: dict[str, list[FeatureProfile]] = {}
        seen: set[str] = set()
        for key in ("features", "predictions"):
            items = doc.get(key, [])
            if not isinstance(items, list):
                raise self.fail("", f"{key} must be a list, not {type(items).__name__}")
            groups[key] = []
            for i, item in enumerate(items):
                f = self.feature(f"{key}[{i}]", item, rows)
                if f.name in seen:
                    raise self.fail(f"{key}[{i}]: ", f"name {f.name!r} appears twice")
                seen.add(f.name)
                groups[key].append(f)
        return Profile(groups["features"], groups["predictions"], rows, source, created)

    def feature(self, where: str, item: Any, rows: int) -> FeatureProfile:
        if not isinstance(item, dict):
            raise self.fail(f"{where}: ", f"must be an object, not {type(item).__name__}")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise self.fail(f"{where}: ", f"name must be a non-empty string, not {name!r}")
        where = f"{where} ({name!r})."
        for key in ("kind", "count", "missing", "distinct", "counts"):
            if key not in item:
                raise self.fail(where, f"{key}: key is missing")
        kind = item["kind"]
        if kind not in ("numeric", "categorical"):
            raise self.fail(where, f"kind: must be 'numeric' or 'categorical', not {kind!r}")
        for key in ("count", "missing", "distinct"):
            v = item[key]
            if not _is_int(v) or v < 0:
                raise self.fail(where, f"{key}: must be a whole number >= 0, not {v!r}")
        if item["count"] + item["missing"] > rows:
            raise self.fail(where, f"count + missing is {item['count'] + item['missing']}, more than rows ({rows})")
        stats: dict[str, float | None] = {}
        for key in ("mean", "std", "min", "max"):
            v = item.get(key)
            if v is not None and (kind == "categorical" or not _is_number(v)):
                want = "null" if kind == "categorical" else "a finite number or null"
                raise self.fail(where, f"{key}: must be {want}, not {v!r}")
            stats[key] = None if v is None else float(v)
        edges: list[float] = []
        categories: list[str] = []
        sample_raw = item.get("sample", [])
        if not isinstance(sample_raw, list):
            raise self.fail(where, f"sample: must be a list, not {type(sample_raw).__name__}")
        sample: list[float] | list[str]
        if kind == "numeric":
            if "edges" not in item:
                raise self.fail(where, "edges: key is missing")
            raw = item["edges"]
            if not isinstance(raw, list) or not all(_is_number(v) for v in raw):
                raise self.fail(where, "edges: must be a list of finite numbers")
            edges = [float(v) for v in raw]
            for i in range(1, len(edges)):
                if not edges[i - 1] < edges[i]:
                    raise self.fail(where, f"edges: not strictly increasing at index {i} ({edges[i]!r} after "
                                    f"{edges[i - 1]!r})")  # fmt: skip
            if not all(_is_number(v) for v in sample_raw):
                raise self.fail(where, "sample: must be a list of finite numbers for a numeric feature")
            sample = [float(v) for v in sample_raw]
            nbins = len(edges) + 1
        else:
            if "categories" not in item:
                raise self.fail(where, "categories: key is missing")
            raw = item["categories"]
            if not isinstance(raw, list) or not all(isinstance(v, str) and v for v in raw):
                raise self.fail(where, "categories: must be a list of non-empty strings")
            if len(set(raw)) != len(raw):
                raise self.fail(where, "categories: a value appears twice")
            if OTHER_BIN in raw:
                raise self.fail(where, f"categories: {OTHER_BIN!r} is the name of the bin of other values")
            categories = list(raw)
            if not all(isinstance(v, str) for v in sample_raw):
                raise self.fail(where, "sample: must be a list of strings for a categorical feature")
            sample = list(sample_raw)
            nbins = len(categories) + 1
        counts = item["counts"]
        if not isinstance(counts, list) or not all(_is_int(v) and v >= 0 for v in counts):
            raise self.fail(where, "counts: must be a list of whole numbers >= 0")
        if len(counts) != nbins:
            what = f"{len(edges)} edges" if kind == "numeric" else f"{len(categories)} categories"
            raise self.fail(where, f"counts: {len(counts)} counts for {nbins} bins ({what} make {nbins} bins)")
        if sum(counts) != item["count"]:
            raise self.fail(where, f"counts: they add up to {sum(counts)}, not to count ({item['count']})")
        return FeatureProfile(
            name=name,
            kind=kind,
            count=item["count"],
            missing=item["missing"],
            distinct=item["distinct"],
            mean=stats["mean"],
            std=stats["std"],
            min=stats["min"],
            max=stats["max"],
            edges=edges,
            categories=categories,
            counts=list(counts),
            sample=sample,
        )


# -- building ------------------------------------------------------------------------------------


class _Column:
    """One column while the rows stream by: numbers in a float64 array while it is numeric, a
    counter of labels once it is categorical, a reservoir of raw values either way."""

    __slots__ = (
        "counter", "mismatched", "name", "next", "reservoir", "rng", "seen", "size", "valid", "values", "w",
    )  # fmt: skip

    def __init__(self, name: str, categorical: bool, size: int, seed: int) -> None:
        self.name = name
        self.values: array[float] | None = None if categorical else array("d")
        self.counter: Counter[str] | None = Counter() if categorical else None
        self.valid = 0
        self.mismatched = 0
        self.seen = False  # the column's key was in some row
        self.size = size
        self.reservoir: list[Any] = []
        self.rng = random.Random(seed)
        self.next = 0 if size > 0 else sys.maxsize  # the index of the next value the reservoir takes
        self.w = 0.0

    def add(self, value: Any) -> None:
        t = type(value)
        if t is float:
            if value != value:
                return  # NaN: missing
            if value == _INF or value == -_INF:
                self.mismatched += 1
                return
        elif t is int:
            try:
                value = float(value)
            except OverflowError:
                self.mismatched += 1
                return
        elif t is str:
            if value:
                self._label(value)
            return
        elif value is None:
            return
        elif t is bool:
            self._label("true" if value else "false")
            return
        else:
            value = number_of(value)
            if value is None:
                self.mismatched += 1
                return
        # a finite float
        values = self.values
        if values is not None:
            values.append(value)
        else:
            self.counter[_float_category(value)] += 1  # type: ignore[index]
        n = self.valid
        self.valid = n + 1
        if n >= self.next:
            self._sample(n, value)

    def _label(self, label: str) -> None:
        if self.counter is None:  # the first non-number: the column is categorical from now on
            assert self.values is not None
            self.counter = Counter(_float_category(f) for f in self.values)
            self.values = None
        self.counter[label] += 1
        n = self.valid
        self.valid = n + 1
        if n >= self.next:
            self._sample(n, label)

    def _sample(self, n: int, value: Any) -> None:
        """Value number ``n`` goes into the reservoir: Li's algorithm L, which draws how many values to
        skip instead of a random number per value."""
        k = self.size
        if n < k:
            self.reservoir.append(value)
            if n + 1 < k:
                self.next = n + 1
                return
            self.w = 1.0
        else:
            self.reservoir[int(self.rng.random() * k)] = value
        rng = self.rng
        self.w = min(self.w * math.exp(math.log(1.0 - rng.random()) / k), _BELOW_ONE)
        self.next = n + 1 + int(math.log(1.0 - rng.random()) / math.log1p(-self.w))

    def profile(self, rows: int, bins: int, top_k: int) -> FeatureProfile:
        missing = rows - self.valid - self.mismatched
        if self.values is not None:
            return _numeric(self.name, np.frombuffer(self.values, dtype=np.float64), missing, bins,
                            [float(v) for v in self.reservoir])  # fmt: skip
        assert self.counter is not None
        ranked = sorted(self.counter.items(), key=lambda kv: (-kv[1], kv[0]))
        top = [kv for kv in ranked if kv[0] != OTHER_BIN][:top_k]
        counts = [c for _, c in top]
        return FeatureProfile(
            name=self.name,
            kind="categorical",
            count=self.valid,
            missing=missing,
            distinct=min(len(self.counter), DISTINCT_CAP + 1),
            categories=[k for k, _ in top],
            counts=[*counts, self.valid - sum(counts)],
            sample=[v if isinstance(v, str) else _float_category(v) for v in self.reservoir],
        )


def _numeric(name: str, arr: np.ndarray[Any, np.dtype[np.float64]], missing: int, bins: int,
             sample: list[float]) -> FeatureProfile:  # fmt: skip
    if arr.size == 0:
        return FeatureProfile(name=name, kind="numeric", count=0, missing=missing, distinct=0, counts=[0])
    lo, hi = float(arr.min()), float(arr.max())
    uniq = np.unique(arr)
    # very large magnitudes: sums, squares and interpolation would overflow; a power of two scales exactly
    big = max(abs(lo), abs(hi))
    scale = 2.0 ** (math.frexp(big)[1] - 1) if big > _SCALE_ABOVE else 1.0
    x = arr / scale if scale != 1.0 else arr
    mean = float(x.mean()) * scale
    std = float(x.std()) * scale
    if uniq.size <= bins:
        edges = [float(v) for v in uniq[:-1]]
    else:
        qs = np.quantile(x, [k / bins for k in range(1, bins)]) * scale
        edges = [float(v) for v in np.unique(np.clip(qs, lo, hi))]
    counts = np.bincount(np.searchsorted(np.asarray(edges, dtype=np.float64), arr, side="left"),
                         minlength=len(edges) + 1)  # fmt: skip
    return FeatureProfile(
        name=name,
        kind="numeric",
        count=int(arr.size),
        missing=missing,
        distinct=min(int(uniq.size), DISTINCT_CAP + 1),
        mean=min(max(mean, lo), hi),  # rounding never puts the mean outside the data
        std=std,
        min=lo,
        max=hi,
        edges=edges,
        counts=[int(c) for c in counts],
        sample=sample,
    )


def build_profile(
    rows: Iterable[Mapping[str, Any]],
    *,
    columns: Sequence[str] | None = None,
    categorical: Collection[str] = (),
    predictions: Collection[str] = (),
    bins: int = 10,
    top_k: int = 20,
    sample_size: int = 1000,
    seed: int = 0,
    source: str = "",
) -> Profile:
    """Profile rows in one pass over them.

    Rows stream by and are not kept. Memory per column: a numeric column keeps its values in a
    float64 array (8 bytes a value: what exact quantile edges need, fine at training data sizes), a
    categorical one a counter of its distinct values; and each its reservoir sample.

    ``columns`` selects and orders the features (default: every column, in order of first
    appearance); ``predictions`` are the prediction columns, profiled the same way but kept apart;
    ``categorical`` forces those columns categorical. Numeric edges are ``numpy.quantile`` at
    ``k / bins`` for ``k = 1 .. bins - 1`` with coinciding edges collapsed; a column with at most
    ``bins`` distinct values gets one bin per value. Categorical: the ``top_k`` most frequent values
    (ties by value), then :data:`OTHER_BIN`. The sample is a reservoir seeded with ``seed`` per
    column, so the same rows in the same order give the same profile.
    """
    if bins < 1:
        raise ValueError(f"bins must be at least 1, not {bins}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, not {top_k}")
    if sample_size < 0:
        raise ValueError(f"sample_size must be >= 0, not {sample_size}")
    where = source or "the data"
    wanted = list(columns) if columns is not None else None
    pred_order = sorted(predictions) if isinstance(predictions, (set, frozenset)) else list(dict.fromkeys(predictions))
    preds = set(pred_order)
    forced = set(categorical)
    if wanted is not None:
        if len(set(wanted)) != len(wanted):
            dup = next(c for c in wanted if wanted.count(c) > 1)
            raise ProfileError(f"{where}: column {dup!r} is selected twice")
        both = [c for c in wanted if c in preds]
        if both:
            raise ProfileError(f"{where}: column {both[0]!r} is both a feature and a prediction column")
        stray = sorted(forced - set(wanted) - preds)
        if stray:
            raise ProfileError(f"{where}: categorical column {stray[0]!r} is not one of the selected columns")
    state: dict[str, _Column] = {}

    def column(name: str) -> _Column:
        col = state[name] = _Column(name, name in forced, sample_size, seed)
        return col

    n = 0
    first: list[str] = []  # the first row's columns, for messages
    if wanted is not None:
        tracked = [column(c) for c in [*wanted, *pred_order]]
        pairs = [(c.name, c) for c in tracked]
        for row in rows:
            if n == 0:
                first = list(row)
            n += 1
            get = row.get
            for name, col in pairs:
                value = get(name, _ABSENT)
                if value is not _ABSENT:
                    col.seen = True
                    col.add(value)
    else:
        for row in rows:
            n += 1
            for name, value in row.items():
                found = state.get(name)
                if found is None:
                    found = column(name)
                    found.seen = True
                found.add(value)
    if n == 0:
        raise ProfileError(f"{where}: no rows to profile")
    order = list(state) if wanted is None else wanted
    present = first if wanted is not None else list(state)
    for kind, names in (("selected", order), ("categorical", forced), ("prediction", pred_order)):
        for name in sorted(names) if isinstance(names, set) else names:
            known = state.get(name)
            if known is None or not known.seen:
                raise ProfileError(
                    f"{where}: {kind} column {name!r} is in no row (the rows have: {', '.join(present)})"
                )
    features = [state[c].profile(n, bins, top_k) for c in order if c not in preds]
    prediction_profiles = [state[c].profile(n, bins, top_k) for c in pred_order]
    created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return Profile(features, prediction_profiles, n, source, created)
