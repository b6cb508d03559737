"""What one /metrics scrape costs for a given traffic mix: series, exposition bytes, loop stall.

Usage: ``.venv/bin/python -m bench.scrape_cost [--models 50] [--versions 50] [--methods 8]
[--codes 200,404,500] [--repeat 1] [--set labels.max_combinations=100 ...] [--tracemalloc]``

The proxy is started in-process (data plane, observers, admin server; the upstream is a closed port,
nothing is proxied). Then every combination of model x version x method x code is fed once
(``--repeat`` times) through the observer chain exactly as the data plane calls it for an Open
Inference Protocol v2 request ``/v2/models/{m}/versions/{v}/infer`` answered with that code:
``on_request_head``, ``on_upstream_head``, ``on_first_byte``, ``on_complete``. The memory that traffic
takes is the growth of the resident set (``--tracemalloc`` adds the Python heap growth; tracemalloc
leaves the allocator fragmented, and the first scrape after it then pays for that). Then /metrics is
fetched from another thread (text, OpenMetrics, and gzip) while a 1 ms timer on the event loop records
how late it fires: the worst lateness is the longest the loop was held during the scrape.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import http.client
import json
import os
import socket
import time
import tracemalloc
from typing import Any

from proxy.app import ProxyApp
from proxy.dataplane.exchange import Exchange
from proxy.loop import run
from proxy.settings import ProxyConfig

METHODS = ("POST", "GET", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE")


def _config(sets: list[str]) -> ProxyConfig:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    data: dict[str, Any] = {"upstream": f"http://127.0.0.1:{port}", "readiness": {"interval": 3600}}
    for item in sets:
        key, _, raw = item.partition("=")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = json.loads(raw)
    return ProxyConfig.model_validate(data)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def feed(app: ProxyApp, models: int, versions: int, methods: int, codes: list[int], repeat: int) -> int:
    hooks = app.hooks
    n = 0
    for _ in range(repeat):
        for m in range(models):
            for v in range(versions):
                path = f"/v2/models/model-{m}/versions/{v}/infer"
                for method in METHODS[:methods]:
                    for code in codes:
                        t = time.perf_counter()
                        ex = Exchange(t, "127.0.0.1")
                        ex.method = method
                        ex.path = path
                        ex.target = path.encode()
                        ex.t_head = t
                        ex.bytes_in = 512
                        hooks.call(hooks.request_head, "on_request_head", ex)
                        ex.t_upstream_connected = t + 0.0001
                        ex.status = code
                        ex.t_upstream_head = t + 0.002
                        hooks.call(hooks.upstream_head, "on_upstream_head", ex)
                        ex.t_first_byte = t + 0.0021
                        hooks.call(hooks.first_byte, "on_first_byte", ex)
                        ex.bytes_out = 2048
                        ex.t_done = t + 0.003
                        hooks.call(hooks.complete, "on_complete", ex)
                        n += 1
    return n


COUNTED = (b"\ninfermon_requests_total{", b"\ninfermon_request_duration_seconds_count{", b"\n#", b"\n")


def fetch(address: tuple[str, int], headers: dict[str, str]) -> tuple[dict[bytes, int], int, dict[str, str], float]:
    """(occurrences of each COUNTED string, body length, headers, seconds). The body is read and counted
    in pieces and not kept, so that this thread never holds the GIL for long (one read or join of a
    huge body would itself stall the event loop being measured)."""
    conn = http.client.HTTPConnection(*address, timeout=600)
    t = time.perf_counter()
    conn.request("GET", "/metrics", headers=headers)
    resp = conn.getresponse()
    counts = dict.fromkeys(COUNTED, 0)
    size = 0
    carry = b"\n"
    while piece := resp.read(1 << 16):
        size += len(piece)
        data = carry + piece
        cut = data.rfind(b"\n")  # count whole lines only; the rest waits for the next piece
        for key in COUNTED:
            counts[key] += data.count(key, 0, cut + 1) if key != b"\n" else data.count(key, 0, cut)
        carry = data[cut:]
    elapsed = time.perf_counter() - t
    conn.close()
    return counts, size, {k.lower(): v for k, v in resp.getheaders()}, elapsed


class LoopProbe:
    """A 1 ms timer on the event loop; each firing records how late it came (ms)."""

    def __init__(self) -> None:
        self.late: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            self.late.append((time.perf_counter() - t - 0.001) * 1000)

    def start(self) -> None:
        self.late = []
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> dict[str, float]:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        late = sorted(self.late) or [0.0]
        return {"max_ms": late[-1], "p99_ms": late[int(len(late) * 0.99)], "ticks": len(late)}


async def idle_lag(seconds: float = 0.5) -> dict[str, float]:
    """The probe's lateness with nothing else running: the floor the machine itself sets."""
    probe = LoopProbe()
    probe.start()
    await asyncio.sleep(seconds)
    return await probe.stop()


