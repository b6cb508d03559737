"""The numpy scores against scikit-learn's metrics, on random data with ties and missing classes."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from sklearn import metrics as skm

from proxy.quality import metrics as m

TOL = 1e-9


def sk_log_loss(y: np.ndarray, proba: np.ndarray, labels: list[int]) -> float:
    """log_loss across scikit-learn versions (y_pred became y_proba in 1.9)."""
    if "y_proba" in inspect.signature(skm.log_loss).parameters:
        return float(skm.log_loss(y, y_proba=proba, labels=labels))
    return float(skm.log_loss(y, proba, labels=labels))


@pytest.mark.parametrize("seed", range(6))
def test_classification_scores_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 6))
    n = int(rng.integers(20, 400))
    truth = rng.integers(0, k, n)
    predicted = np.where(rng.random(n) < 0.6, truth, rng.integers(0, k + 1, n))  # a class no label has
    classes = sorted(set(truth.tolist()) | set(predicted.tolist()))
    index = {c: i for i, c in enumerate(classes)}
    t = np.array([index[c] for c in truth])
    p = np.array([index[c] for c in predicted])
    matrix = m.confusion(t, p, len(classes))
    assert (matrix == skm.confusion_matrix(truth, predicted, labels=classes)).all()
    each = m.per_class(matrix)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        truth, predicted, labels=classes, zero_division=0
    )
    assert np.allclose(each["precision"], precision, atol=TOL, rtol=0)
    assert np.allclose(each["recall"], recall, atol=TOL, rtol=0)
    assert np.allclose(each["f1"], f1, atol=TOL, rtol=0)
    assert (each["support"] == support).all()
    for name, fn in (("precision", skm.precision_score), ("recall", skm.recall_score), ("f1", skm.f1_score)):
        assert abs(float(np.mean(each[name])) - fn(truth, predicted, average="macro", zero_division=0)) < TOL


@pytest.mark.parametrize("seed", range(6))
def test_auc_and_log_loss_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    k = 2 + seed % 3
    n = 300
    truth = rng.integers(0, k, n)
    truth[:k] = np.arange(k)  # every class present
    logits = rng.normal(size=(n, k)) + np.eye(k)[truth] * 1.5
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    proba = np.round(proba, 2)  # ties
    proba = proba / proba.sum(axis=1, keepdims=True)
    order = [str(i) for i in range(k)]
    value, each, why = m.auc(truth, proba, order)
    assert value is not None, why
    if k == 2:
        expected = skm.roc_auc_score(truth, proba[:, 1])
    else:
        expected = skm.roc_auc_score(truth, proba, multi_class="ovr", average="macro")
        for i in range(k):
            assert abs(each[str(i)] - skm.roc_auc_score(truth == i, proba[:, i])) < TOL
    assert abs(value - expected) < TOL
    loss, why = m.log_loss(truth, proba)
    assert loss is not None, why
    assert abs(loss - sk_log_loss(truth, proba, list(range(k)))) < TOL


def test_auc_is_absent_with_one_class_and_log_loss_without_probabilities() -> None:
    truth = np.zeros(10, dtype=np.int64)
    scores = np.tile([0.3, 0.7], (10, 1))
    value, _, why = m.auc(truth, scores, ["0", "1"])
    assert value is None and "only one class" in why
    value, _, why = m.auc(np.array([0, 1, 0, 1]), np.tile([0.2, 0.3, 0.5], (4, 1)), ["0", "1", "2"])
    assert value is None and "'2'" in why
    loss, why = m.log_loss(np.array([0, 1]), np.array([[0.2, 0.3], [0.5, 0.1]]))
    assert loss is None and "sum to 1" in why


def test_one_vs_rest_auc_needs_probabilities_as_scikit_learn_does() -> None:
    """roc_auc_score(multi_class="ovr") refuses scores whose rows do not sum to 1 (independent
    sigmoids, say): no AUC then, with the reason, rather than a figure scikit-learn would not give."""
    rng = np.random.default_rng(7)
    truth = np.arange(60) % 3
    scores = rng.random((60, 3))  # each in [0, 1], rows summing to anything
    with pytest.raises(ValueError, match="sum up to 1"):
        skm.roc_auc_score(truth, scores, multi_class="ovr")
    value, each, why = m.auc(truth, scores, ["0", "1", "2"])
    assert value is None and each == {} and "sum to 1" in why
    binary = rng.random((60, 2))  # binary AUC reads the greater class's column only, as scikit-learn
    value, _, why = m.auc(truth % 2, binary, ["0", "1"])
    assert value is not None and abs(value - skm.roc_auc_score(truth % 2, binary[:, 1])) < TOL


def test_float32_probabilities_count_as_probabilities() -> None:
    """A float32 softmax (most served models) sums to 1 within float32's rounding, not float64's:
    its log loss is scikit-learn's and its AUC is computed, both checked as roc_auc_score checks."""
    rng = np.random.default_rng(8)
    k, n = 5, 300
    truth = np.arange(n) % k
    logits = (rng.normal(size=(n, k)) + np.eye(k)[truth]).astype(np.float32)
    proba32 = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    proba = np.array([[float(str(x)) for x in row] for row in proba32])  # as a JSON answer gives them
    assert np.abs(proba.sum(axis=1) - 1).max() > 1e-7  # beyond float64's sqrt(eps)
    loss, why = m.log_loss(truth, proba)
    assert loss is not None, why
    with pytest.warns(UserWarning, match="sum to one"):
        expected = sk_log_loss(truth, proba, list(range(k)))
    assert abs(loss - expected) < TOL
    value, _, why = m.auc(truth, proba, [str(i) for i in range(k)])
    assert value is not None and abs(value - skm.roc_auc_score(truth, proba, multi_class="ovr")) < TOL


