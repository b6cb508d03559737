"""Reading and checking POST /feedback bodies, and joining them."""

from __future__ import annotations

import pytest

from proxy.quality.feedback import BadFeedback, apply, parse_body, validate
from proxy.quality.predictions import Instance
from proxy.quality.scores import ScoresEngine
from proxy.quality.store import FeedbackStore
from proxy.settings import Quality


def test_one_object_an_array_or_json_lines() -> None:
    assert parse_body(b'{"request_id": "a", "label": 1}', "application/json") == (
        [{"request_id": "a", "label": 1}],
        None,
    )
    assert parse_body(b'[{"request_id": "a", "label": 1}]', "")[0] == [{"request_id": "a", "label": 1}]
    lines = b'{"request_id": "a", "label": 1}\n\n{"request_id": "b", "value": 2.5}\n'
    assert parse_body(lines, "application/x-ndjson") == (
        [{"request_id": "a", "label": 1}, {"request_id": "b", "value": 2.5}],
        [1, 3],
    )
    assert parse_body(lines, "application/json")[1] == [1, 3]  # found without the content type


def test_errors_in_json_lines_name_the_line() -> None:
    raw, lines = parse_body(b'{"request_id": "a", "label": 1}\n{"label": 1}\n', "application/jsonl")
    with pytest.raises(BadFeedback) as err:
        validate(raw, lines)
    assert err.value.as_dict() == {"error": err.value.message, "index": 1, "key": "request_id", "line": 2}


def test_the_caller_may_send_the_prediction_and_its_scores() -> None:
    (item,) = validate(
        [{"request_id": "x", "label": "b", "scores": {"a": 0.25, "b": 0.75}, "model": "m", "variant": "canary"}]
    )
    assert item.supplied == Instance(None, (0.25, 0.75), ("a", "b"))
    assert item.labels == ("m", "unknown", "canary")
    with pytest.raises(BadFeedback, match="go with label"):
        validate([{"request_id": "x", "value": 1.0, "scores": [0.5, 0.5]}])


def test_apply_counts_outcomes_and_scores_what_joined() -> None:
    store = FeedbackStore(10, 60.0, 10, ("d", "d", "stable"))
    engine = ScoresEngine(Quality.model_validate({"min_labels": 1}))
    import time

    store.put("a", time.time(), ("m", "v", "stable"), [Instance(1, (0.2, 0.8), ("0", "1")), None])
    items = validate(
        [
            {"request_id": "a", "label": 1},
            {"request_id": "a", "label": 0},
            {"request_id": "a", "label": 0, "instance": 1},  # that instance had no prediction
            {"request_id": "b", "value": 3.0, "prediction": 2.0},
            {"request_id": "c", "label": 1},
        ]
    )
    answer = apply(items, store, engine)
    assert answer == {
        "items": 5,
        "outcomes": {"joined": 1, "supplied": 1, "unknown": 1, "duplicate": 1, "late": 0, "no_prediction": 1},
    }
    snap = engine.evaluate()
    assert snap.sets[("m", "v", "stable", "classification")]["1h"].scores["accuracy"] == 1.0
    assert snap.sets[("d", "d", "stable", "regression")]["1h"].scores["mae"] == 1.0


def test_a_callers_scores_of_more_than_max_classes_are_not_kept() -> None:
    store = FeedbackStore(10, 60.0, 10, ("d", "d", "stable"))
    engine = ScoresEngine(Quality.model_validate({"min_labels": 1, "max_classes": 3}))
    items = validate([{"request_id": "x", "label": 9, "scores": [0.1] * 9 + [0.1 + 1e-9]}])
    assert apply(items, store, engine)["outcomes"]["supplied"] == 1
    (record,) = engine._sets[("d", "d", "stable")].tasks["classification"].records
    assert record.predicted == "9" and record.scores is None  # the best class, without its 10 scores
