"""CloudEvents sink: each sample as two CloudEvents 1.0 over HTTP, as the KServe logger sends them.

Events. For every sample, a request event and a response event sharing one ``id`` (the request id):

- ``type`` ``org.kubeflow.serving.inference.request``: data = the redacted request body, its
  content type the request's; ``time`` = when the request started
- ``type`` ``org.kubeflow.serving.inference.response``: data = the redacted response body (an event
  stream: the captured events), its content type the response's; ``time`` = when the exchange ended.
  Sent for every status, not only 200 (the KServe logger drops the others), with the status in the
  ``statuscode`` extension attribute (the name KServe's own proposal for that uses), and ``error``
  (connect, timeout, reset, ...) when the exchange failed.
- ``specversion`` 1.0, ``source`` from ``sinks.cloudevents.source`` (KServe's default,
  ``http://localhost:9081/``, is the config's), and the KServe extension attributes
  ``inferenceservicename``, ``namespace``, ``component``, ``endpoint`` from the config, sent even
  when empty, as KServe sends them.

Modes. ``binary`` (the KServe logger's): one POST per event, the attributes in ``ce-*`` headers
(values percent-encoded as the HTTP binding says), the data as the body. ``batch``: the structured
JSON form of up to ``batch_size`` events in one ``application/cloudevents-batch+json`` POST; JSON
data is embedded as ``data``, text as a ``data`` string, anything else as ``data_base64``.
``sinks.cloudevents.headers`` go with every POST; they cannot replace the ``ce-*`` attributes.

Delivery never touches the proxy's event loop. ``offer`` (side-path thread) appends both events to a
bounded deque, or drops both (``queue_full``); a thread of its own runs an asyncio loop with one
aiohttp session, and at most ``batch_size`` POSTs (binary) or ``BATCHES_IN_FLIGHT`` (batch) in
flight. A connection error, a timeout (``timeout``, per attempt), a 5xx or a 429 is retried up to
``retries`` times, after ``backoff`` seconds doubling each time, capped at 30 s (a ``Retry-After``
in seconds is honoured within that cap). Any other answer that is not 2xx is final: the events are
counted ``failed`` and logged with the status, at most once a minute. Redirects are not followed.
A slow receiver fills the queue, and only the queue: offers keep returning at once and the rest
is dropped and counted. The sink only ever sees copies of the bodies; the proxied stream is
never held or changed.

Shutdown (:meth:`CloudEventsSink.aclose`): what is queued or in flight is delivered within the time
limit (``timeout`` by default); what is left then, a retry that would wait past it included, is
dropped and counted (``shutdown``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import orjson

from proxy import __version__
from proxy.sampling.sample import Extracted, Sample
from proxy.settings import CloudEventsSink as CloudEventsSinkConfig
from proxy.sinks.base import LogLimiter, Sink, rfc3339

log = logging.getLogger("infermon.sinks.cloudevents")

REQUEST_TYPE = "org.kubeflow.serving.inference.request"
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"
SPECVERSION = "1.0"
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
MAX_BACKOFF = 30.0  # seconds, the most one retry waits
BATCHES_IN_FLIGHT = 4  # batch mode: POSTs at once
USER_AGENT = f"infermon/{__version__}"

#: the HTTP binding's rule: a header value keeps U+0021..U+007E except '"' and '%'; the rest is
#: percent-encoded (UTF-8)
_HEADER_SAFE = re.compile(r"[!#$&-~]*\Z")
_OURS = frozenset({
    "ce-specversion", "ce-id", "ce-source", "ce-type", "ce-time", "ce-inferenceservicename", "ce-namespace",
    "ce-component", "ce-endpoint", "ce-statuscode", "ce-error", "content-type",
})  # fmt: skip


def header_value(text: str) -> str:
    """``text`` as a ``ce-*`` header value (CloudEvents HTTP binding 1.0, 3.1.3.2)."""
    if _HEADER_SAFE.match(text):
        return text
    out: list[str] = []
    for ch in text:
        if "!" <= ch <= "~" and ch not in '"%':
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)


def _header(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    for key, value in headers:
        if len(key) == len(name) and key.lower() == name:
            return value
    return None


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


@dataclass(slots=True)
class Event:
    type: str
    id: str
    time: str
    content_type: str | None  # None: no body and no content type
    data: bytes
    parsed: Any  # the data as JSON values (batch mode embeds them); _NOT_JSON when it is not JSON
    statuscode: int | None  # the response's status; None on the request event
    error: str | None
    offered: float  # time.monotonic()


_NOT_JSON: Any = object()


@dataclass(slots=True, eq=False)
class _Delivery:
    events: list[Event]
    settled: bool = False  # counted: sent, failed or shutdown
    task: asyncio.Task[None] | None = field(default=None, repr=False)


def events_of(sample: Sample, extracted: Extracted, offered: float) -> tuple[Event, Event]:
    """The request and the response event of one sample."""
    rid = sample.request_id or str(uuid.uuid4())
    body = extracted.request_body
    ctype = _header(sample.request_headers, "content-type")
    if ctype is None and body:
        ctype = "application/json" if extracted.request is not None else "application/octet-stream"
    parsed = extracted.request if extracted.request is not None and _is_json(ctype) else _NOT_JSON
    request = Event(
        REQUEST_TYPE, rid, rfc3339(sample.timestamp - sample.duration), ctype, body, parsed, None, sample.error, offered
    )
    body = extracted.response_body
    if sample.response_stream:
        # the captured events: as the adapter re-encoded them (a JSON array of the data objects) or
        # as they came (text/event-stream starts with a field name or a comment, never [ or {)
        ctype = "application/json" if body[:64].lstrip()[:1] in (b"[", b"{") else "text/event-stream"
    else:
        ctype = _header(sample.response_headers, "content-type")
        if ctype is None and body:
            ctype = "application/json" if extracted.response is not None else "application/octet-stream"
    parsed = extracted.response if extracted.response is not None and _is_json(ctype) else _NOT_JSON
    response = Event(
        RESPONSE_TYPE, rid, rfc3339(sample.timestamp), ctype, body, parsed, sample.status, sample.error, offered
    )
    return request, response


Outcome = tuple[Literal["ok", "retry", "fail"], str, float | None]  # (what, why, Retry-After seconds)


class CloudEventsSink(Sink):
    name = "cloudevents"
    reasons = ("queue_full", "failed", "shutdown")

    def __init__(self, cfg: CloudEventsSinkConfig) -> None:
        super().__init__()
        if cfg.url is None:
            raise ValueError("CloudEventsSink needs sinks.cloudevents.url")
        self.cfg = cfg
        self.url: str = cfg.url
        self.batch = cfg.mode == "batch"
        self.in_flight_limit = BATCHES_IN_FLIGHT if self.batch else cfg.batch_size
        self.queue: deque[Event] = deque()
        self.queue_size = cfg.queue_size
        self.extensions = {
            "inferenceservicename": cfg.inference_service,
            "namespace": cfg.namespace,
            "component": cfg.component,
            "endpoint": cfg.endpoint,
        }
        extra = {k: v for k, v in cfg.headers.items() if k.lower() not in _OURS}
        self._binary_headers = {
            **extra,
            "ce-specversion": SPECVERSION,
            "ce-source": header_value(cfg.source),
            **{f"ce-{name}": header_value(value) for name, value in self.extensions.items()},
        }
        self._batch_headers = {**extra, "content-type": BATCH_CONTENT_TYPE}
        self._deliveries: set[_Delivery] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._wakeup = asyncio.Event()
        self._closing = asyncio.Event()
        self._idle = False  # the pump waits for an offer: wake it
        self._closed = False
        self._deadline = 0.0
        self._failures = LogLimiter(log)
        self._full = LogLimiter(log)

    # -- side path ----------------------------------------------------------------------------

    def offer(self, sample: Sample, extracted: Extracted) -> None:
        try:
            if self._closed:
                self.stats.drop("shutdown", 2)
                return
            queue = self.queue
            if len(queue) + 2 > self.queue_size:
                self.stats.drop("queue_full", 2)
                self._full.warning("cloudevents sink: queue full (%d events): dropping", self.queue_size)
                return
            request, response = events_of(sample, extracted, time.monotonic())
            queue.append(request)
            queue.append(response)
            if self._idle:
                self._idle = False
                loop = self._loop
                if loop is not None:
                    with contextlib.suppress(RuntimeError):  # the loop is gone: shutdown counts them
                        loop.call_soon_threadsafe(self._wakeup.set)
        except Exception:  # never into the worker
            log.exception("cloudevents sink: offer failed")

    def queued(self) -> int:
        return len(self.queue)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._thread is not None or self._closed:
            return
        loop = self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, args=(loop,), name="infermon-sink-cloudevents", daemon=True)
        self._thread.start()

    async def aclose(self, timeout: float | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        limit = self.cfg.timeout if timeout is None else timeout
        self._deadline = time.monotonic() + limit
        thread, loop = self._thread, self._loop
        if thread is not None and loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._begin_close)
            await asyncio.to_thread(thread.join, limit + 2.0)
            if thread.is_alive():
                log.warning("cloudevents sink: the delivery thread did not stop within %.1f s", limit)
                return
        left = self._drain_queue()
        self.stats.drop("shutdown", left)

    def _begin_close(self) -> None:
        self._closing.set()
        self._wakeup.set()

    def _drain_queue(self) -> int:
        left = 0
        with contextlib.suppress(IndexError):
            while True:
                self.queue.popleft()
                left += 1
        return left

    def _remaining(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    # -- delivery thread ----------------------------------------------------------------------------

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main())
        except Exception:
            log.exception("cloudevents sink: delivery loop failed")
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _main(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.in_flight_limit)
        session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.cfg.timeout),
            headers={"User-Agent": USER_AGENT},
        )
        pump = asyncio.create_task(self._pump(session))
        try:
            await self._closing.wait()
            await asyncio.wait({pump}, timeout=self._remaining())
            pump.cancel()
            pending = {d.task for d in self._deliveries if d.task is not None}
            if pending:
                _, still = await asyncio.wait(pending, timeout=self._remaining())
                for task in still:
                    task.cancel()
                await asyncio.gather(*still, return_exceptions=True)
            await asyncio.gather(pump, return_exceptions=True)
        finally:
            lost = sum(len(d.events) for d in self._deliveries if not d.settled)
            self._deliveries.clear()
            lost += self._drain_queue()
            self.stats.drop("shutdown", lost)
            if lost:
                log.warning("cloudevents sink shut down with %d events not delivered", lost)
            await session.close()

    async def _pump(self, session: aiohttp.ClientSession) -> None:
        slots = asyncio.Semaphore(self.in_flight_limit)
        queue = self.queue
        take = self.cfg.batch_size if self.batch else 1
        while True:
            if not queue:
                if self._closing.is_set():
                    return
                self._wakeup.clear()
                self._idle = True
                if not queue:  # an offer between the check and _idle = True is seen here
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), 1.0)
                self._idle = False
                continue
            await slots.acquire()
            events: list[Event] = []
            with contextlib.suppress(IndexError):
                while len(events) < take:
                    events.append(queue.popleft())
            if not events:
                slots.release()
                continue
            delivery = _Delivery(events)
            self._deliveries.add(delivery)
            delivery.task = asyncio.create_task(self._deliver(session, delivery))
            delivery.task.add_done_callback(functools.partial(self._done, delivery, slots))

    def _done(self, delivery: _Delivery, slots: asyncio.Semaphore, _task: asyncio.Task[None]) -> None:
        slots.release()
        if delivery.settled:
            self._deliveries.discard(delivery)

    async def _deliver(self, session: aiohttp.ClientSession, delivery: _Delivery) -> None:
        cfg = self.cfg
        stats = self.stats
        events = delivery.events
        delay = cfg.backoff
        attempt = 0
        while True:
            what, why, retry_after = await self._attempt(session, events)
            if what == "ok":
                delivery.settled = True
                now = time.monotonic()
                for event in events:
                    stats.observe(now - event.offered)
                stats.sent += len(events)
                return
            if what == "fail" or attempt >= cfg.retries:
                delivery.settled = True
                stats.drop("failed", len(events))
                tries = f" after {attempt} retries" if attempt else ""
                self._failures.error(
                    "cloudevents sink: %d events (ce-id %s) not delivered to %s%s: %s",
                    len(events), events[0].id, self.url, tries, why,
                )  # fmt: skip
                return
            wait = min(max(delay, retry_after or 0.0), MAX_BACKOFF)
            if self._closing.is_set() and time.monotonic() + wait > self._deadline:
                delivery.settled = True
                stats.drop("shutdown", len(events))
                return
            await asyncio.sleep(wait)
            delay = min(delay * 2, MAX_BACKOFF)
            attempt += 1
            stats.retries += 1

    async def _attempt(self, session: aiohttp.ClientSession, events: list[Event]) -> Outcome:
        try:
            if self.batch:
                headers, body = self._batch_headers, self.encode_batch(events)
                skip: tuple[str, ...] = ()
            else:
                headers, body, skip = self.binary_request(events[0])
        except Exception as exc:
            return "fail", f"cannot encode the event: {exc!r}", None
        try:
            async with session.post(
                self.url, data=body, headers=headers, skip_auto_headers=skip, allow_redirects=False
            ) as resp:
                status = resp.status
                if 200 <= status < 300:
                    await resp.read()
                    return "ok", "", None
                text = (await resp.content.read(300)).decode("utf-8", "replace").strip()
                why = f"HTTP {status}" + (f" {text!r}" if text else "")
                if status == 429 or status >= 500:
                    return "retry", why, _retry_after(resp.headers.get("Retry-After"))
                return "fail", why, None
        except (aiohttp.InvalidURL, ValueError) as exc:  # a header aiohttp refuses: retrying will not help
            return "fail", f"{type(exc).__name__}: {exc}", None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return "retry", f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, None

    def binary_request(self, event: Event) -> tuple[dict[str, str], bytes, tuple[str, ...]]:
        """(headers, body, auto headers to leave out) of one event in binary content mode."""
        headers = self._binary_headers.copy()
        headers["ce-type"] = event.type
        headers["ce-id"] = header_value(event.id)
        headers["ce-time"] = event.time
        if event.statuscode is not None:
            headers["ce-statuscode"] = str(event.statuscode)
        if event.error:
            headers["ce-error"] = header_value(event.error)
        if event.content_type:
            headers["content-type"] = event.content_type
            return headers, event.data, ()
        return headers, event.data, ("Content-Type",)

    def structured(self, event: Event) -> dict[str, Any]:
        """One event in the JSON event format (batch mode)."""
        out: dict[str, Any] = {
            "specversion": SPECVERSION,
            "id": event.id,
            "source": self.cfg.source,
            "type": event.type,
            "time": event.time,
        }
        if event.content_type:
            out["datacontenttype"] = event.content_type
        out.update(self.extensions)
        if event.statuscode is not None:
            out["statuscode"] = str(event.statuscode)
        if event.error:
            out["error"] = event.error
        if event.parsed is not _NOT_JSON:
            out["data"] = event.parsed
        elif event.data:
            text = None
            if event.content_type and event.content_type.lower().startswith("text/"):
                with contextlib.suppress(UnicodeDecodeError):
                    text = event.data.decode("utf-8")
            if text is not None:
                out["data"] = text
            else:
                out["data_base64"] = base64.b64encode(event.data).decode("ascii")
        return out

    def encode_batch(self, events: list[Event]) -> bytes:
        """``application/cloudevents-batch+json`` of ``events``."""
        items = [self.structured(e) for e in events]
        try:
            return orjson.dumps(items, default=str)
        except (TypeError, orjson.JSONEncodeError):  # JSON data orjson refuses (an int beyond 64 bits)
            for item, event in zip(items, events, strict=True):
                try:
                    orjson.dumps(item, default=str)
                except (TypeError, orjson.JSONEncodeError):
                    item.pop("data", None)
                    item["data_base64"] = base64.b64encode(event.data).decode("ascii")
            return orjson.dumps(items, default=str)


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None  # an HTTP date: the backoff is used
    return seconds if seconds >= 0 else None
