"""Request rate, error rate and latency percentiles over time, per variant: ``GET /timeseries``.

Prometheus keeps history; a proxy on its own (a laptop, a cluster without a monitoring stack, the status
page behind ``kubectl port-forward``) has only its counters. :class:`RequestSeries` turns them into a
short history: every ``status.interval`` seconds a task on the event loop takes the number of request
series and histogram label sets (two ``len`` calls) and copies the few upstream-error counters (one
per variant and failure kind), and a worker thread reads that many entries of
:class:`~proxy.observe.metrics.RequestMetrics`' append-only lists (the same reads a ``/metrics`` scrape
makes there, each list copied in one step), sums them per variant and appends one point to a ring of
``status.history / status.interval`` points (at most :data:`MAX_POINTS`). The request path never sees it.

Each point holds, per variant and for all variants together, what happened since the previous one:

- ``rate``: requests per second (the delta of ``infermon_requests_total`` over the seconds between
  the two readings);
- ``error_rate``: the share of those answered 5xx (the proxy's own 502 / 503 / 504 included) or with a
  status outside 100..599; ``null`` without requests;
- ``upstream_errors``: upstream failures per second (``infermon_upstream_errors_total``, every kind),
  which also counts a failure after the response head went out (the status then stays what it was);
- ``p50``, ``p90``, ``p99``: ``infermon_request_duration_seconds`` quantiles in seconds, from the
  bucket deltas between the readings, interpolated inside a bucket as PromQL's
  ``histogram_quantile`` does; ``null`` without requests.

A counter that went down between two readings was reset (a series that restarted): its new value is
the delta, as PromQL's ``rate`` takes it. Variants beyond :data:`MAX_VARIANTS` are summed under
``other``; the label budgets (``labels.max_values``) bound them before that.

Example::

    series = RequestSeries(app.metrics, interval=2.0, history=600.0)
    series.start()                   # on the event loop
    report = series.report()         # the JSON of GET /timeseries
    await series.aclose()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import operator
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from proxy.observe.metrics import RequestMetrics

log = logging.getLogger("infermon.admin.timeseries")

QUANTILES = (0.5, 0.9, 0.99)
#: series kept apart per reading, ``other`` included: variants beyond are summed under ``other``
MAX_VARIANTS = 32
#: points kept at most, whatever ``status.history / status.interval`` says
MAX_POINTS = 3600
#: the summary covers this many seconds (or the whole history, when it is shorter)
SUMMARY_SECONDS = 60.0
_YIELD_EVERY = 256  # label sets summed between two short pauses that let the event loop have the GIL
_YIELD_S = 0.0001


# -- the arithmetic, pure --------------------------------------------------------------------------


def counter_delta(previous: float, current: float) -> float:
    """What a counter added between two readings; a counter that went down was reset (PromQL's rule)."""
    return current if current < previous else current - previous


def bucket_delta(previous: Sequence[float], current: Sequence[float]) -> list[float]:
    """Per-bucket increase between two readings of one histogram (counts per bucket, not cumulative).
    Any bucket that went down means the histogram was reset: the current counts are the delta."""
    if len(previous) != len(current) or any(c < p for p, c in zip(previous, current, strict=True)):
        return list(current)
    return [c - p for p, c in zip(previous, current, strict=True)]


def histogram_quantile(q: float, bounds: Sequence[float], counts: Sequence[float]) -> float | None:
    """The ``q`` quantile of a histogram given as per-bucket counts (``len(bounds) + 1`` of them, the
    last one ``+Inf``), as PromQL's ``histogram_quantile`` computes it: linear interpolation inside the
    bucket where the rank falls, the first bucket starting at 0 (when its bound is positive), and the
    highest finite bound when the rank falls in ``+Inf``. None when the histogram is empty."""
    total = sum(counts)
    if total <= 0 or not bounds:
        return None
    rank = q * total
    cumulative = 0.0
    for i, n in enumerate(counts):
        before = cumulative
        cumulative += n
        if cumulative >= rank and n > 0:
            if i >= len(bounds):  # the +Inf bucket
                return float(bounds[-1])
            upper = float(bounds[i])
            lower = float(bounds[i - 1]) if i > 0 else min(0.0, upper)
            if i == 0 and upper <= 0:
                return upper
            return lower + (upper - lower) * (rank - before) / n
    return float(bounds[-1])


@dataclass(slots=True)
class Totals:
    """Cumulative readings summed over one variant's label sets."""

    requests: float = 0.0
    errors: float = 0.0
    upstream_errors: float = 0.0
    buckets: list[float] = field(default_factory=list)


@dataclass(slots=True)
class Delta:
    """What one variant did between two readings."""

    requests: float
    errors: float
    upstream_errors: float
    buckets: list[float]

    @staticmethod
    def between(previous: Totals | None, current: Totals) -> Delta:
        if previous is None:  # first seen after the first reading: it all happened since then
            return Delta(current.requests, current.errors, current.upstream_errors, list(current.buckets))
        return Delta(
            counter_delta(previous.requests, current.requests),
            counter_delta(previous.errors, current.errors),
            counter_delta(previous.upstream_errors, current.upstream_errors),
            bucket_delta(previous.buckets, current.buckets),
        )

    def add(self, other: Delta) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.upstream_errors += other.upstream_errors
        if not self.buckets:
            self.buckets = list(other.buckets)
        elif other.buckets:
            self.buckets = [a + b for a, b in zip(self.buckets, other.buckets, strict=True)]


def figures(delta: Delta, seconds: float, bounds: Sequence[float]) -> dict[str, float | None]:
    """rate, error_rate, upstream_errors and the quantiles of one variant over ``seconds``."""
    out: dict[str, float | None] = {
        "requests": delta.requests,
        "rate": delta.requests / seconds if seconds > 0 else None,
        "error_rate": delta.errors / delta.requests if delta.requests > 0 else None,
        "upstream_errors": delta.upstream_errors / seconds if seconds > 0 else None,
    }
    for q in QUANTILES:
        value = histogram_quantile(q, bounds, delta.buckets) if delta.buckets else None
        out[_qname(q)] = None if value is None or math.isnan(value) else value
    return out


def _qname(q: float) -> str:
    return "p" + f"{q * 100:g}".replace(".", "_")


# -- reading RequestMetrics (worker thread) ---------------------------------------------------------


def read_totals(
    metrics: RequestMetrics,
    series: int,
    hists: int,
    upstream_errors: list[tuple[tuple[str, ...], int]] | None = None,
) -> dict[str, Totals]:
    """Per variant, the cumulative requests, errors, upstream errors and duration buckets, reading the
    first ``series`` request series and ``hists`` histogram label sets (counted on the event loop:
    the lists only grow, so that many entries are there) and ``upstream_errors`` (the items of the
    small dict that counts them, copied on the loop: a dict may change size while a thread walks
    it). Runs in a worker thread."""
    out: dict[str, Totals] = {}
    nd = len(metrics.duration_bounds) + 1
    counts = metrics.requests[:series]  # one copy, one step
    keys = metrics.series_keys[:series]
    for i, key in enumerate(keys):
        totals = _totals(out, key[2], nd)
        n = counts[i]
        totals.requests += n
        code = key[4]
        if code[0] == "5" or not code[0].isdigit():  # 5xx, or "other": no valid status
            totals.errors += n
    hist_keys = metrics.hist_keys[:hists]
    hist_counts = metrics.hist_counts[:hists]
    for h, key in enumerate(hist_keys):
        totals = _totals(out, key[2], nd)
        # the duration buckets lead each label set's flat list; sliced in one step, summed in C
        totals.buckets = list(map(operator.add, totals.buckets, hist_counts[h][:nd]))
        if h % _YIELD_EVERY == _YIELD_EVERY - 1:
            time.sleep(_YIELD_S)
    if upstream_errors is None:  # called on the loop thread itself
        upstream_errors = list(metrics.upstream_errors.items())
    for key, n in upstream_errors:
        _totals(out, key[2], nd).upstream_errors += n
    return out


def _totals(out: dict[str, Totals], variant: str, nd: int) -> Totals:
    totals = out.get(variant)
    if totals is None:
        if len(out) >= MAX_VARIANTS - 1 and variant != "other":  # one place stays for "other"
            return _totals(out, "other", nd)
        totals = out[variant] = Totals(buckets=[0.0] * nd)
    return totals


# -- the ring --------------------------------------------------------------------------------------


@dataclass(slots=True)
class Point:
    """The figures of one interval (computed when the point is made, not at each report)."""

    t: float  # when the reading was taken (Unix time)
    seconds: float  # since the previous reading
    variants: dict[str, dict[str, float | None]]
    every: dict[str, float | None]  # all variants together


def make_point(
    previous: dict[str, Totals], totals: dict[str, Totals], unix: float, seconds: float, bounds: Sequence[float]
) -> Point:
    deltas = {v: Delta.between(previous.get(v), t) for v, t in totals.items()}
    return Point(
        unix,
        seconds,
        {v: _rounded(figures(d, seconds, bounds)) for v, d in deltas.items()},
        _rounded(figures(_sum(deltas.values()), seconds, bounds)),
    )


#: (monotonic seconds, totals per variant) of one reading
Reading = tuple[float, dict[str, Totals]]
#: the points, and the first and last readings of the summary's span (None before two readings)
Snapshot = tuple[list[Point], tuple[Reading, Reading] | None]


class RequestSeries:
    """A bounded history of request figures per variant, read off the request metrics every
    ``interval`` seconds (see the module docstring)."""

    def __init__(self, metrics: RequestMetrics, interval: float = 2.0, history: float = 600.0) -> None:
        self.metrics = metrics
        self.interval = interval
        self.history = history
        self.max_points = min(MAX_POINTS, max(1, round(history / interval)))
        self.points: deque[Point] = deque(maxlen=self.max_points)
        self.bounds = metrics.duration_bounds
        self._last: tuple[float, dict[str, Totals]] | None = None  # (monotonic, totals)
        #: the readings of the last SUMMARY_SECONDS, for the summary (bounded the same way)
        self._readings: deque[tuple[float, dict[str, Totals]]] = deque(
            maxlen=max(2, math.ceil(SUMMARY_SECONDS / interval) + 1)
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="infermon-timeseries")
        self._task: asyncio.Task[None] | None = None
        self.last_read_seconds = 0.0  # how long the last reading took in the worker thread

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="infermon-timeseries")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                await self.sample()
            except Exception:  # a bug here must not end the history; logged, the next round tries again
                log.exception("reading the request metrics for /timeseries failed")
            next_at += self.interval
            now = loop.time()
            if next_at < now:  # fell behind (a suspended process): start again from now
                next_at = now + self.interval
            await asyncio.sleep(next_at - now)

    async def sample(self) -> None:
        """Take one reading now and append the point it makes (counted on the event loop, read and
        computed in the worker thread, appended on the loop)."""
        m = self.metrics
        series, hists = len(m.series_labels), len(m.hist_labels)
        errors = list(m.upstream_errors.items())  # a few entries: variants x failure kinds
        last = self._last
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        _, mono, totals, point = await loop.run_in_executor(self._executor, self._read, series, hists, errors, last)
        self.last_read_seconds = time.perf_counter() - started
        self._store(mono, totals, point)

    def _read(
        self,
        series: int,
        hists: int,
        errors: list[tuple[tuple[str, ...], int]],
        last: tuple[float, dict[str, Totals]] | None,
    ) -> tuple[float, float, dict[str, Totals], Point | None]:
        totals = read_totals(self.metrics, series, hists, errors)
        unix, mono = time.time(), time.monotonic()
        point = None
        if last is not None and mono > last[0]:
            point = make_point(last[1], totals, unix, mono - last[0], self.bounds)
        return unix, mono, totals, point

    def add(self, unix: float, monotonic: float, totals: dict[str, Totals]) -> None:
        """Take a reading made elsewhere (tests, a caller with its own clock): the point between the
        previous reading and this one is appended (none for the first reading)."""
        last = self._last
        point = None
        if last is not None and monotonic > last[0]:
            point = make_point(last[1], totals, unix, monotonic - last[0], self.bounds)
        self._store(monotonic, totals, point)

    def _store(self, monotonic: float, totals: dict[str, Totals], point: Point | None) -> None:
        self._last = (monotonic, totals)
        self._readings.append((monotonic, totals))
        if point is not None:
            self.points.append(point)

    def snapshot(self) -> Snapshot:
        """What :meth:`report_of` needs, copied on the event loop in a few steps (the ring and the
        summary's two readings; their contents never change once stored)."""
        readings = self._readings
        ends = (readings[0], readings[-1]) if len(readings) >= 2 else None
        return list(self.points), ends

    def report(self) -> dict[str, Any]:
        """The JSON of ``GET /timeseries`` (see :meth:`report_of`), on the calling thread."""
        return self.report_of(self.snapshot())

    def report_of(self, snapshot: Snapshot) -> dict[str, Any]:
        """The JSON of ``GET /timeseries`` from a :meth:`snapshot`: lists aligned with ``t``; ``null``
        where a variant had no point (it had not been seen yet) or a figure has no value (no
        requests). Safe in a worker thread: up to ``MAX_POINTS`` x ``MAX_VARIANTS`` x 8 values is a
        few hundred milliseconds of work the event loop must not wait for."""
        points, ends = snapshot
        names = sorted({v for p in points for v in p.variants}, key=lambda v: (v != "stable", v))
        keys = ("requests", "rate", "error_rate", "upstream_errors", *map(_qname, QUANTILES))
        variants: dict[str, dict[str, list[float | None]]] = {}
        for name in names:
            rows: dict[str, list[float | None]] = {k: [] for k in keys}
            for p in points:
                f = p.variants.get(name)
                for k in keys:
                    rows[k].append(f[k] if f is not None else None)
            variants[name] = rows
        return {
            "interval_seconds": self.interval,
            "history_seconds": self.history,
            "max_points": self.max_points,
            "quantiles": list(QUANTILES),
            "latency_unit": "seconds",
            "t": [round(p.t, 3) for p in points],
            "variants": variants,
            "all": {k: [p.every[k] for p in points] for k in keys},
            "summary": self._summary(ends),
        }

    def _summary(self, ends: tuple[Reading, Reading] | None) -> dict[str, Any]:
        """Figures over the last :data:`SUMMARY_SECONDS` (the readings kept for it), per variant."""
        if ends is None:
            return {"seconds": 0.0, "variants": {}, "all": None}
        (t0, first), (t1, last) = ends
        seconds = t1 - t0
        deltas = {v: Delta.between(first.get(v), t) for v, t in last.items()}
        names = sorted(deltas, key=lambda v: (v != "stable", v))
        return {
            "seconds": round(seconds, 3),
            "variants": {v: _rounded(figures(deltas[v], seconds, self.bounds)) for v in names},
            "all": _rounded(figures(_sum(deltas.values()), seconds, self.bounds)),
        }


def _sum(deltas: Any) -> Delta:
    total = Delta(0.0, 0.0, 0.0, [])
    for d in deltas:
        total.add(d)
    return total


def _round(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.6g}")


def _rounded(values: dict[str, float | None]) -> dict[str, float | None]:
    return {k: _round(v) for k, v in values.items()}
