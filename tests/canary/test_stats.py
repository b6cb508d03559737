"""The canary statistics against SciPy on the same data, and the two-proportion test worked by hand."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest
import scipy.stats as ss

from proxy.canary import stats as st

RNG_SEED = 20240917
ALTERNATIVES: list[st.Alternative] = ["two-sided", "greater", "less"]


def rel_err(ours: float, theirs: float) -> float:
    return abs(ours - theirs) / max(abs(theirs), 1e-300)


def _samples(rng: np.random.Generator, trial: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    n1 = int(rng.integers(1, 40))
    n2 = int(rng.integers(1, 40))
    kind = trial % 4
    if kind == 0:  # many ties
        return rng.integers(0, 5, n1).astype(float), rng.integers(0, 5, n2).astype(float)
    if kind == 1:  # small and tie-free: the exact distribution
        n1, n2 = int(rng.integers(1, 9)), int(rng.integers(1, 12))
    shift = float(rng.uniform(-1.0, 1.0))
    return rng.lognormal(0.0, 1.0, n1), rng.lognormal(shift, 1.0, n2)


@pytest.mark.parametrize("alternative", ALTERNATIVES)
def test_mann_whitney_matches_scipy_on_random_samples(alternative: st.Alternative) -> None:
    rng = np.random.default_rng(RNG_SEED)
    for trial in range(300):
        x, y = _samples(rng, trial)
        u, p = st.mann_whitney_u(x, y, alternative)
        ref = ss.mannwhitneyu(x, y, alternative=alternative)
        assert u == pytest.approx(float(ref.statistic), abs=1e-9)
        assert rel_err(p, float(ref.pvalue)) < 1e-9, (trial, x, y, p, ref)


@pytest.mark.parametrize(("n1", "n2"), [(1, 1), (2, 3), (8, 8), (5, 400), (8, 9), (9, 8), (60, 80), (3000, 2000)])
def test_mann_whitney_matches_scipy_at_the_method_boundaries(n1: int, n2: int) -> None:
    rng = np.random.default_rng(n1 * 1000 + n2)
    x = rng.normal(0.2, 1.0, n1)
    y = rng.normal(0.0, 1.0, n2)
    for alternative in ALTERNATIVES:
        u, p = st.mann_whitney_u(x, y, alternative)
        ref = ss.mannwhitneyu(x, y, alternative=alternative)
        assert u == float(ref.statistic)
        assert rel_err(p, float(ref.pvalue)) < 1e-9


def test_mann_whitney_far_tail_keeps_its_digits() -> None:
    rng = np.random.default_rng(RNG_SEED)
    x = rng.normal(3.0, 1.0, 500)
    y = rng.normal(0.0, 1.0, 500)
    _, p = st.mann_whitney_u(x, y, "greater")
    ref = ss.mannwhitneyu(x, y, alternative="greater")
    assert 0.0 < p < 1e-100
    assert rel_err(p, float(ref.pvalue)) < 1e-6


def test_mann_whitney_degenerate_inputs_are_finite() -> None:
    assert st.mann_whitney_u([], [1.0, 2.0]) == (0.0, 1.0)
    assert st.mann_whitney_u([1.0, math.nan], [math.inf]) == (0.0, 1.0)
    u, p = st.mann_whitney_u([2.0] * 20, [2.0] * 30, "greater")
    assert u == 300.0
    assert p == 1.0
    with pytest.raises(ValueError, match="alternative must be one of"):
        st.mann_whitney_u([1.0], [2.0], "larger")  # type: ignore[arg-type]


def test_hodges_lehmann_is_the_median_of_pairwise_differences() -> None:
    rng = np.random.default_rng(RNG_SEED)
    for trial in range(200):
        x, y = _samples(rng, trial)
        expected = float(np.median(np.subtract.outer(x, y)))
        assert st.hodges_lehmann(x, y) == pytest.approx(expected, rel=1e-12, abs=1e-12)
        # the selection used for large samples gives the same order statistics
        assert st._hl_by_selection(np.sort(x), np.sort(y)) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize(("n1", "n2", "ties"), [(1003, 999, False), (1500, 1200, True), (1201, 1200, False)])
def test_hodges_lehmann_selection_matches_on_large_samples(n1: int, n2: int, ties: bool) -> None:
    rng = np.random.default_rng(n1 + n2)
    if ties:
        x = rng.integers(0, 7, n1).astype(float)
        y = rng.integers(0, 7, n2).astype(float)
    else:
        x = rng.lognormal(0.0, 1.0, n1)
        y = rng.lognormal(0.1, 1.0, n2)
    expected = float(np.median(np.subtract.outer(x, y)))
    assert n1 * n2 > st.HL_DIRECT_MAX_PAIRS
    assert st.hodges_lehmann(x, y) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_hodges_lehmann_of_a_pure_shift_is_the_shift() -> None:
    rng = np.random.default_rng(RNG_SEED)
    y = rng.normal(0.0, 1.0, 4000)
    assert st.hodges_lehmann(y + 0.25, y) == pytest.approx(0.25, abs=0.02)
    assert st.hodges_lehmann([], [1.0]) == 0.0


def test_two_proportion_test_worked_by_hand() -> None:
    # 30 errors in 1000 against 10 in 1000: pooled P = 40/2000 = 0.02,
    # se = sqrt(0.02 * 0.98 * (2/1000)) = sqrt(3.92e-5) = 0.00626099; z = 0.02 / 0.00626099 = 3.194383
    z, p = st.two_proportion_test(30, 1000, 10, 1000, "greater")
    assert z == pytest.approx(3.194383, abs=1e-6)
    assert p == pytest.approx(float(ss.norm.sf(3.194383)), rel=1e-5)
    assert p == pytest.approx(0.000700, abs=2e-6)
    z2, p2 = st.two_proportion_test(30, 1000, 10, 1000)
    assert z2 == z
    assert p2 == pytest.approx(2 * p, rel=1e-12)
    _, p3 = st.two_proportion_test(30, 1000, 10, 1000, "less")
    assert p3 == pytest.approx(1.0 - p, rel=1e-12)


def test_two_proportion_test_matches_the_normal_tails_on_random_counts() -> None:
    rng = np.random.default_rng(RNG_SEED)
    for _ in range(300):
        n_a, n_b = int(rng.integers(1, 5000)), int(rng.integers(1, 5000))
        a, b = int(rng.integers(0, n_a + 1)), int(rng.integers(0, n_b + 1))
        pooled = (a + b) / (n_a + n_b)
        if not 0.0 < pooled < 1.0:
            continue
        z_ref = (a / n_a - b / n_b) / math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
        expected = {
            "two-sided": float(2 * ss.norm.sf(abs(z_ref))),
            "greater": float(ss.norm.sf(z_ref)),
            "less": float(ss.norm.cdf(z_ref)),
        }
        for alternative in ALTERNATIVES:
            z, p = st.two_proportion_test(a, n_a, b, n_b, alternative)
            assert z == pytest.approx(z_ref, rel=1e-12, abs=1e-12)
            assert p == pytest.approx(expected[alternative], rel=1e-9, abs=1e-300)


def test_two_proportion_test_degenerate_inputs() -> None:
    assert st.two_proportion_test(0, 0, 1, 10, "greater") == (0.0, 1.0)
    assert st.two_proportion_test(0, 100, 0, 100, "greater") == (0.0, 1.0)
    assert st.two_proportion_test(100, 100, 50, 50, "greater") == (0.0, 1.0)
