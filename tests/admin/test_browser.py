"""The status page in headless Chromium (Debian's chromium, driven by Playwright's Python package; no
browser is downloaded): a proxy splitting real model servers (a worse canary), with drift, feedback,
probes and a node agent on the stub NVML library, after known traffic. The page must load without a
console error, draw data in its charts, name the shifted feature and show the canary's verdict.

Screenshots land in build/test-artifacts/. ``make screenshot`` runs this test with
``INFERMON_SCREENSHOT=docs/status-page.png``: the README's picture at 1366x768.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from proxy.app import ProxyApp
from tests.agent.conftest import StartAgent, agent_env, start_agent, stub_nvml_dir  # noqa: F401 - fixtures used below
from tests.conftest import ProxyFactory, Serve
from tests.helpers import TIMEOUT, Client, fetch, wait_until

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = REPO / "build" / "test-artifacts"
# CI installs chromium (.ci/run): there a missing browser is a failure, not a skip
HAVE_CHROMIUM = os.path.exists(CHROMIUM)
needs_chromium = pytest.mark.skipif(
    not HAVE_CHROMIUM and not os.environ.get("CI"), reason="chromium not installed (apt-get install chromium)"
)
ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip
PLANS = ("free", "pro", "team")


async def model(serve: Serve, *, delay: float = 0.0, fail_every: int = 0, wrong_every: int = 0) -> str:
    """A KServe v1 model server: class 1 when age > 40; ``wrong_every``-th answers flipped, every
    ``fail_every``-th request a 500."""
    seen = 0

    async def predict(request: web.Request) -> web.Response:
        nonlocal seen
        seen += 1
        body = await request.json()
        if delay:
            await asyncio.sleep(delay)
        if fail_every and seen % fail_every == 0:
            return web.json_response({"error": "boom"}, status=500)
        flip = bool(wrong_every) and seen % wrong_every == 0
        return web.json_response({"predictions": [int((row["age"] > 40) != flip) for row in body["instances"]]})

    app = web.Application()
    app.router.add_post("/v1/models/{name}:predict", predict)
    return await serve(app)


async def send(app: ProxyApp, n: int, age: float, rng: random.Random) -> list[tuple[str, int]]:
    """``n`` predictions with ages around ``age``; (request id, true label) of each 2xx answer."""
    client = await Client.connect(app.proxy_address)
    labels = []
    for _ in range(n):
        row: dict[str, Any] = {"age": round(rng.gauss(age, 4.0), 1), "plan": rng.choice(PLANS)}
        body = orjson.dumps({"instances": [row]})
        headers = {"Content-Type": "application/json"}
        resp = await client.request("POST", "/v1/models/m:predict", headers=headers, body=body)
        rid = resp.header("x-request-id")
        if resp.status == 200 and rid:
            labels.append((rid, int(row["age"] > 40)))
    await client.close()
    return labels


@pytest.fixture
async def scenario(
    make_proxy: ProxyFactory,
    serve: Serve,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    start_agent: StartAgent,  # noqa: F811
) -> ProxyApp:
    """A proxy after known traffic: the canary slower, failing a quarter of its requests and answering
    wrong more often; ``age`` shifted after the reference was built (``plan`` not)."""
    agent_url = None
    if shutil.which("gcc"):  # the GPU panel from a real agent on the stub NVML library
        nvml: Path = request.getfixturevalue("stub_nvml_dir")
        env = agent_env(LD_LIBRARY_PATH=str(nvml), INFERMON_AGENT_HOST__ENABLED="false")
        agent_url = (await start_agent("--interval", "0.5", env=env)).url
    probes = tmp_path / "probes.jsonl"
    probes.write_text(
        '{"name": "young-free", "path": "/v1/models/m:predict", "body": {"instances": [{"age": 30, "plan": "free"}]},'
        ' "expect": {"status": 200, "json": {"predictions": [0]}}}\n'
        '{"name": "older-pro", "path": "/v1/models/m:predict", "body": {"instances": [{"age": 50, "plan": "pro"}]},'
        ' "expect": {"status": 200, "json": {"predictions": [1]}}}\n'
    )
    app = await make_proxy(
        await model(serve),
        upstreams={"canary": await model(serve, delay=0.02, fail_every=4, wrong_every=3)},
        split={"weights": {"stable": 70, "canary": 30}},
        canary={"min_requests": 30, "min_predictions": 30, "evaluate_every": 3600},
        sampling={"rate": 1.0},
        drift={"reference_samples": 60, "min_samples": 30, "window_size": 100, "interval": 3600},
        feedback={"enabled": True},
        quality={"interval": 0.2, "min_labels": 10},
        probes={"file": str(probes), "interval": 0.5},
        status={"interval": 0.25, "agent": agent_url},
    )
    rng = random.Random(14)
    labels = await send(app, 120, 35.0, rng)  # stable's first 60 rows become the reference
    labels += await send(app, 220, 55.0, rng)  # then age shifts
    side = app.sampling.side
    assert side is not None and await asyncio.to_thread(side.wait_idle, TIMEOUT)
    engine = app.sampling.engine
    assert engine is not None
    engine.evaluate(time.time())  # the side path is idle: no concurrent add
    assert app.canary is not None
    await app.canary.evaluate()
    feedback = b"".join(orjson.dumps({"request_id": rid, "label": label}) + b"\n" for rid, label in labels)
    client = await Client.connect(app.admin_address)
    resp = await client.request("POST", "/feedback", headers={"Content-Type": "application/x-ndjson"}, body=feedback)
    await client.close()
    assert resp.status == 200, resp.body

    async def scored() -> bool:
        report = orjson.loads((await fetch(app.admin_address, "/quality")).body)
        return any(w.get("scores", {}).get("accuracy") for s in report["label_sets"] for w in s["windows"].values())

    async def probed() -> bool:
        report = orjson.loads((await fetch(app.admin_address, "/probes")).body)
        return all(r["last_round"] for r in report["upstreams"].values())

    await wait_until(scored)
    await wait_until(probed)
    return app


@needs_chromium
async def test_the_page_in_chromium(scenario: ProxyApp, serve: Serve, tmp_path: Path) -> None:
    assert HAVE_CHROMIUM, "chromium is missing: CI must have it (.ci/run installs it)"
    from playwright.async_api import ConsoleMessage, async_playwright

    app = scenario
    host, port = app.admin_address
    problems: list[str] = []
    async with asyncio.timeout(90), async_playwright() as pw:
        browser = await pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=ARGS,
            viewport={"width": 1366, "height": 768},
        )  # fmt: skip
        try:
            page = browser.pages[0] if browser.pages else await browser.new_page()

            def console(msg: ConsoleMessage) -> None:
                if msg.type in ("error", "warning"):
                    problems.append(f"console {msg.type}: {msg.text}")

            page.on("console", console)
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on("requestfailed", lambda req: problems.append(f"request failed: {req.url} {req.failure}"))
            page.on("response", lambda r: problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
            # a path prefix and a relative base the way a port-forward or an ingress serve it: here /
            resp = await page.goto(f"http://{host}:{port}/", wait_until="load")
            assert resp is not None and resp.status == 200
            assert resp.headers["content-type"].startswith("text/html")
            await page.wait_for_function("() => Number(document.body.dataset.refreshes || 0) >= 2", timeout=20_000)
            await _save(page, "status-page.png")

            for chart in ("chart-rate", "chart-latency", "chart-errors"):
                points = await page.get_attribute(f"#{chart}", "data-points")
                assert points is not None and int(points) > 0, chart
                assert await page.locator(f"#{chart} path.line").count() > 0, chart
            # drift: the shifted feature is named, and its row says drifted
            drift = await page.inner_text("#drift")
            assert "age" in drift
            assert await page.get_attribute('#drift tr[data-feature="age"]', "data-drifted") == "true"
            assert "age" in await page.inner_text('#drift .drifted-list[data-variant="stable"]')
            assert await page.locator('#drift tr[data-feature="age"] svg.hist rect').count() > 0
            # canary: the verdict and each check
            verdict = page.locator('#canary .variant[data-variant="canary"]')
            assert await verdict.get_attribute("data-verdict") == "fail"
            text = await verdict.inner_text()
            assert "FAIL" in text.upper() and "errors" in text and "latency" in text
            assert "stable" in await page.inner_text("#canary")  # the baseline and the split are named
            # model scores, probes, GPU
            assert "accuracy" in await page.inner_text("#quality")
            assert await page.locator('#probes tr[data-probe="young-free"]').count() == 1
            gpu = await page.inner_text("#gpu")
            if app.cfg.status.agent:
                assert "Stub GPU A" in gpu
            # the fixed path serves the same page, and so does a reverse proxy serving it under a prefix
            for url in (f"http://{host}:{port}/status", f"{await prefixed(serve, host, port)}/infermon/pod-0/"):
                await page.goto(url, wait_until="load")
                await page.wait_for_function("() => Number(document.body.dataset.refreshes || 0) >= 1", timeout=20_000)
                assert await page.get_attribute("#chart-rate", "data-points") not in (None, "0"), url
                assert await page.get_attribute('#drift tr[data-feature="age"]', "data-drifted") == "true", url
                assert await page.is_hidden("#stale"), url
        finally:
            await browser.close()
    assert problems == []
    assert await page_stale_free(app)


async def prefixed(serve: Serve, host: str, port: int) -> str:
    """A reverse proxy that serves the admin port under ``/infermon/pod-0/`` (as an ingress or
    ``kubectl proxy`` does): the page must find everything through relative URLs."""
    import aiohttp

    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT))

    async def forward(request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("accept", "if-none-match")}
        url = f"http://{host}:{port}/{request.match_info['tail']}"
        async with session.get(url, headers=headers) as resp:
            body = await resp.read()
            keep = ("content-type", "etag", "vary", "cache-control", "content-security-policy")
            return web.Response(
                body=body, status=resp.status, headers={k: v for k, v in resp.headers.items() if k.lower() in keep}
            )

    async def close(app: web.Application) -> None:
        await session.close()

    app = web.Application()
    app.router.add_get("/infermon/pod-0/{tail:.*}", forward)
    app.on_cleanup.append(close)
    return await serve(app)


async def page_stale_free(app: ProxyApp) -> bool:
    """Every endpoint the page reads answers 200 (the page's fetches then never log an error)."""
    index = orjson.loads((await fetch(app.admin_address, "/", headers={"Accept": "application/json"})).body)
    for path in ("/timeseries", "/canary", "/split", "/drift", "/quality", "/probes", "/gpu"):
        assert path in index["endpoints"]
        assert (await fetch(app.admin_address, path)).status == 200, path
    return True


@needs_chromium
async def test_panels_of_features_that_are_off_say_so(make_proxy: ProxyFactory, upstream: str, tmp_path: Path) -> None:
    """One upstream, nothing switched on: no 404 in the console (the page asks only for what the index
    lists), and each panel says what is off and where to read about it."""
    assert HAVE_CHROMIUM, "chromium is missing: CI must have it (.ci/run installs it)"
    from playwright.async_api import async_playwright

    app = await make_proxy(upstream, status={"interval": 0.2})
    client = await Client.connect(app.proxy_address)
    for _ in range(10):
        await client.request("GET", "/echo")
    await client.close()
    host, port = app.admin_address
    problems: list[str] = []
    async with asyncio.timeout(60), async_playwright() as pw:
        browser = await pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=ARGS,
            viewport={"width": 1366, "height": 768},
        )  # fmt: skip
        try:
            page = browser.pages[0] if browser.pages else await browser.new_page()
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda exc: problems.append(str(exc)))
            page.on("response", lambda r: problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
            await page.goto(f"http://{host}:{port}/status", wait_until="load")
            await page.wait_for_function("() => Number(document.body.dataset.refreshes || 0) >= 1", timeout=20_000)
            await _save(page, "status-page-off.png", docs=False)
            assert "sampling is off" in await page.inner_text("#drift")
            assert "docs/drift.md" in await page.inner_text("#drift")
            assert "off" in await page.inner_text("#canary")
            assert "feedback is off" in await page.inner_text("#quality")
            assert "off" in await page.inner_text("#probes")
            assert "status.agent" in await page.inner_text("#gpu")
            assert await page.is_hidden("#stale")
        finally:
            await browser.close()
    assert problems == []


async def _save(page: Any, name: str, docs: bool = True) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / name), full_page=True)
    target = os.environ.get("INFERMON_SCREENSHOT")
    if docs and target:
        await page.screenshot(path=str(REPO / target), full_page=False)  # what a 1366x768 laptop shows


