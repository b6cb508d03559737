"""The drift statistics against SciPy on the same data, and PSI against a table worked by hand."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import pytest
import scipy.stats as ss
from scipy.spatial.distance import jensenshannon

from proxy.drift import stats as st

RNG_SEED = 20240805


def rel_err(ours: float, theirs: float) -> float:
    return abs(ours - theirs) / max(abs(theirs), 1e-300)


# --------------------------------------------------------------------------------------------
# PSI

# reference, live, PSI = sum (a - e) ln(a / e) over the normalised bins, each worked by hand:
PSI_TABLE: list[tuple[list[float], list[float], float]] = [
    # e = (.5, .3, .2), a = (.3, .3, .4):
    # (.3 - .5) ln(.3/.5) = -.2 * -.5108256 = .1021651; (.3 - .3) ln 1 = 0; (.4 - .2) ln 2 = .1386294
    ([50, 30, 20], [30, 30, 40], 0.1021651 + 0.0 + 0.1386294),
    # an empty reference bin is clamped to 1e-4: e = (1, 1e-4), a = (.5, .5):
    # (.5 - 1) ln(.5) = .3465736; (.5 - .0001) ln(.5 / .0001) = .4999 * 8.5171932 = 4.2577449
    ([10, 0], [5, 5], 0.3465736 + 4.2577449),
    # proportions work as counts: e = .25 each, a = (.1, .2, .3, .4):
    # -.15 ln .4 = .1374436; -.05 ln .8 = .0111572; .05 ln 1.2 = .0091161; .15 ln 1.6 = .0705005
    ([0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4], 0.1374436 + 0.0111572 + 0.0091161 + 0.0705005),
    # the same distribution at another scale: 0
    ([1, 2, 3], [10, 20, 30], 0.0),
]


@pytest.mark.parametrize(("reference", "live", "expected"), PSI_TABLE)
def test_psi_matches_the_hand_worked_table(reference: list[float], live: list[float], expected: float) -> None:
    assert st.psi(reference, live) == pytest.approx(expected, abs=5e-7)


def test_psi_refuses_bins_that_do_not_line_up() -> None:
    with pytest.raises(ValueError, match="3 reference bins but 2 live bins"):
        st.psi([1, 2, 3], [1, 2])


def test_psi_of_empty_sides_is_finite() -> None:
    assert st.psi([0, 0], [0, 0]) == 0.0
    assert math.isfinite(st.psi([0, 0], [3, 1]))


# --------------------------------------------------------------------------------------------
# Jensen-Shannon


def test_js_distance_matches_scipy_on_random_histograms() -> None:
    rng = np.random.default_rng(RNG_SEED)
    for _ in range(300):
        k = int(rng.integers(1, 15))
        p = rng.random(k) * (rng.random(k) > 0.3)
        q = rng.integers(0, 100, size=k) * (rng.random(k) > 0.3)
        if p.sum() == 0 or q.sum() == 0:
            continue
        assert st.js_distance(p, q) == pytest.approx(float(jensenshannon(p, q)), abs=1e-14)


def test_js_distance_edges() -> None:
    assert st.js_distance([1, 2, 3], [2, 4, 6]) == 0.0
    assert st.js_distance([0, 0], [0, 0]) == 0.0
    assert st.js_distance([0, 0], [1, 0]) == 0.0  # nothing to compare
    # disjoint supports: the largest distance, sqrt(ln 2)
    assert st.js_distance([1, 0], [0, 1]) == pytest.approx(math.sqrt(math.log(2)), abs=1e-15)
    with pytest.raises(ValueError, match="2 bins against 3"):
        st.js_distance([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="finite and >= 0"):
        st.js_distance([1, -1], [1, 2])


# --------------------------------------------------------------------------------------------
# Wasserstein


def test_wasserstein_matches_scipy_with_ties_and_unequal_sizes() -> None:
    rng = np.random.default_rng(RNG_SEED)
    for _ in range(200):
        u = rng.normal(size=int(rng.integers(1, 400))).round(int(rng.integers(0, 3)))
        v = (rng.normal(size=int(rng.integers(1, 400))) * rng.uniform(0.5, 2) + rng.uniform(-1, 1)).round(1)
        assert st.wasserstein(u, v) == pytest.approx(float(ss.wasserstein_distance(u, v)), rel=1e-13, abs=1e-15)


def test_normed_wasserstein_divides_by_the_reference_std_with_a_floor() -> None:
    rng = np.random.default_rng(RNG_SEED)
    ref = rng.normal(size=500)
    live = rng.normal(size=300) + 0.3
    std = float(np.std(ref))
    expected = float(ss.wasserstein_distance(ref, live)) / std
    assert st.normed_wasserstein(ref, live, std) == pytest.approx(expected, rel=1e-13)
    # a constant reference: divided by 0.001, never by zero
    assert st.normed_wasserstein([2.0] * 10, [2.0, 2.5], 0.0) == pytest.approx(0.25 / 0.001)
    assert st.normed_wasserstein([], [1.0], 1.0) == 0.0
    assert st.normed_wasserstein([1.0, 2.0], [1.0], math.nan) == pytest.approx(0.5 / 0.001)


# --------------------------------------------------------------------------------------------
# Kolmogorov-Smirnov


def check_ks(a: Any, b: Any, rtol: float = 1e-9) -> tuple[float, float]:
    ours = st.ks_2samp(a, b)
    theirs = ss.ks_2samp(a, b)
    assert ours[0] == pytest.approx(float(theirs.statistic), abs=1e-14)
    if theirs.pvalue > 1e-290:
        assert rel_err(ours[1], float(theirs.pvalue)) < rtol, (len(a), len(b), ours, theirs)
    else:
        assert ours[1] < 1e-280
    return ours


def test_ks_matches_scipy_on_small_samples_with_ties() -> None:
    rng = np.random.default_rng(RNG_SEED)
    for _ in range(400):
        n1, n2 = int(rng.integers(1, 80)), int(rng.integers(1, 80))
        shift = float(rng.choice([0.0, 0.3, 1.0, 3.0]))
        a = rng.normal(size=n1).round(int(rng.integers(0, 3)))
        b = (rng.normal(size=n2) + shift).round(int(rng.integers(0, 3)))
        check_ks(a, b)


def test_ks_tiny_samples() -> None:
    pairs = [([1.0], [2.0]), ([1.0], [1.0]), ([1.0, 2.0], [3.0]), ([0.0, 0.0], [0.0, 1.0]), ([5.0], [1, 2, 3, 4, 6])]
    for a, b in pairs:
        check_ks(np.array(a), np.array(b))


def test_ks_equal_sizes() -> None:
    rng = np.random.default_rng(RNG_SEED)
    for n in (5, 50, 333, 1000, 2500):
        for shift in (0.0, 0.1, 0.5, 2.0):
            check_ks(rng.normal(size=n), rng.normal(size=n) + shift)


def test_ks_unequal_sizes() -> None:
    rng = np.random.default_rng(RNG_SEED)
    for n1, n2 in ((1000, 900), (1000, 150), (3000, 2000), (7, 5000), (999, 1000), (1200, 800)):
        for shift in (0.0, 0.08, 0.5):
            check_ks(rng.normal(size=n1), rng.normal(size=n2) + shift)


def test_ks_keeps_precision_for_very_small_pvalues() -> None:
    rng = np.random.default_rng(RNG_SEED)
    # p around 1e-30 and far below: a "1 - p(inside)" computation would give 0 here
    for n1, n2, shift in ((200, 180, 1.6), (300, 300, 1.3), (1000, 900, 0.75), (500, 60, 3.0), (2000, 1000, 1.5)):
        _, p = check_ks(rng.normal(size=n1), rng.normal(size=n2) + shift, rtol=1e-8)
        assert 0.0 < p < 1e-25
    # nothing in common: the smallest share of paths, exactly 2 / C(n1+n2, n1)
    _, p = check_ks(np.arange(40.0), np.arange(40.0) + 100)
    assert p == pytest.approx(2 / math.comb(80, 40), rel=1e-12)
    _, p = check_ks(np.arange(30.0), np.arange(45.0) + 100)
    assert p == pytest.approx(2 / math.comb(75, 30), rel=1e-12)


def test_ks_10000_by_10000_is_fast_and_exact() -> None:
    rng = np.random.default_rng(RNG_SEED)
    a = rng.normal(size=10_000)
    for shift in (0.0, 0.03, 0.3):
        b = rng.normal(size=10_000) + shift
        start = time.perf_counter()
        ours = st.ks_2samp(a, b)
        elapsed = time.perf_counter() - start
        assert elapsed < 0.5, elapsed
        theirs = ss.ks_2samp(a, b)
        assert rel_err(ours[1], float(theirs.pvalue)) < 1e-9


def test_ks_large_unequal_sizes_stay_under_a_second() -> None:
    rng = np.random.default_rng(RNG_SEED)
    a, b = rng.normal(size=10_000), rng.normal(size=9_999) + 0.03
    start = time.perf_counter()
    ours = st.ks_2samp(a, b)
    assert time.perf_counter() - start < 1.5  # ~0.2 s on a quiet core; the bound leaves room
    assert rel_err(ours[1], float(ss.ks_2samp(a, b).pvalue)) < 1e-9
    # so different that p is below the smallest double: answered without the full count
    start = time.perf_counter()
    assert st.ks_2samp(a, b + 3.0)[1] == 0.0
    assert time.perf_counter() - start < 0.2


def test_ks_asymptotic_above_10000() -> None:
    rng = np.random.default_rng(RNG_SEED)
    cases = ((10_001, 500, 0.2), (20_000, 20_000, 0.02), (20_000, 300, 0.3), (150, 12_000, 0.1), (30_000, 8, 1.0))
    for n1, n2, shift in cases:
        check_ks(rng.normal(size=n1), rng.normal(size=n2) + shift)


def test_kolmogorov_sf_matches_scipy_kstwo_in_every_region() -> None:
    worst = 0.0
    for n in (1, 2, 3, 10, 100, 140, 141, 1000, 10_000, 100_000, 100_001):
        xs = np.concatenate([np.linspace(0.001, 0.999, 50), [0.5 / n, 1 / n, 1.5 / n, (n - 1) / n, 0.5]])
        for x in xs.tolist():
            theirs = float(ss.kstwo.sf(x, n))
            ours = st.kolmogorov_sf(n, x)
            if theirs < 1e-290:
                assert ours < 1e-280
                continue
            worst = max(worst, rel_err(ours, theirs))
    assert worst < 1e-9


def test_ks_exit_bound_is_an_upper_bound() -> None:
    rng = np.random.default_rng(RNG_SEED)
    for _ in range(60):
        n1, n2 = int(rng.integers(2, 300)), int(rng.integers(2, 300))
        if n1 == n2:
            continue
        d, p = st.ks_2samp(rng.normal(size=n1), rng.normal(size=n2) + float(rng.uniform(0, 2)))
        a, b = sorted((n1, n2))
        g = math.gcd(a, b)
        h = round(d * (a // g) * b)
        rows = np.arange(a + 1, dtype=np.int64)
        lo = np.maximum((rows * (b // g) - h) // (a // g) + 1, 0)
        hi = np.minimum(-((-(rows * (b // g) + h)) // (a // g)) - 1, b)
        if h == 0 or np.any(lo > hi):
            continue
        bound = st._ks_exit_bound_log(a, b, lo, hi, a / (a + b), b / (a + b))
        assert p <= math.exp(bound) * (1 + 1e-9)


def test_ks_edges_never_nan() -> None:
    assert st.ks_2samp([], [1.0, 2.0]) == (0.0, 1.0)
    assert st.ks_2samp([math.nan, math.inf], [1.0]) == (0.0, 1.0)
    # NaN values are dropped, the rest is tested
    assert st.ks_2samp([1.0, 2.0, math.nan, 3.0], [1.5, 2.5]) == st.ks_2samp([1.0, 2.0, 3.0], [1.5, 2.5])
    d, p = st.ks_2samp([4.0] * 50, [4.0] * 70)  # constant and equal
    assert (d, p) == (0.0, 1.0)


# --------------------------------------------------------------------------------------------
# chi-squared


def test_chi2_sf_matches_scipy() -> None:
    worst = 0.0
    for dof in (1, 2, 3, 5, 10, 19, 50, 100, 999, 1000):
        for x in np.concatenate([np.geomspace(1e-8, 4000, 150), [dof, dof + 1.0, dof + 2.0]]).tolist():
            theirs = float(ss.chi2.sf(x, dof))
            if theirs < 1e-290:
                continue
            worst = max(worst, rel_err(st.chi2_sf(x, dof), theirs))
    assert worst < 1e-10
    assert st.chi2_sf(0.0, 3) == 1.0
    assert st.chi2_sf(-1.0, 3) == 1.0
    assert st.chi2_sf(math.inf, 3) == 0.0
    assert st.chi2_sf(5.0, 0) == 1.0


def test_chi2_contingency_matches_scipy() -> None:
    rng = np.random.default_rng(RNG_SEED)
    checked = 0
    for _ in range(500):
        k = int(rng.integers(1, 15))
        ref = rng.integers(0, 200, size=k) * (rng.random(k) > 0.2)
        live = rng.integers(0, 60, size=k) * (rng.random(k) > 0.2)
        keep = (ref + live) > 0
        if keep.sum() < 2 or ref.sum() == 0 or live.sum() == 0:
            continue
        theirs = ss.chi2_contingency(np.stack([ref[keep], live[keep]]))
        stat, p, dof = st.chi2_contingency(ref, live)
        assert dof == theirs.dof
        assert stat == pytest.approx(float(theirs.statistic), rel=1e-12, abs=1e-12)
        if theirs.pvalue > 1e-290:
            assert rel_err(p, float(theirs.pvalue)) < 1e-10
        checked += 1
    assert checked > 300


def test_chi2_contingency_yates_and_very_different_counts() -> None:
    # two columns: dof 1, Yates' correction (and its cap at the difference itself)
    for ref, live in (([30, 10], [10, 30]), ([5, 5], [5, 6]), ([1000, 1], [1, 1000])):
        theirs = ss.chi2_contingency(np.array([ref, live]))
        stat, p, dof = st.chi2_contingency(ref, live)
        assert dof == 1
        assert stat == pytest.approx(float(theirs.statistic), rel=1e-12)
        assert rel_err(p, float(theirs.pvalue)) < 1e-10
    theirs = ss.chi2_contingency(np.array([[900, 50, 50, 0], [10, 20, 70, 400]]))
    stat, p, _ = st.chi2_contingency([900, 50, 50, 0], [10, 20, 70, 400])
    assert float(theirs.pvalue) < 1e-100
    assert rel_err(p, float(theirs.pvalue)) < 1e-10


def test_chi2_contingency_edges() -> None:
    assert st.chi2_contingency([5, 0, 0], [7, 0, 0]) == (0.0, 1.0, 0)  # one column left
    assert st.chi2_contingency([0, 0], [0, 0]) == (0.0, 1.0, 0)
    assert st.chi2_contingency([], []) == (0.0, 1.0, 0)
    assert st.chi2_contingency([0, 0, 0], [3, 4, 5]) == (0.0, 1.0, 2)  # an empty reference
    # an all-zero column is dropped, as if it were not there
    assert st.chi2_contingency([10, 0, 20], [12, 0, 9]) == st.chi2_contingency([10, 20], [12, 9])
    with pytest.raises(ValueError, match="3 reference bins but 2 live bins"):
        st.chi2_contingency([1, 2, 3], [1, 2])


# --------------------------------------------------------------------------------------------
# z-test


def test_z_test_matches_the_pooled_two_proportion_formula() -> None:
    rng = np.random.default_rng(RNG_SEED)
    for _ in range(300):
        n1, n2 = int(rng.integers(1, 3000)), int(rng.integers(1, 3000))
        h1, h2 = int(rng.integers(0, n1 + 1)), int(rng.integers(0, n2 + 1))
        z, p = st.z_test(h1, n1, h2, n2)
        pooled = (h1 + h2) / (n1 + n2)
        if pooled in (0.0, 1.0):
            assert (z, p) == (0.0, 1.0)
            continue
        expected_z = (h1 / n1 - h2 / n2) / math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
        assert z == pytest.approx(expected_z, rel=1e-12, abs=1e-12)
        expected_p = float(2 * ss.norm.sf(abs(expected_z)))
        if expected_p > 1e-290:
            assert rel_err(p, expected_p) < 1e-9
        # Evidently writes it 2 * (1 - Phi(|z|)); the same, where that form has digits left
        assert p == pytest.approx(float(2 * (1 - ss.norm.cdf(abs(expected_z)))), abs=1e-15)


def test_z_test_edges() -> None:
    assert st.z_test(0, 100, 0, 50) == (0.0, 1.0)  # both always "no"
    assert st.z_test(100, 100, 50, 50) == (0.0, 1.0)  # both always "yes"
    assert st.z_test(0, 0, 5, 10) == (0.0, 1.0)
    z, p = st.z_test(0, 1000, 1000, 1000)  # as different as can be: p tiny, still finite
    assert z < -40 and 0.0 <= p < 1e-300


def test_nothing_returns_nan_or_inf() -> None:
    results: list[float] = []
    results += st.ks_2samp([1.0], [1.0])
    results += st.ks_2samp([0.0] * 3, [1e300, -1e300])
    results.append(st.js_distance([1e-300, 0], [0, 1e-300]))
    results.append(st.wasserstein([1e308, -1e308], [0.0]))
    results.append(st.normed_wasserstein([0.0], [0.0], 0.0))
    results += st.chi2_contingency([1e-300, 1.0], [1.0, 1e-300])[:2]
    results += st.z_test(1e-300, 1.0, 1.0, 1.0)
    results.append(st.psi([1e-300, 1], [1, 1e-300]))
    assert all(math.isfinite(v) for v in results), results


def test_ks_statistic_alone_is_the_one_ks_2samp_returns() -> None:
    rng = np.random.default_rng(RNG_SEED)
    for n1, n2 in ((100, 70), (1000, 1000), (12_000, 50), (3, 4)):
        a, b = rng.normal(size=n1).round(1), rng.normal(size=n2).round(1)
        assert st.ks_statistic(a, b) == st.ks_2samp(a, b)[0]
    assert st.ks_statistic([], [1.0]) == 0.0
