"""Drift statistics: pure functions over counts and values, never NaN or infinity."""

from __future__ import annotations

import math
from collections.abc import Sequence

#: proportions are clamped to at least this before PSI takes logarithms (empty bins); the fleet
#: recording rule clamps the same way, so both give the same figure from the same counts
PSI_EPSILON = 1e-4


def _proportions(values: Sequence[float]) -> list[float]:
    total = float(sum(values))
    if total <= 0:
        return [0.0] * len(values)
    return [v / total for v in values]


def psi(reference: Sequence[float], live: Sequence[float]) -> float:
    """Population stability index: sum over bins of ``(a - e) * ln(a / e)``.

    ``reference`` and ``live`` are counts or proportions over the same bins (each is normalised);
    every proportion is clamped to at least :data:`PSI_EPSILON`.
    """
    if len(reference) != len(live):
        raise ValueError(f"psi: {len(reference)} reference bins but {len(live)} live bins")
    total = 0.0
    for e, a in zip(_proportions(reference), _proportions(live), strict=True):
        e = max(e, PSI_EPSILON)
        a = max(a, PSI_EPSILON)
        total += (a - e) * math.log(a / e)
    return total