@needs_chromium
async def test_the_refresh_survives_a_hostile_answer_and_a_stalled_fetch(
    make_proxy: ProxyFactory, upstream: str, tmp_path: Path
) -> None:
    """One /canary answer the page cannot draw (a variant that is null) and one /gpu fetch that never
    answers (a stalled port-forward): the page marks itself stale and keeps refreshing, and once the
    answers are good again the stale marker goes. Before, the first stopped the refresh for good and
    the second held it forever."""
    assert HAVE_CHROMIUM, "chromium is missing: CI must have it (.ci/run installs it)"
    from playwright.async_api import Route, async_playwright

    split = {"weights": {"stable": 50, "canary": 50}}
    app = await make_proxy(upstream, upstreams={"canary": upstream}, split=split, status={"interval": 0.2})
    host, port = app.admin_address
    held: list[Route] = []
    seen = {"canary": 0, "gpu": 0}

    async def hostile_canary(route: Route) -> None:
        seen["canary"] += 1
        if seen["canary"] == 1:
            bad = '{"baseline": "stable", "variants": {"canary": null}}'
            await route.fulfill(status=200, content_type="application/json", body=bad)
        else:
            await route.continue_()

    async def stalled_gpu(route: Route) -> None:
        seen["gpu"] += 1
        if seen["gpu"] == 2:
            held.append(route)  # never answered
        else:
            await route.continue_()

    async with asyncio.timeout(60), async_playwright() as pw:
        browser = await pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=ARGS,
        )  # fmt: skip
        try:
            page = browser.pages[0] if browser.pages else await browser.new_page()
            await page.route(lambda url: url.endswith("/canary"), hostile_canary)
            await page.route(lambda url: url.endswith("/gpu"), stalled_gpu)
            await page.goto(f"http://{host}:{port}/status", wait_until="load")
            await page.wait_for_function("() => Number(document.body.dataset.refreshes || 0) >= 1", timeout=10_000)
            assert "render" in await page.inner_text("#stale")
            await page.wait_for_function("() => Number(document.body.dataset.refreshes || 0) >= 4", timeout=30_000)
            await page.wait_for_function("() => document.getElementById('stale').hidden", timeout=10_000)
            assert held and seen["gpu"] >= 3
            assert "baseline stable" in await page.inner_text("#canary")  # drawn from the real answer
        finally:
            await browser.close()


