"""Drift statistics: pure functions over counts and values, never NaN or infinity.

Each function gives the figure SciPy gives on the same data (``scipy.spatial.distance.jensenshannon``,
``scipy.stats.wasserstein_distance``, ``ks_2samp``, ``chi2_contingency``, ``chi2.sf``), computed with
numpy only, so the side path does not need SciPy at run time. Where SciPy would answer NaN or raise
(empty inputs, a constant column, an all-zero row), each function documents the finite value it
returns instead. Value inputs drop NaN and infinities first; count inputs must be finite and >= 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

#: proportions are clamped to at least this before PSI takes logarithms (empty bins); the fleet
#: recording rule clamps the same way, so both give the same figure from the same counts
PSI_EPSILON = 1e-4

#: normed Wasserstein divides by the reference standard deviation, but never by less than this
#: (Evidently's floor for constant reference columns)
WASSERSTEIN_STD_FLOOR = 0.001

#: ks_2samp is exact (lattice path count) when the larger sample has at most this many values,
#: otherwise asymptotic, as SciPy's method="auto"
KS_EXACT_MAX_N = 10_000

Values = Sequence[float] | npt.NDArray[Any]
Counts = Sequence[float] | npt.NDArray[Any]
_F64 = npt.NDArray[np.float64]

_LOG_2PI = math.log(2.0 * math.pi)
_SQRT2 = math.sqrt(2.0)
_FLOAT_MAX = float(np.finfo(np.float64).max)
#: log of the smallest normal double: an exponent below this is a probability of 0
_MIN_LOG = math.log(np.finfo(np.float64).tiny)


def _proportions(values: Sequence[float]) -> list[float]:
    total = float(sum(values))
    if total <= 0:
        return [0.0] * len(values)
    return [v / total for v in values]


def psi(reference: Sequence[float], live: Sequence[float]) -> float:
    """Population stability index: sum over bins of ``(a - e) * ln(a / e)``.

    ``reference`` and ``live`` are counts or proportions over the same bins (each is normalised);
    every proportion is clamped to at least :data:`PSI_EPSILON`.
    """
    if len(reference) != len(live):
        raise ValueError(f"psi: {len(reference)} reference bins but {len(live)} live bins")
    total = 0.0
    for e, a in zip(_proportions(reference), _proportions(live), strict=True):
        e = max(e, PSI_EPSILON)
        a = max(a, PSI_EPSILON)
        total += (a - e) * math.log(a / e)
    return total


# --------------------------------------------------------------------------------------------
# helpers


def _finite(values: Values) -> _F64:
    arr = np.asarray(values, dtype=np.float64).ravel()
    return arr[np.isfinite(arr)]


def _counts(name: str, values: Counts) -> _F64:
    arr = np.asarray(values, dtype=np.float64).ravel()
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{name}: counts must be finite and >= 0")
    return arr


def _clip01(p: float) -> float:
    if not p > 0.0:  # also NaN, which no path below should produce
        return 0.0
    return 1.0 if p > 1.0 else p


# --------------------------------------------------------------------------------------------
# Jensen-Shannon and Wasserstein


def js_distance(p: Counts, q: Counts) -> float:
    """Jensen-Shannon distance (natural log) between two histograms over the same bins.

    The square root of the mean Kullback-Leibler divergence of each from their average, as
    ``scipy.spatial.distance.jensenshannon(p, q)``; both are normalised first. 0.0 when they are
    identical, and when either is empty (all zero: nothing to compare). At most ``sqrt(ln 2)``.
    """
    pa = _counts("js_distance", p)
    qa = _counts("js_distance", q)
    if pa.shape != qa.shape:
        raise ValueError(f"js_distance: {pa.size} bins against {qa.size}")
    ps, qs = float(pa.sum()), float(qa.sum())
    if ps <= 0.0 or qs <= 0.0:
        return 0.0
    pa = pa / ps
    qa = qa / qs
    m = (pa + qa) / 2.0
    left = np.zeros_like(pa)
    right = np.zeros_like(qa)
    lp = pa > 0
    rq = qa > 0
    left[lp] = pa[lp] * np.log(pa[lp] / m[lp])
    right[rq] = qa[rq] * np.log(qa[rq] / m[rq])
    js = float(np.sum(left)) + float(np.sum(right))
    return math.sqrt(max(js / 2.0, 0.0))


def wasserstein(u: Values, v: Values) -> float:
    """First Wasserstein (earth mover's) distance between two 1-D samples, unweighted.

    The area between the two empirical CDFs, as ``scipy.stats.wasserstein_distance(u, v)``.
    0.0 when either sample is empty.
    """
    ua = np.sort(_finite(u))
    va = np.sort(_finite(v))
    if ua.size == 0 or va.size == 0:
        return 0.0
    both = np.concatenate((ua, va))
    both.sort(kind="mergesort")
    deltas = np.diff(both)
    u_cdf = np.searchsorted(ua, both[:-1], side="right") / ua.size
    v_cdf = np.searchsorted(va, both[:-1], side="right") / va.size
    value = float(np.dot(np.abs(u_cdf - v_cdf), deltas))
    return value if math.isfinite(value) else _FLOAT_MAX


def normed_wasserstein(reference: Values, live: Values, reference_std: float) -> float:
    """Wasserstein distance in units of the reference standard deviation (Evidently's normed
    Wasserstein): ``wasserstein(reference, live) / max(reference_std, 0.001)``, capped at the
    largest double where that division overflows."""
    std = reference_std if math.isfinite(reference_std) else 0.0
    value = wasserstein(reference, live) / max(std, WASSERSTEIN_STD_FLOOR)
    return value if math.isfinite(value) else _FLOAT_MAX


# --------------------------------------------------------------------------------------------
# Kolmogorov-Smirnov, two samples


def ks_2samp(a: Values, b: Values) -> tuple[float, float]:
    """Two-sided two-sample Kolmogorov-Smirnov test: ``(statistic, pvalue)``.

    As ``scipy.stats.ks_2samp(a, b)`` (method "auto"): the statistic is the largest distance between
    the two empirical CDFs (ties as SciPy: both CDFs are taken right-continuous); the p-value is
    exact when the larger sample has at most :data:`KS_EXACT_MAX_N` values (the share of lattice
    paths that leave the band ``|x/n1 - y/n2| < D``) and otherwise uses the distribution of the
    one-sample statistic with ``n = round(n1*n2/(n1+n2))``, as SciPy does. In exact mode the
    statistic is rounded to the lattice (a multiple of ``1/lcm(n1, n2)``), as SciPy returns it.
    (0.0, 1.0) when either sample is empty.
    """
    d, n1, n2, h = _ks_statistic(a, b)
    if n1 == 0 or n2 == 0 or h == 0:
        return d, 1.0
    if h > 0:
        p = _ks_square_sf(n1, h) if n1 == n2 else _ks_lattice_sf(n1, n2, math.gcd(n1, n2), h)
        if 0.0 <= p <= 1.0:
            return d, p
    m, n = sorted((float(n1), float(n2)), reverse=True)
    return d, _clip01(kolmogorov_sf(round(m * n / (m + n)), d))


def ks_statistic(a: Values, b: Values) -> float:
    """The statistic :func:`ks_2samp` returns, without the p-value (two sorts and two searches: cheap
    where the exact p-value of two unequal samples of a thousand values costs milliseconds)."""
    return _ks_statistic(a, b)[0]


def _ks_statistic(a: Values, b: Values) -> tuple[float, int, int, int]:
    """(statistic, n1, n2, h): h is the statistic in units of 1/lcm(n1, n2) in exact mode, -1 in
    asymptotic mode."""
    x = np.sort(_finite(a))
    y = np.sort(_finite(b))
    n1, n2 = int(x.size), int(y.size)
    if n1 == 0 or n2 == 0:
        return 0.0, n1, n2, 0
    both = np.concatenate((x, y))
    cdf1 = np.searchsorted(x, both, side="right") / n1
    cdf2 = np.searchsorted(y, both, side="right") / n2
    diff = cdf1 - cdf2
    max_s = float(diff.max())
    min_s = min(max(-float(diff.min()), 0.0), 1.0)
    d = min_s if min_s > max_s else max_s
    if max(n1, n2) > KS_EXACT_MAX_N:
        return d, n1, n2, -1
    lcm = (n1 // math.gcd(n1, n2)) * n2
    h = round(d * lcm)
    return h / lcm, n1, n2, h


def _ks_square_sf(n: int, h: int) -> float:
    """P(D >= h/n) for two samples of n values each (reflection principle).

    ``2 * sum_{k>=1} (-1)^(k+1) T_k`` with ``T_k = C(2n, n-kh) / C(2n, n)``, nested as
    ``2*A_0*(1 - A_1*(1 - A_2*(...)))`` where ``A_k = T_(k+1) / T_k`` is a product of ``h`` factors
    below 1: for a small p-value the first term dominates and the nesting subtracts only small
    numbers from 1, so no precision is lost (the same evaluation as SciPy's).
    """
    kmax = n // h
    ks = np.arange(0, kmax + 1, dtype=np.float64)[:, None] * h
    js = np.arange(h, dtype=np.float64)[None, :]
    ratios = np.prod((n - ks - js) / (n + ks + js + 1.0), axis=1)
    p = 0.0
    for r in ratios[::-1].tolist():
        p = r * (1.0 - p)
    return 2.0 * p


def _stirlerr_exact(v: int) -> float:
    return 0.0 if v == 0 else math.lgamma(v + 1.0) - (v + 0.5) * math.log(v) + v - _LOG_2PI / 2.0


#: ``_stirlerr`` of 0 .. 15, where the series is not yet accurate
_STIRLERR_SMALL = np.array([_stirlerr_exact(v) for v in range(16)])


def _stirlerr(n: _F64) -> _F64:
    """``ln(n!) - ln(sqrt(2 pi n) (n/e)^n)`` for whole numbers n >= 1 (Stirling's series beyond 15)."""
    n2 = 1.0 / (n * n)
    out: _F64 = (1.0 / 12 - n2 * (1.0 / 360 - n2 * (1.0 / 1260 - n2 * (1.0 / 1680 - n2 / 1188)))) / n
    small = n <= 15
    if np.any(small):
        out[small] = _STIRLERR_SMALL[n[small].astype(np.int64)]
    return out


def _bd0(x: _F64, mean: _F64) -> _F64:
    """``x ln(x/mean) + mean - x`` without cancellation when x is close to mean (x, mean > 0)."""
    out = x * np.log(x / mean) + mean - x
    near = np.abs(x - mean) < 0.1 * (x + mean)
    if np.any(near):
        xn, mn = x[near], mean[near]
        v = (xn - mn) / (xn + mn)
        s = (xn - mn) * v
        term = 2.0 * xn * v
        v2 = v * v
        for k in range(1, 12):  # |v| < 0.1: each term is 100 times smaller than the last
            term = term * v2
            s = s + term / (2 * k + 1)
        out[near] = s
    return out


def _log_binom_pmf(k: _F64, n: _F64, p: _F64, q: _F64) -> _F64:
    """``ln(C(n, k) p^k q^(n-k))`` with q = 1 - p given separately (so it can be exact), by Loader's
    saddle-point form: accurate to a few ulps where differences of lgamma would lose digits."""
    out = np.empty_like(k)
    zero, full = k == 0, k == n
    out[zero] = n[zero] * np.log(q[zero])
    only_full = full & ~zero
    out[only_full] = n[only_full] * np.log(p[only_full])
    mid = ~(zero | full)
    if np.any(mid):
        km, nm, pm, qm = k[mid], n[mid], p[mid], q[mid]
        rest = nm - km
        out[mid] = (
            _stirlerr(nm)
            - _stirlerr(km)
            - _stirlerr(rest)
            - _bd0(km, nm * pm)
            - _bd0(rest, nm * qm)
            - 0.5 * (_LOG_2PI + np.log(km) + np.log(rest / nm))
        )
    return out


def _log_walk_weight(i: npt.NDArray[np.int64], j: npt.NDArray[np.int64], alpha: float, beta: float) -> _F64:
    """``ln(C(i+j, i) alpha^i beta^j)``: the probability that a random walk stepping along i with
    probability alpha passes through (i, j)."""
    fi = i.astype(np.float64)
    n = fi + j.astype(np.float64)
    return _log_binom_pmf(fi, n, np.full_like(fi, alpha), np.full_like(fi, beta))


def _ks_exit_bound_log(
    a: int, b: int, lo: npt.NDArray[np.int64], hi: npt.NDArray[np.int64], alpha: float, beta: float
) -> float:
    """ln of an upper bound of the share of paths that leave the band: every such path has a
    first cell outside it, either just above the band, (i, hi_i + 1), or left of it after a step
    along i, (i, j) with lo_(i-1) <= j < lo_i; the bound sums the share of paths through each."""
    rows = np.arange(a + 1, dtype=np.int64)
    up = hi < b
    cells_i = [rows[up]]
    cells_j = [hi[up] + 1]
    gap = lo[1:] - lo[:-1]
    if int(gap.sum()):
        starts = np.concatenate(([0], np.cumsum(gap)))
        cells_i.append(np.repeat(rows[1:], gap))
        within = np.arange(int(starts[-1]), dtype=np.int64) - np.repeat(starts[:-1], gap)
        cells_j.append(within + np.repeat(lo[:-1], gap))
    ci = np.concatenate(cells_i)
    cj = np.concatenate(cells_j)
    if ci.size == 0:
        return -math.inf
    through = _log_walk_weight(ci, cj, alpha, beta) + _log_walk_weight(a - ci, b - cj, alpha, beta)
    through -= float(_log_walk_weight(np.array([a]), np.array([b]), alpha, beta)[0])
    top = float(through.max())
    return top + math.log(float(np.sum(np.exp(through - top))))


def _ks_lattice_sf(n1: int, n2: int, g: int, h: int) -> float:
    """P(D >= h/lcm) for samples of n1 != n2 values: the share of lattice paths from (0, 0) to
    (a, b) that leave the band ``|i*(b/g) - j*(a/g)| < h`` (the same recursion as SciPy's, which
    propagates the probability of having left rather than of staying inside).

    Each path is weighted as a random walk that steps along i with probability alpha = a/(a+b)
    and along j with beta = b/(a+b); W(i, j), the weight of the walks that reach (i, j) having
    left the band, is a sum of positive terms no larger than 1, ``W(i,j) = alpha*W(i-1,j) +
    beta*W(i,j-1)``, and outside the band it is the walk's whole weight. Along a row that is a
    first-order recurrence with the constant factor beta, solved with a scaled cumulative sum in
    blocks short enough that ``beta**-k`` cannot overflow. p = W(a, b) / weight(a, b).
    """
    a, b = (n1, n2) if n1 <= n2 else (n2, n1)  # rows over the smaller sample: fewer numpy calls
    ag, bg = a // g, b // g
    alpha, beta = a / (a + b), b / (a + b)
    rows = np.arange(a + 1, dtype=np.int64)
    lo = np.maximum((rows * bg - h) // ag + 1, 0)
    hi = np.minimum(-((-(rows * bg + h)) // ag) - 1, b)
    if np.any(lo > hi):
        return 1.0  # a row with no cell inside the band: every path leaves it
    if _ks_exit_bound_log(a, b, lo, hi, alpha, beta) < _MIN_LOG:
        return 0.0  # below the smallest normal double: not worth the full count
    # weights of the outside cells the recursion reads: above the band in the previous row ...
    step = hi[1:] - hi[:-1]
    offsets = np.concatenate(([0], np.cumsum(step)))
    up_i = np.repeat(rows[:-1], step)
    up_j = np.arange(int(offsets[-1]), dtype=np.int64) - np.repeat(offsets[:-1], step) + np.repeat(hi[:-1] + 1, step)
    upper = np.exp(_log_walk_weight(up_i, up_j, alpha, beta)) if up_i.size else np.zeros(0)
    # ... and left of the band in the same row
    left = np.zeros(a + 1)
    has_left = lo > 0
    if np.any(has_left):
        left[has_left] = np.exp(_log_walk_weight(rows[has_left], lo[has_left] - 1, alpha, beta))

    width = int((hi - lo).max()) + 1
    block = max(1, min(int(600.0 / -math.log(beta)), width))
    powers = beta ** np.arange(block + 1, dtype=np.float64)
    scaled = alpha * beta ** -np.arange(block, dtype=np.float64)
    tail = powers[1:]
    size_max = -(-width // block) * block
    prev, work = np.zeros(size_max), np.zeros(size_max)  # row 0 inside the band: nothing has left
    lo_l, hi_l, off_l, left_l = lo.tolist(), hi.tolist(), offsets.tolist(), left.tolist()
    multiply, cumsum = np.multiply, np.add.accumulate
    last = 0
    for r in range(1, a + 1):
        low, high, plow = lo_l[r], hi_l[r], lo_l[r - 1]
        length = high - low + 1
        carried = max(hi_l[r - 1] - low + 1, 0)
        above = off_l[r] - (length - carried)
        if length <= block:  # the common case: one block, four numpy calls
            if carried:
                multiply(prev[low - plow : low - plow + carried], scaled[:carried], out=work[:carried])
            multiply(upper[above : off_l[r]], scaled[carried:length], out=work[carried:length])
            work[0] += beta * left_l[r]
            row = work[:length]
            cumsum(row, out=row)
            multiply(row, powers[:length], out=row)
        else:
            nblocks = -(-length // block)
            if carried:
                work[:carried] = prev[low - plow : low - plow + carried]
            work[carried:length] = upper[above : off_l[r]]
            work[length : nblocks * block] = 0.0
            mat = work[: nblocks * block].reshape(nblocks, block)
            mat *= scaled
            cumsum(mat, axis=1, out=mat)
            mat *= powers[:block]
            carry = left_l[r]
            for k in range(nblocks):
                mat[k] += carry * tail
                carry = float(mat[k, -1])
        prev, work = work, prev
        last = length - 1
    full = float(_log_walk_weight(np.array([a]), np.array([b]), alpha, beta)[0])
    return _clip01(float(prev[last]) / math.exp(full))


# --------------------------------------------------------------------------------------------
# the one-sample Kolmogorov distribution (SciPy's kstwo), for the asymptotic two-sample p-value


def kolmogorov_sf(n: int, x: float) -> float:
    """P(D_n >= x) for the two-sided one-sample Kolmogorov-Smirnov statistic of n values, as
    ``scipy.stats.kstwo.sf(x, n)``: the same choice of method by region (Simard and L'Ecuyer):
    closed forms near the ends, twice the one-sided exact Smirnov sum for large x, the Durbin
    matrix for small x (Marsaglia, Tsang and Wang's form; SciPy uses Pomeranz's recursion for part
    of that region when n <= 140, which is exact too), Pelz-Good's series otherwise."""
    if not math.isfinite(x):
        return 0.0 if x > 0 else 1.0
    if x >= 1.0:
        return 0.0
    if x <= 0.0:
        return 1.0
    t = n * x
    if t <= 1.0:
        if t <= 0.5:
            return 1.0
        if n <= 140:
            inside = float(np.prod(np.arange(1, n + 1) * (1.0 / n) * (2 * t - 1)))
        else:
            inside = math.exp(_log_nfactorial_div_n_pow_n(n) + n * math.log(2 * t - 1))
        return _clip01(1.0 - inside)
    if t >= n - 1:
        return _clip01(2.0 * (1.0 - x) ** n)
    if x >= 0.5:
        return _clip01(2.0 * _smirnov_sf(n, x))
    nxx = t * x
    if n <= 140:
        if nxx <= 4.0:
            return _clip01(1.0 - _kolmogorov_cdf_durbin(n, x))
        return _clip01(2.0 * _smirnov_sf(n, x))
    if nxx >= 370.0:
        return 0.0
    if nxx >= 2.2:
        return _clip01(2.0 * _smirnov_sf(n, x))
    if n <= 100_000 and n * x**1.5 <= 1.4:
        return _clip01(1.0 - _kolmogorov_cdf_durbin(n, x))
    return _clip01(1.0 - _kolmogorov_cdf_pelz_good(n, x))


_STIRLING = (
    -2.955065359477124183e-2,
    6.4102564102564102564e-3,
    -1.9175269175269175269e-3,
    8.4175084175084175084e-4,
    -5.952380952380952381e-4,
    7.9365079365079365079e-4,
    -2.7777777777777777778e-3,
    8.3333333333333333333e-2,
)


def _log_nfactorial_div_n_pow_n(n: int) -> float:
    """``ln(n! / n^n)`` by Stirling's series with ``n ln n`` taken out first."""
    rn = 1.0 / n
    series = 0.0
    for c in _STIRLING:
        series = series * (rn * rn) + c
    return math.log(n) / 2 - n + _LOG_2PI / 2 + rn * series


def _smirnov_sf(n: int, x: float) -> float:
    """One-sided P(D+_n >= x), Birnbaum and Tingey's exact sum of positive terms
    ``x * sum_{v=0}^{floor(n(1-x))} C(n,v) (x + v/n)^(v-1) (1 - x - v/n)^(n-v)``, in log space."""
    if x <= 0.0:
        return 1.0
    if x >= 1.0:
        return 0.0
    if n == 1:
        return 1.0 - x
    if -2.0 * n * x * x < _MIN_LOG:
        return 0.0  # below the smallest double, as SciPy returns it
    if n > 1_000_000:  # SciPy's approximation for very large n
        return math.exp(-((6.0 * n * x + 1) ** 2) / 18.0 / n)
    vmax = math.floor(n * (1.0 - x))
    v = np.arange(vmax + 1, dtype=np.float64)
    upper = 1.0 - x - v / n
    keep = upper > 0
    v, upper = v[keep], upper[keep]
    if v.size == 0:
        return 0.0
    lower = x + v / n
    # C(n,v) lower^(v-1) upper^(n-v) is a binomial probability divided by lower
    terms = _log_binom_pmf(v, np.full_like(v, float(n)), lower, upper) - np.log(lower)
    top = float(terms.max())
    return _clip01(x * math.exp(top) * float(np.sum(np.exp(terms - top))))


def _kolmogorov_cdf_durbin(n: int, d: float) -> float:
    """P(D_n < d) by Durbin's matrix: ``n!/n^n * (H^n)[k-1, k-1]`` with k = ceil(n d), powers taken
    by squaring and rescaled by powers of two so nothing overflows."""
    if d >= 1.0:
        return 1.0
    nd = n * d
    if nd <= 0.5:
        return 0.0
    k = math.ceil(nd)
    h = k - nd
    m = 2 * k - 1
    idx = np.arange(m)
    # H[r, c] = 1/(r - c + 1)! for r >= c - 1, with the first column and last row corrected
    diff = idx[:, None] - idx[None, :] + 1
    inv_fact = np.exp(-np.array([math.lgamma(j + 1.0) for j in range(m + 1)]))
    H = np.where(diff >= 0, inv_fact[np.clip(diff, 0, m)], 0.0)
    powers_h = h ** np.arange(1, m + 1, dtype=np.float64)
    first = (1.0 - powers_h) * inv_fact[1 : m + 1]
    H[:, 0] = first
    H[m - 1, :] = first[::-1]
    H[m - 1, 0] = (1.0 - 2.0 * h**m + max(0.0, 2.0 * h - 1.0) ** m) * inv_fact[m]

    result = np.eye(m)
    res_exp = 0
    base_exp = 0
    e = n
    base = H
    while e > 0:
        if e & 1:
            result = result @ base
            res_exp += base_exp
            res_exp += _rescale(result)
        e >>= 1
        if e:
            base = base @ base
            base_exp *= 2
            base_exp += _rescale(base)
    value = float(result[k - 1, k - 1])
    if value <= 0.0:
        return 0.0
    log_p = math.log(value) + res_exp * math.log(2.0)
    if n <= 140:
        log_p += float(np.sum(np.log(np.arange(1, n + 1) / n)))
    else:
        log_p += _log_nfactorial_div_n_pow_n(n)
    return _clip01(math.exp(min(log_p, 0.0)))


def _rescale(mat: _F64) -> int:
    """Divide ``mat`` in place by a power of two when its largest entry passes 2^128; return the
    exponent taken out."""
    top = float(np.abs(mat).max())
    if top <= 2.0**128:
        return 0
    expo = math.frexp(top)[1]
    mat *= 2.0**-expo
    return expo


def _kolmogorov_cdf_pelz_good(n: int, x: float) -> float:
    """Pelz and Good's approximation of P(D_n <= x): Li-Chien and Korolyuk's expansion
    ``K0 + K1/sqrt(n) + K2/n + K3/n^1.5`` in z = x sqrt(n), each term rewritten with Jacobi's
    theta transformation so the series converge fast for small z."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    z = math.sqrt(n) * x
    z2, z3, z4, z6 = z * z, z**3, z**4, z**6
    pi2 = math.pi**2
    qlog = -pi2 / 8 / z2
    if qlog < -708:
        return 0.0
    kmax = math.ceil(16 * z / math.pi)
    k = np.arange(1, kmax + 1, dtype=np.float64)
    odd = 2 * k - 1
    o2, o4, o6 = odd**2, odd**4, odd**6
    # the sums over odd m = 2k-1 of c(m) q^(m^2), q = exp(-pi^2 / (8 z^2))
    qpow = np.exp(qlog * o2)
    c0 = np.ones_like(odd)
    c1 = -z2 + pi2 / 4 * o2
    c2 = (6 * z6 + 2 * z4) + (2 * z4 - 5 * z2) * pi2 / 4 * o2 + math.pi**4 * (1 - 2 * z2) / 16 * o4
    c3 = (
        (-30 * z6 - 90 * z**8)
        + pi2 * (135 * z4 - 96 * z6) / 4 * o2
        + math.pi**4 * (-60 * z2 + 212 * z4) / 16 * o4
        + math.pi**6 * (5 - 30 * z2) / 64 * o6
    )
    sqrt2pi = math.sqrt(2 * math.pi)
    K0 = float(np.sum(c0 * qpow)) * sqrt2pi / z
    K1 = float(np.sum(c1 * qpow)) * sqrt2pi / (6 * z4)
    K2 = float(np.sum(c2 * qpow)) * sqrt2pi / (72 * z**7)
    K3 = float(np.sum(c3 * qpow)) * sqrt2pi / (6480 * z**10)
    # the sums over all integers k of the second theta series
    q2 = math.exp(-pi2 / 2 / z2)
    k2 = k * k
    qk = q2**k2
    K2 += float(np.sum(k2 * qk)) * pi2 * sqrt2pi / (-36 * z3)
    sqrt3z = math.sqrt(3) * z
    kpi = math.pi * k
    K3 += float(np.sum((sqrt3z + kpi) * (sqrt3z - kpi) * k2 * qk)) * pi2 * sqrt2pi / (216 * z6)
    return K0 + K1 / math.sqrt(n) + K2 / n + K3 / (n * math.sqrt(n))


# --------------------------------------------------------------------------------------------
# chi-squared


def chi2_contingency(ref_counts: Counts, live_counts: Counts) -> tuple[float, float, int]:
    """Pearson's chi-squared test of homogeneity on the 2 x K table (reference row, live row):
    ``(statistic, pvalue, dof)``, as ``scipy.stats.chi2_contingency`` with its defaults (Yates'
    continuity correction when dof is 1). Columns empty in both rows are dropped first (SciPy
    refuses them). (0.0, 1.0, 0) when fewer than two columns remain; (0.0, 1.0, dof) when either
    row is empty (nothing to compare)."""
    ref = _counts("chi2_contingency", ref_counts)
    live = _counts("chi2_contingency", live_counts)
    if ref.shape != live.shape:
        raise ValueError(f"chi2_contingency: {ref.size} reference bins but {live.size} live bins")
    keep = (ref + live) > 0
    observed = np.stack((ref[keep], live[keep]))
    dof = int(observed.shape[1]) - 1
    if dof <= 0:
        return 0.0, 1.0, 0
    rows = observed.sum(axis=1)
    if rows[0] <= 0 or rows[1] <= 0:
        return 0.0, 1.0, dof
    cols = observed.sum(axis=0)
    expected = np.multiply(rows[:, None], cols[None, :]) / observed.sum()
    if dof == 1:
        diff = expected - observed
        observed = observed + np.minimum(0.5, np.abs(diff)) * np.sign(diff)
    stat = float(np.sum((observed - expected) ** 2 / expected))
    return stat, chi2_sf(stat, dof), dof


def chi2_sf(x: float, dof: float) -> float:
    """P(X >= x) for a chi-squared variable with ``dof`` degrees of freedom: the regularized upper
    incomplete gamma function Q(dof/2, x/2) (series below a + 1, Lentz's continued fraction
    above). 1.0 for x <= 0 or dof <= 0."""
    if not dof > 0 or not x > 0:
        return 1.0
    if math.isinf(x):
        return 0.0
    return _gamma_q(dof / 2.0, x / 2.0)


def _gamma_q(a: float, x: float) -> float:
    log_prefix = a * math.log(x) - x - math.lgamma(a)
    eps = 1e-17
    if x < a + 1.0:
        term = 1.0 / a
        total = term
        ap = a
        for _ in range(10_000):
            ap += 1.0
            term *= x / ap
            total += term
            if term < total * eps:
                break
        return _clip01(1.0 - math.exp(log_prefix + math.log(total)))
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    frac = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        if abs(d) < tiny:
            d = tiny
        c = b + an / c
        if abs(c) < tiny:
            c = tiny
        d = 1.0 / d
        delta = d * c
        frac *= delta
        if abs(delta - 1.0) < eps:
            break
    return _clip01(math.exp(log_prefix) * frac)


# --------------------------------------------------------------------------------------------
# two proportions


def z_test(ref_hits: float, ref_n: float, live_hits: float, live_n: float) -> tuple[float, float]:
    """Two-proportion z-test with a pooled proportion, as Evidently's z-test for binary columns:
    ``z = (p_ref - p_live) / sqrt(P (1 - P) (1/n_ref + 1/n_live))``, two-sided
    ``p = 2 (1 - Phi(|z|)) = erfc(|z| / sqrt 2)``. (0.0, 1.0) when either side is empty or the
    pooled proportion is 0 or 1 (both sides constant and equal)."""
    if not (ref_n > 0 and live_n > 0):
        return 0.0, 1.0
    p1 = ref_hits / ref_n
    p2 = live_hits / live_n
    pooled = (p1 * ref_n + p2 * live_n) / (ref_n + live_n)
    if not 0.0 < pooled < 1.0:
        return 0.0, 1.0
    z = (p1 - p2) / math.sqrt(pooled * (1.0 - pooled) * (1.0 / ref_n + 1.0 / live_n))
    if not math.isfinite(z):
        return 0.0, 1.0
    return z, _clip01(math.erfc(abs(z) / _SQRT2))
