"""Reading one instance's prediction from what the extractor made of real model-server responses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.quality.predictions import Instance, class_key, instance, kserve_instances, predicted_class
from proxy.sampling.extract import Extractor
from proxy.sampling.sample import Sample
from proxy.settings import Sampling

BODIES = Path(__file__).resolve().parent.parent / "sampling" / "bodies"


def predictions(path: str, response: bytes) -> list[dict[str, Any]]:
    """The extractor on a response kept without its request (what feedback keeps)."""
    sample = Sample("r", 0.0, "POST", path, 200, "m", "v", "stable", [], [], b"", response)
    return Extractor(Sampling(), lambda: None).extract(sample, response_only=True).predictions


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        ("/v1/models/iris:predict", "kserve_v1_iris_response.json", [Instance(1, None, None)] * 2),
        (
            "/v1/models/m:predict",
            "kserve_v1_objects_response.json",
            [Instance(None, (0.87, 0.13), ("0", "1")), Instance(None, (0.31, 0.69), ("0", "1"))],
        ),
        ("/v2/models/iris/infer", "oip_v2_iris_nested_response.json", [Instance(0, None, None)]),
        ("/v2/models/m/infer", "mlserver_mlflow_wine_response.json", [Instance(5.576883936610762, None, None)]),
        ("/predict", "tfserving_columnar_response.json", [Instance(1, (0.2, 0.8), ("0", "1"))]),  # by its shape
        ("/v2/models/m/infer", "oip_v2_response.json", [Instance(1.0, None, None)]),  # not scores: the first
    ],
)
def test_instances_from_real_responses(path: str, body: str, expected: list[Instance]) -> None:
    rows = predictions(path, (BODIES / body).read_bytes())
    got = [instance(row) for row in rows]
    assert got[: len(expected)] == expected


def test_a_class_probability_object_gives_scores_and_the_best_class() -> None:
    inst = instance({"setosa": 0.7, "versicolor": 0.2, "virginica": 0.1})
    assert inst == Instance(None, (0.7, 0.2, 0.1), ("setosa", "versicolor", "virginica"))
    assert predicted_class(inst) == "setosa"


def test_a_named_prediction_beside_probabilities() -> None:
    inst = instance({"label": "cat", "probabilities[0]": 0.9, "probabilities[1]": 0.1, "id": 7})
    assert inst == Instance("cat", (0.9, 0.1), ("0", "1"))
    oip = instance({"predict": 2, "predict_proba[0]": 0.1, "predict_proba[1]": 0.2, "predict_proba[2]": 0.7})
    assert oip == Instance(2, (0.1, 0.2, 0.7), ("0", "1", "2"))


def test_nothing_to_score() -> None:
    assert instance({}) is None
    assert instance({"prediction": None}) is None


def test_classes_are_known_by_their_text() -> None:
    assert class_key(1) == class_key(1.0) == class_key("1") == "1"
    assert class_key(True) == "true" and class_key(0.5) == "0.5"
    assert class_key(float("nan")) is None and class_key([1]) is None


@pytest.mark.parametrize(
    "body",
    [
        b'{"predictions": [1, 0, "cat", true, 2.5]}',
        b'{"predictions": [[0.1, 0.9], [0.7, 0.2, 0.1], [3.5, -1.0], [null]]}',
        b'{"predictions": [{"label": "cat", "probabilities": [0.8, 0.2]}, {"setosa": 0.6, "virginica": 0.4}]}',
        (BODIES / "kserve_v1_objects_response.json").read_bytes(),
        (BODIES / "tfserving_half_plus_three_response.json").read_bytes(),
    ],
)
def test_the_direct_kserve_reading_agrees_with_the_extractor(body: bytes) -> None:
    expected = [instance(row) for row in predictions("/v1/models/m:predict", body)]
    assert kserve_instances(orjson.loads(body), 100) == expected
    assert kserve_instances({"outputs": []}, 100) is None
