"""GET /timeseries: the arithmetic (quantiles from bucket deltas, counter resets) and the series a running
proxy builds from its own request metrics."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest

from proxy.admin.timeseries import (
    MAX_VARIANTS,
    Delta,
    RequestSeries,
    Totals,
    bucket_delta,
    counter_delta,
    histogram_quantile,
    read_totals,
)
from proxy.app import ProxyApp
from proxy.observe.metrics import RequestMetrics
from proxy.settings import ProxyConfig
from tests.conftest import ProxyFactory
from tests.helpers import Client, fetch, wait_until

BOUNDS = (0.1, 0.2, 0.4, 0.8)


def test_quantile_interpolates_inside_the_bucket_as_promql_does() -> None:
    # 10 in (0, 0.1], 10 in (0.1, 0.2], none above: p50 is the top of the first bucket, p75 half-way up the second
    counts = [10, 10, 0, 0, 0]
    assert histogram_quantile(0.5, BOUNDS, counts) == pytest.approx(0.1)
    assert histogram_quantile(0.75, BOUNDS, counts) == pytest.approx(0.15)
    assert histogram_quantile(0.25, BOUNDS, counts) == pytest.approx(0.05)  # the first bucket starts at 0
    assert histogram_quantile(1.0, BOUNDS, counts) == pytest.approx(0.2)


def test_quantile_in_the_inf_bucket_is_the_highest_finite_bound() -> None:
    assert histogram_quantile(0.99, BOUNDS, [1, 0, 0, 0, 99]) == 0.8


def test_quantile_of_an_empty_histogram_is_none() -> None:
    assert histogram_quantile(0.5, BOUNDS, [0, 0, 0, 0, 0]) is None
    assert histogram_quantile(0.5, (), [3]) is None


def test_quantile_skips_empty_buckets_before_the_rank() -> None:
    # every observation in (0.4, 0.8]: p01 is just above 0.4, never in an empty bucket below
    assert histogram_quantile(0.01, BOUNDS, [0, 0, 0, 100, 0]) == pytest.approx(0.404)


def test_counter_delta_and_resets() -> None:
    assert counter_delta(10, 15) == 5
    assert counter_delta(10, 10) == 0
    assert counter_delta(10, 3) == 3  # went down: reset, the new value is what happened since


def test_bucket_delta_and_resets() -> None:
    assert bucket_delta([1, 2, 3], [2, 2, 5]) == [1, 0, 2]
    assert bucket_delta([5, 2, 3], [1, 4, 4]) == [1, 4, 4]  # one bucket went down: the whole histogram reset
    assert bucket_delta([], [1, 2]) == [1, 2]  # first seen


def _totals(requests: float, errors: float, buckets: list[float]) -> dict[str, Totals]:
    return {"stable": Totals(requests, errors, 0.0, buckets)}


def _metrics(**overrides: Any) -> RequestMetrics:
    return RequestMetrics(ProxyConfig.model_validate({"metrics": {"duration_buckets": list(BOUNDS)}, **overrides}))


def test_points_are_the_deltas_between_readings() -> None:
    series = RequestSeries(_metrics(), interval=1.0, history=3.0)
    series.add(1000.0, 10.0, _totals(100, 0, [100, 0, 0, 0, 0]))  # the first reading makes no point
    assert series.report()["t"] == []
    series.add(1002.0, 12.0, _totals(140, 4, [110, 20, 10, 0, 0]))  # 40 requests in 2 s, 4 of them 5xx
    report = series.report()
    assert report["t"] == [1002.0]
    stable = report["variants"]["stable"]
    assert stable["rate"] == [20.0]
    assert stable["requests"] == [40.0]
    assert stable["error_rate"] == [0.1]
    # the 40 new ones: 10 <= 0.1, 20 in (0.1, 0.2], 10 in (0.2, 0.4]: p50 is the middle of the second bucket
    assert stable["p50"] == [pytest.approx(0.15)]
    assert stable["p99"] == [pytest.approx(0.2 + 0.2 * (39.6 - 30) / 10)]
    assert report["all"]["rate"] == [20.0]
    # a reading after a reset: counters below the last ones are taken whole
    series.add(1003.0, 13.0, _totals(5, 0, [5, 0, 0, 0, 0]))
    assert series.report()["variants"]["stable"]["rate"][-1] == 5.0
    # no requests: rate 0, the ratios and quantiles null (not 0: nothing was measured)
    series.add(1004.0, 14.0, _totals(5, 0, [5, 0, 0, 0, 0]))
    stable = series.report()["variants"]["stable"]
    assert stable["rate"][-1] == 0.0 and stable["error_rate"][-1] is None and stable["p50"][-1] is None
    # bounded: history / interval points
    series.add(1005.0, 15.0, _totals(5, 0, [5, 0, 0, 0, 0]))
    assert len(series.report()["t"]) == 3 == series.max_points


def test_a_variant_seen_later_has_nulls_before() -> None:
    series = RequestSeries(_metrics(), interval=1.0, history=10.0)
    series.add(0.0, 0.0, _totals(0, 0, [0] * 5))
    series.add(1.0, 1.0, _totals(10, 0, [10, 0, 0, 0, 0]))
    series.add(2.0, 2.0, {**_totals(20, 0, [20, 0, 0, 0, 0]), "canary": Totals(4, 2, 1.0, [0, 0, 0, 4, 0])})
    report = series.report()
    assert list(report["variants"]) == ["stable", "canary"]
    canary = report["variants"]["canary"]
    assert canary["rate"] == [None, 4.0] and canary["error_rate"] == [None, 0.5] and canary["upstream_errors"][1] == 1
    assert report["all"]["rate"] == [10.0, 14.0]
    summary = report["summary"]
    assert summary["seconds"] == 2.0 and summary["variants"]["canary"]["requests"] == 4
    assert summary["all"]["rate"] == 12.0


def test_read_totals_sums_per_variant_and_counts_5xx() -> None:
    from proxy.dataplane.exchange import Exchange

    metrics = _metrics()
    for variant, status, seconds in [("stable", 200, 0.05), ("stable", 503, 0.3), ("canary", 200, 0.15)]:
        ex = Exchange(1.0, "127.0.0.1")
        ex.variant, ex.status, ex.method, ex.t_done = variant, status, "POST", 1.0 + seconds
        metrics.on_complete(ex)
    totals = read_totals(metrics, len(metrics.series_labels), len(metrics.hist_labels))
    assert totals["stable"].requests == 2 and totals["stable"].errors == 1
    assert totals["stable"].buckets == [1, 0, 1, 0, 0]
    assert totals["canary"].requests == 1 and totals["canary"].errors == 0
    assert totals["canary"].buckets == [0, 1, 0, 0, 0]


def test_variants_beyond_the_budget_are_summed_under_other() -> None:
    from proxy.dataplane.exchange import Exchange

    metrics = _metrics(labels={"max_values": 1000})
    for i in range(MAX_VARIANTS + 5):
        ex = Exchange(1.0, "127.0.0.1")
        ex.variant, ex.status, ex.method, ex.t_done = f"v{i}", 200, "GET", 1.01
        metrics.on_complete(ex)
    totals = read_totals(metrics, len(metrics.series_labels), len(metrics.hist_labels))
    assert len(totals) == MAX_VARIANTS and totals["other"].requests == 6


def test_delta_of_a_new_variant_is_its_totals() -> None:
    d = Delta.between(None, Totals(3, 1, 0, [1, 2]))
    assert (d.requests, d.errors, d.buckets) == (3, 1, [1, 2])


async def test_a_running_proxy_fills_the_series(make_proxy: ProxyFactory, upstream: str) -> None:
    app: ProxyApp = await make_proxy(upstream, status={"interval": 0.1, "history": 5})
    client = await Client.connect(app.proxy_address)
    for _ in range(20):
        assert (await client.request("GET", "/echo")).status == 200
    for _ in range(5):
        assert (await client.request("GET", "/status/500")).status == 500

    async def counted() -> bool:
        resp = await fetch(app.admin_address, "/timeseries")
        report = orjson.loads(resp.body)
        return sum(r or 0 for r in report["all"]["requests"]) >= 25

    await wait_until(counted)
    resp = await fetch(app.admin_address, "/timeseries")
    assert resp.status == 200 and resp.header("content-type") == "application/json"
    assert resp.header("cache-control") == "no-store"
    report = orjson.loads(resp.body)
    assert report["interval_seconds"] == 0.1 and report["max_points"] == 50
    stable = report["variants"]["stable"]
    assert sum(r or 0 for r in stable["requests"]) == 25
    errors = sum((e or 0) * (n or 0) for e, n in zip(stable["error_rate"], stable["requests"], strict=True))
    assert errors == pytest.approx(5)
    assert max(p or 0 for p in stable["p99"]) > 0
    assert len(report["t"]) == len(stable["rate"]) <= 50
    assert report["t"][-1] == pytest.approx(time.time(), abs=5)


def test_status_config_is_checked() -> None:
    from pydantic import ValidationError

    assert RequestSeries(_metrics(), interval=0.1, history=3600).max_points == 3600  # capped, not refused
    with pytest.raises(ValidationError, match=r"greater than or equal to 0\.1"):
        ProxyConfig.model_validate({"status": {"interval": 0.01}})


async def test_a_full_history_is_served_without_stalling_the_loop(make_proxy: ProxyFactory, upstream: str) -> None:
    """The largest ring (3600 points of 32 variants) takes a good fraction of a second to assemble
    and serialise; done on the event loop, every request of the proxy waited for it at each poll.
    The loop's longest pause while one is served must stay well under what building it takes."""
    import asyncio

    from proxy.admin.status import SERIES
    from proxy.admin.timeseries import MAX_POINTS, QUANTILES, Point, _qname

    app = await make_proxy(upstream, status={"interval": 1.0, "history": 7200.0})
    series = app.admin_app[SERIES]
    keys = ("requests", "rate", "error_rate", "upstream_errors", *map(_qname, QUANTILES))
    figures: dict[str, float | None] = {k: 1.234567 for k in keys}
    for i in range(MAX_POINTS):
        series.points.append(Point(float(i), 1.0, {f"v{j}": figures for j in range(MAX_VARIANTS)}, figures))
    started = time.perf_counter()
    orjson.dumps(series.report(), option=orjson.OPT_INDENT_2)
    build = time.perf_counter() - started

    longest = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal longest
        while not done.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            longest = max(longest, time.perf_counter() - before)

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    try:
        resp = await fetch(app.admin_address, "/timeseries")
    finally:
        done.set()
        await tick
    assert resp.status == 200 and resp.header("cache-control") == "no-store"
    assert len(orjson.loads(resp.body)["t"]) == MAX_POINTS
    assert longest < build / 2, (longest, build)
