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
import re
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

_VECTOR = re.compile(r"^(.*)\[(\d+)\]$")


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
    out: list[float] = []
    for v in values:
        x = number(v)
        if x is None or not 0.0 <= x <= 1.0:
            return None
        out.append(x)
    return tuple(out)


def instance(row: dict[str, Any]) -> Instance | None:
    """The prediction in one extracted row, or None when it holds none that can be scored."""
    scalars: dict[str, Any] = {}
    vectors: dict[str, dict[int, Any]] = {}
    for key, value in row.items():
        m = _VECTOR.match(key) if key.endswith("]") else None
        if m is not None:
            vectors.setdefault(m.group(1), {})[int(m.group(2))] = value
        else:
            scalars[key] = value
    scores: tuple[float, ...] | None = None
    classes: tuple[str, ...] | None = None
    first: Any = None
    if vectors:
        names = list(vectors)
        chosen = [n for n in names if "prob" in n.lower() or "score" in n.lower()] or names
        for name in chosen:
            items = vectors[name]
            values = [items.get(i) for i in range(len(items))]
            if first is None and values:
                first = values[0]
            if len(values) >= 2 and None not in values:
                scores = _probabilities(values)
                if scores is not None:
                    classes = index_classes(len(scores))
                    break
    value_key = next((name for name in PREFERRED if name in scalars), None)
    if scores is None and value_key is None and len(scalars) >= 2:
        probs = _probabilities(list(scalars.values()))
        if probs is not None and abs(sum(probs) - 1.0) <= 1e-6:
            scores = probs
            keys = [class_key(k) for k in scalars]
            classes = tuple(k for k in keys if k is not None)
            scalars = {}
    if value_key is None:
        rest = [v for v in scalars.values() if class_key(v) is not None]
        value_key_value = rest[0] if len(rest) >= 1 else None
    else:
        value_key_value = scalars[value_key]
    value = value_key_value
    if value is None or class_key(value) is None:
        value = None
    if value is None and scores is None:
        if first is not None and class_key(first) is not None:
            value = first
        else:
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


def predicted_number(inst: Instance) -> float | None:
    """The number an instance predicted (regression), or None."""
    return number(inst.value)


def usable(inst: Instance, task: str) -> bool:
    """Can this prediction be scored against a label (``classification``) or a value (``regression``)?"""
    if task == "regression":
        return predicted_number(inst) is not None
    return predicted_class(inst) is not None
