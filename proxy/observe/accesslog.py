"""Access logs: one JSON line per request, written by a thread, never by the event loop.

``on_complete`` does O(1) work: for a success, the sampling coin flip; then a tuple of raw values is
appended to a bounded deque (no formatting, no JSON). A writer thread wakes every ``flush_interval``,
turns what is queued into orjson lines and writes them in one call. A full deque drops the line and
counts it (``infermon_access_log_dropped_total{reason="queue_full"}``). Shutdown drains and flushes.

What always gets a line ("errors"): a status at or above ``access_log.error_status`` (500 by default),
any upstream failure (``error`` set: connect, timeout, reset, protocol, pool_exhausted, internal) and a
client that went away (499). Everything else is logged with probability ``success_ratio``.

Headers: only User-Agent is recorded, and not even that when it is listed in ``redact_headers``;
Authorization, Cookie and the rest never reach a line. The path is logged without its query string.
Fields and their OpenTelemetry / ECS names: docs/logging.md.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from random import random
from typing import IO, Any

import orjson
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.dataplane.exchange import Exchange, Headers
from proxy.dataplane.hooks import Observer
from proxy.errors import ConfigError
from proxy.settings import AccessLog as AccessLogConfig
from proxy.settings import Labels

log = logging.getLogger("infermon.accesslog")

#: the order of the fields in a line (docs/logging.md)
FIELDS = (
    "timestamp", "request_id", "trace_id", "span_id", "model", "version", "variant", "method", "path",
    "status", "duration_ms", "upstream_ms", "ttfb_ms", "bytes_in", "bytes_out", "client_ip",
    "user_agent", "error",
)  # fmt: skip


def rfc3339(ts: float) -> str:
    """UTC with milliseconds: ``2026-11-25T16:22:39.123Z``."""
    ms = int(ts * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def _user_agent(headers: Headers) -> str | None:
    for name, value in headers:
        if len(name) == 10 and name.lower() == b"user-agent":
            return value.decode("latin-1")
    return None


def _ms(a: float, b: float) -> float | None:
    return round((b - a) * 1000.0, 3) if a and b else None


class AccessLog(Observer):
    name = "access_log"

    def __init__(self, cfg: AccessLogConfig, labels: Labels, stream: IO[bytes] | None = None) -> None:
        self.cfg = cfg
        self.ratio = cfg.success_ratio
        self.error_status = cfg.error_status
        self.max_queue = cfg.max_queue_size
        self.defaults = (labels.model, labels.version, labels.variant)
        self.record_user_agent = "user-agent" not in set(cfg.redact_headers)
        self.queue: deque[tuple[Any, ...]] = deque()
        self.dropped = 0
        self.written = 0
        self.write_errors = 0
        self._own_stream = False
        if stream is not None:
            self.stream = stream
        elif cfg.path == "-":
            self.stream = sys.stdout.buffer
        else:
            try:
                self.stream = open(cfg.path, "ab")  # noqa: SIM115 - closed by aclose
            except OSError as exc:
                raise ConfigError(
                    f"config error: access_log.path = {cfg.path!r}: cannot open it for appending "
                    f"({exc.strerror}); name a writable file, or '-' for stdout"
                ) from None
            self._own_stream = True
        self._stop = threading.Event()
        self._last_error_log = -1e9
        self._thread = threading.Thread(target=self._run, name="infermon-access-log", daemon=True)
        self._thread.start()

    # -- hot path -----------------------------------------------------------------------------

    def on_complete(self, ex: Exchange) -> None:
        if (
            ex.status < self.error_status
            and ex.error is None
            and not ex.aborted
            and self.ratio < 1.0
            and random() >= self.ratio
        ):
            return
        queue = self.queue
        if len(queue) >= self.max_queue:
            self.dropped += 1
            return
        queue.append((
            time.time(), ex.t_accepted, ex.t_done, ex.t_upstream_connected, ex.t_first_byte,
            ex.request_id, ex.trace_id, ex.span_id, ex.model, ex.version, ex.variant, ex.method, ex.path,
            ex.status, ex.bytes_in, ex.bytes_out, ex.client_host, ex.request_headers, ex.error, ex.aborted,
        ))  # fmt: skip

    # -- writer thread ------------------------------------------------------------------------

    def _run(self) -> None:
        interval = self.cfg.flush_interval
        while not self._stop.wait(interval):
            self._drain()
        self._drain()

    def line(self, item: tuple[Any, ...]) -> bytes:
        (wall, t_acc, t_done, t_up, t_fb, rid, trace_id, span_id, model, version, variant, method, path,
         status, bytes_in, bytes_out, client, headers, error, aborted) = item  # fmt: skip
        duration = (t_done - t_acc) if t_done else 0.0
        record = {
            "timestamp": rfc3339(wall - duration),  # when the request started, like the span
            "request_id": rid,
            "trace_id": trace_id or None,
            "span_id": span_id or None,
            "model": model or self.defaults[0],
            "version": version or self.defaults[1],
            "variant": variant or self.defaults[2],
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": round(duration * 1000.0, 3),
            "upstream_ms": _ms(t_up, t_done),
            "ttfb_ms": _ms(t_acc, t_fb),
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "client_ip": client or None,
            "user_agent": _user_agent(headers) if self.record_user_agent else None,
            "error": error if error is not None else ("client_abort" if aborted else None),
        }
        return orjson.dumps(record)

    def _drain(self) -> None:
        queue = self.queue
        if not queue:
            return
        lines: list[bytes] = []
        popleft = queue.popleft
        try:
            while True:
                lines.append(self.line(popleft()))
        except IndexError:
            pass
        lines.append(b"")
        try:
            self.stream.write(b"\n".join(lines))
            self.stream.flush()
            self.written += len(lines) - 1
        except (OSError, ValueError) as exc:  # ValueError: the stream was closed
            self.write_errors += len(lines) - 1
            now = time.monotonic()
            if now - self._last_error_log >= 60.0:
                self._last_error_log = now
                log.error("access log write failed (%d lines lost so far): %r", self.write_errors, exc)

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Stop the writer after it wrote what is queued; close the file (blocking)."""
        self._stop.set()
        self._thread.join(timeout)
        if self._own_stream:
            self.stream.close()

    async def aclose(self, timeout: float = 5.0) -> None:
        await asyncio.to_thread(self.close, timeout)

    def collector(self) -> AccessLogCollector:
        return AccessLogCollector(self)


class AccessLogCollector(Collector):
    def __init__(self, obs: AccessLog) -> None:
        self.obs = obs

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily("infermon_access_log_lines", "Access log lines written.", value=self.obs.written)
        dropped = CounterMetricFamily(
            "infermon_access_log_dropped",
            "Access log lines lost: queue_full (the writer fell behind), write_error.",
            labels=("reason",),
        )
        dropped.add_metric(("queue_full",), self.obs.dropped)
        dropped.add_metric(("write_error",), self.obs.write_errors)
        yield dropped
