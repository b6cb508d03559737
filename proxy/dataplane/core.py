"""The data plane as one object: listening socket, client connections, named upstream pools, hooks.

Example::

    plane = DataPlane(cfg, Hooks([MetricsObserver(...)]))
    canary = plane.add_upstream("canary", "http://127.0.0.1:8001")
    plane.router = lambda ex: canary if ex.header(b"x-variant") == b"canary" else plane.pool
    await plane.start()
    plane.send("canary", "GET", b"/v2/health/ready", [], b"", print, timeout=2.0)   # an own request
    ...
    await plane.drain(timeout=30)   # stop accepting, let in-flight requests finish
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Iterator

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.dataplane.exchange import Exchange, Headers
from proxy.dataplane.heads import HeadRules
from proxy.dataplane.hooks import Hooks
from proxy.dataplane.own import DEFAULT_MAX_BODY, OwnRequest, OwnResult, build_request
from proxy.dataplane.server import ClientConnection
from proxy.dataplane.upstream import UpstreamPool
from proxy.settings import LimitValues, ProxyConfig, Upstream, split_host_port

log = logging.getLogger("infermon.dataplane")

#: the name of the upstream given by ``upstream:`` (``--upstream URL``)
DEFAULT_UPSTREAM = "stable"


class DataPlane:
    def __init__(self, cfg: ProxyConfig, hooks: Hooks, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.cfg = cfg
        self.hooks = hooks
        self.loop = loop or asyncio.get_running_loop()
        self.rules = HeadRules(cfg.request_id_header.encode("ascii"), cfg.limits.max_request_body_bytes)
        self.limits = LimitValues(cfg.limits)
        #: every upstream pool by name; client traffic goes to ``pool`` unless ``router`` says otherwise
        self.upstreams: dict[str, UpstreamPool] = {}
        self.pool = self.add_upstream(DEFAULT_UPSTREAM, cfg.upstream)
        #: per-request upstream choice (canary / A-B splits): ``router(ex) -> pool``, set once at
        #: start-up; None sends everything to ``pool``. It runs after on_request_head and before the
        #: request head is serialized, so it can read the labels observers set and add headers.
        self.router: Callable[[Exchange], UpstreamPool] | None = None
        self.connections: set[ClientConnection] = set()
        self.in_flight = 0
        self.dropped_pipelined = 0  # requests read after one that closed the connection, never started
        self.draining = False
        self.closing = False  # set while close() cuts what is left: those are not client aborts
        self.drained = asyncio.Event()
        self.server: asyncio.Server | None = None

    def add_upstream(self, name: str, url: str, cfg: Upstream | None = None) -> UpstreamPool:
        """Register a named upstream pool (its own connections, limits and gauges)."""
        if name in self.upstreams:
            raise ValueError(f"upstream {name!r} is registered already")
        pool = UpstreamPool(self.loop, name, url, cfg or self.cfg.upstream_pool)
        self.upstreams[name] = pool
        return pool

    def route(self, ex: Exchange) -> UpstreamPool:
        router = self.router
        return self.pool if router is None else router(ex)

    def send(
        self,
        upstream: str,
        method: str,
        target: bytes,
        headers: Headers,
        body: bytes,
        callback: Callable[[OwnResult], None],
        *,
        timeout: float,
        max_body_bytes: int = DEFAULT_MAX_BODY,
    ) -> OwnRequest:
        """Send one request of the proxy's own through the pool named ``upstream``.

        Fire-and-forget: ``callback(result)`` runs once, on the loop, when the response is complete
        or the request failed (``result.error``), unless the returned request is cancelled first.
        No observer sees it and it is not counted as client traffic. The response body is kept up to
        ``max_body_bytes``.
        """
        pool = self.upstreams.get(upstream)
        if pool is None:
            raise KeyError(f"no upstream named {upstream!r} (known: {', '.join(sorted(self.upstreams))})")
        request = build_request(
            pool, method, target, headers, body, callback, timeout=timeout, max_body_bytes=max_body_bytes
        )
        request.begin()
        return request

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); useful with port 0."""
        assert self.server is not None
        sockname = self.server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def start(self, sock: socket.socket | None = None) -> None:
        if sock is not None:
            self.server = await self.loop.create_server(lambda: ClientConnection(self), sock=sock, backlog=2048)
        else:
            host, port = split_host_port(self.cfg.listen)
            self.server = await self.loop.create_server(
                lambda: ClientConnection(self), host, port, backlog=2048, reuse_address=True
            )

    def stop_accepting(self) -> None:
        self.draining = True
        if self.in_flight == 0:
            self.drained.set()
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.close_idle()

    async def drain(self, timeout: float) -> int:
        """Stop accepting and wait up to ``timeout`` for in-flight requests; returns how many were cut."""
        self.stop_accepting()
        try:
            async with asyncio.timeout(timeout):
                await self.drained.wait()
        except TimeoutError:
            pass
        cut = self.in_flight
        if cut:
            log.warning("drain timeout (%.1f s) passed with %d requests in flight; closing them", timeout, cut)
        self.close()
        return cut

    def close(self) -> None:
        self.draining = True
        self.closing = True
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        for pool in self.upstreams.values():
            pool.close()

    def collector(self) -> Collector:
        return DataPlaneCollector(self)


class DataPlaneCollector(Collector):
    """Connection gauges of the data plane, per upstream pool, read at scrape time."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    def collect(self) -> Iterator[Metric]:
        plane = self.plane
        yield GaugeMetricFamily("infermon_client_connections", "Open client connections.", value=len(plane.connections))
        pools = list(plane.upstreams.values())
        opened = GaugeMetricFamily(
            "infermon_upstream_connections", "Open upstream connections (busy and idle).", labels=("upstream",)
        )
        idle = GaugeMetricFamily(
            "infermon_upstream_idle_connections", "Idle pooled upstream connections.", labels=("upstream",)
        )
        total = CounterMetricFamily(
            "infermon_upstream_connections_opened", "Upstream connections established.", labels=("upstream",)
        )
        for pool in pools:
            opened.add_metric((pool.name,), pool.open)
            idle.add_metric((pool.name,), len(pool.idle))
            total.add_metric((pool.name,), pool.opened_total)
        yield opened
        yield idle
        yield total
        yield CounterMetricFamily(
            "infermon_pipelined_requests_dropped",
            "Pipelined requests never started because an earlier one closed the connection (RFC 9112 9.6) "
            "or the connection ended first.",
            value=plane.dropped_pipelined,
        )
