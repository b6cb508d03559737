"""The data plane as one object: listening socket, client connections, upstream pool, hooks.

Example::

    plane = DataPlane(cfg, Hooks([MetricsObserver(...)]))
    await plane.start()
    ...
    await plane.drain(timeout=30)   # stop accepting, let in-flight requests finish
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from proxy.dataplane.exchange import Exchange
from proxy.dataplane.hooks import Hooks
from proxy.dataplane.server import ClientConnection, _special_fields
from proxy.dataplane.upstream import UpstreamPool
from proxy.settings import ProxyConfig, split_host_port

log = logging.getLogger("infermon.dataplane")


class DataPlane:
    def __init__(self, cfg: ProxyConfig, hooks: Hooks, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.cfg = cfg
        self.hooks = hooks
        self.loop = loop or asyncio.get_running_loop()
        scheme, host, port = cfg.upstream_target()
        default_port = 443 if scheme == "https" else 80
        self.upstream_authority = (host if port == default_port else f"{host}:{port}").encode("idna")
        self.pool = UpstreamPool(self.loop, scheme, host, port, cfg.upstream_pool)
        #: per-request upstream choice (canary / A-B splits): ``route(ex) -> pool``, set once at
        #: start-up; None sends everything to ``pool``. It runs after on_request_head, so it can
        #: read the labels and headers observers set.
        self.route: Callable[[Exchange], UpstreamPool] | None = None
        self.connections: set[ClientConnection] = set()
        self.in_flight = 0
        self.draining = False
        self.drained = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.special_fields = _special_fields(cfg.request_id_header.encode("ascii"))

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
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        self.pool.close()
