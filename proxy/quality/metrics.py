"""Classification and regression scores with numpy, with scikit-learn's semantics.

Each function takes what one window holds and returns the figures scikit-learn's metrics give for the
same arrays (the tests check them against scikit-learn to 1e-9): ``accuracy_score``,
``precision_recall_fscore_support`` (per class and ``average="macro"``, ``zero_division=0``, over the
classes of the labels and the predictions together), ``confusion_matrix``, ``roc_auc_score`` (binary:
the scores of the greater class; multiclass: ``multi_class="ovr"``, macro), ``log_loss``,
``mean_absolute_error``, the root of ``mean_squared_error``, ``mean_absolute_percentage_error``
(its epsilon: the float64 machine epsilon) and ``r2_score``.

Where scikit-learn would warn, refuse or make a number up (one class only for AUC, constant labels for
R^2, scores that are not probabilities for log loss and for one-vs-rest AUC) these give ``None`` and
the reason instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

EPS = float(np.finfo(np.float64).eps)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def class_order(classes: Sequence[str] | set[str]) -> list[str]:
    """Classes as scikit-learn sorts them (``np.unique``): numbers by value, then text."""

    def key(c: str) -> tuple[int, float, str]:
        if c == "false":
            return (0, 0.0, c)
        if c == "true":
            return (0, 1.0, c)
        try:
            x = float(c)
        except ValueError:
            return (1, 0.0, c)
        return (0, x, c) if math.isfinite(x) else (1, 0.0, c)

    return sorted(classes, key=key)


def confusion(truth: IntArray, predicted: IntArray, k: int) -> IntArray:
    """Counts: row = the label's class, column = the predicted class."""
    return np.bincount(truth * k + predicted, minlength=k * k).reshape(k, k).astype(np.int64)


def per_class(matrix: IntArray) -> dict[str, FloatArray]:
    """Precision, recall, F1 and support per class from a confusion matrix (zero_division=0)."""
    tp = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    support = matrix.sum(axis=1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        denom = 2 * tp + (predicted - tp) + (support - tp)
        f1 = np.where(denom > 0, 2 * tp / denom, 0.0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def average_ranks(x: FloatArray) -> FloatArray:
    """1-based ranks with ties given their average rank."""
    n = len(x)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    counts = np.diff(np.r_[starts, n])
    average = starts + (counts + 1) / 2.0
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(average, counts)
    return ranks


NOT_PROBABILITIES = "the scores are not probabilities (a row does not sum to 1)"


def sums_to_one(scores: FloatArray) -> bool:
    """Does every row sum to 1, as ``roc_auc_score`` checks multiclass scores (``np.allclose``)?

    For log loss too: scikit-learn's own check there (``rtol=sqrt(eps)`` of the array's dtype) only
    warns, and scores read from JSON are float64 whatever the model computed in: a float32 softmax
    (most served models) misses 1 by about 1e-7, which float32's tolerance allows and float64's not.
    """
    return bool(np.allclose(1.0, scores.sum(axis=1)))


def binary_auc(positive: npt.NDArray[np.bool_], score: FloatArray) -> float:
    """ROC AUC (the area under the trapezoidal ROC curve, ties averaged); both classes must be there."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    ranks = average_ranks(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auc(truth: IntArray, scores: FloatArray, score_classes: list[str]) -> tuple[float | None, dict[str, float], str]:
    """ROC AUC over the scores' classes (``truth`` indexes them): binary, or one-vs-rest macro.

    Returns (value, per-class values (one-vs-rest; empty for binary), the reason when None).
    """
    k = len(score_classes)
    present = np.bincount(truth, minlength=k)
    missing = [score_classes[i] for i in range(k) if present[i] == 0]
    if k == 2:
        if missing:
            return None, {}, f"only one class ({score_classes[1 - score_classes.index(missing[0])]!r}) among the labels"
        positive = truth == 1  # the greater class, as scikit-learn takes it
        return binary_auc(positive, scores[:, 1]), {}, ""
    if not sums_to_one(scores):
        return None, {}, NOT_PROBABILITIES + ": one-vs-rest AUC needs probabilities"
    if missing:
        return (
            None,
            {},
            (f"class {missing[0]!r} of the scores has no label in the window: one-vs-rest AUC needs every class"),
        )
    each = {score_classes[i]: binary_auc(truth == i, scores[:, i]) for i in range(k)}
    return float(np.mean(list(each.values()))), each, ""


def log_loss(truth: IntArray, scores: FloatArray) -> tuple[float | None, str]:
    """Mean negative log-likelihood of the labels' classes; the rows must sum to 1."""
    if not sums_to_one(scores):
        return None, NOT_PROBABILITIES
    p = np.clip(scores[np.arange(len(truth)), truth], EPS, 1 - EPS)
    return float(-np.mean(np.log(p))), ""


def regression(truth: FloatArray, predicted: FloatArray) -> tuple[dict[str, float], dict[str, str]]:
    """MAE, RMSE, MAPE and R^2; R^2 is left out (with its reason) when the labels are constant, and
    any figure that overflows float64 (values near 1e308: inf or nan) with its reason."""
    with np.errstate(over="ignore", invalid="ignore"):
        err = predicted - truth
        out: dict[str, float] = {
            "mae": float(np.mean(np.abs(err))),
            "rmse": float(np.sqrt(np.mean(err * err))),
            "mape": float(np.mean(np.abs(err) / np.maximum(np.abs(truth), EPS))),
        }
        missing: dict[str, str] = {}
        ss_tot = float(np.sum((truth - np.mean(truth)) ** 2))
        if ss_tot == 0.0:
            missing["r2"] = "the labels in the window are all the same: R^2 is undefined"
        else:
            out["r2"] = 1.0 - float(np.sum(err * err)) / ss_tot
    for name in [name for name, value in out.items() if not math.isfinite(value)]:
        del out[name]
        missing[name] = "the values are too large: the figure overflows float64"
    return out, missing


def delays(values: FloatArray) -> dict[str, Any]:
    """Mean, median, 90th percentile and maximum of label delays (seconds)."""
    if len(values) == 0:
        return {"count": 0}
    return {
        "count": len(values),
        "mean": float(np.mean(values)),
        "p50": float(np.quantile(values, 0.5)),
        "p90": float(np.quantile(values, 0.9)),
        "max": float(np.max(values)),
    }
