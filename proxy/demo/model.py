"""The demo's model: multinomial logistic regression in numpy, trained at start-up on generated data.

The data are iris-like flowers: four named features drawn from one Gaussian per class (three
classes), seeded, so every run trains the same models. ``stable`` is trained on the whole training
set; ``canary`` on a small share of it whose labels were partly mislabelled (one class taken for
another), which makes it visibly less accurate: what a release trained on a bad data pull looks like.

Training is full-batch gradient descent on standardised features (a few hundred steps on a few
thousand rows: tens of milliseconds). No scikit-learn: numpy is already a dependency of the proxy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")
CLASSES = ("setosa", "versicolor", "virginica")
#: per class, per feature: the mean and the standard deviation the data are drawn with
MEANS = np.array([[5.0, 3.4, 1.5, 0.25], [5.9, 2.8, 4.3, 1.3], [6.6, 3.0, 5.5, 2.0]])
STDS = np.array([[0.35, 0.38, 0.25, 0.12], [0.5, 0.32, 0.5, 0.22], [0.6, 0.32, 0.55, 0.27]])

FloatArray = np.ndarray[Any, np.dtype[np.float64]]
IntArray = np.ndarray[Any, np.dtype[np.int64]]


def sample(rng: np.random.Generator, n: int) -> tuple[FloatArray, IntArray]:
    """``n`` rows (features, class index) from the generating distribution, classes equally likely."""
    y = rng.integers(0, len(CLASSES), size=n).astype(np.int64)
    x = rng.normal(MEANS[y], STDS[y])
    return np.round(x, 2), y


def overall_std(rng: np.random.Generator | None = None) -> FloatArray:
    """Each feature's standard deviation over all classes (what a shift of "2 sd" is measured in)."""
    rng = rng or np.random.default_rng(0)
    x, _ = sample(rng, 20_000)
    return np.asarray(x.std(axis=0), dtype=np.float64)


@dataclass
class Classifier:
    """A fitted multinomial logistic regression: ``softmax(((x - mean) / scale) @ weights + bias)``."""

    name: str
    weights: FloatArray  # (features, classes)
    bias: FloatArray  # (classes,)
    mean: FloatArray
    scale: FloatArray
    rows: int = 0  # rows it was trained on
    train_seconds: float = 0.0
    accuracy: float = 0.0  # on held-out data from the same distribution, set by train_models
    extra: dict[str, Any] = field(default_factory=dict)

    def predict_proba(self, x: FloatArray) -> FloatArray:
        z = ((x - self.mean) / self.scale) @ self.weights + self.bias
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return np.asarray(e / e.sum(axis=1, keepdims=True), dtype=np.float64)

    def predict(self, x: FloatArray) -> IntArray:
        return np.asarray(self.predict_proba(x).argmax(axis=1), dtype=np.int64)

    def score(self, x: FloatArray, y: IntArray) -> float:
        return float((self.predict(x) == y).mean())


def fit(name: str, x: FloatArray, y: IntArray, *, steps: int = 300, lr: float = 0.5, l2: float = 1e-3) -> Classifier:
    """Multinomial logistic regression by full-batch gradient descent on the cross-entropy."""
    start = time.perf_counter()
    mean = x.mean(axis=0)
    scale = np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0)
    xt = ((x - mean) / scale).T.copy()  # (features, n): reductions over classes run along rows, fast
    n, k = xt.shape[1], len(CLASSES)
    onehot = np.eye(k)[y].T  # (classes, n)
    w = np.zeros((k, xt.shape[0]))
    b = np.zeros((k, 1))
    for _ in range(steps):
        z = w @ xt + b
        z -= z.max(axis=0)
        p = np.exp(z)
        p /= p.sum(axis=0)
        grad = (p - onehot) / n
        w -= lr * (grad @ xt.T + l2 * w)
        b -= lr * grad.sum(axis=1, keepdims=True)
    w, b = w.T.copy(), b[:, 0].copy()
    return Classifier(name, w, b, mean, scale, rows=n, train_seconds=time.perf_counter() - start)


@dataclass
class Models:
    """What :func:`train_models` made: both variants and the training data (for the reference profile)."""

    stable: Classifier
    canary: Classifier
    x_train: FloatArray
    y_train: IntArray
    seconds: float  # generating the data and training both, wall time


def train_models(seed: int = 7, rows: int = 3000, canary_share: float = 0.05, mislabel: float = 0.5) -> Models:
    """Train ``stable`` on ``rows`` generated rows and ``canary`` on ``canary_share`` of them, where
    ``mislabel`` of the versicolor rows are labelled virginica; both scored on fresh held-out rows."""
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    x, y = sample(rng, rows)
    stable = fit("stable", x, y)
    few = rng.choice(rows, size=max(len(CLASSES) * 4, int(rows * canary_share)), replace=False)
    xc, yc = x[few], y[few].copy()
    flip = (yc == 1) & (rng.random(len(yc)) < mislabel)
    yc[flip] = 2
    canary = fit("canary", xc, yc, steps=150)
    x_test, y_test = sample(rng, 2000)
    stable.accuracy = stable.score(x_test, y_test)
    canary.accuracy = canary.score(x_test, y_test)
    return Models(stable, canary, x, y, time.perf_counter() - start)


def rows_of(x: FloatArray) -> list[dict[str, float]]:
    """Feature rows as dicts (what the reference profile is built from)."""
    return [dict(zip(FEATURES, map(float, row), strict=True)) for row in x]