@needs_chromium
async def test_a_failing_endpoint_leaves_its_panel_as_it_was(
    make_proxy: ProxyFactory, upstream: str, tmp_path: Path
) -> None:
    """What docs/status-page.md promises: a fetch that fails keeps the panel's last figures and names
    the endpoint in the stale marker. Before, the charts were wiped to "no data" on the first error."""
    assert HAVE_CHROMIUM, "chromium is missing: CI must have it (.ci/run installs it)"
    from playwright.async_api import Route, async_playwright

    app = await make_proxy(upstream, status={"interval": 0.2})
    client = await Client.connect(app.proxy_address)
    for _ in range(10):
        await client.request("GET", "/echo")
    await client.close()

    async def points() -> bool:
        report = orjson.loads((await fetch(app.admin_address, "/timeseries")).body)
        return any(v for v in report["all"]["requests"])

    await wait_until(points)
    host, port = app.admin_address
    calls = 0

    async def failing_after_one(route: Route) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await route.continue_()
        else:
            await route.fulfill(status=503, content_type="application/json", body='{"error": "down"}')

    async with asyncio.timeout(60), async_playwright() as pw:
        browser = await pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=ARGS,
        )  # fmt: skip
        try:
            page = browser.pages[0] if browser.pages else await browser.new_page()
            await page.route(lambda url: url.endswith("/timeseries"), failing_after_one)
            await page.goto(f"http://{host}:{port}/status", wait_until="load")
            await page.wait_for_function("() => Number(document.body.dataset.refreshes || 0) >= 2", timeout=20_000)
            assert "timeseries (HTTP 503)" in await page.inner_text("#stale")
            for chart in ("chart-rate", "chart-latency", "chart-errors"):  # the last figures, still drawn
                assert await page.locator(f"#{chart} p.off").count() == 0, chart
                assert await page.locator(f"#{chart} svg").count() == 1, chart
        finally:
            await browser.close()
