"""The scores engine: windows by time and count, what it leaves out and why, the join rate, the canary summary."""

from __future__ import annotations

import threading

import numpy as np
from sklearn import metrics as skm

from proxy.quality.scores import CLASSIFICATION, REGRESSION, Labelled, ScoresEngine
from proxy.settings import Quality

LABELS = ("m", "v", "stable")
T0 = 1_000_000.0


def engine(**cfg: object) -> ScoresEngine:
    base: dict[str, object] = {
        "windows": {"short": {"seconds": 100, "max_labels": 50}, "long": {"seconds": 1000, "max_labels": 1000}},
        "min_labels": 5,
    }
    return ScoresEngine(Quality.model_validate({**base, **cfg}))


def cls(truth: str, predicted: str, t: float, labels: tuple[str, str, str] = LABELS, tp: float = 0.0) -> Labelled:
    return Labelled(labels, CLASSIFICATION, truth, predicted, t, tp)


def test_windows_by_count_and_by_time() -> None:
    e = engine()
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 3, 200).astype(str).tolist()
    predicted = [t if rng.random() < 0.7 else "0" for t in truth]
    # 200 labels over 400 s: the short window (100 s, at most 50) holds the last 50
    e.add(cls(t, p, T0 + 2 * i) for i, (t, p) in enumerate(zip(truth, predicted, strict=True)))
    snap = e.evaluate(T0 + 400)
    short, long = snap.sets[(*LABELS, CLASSIFICATION)]["short"], snap.sets[(*LABELS, CLASSIFICATION)]["long"]
    assert short.labels == 50 and long.labels == 200
    assert abs(short.scores["accuracy"] - skm.accuracy_score(truth[-50:], predicted[-50:])) < 1e-12
    assert abs(long.scores["accuracy"] - skm.accuracy_score(truth, predicted)) < 1e-12
    # 50 s later, with no new label, the short window holds the labels of the last 100 s only
    snap = e.evaluate(T0 + 450)
    short = snap.sets[(*LABELS, CLASSIFICATION)]["short"]
    assert short.labels == 25  # labels from T0+350 to T0+398, every 2 s
    assert abs(short.scores["accuracy"] - skm.accuracy_score(truth[-25:], predicted[-25:])) < 1e-12
    snap = e.evaluate(T0 + 2000)
    assert snap.sets[(*LABELS, CLASSIFICATION)]["long"].labels == 0
    assert "fewer than quality.min_labels" in snap.sets[(*LABELS, CLASSIFICATION)]["long"].missing["accuracy"]


def test_more_classes_than_the_cap_leave_only_accuracy() -> None:
    e = engine(max_classes=3)
    e.add(cls(str(i % 5), str(i % 5), T0 + i) for i in range(20))
    w = e.evaluate(T0 + 20).sets[(*LABELS, CLASSIFICATION)]["long"]
    assert w.scores.keys() == {"accuracy"} or w.scores.keys() == {"accuracy", "join_rate"}
    assert "more than quality.max_classes (3)" in w.missing["f1_macro"]
    assert w.confusion is None and w.classes == {}


def test_label_sets_are_capped_and_counted() -> None:
    e = engine(max_label_sets=2)
    e.add(cls("1", "1", T0, labels=(f"m{i}", "v", "stable")) for i in range(4))
    e.predicted(("m9", "v", "stable"), T0, 3)
    assert e.dropped_sets == 3
    assert len(e.evaluate(T0 + 1).sets) == 2


def test_join_rate_counts_instances_predicted_in_the_window() -> None:
    e = engine()
    e.predicted(LABELS, T0, 10)
    e.predicted(LABELS, T0 + 500, 10)
    e.add([cls("1", "1", T0 + 600, tp=T0 + 500) for _ in range(4)])
    sets = e.evaluate(T0 + 650).sets[(*LABELS, CLASSIFICATION)]
    assert sets["long"].predictions == 20 and sets["long"].labelled_predictions == 4
    assert abs(sets["long"].scores["join_rate"] - 0.2) < 1e-12
    assert sets["short"].predictions == 0 and "no prediction" in sets["short"].missing["join_rate"]
    assert sets["long"].delay["max"] == 100.0


def test_regression_and_the_canary_summary() -> None:
    e = engine()
    rng = np.random.default_rng(3)
    truth, predicted = rng.normal(50, 10, 40), rng.normal(50, 10, 40)
    e.add(
        Labelled(("m", "v2", "canary"), REGRESSION, float(t), float(p), T0 + i)
        for i, (t, p) in enumerate(zip(truth, predicted, strict=True))
    )
    e.add(cls("1", "1", T0 + i) for i in range(3))
    e.evaluate(T0 + 50)
    summary = e.summary()
    assert summary["canary"]["metric"] == "mae" and summary["canary"]["window"] == "short"
    assert summary["canary"]["labels"] == 40
    assert abs(summary["canary"]["value"] - skm.mean_absolute_error(truth, predicted)) < 1e-12
    assert summary["stable"]["value"] is None and "min_labels" in summary["stable"]["reason"]


def test_evaluation_and_input_from_several_threads() -> None:
    e = engine()

    def feed() -> None:
        for i in range(2000):
            e.add([cls(str(i % 3), str(i % 2), T0 + i * 0.01)])
            e.predicted(LABELS, T0 + i * 0.01, 1)

    t = threading.Thread(target=feed)
    t.start()
    while t.is_alive():
        e.evaluate(T0 + 30)
    t.join()
    w = e.evaluate(T0 + 30).sets[(*LABELS, CLASSIFICATION)]["long"]
    assert w.labels == 1000 and w.predictions == 2000  # max_labels of the long window


def test_predictions_without_labels_show_a_join_rate_of_zero() -> None:
    e = engine()
    e.predicted(LABELS, T0, 8)
    sets = e.evaluate(T0 + 1).sets
    w = sets[(*LABELS, "unlabelled")]["short"]
    assert w.labels == 0 and w.predictions == 8 and w.scores == {"join_rate": 0.0}
    assert "stable" not in e.summary()
    e.add([cls("1", "1", T0 + 2, tp=T0)])
    sets = e.evaluate(T0 + 3).sets
    assert (*LABELS, "unlabelled") not in sets
    assert sets[(*LABELS, CLASSIFICATION)]["short"].scores["join_rate"] == 1 / 8
