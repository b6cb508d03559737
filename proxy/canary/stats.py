"""Canary statistics: the Mann-Whitney U test, the Hodges-Lehmann shift and the two-proportion z-test.

Each gives the figure SciPy (``scipy.stats.mannwhitneyu``) or statsmodels (``proportions_ztest``) gives on
the same data, computed with numpy and the standard library only, so the analysis needs neither at run
time. Jensen-Shannon and the pooled z statistic come from :mod:`proxy.drift.stats`. Value inputs drop
NaN and infinities first. Where SciPy would answer NaN (an empty sample), each function documents the
finite value it returns instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from proxy.drift.stats import z_test

Alternative = Literal["two-sided", "greater", "less"]
Values = Sequence[float] | npt.NDArray[Any]
_F64 = npt.NDArray[np.float64]

_SQRT2 = math.sqrt(2.0)

#: SciPy's method="auto": the exact distribution when either sample has at most this many values and
#: there are no ties, the normal approximation otherwise
MWU_EXACT_MAX_N = 8

#: the Hodges-Lehmann shift is the median of all n1*n2 differences taken outright up to this many
#: pairs; beyond, the same median is found by bisection on the value with O((n1 + n2) log n) counts
HL_DIRECT_MAX_PAIRS = 1_000_000

_ALTERNATIVES = ("two-sided", "greater", "less")


def _finite(values: Values) -> _F64:
    arr = np.asarray(values, dtype=np.float64).ravel()
    return arr[np.isfinite(arr)]


def _check_alternative(alternative: str) -> None:
    if alternative not in _ALTERNATIVES:
        raise ValueError(f"alternative must be one of {', '.join(_ALTERNATIVES)}, not {alternative!r}")


def _clip01(p: float) -> float:
    if not p > 0.0:
        return 0.0
    return 1.0 if p > 1.0 else p


def norm_sf(z: float) -> float:
    """P(Z >= z) for a standard normal Z, accurate in the far tail (``erfc``), as ``scipy.stats.norm.sf``."""
    if math.isnan(z):
        return 1.0
    return 0.5 * math.erfc(z / _SQRT2)


# --------------------------------------------------------------------------------------------
# Mann-Whitney U


def _ranks(values: _F64) -> tuple[_F64, _F64]:
    """Average ranks (1-based) of ``values`` and the sizes of its groups of tied values."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    n = ordered.size
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    sizes = np.diff(np.concatenate((starts, [n]))).astype(np.float64)
    # the average rank of a tie group that starts at 0-based position s and holds t values
    average = starts + (sizes + 1.0) / 2.0
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(average, sizes.astype(np.int64))
    return ranks, sizes


def mann_whitney_u(x: Values, y: Values, alternative: Alternative = "two-sided") -> tuple[float, float]:
    """Mann-Whitney U test of ``x`` against ``y``: ``(U of x, p-value)``.

    As ``scipy.stats.mannwhitneyu(x, y, alternative=...)`` with its defaults (``use_continuity=True``,
    ``method="auto"``): U of x is ``R_x - n_x (n_x + 1) / 2`` with average ranks for ties; "greater"
    asks whether x tends to be larger than y. The p-value is exact (the distribution of U counted
    over all rank assignments) when either sample has at most :data:`MWU_EXACT_MAX_N` values and no
    value is tied, otherwise normal with the tie correction and a continuity correction of 1/2.
    (0.0, 1.0) when either sample is empty; p is 1.0 when every value is the same.
    """
    _check_alternative(alternative)
    xa = _finite(x)
    ya = _finite(y)
    n1, n2 = int(xa.size), int(ya.size)
    if n1 == 0 or n2 == 0:
        return 0.0, 1.0
    ranks, ties = _ranks(np.concatenate((xa, ya)))
    u1 = float(ranks[:n1].sum()) - n1 * (n1 + 1) / 2.0
    u2 = n1 * n2 - u1
    if alternative == "greater":
        u = u1
    elif alternative == "less":
        u = u2
    else:
        u = max(u1, u2)
    has_ties = bool(np.any(ties > 1))
    if min(n1, n2) <= MWU_EXACT_MAX_N and not has_ties:
        p = _mwu_exact_sf(round(u), min(n1, n2), max(n1, n2))
    else:
        n = n1 + n2
        tie_term = float(np.sum(ties**3 - ties))
        var = n1 * n2 / 12.0 * ((n + 1) - tie_term / (n * (n - 1)))
        if not var > 0.0:
            return u1, 1.0
        z = (u - n1 * n2 / 2.0 - 0.5) / math.sqrt(var)
        p = norm_sf(z)
    if alternative == "two-sided":
        p *= 2.0
    return u1, _clip01(p)


