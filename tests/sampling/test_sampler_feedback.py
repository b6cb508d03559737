"""The sampler with feedback on: every 2xx response is queued for its predictions, sampled or not.

The side path is stopped before traffic, so each test reads the queue the sampler filled.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from proxy.app import ProxyApp
from proxy.sampling.sampler import FEEDBACK, SAMPLE, Sampler
from proxy.settings import Llm, Sampling
from tests.conftest import ProxyFactory
from tests.helpers import Client


async def _frozen(make_proxy: ProxyFactory, upstream: str, **cfg: Any) -> ProxyApp:
    app = await make_proxy(upstream, feedback={"enabled": True}, **cfg)
    side = app.sampling.side
    assert side is not None
    await asyncio.to_thread(side.stop)
    return app


def _kinds(app: ProxyApp) -> list[int]:
    return [job[0] for job in app.sampling.sampler.queue]


async def test_every_response_is_queued_for_feedback_whatever_the_coin(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await _frozen(make_proxy, upstream)
    client = await Client.connect(app.proxy_address)
    body = orjson.dumps({"instances": [[1.0, 2.0]]})
    resp = await client.request("POST", "/v1/models/iris:predict", body=body)
    assert resp.status == 200
    (job,) = app.sampling.sampler.queue
    kind, ex, _wall, req, out, _sse, _cut, _tail, size = job
    assert kind == FEEDBACK
    assert req == []  # the request body is not kept: the prediction is in the response
    assert b"".join(out) == resp.body and size == len(resp.body)
    assert ex.request_id == resp.header("x-request-id")  # the key is the id the client got


async def test_errors_and_event_streams_are_not_kept(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await _frozen(make_proxy, upstream)
    client = await Client.connect(app.proxy_address)
    assert (await client.request("POST", "/status/503", body=b"{}")).status == 503
    assert (await client.request("GET", "/sse?events=3&delay=0")).status == 200
    assert _kinds(app) == []
    assert app.sampling.sampler.feedback_dropped == {"oversized": 0, "incomplete": 0, "queue_full": 0}


async def test_a_sampled_request_is_one_sample_job(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await _frozen(make_proxy, upstream, sampling={"rate": 1.0})
    client = await Client.connect(app.proxy_address)
    await client.request("POST", "/v1/models/iris:predict", body=b'{"instances": [[1.0]]}')
    assert _kinds(app) == [SAMPLE]


async def test_an_oversized_request_loses_its_sample_not_its_prediction(
    make_proxy: ProxyFactory, upstream: str
) -> None:
    """A large request (an image) with a small answer: the sample goes, the prediction stays."""
    app = await _frozen(make_proxy, upstream, sampling={"rate": 1.0, "max_body_bytes": 4096})
    client = await Client.connect(app.proxy_address)
    resp = await client.request("POST", "/echo", body=b"x" * 5000)  # the echo's answer is small
    assert resp.status == 200
    assert _kinds(app) == [FEEDBACK]
    sampler = app.sampling.sampler
    assert sampler.dropped["oversized"] == 1
    assert sampler.feedback_dropped["oversized"] == 0


async def test_an_oversized_response_is_counted(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await _frozen(make_proxy, upstream, sampling={"max_body_bytes": 1024})
    client = await Client.connect(app.proxy_address)
    assert (await client.request("GET", "/big?size=5000")).status == 200
    assert _kinds(app) == []
    sampler = app.sampling.sampler
    assert sampler.feedback_dropped["oversized"] == 1
    assert sampler.held == 0 and sampler.bytes_in == sampler.bytes_out


async def test_a_full_queue_drops_and_counts(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await _frozen(make_proxy, upstream, sampling={"queue_size": 2})
    client = await Client.connect(app.proxy_address)
    for _ in range(5):
        await client.request("POST", "/v1/models/iris:predict", body=b'{"instances": [[1.0]]}')
    assert _kinds(app) == [FEEDBACK, FEEDBACK]
    assert app.sampling.sampler.feedback_dropped["queue_full"] == 3


async def test_openai_routes_are_not_kept_for_feedback(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await _frozen(make_proxy, upstream, llm={"routes": ["/echo"]})
    client = await Client.connect(app.proxy_address)
    await client.request("POST", "/echo", body=b"{}")
    assert FEEDBACK not in _kinds(app)


def test_feedback_alone_adds_the_hooks() -> None:
    assert Sampler(Sampling(), Llm(enabled=False), feedback=True).on_request_head is not None
    assert Sampler(Sampling(), Llm(enabled=False)).on_request_head is None
