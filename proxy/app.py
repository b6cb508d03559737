"""Wires one proxy process together: data plane, observers, admin server, readiness, drain.

Example (what ``infermon proxy`` does)::

    app = ProxyApp(cfg)
    await app.start()
    await app.wait_for_signal()     # SIGTERM / SIGINT
    await app.shutdown()            # /readyz false, drain in-flight requests, close
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from aiohttp import web

from proxy.admin.server import build_admin_app, json_response
from proxy.admin.status import add_status_routes
from proxy.dataplane.core import DataPlane
from proxy.dataplane.hooks import Hooks, Observer
from proxy.observe.labels import Labeler
from proxy.observe.metrics import RequestMetrics, build_registry
from proxy.readiness import Readiness, UpstreamHealth, UpstreamProbe
from proxy.sampling.setup import Sampling
from proxy.settings import ProxyConfig, split_host_port

if TYPE_CHECKING:
    from proxy.canary.observer import CanaryObserver
    from proxy.observe.accesslog import AccessLog
    from proxy.observe.tracing import TracingObserver
    from proxy.probes.runner import ProbeRunner
    from proxy.quality.observer import QualityObserver
    from proxy.routing.split import Splitter
    from proxy.shadow.observer import ShadowObserver

log = logging.getLogger("infermon")


class ProxyApp:
    def __init__(self, cfg: ProxyConfig, observers: Sequence[Observer] = ()) -> None:
        self.cfg = cfg
        self.metrics = RequestMetrics(cfg)
        # Tracing and access logs come after the metrics (labels are final by then); switched off,
        # they are not registered at all, and traceparent then passes through untouched.
        self.tracing: TracingObserver | None = None
        self.access_log: AccessLog | None = None
        extra: list[Observer] = []
        # imported only when switched on: the OpenTelemetry SDK is a few MB a sidecar need not carry
        if cfg.tracing.enabled:
            from proxy.observe.tracing import TracingObserver

            self.tracing = TracingObserver(cfg.tracing, cfg.labels, cfg.access_log.redact_headers)
            extra.append(self.tracing)
        if cfg.access_log.enabled:
            from proxy.observe.accesslog import AccessLog

            self.access_log = AccessLog(cfg.access_log, cfg.labels)
            extra.append(self.access_log)
        #: payload sampling, drift, sinks and LLM usage (docs/drift.md); its observer reads final labels
        self.sampling = Sampling(cfg)
        extra.append(self.sampling.sampler)
        #: model quality from delayed labels (docs/quality.md): every prediction kept, POST /feedback
        self.quality: QualityObserver | None = None
        if cfg.feedback.enabled:
            from proxy.quality.observer import QualityObserver

            self.quality = QualityObserver(cfg, self.sampling.sampler)
            extra.append(self.quality)
            if self.sampling.side is not None:
                self.sampling.side.feedback = self.quality
        #: canary / A-B split between named upstreams (docs/canary.md): first, it sets ex.variant
        self.splitter: Splitter | None = None
        first: list[Observer] = []
        labeler = Labeler(cfg.labels, cfg.llm)
        if cfg.upstreams:
            from proxy.routing import split

            self.splitter = split.Splitter(cfg)
            first.append(self.splitter)
            labeler.admit_variants(cfg.variants())
        #: the automated canary analysis: with a split, or when a mesh names the variant
        self.canary: CanaryObserver | None = None
        mesh = cfg.labels.variant_header or cfg.labels.variant_request_header
        if cfg.canary.enabled and (cfg.upstreams or mesh):
            from proxy.canary.observer import CanaryObserver

            engine = self.sampling.engine
            quality = self.quality.engine.summary if self.quality is not None else None
            self.canary = CanaryObserver(cfg, engine.summary if engine is not None else None, quality)
            extra.append(self.canary)
            if self.sampling.side is not None:
                self.sampling.side.predictions = self.canary.predictions
        #: shadow traffic: a share of requests mirrored, after the client's response, and compared
        self.shadow: ShadowObserver | None = None
        sh = cfg.shadow
        if sh.url is not None:
            from proxy.shadow.observer import ShadowConfig, ShadowObserver

            self.shadow = ShadowObserver(
                ShadowConfig(sh.url, sh.ratio, sh.max_concurrency, sh.max_body_bytes, sh.timeout),
                lambda: self.plane,
                sampling=cfg.sampling,
            )
            extra.append(self.shadow)
        #: every observer, in hook order; each gets start / collector / aclose, passed-in ones too
        self.observers: list[Observer] = [*first, labeler, self.metrics, *extra, *observers]
        self.hooks = Hooks(self.observers)
        self.metrics.hooks = self.hooks
        self.readiness = Readiness()
        self.registry = build_registry()
        self.registry.register(UpstreamHealth(lambda: self.probes))
        for obs in self.observers:
            collector = obs.collector()
            if collector is not None:
                self.registry.register(collector)
        #: golden-request probes (docs/probes.md): the probe set replayed to every upstream, no observer
        self.probe_runner: ProbeRunner | None = None
        if cfg.probes.file is not None:
            from proxy.probes.runner import ProbeRunner

            self.probe_runner = ProbeRunner(cfg, self.readiness)
            self.registry.register(self.probe_runner.collector())
        #: the admin server's routes; capabilities add theirs before start() (add_state_route for
        #: those that change state: they then take the admin token)
        token = cfg.admin.resolved_token()
        if token is not None and len(token) < 16:
            log.warning("admin.token is shorter than 16 characters: easy to guess (openssl rand -hex 32 makes one)")
        self.admin_app = build_admin_app(self.registry, self.readiness, cfg.public_dict, token=token)
        #: the status page's own JSON: /timeseries (from the request metrics) and /gpu (status.agent)
        add_status_routes(self.admin_app, self.metrics, cfg.status)
        self.sampling.add_routes(self.admin_app)
        if self.quality is not None:
            self.quality.add_routes(self.admin_app)
        else:
            from proxy.quality import add_disabled_routes

            add_disabled_routes(self.admin_app)
        if self.splitter is not None:
            from proxy.routing.admin import add_split_routes

            add_split_routes(self.admin_app, self.splitter)
        if self.canary is not None:
            self.canary.add_routes(self.admin_app)
        if self.shadow is not None:
            shadow = self.shadow

            async def shadow_view(request: web.Request) -> web.Response:
                return json_response(shadow.report())

            self.admin_app.router.add_get("/shadow", shadow_view)
        if self.probe_runner is not None:
            self.probe_runner.add_routes(self.admin_app)
        self.plane: DataPlane | None = None
        self.probes: list[UpstreamProbe] = []
        self._started: list[Observer] = []
        self._runner: web.AppRunner | None = None
        self._admin_site: web.BaseSite | None = None
        self._stop = asyncio.Event()

    @property
    def probe(self) -> UpstreamProbe | None:
        """The probe of the default upstream."""
        return self.probes[0] if self.probes else None

    async def start(self, listen: socket.socket | None = None, admin: socket.socket | None = None) -> None:
        cfg = self.cfg
        for obs in self.observers:
            try:
                await obs.start()
            except Exception:  # a broken observer is logged, not fatal: the proxy still serves
                log.exception("observer %s failed to start", obs.name)
            self._started.append(obs)
        plane = self.plane = DataPlane(cfg, self.hooks)
        for name, url in sorted(cfg.upstreams.items()):
            plane.add_upstream(name, url)
        if self.shadow is not None:
            self.shadow.attach(plane)  # its own pool, which client traffic is never routed to
        if self.splitter is not None:
            self.splitter.pools = plane.upstreams
            plane.router = self.splitter.route
        self.metrics.in_flight = lambda: plane.in_flight
        self.registry.register(plane.collector())
        await plane.start(listen)
        self.readiness.set("draining", True, "serving")
        for pool in plane.upstreams.values():
            probe = UpstreamProbe(self.readiness, pool, cfg.readiness)
            probe.start()
            self.probes.append(probe)
        if self.splitter is not None:
            health = {p.pool.name: p for p in self.probes}
            # not probed yet counts as up: the first probe round decides
            self.splitter.healthy = lambda name: health[name].healthy is not False if name in health else True
        if self.probe_runner is not None:
            self.probe_runner.start(plane)  # straight to every named pool, the first round now
        self._runner = web.AppRunner(self.admin_app, access_log=None, handle_signals=False)
        await self._runner.setup()
        if admin is not None:
            self._admin_site = web.SockSite(self._runner, admin)
        else:
            ahost, aport = split_host_port(cfg.admin.listen)
            self._admin_site = web.TCPSite(self._runner, ahost, aport, reuse_address=True)
        await self._admin_site.start()

    @property
    def proxy_address(self) -> tuple[str, int]:
        assert self.plane is not None
        return self.plane.address

    @property
    def admin_address(self) -> tuple[str, int]:
        assert self._runner is not None
        name = self._runner.addresses[0]
        return name[0], name[1]

    def install_signal_handlers(self, reload: Callable[[], ProxyConfig] | None = None) -> None:
        """SIGTERM / SIGINT drain and stop; SIGHUP calls ``reload`` (it reads the configuration
        again) and applies what can change while running: the split weights."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._signalled, sig)
        if reload is not None:
            loop.add_signal_handler(signal.SIGHUP, self._reload, reload)

    def _reload(self, reload: Callable[[], ProxyConfig]) -> None:
        try:
            cfg = reload()
        except Exception as exc:  # a bad file keeps what runs: logged, never fatal
            log.error("SIGHUP: configuration not reloaded, keeping the running one: %s", exc)
            return
        self.apply(cfg, "SIGHUP")

    def apply(self, cfg: ProxyConfig, source: str) -> None:
        """Apply the run-time changeable part of a new configuration (the split weights)."""
        if self.splitter is None:
            log.info("%s: configuration read; nothing to change at run time (no split configured)", source)
            return
        if cfg.variants() != self.cfg.variants():
            log.warning("%s: upstreams changed in the file: they take effect at the next start", source)
        weights = cfg.split.weights or {"stable": 1.0}
        try:
            checked = self.splitter.check_weights(weights)
        except ValueError as exc:
            log.error("%s: split.weights not applied: %s", source, exc)
            return
        if checked != self.splitter.table.weights:
            self.splitter.set_weights(checked, source)

    def _signalled(self, sig: signal.Signals) -> None:
        log.info("%s received: draining", sig.name)
        self._stop.set()

    async def wait_for_signal(self) -> None:
        await self._stop.wait()

    async def shutdown(self) -> None:
        """Readiness false, keep serving for ``drain.delay``, stop accepting, drain, close."""
        drain = self.cfg.drain
        self.readiness.set("draining", False, "shutting down")
        if self.probe_runner is not None:
            await self.probe_runner.aclose()  # no probe holds a connection through the drain
        if drain.delay:
            await asyncio.sleep(drain.delay)  # let endpoints controllers see /readyz fail first
        if self.plane is not None:
            cut = await self.plane.drain(drain.timeout)
            if cut == 0:
                log.info("drained: all in-flight requests finished")
        for probe in self.probes:
            await probe.stop()
        self.probes = []
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        started, self._started = self._started, []
        for obs in reversed(started):  # the last registered goes first: it may feed on the earlier ones
            try:
                await obs.aclose()
            except Exception:
                log.exception("observer %s failed to close", obs.name)
