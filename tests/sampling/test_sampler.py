"""The request-path sampler: what it queues, what it drops, and that it never touches the response.

The side path is stopped before traffic, so each test reads the queue the sampler filled.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from aiohttp import web

from proxy.app import ProxyApp
from proxy.sampling.sampler import SAMPLE, USAGE, Job, Sampler, last_event_end
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


# -- review findings (issue 8) ------------------------------------------------------------------


async def _chat_upstream(serve: Serve, pad: int) -> str:
    """/v1/chat/completions answering a plain JSON completion with usage, ``pad`` bytes of content."""

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        usage = {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}
        choice = {"index": 0, "message": {"role": "assistant", "content": "x" * pad}, "finish_reason": "stop"}
        return web.json_response({"id": "c1", "model": "llama", "choices": [choice], "usage": usage})

    app_ = web.Application()
    app_.router.add_post("/v1/chat/completions", chat)
    return await serve(app_)


async def test_token_usage_is_counted_when_a_sampled_llm_exchange_is_dropped(
    make_proxy: ProxyFactory, serve: Serve
) -> None:
    """Issue 8: "token usage is counted for every request, not only sampled ones". A sampled
    exchange whose body is over sampling.max_body_bytes is dropped as a sample (oversized), but its
    response tail was kept all the same: its usage must still be counted, as it is with sampling off.
    Today on_complete returns before queueing anything, so the tokens of every large sampled LLM
    exchange (long prompts, images, batched embeddings) are lost."""
    from tests.helpers import metric, scrape_metrics

    upstream = await _chat_upstream(serve, pad=4000)  # a response over the cap below
    app = await make_proxy(upstream, sampling={"rate": 1.0, "max_body_bytes": 1024})
    small = orjson.dumps({"model": "llama", "messages": [{"role": "user", "content": "hi"}]})
    large = orjson.dumps({"model": "llama", "messages": [{"role": "user", "content": "y" * 4000}]})
    for body in (small, large):
        assert await _post(app, "/v1/chat/completions", body) == 200
    side = app.sampling.side
    assert side is not None
    assert await asyncio.to_thread(side.wait_idle, 10.0)
    m = await scrape_metrics(app.admin_address)
    assert metric(m, "infermon_samples_dropped_total", reason="oversized") == 2
    # both exchanges were answered 200 with usage 11 + 5: both count
    assert metric(m, "infermon_llm_tokens_total", kind="prompt") == 22
    assert metric(m, "infermon_llm_tokens_total", kind="completion") == 10


async def test_token_usage_is_counted_when_the_configured_adapter_does_not_read_the_llm_body(
    make_proxy: ProxyFactory, serve: Serve
) -> None:
    """The same promise with a configured adapter: a proxy in front of a server that serves KServe v1
    and OpenAI routes, sampling.adapter kserve_v1. The chat sample is dropped as unparsable by the
    side path (the body is not what kserve_v1 reads), and its usage goes with it: worker._sample
    returns on Dropped before counting tokens."""
    from tests.helpers import metric, scrape_metrics

    upstream = await _chat_upstream(serve, pad=10)
    app = await make_proxy(upstream, sampling={"rate": 1.0, "adapter": "kserve_v1"})
    body = orjson.dumps({"model": "llama", "messages": [{"role": "user", "content": "hi"}]})
    assert await _post(app, "/v1/chat/completions", body) == 200
    side = app.sampling.side
    assert side is not None
    assert await asyncio.to_thread(side.wait_idle, 10.0)
    m = await scrape_metrics(app.admin_address)
    assert metric(m, "infermon_samples_dropped_total", reason="unparsable") == 1
    assert metric(m, "infermon_llm_tokens_total", kind="prompt") == 11


async def test_event_stream_with_cr_line_ends_is_cut_at_an_event_boundary(
    make_proxy: ProxyFactory, serve: Serve
) -> None:
    """Issue 8: "SSE responses are captured event by event up to the cap". The SSE grammar (WHATWG
    HTML, 9.2.5) ends lines in CRLF, LF or CR alone, so "\\r\\r" ends an event as "\\n\\n" does.
    Sampler._cut looks only for "\\n\\n" and "\\r\\n\\r\\n": a CR-only stream over the cap keeps no
    event at all."""

    async def sse(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"".join(b'data: {"i": %d}\r\r' % i for i in range(40)))  # one piece, past the cap
        await resp.write_eof()
        return resp

    app_ = web.Application()
    app_.router.add_get("/sse", sse)
    app = await _frozen(make_proxy, await serve(app_), sampling={"rate": 1.0, "max_body_bytes": 100})
    client = await Client.connect(app.proxy_address)
    resp = await client.request("GET", "/sse")
    assert resp.status == 200
    (job,) = _jobs(app)
    _, _, _, _, out, sse_, cut, _, _ = job
    kept = b"".join(out)
    assert sse_ and cut
    assert kept.startswith(b'data: {"i": 0}\r\r')  # the whole events that fit in 100 bytes
    assert kept.endswith(b"\r\r") and len(kept) <= 100


@pytest.mark.parametrize(
    ("data", "end"),
    [
        (b"data: a\n\ndata: b\n\n", 18),
        (b"data: a\r\rdata: b", 9),
        (b"data: a\r\n\r\ndata", 11),
        (b"data: a\n\r\n", 10),
        (b"data: a\r\r\n", 10),
        (b": comment\n\n", 11),
        (b"data: a\r\n", 0),  # one line end: the event is not over
        (b"data: a\n\r", 0),  # a last CR may be half of a CRLF
        (b"", 0),
    ],
)
def test_last_event_end_follows_the_event_stream_line_ends(data: bytes, end: int) -> None:
    assert last_event_end(data) == end


async def test_the_byte_budget_is_given_back_whatever_became_of_the_sample(
    make_proxy: ProxyFactory, upstream: str
) -> None:
    app = await _frozen(
        make_proxy,
        upstream,
        sampling={"rate": 0.5, "always": {"status": ["5xx"]}, "max_body_bytes": 300, "queue_size": 2},
    )
    client = await Client.connect(app.proxy_address)
    for i in range(12):
        await client.request("POST", "/echo", body=b"x" * (50 + 40 * i))  # some over the cap
        await client.request("POST", "/status/503", body=b"{}")
        await client.request("GET", "/sse?events=30&delay=0")  # cut at the cap
    sampler = _sampler(app)
    assert sampler.held == 0  # nothing in flight holds a byte of the budget
    queued = sum(job[8] for job in _jobs(app))
    assert sampler.bytes_in - sampler.bytes_out == queued


async def test_candidates_of_a_status_rule_share_the_byte_budget(make_proxy: ProxyFactory, serve: Serve) -> None:
    release = asyncio.Event()
    arrived: list[int] = []

    async def slow(request: web.Request) -> web.Response:
        arrived.append(len(await request.read()))
        await release.wait()
        return web.json_response({"ok": True})

    app_ = web.Application()
    app_.router.add_post("/slow", slow)
    app = await _frozen(
        make_proxy,
        await serve(app_),
        sampling={"always": {"status": ["5xx"]}, "max_body_bytes": 4096, "max_queue_bytes": 5000},
    )
    sampler = _sampler(app)
    clients = [await Client.connect(app.proxy_address) for _ in range(3)]
    for c in clients:  # three requests in flight, each holding 2 KB until its status is known
        await c.send(b"POST /slow HTTP/1.1\r\nHost: t\r\nContent-Length: 2000\r\n\r\n" + b"y" * 2000)

    async def all_arrived() -> bool:
        return len(arrived) == 3

    await wait_until(all_arrived)
    assert sampler.held == 4000  # the third body did not fit: it went upstream, not into the budget
    release.set()
    for c in clients:
        assert (await c.response()).status == 200
    assert sampler.held == 0
    assert _jobs(app) == []  # 200s: no rule kept them


async def test_pipelined_requests_each_keep_their_own_body(make_proxy: ProxyFactory, upstream: str) -> None:
    """Two requests written in one segment (HTTP/1.1 pipelining): the second one's body is parsed
    before its turn; its sample must still hold its bytes, not an empty body."""
    from tests.helpers import build_request

    app = await _frozen(make_proxy, upstream, sampling={"rate": 1.0})
    first = orjson.dumps({"instances": [[1.0]]})
    second = orjson.dumps({"instances": [[2.0, 3.0]]})
    client = await Client.connect(app.proxy_address)
    await client.send(
        build_request("POST", "/v1/models/a:predict", body=first)
        + build_request("POST", "/v1/models/b:predict", body=second)
    )
    one, two = await client.response(), await client.response()
    assert one.status == two.status == 200
    assert orjson.loads(two.body)["length"] == len(second)  # the upstream got it
    bodies = {job[1].path: b"".join(job[3]) for job in _jobs(app)}
    assert bodies == {"/v1/models/a:predict": first, "/v1/models/b:predict": second}