@pytest.mark.parametrize("seed", range(4))
def test_regression_scores_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(200 + seed)
    truth = rng.normal(100, 30, 250)
    truth[:3] = 0.0  # MAPE's epsilon
    predicted = truth + rng.normal(0, 10, 250)
    out, missing = m.regression(truth, predicted)
    assert missing == {}
    assert abs(out["mae"] - skm.mean_absolute_error(truth, predicted)) < TOL
    assert abs(out["rmse"] - np.sqrt(skm.mean_squared_error(truth, predicted))) < TOL
    assert abs(out["mape"] - skm.mean_absolute_percentage_error(truth, predicted)) / out["mape"] < TOL
    assert abs(out["r2"] - skm.r2_score(truth, predicted)) < TOL


def test_r2_is_absent_for_constant_labels() -> None:
    out, missing = m.regression(np.ones(5), np.array([1.0, 2, 1, 1, 1]))
    assert "r2" not in out and "undefined" in missing["r2"]


def test_regression_figures_that_overflow_are_absent_with_the_reason() -> None:
    """Values near float64's limit make scikit-learn's figures inf or nan: absent here, said why
    (/quality would show a bare null, and the canary an infinite MAE)."""
    truth = np.array([1e308, -1e308, 0.0, 5.0])
    predicted = np.array([-1e308, 1e308, 0.0, 4.0])
    with np.errstate(all="ignore"):
        assert not np.isfinite(skm.mean_absolute_error(truth, predicted))
        out, missing = m.regression(truth, predicted)
    assert all(np.isfinite(v) for v in out.values())
    assert {"mae", "rmse", "r2"} <= set(missing) and "float64" in missing["mae"]
    out, missing = m.regression(np.array([1e200, 2e200, 3e200]), np.array([1.1e200, 2e200, 3e200]))
    assert "rmse" in missing and abs(out["mae"] - 1e199 / 3) < 1e187 and out["mape"] > 0  # the rest stays


def test_class_order_is_numeric_then_text() -> None:
    assert m.class_order({"10", "9", "b", "a", "-1"}) == ["-1", "9", "10", "a", "b"]


def test_average_ranks_handle_ties() -> None:
    assert m.average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
