"""Payload sampling on the request path: a coin flip and capped copies into a bounded queue.

The :class:`Sampler` observer decides once per request, at its head: ``sampling.rate`` flips a coin,
and when ``sampling.always`` has rules, every request is held as a candidate until its status is
known (a status or variant rule then keeps it or lets it go). Bodies are kept by reference (the
``bytes`` objects the data plane read; no copy, no parse) up to ``sampling.max_body_bytes``:

- a request or response body over the cap drops the sample (``oversized``);
- an event stream (``text/event-stream``) is kept event by event up to the cap, then cut at an
  event boundary; its last ``llm.tail_bytes`` are kept as well, so the final ``usage`` event of an
  OpenAI-style stream is never lost;
- on the OpenAI-compatible routes (``llm.routes``) every response's tail is kept, sampled or not,
  for token usage.

At the end of the exchange one tuple goes into a deque, unless the deque holds
``sampling.queue_size`` items or ``sampling.max_queue_bytes`` body bytes already (``queue_full``).
The side path (:mod:`proxy.sampling.worker`) takes it from there; nothing here ever waits.
Counted: ``infermon_samples_dropped_total{reason}`` (reasons of this module: oversized, incomplete,
queue_full).

With ``feedback.enabled`` (docs/quality.md) the response body of every request (but those on the
OpenAI routes and event streams) is captured the same way, by reference and up to the cap, whatever
the coin said: a request the coin did not pick becomes a ``FEEDBACK`` job (its response only), whose
predictions the side path keeps for the labels that come later; a picked one's ``SAMPLE`` job serves
both. A response that is not 2xx is let go at its head. A prediction lost here (over the cap, no room,
cut short) is counted in ``feedback_dropped`` (``infermon_feedback_predictions_dropped_total{reason}``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import Iterator
from random import random
from typing import TYPE_CHECKING

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from proxy.dataplane.exchange import Exchange
from proxy.dataplane.hooks import Observer
from proxy.settings import Llm, Sampling

if TYPE_CHECKING:
    from proxy.sampling.worker import SidePath
    from proxy.sinks.base import Sink

log = logging.getLogger("infermon.sampling")

_KEY = "sample"
_SSE = b"text/event-stream"

#: job kinds in the queue
SAMPLE = 0  # a sampled exchange: bodies for extraction, drift and sinks
USAGE = 1  # an OpenAI-route exchange that was not sampled: its response tail, for token usage
FEEDBACK = 2  # feedback on, the exchange not sampled: its response body, for the predictions it holds

#: a queued job: (kind, exchange, wall time, request chunks, response chunks, event stream, cut, tail, bytes)
Job = tuple[int, Exchange, float, list[bytes], list[bytes], bool, bool, bytes, int]


class _Capture:
    __slots__ = (
        "cut", "fb", "fb_lost", "full", "keep", "over", "req", "req_n", "resp", "resp_n", "sampling", "sse", "tail",
    )  # fmt: skip

    def __init__(self, keep: bool, sampling: bool, tail: bytearray | None, fb: bool = False) -> None:
        self.keep = keep  # sampled for sure (coin or a rule matched); False: a candidate
        self.sampling = sampling  # bodies are being kept
        self.req: list[bytes] = []
        self.req_n = 0
        self.resp: list[bytes] = []
        self.resp_n = 0
        self.sse = False
        self.cut = False  # an event stream went over the cap: later events only reach the tail
        self.over = False  # a body went over the cap: the sample is dropped
        self.full = False  # the byte budget had no room for a body: the sample is dropped (queue_full)
        self.tail = tail  # the response's last bytes (usage), or None
        self.fb = fb  # the response body is kept for its predictions (feedback), sampled or not
        self.fb_lost = ""  # why the predictions were lost on the way (oversized, queue_full)


_LINE_END = re.compile(rb"\r\n|\r|\n")


def last_event_end(data: bytes) -> int:
    """Where the last complete event of an event stream ends in ``data`` (0: none yet).

    An event ends with an empty line; lines end with CRLF, LF or CR (the WHATWG event stream
    format), so a blank line is two line ends in a row. A CR as the very last byte may be the
    first half of a CRLF and is not taken as a line end.
    """
    end = 0
    previous = -1  # where the last line end finished
    for m in _LINE_END.finditer(data):
        start, stop = m.span()
        if stop == len(data) and m.group() == b"\r":
            break
        if start == previous:
            end = stop
        previous = stop
    return end


def status_matcher(rules: list[str]) -> tuple[frozenset[int], frozenset[int]]:
    """``["5xx", "429"]`` -> (classes {5}, statuses {429})."""
    classes = frozenset(int(r[0]) for r in rules if r.endswith("xx"))
    codes = frozenset(int(r) for r in rules if not r.endswith("xx"))
    return classes, codes


class Sampler(Observer):
    name = "sampling"

    def __init__(self, cfg: Sampling, llm: Llm, feedback: bool = False) -> None:
        self.cfg = cfg
        self.rate = cfg.rate
        self.max_body = cfg.max_body_bytes
        self.max_queue = cfg.queue_size
        self.max_queue_bytes = cfg.max_queue_bytes
        self.classes, self.codes = status_matcher(cfg.always.status)
        self.variants = frozenset(cfg.always.variants)
        #: a rule may keep a request whose coin said no: every request is then a candidate
        self.rules = bool(self.classes or self.codes or self.variants)
        self.sampling_on = self.rate > 0 or self.rules
        self.llm_routes = frozenset(llm.routes) if llm.enabled else frozenset()
        self.tail_bytes = llm.tail_bytes
        self.queue: deque[Job] = deque()
        #: body bytes put into the queue (written here) and taken out (written by the side path)
        self.bytes_in = 0
        self.bytes_out = 0
        #: body bytes held by exchanges still in flight (candidates of a status rule included);
        #: with the queued ones they stay within sampling.max_queue_bytes
        self.held = 0
        #: drops decided on the request path, by reason (this thread writes, the collector reads)
        self.dropped: dict[str, int] = {"oversized": 0, "incomplete": 0, "queue_full": 0}
        self.usage_dropped = 0  # usage-only jobs that found the queue full
        self.enqueued = 0  # jobs put into the queue
        #: every request's response is captured for its predictions (feedback.enabled)
        self.feedback = feedback
        #: predictions lost on the request path, by reason (infermon_feedback_predictions_dropped_total)
        self.feedback_dropped: dict[str, int] = {"oversized": 0, "incomplete": 0, "queue_full": 0}
        #: the side path, its sinks and the extra collectors (drift engine): set up by ProxyApp
        self.side: SidePath | None = None
        self.sinks: list[Sink] = []
        self.collectors: list[Collector] = []
        if not self.sampling_on and not self.llm_routes and not feedback:  # nothing to do: no hook at all
            for hook in ("on_request_head", "on_upstream_head", "on_response_body", "on_complete"):
                setattr(self, hook, None)
        if not self.sampling_on:
            self.on_request_body = None  # type: ignore[assignment]

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        for sink in self.sinks:
            try:
                await sink.start()
            except Exception:  # a broken sink is logged; samples still feed drift
                log.exception("sink %s failed to start", sink.name)
        if self.side is not None:
            self.side.start()

    async def aclose(self) -> None:
        if self.side is not None:
            await asyncio.to_thread(self.side.stop)  # what is queued still reaches drift and the sinks
        for sink in self.sinks:
            try:
                await sink.aclose()
            except Exception:
                log.exception("sink %s failed to close", sink.name)

    def collector(self) -> Collector:
        return _Collectors(self.collectors)

    # -- hot path -----------------------------------------------------------------------------

    def on_request_head(self, ex: Exchange) -> None:
        rate = self.rate
        keep = rate > 0 and random() < rate
        llm = ex.path in self.llm_routes
        fb = self.feedback and not llm
        if not (keep or self.rules or llm or fb):
            return
        cap = _Capture(keep, keep or self.rules, bytearray() if llm else None, fb)
        if cap.sampling:
            length = ex.header(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body:
                cap.over = True
        if ex.extra is None:
            ex.extra = {_KEY: cap}
        else:
            ex.extra[_KEY] = cap

    def on_request_body(self, ex: Exchange, chunk: bytes) -> None:
        extra = ex.extra
        if extra is None:
            return
        cap: _Capture | None = extra.get(_KEY)
        if cap is None or not cap.sampling or cap.over or cap.full:
            return
        n = cap.req_n + len(chunk)
        if n > self.max_body:
            cap.over = True
            self._release(cap)
            return
        if self._no_room(len(chunk)):
            cap.full = True
            self._release(cap)
            return
        cap.req.append(chunk)
        cap.req_n = n
        self.held += len(chunk)

    def on_upstream_head(self, ex: Exchange) -> None:
        extra = ex.extra
        if extra is None:
            return
        cap: _Capture | None = extra.get(_KEY)
        if cap is None:
            return
        if cap.fb and not 200 <= ex.status < 300:
            cap.fb = False  # no prediction in an error
        if cap.sampling and not cap.keep:
            if self._rule(ex):
                cap.keep = True
            elif cap.tail is None and not cap.fb:
                self._release(cap)
                del extra[_KEY]
                return
            else:
                self._release(cap)
                cap.sampling = False
        elif not cap.sampling and cap.tail is None and not cap.fb:
            del extra[_KEY]  # kept for feedback only, and the status says there is nothing to keep
            return
        ctype = ex.response_header(b"content-type")
        cap.sse = ctype is not None and ctype.lstrip().lower().startswith(_SSE)
        if cap.sse and cap.fb:
            cap.fb = False  # an event stream holds no prediction to label
            if not cap.sampling and cap.tail is None:
                del extra[_KEY]

    def on_response_body(self, ex: Exchange, chunk: bytes) -> None:
        extra = ex.extra
        if extra is None:
            return
        cap: _Capture | None = extra.get(_KEY)
        if cap is None:
            return
        if (cap.sampling and not cap.over and not cap.cut and not cap.full) or cap.fb:
            n = cap.resp_n + len(chunk)
            if n > self.max_body:
                if cap.sse:
                    self._cut(cap, chunk)
                else:
                    cap.over = True
                    if cap.fb:
                        cap.fb = False
                        cap.fb_lost = "oversized"
                    self._release(cap)
            elif self._no_room(len(chunk)):
                cap.full = True
                if cap.fb:
                    cap.fb = False
                    cap.fb_lost = "queue_full"
                self._release(cap)
            else:
                cap.resp.append(chunk)
                cap.resp_n = n
                self.held += len(chunk)
        tail = cap.tail
        if tail is not None or cap.cut:
            if tail is None:
                tail = cap.tail = bytearray()
            keep = self.tail_bytes
            if len(chunk) >= keep:
                tail[:] = chunk[-keep:]  # only the last bytes are ever copied
            else:
                tail += chunk
                if len(tail) > keep:
                    del tail[: len(tail) - keep]

    def on_complete(self, ex: Exchange) -> None:
        extra = ex.extra
        if extra is None:
            return
        cap: _Capture | None = extra.pop(_KEY, None)
        if cap is None:
            return
        if cap.sampling and not cap.keep and not (ex.t_upstream_head == 0.0 and self._rule(ex)):
            cap.sampling = False  # a candidate no rule kept (the status is the proxy's own here)
        tail = bytes(cap.tail) if cap.tail is not None else b""
        held = cap.req_n + cap.resp_n
        self.held -= held  # from here on the bytes are queued (bytes_in) or let go
        if cap.sampling:
            if cap.over:
                reason = "oversized"
            elif cap.full:
                reason = "queue_full"
            elif ex.aborted or (ex.error is not None and ex.t_first_byte):
                reason = "incomplete"  # a body cut short cannot be read as what was sent
            else:
                size = held + len(tail)
                if len(self.queue) < self.max_queue and not self._no_room(size):
                    self.bytes_in += size
                    self.enqueued += 1
                    self.queue.append((SAMPLE, ex, time.time(), cap.req, cap.resp, cap.sse, cap.cut, tail, size))
                    return
                reason = "queue_full"
            self.dropped[reason] += 1
            # the sample is lost, its token usage need not be: on an OpenAI route it goes on alone;
            # nor its predictions, when the response was kept whole (the request was the one too large)
        if cap.fb or cap.fb_lost:
            self._feedback(ex, cap)
            return
        if cap.tail is None or not (200 <= ex.status < 300) or ex.aborted or ex.error is not None:
            return  # no usage to read from a failed or cut response
        size = len(tail)
        if len(self.queue) >= self.max_queue or self._no_room(size):
            self.usage_dropped += 1
            return
        self.bytes_in += size
        self.enqueued += 1
        self.queue.append((USAGE, ex, time.time(), [], [], cap.sse, False, tail, size))

    def _feedback(self, ex: Exchange, cap: _Capture) -> None:
        """Queue the response for its predictions (FEEDBACK), or count why it cannot be."""
        reason = cap.fb_lost
        if not reason:
            if ex.aborted or ex.error is not None or not 200 <= ex.status < 300:
                reason = "incomplete" if ex.t_first_byte else ""
            else:
                size = cap.resp_n
                if len(self.queue) < self.max_queue and not self._no_room(size):
                    self.bytes_in += size
                    self.enqueued += 1
                    self.queue.append((FEEDBACK, ex, time.time(), [], cap.resp, False, False, b"", size))
                    return
                reason = "queue_full"
        if reason:
            self.feedback_dropped[reason] += 1

    # -- helpers --------------------------------------------------------------------------------

    def _rule(self, ex: Exchange) -> bool:
        status = ex.status
        return status // 100 in self.classes or status in self.codes or ex.variant in self.variants

    def _no_room(self, n: int) -> bool:
        """Would ``n`` more bytes take what samples hold (in flight and queued) past the budget?"""
        return self.held + self.bytes_in - self.bytes_out + n > self.max_queue_bytes

    def _release(self, cap: _Capture) -> None:
        """Let go of a capture's bodies (and of their place in the byte budget)."""
        self.held -= cap.req_n + cap.resp_n
        cap.req = []
        cap.resp = []
        cap.req_n = cap.resp_n = 0

    def _cut(self, cap: _Capture, chunk: bytes) -> None:
        """An event stream reached the cap: keep whole events up to it; the rest goes to the tail."""
        kept = b"".join(cap.resp) + chunk[: self.max_body - cap.resp_n]
        stop = last_event_end(kept)
        self.held += stop - cap.resp_n
        cap.resp = [kept[:stop]] if stop else []
        cap.resp_n = stop
        cap.cut = True


class _Collectors(Collector):
    def __init__(self, collectors: list[Collector]) -> None:
        self.collectors = collectors

    def collect(self) -> Iterator[Metric]:
        for collector in self.collectors:
            yield from collector.collect()
