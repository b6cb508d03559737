"""Weighted, sticky splits between named upstreams, run-time weight changes, failover, SIGHUP."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from scipy.stats import chisquare

from proxy.app import ProxyApp
from proxy.routing.split import cookie_value, sticky_point
from tests.conftest import ProxyFactory, ProxyProcess, Serve
from tests.helpers import TIMEOUT, Client, fetch, free_port, metric, scrape_metrics, wait_until

TOKEN = "split-test-token-0123456789"


async def variant_server(serve: Serve, name: str, gate: asyncio.Event | None = None) -> str:
    """An upstream that answers with its own name (after ``gate`` is set, when given)."""

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        if gate is not None:
            await gate.wait()
        return web.json_response({"variant": name})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return await serve(app)


async def ask(client: Client, headers: dict[str, str] | None = None, path: str = "/v1/models/m:predict") -> str:
    resp = await client.request("POST", path, headers=headers, body=b"{}")
    assert resp.status == 200, resp
    name: str = orjson.loads(resp.body)["variant"]
    return name


async def two_variants(
    make_proxy: ProxyFactory, serve: Serve, weights: dict[str, float], **cfg: Any
) -> tuple[ProxyApp, dict[str, str]]:
    urls = {n: await variant_server(serve, n) for n in ("stable", "canary")}
    split = {"weights": weights, **cfg.pop("split", {})}
    app = await make_proxy(urls["stable"], upstreams={"canary": urls["canary"]}, split=split, **cfg)
    return app, urls


async def test_requests_split_by_weight(make_proxy: ProxyFactory, serve: Serve) -> None:
    app, _ = await two_variants(make_proxy, serve, {"stable": 80, "canary": 20})
    client = await Client.connect(app.proxy_address)
    n = 1000
    counts = collections.Counter([await ask(client) for _ in range(n)])
    observed = [counts["stable"], counts["canary"]]
    assert chisquare(observed, [0.8 * n, 0.2 * n]).pvalue > 1e-4, observed
    # the upstream's name is the variant label
    m = await scrape_metrics(app.admin_address)
    assert metric(m, "infermon_requests_total", variant="canary", code="200") == counts["canary"]
    assert metric(m, "infermon_requests_total", variant="stable", code="200") == counts["stable"]
    assert metric(m, "infermon_split_weight", variant="canary") == 20


async def test_sticky_header_keeps_one_user_on_one_variant(make_proxy: ProxyFactory, serve: Serve) -> None:
    app, _ = await two_variants(make_proxy, serve, {"stable": 50, "canary": 50}, split={"sticky": "header:x-user-id"})
    client = await Client.connect(app.proxy_address)
    seen: dict[str, set[str]] = {}
    for user in range(40):
        for _ in range(5):
            seen.setdefault(str(user), set()).add(await ask(client, {"X-User-Id": f"user-{user}"}))
    assert all(len(v) == 1 for v in seen.values())
    assert {next(iter(v)) for v in seen.values()} == {"stable", "canary"}  # and users are spread
    # the assignment is the hash, the same in every process: the point decides
    for key, variants in seen.items():
        expected = "canary" if sticky_point(f"user-{key}".encode()) < 0.5 else "stable"
        assert variants == {expected}


async def test_sticky_cookie(make_proxy: ProxyFactory, serve: Serve) -> None:
    app, _ = await two_variants(make_proxy, serve, {"stable": 50, "canary": 50}, split={"sticky": "cookie:session"})
    client = await Client.connect(app.proxy_address)
    for sid in ("a1", "b2", "c3", "d4"):
        got = {await ask(client, {"Cookie": f"theme=dark; session={sid}; x=1"}) for _ in range(6)}
        assert len(got) == 1
    assert cookie_value(b'a=1; session="q"', b"session") == b"q"
    assert cookie_value(b"sessionx=1", b"session") is None


async def test_sticky_across_two_proxy_processes(
    spawn_proxy: Callable[..., Awaitable[ProxyProcess]], serve: Serve
) -> None:
    stable, canary = await variant_server(serve, "stable"), await variant_server(serve, "canary")
    args = ("--upstream", f"canary={canary}", "--split", "stable=50,canary=50", "--sticky", "header:x-user-id")
    first, second = await spawn_proxy(stable, *args), await spawn_proxy(stable, *args)
    one, two = await Client.connect(first.listen), await Client.connect(second.listen)
    for user in range(30):
        headers = {"X-User-Id": f"u{user}"}
        assert await ask(one, headers) == await ask(two, headers)


async def test_force_header_is_off_unless_enabled(make_proxy: ProxyFactory, serve: Serve) -> None:
    app, _ = await two_variants(make_proxy, serve, {"stable": 100, "canary": 0})
    client = await Client.connect(app.proxy_address)
    assert {await ask(client, {"X-Infermon-Variant": "canary"}) for _ in range(10)} == {"stable"}
    app2, _ = await two_variants(
        make_proxy, serve, {"stable": 100, "canary": 0}, split={"force_header": "x-infermon-variant"}
    )
    client2 = await Client.connect(app2.proxy_address)
    assert await ask(client2, {"X-Infermon-Variant": "canary"}) == "canary"
    assert await ask(client2, {"X-Infermon-Variant": "nosuch"}) == "stable"  # unknown: split as usual


async def test_put_split_takes_the_token_and_changes_weights(make_proxy: ProxyFactory, serve: Serve) -> None:
    app, _ = await two_variants(make_proxy, serve, {"stable": 100}, admin={"token": TOKEN})
    body = b'{"stable": 0, "canary": 100}'
    resp = await _put(app, body)
    assert resp.status == 401 and "Bearer" in resp.header("www-authenticate")
    resp = await _put(app, body, TOKEN)
    assert resp.status == 200
    state = orjson.loads(resp.body)
    assert state["weights"] == {"stable": 0.0, "canary": 100.0}
    client = await Client.connect(app.proxy_address)
    assert {await ask(client) for _ in range(10)} == {"canary"}
    got = await fetch(app.admin_address, "/split")
    assert orjson.loads(got.body)["shares"] == {"stable": 0.0, "canary": 1.0}
    m = await scrape_metrics(app.admin_address)
    assert metric(m, "infermon_split_weight", variant="stable") == 0


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"blue": 1}', "not a variant"),
        (b'{"stable": -1}', ">= 0"),
        (b'{"stable": "ten"}', ">= 0"),
        (b'{"stable": 0, "canary": 0}', "every weight is 0"),
    ],
)
async def test_put_split_refuses_bad_weights_and_keeps_the_old(
    make_proxy: ProxyFactory, serve: Serve, body: bytes, says: str
) -> None:
    app, _ = await two_variants(make_proxy, serve, {"stable": 90, "canary": 10})
    resp = await _put(app, body)
    assert resp.status == 400
    assert says in orjson.loads(resp.body)["error"]
    assert orjson.loads((await fetch(app.admin_address, "/split")).body)["weights"] == {"stable": 90, "canary": 10}


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml"])
async def test_put_split_refuses_a_body_that_is_not_declared_json(
    make_proxy: ProxyFactory, serve: Serve, content_type: str
) -> None:
    """RFC 9110 15.5.16: a body in a format the resource does not take is 415, with Accept naming the one it does."""
    app, _ = await two_variants(make_proxy, serve, {"stable": 90, "canary": 10})
    resp = await _put(app, b'{"stable": 1, "canary": 1}', content_type=content_type)
    assert resp.status == 415
    assert resp.header("accept") == "application/json"
    assert "application/json" in orjson.loads(resp.body)["error"]
    assert orjson.loads((await fetch(app.admin_address, "/split")).body)["weights"] == {"stable": 90, "canary": 10}
    # JSON with parameters, and a body whose type is not declared (RFC 9110 8.3: the server may look), pass
    for declared in ("application/json; charset=utf-8", "Application/JSON", None):
        resp = await _put(app, b'{"stable": 1, "canary": 1}', content_type=declared)
        assert resp.status == 200, (declared, resp)


async def test_another_method_on_split_is_405_with_allow(make_proxy: ProxyFactory, serve: Serve) -> None:
    """RFC 9110 15.5.6: a 405 response MUST carry Allow, listing what the resource takes."""
    app, _ = await two_variants(make_proxy, serve, {"stable": 90, "canary": 10})
    resp = await fetch(app.admin_address, "/split", method="POST")
    assert resp.status == 405
    assert orjson.loads(resp.body)["error"] == "Method Not Allowed"
    allow = resp.header("allow")
    assert allow is not None
    allowed = {m.strip() for m in allow.split(",")}
    assert {"GET", "PUT"} <= allowed and "POST" not in allowed


async def test_weight_zero_drains_without_dropping_in_flight(make_proxy: ProxyFactory, serve: Serve) -> None:
    gate = asyncio.Event()
    stable = await variant_server(serve, "stable")
    canary = await variant_server(serve, "canary", gate)
    app = await make_proxy(stable, upstreams={"canary": canary}, split={"weights": {"canary": 1}})
    slow = await Client.connect(app.proxy_address)
    await slow.send(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}")

    async def in_flight() -> bool:
        return app.plane is not None and app.plane.in_flight == 1

    await wait_until(in_flight)
    assert (await _put(app, b'{"stable": 1, "canary": 0}')).status == 200
    client = await Client.connect(app.proxy_address)
    assert await ask(client) == "stable"  # new requests: stable only
    gate.set()
    resp = await slow.response()
    assert resp.status == 200 and orjson.loads(resp.body)["variant"] == "canary"  # the old one finished


async def test_failover_moves_a_down_variants_share(make_proxy: ProxyFactory, serve: Serve) -> None:
    stable = await variant_server(serve, "stable")
    dead = f"http://127.0.0.1:{free_port()}"
    app = await make_proxy(
        stable, upstreams={"canary": dead}, split={"weights": {"stable": 50, "canary": 50}, "failover": True}
    )
    probe = next(p for p in app.probes if p.pool.name == "canary")

    async def probed() -> bool:
        return probe.healthy is False

    await wait_until(probed)
    client = await Client.connect(app.proxy_address)
    assert {await ask(client) for _ in range(20)} == {"stable"}
    ready = await fetch(app.admin_address, "/readyz")
    assert ready.status == 200  # a canary that is down does not take the pod out of its Service
    detail = orjson.loads(ready.body)
    assert detail["reports"]["upstream:canary"]["ok"] is False


async def test_without_failover_a_down_variant_answers_502(make_proxy: ProxyFactory, serve: Serve) -> None:
    stable = await variant_server(serve, "stable")
    app = await make_proxy(
        stable, upstreams={"canary": f"http://127.0.0.1:{free_port()}"}, split={"weights": {"canary": 1}}
    )
    client = await Client.connect(app.proxy_address)
    resp = await client.request("POST", "/x", body=b"{}")
    assert resp.status == 502


async def test_sighup_reloads_the_weights(
    spawn_proxy: Callable[..., Awaitable[ProxyProcess]], serve: Serve, tmp_path: Path
) -> None:
    stable, canary = await variant_server(serve, "stable"), await variant_server(serve, "canary")
    conf = tmp_path / "proxy.yaml"
    conf.write_text(f"upstreams:\n  canary: {canary}\nsplit:\n  weights: {{stable: 100, canary: 0}}\n")
    proc = await spawn_proxy(stable, "--config", str(conf))
    client = await Client.connect(proc.listen)
    assert await ask(client) == "stable"
    conf.write_text(f"upstreams:\n  canary: {canary}\nsplit:\n  weights: {{stable: 0, canary: 100}}\n")
    os.kill(proc.proc.pid, signal.SIGHUP)

    async def moved() -> bool:
        state = orjson.loads((await fetch(proc.admin, "/split")).body)
        return bool(state["weights"]["canary"] == 100)

    await wait_until(moved)
    assert await ask(client) == "canary"
    conf.write_text("split: {weights: {nosuch: 1}}\n")  # a bad file keeps what runs
    os.kill(proc.proc.pid, signal.SIGHUP)
    assert proc.proc.stderr is not None
    async with asyncio.timeout(TIMEOUT):  # the reload was tried, and refused, before looking again
        while b"SIGHUP: configuration not reloaded" not in await proc.proc.stderr.readline():
            pass
    assert await ask(client) == "canary"
    assert orjson.loads((await fetch(proc.admin, "/split")).body)["weights"] == {"stable": 0, "canary": 100}
    assert proc.proc.returncode is None


def test_huge_and_infinite_weights() -> None:
    """Weights are shares of any scale: 1e308 each is 50/50, not all traffic to one side, and an
    infinite weight is a config error naming the key, as PUT /split and SIGHUP refuse it."""
    from pydantic import ValidationError

    from proxy.routing.split import Splitter
    from proxy.settings import ProxyConfig

    cfg = ProxyConfig.model_validate(
        {"upstreams": {"canary": "http://127.0.0.1:8001"}, "split": {"weights": {"stable": 1, "canary": 1}}}
    )
    splitter = Splitter(cfg)
    splitter.set_weights(splitter.check_weights({"stable": 1e308, "canary": 1e308}), "test")
    assert splitter.state()["shares"] == {"stable": 0.5, "canary": 0.5}
    assert {splitter.table.pick(p) for p in (0.25, 0.75)} == {"stable", "canary"}
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValidationError, match=r"split\.weights"):
            ProxyConfig.model_validate(
                {"upstreams": {"canary": "http://127.0.0.1:8001"}, "split": {"weights": {"stable": bad, "canary": 1}}}
            )


def test_cli_upstream_flags() -> None:
    from proxy.dataplane.command import _upstreams
    from proxy.errors import ConfigError

    assert _upstreams(["http://a:1"]) == ("http://a:1", None)
    assert _upstreams(["stable=http://a:1", "canary=http://b:2"]) == ("http://a:1", {"canary": "http://b:2"})
    for bad in (["http://a:1", "http://b:2"], ["c=http://a:1", "c=http://b:2"], ["http://a:1", "stable=http://b:2"]):
        with pytest.raises(ConfigError):
            _upstreams(bad)


async def _put(
    app: ProxyApp, body: bytes, token: str | None = None, content_type: str | None = "application/json"
) -> Any:
    client = await Client.connect(app.admin_address)
    headers = {"Content-Type": content_type} if content_type is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        return await client.request("PUT", "/split", headers=headers, body=body)
    finally:
        await client.close()
