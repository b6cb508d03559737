"""Time Server-Sent Events streams: time to first event, gaps between events, time to the last one.

One keep-alive connection per target, requests one after another (the first is a warm-up and is not
counted). Each event's arrival time is taken when its ``\\n\\n`` terminator has been read, after chunked
decoding, so a proxy that held the stream back would show a first event arriving late and gaps
collapsing to zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from dataclasses import dataclass, field

from bench.procs import LOOPBACK


class StreamError(RuntimeError):
    """The stream did not look like the SSE upstream's answer."""


@dataclass
class StreamTiming:
    """One stream, seconds from sending the request."""

    head_s: float
    events_s: list[float]

    @property
    def first_s(self) -> float:
        return self.events_s[0]

    @property
    def last_s(self) -> float:
        return self.events_s[-1]

    @property
    def gaps_s(self) -> list[float]:
        return [b - a for a, b in zip(self.events_s, self.events_s[1:], strict=False)]


@dataclass
class SseSummary:
    """Medians over the counted streams of one target."""

    streams: int
    events_per_stream: int
    head_ms: float
    first_event_ms: float
    last_event_ms: float
    gap_ms: float
    min_gap_ms: float
    first_event_all_ms: list[float] = field(default_factory=list)


async def _read_head(reader: asyncio.StreamReader) -> dict[str, str]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(" ")
    if len(status) < 2 or status[1] != "200":
        raise StreamError(f"status line {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return headers


async def one_stream(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: str, limit_s: float
) -> StreamTiming:
    request = f"GET {target} HTTP/1.1\r\nHost: {LOOPBACK}\r\nAccept: text/event-stream\r\n\r\n".encode()
    start = time.perf_counter()
    writer.write(request)
    async with asyncio.timeout(limit_s):
        headers = await _read_head(reader)
        head_s = time.perf_counter() - start
        events: list[float] = []
        buffer = b""
        done = False

        def take(data: bytes) -> None:
            nonlocal buffer, done
            buffer += data
            now = time.perf_counter() - start
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                if event.startswith(b"data: [DONE]"):
                    done = True
                elif event.startswith(b"data:"):
                    events.append(now)

        if "content-length" in headers:
            # A proxy that buffered the stream may answer with one sized body: still read it.
            take(await reader.readexactly(int(headers["content-length"])))
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                take(await reader.readexactly(size))
                await reader.readexactly(2)
        else:
            raise StreamError(f"response has neither Content-Length nor chunked framing: {headers}")
    if not events or not done:
        raise StreamError(f"stream ended after {len(events)} events without [DONE]")
    return StreamTiming(head_s, events)


async def measure(port: int, target: str, streams: int, limit_s: float) -> list[StreamTiming]:
    """`streams` + 1 sequential streams over one connection; the first is dropped as a warm-up."""
    async with asyncio.timeout(limit_s):
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        timings = [await one_stream(reader, writer, target, limit_s) for _ in range(streams + 1)]
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(limit_s):
                await writer.wait_closed()
    return timings[1:]


def summarize(timings: list[StreamTiming]) -> SseSummary:
    gaps = [gap for timing in timings for gap in timing.gaps_s]
    return SseSummary(
        streams=len(timings),
        events_per_stream=len(timings[0].events_s) if timings else 0,
        head_ms=statistics.median(t.head_s for t in timings) * 1e3,
        first_event_ms=statistics.median(t.first_s for t in timings) * 1e3,
        last_event_ms=statistics.median(t.last_s for t in timings) * 1e3,
        gap_ms=statistics.median(gaps) * 1e3 if gaps else 0.0,
        min_gap_ms=min(gaps) * 1e3 if gaps else 0.0,
        first_event_all_ms=[round(t.first_s * 1e3, 3) for t in timings],
    )


def run(port: int, target: str, streams: int, limit_s: float = 30.0) -> SseSummary:
    """Time `streams` streams; `limit_s` bounds connecting and each stream."""
    return summarize(asyncio.run(measure(port, target, streams, limit_s)))
