"""CloudEvents sink against a real receiver: headers and bodies, retries, drops, batches, shutdown."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from proxy.sampling.sample import Extracted, Sample
from proxy.settings import CloudEventsSink as CloudEventsSinkConfig
from proxy.settings import Sinks
from proxy.sinks.base import SinksCollector, build_sinks, rfc3339
from proxy.sinks.cloudevents import (
    BATCH_CONTENT_TYPE,
    REQUEST_TYPE,
    RESPONSE_TYPE,
    CloudEventsSink,
    header_value,
)
from tests.helpers import TIMEOUT, free_port, metric, parse_metrics, wait_until

pytestmark = pytest.mark.timeout(60)

T0 = 1_767_323_045.5  # 2026-01-02T03:04:05.500Z
REQUEST = {"instances": [[6.8, 2.8, 4.8, 1.4], [6.0, 3.4, 4.5, 1.6]]}
RESPONSE = {"predictions": [1, 1]}


@dataclass
class Received:
    headers: dict[str, str]  # names lowercased
    body: bytes


class Receiver:
    """An aiohttp server on 127.0.0.1 that records what it accepts; it can be scripted to fail
    (``answers``: statuses given in order before it answers 200), held (``gate`` cleared), stopped
    and started again on the same port."""

    def __init__(self) -> None:
        self.accepted: list[Received] = []
        self.attempts = 0
        self.answers: list[int] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.held = 0
        self.port = 0
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    async def start(self, port: int = 0) -> int:
        app = web.Application()
        app.router.add_post("/", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        self._runner = runner
        await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
        self.port = runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.attempts += 1
        self.held += 1
        try:
            await self.gate.wait()
        finally:
            self.held -= 1
        status = self.answers.pop(0) if self.answers else 200
        if status != 200:
            headers = {"Retry-After": "0"} if status == 429 else {}
            return web.Response(status=status, text="nope", headers=headers)
        async with self._changed:
            self.accepted.append(Received({k.lower(): v for k, v in request.headers.items()}, body))
            self._changed.notify_all()
        return web.Response(status=202)

    async def wait_for(self, n: int, timeout: float = TIMEOUT) -> list[Received]:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.accepted) >= n)
        return self.accepted


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    r.gate.set()
    await r.stop()


def make_sample(
    request_id: str = "0009174a-24a8-4603-b098-09c8799950e9",
    status: int = 200,
    *,
    request_type: str | None = "application/json",
    response_type: str | None = "application/json",
    stream: bool = False,
    error: str | None = None,
) -> Sample:
    return Sample(
        request_id=request_id,
        timestamp=T0,
        method="POST",
        path="/v1/models/sklearn-iris:predict",
        status=status,
        model="sklearn-iris",
        version="",
        variant="",
        request_headers=[("Content-Type", request_type)] if request_type else [],
        response_headers=[("content-type", response_type)] if response_type else [],
        request_body=b"raw, not redacted",  # never sent: sinks send the Extracted bodies
        response_body=b"raw, not redacted",
        response_stream=stream,
        duration=0.125,
        error=error,
    )


def json_extracted() -> Extracted:
    return Extracted(
        adapter="kserve_v1",
        request=REQUEST,
        response=RESPONSE,
        request_body=orjson.dumps(REQUEST),
        response_body=orjson.dumps(RESPONSE),
    )


def config(url: str, **overrides: Any) -> CloudEventsSinkConfig:
    return CloudEventsSinkConfig.model_validate(
        {
            "url": url,
            "source": "http://localhost:9081/",
            "inference_service": "sklearn-iris",
            "namespace": "default",
            "component": "predictor",
            "endpoint": "default",
            "backoff": 0.02,
            **overrides,
        }
    )


async def started(cfg: CloudEventsSinkConfig) -> CloudEventsSink:
    sink = CloudEventsSink(cfg)
    await sink.start()
    return sink


def by_type(events: list[Received]) -> dict[str, Received]:
    return {e.headers["ce-type"]: e for e in events}


def no_drops(sink: CloudEventsSink) -> bool:
    return sink.stats.dropped == dict.fromkeys(CloudEventsSink.reasons, 0)


# -- what is sent ---------------------------------------------------------------------------------


def test_header_values_are_percent_encoded_as_the_http_binding_says() -> None:
    assert header_value("sklearn-iris") == "sklearn-iris"
    assert header_value("") == ""
    assert header_value('a b"%é') == "a%20b%22%25%C3%A9"
    assert header_value("line\r\nbreak") == "line%0D%0Abreak"


async def test_binary_mode_headers_and_bodies_as_the_kserve_logger_sends_them(receiver: Receiver) -> None:
    cfg = config(receiver.url, headers={"Authorization": "Bearer t0ken", "ce-id": "not-ours-to-set"})
    sink = await started(cfg)
    try:
        sink.offer(make_sample(), json_extracted())
        events = by_type(await receiver.wait_for(2))
    finally:
        await sink.aclose()
    assert set(events) == {REQUEST_TYPE, RESPONSE_TYPE}
    request, response = events[REQUEST_TYPE], events[RESPONSE_TYPE]
    common = {
        "ce-specversion": "1.0",
        "ce-id": "0009174a-24a8-4603-b098-09c8799950e9",  # the request id, the same in both
        "ce-source": "http://localhost:9081/",
        "ce-inferenceservicename": "sklearn-iris",
        "ce-namespace": "default",
        "ce-component": "predictor",
        "ce-endpoint": "default",
        "content-type": "application/json",
        "authorization": "Bearer t0ken",
    }
    for event in (request, response):
        assert {k: event.headers.get(k) for k in common} == common
        assert event.headers["user-agent"].startswith("infermon/")
    assert request.headers["ce-time"] == "2026-01-02T03:04:05.375Z"  # when the request started
    assert response.headers["ce-time"] == "2026-01-02T03:04:05.500Z"  # when it ended
    assert request.body == orjson.dumps(REQUEST)
    assert response.body == orjson.dumps(RESPONSE)
    assert "ce-statuscode" not in request.headers
    assert response.headers["ce-statuscode"] == "200"
    assert "ce-error" not in request.headers
    assert sink.stats.sent == 2
    assert no_drops(sink)


async def test_every_response_status_is_sent_not_only_200(receiver: Receiver) -> None:
    sink = await started(config(receiver.url))
    try:
        sink.offer(make_sample("r-500", 500), json_extracted())
        failed = Extracted(adapter="none", request=REQUEST, request_body=orjson.dumps(REQUEST))
        sink.offer(make_sample("r-0", 0, response_type=None, error="connect"), failed)
        events = await receiver.wait_for(4)
    finally:
        await sink.aclose()
    responses = {e.headers["ce-id"]: e for e in events if e.headers["ce-type"] == RESPONSE_TYPE}
    assert responses["r-500"].headers["ce-statuscode"] == "500"
    assert responses["r-500"].body == orjson.dumps(RESPONSE)
    no_response = responses["r-0"]  # no response head came: the event still says so
    assert no_response.headers["ce-statuscode"] == "0"
    assert no_response.headers["ce-error"] == "connect"
    assert no_response.body == b""
    assert "content-type" not in no_response.headers


async def test_an_event_stream_is_sent_as_captured(receiver: Receiver) -> None:
    sse = b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\ndata: [DONE]\n\n'
    sink = await started(config(receiver.url))
    try:
        as_captured = Extracted(adapter="openai", request={"stream": True}, request_body=b'{"stream":true}')
        as_captured.response = [{"choices": [{"delta": {"content": "Hi"}}]}]
        as_captured.response_body = sse
        sink.offer(make_sample("raw", response_type="text/event-stream", stream=True), as_captured)
        reencoded = Extracted(adapter="openai", response=as_captured.response)
        reencoded.response_body = orjson.dumps(as_captured.response)
        sink.offer(make_sample("json", response_type="text/event-stream", stream=True), reencoded)
        events = await receiver.wait_for(4)
    finally:
        await sink.aclose()
    responses = {e.headers["ce-id"]: e for e in events if e.headers["ce-type"] == RESPONSE_TYPE}
    assert responses["raw"].headers["content-type"] == "text/event-stream"
    assert responses["raw"].body == sse
    assert responses["json"].headers["content-type"] == "application/json"
    assert orjson.loads(responses["json"].body) == as_captured.response


# -- delivery ---------------------------------------------------------------------------------------


async def test_a_receiver_that_goes_down_and_comes_back_loses_nothing(receiver: Receiver) -> None:
    sink = await started(config(receiver.url, retries=30))
    try:
        sink.offer(make_sample("before"), json_extracted())
        await receiver.wait_for(2)
        port = receiver.port
        await receiver.stop()
        for i in range(5):
            sink.offer(make_sample(f"down-{i}"), json_extracted())

        async def all_failed_once() -> bool:  # every event has met the closed port at least once
            return sink.stats.retries >= 10

        await wait_until(all_failed_once, timeout=TIMEOUT)
        await receiver.start(port)
        events = await receiver.wait_for(12)

        async def counted() -> bool:  # the receiver has them; the sink counts each when its answer is read
            return sink.stats.sent == 12

        await wait_until(counted, timeout=TIMEOUT)
        registry = CollectorRegistry()
        registry.register(sink.collector())
        metrics = parse_metrics(generate_latest(registry).decode())
    finally:
        await sink.aclose()
    assert len(events) == 12
    expected = {(rid, t) for rid in ["before", *(f"down-{i}" for i in range(5))] for t in (REQUEST_TYPE, RESPONSE_TYPE)}
    assert {(e.headers["ce-id"], e.headers["ce-type"]) for e in events} == expected
    assert sink.stats.sent == 12
    assert no_drops(sink)
    assert metric(metrics, "infermon_sink_sent_total", sink="cloudevents") == 12
    assert metric(metrics, "infermon_sink_retries_total", sink="cloudevents") >= 10
    assert metric(metrics, "infermon_sink_latency_seconds_count", sink="cloudevents") == 12
    assert metric(metrics, "infermon_sink_dropped_total", sink="cloudevents", reason="failed") == 0
    assert metric(metrics, "infermon_sink_queue", sink="cloudevents") == 0


async def test_5xx_and_429_are_retried_until_accepted(receiver: Receiver) -> None:
    receiver.answers = [500, 502, 429]
    sink = await started(config(receiver.url, retries=3))
    try:
        sink.offer(make_sample(), json_extracted())
        await receiver.wait_for(2)
    finally:
        await sink.aclose()
    assert receiver.attempts == 5
    assert sink.stats.retries == 3
    assert sink.stats.sent == 2
    assert no_drops(sink)


async def test_retries_run_out_then_the_events_are_counted_failed(receiver: Receiver) -> None:
    receiver.answers = [503] * 6
    sink = await started(config(receiver.url, retries=2))
    try:
        sink.offer(make_sample(), json_extracted())

        async def failed() -> bool:
            return sink.stats.dropped["failed"] == 2

        await wait_until(failed, timeout=TIMEOUT)
    finally:
        await sink.aclose()
    assert receiver.attempts == 6  # 1 + 2 retries, for each of the two events
    assert sink.stats.retries == 4
    assert sink.stats.sent == 0


async def test_other_4xx_is_not_retried_and_is_logged_with_its_status(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.answers = [400, 400]
    caplog.set_level(logging.ERROR, logger="infermon.sinks.cloudevents")
    sink = await started(config(receiver.url, retries=5))
    try:
        sink.offer(make_sample(), json_extracted())

        async def failed() -> bool:
            return sink.stats.dropped["failed"] == 2

        await wait_until(failed, timeout=TIMEOUT)
    finally:
        await sink.aclose()
    assert receiver.attempts == 2
    assert sink.stats.retries == 0
    logged = [r.getMessage() for r in caplog.records if r.name == "infermon.sinks.cloudevents"]
    assert len(logged) == 1  # the second failure within the minute is held back
    assert "HTTP 400 'nope'" in logged[0]
    assert receiver.url in logged[0]


async def test_at_most_batch_size_deliveries_in_flight(receiver: Receiver) -> None:
    receiver.gate.clear()
    sink = await started(config(receiver.url, batch_size=3))
    try:
        for i in range(5):
            sink.offer(make_sample(f"r{i}"), json_extracted())

        async def three_held() -> bool:
            return receiver.held == 3

        await wait_until(three_held, timeout=TIMEOUT)
        assert sink.queued() == 7  # the pump takes the next one only when a delivery ends
        receiver.gate.set()
        await receiver.wait_for(10)
    finally:
        await sink.aclose()
    assert sink.stats.sent == 10


async def test_a_slow_receiver_fills_the_queue_only_and_offer_returns_at_once(receiver: Receiver) -> None:
    receiver.gate.clear()  # the receiver answers nothing until the gate opens
    sink = await started(config(receiver.url, queue_size=4, batch_size=1))
    try:
        sink.offer(make_sample("first"), json_extracted())

        async def one_held() -> bool:
            return receiver.held == 1

        await wait_until(one_held, timeout=TIMEOUT)
        times = []
        for i in range(200):
            t = time.perf_counter()
            sink.offer(make_sample(f"r{i}"), json_extracted())
            times.append(time.perf_counter() - t)
        queue_full = sink.stats.dropped["queue_full"]
        # in the queue of 4: the first's response event and r0's two; a pair that does not fit is dropped whole
        assert queue_full == 2 * 199
        times.sort()  # the 99th percentile: one call may lose the CPU to another process on a shared machine
        assert times[100] < 0.0001, f"median offer {times[100] * 1e6:.0f} us"
        assert times[198] < 0.001, f"99th percentile offer {times[198] * 1e6:.0f} us"
        receiver.gate.set()
        await receiver.wait_for(4)
    finally:
        await sink.aclose()
    assert sink.stats.sent == 4
    assert sink.stats.sent + sink.stats.dropped["queue_full"] == 2 * 201


async def test_batch_mode_sends_structured_batches(receiver: Receiver) -> None:
    sink = CloudEventsSink(config(receiver.url, mode="batch", batch_size=4, headers={"X-Tenant": "a"}))
    sink.offer(make_sample("json"), json_extracted())
    sse = b"data: hello\n\n"
    stream = Extracted(adapter="openai", response_body=sse)
    sink.offer(make_sample("sse", request_type=None, response_type="text/event-stream", stream=True), stream)
    octets = Extracted(adapter="none", request_body=b"\x00\x01\xff")
    sink.offer(make_sample("bin", 0, request_type="application/octet-stream", error="timeout"), octets)
    await sink.start()  # all six events queued: one batch of 4, one of 2
    try:
        posts = await receiver.wait_for(2)
    finally:
        await sink.aclose()
    assert all(p.headers["content-type"] == BATCH_CONTENT_TYPE for p in posts)
    assert all(p.headers["x-tenant"] == "a" for p in posts)
    batches = [orjson.loads(p.body) for p in posts]
    assert sorted(len(b) for b in batches) == [2, 4]
    events = {(e["id"], e["type"]): e for b in batches for e in b}
    assert len(events) == 6
    json_request = events["json", REQUEST_TYPE]
    assert json_request == {
        "specversion": "1.0",
        "id": "json",
        "source": "http://localhost:9081/",
        "type": REQUEST_TYPE,
        "time": rfc3339(T0 - 0.125),
        "datacontenttype": "application/json",
        "inferenceservicename": "sklearn-iris",
        "namespace": "default",
        "component": "predictor",
        "endpoint": "default",
        "data": REQUEST,
    }
    json_response = events["json", RESPONSE_TYPE]
    assert json_response["data"] == RESPONSE
    assert json_response["statuscode"] == "200"
    assert json_response["time"] == rfc3339(T0)
    sse_response = events["sse", RESPONSE_TYPE]
    assert sse_response["datacontenttype"] == "text/event-stream"
    assert sse_response["data"] == "data: hello\n\n"
    assert "data" not in events["sse", REQUEST_TYPE]  # no body, no content type
    assert "datacontenttype" not in events["sse", REQUEST_TYPE]
    binary = events["bin", REQUEST_TYPE]
    assert binary["datacontenttype"] == "application/octet-stream"
    assert base64.b64decode(binary["data_base64"]) == b"\x00\x01\xff"
    assert events["bin", RESPONSE_TYPE]["statuscode"] == "0"
    assert events["bin", RESPONSE_TYPE]["error"] == "timeout"
    assert sink.stats.sent == 6


# -- shutdown -----------------------------------------------------------------------------------------


async def test_shutdown_delivers_what_is_queued(receiver: Receiver) -> None:
    sink = await started(config(receiver.url, batch_size=2))
    for i in range(10):
        sink.offer(make_sample(f"r{i}"), json_extracted())
    await sink.aclose()
    assert len(receiver.accepted) == 20
    assert sink.stats.sent == 20
    assert no_drops(sink)


async def test_shutdown_with_the_receiver_down_counts_what_is_left_and_returns_in_time() -> None:
    sink = await started(config(f"http://127.0.0.1:{free_port()}/", retries=10, backoff=0.05))
    sink.offer(make_sample("a"), json_extracted())
    sink.offer(make_sample("b"), json_extracted())
    t = time.monotonic()
    await sink.aclose(timeout=0.5)
    assert time.monotonic() - t < 3.0
    assert sink.stats.dropped["shutdown"] == 4  # the next retry would have waited past the limit
    assert sink.stats.dropped["failed"] == 0
    sink.offer(make_sample("late"), json_extracted())
    assert sink.stats.dropped["shutdown"] == 6


async def test_a_receiver_that_never_answers_is_cut_off_at_shutdown(receiver: Receiver) -> None:
    receiver.gate.clear()
    sink = await started(config(receiver.url, timeout=30.0))
    sink.offer(make_sample(), json_extracted())

    async def held() -> bool:
        return receiver.held == 2

    await wait_until(held, timeout=TIMEOUT)
    t = time.monotonic()
    await sink.aclose(timeout=0.3)
    assert time.monotonic() - t < 3.0
    assert sink.stats.dropped["shutdown"] == 2


async def test_build_sinks_and_one_collector_for_all(tmp_path: Path) -> None:
    cfg = Sinks.model_validate(
        {"jsonl": {"path": str(tmp_path / "s.jsonl")}, "cloudevents": {"url": "http://127.0.0.1:9/"}}
    )
    sinks = build_sinks(cfg)
    assert [s.name for s in sinks] == ["jsonl", "cloudevents"]
    assert build_sinks(Sinks()) == []
    registry = CollectorRegistry()
    registry.register(SinksCollector(sinks))
    text = generate_latest(registry).decode()
    assert text.count("# HELP infermon_sink_sent_total") == 1
    metrics = parse_metrics(text)
    assert metric(metrics, "infermon_sink_dropped_total", sink="cloudevents", reason="failed") == 0
    assert metric(metrics, "infermon_sink_dropped_total", sink="jsonl", reason="write_error") == 0
    assert metric(metrics, "infermon_sink_retries_total", sink="cloudevents") == 0
    for sink in sinks:
        await sink.aclose()
