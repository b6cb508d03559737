"""Assemble payload sampling for one proxy: the hot-path sampler, the side path, drift and sinks.

Imported by :class:`~proxy.app.ProxyApp` only; the drift engine (numpy) and the sinks are imported
only when something needs them, so a proxy without sampling never loads them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from proxy.admin.server import json_response
from proxy.errors import ConfigError
from proxy.sampling.sampler import Sampler
from proxy.settings import ProxyConfig

if TYPE_CHECKING:
    from proxy.drift.engine import DriftEngine
    from proxy.sampling.worker import SidePath
    from proxy.sinks.base import Sink

log = logging.getLogger("infermon.sampling")


class Sampling:
    """The pieces, for the app and the tests: ``sampler`` (an observer), ``side``, ``engine``, ``sinks``."""

    def __init__(self, cfg: ProxyConfig) -> None:
        self.cfg = cfg
        self.sampler = Sampler(cfg.sampling, cfg.llm, feedback=cfg.feedback.enabled)
        self.engine: DriftEngine | None = None
        self.side: SidePath | None = None
        self.sinks: list[Sink] = []
        if not (self.sampler.sampling_on or self.sampler.llm_routes or self.sampler.feedback):
            return
        from proxy.sampling.extract import Extractor
        from proxy.sampling.redact import Redactor
        from proxy.sampling.worker import SideCollector, SidePath
        from proxy.sinks.base import SinksCollector, build_sinks

        if self.sampler.sampling_on:
            from proxy.drift.engine import MAX_NAME_LENGTH, DriftEngine, valid_name
            from proxy.drift.profile import ProfileError, load_profile

            profile = None
            if cfg.drift.reference is not None:
                try:
                    profile = load_profile(cfg.drift.reference)
                except ProfileError as exc:
                    raise ConfigError(f"config error: drift.reference = {cfg.drift.reference!r}: {exc}") from None
            # traffic split between variants (here, or by a mesh that names them): only the baseline's
            # rows build an automatic reference, so a canary is never judged against itself
            split = bool(cfg.upstreams) or bool(cfg.labels.variant_request_header or cfg.labels.variant_header)
            reference_variant = cfg.canary.baseline if split else None
            if reference_variant is not None and not valid_name(reference_variant):
                shown = repr(reference_variant[:40]) + ("..." if len(reference_variant) > 40 else "")
                raise ConfigError(
                    f"config error: canary.baseline = {shown}: not a variant name (at most {MAX_NAME_LENGTH} "
                    "printable characters); name the variant the others are compared with"
                )
            self.engine = DriftEngine(cfg.drift, profile, reference_variant, default_variant=cfg.labels.variant)
            self.sinks = build_sinks(cfg.sinks)
        elif cfg.drift.reference is not None or cfg.sinks.jsonl.path or cfg.sinks.cloudevents.url:
            log.warning(
                "drift.reference and sinks.* take effect only with sampling on: set sampling.rate "
                "(--sample-rate) or sampling.always"
            )
        engine = self.engine
        extractor = Extractor(cfg.sampling, engine.columns if engine is not None else lambda: None)
        redactor = Redactor(cfg.sampling.redact_fields, [*cfg.access_log.redact_headers, *cfg.sampling.redact_headers])
        self.side = SidePath(self.sampler, extractor, engine, self.sinks, redactor, cfg.drift.interval)
        self.sampler.side = self.side
        self.sampler.sinks = self.sinks
        collectors = self.sampler.collectors
        collectors.append(SideCollector(self.sampler, self.side))
        if engine is not None:
            collectors.append(engine.collector())
        if self.sinks:
            collectors.append(SinksCollector(self.sinks))

    def add_routes(self, app: web.Application) -> None:
        """``GET /drift`` on the admin server."""
        engine = self.engine

        async def drift(request: web.Request) -> web.Response:
            if engine is None:
                return json_response(
                    {
                        "enabled": False,
                        "reason": "payload sampling is off: set sampling.rate (--sample-rate) or sampling.always",
                    }
                )
            def render() -> bytes:
                report: dict[str, Any] = {"enabled": True, **engine.report()}
                return orjson.dumps(report, option=orjson.OPT_INDENT_2)

            # hundreds of columns of histograms: built and written off the loop the data plane runs on
            body = await asyncio.to_thread(render)
            return web.Response(body=body, content_type="application/json")

        app.router.add_get("/drift", drift)