def _mwu_exact_sf(u: int, m: int, n: int) -> float:
    """P(U >= u) under the null for samples of m <= n values without ties.

    The number of rank assignments giving each U is the coefficient of q^U in the Gaussian binomial
    ``[m + n choose m]_q = prod_{i=1..m} (1 - q^(n+i)) / (1 - q^i)``, built one factor at a time
    (each partial product is itself a polynomial with whole coefficients) in exact integers.
    """
    size = m * n + 1
    if u <= 0:
        return 1.0
    if u >= size:
        return 0.0
    coeffs = np.zeros(size, dtype=object)
    coeffs[0] = 1
    for i in range(1, m + 1):
        # times (1 - q^(n+i)); degrees past m*n are zero in the final product, and the partial
        # product [n+i choose i]_q has degree i*n, so the shift never needs them
        shift = n + i
        if shift < size:
            coeffs[shift:] = coeffs[shift:] - coeffs[: size - shift]
        # divided by (1 - q^i): a running sum along each residue class modulo i
        pad = (-size) % i
        grid = np.concatenate((coeffs, np.zeros(pad, dtype=object))).reshape(-1, i)
        coeffs = np.cumsum(grid, axis=0).ravel()[:size]
    total = math.comb(m + n, m)
    tail = int(np.sum(coeffs[u:]))
    return float(Fraction(tail, total))


# --------------------------------------------------------------------------------------------
# Hodges-Lehmann


def hodges_lehmann(x: Values, y: Values) -> float:
    """Hodges-Lehmann estimate of the shift of ``x`` over ``y``: the median of all ``x_i - y_j``.

    Taken outright (``numpy.median`` of the n1*n2 differences) up to :data:`HL_DIRECT_MAX_PAIRS`
    pairs; beyond, the order statistics it needs are found by bisection on the value, each step
    counting the differences below it with one sorted search (O(n log n)), until few enough remain
    to list. 0.0 when either sample is empty.
    """
    xa = np.sort(_finite(x))
    ya = np.sort(_finite(y))
    if xa.size == 0 or ya.size == 0:
        return 0.0
    pairs = int(xa.size) * int(ya.size)
    if pairs <= HL_DIRECT_MAX_PAIRS:
        return float(np.median(np.subtract.outer(xa, ya)))
    return _hl_by_selection(xa, ya)


def _hl_by_selection(xa: _F64, ya: _F64) -> float:
    pairs = int(xa.size) * int(ya.size)
    half = pairs // 2
    if pairs % 2:
        return _kth_difference(xa, ya, half + 1)
    return (_kth_difference(xa, ya, half) + _kth_difference(xa, ya, half + 1)) / 2.0


def _count_at_most(xa: _F64, ya: _F64, d: float) -> int:
    """How many x_i - y_j <= d, i.e. y_j >= x_i - d (ya sorted)."""
    return int(ya.size * xa.size - np.searchsorted(ya, xa - d, side="left").sum())


def _kth_difference(xa: _F64, ya: _F64, k: int) -> float:
    """The k-th smallest (1-based) of all x_i - y_j, xa and ya sorted."""
    # bounds with a margin, so the rounding of x_i - d in the searches cannot drop an end pair:
    # count(<= lo) = 0 < k <= count(<= hi) = n1*n2
    smallest = float(xa[0] - ya[-1])
    largest = float(xa[-1] - ya[0])
    lo = smallest - (abs(smallest) + 1.0)
    hi = largest + (abs(largest) + 1.0)
    below = 0
    budget = 4 * (xa.size + ya.size)
    for _ in range(2000):
        # the differences in (lo, hi]: x_i - hi <= y_j < x_i - lo
        inside = int((np.searchsorted(ya, xa - lo, side="left") - np.searchsorted(ya, xa - hi, side="left")).sum())
        if inside <= budget:
            break
        mid = lo + (hi - lo) / 2.0
        if not lo < mid < hi:
            break
        count = _count_at_most(xa, ya, mid)
        if count >= k:
            hi = mid
        else:
            lo, below = mid, count
    left = np.searchsorted(ya, xa - hi, side="left")
    right = np.searchsorted(ya, xa - lo, side="left")
    sizes = right - left
    if int(sizes.sum()) == 0:
        return hi
    rows = np.repeat(np.arange(xa.size), sizes)
    offsets = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    cols = np.repeat(left, sizes) + offsets
    candidates = np.sort(xa[rows] - ya[cols])
    index = min(max(k - below - 1, 0), candidates.size - 1)
    return float(candidates[index])


# --------------------------------------------------------------------------------------------
# two proportions


def two_proportion_test(
    errors_a: float, n_a: float, errors_b: float, n_b: float, alternative: Alternative = "two-sided"
) -> tuple[float, float]:
    """Pooled two-proportion z-test of rate a = errors_a / n_a against rate b: ``(z, p-value)``.

    As statsmodels' ``proportions_ztest([errors_a, errors_b], [n_a, n_b], alternative=...)`` (its
    "larger" and "smaller" are "greater" and "less" here): ``z = (p_a - p_b) / sqrt(P (1 - P)
    (1/n_a + 1/n_b))`` with the pooled proportion P; "greater" asks whether rate a is higher.
    (0.0, 1.0) when either side is empty or P is 0 or 1 (both sides all errors or none: nothing
    tells them apart), where statsmodels answers NaN.
    """
    _check_alternative(alternative)
    if not (n_a > 0 and n_b > 0):
        return 0.0, 1.0
    pooled = (errors_a + errors_b) / (n_a + n_b)
    if not 0.0 < pooled < 1.0:
        return 0.0, 1.0
    # z_test gives (p_ref - p_live) and its two-sided p-value: ref is side a here
    z, two_sided = z_test(errors_a, n_a, errors_b, n_b)
    if alternative == "two-sided":
        return z, two_sided
    if alternative == "greater":
        return z, _clip01(norm_sf(z))
    return z, _clip01(norm_sf(-z))
