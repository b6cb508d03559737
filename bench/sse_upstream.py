"""A small streaming upstream: answers any request with Server-Sent Events, chunked, then closes the stream.

``GET /stream?events=20&delay_ms=10&first_ms=0`` sends the response head at once, waits ``first_ms``,
then sends ``events`` events ``data: {"i": n, ...}`` one chunk each, ``delay_ms`` apart, then
``data: [DONE]`` and the last chunk. Connections are kept alive between requests.

Run: ``python -m bench.sse_upstream --port 8001`` (loopback only).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from urllib.parse import parse_qs, urlsplit

from bench.procs import LOOPBACK

MAX_HEAD = 64 * 1024
HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def event(i: int) -> bytes:
    return b'data: {"i":%d,"choices":[{"delta":{"content":"tok%d"}}]}\n\n' % (i, i)


def stream_params(target: str) -> tuple[int, float, float]:
    """(events, delay seconds, first-event delay seconds) from the request target's query."""
    query = parse_qs(urlsplit(target).query)

    def number(key: str, default: float, top: float) -> float:
        try:
            value = float(query.get(key, [str(default)])[0])
        except ValueError:
            return default
        return min(max(value, 0.0), top)

    events = int(number("events", 20, 10_000))
    return events, number("delay_ms", 10.0, 10_000.0) / 1000, number("first_ms", 0.0, 60_000.0) / 1000


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3:
                return
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip() or "0")
            if length:
                await reader.readexactly(length)
            events, delay, first = stream_params(parts[1])
            writer.write(HEAD)
            await writer.drain()
            if first:
                await asyncio.sleep(first)
            for i in range(events):
                if i:
                    await asyncio.sleep(delay)
                writer.write(chunk(event(i)))
                await writer.drain()
            writer.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        return
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def serve(port: int) -> None:
    server = await asyncio.start_server(handle, LOOPBACK, port, limit=MAX_HEAD, backlog=1024)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
