"""``infermon proxy``: run the monitoring proxy in front of one model server."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

from proxy import _compiled, config, loop
from proxy.app import ProxyApp
from proxy.errors import ConfigError, ListenError
from proxy.settings import ProxyConfig

log = logging.getLogger("infermon")


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "proxy",
        help="run the monitoring proxy in front of a model server",
        description="Reverse proxy for one model server with golden-signal metrics on an admin port. "
        "Options also come from a YAML file (--config or INFERMON_CONFIG) and INFERMON_* variables; "
        "flags win over the environment, which wins over the file.",
    )
    p.add_argument("--listen", metavar="HOST:PORT", help="where clients connect (default 0.0.0.0:8080)")
    p.add_argument(
        "--upstream",
        metavar="[NAME=]URL",
        action="append",
        help="the model server (default http://127.0.0.1:8000); repeat with NAME=URL for variants "
        "(--upstream stable=URL --upstream canary=URL); a bare URL is named stable",
    )
    p.add_argument(
        "--split",
        metavar="NAME=WEIGHT,...",
        help="how client traffic is shared between the upstreams, for example stable=95,canary=5",
    )
    p.add_argument(
        "--sticky",
        metavar="header:NAME|cookie:NAME",
        help="keep each user on one variant by hashing this request header or cookie",
    )
    p.add_argument("--admin", metavar="HOST:PORT", help="admin server for /metrics (default 0.0.0.0:9464)")
    p.add_argument(
        "--admin-token",
        metavar="TOKEN",
        help="bearer token for the state-changing admin endpoints (prefer INFERMON_ADMIN__TOKEN or "
        "admin.token_file: a flag shows in the process list)",
    )
    p.add_argument(
        "--sample-rate",
        metavar="RATE",
        type=float,
        help="share of requests whose payloads are sampled for drift, 0 to 1 (default 0: off)",
    )
    p.add_argument(
        "--reference",
        metavar="PROFILE",
        help="reference profile for drift (infermon baseline build); default: the first samples",
    )
    p.add_argument(
        "--feedback",
        action="store_const",
        const=True,
        help="keep every request's prediction for labels posted later to POST /feedback (docs/quality.md)",
    )
    p.add_argument("--shadow", metavar="URL", help="also send a share of requests to this upstream and compare")
    p.add_argument("--shadow-ratio", metavar="RATIO", type=float, help="share of requests shadowed (default 0.1)")
    p.add_argument(
        "--probes",
        metavar="FILE",
        help="golden-request probe file (infermon probe record) replayed to every upstream on an interval",
    )
    p.add_argument(
        "--probe-interval", metavar="SECONDS", type=float, help="seconds between probe rounds (default 30)"
    )
    p.add_argument("--config", metavar="FILE", help="YAML configuration file")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def _upstreams(values: list[str] | None) -> tuple[str | None, dict[str, str] | None]:
    """``--upstream`` values: (the bare or ``stable=`` URL, the named ones)."""
    if not values:
        return None, None
    bare: str | None = None
    named: dict[str, str] = {}
    for value in values:
        name, sep, url = value.partition("=")
        if sep and "://" not in name:
            if name in named or (name == "stable" and bare is not None):
                raise ConfigError(f"config error: --upstream names {name!r} twice: give each variant one URL")
            named[name] = url
        else:
            if bare is not None:
                raise ConfigError(
                    "config error: --upstream given twice without a name: name the variants, for example "
                    "--upstream stable=http://127.0.0.1:8000 --upstream canary=http://127.0.0.1:8001"
                )
            bare = value
    if "stable" in named:
        if bare is not None:
            raise ConfigError("config error: --upstream gives stable twice (a bare URL is named stable)")
        bare = named.pop("stable")
    return bare, named or None


def load_config(args: argparse.Namespace) -> ProxyConfig:
    upstream, upstreams = _upstreams(args.upstream)
    return config.load(
        ProxyConfig,
        file=args.config,
        ignore_env_prefixes=("INFERMON_AGENT_",),
        flags={
            "listen": args.listen,
            "upstream": upstream,
            "upstreams": upstreams,
            "split.weights": args.split,
            "split.sticky": args.sticky,
            "shadow.url": args.shadow,
            "shadow.ratio": args.shadow_ratio,
            "probes.file": args.probes,
            "probes.interval": args.probe_interval,
            "admin.listen": args.admin,
            "admin.token": args.admin_token,
            "sampling.rate": args.sample_rate,
            "drift.reference": args.reference,
            "feedback.enabled": args.feedback,
            "log_level": args.log_level,
        },
        flag_names={
            "admin.listen": "admin",
            "admin.token": "admin-token",
            "sampling.rate": "sample-rate",
            "drift.reference": "reference",
            "feedback.enabled": "feedback",
            "upstreams": "upstream",
            "split.weights": "split",
            "shadow.url": "shadow",
            "shadow.ratio": "shadow-ratio",
            "probes.file": "probes",
            "probes.interval": "probe-interval",
        },
    )


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    setup_logging(cfg.log_level)
    return loop.run(serve(cfg, reload=lambda: load_config(args)))


async def serve(cfg: ProxyConfig, reload: Callable[[], ProxyConfig] | None = None) -> int:
    app = ProxyApp(cfg)
    try:
        await app.start()
    except OSError as exc:
        admin = app.plane is not None and app.plane.server is not None  # the data plane is up: admin failed
        key, address = ("admin", cfg.admin.listen) if admin else ("listen", cfg.listen)
        await app.shutdown()  # observers were started and maybe the data plane: they end cleanly
        raise ListenError(address, exc, f"change {key} or --{key}") from None
    app.install_signal_handlers(reload)
    log.info(
        "infermon proxy on %s -> %s; metrics on http://%s/metrics (%s, %s data plane)",
        cfg.listen,
        config.mask_url(cfg.upstream),
        cfg.admin.listen,
        loop.loop_name(),
        _compiled.mode(),
    )
    if app.splitter is not None:
        state = app.splitter.state()
        log.info(
            "split between %s; shares %s%s",
            ", ".join(f"{n} ({config.mask_url(cfg.upstreams[n])})" for n in sorted(cfg.upstreams)) + " and stable",
            state["shares"],
            f", sticky on {state['sticky']}" if state["sticky"] else "",
        )
    await app.wait_for_signal()
    await app.shutdown()
    return 0