async def scrape(app: ProxyApp, headers: dict[str, str]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    probe = LoopProbe()
    probe.start()
    cpu = time.process_time()
    try:
        counts, size, resp_headers, wall = await loop.run_in_executor(None, fetch, app.admin_address, headers)
    finally:
        lag = await probe.stop()
    cpu = time.process_time() - cpu
    return {"bytes": size, "wall_s": wall, "cpu_s": cpu, "stall": lag, "counts": counts, "headers": resp_headers}


def _line(label: str, r: dict[str, Any]) -> str:
    stall = r["stall"]
    return (
        f"{label:<12} {r['bytes']:>12,} bytes, wall {r['wall_s']:.3f} s, cpu {r['cpu_s']:.3f} s, "
        f"loop stall max {stall['max_ms']:.1f} ms (p99 {stall['p99_ms']:.1f} ms, {stall['ticks']} ticks)"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--versions", type=int, default=50)
    parser.add_argument("--methods", type=int, default=8, choices=range(1, len(METHODS) + 1))
    parser.add_argument("--codes", default="200,404,500")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="config override")
    parser.add_argument(
        "--tracemalloc", action="store_true", help="also measure the Python heap growth (skews the scrapes after it)"
    )
    args = parser.parse_args()
    codes = [int(c) for c in args.codes.split(",")]

    app = ProxyApp(_config(args.set))
    await app.start()
    try:
        gc.collect()
        if args.tracemalloc:
            tracemalloc.start()
        rss, heap = _rss(), tracemalloc.get_traced_memory()[0]
        t = time.perf_counter()
        n = feed(app, args.models, args.versions, args.methods, codes, args.repeat)
        feed_s = time.perf_counter() - t
        gc.collect()
        rss, heap = _rss() - rss, tracemalloc.get_traced_memory()[0] - heap
        tracemalloc.stop()
        print(f"traffic: {n} exchanges fed in {feed_s:.2f} s; RSS growth {rss / 2**20:.1f} MiB", end="")
        print(f", Python heap growth {heap / 2**20:.1f} MiB (tracemalloc)" if args.tracemalloc else "")

        text = await scrape(app, {})
        counts = text.pop("counts")
        requests, label_sets, comments, lines = (counts[key] for key in COUNTED)
        samples = lines - comments
        print(f"series: {requests} infermon_requests_total, {label_sets} histogram label sets, {samples} samples")
        kind = "Python heap" if heap else "RSS"
        print(f"{'':<12} {(heap or rss) / max(label_sets, 1) / 1024:.1f} KiB of {kind} per histogram label set")
        print(f"{'':<12} {text['bytes'] / max(label_sets, 1) / 1024:.1f} KiB of text per histogram label set")
        print(_line("text:", text))
        om = await scrape(app, {"Accept": "application/openmetrics-text; version=1.0.0"})
        print(_line("openmetrics:", om))
        gz = await scrape(app, {"Accept-Encoding": "gzip"})
        assert gz["headers"].get("content-encoding") == "gzip"
        print(_line("text+gzip:", gz))
        idle = await idle_lag()
        print(f"{'idle loop:':<12} stall max {idle['max_ms']:.1f} ms (p99 {idle['p99_ms']:.1f} ms), no scrape running")
    finally:
        await app.shutdown()


if __name__ == "__main__":
    run(main())  # uvloop where installed, as infermon proxy runs
