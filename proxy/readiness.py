"""Readiness gates: /readyz is true only while every gate is open.

Any component can own a gate (the upstream probe, the drain on SIGTERM, later a warm-up or a
canary controller)::

    readiness.set("upstream", False, "connection refused")
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.config import mask_url
from proxy.settings import Readiness as ReadinessConfig

if TYPE_CHECKING:
    from proxy.dataplane.upstream import UpstreamPool

log = logging.getLogger("infermon.readiness")


class Readiness:
    """Gates that decide /readyz, and reports shown beside them that do not (a canary's upstream)."""

    def __init__(self) -> None:
        self.gates: dict[str, tuple[bool, str, float]] = {}
        #: shown in /readyz under "reports", never making it false
        self.reports: dict[str, tuple[bool, str, float]] = {}

    def set(self, gate: str, ok: bool, reason: str = "", gating: bool = True) -> None:
        table = self.gates if gating else self.reports
        previous = table.get(gate)
        if previous is None or previous[0] != ok:
            what = "readiness gate" if gating else "readiness report"
            log.info("%s %s is now %s%s", what, gate, "open" if ok else "closed", f": {reason}" if reason else "")
        table[gate] = (ok, reason, time.time())

    @property
    def ready(self) -> bool:
        return bool(self.gates) and all(ok for ok, _, _ in self.gates.values())

    def snapshot(self) -> dict[str, object]:
        out: dict[str, object] = {
            "ready": self.ready,
            "gates": {name: {"ok": ok, "reason": reason} for name, (ok, reason, _) in sorted(self.gates.items())},
        }
        if self.reports:
            out["reports"] = {
                name: {"ok": ok, "reason": reason} for name, (ok, reason, _) in sorted(self.reports.items())
            }
        return out


class UpstreamProbe:
    """Checks one upstream pool every ``interval``: a GET of ``path`` expecting 2xx, or a TCP connect.

    The gate is ``upstream`` for the default upstream (``stable``); the others (the variants of a
    split) are reported as ``upstream:NAME`` without gating /readyz: a canary that is down must not
    take the pod, and its stable traffic, out of its Service. An upstream that cannot be reached is
    logged once at WARNING with the reason (refused, DNS failure, timeout ...), and again when it
    answers: not once per probe.
    """

    def __init__(self, readiness: Readiness, pool: UpstreamPool, cfg: ReadinessConfig) -> None:
        self.readiness = readiness
        self.pool = pool
        self.host = pool.host
        self.port = pool.port
        self.authority = pool.authority.decode("ascii")
        self.cfg = cfg
        #: for an https:// upstream: the probe then connects with TLS (as the data plane does)
        self.tls = pool.ssl
        self.gating = pool.name == "stable"
        self.gate = "upstream" if self.gating else f"upstream:{pool.name}"
        self.healthy: bool | None = None  # None: not probed yet
        self.rounds = 0  # checks made so far
        self._task: asyncio.Task[None] | None = None
        readiness.set(self.gate, False, "not probed yet", self.gating)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def check(self) -> tuple[bool, str]:
        try:
            async with asyncio.timeout(self.cfg.timeout):
                reader, writer = await asyncio.open_connection(
                    self.host, self.port, ssl=self.tls, server_hostname=self.host if self.tls else None
                )
                try:
                    if self.cfg.path is None:
                        return True, "tcp connect ok"
                    writer.write(
                        f"GET {self.cfg.path} HTTP/1.1\r\nHost: {self.authority}\r\n"
                        "User-Agent: infermon-readiness\r\nConnection: close\r\n\r\n".encode("latin-1")
                    )
                    line = await reader.readline()
                finally:
                    writer.close()
        except TimeoutError:
            return False, f"no answer within {self.cfg.timeout:g} s"
        except OSError as exc:  # before ValueError: a TLS certificate error is both
            return False, exc.strerror or str(exc)
        except ValueError:  # StreamReader.readline: no line end within its limit
            return False, f"GET {self.cfg.path} -> status line too long"
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit() and 200 <= int(parts[1]) < 300:
            return True, f"GET {self.cfg.path} -> {int(parts[1])}"
        shown = line.decode("latin-1", "replace").strip()[:80] or "connection closed"
        return False, f"GET {self.cfg.path} -> {shown}"

    def _record(self, ok: bool, reason: str) -> None:
        where = f"upstream {self.pool.name} ({mask_url(self.pool.url)})"
        if not ok and self.healthy is not False:
            log.warning("%s is not ready: %s", where, reason)
        elif ok and self.healthy is False:
            log.warning("%s is ready again: %s", where, reason)
        self.healthy = ok
        self.rounds += 1
        self.readiness.set(self.gate, ok, reason, self.gating)

    async def _run(self) -> None:
        last_error = ""
        while True:
            try:
                ok, reason = await self.check()
            except Exception as exc:  # an unexpected failure must close the gate, not end the probing
                ok, reason = False, f"probe failed: {exc!r}"
                if reason != last_error:
                    log.exception("readiness probe of %s:%d failed", self.host, self.port)
                last_error = reason
            self._record(ok, reason)
            await asyncio.sleep(self.cfg.interval)


class UpstreamHealth(Collector):
    """``infermon_upstream_up{upstream}``: 1 when the upstream's last readiness check passed, else 0.

    One series per probed pool (``stable`` and the names in ``upstreams``), absent until its first
    check: what an alert on a model server that cannot be reached reads, with or without traffic.
    """

    def __init__(self, probes: Callable[[], Iterable[UpstreamProbe]]) -> None:
        self.probes = probes

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "infermon_upstream_up",
            "1 when the upstream's last readiness check passed (readiness.path or a TCP connect), else 0.",
            labels=("upstream",),
        )
        for probe in self.probes():
            if probe.healthy is not None:
                family.add_metric([probe.pool.name], 1.0 if probe.healthy else 0.0)
        yield family
