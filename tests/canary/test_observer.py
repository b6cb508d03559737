"""The canary analysis in a running proxy: a split between two real upstreams, /canary and the metrics."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from aiohttp import web

from proxy.app import ProxyApp
from tests.conftest import ProxyFactory, Serve
from tests.helpers import TIMEOUT, Client, fetch, metric, scrape_metrics, wait_until


async def model(serve: Serve, *, fail_every: int = 0, delay: float = 0.0, label: int = 0) -> str:
    """A KServe v1 model server: ``label`` for every instance; every ``fail_every``-th request 500s."""
    seen = 0

    async def predict(request: web.Request) -> web.Response:
        nonlocal seen
        seen += 1
        body = await request.json()
        if delay:
            await asyncio.sleep(delay)
        if fail_every and seen % fail_every == 0:
            return web.json_response({"error": "boom"}, status=500)
        return web.json_response({"predictions": [label for _ in body["instances"]]})

    app = web.Application()
    app.router.add_post("/v1/models/{name}:predict", predict)
    return await serve(app)


async def run(app: ProxyApp, n: int) -> None:
    client = await Client.connect(app.proxy_address)
    body = orjson.dumps({"instances": [[1.0, 2.0]]})
    for _ in range(n):
        await client.request("POST", "/v1/models/m:predict", headers={"Content-Type": "application/json"}, body=body)
    side = app.sampling.side
    if side is not None:
        assert await asyncio.to_thread(side.wait_idle, TIMEOUT)
    assert app.canary is not None
    await app.canary.evaluate()


async def verdict(app: ProxyApp) -> dict[str, Any]:
    resp = await fetch(app.admin_address, "/canary")
    assert resp.status == 200
    report: dict[str, Any] = orjson.loads(resp.body)
    return report


async def split(make_proxy: ProxyFactory, stable: str, canary: str, **cfg: Any) -> ProxyApp:
    return await make_proxy(
        stable,
        upstreams={"canary": canary},
        split={"weights": {"stable": 50, "canary": 50}},
        canary={"min_requests": 50, "min_predictions": 50, "evaluate_every": 3600},
        **cfg,
    )


async def test_a_canary_with_more_errors_fails(make_proxy: ProxyFactory, serve: Serve) -> None:
    app = await split(make_proxy, await model(serve), await model(serve, fail_every=4))
    await run(app, 400)
    report = await verdict(app)
    canary = report["variants"]["canary"]
    assert canary["verdict"] == -1 and canary["checks"]["errors"]["outcome"] == -1, canary["reason"]
    m = await scrape_metrics(app.admin_address)
    assert metric(m, "infermon_canary_verdict", variant="canary") == -1
    assert metric(m, "infermon_canary_check", variant="canary", check="errors") == -1


async def test_an_identical_canary_passes(make_proxy: ProxyFactory, serve: Serve) -> None:
    app = await split(make_proxy, await model(serve), await model(serve))
    await run(app, 300)
    canary = (await verdict(app))["variants"]["canary"]
    assert canary["verdict"] == 1, canary["reason"]


async def test_a_slower_canary_fails(make_proxy: ProxyFactory, serve: Serve) -> None:
    app = await split(make_proxy, await model(serve), await model(serve, delay=0.02))
    await run(app, 300)
    canary = (await verdict(app))["variants"]["canary"]
    assert canary["verdict"] == -1 and canary["checks"]["latency"]["outcome"] == -1, canary["reason"]


async def test_a_canary_answering_other_classes_fails(make_proxy: ProxyFactory, serve: Serve) -> None:
    app = await split(make_proxy, await model(serve, label=0), await model(serve, label=1), sampling={"rate": 1.0})
    await run(app, 300)
    canary = (await verdict(app))["variants"]["canary"]
    assert canary["checks"]["predictions"]["outcome"] == -1, canary["reason"]
    assert canary["verdict"] == -1


async def test_no_traffic_is_inconclusive_never_a_pass(make_proxy: ProxyFactory, serve: Serve) -> None:
    app = await split(make_proxy, await model(serve), await model(serve))
    await run(app, 10)
    canary = (await verdict(app))["variants"].get("canary")
    assert canary is not None and canary["verdict"] == 0


async def test_no_split_no_analysis(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream)
    assert app.canary is None
    assert (await fetch(app.admin_address, "/canary")).status == 404


async def test_the_analysis_runs_by_itself(make_proxy: ProxyFactory, serve: Serve) -> None:
    """No manual hand-over: the observer's task passes the finished requests on and evaluates."""
    app = await make_proxy(
        await model(serve),
        upstreams={"canary": await model(serve)},
        split={"weights": {"stable": 50, "canary": 50}},
        canary={"min_requests": 20, "evaluate_every": 0.2},
    )
    client = await Client.connect(app.proxy_address)
    body = orjson.dumps({"instances": [[1.0, 2.0]]})
    for _ in range(100):
        await client.request("POST", "/v1/models/m:predict", headers={"Content-Type": "application/json"}, body=body)

    async def counted() -> bool:
        report = await verdict(app)
        return bool(sum(report["requests"].values()) == 100)

    await wait_until(counted)
    assert app.canary is not None and app.canary._finished == []


