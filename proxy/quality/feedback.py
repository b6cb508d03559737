"""``POST /feedback``: labels for predictions the proxy kept, validated whole before any is applied.

The body is one JSON object, a JSON array of them, or JSON lines (one object per line: by
Content-Type ``application/x-ndjson`` or ``application/jsonl``, or found when the body is not one
JSON document). Each item::

    {"request_id": "...", "label": "setosa"}           classification (a class: text, number, boolean)
    {"request_id": "...", "value": 151.0}              regression (a number)
    optional: "instance": 2                            which instance of a batched request (default 0)
              "prediction": ..., "scores": [...]|{...}  the prediction, when the caller has it
              "model", "version", "variant"             its label set, for an id the proxy never kept

A bad item makes the whole body a 400 ``{"error", "index", "key"}`` (``line`` too for JSON lines) and
nothing is applied. Otherwise every item is joined (:class:`~proxy.quality.store.FeedbackStore`) and
the answer counts the outcomes: joined, supplied (the caller's own prediction), unknown, duplicate,
late, no_prediction.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.quality.predictions import (
    MAX_CLASS_CHARS,
    Instance,
    caller_instance,
    class_key,
    number,
    predicted_class,
    predicted_number,
    without_many_scores,
)
from proxy.quality.scores import CLASSIFICATION, REGRESSION, Labelled, ScoresEngine
from proxy.quality.store import OUTCOMES, FeedbackStore, Labels, Wanted

KEYS = ("request_id", "label", "value", "instance", "prediction", "scores", "model", "version", "variant")
LINES_TYPES = frozenset(
    {"application/x-ndjson", "application/jsonl", "application/x-jsonlines", "application/jsonlines",
     "application/json-lines", "application/ndjson"}
)  # fmt: skip
MAX_ID = 200
MAX_LABEL_NAME = 128
MAX_SCORES = 4096


class BadFeedback(Exception):
    """What is wrong with a body, and where."""

    def __init__(self, message: str, index: int | None = None, key: str | None = None, line: int | None = None):
        super().__init__(message)
        self.message = message
        self.index = index
        self.key = key
        self.line = line

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.message, "index": self.index, "key": self.key}
        if self.line is not None:
            out["line"] = self.line
        return out


@dataclass(slots=True)
class Item:
    request_id: str
    task: str
    target: Any  # the class text, or the number
    instance: int
    supplied: Instance | None
    labels: Labels | None


def parse_body(body: bytes, content_type: str) -> tuple[list[Any], list[int] | None]:
    """The items of a body, and for JSON lines the line number of each; raises BadFeedback."""
    if not body.strip():
        raise BadFeedback("the body is empty: send a JSON object, a JSON array of them, or JSON lines")
    if content_type.lower() in LINES_TYPES:
        return _lines(body)
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        lines = [line for line in body.splitlines() if line.strip()]
        if len(lines) > 1:
            try:
                first = orjson.loads(lines[0])
            except orjson.JSONDecodeError:
                first = None
            if isinstance(first, dict):
                return _lines(body)
        raise BadFeedback(f"the body is not JSON: {exc}") from None
    if isinstance(doc, dict):
        return [doc], None
    if isinstance(doc, list):
        return doc, None
    raise BadFeedback("the body must be a JSON object, a JSON array of objects, or JSON lines")


def _lines(body: bytes) -> tuple[list[Any], list[int]]:
    items: list[Any] = []
    numbers: list[int] = []
    for n, line in enumerate(body.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(orjson.loads(line))
        except orjson.JSONDecodeError as exc:
            raise BadFeedback(f"line {n} is not JSON: {exc}", index=len(items), line=n) from None
        numbers.append(n)
    return items, numbers


def _text(value: Any, index: int, key: str, limit: int) -> str:
    if type(value) is not str or not value:
        raise BadFeedback(f"{key} must be a non-empty string", index, key)
    if len(value) > limit:
        raise BadFeedback(f"{key} is longer than {limit} characters", index, key)
    return value


def _class(value: Any, index: int, key: str) -> str:
    if type(value) is str and len(value) > MAX_CLASS_CHARS:
        raise BadFeedback(f"{key} is longer than {MAX_CLASS_CHARS} characters", index, key)
    text = class_key(value)
    if text is None:
        raise BadFeedback(f"{key} must be a class: a string, a number or a boolean", index, key)
    return text


def _number(value: Any, index: int, key: str) -> float:
    x = number(value)
    if x is None:
        raise BadFeedback(f"{key} must be a finite number", index, key)
    return x


def _scores(value: Any, index: int) -> list[float] | dict[str, float]:
    if isinstance(value, list):
        values = value
    elif isinstance(value, dict):
        values = list(value.values())
        if not all(type(k) is str and 0 < len(k) <= MAX_CLASS_CHARS for k in value):
            raise BadFeedback("scores: the classes (keys) must be strings", index, "scores")
    else:
        raise BadFeedback("scores must be a list of class scores or an object of class -> score", index, "scores")
    if not 2 <= len(values) <= MAX_SCORES:
        raise BadFeedback(f"scores must hold 2 to {MAX_SCORES} classes", index, "scores")
    out: list[float] = []
    for v in values:
        x = number(v)
        if x is None or not 0.0 <= x <= 1.0:
            raise BadFeedback("scores must be numbers from 0 to 1", index, "scores")
        out.append(x)
    if isinstance(value, dict):
        return dict(zip(value, out, strict=True))
    return out


def validate(raw: list[Any], lines: list[int] | None = None) -> list[Item]:
    """Every item checked; the first bad one raises BadFeedback naming its index and key."""
    items: list[Item] = []
    for i, obj in enumerate(raw):
        try:
            items.append(_item(obj, i))
        except BadFeedback as exc:
            if lines is not None:
                exc.line = lines[i]
            raise
    return items


def _item(obj: Any, i: int) -> Item:
    if not isinstance(obj, dict):
        raise BadFeedback("an item must be a JSON object with request_id and label or value", i)
    for key in obj:
        if key not in KEYS:
            raise BadFeedback(f"unknown key {key!r}; the keys are {', '.join(KEYS)}", i, key)
    if "request_id" not in obj:
        raise BadFeedback("request_id is missing: the x-request-id the proxy answered with", i, "request_id")
    rid = _text(obj["request_id"], i, "request_id", MAX_ID)
    has_label, has_value = "label" in obj, "value" in obj
    if has_label == has_value:
        raise BadFeedback(
            "give exactly one of label (classification) and value (regression)", i, "value" if has_label else "label"
        )
    instance = obj.get("instance", 0)
    if type(instance) is not int or instance < 0:
        raise BadFeedback("instance must be a whole number from 0 (the instance's index in the batch)", i, "instance")
    task = CLASSIFICATION if has_label else REGRESSION
    target: Any = _class(obj["label"], i, "label") if has_label else _number(obj["value"], i, "value")
    supplied: Instance | None = None
    prediction = obj.get("prediction")
    scores = obj.get("scores")
    if scores is not None and task == REGRESSION:
        raise BadFeedback("scores are class scores: they go with label, not value", i, "scores")
    if prediction is not None or scores is not None:
        if prediction is not None:
            if task == CLASSIFICATION:
                _class(prediction, i, "prediction")
            else:
                _number(prediction, i, "prediction")
        supplied = caller_instance(prediction, _scores(scores, i) if scores is not None else None)
    labels: Labels | None = None
    named = [k for k in ("model", "version", "variant") if k in obj]
    if named:
        if supplied is None:
            raise BadFeedback(
                f"{named[0]} names the label set of a prediction you send: send prediction (or scores) too",
                i,
                named[0],
            )
        labels = (
            _text(obj.get("model", "unknown"), i, "model", MAX_LABEL_NAME),
            _text(obj.get("version", "unknown"), i, "version", MAX_LABEL_NAME),
            _text(obj.get("variant", "stable"), i, "variant", MAX_LABEL_NAME),
        )
    return Item(rid, task, target, instance, supplied, labels)


def apply(items: list[Item], store: FeedbackStore, engine: ScoresEngine) -> dict[str, Any]:
    """Join every item and hand the labelled predictions to the scores engine; the outcome counts."""
    most = engine.cfg.max_classes  # a caller's scores of more classes are not kept in the windows either
    found = store.join(
        [
            Wanted(it.request_id, it.instance, it.task, without_many_scores(it.supplied, most), it.labels)
            for it in items
        ]
    )
    now = time.time()
    counts = dict.fromkeys(OUTCOMES, 0)
    records: list[Labelled] = []
    for it, f in zip(items, found, strict=True):
        outcome = f.outcome
        if f.instance is not None and f.labels is not None:
            record = _record(it, f.instance, f.labels, now, f.t_prediction)
            if record is None:
                outcome = "no_prediction"  # a caller's prediction that does not fit its label
                store.recount(f.outcome, outcome)
            else:
                records.append(record)
        counts[outcome] += 1
    engine.add(records)
    return {"items": len(items), "outcomes": counts}


def _record(it: Item, inst: Instance, labels: Labels, now: float, t_prediction: float) -> Labelled | None:
    if it.task == REGRESSION:
        predicted = predicted_number(inst)
        if predicted is None or not math.isfinite(predicted):
            return None
        return Labelled(labels, REGRESSION, it.target, predicted, now, t_prediction)
    cls = predicted_class(inst)
    if cls is None:
        return None
    scores = inst.scores if inst.classes is not None and inst.scores is not None else None
    return Labelled(labels, CLASSIFICATION, it.target, cls, now, t_prediction, scores, inst.classes if scores else None)
