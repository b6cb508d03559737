"""The request-path sampler: what it queues, what it drops, and that it never touches the response.

The side path is stopped before traffic, so each test reads the queue the sampler filled.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from proxy.app import ProxyApp
from proxy.sampling.sampler import SAMPLE, USAGE, Job, Sampler
from tests.conftest import ProxyFactory, Serve
from tests.helpers import Client, free_port, wait_until


async def _frozen(make_proxy: ProxyFactory, upstream: str, **cfg: Any) -> ProxyApp:
    """A proxy whose side path is stopped: its queue keeps what the sampler put there."""
    app = await make_proxy(upstream, **cfg)
    side = app.sampling.side
    assert side is not None
    await asyncio.to_thread(side.stop)
    return app


def _sampler(app: ProxyApp) -> Sampler:
    return app.sampling.sampler


def _jobs(app: ProxyApp) -> list[Job]:
    return list(_sampler(app).queue)


async def _post(app: ProxyApp, path: str, body: bytes, headers: dict[str, str] | None = None) -> int:
    client = await Client.connect(app.proxy_address)
    resp = await client.request(
        "POST", path, headers={"Content-Type": "application/json", **(headers or {})}, body=body
    )
    return resp.status


async def test_rate_one_queues_both_bodies_as_they_were(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await _frozen(make_proxy, upstream, sampling={"rate": 1.0})
    body = orjson.dumps({"instances": [[1.0, 2.0], [3.0, 4.0]]})
    client = await Client.connect(app.proxy_address)
    resp = await client.request("POST", "/v1/models/iris:predict", body=body)
    assert resp.status == 200
    (job,) = _jobs(app)
    kind, ex, _wall, req, out, sse, cut, _tail, size = job
    assert kind == SAMPLE
    assert b"".join(req) == body
    assert b"".join(out) == resp.body  # the response exactly as the client got it
    assert not sse and not cut
    assert size == len(body) + len(resp.body)
    assert ex.path == "/v1/models/iris:predict"


async def test_rate_zero_keeps_nothing(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await _frozen(make_proxy, upstream, sampling={"rate": 0.0}, llm={"enabled": True})
    for _ in range(20):
        assert await _post(app, "/echo", b"{}") == 200
    assert _jobs(app) == []


def test_sampling_off_and_llm_off_adds_no_hook() -> None:
    from proxy.dataplane.hooks import Hooks
    from proxy.settings import Llm, Sampling

    sampler = Sampler(Sampling(), Llm(enabled=False))
    hooks = Hooks([sampler])
    assert not (hooks.request_head or hooks.request_body or hooks.upstream_head or hooks.response_body)
    assert not hooks.complete


async def test_status_rule_samples_every_5xx_only(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await _frozen(make_proxy, upstream, sampling={"rate": 0.0, "always": {"status": ["5xx"]}})
    assert await _post(app, "/status/200", b'{"a": 1}') == 200
    assert await _post(app, "/status/404", b'{"a": 2}') == 404
    assert await _post(app, "/status/503", b'{"a": 3}') == 503
    jobs = _jobs(app)
    assert [j[1].status for j in jobs] == [503]
    assert b"".join(jobs[0][3]) == b'{"a": 3}'  # the request body was held until the status came


async def test_status_rule_covers_the_proxys_own_errors(make_proxy: ProxyFactory) -> None:
    # nothing listens there: the proxy answers 502 itself, no upstream head ever comes
    app = await _frozen(make_proxy, f"http://127.0.0.1:{free_port()}", sampling={"always": {"status": ["502"]}})
    assert await _post(app, "/x", b'{"a": 1}') == 502
    (job,) = _jobs(app)
    assert job[1].status == 502 and job[1].error == "connect"


async def test_variant_rule(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await _frozen(make_proxy, upstream, sampling={"always": {"variants": ["stable"]}})
    assert await _post(app, "/echo", b"{}") == 200
    assert len(_jobs(app)) == 1


async def test_oversized_bodies_are_dropped_and_counted(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await _frozen(make_proxy, upstream, sampling={"rate": 1.0, "max_body_bytes": 1024})
    sampler = _sampler(app)
    assert await _post(app, "/echo", b"x" * 2000) == 200  # Content-Length over the cap
    client = await Client.connect(app.proxy_address)
    resp = await client.request("GET", "/big?size=5000")  # response over the cap
    assert resp.status == 200 and len(resp.body) == 5000
    chunked = b"".join(b"%x\r\n%s\r\n" % (300, b"y" * 300) for _ in range(5)) + b"0\r\n\r\n"
    resp = await client.request("POST", "/echo", headers={"Transfer-Encoding": "chunked"}, body=chunked)
    assert resp.status == 200
    assert _jobs(app) == []
    assert sampler.dropped["oversized"] == 3


async def test_event_stream_is_cut_at_an_event_boundary_and_keeps_its_tail(
    make_proxy: ProxyFactory, upstream: str
) -> None:
    app = await _frozen(make_proxy, upstream, sampling={"rate": 1.0, "max_body_bytes": 100}, llm={"tail_bytes": 256})
    client = await Client.connect(app.proxy_address)
    resp = await client.request("GET", "/sse?events=40&delay=0")
    assert resp.status == 200
    (job,) = _jobs(app)
    _, _, _, _, out, sse, cut, tail, _ = job
    kept = b"".join(out)
    assert sse and cut
    assert 0 < len(kept) <= 100
    assert kept.endswith(b"\n\n") and kept.startswith(b"data: {")
    assert tail.endswith(b"data: [DONE]\n\n")
    assert b'data: {"i": 39}' in tail  # the last event before [DONE]: where a usage object would be
    full = b"".join(b'data: {"i": %d}\n\n' % i for i in range(40)) + b"data: [DONE]\n\n"
    assert resp.body == full  # the client got every event, whatever the sampler kept


async def test_queue_full_drops_and_counts(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await _frozen(make_proxy, upstream, sampling={"rate": 1.0, "queue_size": 2})
    for _ in range(5):
        assert await _post(app, "/echo", b"{}") == 200
    assert len(_jobs(app)) == 2
    assert _sampler(app).dropped["queue_full"] == 3


async def test_queue_byte_budget(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await _frozen(make_proxy, upstream, sampling={"rate": 1.0, "max_body_bytes": 8192, "max_queue_bytes": 4096})
    for _ in range(3):
        assert await _post(app, "/echo", b"z" * 1500) == 200  # ~1.5 KB in, ~2 KB echoed back
    assert len(_jobs(app)) == 1
    assert _sampler(app).dropped["queue_full"] == 2


async def test_llm_route_queues_the_response_tail_when_not_sampled(make_proxy: ProxyFactory, serve: Serve) -> None:
    async def chat(request: web.Request) -> web.Response:
        usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
        return web.json_response({"id": "c1", "model": "m", "choices": [], "usage": usage})

    app_ = web.Application()
    app_.router.add_post("/v1/chat/completions", chat)
    app = await _frozen(make_proxy, await serve(app_), llm={"tail_bytes": 256})
    assert await _post(app, "/v1/chat/completions", b'{"model": "m", "messages": []}') == 200
    (job,) = _jobs(app)
    assert job[0] == USAGE
    assert job[7].endswith(b'"total_tokens": 10}}')
    assert await _post(app, "/v1/other", b"{}") == 404  # not an OpenAI route: nothing
    assert len(_jobs(app)) == 1


async def test_client_abort_mid_response_is_incomplete(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await _frozen(make_proxy, upstream, sampling={"rate": 1.0, "max_body_bytes": 1 << 20})
    reader, writer = await asyncio.open_connection(*app.proxy_address)
    writer.write(b"GET /sse?events=1000&delay=0.01 HTTP/1.1\r\nHost: t\r\n\r\n")
    await reader.readuntil(b"data: ")
    writer.transport.abort()
    sampler = _sampler(app)

    async def dropped() -> bool:
        return sampler.dropped["incomplete"] == 1

    await wait_until(dropped)
    assert _jobs(app) == []