async def test_a_canary_whose_predictions_drift_fails_the_drift_check(make_proxy: ProxyFactory, serve: Serve) -> None:
    """Per-variant drift windows through a running proxy: the reference comes from stable's first
    samples only, and only the canary's predictions leave it."""
    app = await split(
        make_proxy,
        await model(serve, label=0),
        await model(serve, label=1),
        sampling={"rate": 1.0},
        drift={"reference_samples": 40, "min_samples": 30, "window_size": 500, "interval": 3600},
    )
    await run(app, 400)
    engine = app.sampling.engine
    assert engine is not None
    engine.evaluate(time.time())  # the side path is idle (run waited): no concurrent add
    assert app.canary is not None
    await app.canary.evaluate()
    canary = (await verdict(app))["variants"]["canary"]
    check = canary["checks"]["drift"]
    assert check["outcome"] == -1, check["reason"]
    assert check["drifted_predictions"] and check["baseline_drifted_predictions"] == []
    assert check["rows"] >= 30 and check["baseline_rows"] >= 30
    m = await scrape_metrics(app.admin_address)
    assert metric(m, "infermon_canary_check", variant="canary", check="drift") == -1


async def test_a_canary_that_always_fails_is_counted_and_fails(make_proxy: ProxyFactory, serve: Serve) -> None:
    """Every answer of the canary a 500 on a model path: its requests still carry variant=canary (the
    split chose it, the configuration names it), so the analysis sees them and fails the canary."""
    app = await split(make_proxy, await model(serve), await model(serve, fail_every=1))
    await run(app, 300)
    m = await scrape_metrics(app.admin_address)
    canary_500 = metric(m, "infermon_requests_total", variant="canary", code="500")
    assert canary_500 > 50
    report = await verdict(app)
    assert report["requests"]["canary"] == canary_500
    canary = report["variants"]["canary"]
    assert canary["verdict"] == -1 and canary["checks"]["errors"]["outcome"] == -1, canary["reason"]


async def test_a_variant_without_a_single_request_is_inconclusive(make_proxy: ProxyFactory, serve: Serve) -> None:
    """A configured canary that got no traffic at all still has a verdict: 0, in /canary and the metrics."""
    app = await make_proxy(
        await model(serve),
        upstreams={"canary": await model(serve)},
        split={"weights": {"stable": 100, "canary": 0}},
        canary={"evaluate_every": 3600},
    )
    await run(app, 60)
    report = await verdict(app)
    canary = report["variants"].get("canary")
    assert canary is not None and canary["verdict"] == 0 and canary["requests"] == 0, report
    assert "too few requests" in canary["reason"]
    m = await scrape_metrics(app.admin_address)
    assert metric(m, "infermon_canary_verdict", variant="canary") == 0
    assert metric(m, "infermon_canary_samples", variant="canary") == 0


async def test_a_canary_with_wrong_answers_fails_the_quality_check(make_proxy: ProxyFactory, serve: Serve) -> None:
    """Labels posted to /feedback after the answers: stable answers 0 (right), the canary 1 (wrong)."""
    app = await split(
        make_proxy,
        await model(serve, label=0),
        await model(serve, label=1),
        feedback={"enabled": True},
        quality={"windows": {"1h": {"seconds": 3600, "max_labels": 10_000}}, "min_labels": 20, "interval": 3600},
    )
    client = await Client.connect(app.proxy_address)
    body = orjson.dumps({"instances": [[1.0, 2.0]]})
    ids = []
    for _ in range(300):
        resp = await client.request(
            "POST", "/v1/models/m:predict", headers={"Content-Type": "application/json"}, body=body
        )
        ids.append(resp.header("x-request-id"))
    side = app.sampling.side
    assert side is not None and app.quality is not None and app.canary is not None
    assert await asyncio.to_thread(side.wait_idle, TIMEOUT)
    feedback = orjson.dumps([{"request_id": rid, "label": 0} for rid in ids])
    admin = await Client.connect(app.admin_address)
    resp = await admin.request("POST", "/feedback", headers={"Content-Type": "application/json"}, body=feedback)
    assert resp.status == 200, resp.body
    await app.quality.evaluate()
    await app.canary.evaluate()
    canary = (await verdict(app))["variants"]["canary"]
    check = canary["checks"]["quality"]
    assert check["outcome"] == -1 and canary["verdict"] == -1, check["reason"]
    assert (check["metric"], check["value"], check["baseline_value"]) == ("accuracy", 0.0, 1.0)
    assert check["labels"] + check["baseline_labels"] == 300
