"""Rolling model-quality scores per model, version and variant (a *label set*), off the request path.

Labelled predictions (:class:`Labelled`: what the feedback store joined) are appended per label set
and task (classification or regression) in the order their labels came. Each configured window
(``quality.windows``: a name, seconds, a maximum count) is the newest run of them: labels that came in
the last ``seconds``, at most ``max_labels``. Every ``quality.interval`` seconds :meth:`ScoresEngine.evaluate`
(a worker thread) recomputes each window whose content changed and publishes one immutable
:class:`Snapshot`; scrapes, ``GET /quality``, the MLflow export and :meth:`ScoresEngine.summary` only
read the snapshot, so none of them ever computes on the event loop.

Per window: the number of labels; for classification accuracy, precision, recall and F1 per class and
macro, ROC AUC and log loss from the scores (where the model gave them), and the confusion matrix;
for regression MAE, RMSE, MAPE and R^2; the label delay; the join rate (predictions made in the last
``seconds`` that got a label, counted in buckets of ``BUCKET`` seconds). A score that cannot be computed
is absent, with its reason, never a number made up: fewer labels than ``quality.min_labels``, one class
only for AUC, more classes than ``quality.max_classes`` (then only accuracy is given).

Bounded: ``quality.max_label_sets`` label sets (more are counted and skipped), the longest window's
``max_labels`` labels per label set and task, ``max_classes`` classes per window for everything but
accuracy.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.quality import metrics as m
from proxy.quality.store import Labels
from proxy.settings import Quality

CLASSIFICATION = "classification"
REGRESSION = "regression"
#: the task of a label set that made predictions but got no label yet (its join rate is 0)
UNLABELLED = "unlabelled"
#: seconds per join-rate bucket (at most; shorter for windows under an hour)
BUCKET = 60.0
#: infermon_feedback_delay_seconds buckets: a second to a week
DELAY_BUCKETS = (
    1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 12 * 3600.0, 86_400.0, 3 * 86_400.0, 7 * 86_400.0,
)  # fmt: skip
#: what summary() reports per task
SUMMARY_METRIC = {CLASSIFICATION: "accuracy", REGRESSION: "mae"}


class Labelled(NamedTuple):
    """One label joined with its prediction."""

    labels: Labels
    task: str  # CLASSIFICATION or REGRESSION
    truth: Any  # the class (its text) or the number
    predicted: Any  # the predicted class (its text) or number
    t_label: float  # time.time() when the label came
    t_prediction: float = 0.0  # when the prediction was made; 0: unknown (the caller sent it)
    scores: tuple[float, ...] | None = None
    classes: tuple[str, ...] | None = None


class _Task:
    """The labels of one task of one label set, oldest first."""

    __slots__ = ("changed", "oldest", "records")

    def __init__(self, maxlen: int) -> None:
        self.records: deque[Labelled] = deque(maxlen=maxlen)
        self.changed = True  # a label came since the last evaluation
        #: per window, the label time of the oldest label its last evaluation saw: when that falls
        #: out of the window's seconds the window changed, though no label came
        self.oldest: dict[str, float] = {}


class _Set:
    __slots__ = ("buckets", "delay", "tasks")

    def __init__(self) -> None:
        self.tasks: dict[str, _Task] = {}
        #: join-rate buckets: bucket index -> [predictions, of which labelled]
        self.buckets: dict[int, list[int]] = {}
        #: delay histogram: counts per DELAY_BUCKETS (+Inf last), then the sum
        self.delay = [0.0] * (len(DELAY_BUCKETS) + 2)


@dataclass(frozen=True, slots=True)
class WindowScores:
    """The figures of one window of one label set and task."""

    window: str
    labels: int  # labels in the window
    predictions: int | None  # predictions made in the window's seconds (None: not tracked)
    labelled_predictions: int | None
    scores: dict[str, float]  # metric -> value (only those that could be computed)
    missing: dict[str, str]  # metric -> why it is absent
    classes: dict[str, dict[str, float]] = field(default_factory=dict)  # class -> metric -> value
    confusion: tuple[list[str], list[list[int]]] | None = None
    delay: dict[str, Any] = field(default_factory=dict)
    scored: int = 0  # labels whose prediction came with scores (AUC, log loss)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "labels": self.labels,
            "predictions": self.predictions,
            "labelled_predictions": self.labelled_predictions,
            "scores": self.scores,
            "missing": self.missing,
        }
        if self.classes:
            out["classes"] = self.classes
        if self.confusion is not None:
            out["confusion"] = {"classes": self.confusion[0], "matrix": self.confusion[1]}
        if self.scored:
            out["scored"] = self.scored
        out["delay_seconds"] = self.delay
        return out


@dataclass(frozen=True, slots=True)
class Snapshot:
    at: float  # time.time() of the evaluation; 0: none yet
    #: (model, version, variant, task) -> window name -> figures
    sets: dict[tuple[str, str, str, str], dict[str, WindowScores]]
    #: (model, version, variant) -> delay histogram counts (+Inf last) then the sum
    delays: dict[Labels, list[float]]


EMPTY = Snapshot(0.0, {}, {})


class ScoresEngine:
    def __init__(self, cfg: Quality, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.clock = clock
        self.windows = [(name, w.seconds, w.max_labels) for name, w in cfg.windows.items()]
        self.longest = max(s for _, s, _ in self.windows)
        self.maxlen = max(n for _, _, n in self.windows)
        shortest = min(s for _, s, _ in self.windows)
        self.bucket = max(1.0, min(BUCKET, shortest / 60.0))
        self._lock = threading.Lock()
        self._evaluating = threading.Lock()
        self._sets: dict[Labels, _Set] = {}
        self.snapshot = EMPTY
        self.dropped_sets = 0  # labels and predictions of label sets over quality.max_label_sets
        self.evaluations = 0
        self.eval_seconds = 0.0

    # -- input (the side path and the feedback handler) --------------------------------------------

    def _set(self, labels: Labels) -> _Set | None:
        s = self._sets.get(labels)
        if s is None:
            if len(self._sets) >= self.cfg.max_label_sets:
                self.dropped_sets += 1
                return None
            s = self._sets[labels] = _Set()
        return s

    def predicted(self, labels: Labels, t: float, n: int) -> None:
        """``n`` instances were predicted at ``t`` (for the join rate)."""
        with self._lock:
            s = self._set(labels)
            if s is None:
                return
            b = int(t // self.bucket)
            counts = s.buckets.get(b)
            if counts is None:
                counts = s.buckets[b] = [0, 0]
                self._prune(s, t)
            counts[0] += n

    def _prune(self, s: _Set, now: float) -> None:
        oldest = int((now - self.longest) // self.bucket) - 1
        for b in [b for b in s.buckets if b < oldest]:
            del s.buckets[b]

    def add(self, records: Iterable[Labelled]) -> None:
        with self._lock:
            for r in records:
                s = self._set(r.labels)
                if s is None:
                    continue
                task = s.tasks.get(r.task)
                if task is None:
                    task = s.tasks[r.task] = _Task(self.maxlen)
                task.records.append(r)
                task.changed = True
                if r.t_prediction > 0.0:
                    counts = s.buckets.get(int(r.t_prediction // self.bucket))
                    if counts is not None:
                        counts[1] += 1
                    delay = max(0.0, r.t_label - r.t_prediction)
                    hist = s.delay
                    i = 0
                    while i < len(DELAY_BUCKETS) and delay > DELAY_BUCKETS[i]:
                        i += 1
                    hist[i] += 1
                    hist[-1] += delay

    # -- evaluation (a worker thread) --------------------------------------------------------------

    def evaluate(self, now: float | None = None) -> Snapshot:
        """Recompute what changed and publish a new snapshot (one evaluation at a time)."""
        with self._evaluating:
            return self._evaluate(now)

    def _evaluate(self, now: float | None) -> Snapshot:
        started = time.perf_counter()
        now = self.clock() if now is None else now
        work: list[tuple[Labels, str, _Task, list[Labelled], dict[str, tuple[int, int]]]] = []
        delays: dict[Labels, list[float]] = {}
        waiting: dict[Labels, dict[str, tuple[int, int]]] = {}  # predictions, no label yet
        with self._lock:
            for labels, s in self._sets.items():
                self._prune(s, now)
                delays[labels] = list(s.delay)
                joins = self._joins(s, now)
                if not s.tasks:
                    waiting[labels] = joins
                for task_name, task in s.tasks.items():
                    records = task.records
                    cutoff = now - self.longest
                    while records and records[0].t_label < cutoff:
                        records.popleft()  # in no window any more
                    expired = any(task.oldest.get(name, math.inf) < now - sec for name, sec, _ in self.windows)
                    if task.changed or expired:
                        work.append((labels, task_name, task, list(records), joins))
                        task.changed = False
        previous = self.snapshot.sets
        sets = dict(previous)
        fresh = {(*labels, task_name) for labels, task_name, _, _, _ in work}
        for labels, task_name, task, kept, joins in work:
            windows: dict[str, WindowScores] = {}
            for name, seconds, limit in self.windows:
                first = self._slice_start(kept, now, seconds, limit)
                task.oldest[name] = kept[first].t_label if first < len(kept) else math.inf
                windows[name] = self._window(task_name, name, kept[first:], joins.get(name))
            sets[(*labels, task_name)] = windows
        for labels, joins in waiting.items():
            key = (*labels, UNLABELLED)
            fresh.add(key)
            sets[key] = {name: self._window(UNLABELLED, name, [], joins.get(name)) for name, _, _ in self.windows}
        # join rates move with time even where no label came: refreshed for every label set
        for key, old in list(sets.items()):
            if key in fresh:
                continue
            one = self._sets.get((key[0], key[1], key[2]))
            if one is None or (key[3] == UNLABELLED and one.tasks):
                del sets[key]
                continue
            with self._lock:
                joins = self._joins(one, now)
            sets[key] = {name: _with_joins(ws, joins.get(name)) for name, ws in old.items()}
        snap = Snapshot(now, sets, delays)
        self.snapshot = snap
        self.evaluations += 1
        self.eval_seconds += time.perf_counter() - started
        return snap

    def _joins(self, s: _Set, now: float) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        for name, seconds, _ in self.windows:
            first = int((now - seconds) // self.bucket)
            made = joined = 0
            for b, (p, j) in s.buckets.items():
                if b >= first:
                    made += p
                    joined += j
            out[name] = (made, joined)
        return out

    @staticmethod
    def _slice_start(records: deque[Labelled] | list[Labelled], now: float, seconds: float, limit: int) -> int:
        """Where a window begins in the labels: the newest ``limit`` of those that came in ``seconds``."""
        cutoff = now - seconds
        start = len(records)
        stop = max(0, len(records) - limit)
        while start > stop and records[start - 1].t_label >= cutoff:
            start -= 1
        return start

    def _window(self, task: str, name: str, records: list[Labelled], joins: tuple[int, int] | None) -> WindowScores:
        made, joined = joins if joins is not None else (0, 0)
        scores: dict[str, float] = {}
        missing: dict[str, str] = {}
        if made:
            scores["join_rate"] = joined / made
        else:
            missing["join_rate"] = "no prediction was made in the window"
        waits = np.array([r.t_label - r.t_prediction for r in records if r.t_prediction > 0.0], dtype=np.float64)
        delay = m.delays(np.maximum(waits, 0.0))
        n = len(records)
        base: dict[str, Any] = {
            "window": name,
            "labels": n,
            "predictions": made,
            "labelled_predictions": joined,
            "delay": delay,
        }
        if task == UNLABELLED:
            return WindowScores(scores=scores, missing=missing, **base)
        if n < self.cfg.min_labels:
            reason = f"{n} labels in the window, fewer than quality.min_labels ({self.cfg.min_labels})"
            names = _CLASSIFICATION_SCORES if task == CLASSIFICATION else _REGRESSION_SCORES
            missing.update(dict.fromkeys(names, reason))
            return WindowScores(scores=scores, missing=missing, **base)
        if task == REGRESSION:
            truth = np.array([r.truth for r in records], dtype=np.float64)
            predicted = np.array([r.predicted for r in records], dtype=np.float64)
            figures, why = m.regression(truth, predicted)
            scores.update(figures)
            missing.update(why)
            return WindowScores(scores=scores, missing=missing, **base)
        return self._classification(records, scores, missing, base)

    def _classification(
        self, records: list[Labelled], scores: dict[str, float], missing: dict[str, str], base: dict[str, Any]
    ) -> WindowScores:
        truth_text = [r.truth for r in records]
        predicted_text = [r.predicted for r in records]
        scores["accuracy"] = float(np.mean([t == p for t, p in zip(truth_text, predicted_text, strict=True)]))
        classes = m.class_order(set(truth_text) | set(predicted_text))
        k = len(classes)
        limit = self.cfg.max_classes
        if k > limit:
            reason = f"{k} classes in the window, more than quality.max_classes ({limit}): only accuracy is given"
            missing.update(dict.fromkeys(_CLASSIFICATION_SCORES[1:], reason))
            return WindowScores(scores=scores, missing=missing, **base)
        index = {c: i for i, c in enumerate(classes)}
        truth = np.array([index[t] for t in truth_text], dtype=np.int64)
        predicted = np.array([index[p] for p in predicted_text], dtype=np.int64)
        matrix = m.confusion(truth, predicted, k)
        each = m.per_class(matrix)
        for metric in ("precision", "recall", "f1"):
            scores[f"{metric}_macro"] = float(np.mean(each[metric]))
        per_class: dict[str, dict[str, float]] = {
            c: {metric: float(each[metric][i]) for metric in ("precision", "recall", "f1", "support")}
            for i, c in enumerate(classes)
        }
        scored = self._scores(records, scores, missing, per_class)
        return WindowScores(
            scores=scores,
            missing=missing,
            classes=per_class,
            confusion=(classes, matrix.tolist()),
            scored=scored,
            **base,
        )

    def _scores(
        self,
        records: list[Labelled],
        scores: dict[str, float],
        missing: dict[str, str],
        per_class: dict[str, dict[str, float]],
    ) -> int:
        """ROC AUC and log loss from the labels whose prediction had scores (of the newest one's classes)."""
        with_scores = [r for r in records if r.scores is not None and r.classes is not None]
        if not with_scores:
            for metric in ("roc_auc", "log_loss"):
                missing[metric] = (
                    "no prediction in the window came with class scores (probabilities); scores of more classes "
                    f"than quality.max_classes ({self.cfg.max_classes}) are not kept"
                )
            return 0
        reference = with_scores[-1].classes
        assert reference is not None
        same = [r for r in with_scores if r.classes == reference]
        if len(same) < self.cfg.min_labels:
            reason = (
                f"{len(same)} labels with scores of the classes {list(reference)}, fewer than quality.min_labels "
                f"({self.cfg.min_labels})"
            )
            missing["roc_auc"] = missing["log_loss"] = reason
            return len(same)
        if len(reference) > self.cfg.max_classes:
            reason = f"{len(reference)} score classes, more than quality.max_classes ({self.cfg.max_classes})"
            missing["roc_auc"] = missing["log_loss"] = reason
            return len(same)
        order = m.class_order(reference)
        position = {c: i for i, c in enumerate(order)}
        columns = [reference.index(c) for c in order]
        outside = sorted({r.truth for r in same if r.truth not in position})
        if outside:
            reason = (
                f"the label {outside[0]!r} is not a class of the scores ({', '.join(order)}): for a vector of "
                "scores the classes are its positions 0, 1, ..."
            )
            missing["roc_auc"] = missing["log_loss"] = reason
            return len(same)
        truth = np.array([position[r.truth] for r in same], dtype=np.int64)
        matrix = np.array([r.scores for r in same], dtype=np.float64)[:, columns]
        value, each, why = m.auc(truth, matrix, order)
        if value is None:
            missing["roc_auc"] = why
        else:
            scores["roc_auc"] = value
            for c, v in each.items():
                if c in per_class:
                    per_class[c]["roc_auc"] = v
        loss, why = m.log_loss(truth, matrix)
        if loss is None:
            missing["log_loss"] = why
        else:
            scores["log_loss"] = loss
        return len(same)

    # -- readers (any thread) ----------------------------------------------------------------------

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per variant, over the first window: accuracy (classification) or MAE (regression).

        ``{variant: {"model", "version", "task", "metric", "value" (None when it cannot be
        computed), "labels", "window", "reason" (when value is None)}}``; where one variant has
        several label sets, the one with the most labels in the window. Reads the last snapshot only.
        """
        first = self.windows[0][0]
        out: dict[str, dict[str, Any]] = {}
        for (model, version, variant, task), windows in self.snapshot.sets.items():
            ws = windows.get(first)
            if ws is None or task not in SUMMARY_METRIC:
                continue
            if variant in out and out[variant]["labels"] >= ws.labels:
                continue
            metric = SUMMARY_METRIC[task]
            entry: dict[str, Any] = {
                "model": model,
                "version": version,
                "task": task,
                "metric": metric,
                "value": ws.scores.get(metric),
                "labels": ws.labels,
                "window": first,
            }
            if metric not in ws.scores:
                entry["reason"] = ws.missing.get(metric, "not computed")
            out[variant] = entry
        return out

    def report(self) -> dict[str, Any]:
        snap = self.snapshot
        sets = []
        for (model, version, variant, task), windows in sorted(snap.sets.items()):
            sets.append(
                {
                    "model": model,
                    "version": version,
                    "variant": variant,
                    "task": task,
                    "windows": {name: ws.as_dict() for name, ws in windows.items()},
                }
            )
        return {
            "evaluated_at": snap.at or None,
            "windows": {name: {"seconds": s, "max_labels": n} for name, s, n in self.windows},
            "min_labels": self.cfg.min_labels,
            "max_classes": self.cfg.max_classes,
            "label_sets": sets,
            "label_sets_dropped": self.dropped_sets,
        }

    def collector(self) -> Collector:
        return ScoresCollector(self)


_CLASSIFICATION_SCORES = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "roc_auc", "log_loss")
_REGRESSION_SCORES = ("mae", "rmse", "mape", "r2")


def _with_joins(ws: WindowScores, joins: tuple[int, int] | None) -> WindowScores:
    made, joined = joins if joins is not None else (0, 0)
    scores = dict(ws.scores)
    missing = dict(ws.missing)
    if made:
        scores["join_rate"] = joined / made
        missing.pop("join_rate", None)
    else:
        scores.pop("join_rate", None)
        missing["join_rate"] = "no prediction was made in the window"
    return WindowScores(
        window=ws.window,
        labels=ws.labels,
        predictions=made,
        labelled_predictions=joined,
        scores=scores,
        missing=missing,
        classes=ws.classes,
        confusion=ws.confusion,
        delay=ws.delay,
        scored=ws.scored,
    )


class ScoresCollector(Collector):
    """``infermon_model_score`` and friends, from the last snapshot (no computing at scrape time)."""

    def __init__(self, engine: ScoresEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self.engine
        snap = engine.snapshot
        names = ("model", "version", "variant", "window")
        score = GaugeMetricFamily(
            "infermon_model_score",
            "Model quality over a rolling window of labels (POST /feedback): accuracy, precision_macro, "
            "recall_macro, f1_macro, roc_auc, log_loss (classification), mae, rmse, mape, r2 (regression), "
            "join_rate. Absent where it cannot be computed (GET /quality says why).",
            labels=("metric", *names),
        )
        per_class = GaugeMetricFamily(
            "infermon_model_class_score",
            "Per-class precision, recall, f1, roc_auc (one-vs-rest) and support over a rolling window.",
            labels=("metric", "class", *names),
        )
        confusion = GaugeMetricFamily(
            "infermon_model_confusion",
            "Confusion-matrix counts over a rolling window: labels of class `actual` predicted as `predicted`.",
            labels=("actual", "predicted", *names),
        )
        labels = GaugeMetricFamily(
            "infermon_model_score_labels", "Labels in the rolling window the scores come from.", labels=names
        )
        predictions = GaugeMetricFamily(
            "infermon_model_score_predictions",
            "Predictions made in the window's seconds (the join rate's denominator).",
            labels=names,
        )
        for (model, version, variant, _task), windows in snap.sets.items():
            for window, ws in windows.items():
                key = (model, version, variant, window)
                labels.add_metric(key, ws.labels)
                if ws.predictions is not None:
                    predictions.add_metric(key, ws.predictions)
                for metric, value in ws.scores.items():
                    if math.isfinite(value):
                        score.add_metric((metric, *key), value)
                for cls, figures in ws.classes.items():
                    for metric, value in figures.items():
                        per_class.add_metric((metric, cls, *key), value)
                if ws.confusion is not None:
                    classes, matrix = ws.confusion
                    for i, actual in enumerate(classes):
                        for j, predicted in enumerate(classes):
                            confusion.add_metric((actual, predicted, *key), matrix[i][j])
        yield score
        yield per_class
        yield confusion
        yield labels
        yield predictions
        delay = HistogramMetricFamily(
            "infermon_feedback_delay_seconds",
            "Time from a prediction to its label (POST /feedback), for labels joined with a kept prediction.",
            labels=("model", "version", "variant"),
        )
        for key3, hist in snap.delays.items():
            buckets: list[tuple[str, float]] = []
            acc = 0.0
            for bound, c in zip((*map(str, DELAY_BUCKETS), "+Inf"), hist[:-1], strict=True):
                acc += c
                buckets.append((bound, acc))
            delay.add_metric(list(key3), buckets, hist[-1])
        yield delay
        yield CounterMetricFamily(
            "infermon_quality_label_sets_dropped",
            "Labels and predictions of a (model, version, variant) beyond quality.max_label_sets, not scored.",
            value=engine.dropped_sets,
        )
        yield GaugeMetricFamily(
            "infermon_quality_label_sets", "(model, version, variant) label sets scored.", value=len(engine._sets)
        )
        yield CounterMetricFamily(
            "infermon_quality_evaluation_seconds",
            "Time spent recomputing the scores (off the request path).",
            value=engine.eval_seconds,
        )
