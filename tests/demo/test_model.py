"""The demo's model: trained at start-up in numpy, stable clearly better than the canary."""

from __future__ import annotations

import time

import numpy as np
import pytest

from proxy.demo.model import CLASSES, FEATURES, Models, fit, overall_std, rows_of, sample, train_models


@pytest.fixture(scope="module")
def models() -> Models:
    return train_models(seed=7)


def test_training_is_fast_and_stable_is_clearly_better(models: Models) -> None:
    assert models.seconds < 2.0
    assert models.stable.accuracy > 0.95
    assert models.canary.accuracy < models.stable.accuracy - 0.15
    assert models.canary.accuracy > 0.5  # worse, not useless: its answers still look like a model's
    assert models.stable.rows == 3000 and models.canary.rows < models.stable.rows // 10


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_any_seed_keeps_the_gap(seed: int) -> None:
    m = train_models(seed=seed)
    assert m.stable.accuracy > m.canary.accuracy + 0.1


def test_the_same_seed_trains_the_same_models() -> None:
    a, b = train_models(seed=11), train_models(seed=11)
    x, _ = sample(np.random.default_rng(0), 50)
    assert np.array_equal(a.stable.predict_proba(x), b.stable.predict_proba(x))
    assert np.array_equal(a.canary.predict_proba(x), b.canary.predict_proba(x))


def test_probabilities_are_a_distribution_over_the_classes(models: Models) -> None:
    x, _ = sample(np.random.default_rng(1), 200)
    p = models.stable.predict_proba(x)
    assert p.shape == (200, len(CLASSES))
    assert np.allclose(p.sum(axis=1), 1.0) and (p >= 0).all()
    assert np.array_equal(models.stable.predict(x), p.argmax(axis=1))


def test_the_canary_predicts_a_different_class_mix(models: Models) -> None:
    x, _ = sample(np.random.default_rng(2), 3000)
    stable = np.bincount(models.stable.predict(x), minlength=3) / len(x)
    canary = np.bincount(models.canary.predict(x), minlength=3) / len(x)
    assert np.allclose(stable, 1 / 3, atol=0.05)  # classes are equally likely
    assert abs(canary - stable).max() > 0.1  # it mistakes versicolor for virginica


def test_fit_learns_a_separable_problem() -> None:
    start = time.perf_counter()
    x = np.array([[0.0, 0, 0, 0], [0.1, 0, 0, 0], [5.0, 5, 5, 5], [5.1, 5, 5, 5], [9.0, 0, 9, 0], [9.1, 0, 9, 0]])
    y = np.array([0, 0, 1, 1, 2, 2], dtype=np.int64)
    clf = fit("t", x, y)
    assert clf.score(x, y) == 1.0
    assert time.perf_counter() - start < 1.0


def test_rows_and_spread_of_the_data() -> None:
    x, y = sample(np.random.default_rng(3), 10)
    rows = rows_of(x)
    assert list(rows[0]) == list(FEATURES) and len(rows) == 10
    assert set(y.tolist()) <= {0, 1, 2}
    std = overall_std()
    assert std.shape == (len(FEATURES),) and (std > 0).all()
