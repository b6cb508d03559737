"""What one instance of a response predicted: a value (a class or a number) and, where the model
gave them, class scores.

The side path's extractor turns a response into one flat dict per instance (docs/drift.md): a scalar
output is ``{"prediction": 1}``, a vector ``{"prediction[0]": 0.1, "prediction[1]": 0.9}``, an object
its keys (``{"label": "cat", "probabilities[0]": ...}``), Open Inference Protocol tensors their names
(``{"predict": 2, "predict_proba[0]": ...}``). :func:`instance` reads such a dict:

- **scores**: a vector of at least two numbers in [0, 1] (the one whose name holds ``prob`` or
  ``score`` when there are several; else the only one); its classes are the positions ``0``, ``1``
  ... Without a vector, an object of at least two numbers in [0, 1] that sum to 1 (a class ->
  probability mapping: ``{"cat": 0.9, "dog": 0.1}``) gives the scores, its keys the classes.
- **value**: the scalar named ``prediction``, ``predict``, ``label``, ``class``, ``output`` (or one of
  the other names in ``PREFERRED``), else the only scalar left; without one, the class with the
  highest score; without scores, the first element of a vector.

Classes are compared by their text (:func:`class_key`): a string as it is, a whole number in its
decimal form (``1``, ``1.0`` and ``"1"`` are one class), ``true``/``false``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

#: scalar names that hold the prediction, in order of preference
PREFERRED = (
    "prediction",
    "predictions",
    "predict",
    "predicted",
    "label",
    "labels",
    "predicted_label",
    "output_label",
    "class",
    "classes",
    "class_id",
    "class_ids",
    "output",
    "outputs",
    "value",
    "y",
)
MAX_CLASS_CHARS = 256



class Instance(NamedTuple):
    """One instance's prediction: the value as the model returned it (None when only scores came),
    the class scores and their classes (both None without scores)."""

    value: Any
    scores: tuple[float, ...] | None
    classes: tuple[str, ...] | None


_INDEX_CLASSES: dict[int, tuple[str, ...]] = {}


def index_classes(n: int) -> tuple[str, ...]:
    """``("0", "1", ... "n-1")``, shared between instances."""
    classes = _INDEX_CLASSES.get(n)
    if classes is None:
        classes = tuple(str(i) for i in range(n))
        if n <= 4096:
            _INDEX_CLASSES[n] = classes
    return classes


def class_key(value: Any) -> str | None:
    """The text a class is known by, or None for what cannot be a class (None, lists, objects, NaN)."""
    kind = type(value)
    if kind is str:
        text: str = value
        return text if len(text) <= MAX_CLASS_CHARS else text[:MAX_CLASS_CHARS]
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return str(value)
    if kind is float:
        if not math.isfinite(value):
            return None
        if value.is_integer() and abs(value) < 2**53:
            return str(int(value))
        return repr(value)
    return None


def number(value: Any) -> float | None:
    """A finite number (not a boolean) as a float, else None."""
    kind = type(value)
    if kind is int:
        return float(value)
    if kind is float and math.isfinite(value):
        return float(value)
    return None


def _probabilities(values: list[Any]) -> tuple[float, ...] | None:
    """The values as probabilities (numbers in [0, 1], booleans not), or None."""
    for v in values:
        kind = type(v)
        if not ((kind is float or kind is int) and 0 <= v <= 1):
            return None
    return tuple(map(float, values))


_PREFERRED = frozenset(PREFERRED)


def instance(row: dict[str, Any]) -> Instance | None:
    """The prediction in one extracted row, or None when it holds none that can be scored."""
    scalars: dict[str, Any] = {}
    vectors: dict[str, list[Any]] | None = None
    for name, item in row.items():
        if name[-1:] == "]":
            base, sep, index = name[:-1].rpartition("[")
            if sep and index.isdigit():
                if vectors is None:
                    vectors = {}
                items = vectors.get(base)
                if items is None:
                    items = vectors[base] = []
                if int(index) == len(items):  # the extractor writes a vector in order
                    items.append(item)
                continue
        scalars[name] = item
    scores: tuple[float, ...] | None = None
    classes: tuple[str, ...] | None = None
    first: Any = None
    if vectors is not None:
        names = list(vectors)
        if len(names) > 1:
            names = [n for n in names if "prob" in n.lower() or "score" in n.lower()] or names
        for name in names:
            values = vectors[name]
            if first is None and values:
                first = values[0]
            if len(values) >= 2:
                scores = _probabilities(values)
                if scores is not None:
                    classes = index_classes(len(scores))
                    break
    value: Any = None
    if scalars:
        if len(scalars) == 1:
            value = next(iter(scalars.values()))
            if scores is None and class_key(value) is None:
                value = None
        else:
            preferred = next((n for n in PREFERRED if n in scalars), None) if _PREFERRED & scalars.keys() else None
            if preferred is not None:
                value = scalars[preferred]
            else:
                if scores is None:
                    probs = _probabilities(list(scalars.values()))
                    if probs is not None and abs(sum(probs) - 1.0) <= 1e-6:
                        keys = tuple(class_key(k) or k for k in scalars)
                        return Instance(None, probs, keys)  # class -> probability
                value = next((v for v in scalars.values() if class_key(v) is not None), None)
    if value is not None and class_key(value) is None:
        value = None
    if value is None and scores is None:
        if first is not None and class_key(first) is not None:
            return Instance(first, None, None)
        return None
    return Instance(value, scores, classes)


def caller_instance(prediction: Any, scores: list[float] | dict[str, float] | None) -> Instance:
    """A prediction the feedback caller sent (already validated): its value and optional scores."""
    if scores is None:
        return Instance(prediction, None, None)
    if isinstance(scores, dict):
        keys = tuple(class_key(k) or k for k in scores)
        return Instance(prediction, tuple(float(v) for v in scores.values()), keys)
    return Instance(prediction, tuple(float(v) for v in scores), index_classes(len(scores)))


def predicted_class(inst: Instance) -> str | None:
    """The class an instance predicted: its value, else the class with the highest score."""
    if inst.value is not None:
        key = class_key(inst.value)
        if key is not None:
            return key
    if inst.scores is not None and inst.classes is not None and len(inst.classes) == len(inst.scores):
        best = max(range(len(inst.scores)), key=inst.scores.__getitem__)  # the first of equal highest
        return inst.classes[best]
    return None


def without_many_scores(inst: Instance | None, max_classes: int) -> Instance | None:
    """The instance without its scores when they have more than ``max_classes`` classes (no AUC or
    log loss is computed from them, and they cost 32 bytes a class): its value, or the class with
    the highest score, stays."""
    if inst is None or inst.scores is None or len(inst.scores) <= max_classes:
        return inst
    return Instance(inst.value if inst.value is not None else predicted_class(inst), None, None)


def predicted_number(inst: Instance) -> float | None:
    """The number an instance predicted (regression), or None."""
    return number(inst.value)


def usable(inst: Instance, task: str) -> bool:
    """Can this prediction be scored against a label (``classification``) or a value (``regression``)?"""
    if task == "regression":
        return predicted_number(inst) is not None
    return predicted_class(inst) is not None


def _flat(obj: dict[str, Any]) -> dict[str, Any]:
    """An object prediction as the extractor flattens it: scalars by key, lists of scalars as key[i]."""
    row: dict[str, Any] = {}
    for key, value in obj.items():
        if type(value) is list:
            for i, item in enumerate(value):
                if type(item) not in (list, dict):
                    row[f"{key}[{i}]"] = item
        elif type(value) is not dict:
            row[key] = value
    return row


def kserve_instances(doc: Any, limit: int) -> list[Instance | None] | None:
    """The instances of a KServe v1 / TF Serving ``{"predictions": [...]}`` response, read directly
    (the common case, without the extractor's general machinery); None for any other shape."""
    if type(doc) is not dict:
        return None
    predictions = doc.get("predictions")
    if type(predictions) is not list:
        return None
    out: list[Instance | None] = []
    for p in predictions[:limit]:
        kind = type(p)
        if kind is list:
            scores = _probabilities(p) if len(p) >= 2 else None
            if scores is not None:
                out.append(Instance(None, scores, index_classes(len(scores))))
            elif p and class_key(p[0]) is not None:
                out.append(Instance(p[0], None, None))
            else:
                out.append(None)
        elif kind is dict:
            out.append(instance(_flat(p)))
        else:
            out.append(Instance(p, None, None) if class_key(p) is not None else None)
    return out
