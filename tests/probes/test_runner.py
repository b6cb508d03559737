"""Probes in a running proxy: real model servers that start answering wrong, slow or 500 mid-run."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import ProxyApp
from proxy.dataplane.exchange import Headers
from proxy.dataplane.own import OwnRequest
from proxy.probes import spec
from proxy.probes.runner import ProbeRunner, run_set
from tests.conftest import ProxyFactory, ProxyProcess, Serve
from tests.helpers import TIMEOUT, Client, fetch, free_port, metric, scrape, scrape_metrics, wait_until
from tests.probes.model import IRIS_LABEL, IRIS_V1, SETOSA, VIRGINICA, Model

SECRET = "s3cret-token-value"
DOCS = Path(__file__).resolve().parents[2] / "docs"


def probe_file(tmp_path: Path, *objs: dict[str, Any]) -> str:
    path = tmp_path / "probes.jsonl"
    path.write_text("".join(orjson.dumps(o).decode() + "\n" for o in objs))
    return str(path)


async def model(serve: Serve) -> tuple[Model, str]:
    m = Model()
    return m, await serve(m.app())


async def probed(
    make_proxy: ProxyFactory, url: str, file: str, probes: dict[str, Any] | None = None, **cfg: Any
) -> ProxyApp:
    """A proxy whose first probe round (at start) is over; later rounds only when the test runs them."""
    app = await make_proxy(url, probes={"file": file, "interval": 3600, **(probes or {})}, **cfg)
    runner = app.probe_runner
    assert runner is not None
    async with asyncio.timeout(TIMEOUT):
        for variant in runner.variants:
            await runner.wait_rounds(1, variant)
    return app


def runner_of(app: ProxyApp) -> ProbeRunner:
    assert app.probe_runner is not None
    return app.probe_runner


async def report(app: ProxyApp) -> dict[str, Any]:
    resp = await fetch(app.admin_address, "/probes")
    assert resp.status == 200
    data: dict[str, Any] = orjson.loads(resp.body)
    return data


def result(rep: dict[str, Any], probe: str, variant: str = "stable") -> dict[str, Any]:
    entry: dict[str, Any] = next(p for p in rep["probes"] if p["name"] == probe)["results"][variant]
    return entry


async def round_of(app: ProxyApp, variant: str = "stable") -> str:
    async with asyncio.timeout(TIMEOUT):
        return await runner_of(app).run_round(variant)


async def test_every_upstream_is_probed_straight_and_never_counted_as_client_traffic(
    make_proxy: ProxyFactory, serve: Serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROBE_TOKEN", SECRET)
    stable, stable_url = await model(serve)
    canary, canary_url = await model(serve)
    shadow, shadow_url = await model(serve)
    file = probe_file(tmp_path, {**IRIS_V1, "headers": {"Authorization": "Bearer ${PROBE_TOKEN}"}}, IRIS_LABEL)
    app = await probed(make_proxy, stable_url, file, upstreams={"canary": canary_url}, shadow={"url": shadow_url})
    for server in (stable, canary):
        assert [(method, path) for method, path, _, _ in server.seen] == [
            ("POST", "/v1/models/iris:predict"),
            ("POST", "/v1/models/iris:predict"),
        ]
        headers = {name: h for _, _, h, _ in server.seen for name in [h["x-infermon-probe"]]}
        assert set(headers) == {"iris-v1", "iris-label"}
        assert headers["iris-v1"]["authorization"] == f"Bearer {SECRET}"  # the secret is sent ...
        assert headers["iris-v1"]["user-agent"].startswith("infermon-probe/")
        assert headers["iris-v1"]["idempotency-key"] != headers["iris-label"]["idempotency-key"]
        assert orjson.loads(server.seen[0][3]) in (IRIS_V1["body"], IRIS_LABEL["body"])
    assert shadow.seen == []  # the shadow serves no one: it is not probed
    m = await scrape_metrics(app.admin_address)
    for variant in ("stable", "canary"):
        for name in ("iris-v1", "iris-label"):
            labels = {"probe": name, "variant": variant}
            assert metric(m, "infermon_probe_success", **labels) == 1
            assert metric(m, "infermon_probe_duration_seconds", **labels) > 0
            assert metric(m, "infermon_probe_mismatch_total", **labels) == 0
            assert metric(m, "infermon_probe_last_success_timestamp_seconds", **labels) > 1.7e9
        assert metric(m, "infermon_probe_rounds_total", variant=variant, outcome="ok") == 1
    assert "infermon_requests_total" not in m  # not client traffic: no request series at all
    resp = await fetch(app.admin_address, "/probes")
    assert SECRET.encode() not in resp.body  # ... and never shown
    rep = orjson.loads(resp.body)
    v1 = next(p for p in rep["probes"] if p["name"] == "iris-v1")
    assert v1["headers"] == ["authorization", "content-type"]
    assert v1["results"]["stable"]["ok"] is True and v1["results"]["canary"]["status"] == 200
    assert rep["upstreams"]["stable"]["last_round"]["outcome"] == "ok"
    assert set(rep["upstreams"]) == {"stable", "canary"}


async def test_a_model_that_starts_answering_wrong_is_caught_with_the_difference(
    make_proxy: ProxyFactory, serve: Serve, tmp_path: Path
) -> None:
    m, url = await model(serve)
    app = await probed(make_proxy, url, probe_file(tmp_path, IRIS_V1, IRIS_LABEL))
    m.noise = 1e-9  # within the tolerance: still right
    assert await round_of(app) == "ok"
    m.noise, m.mode = 0.0, "wrong"
    assert await round_of(app) == "failed"
    metrics = await scrape_metrics(app.admin_address)
    assert metric(metrics, "infermon_probe_success", probe="iris-v1", variant="stable") == 0
    assert metric(metrics, "infermon_probe_mismatch_total", probe="iris-v1", variant="stable") == 1
    assert metric(metrics, "infermon_probe_mismatch_total", probe="iris-label", variant="stable") == 1
    assert metric(metrics, "infermon_probe_rounds_total", variant="stable", outcome="failed") == 1
    assert metric(metrics, "infermon_probe_consecutive_failed_rounds", variant="stable") == 1
    rep = await report(app)
    v1 = result(rep, "iris-v1")
    assert v1["ok"] is False and v1["status"] == 200
    first = v1["mismatches"][0]
    assert (first["check"], first["path"], first["expected"], first["got"]) == (
        "json",
        "$.predictions[0][0]",
        SETOSA[0],
        VIRGINICA[0],
    )
    assert v1["reason"].startswith("json $.predictions[0][0]: expected 0.97, got 0.01")
    label = result(rep, "iris-label")["mismatches"]
    assert [(x["check"], x["path"], x["expected"], x["got"]) for x in label] == [("label", "$.predictions[0]", 0, 2)]
    assert rep["upstreams"]["stable"]["last_round"]["failed"] == ["iris-v1", "iris-label"]
    m.mode = "good"
    assert await round_of(app) == "ok"
    metrics = await scrape_metrics(app.admin_address)
    assert metric(metrics, "infermon_probe_success", probe="iris-v1", variant="stable") == 1
    assert metric(metrics, "infermon_probe_consecutive_failed_rounds", variant="stable") == 0


async def test_slow_answers_fail_the_latency_bound_and_no_answer_is_a_timeout(
    make_proxy: ProxyFactory, serve: Serve, tmp_path: Path
) -> None:
    m, url = await model(serve)
    bounded = {**IRIS_V1, "expect": {**IRIS_V1["expect"], "max_latency_ms": 1000}}
    app = await probed(make_proxy, url, probe_file(tmp_path, bounded), {"timeout": 2.0})
    assert result(await report(app), "iris-v1")["ok"] is True
    m.mode, m.delay = "slow", 1.2
    assert await round_of(app) == "failed"
    [late] = result(await report(app), "iris-v1")["mismatches"]
    assert (late["check"], late["expected"]) == ("latency", "<at most 1000 ms>")
    m.mode = "hang"
    try:
        assert await round_of(app) == "failed"
    finally:
        m.release.set()
    r = result(await report(app), "iris-v1")
    assert r["error"]["kind"] == "timeout" and r["duration_seconds"] >= 1.9  # the loop timer, not perf_counter
    metrics = await scrape_metrics(app.admin_address)
    assert metric(metrics, "infermon_probe_errors_total", probe="iris-v1", variant="stable", kind="timeout") == 1
    assert metric(metrics, "infermon_probe_mismatch_total", probe="iris-v1", variant="stable") == 1
    assert metric(metrics, "infermon_probe_duration_seconds", probe="iris-v1", variant="stable") >= 1.9


async def test_a_500_mid_run_is_a_status_mismatch(make_proxy: ProxyFactory, serve: Serve, tmp_path: Path) -> None:
    m, url = await model(serve)
    app = await probed(make_proxy, url, probe_file(tmp_path, IRIS_V1))
    m.mode = "error"
    assert await round_of(app) == "failed"
    [bad] = result(await report(app), "iris-v1")["mismatches"]
    assert (bad["check"], bad["expected"], bad["got"]) == ("status", "<2xx>", 500)
    assert "model not loaded" in bad["detail"]


async def _ready(app: ProxyApp) -> tuple[int, dict[str, Any]]:
    resp = await fetch(app.admin_address, "/readyz")
    body: dict[str, Any] = orjson.loads(resp.body)
    return resp.status, body


async def test_the_readiness_gate_closes_after_n_failed_rounds_and_opens_after_a_good_one(
    make_proxy: ProxyFactory, serve: Serve, tmp_path: Path
) -> None:
    m, url = await model(serve)
    app = await probed(make_proxy, url, probe_file(tmp_path, IRIS_V1), {"readiness_failures": 2})

    async def ready() -> bool:
        return (await _ready(app))[0] == 200

    await wait_until(ready)  # the upstream gate opens with its own probe
    status, body = await _ready(app)
    assert body["gates"]["probes"] == {"ok": True, "reason": "probe round passed (1 probes)"}
    m.mode = "wrong"
    assert await round_of(app) == "failed"
    status, body = await _ready(app)
    assert status == 200 and body["gates"]["probes"]["ok"] is True  # 1 of 2
    assert body["gates"]["probes"]["reason"].startswith("1 of 2 failed probe rounds; iris-v1: json $.predictions")
    assert await round_of(app) == "failed"
    status, body = await _ready(app)
    assert status == 503
    assert body["gates"]["probes"]["ok"] is False
    assert body["gates"]["probes"]["reason"].startswith("2 failed probe rounds in a row; iris-v1: json")
    m.mode = "good"
    assert await round_of(app) == "ok"
    status, body = await _ready(app)
    assert status == 200 and body["gates"]["probes"]["ok"] is True


async def test_a_canary_answering_wrong_never_takes_the_pod_out(
    make_proxy: ProxyFactory, serve: Serve, tmp_path: Path
) -> None:
    _, stable_url = await model(serve)
    canary, canary_url = await model(serve)
    canary.mode = "wrong"
    app = await probed(
        make_proxy,
        stable_url,
        probe_file(tmp_path, IRIS_V1),
        {"readiness_failures": 1},
        upstreams={"canary": canary_url},
    )

    async def reported() -> bool:
        status, body = await _ready(app)
        return status == 200 and body.get("reports", {}).get("probes:canary", {}).get("ok") is False

    await wait_until(reported)
    _, body = await _ready(app)
    assert body["gates"]["probes"]["ok"] is True and "probes:canary" not in body["gates"]
    assert body["reports"]["probes:canary"]["reason"].startswith("1 failed probe round in a row; iris-v1")
    metrics = await scrape_metrics(app.admin_address)
    assert metric(metrics, "infermon_probe_success", probe="iris-v1", variant="canary") == 0  # still exported
    assert metric(metrics, "infermon_probe_success", probe="iris-v1", variant="stable") == 1


async def test_a_round_still_running_is_skipped_and_counted(
    make_proxy: ProxyFactory, serve: Serve, tmp_path: Path
) -> None:
    m, url = await model(serve)
    app = await probed(make_proxy, url, probe_file(tmp_path, IRIS_V1))
    runner = runner_of(app)
    m.mode = "hang"
    runner.tick()  # round 2 starts and waits on the model
    async with asyncio.timeout(TIMEOUT):
        await m.waiting.wait()
    runner.tick()
    runner.tick()
    assert runner.upstreams["stable"].skipped == 2
    assert len(m.seen) == 2  # one probe of round 1, one of round 2: nothing doubled
    m.mode = "good"
    m.release.set()
    async with asyncio.timeout(TIMEOUT):
        await runner.wait_rounds(2)
    metrics = await scrape_metrics(app.admin_address)
    assert metric(metrics, "infermon_probe_rounds_skipped_total", variant="stable") == 2
    assert metric(metrics, "infermon_probe_rounds_total", variant="stable", outcome="ok") == 2
    assert (await report(app))["upstreams"]["stable"]["skipped_rounds"] == 2


async def test_a_probe_that_cannot_be_sent_fails_with_its_reason_and_the_others_still_run(
    make_proxy: ProxyFactory, serve: Serve, tmp_path: Path
) -> None:
    _, url = await model(serve)
    down = f"http://127.0.0.1:{free_port()}"
    file = probe_file(
        tmp_path,
        IRIS_V1,
        {"name": "big", "path": "/big"},
        {"name": "unknown-model", "path": "/v1/models/nope:predict", "body": {"instances": [[1]]}},
    )
    app = await probed(make_proxy, url, file, {"max_body_bytes": 1024}, upstreams={"canary": down})
    rep = await report(app)
    assert result(rep, "iris-v1")["ok"] is True
    assert result(rep, "big")["error"]["kind"] == "too_large"
    assert result(rep, "unknown-model")["mismatches"][0]["got"] == 404
    for name in ("iris-v1", "big", "unknown-model"):
        assert result(rep, name, "canary")["error"]["kind"] == "connect"  # a canary that is down
    metrics = await scrape_metrics(app.admin_address)
    assert metric(metrics, "infermon_probe_errors_total", variant="canary", kind="connect") == 3
    assert metric(metrics, "infermon_probe_errors_total", probe="big", variant="stable", kind="too_large") == 1

    # a request the own-request API refuses is one failure with its reason, not the end of the round
    plane = app.plane
    assert plane is not None
    probes = spec.load(file)

    class Refusing:
        def send(
            self,
            upstream: str,
            method: str,
            target: bytes,
            headers: Headers,
            body: bytes,
            callback: Any,
            *,
            timeout: float,
            max_body_bytes: int = 1 << 20,
        ) -> OwnRequest:
            if target == b"/big":
                raise ValueError("refused for the test")
            assert plane is not None
            return plane.send(upstream, method, target, headers, body, callback, timeout=timeout)

    async with asyncio.timeout(TIMEOUT):
        outcomes = await run_set(
            Refusing(), "stable", probes, concurrency=2, timeout=5, max_body_bytes=1 << 20, rel_tol=1e-5, abs_tol=1e-7
        )
    assert [o.ok for o in outcomes] == [True, False, False]
    assert outcomes[1].reason == "invalid: not sent: refused for the test"
    async with asyncio.timeout(TIMEOUT):
        [unknown] = await run_set(
            plane, "nowhere", probes[:1], concurrency=1, timeout=5, max_body_bytes=1, rel_tol=0, abs_tol=0
        )
    assert unknown.error_kind == "invalid" and "no upstream named 'nowhere'" in (unknown.error or "")


async def test_a_full_connection_pool_makes_a_round_inconclusive(
    make_proxy: ProxyFactory, serve: Serve, tmp_path: Path
) -> None:
    m, url = await model(serve)
    app = await probed(
        make_proxy,
        url,
        probe_file(tmp_path, IRIS_V1),
        {"readiness_failures": 1, "timeout": 5.0},
        upstream_pool={"max_connections": 1, "pool_timeout": 0.2},
    )
    m.mode = "hang"
    client = await Client.connect(app.proxy_address)
    body = orjson.dumps({"instances": [[5.0, 1, 1, 1]]})
    await client.send(
        b"POST /v1/models/iris:predict HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    async with asyncio.timeout(TIMEOUT):
        await m.waiting.wait()  # the client's request holds the pool's only connection
    try:
        assert await round_of(app) == "inconclusive"
    finally:
        m.mode = "good"
        m.release.set()
    assert (await client.response()).status == 200
    r = result(await report(app), "iris-v1")
    assert r["error"]["kind"] == "pool_exhausted"
    _, ready = await _ready(app)
    assert ready["gates"]["probes"]["ok"] is True  # a busy model server is not a wrong one
    metrics = await scrape_metrics(app.admin_address)
    assert metric(metrics, "infermon_probe_rounds_total", variant="stable", outcome="inconclusive") == 1
    assert metric(metrics, "infermon_probe_consecutive_failed_rounds", variant="stable") == 0


async def test_shutdown_cancels_probes_in_flight(make_proxy: ProxyFactory, serve: Serve, tmp_path: Path) -> None:
    m, url = await model(serve)
    app = await probed(make_proxy, url, probe_file(tmp_path, IRIS_V1))
    runner = runner_of(app)
    m.mode = "hang"
    runner.tick()
    async with asyncio.timeout(TIMEOUT):
        await m.waiting.wait()
        assert runner._pending
        await runner.aclose()
    assert not runner._pending
    m.release.set()


async def test_the_proxy_command_replays_the_set_on_an_interval(
    spawn_proxy: Callable[..., Awaitable[ProxyProcess]], serve: Serve, tmp_path: Path
) -> None:
    m, url = await model(serve)
    proc = await spawn_proxy(url, "--probes", probe_file(tmp_path, IRIS_V1), "--probe-interval", "0.1")

    async def two_rounds() -> bool:
        rep = orjson.loads((await fetch(proc.admin, "/probes")).body)
        return bool(rep["upstreams"]["stable"]["rounds"]["ok"] >= 2)

    await wait_until(two_rounds)
    m.mode = "wrong"

    async def caught() -> bool:
        metrics = await scrape_metrics(proc.admin)
        return metric(metrics, "infermon_probe_success", probe="iris-v1", variant="stable") == 0

    await wait_until(caught)
    rep = orjson.loads((await fetch(proc.admin, "/probes")).body)
    assert rep["interval_seconds"] == 0.1
    assert result(rep, "iris-v1")["mismatches"][0]["path"] == "$.predictions[0][0]"


async def test_docs_list_every_probe_family(make_proxy: ProxyFactory, serve: Serve, tmp_path: Path) -> None:
    _, url = await model(serve)
    app = await probed(make_proxy, url, probe_file(tmp_path, IRIS_V1))
    _, text = await scrape(app.admin_address)
    exported = set()
    for family in text_string_to_metric_families(text):
        if family.name.startswith("infermon_probe"):
            exported.add(family.name + ("_total" if family.type == "counter" else ""))
    for page in ("metrics.md", "probes.md"):
        documented = set(re.findall(r"`(infermon_probe_[a-z_]+)`", (DOCS / page).read_text()))
        assert documented == exported, page
