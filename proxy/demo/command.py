"""``infermon demo``: a built-in model server, the proxy in front of it, and traffic through it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
import sys
from typing import Any

from aiohttp import web

from proxy import loop
from proxy.app import ProxyApp
from proxy.demo.model_server import build_model_app
from proxy.demo.traffic import TrafficStats, generate
from proxy.settings import ProxyConfig

log = logging.getLogger("infermon.demo")


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "demo",
        help="run a small model server behind the proxy, with traffic",
        description="Starts a built-in model server, infermon proxy in front of it and a traffic "
        "generator, then prints where to look. Stop with Ctrl-C.",
    )
    p.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT", help="proxy address")
    p.add_argument("--admin", default="127.0.0.1:9464", metavar="HOST:PORT", help="admin / metrics address")
    p.add_argument("--rate", type=float, default=20.0, help="requests per second (default 20)")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.rate <= 0:
        print("--rate must be a positive number of requests per second", file=sys.stderr)
        return 2
    return loop.run(demo(args.listen, args.admin, args.rate, args.duration))


async def demo(listen: str, admin: str, rate: float, duration: float | None) -> int:
    runner = web.AppRunner(build_model_app(), access_log=None, handle_signals=False)
    await runner.setup()
    model_sock = socket.socket()
    model_sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, model_sock)
    await site.start()
    model_port = model_sock.getsockname()[1]
    cfg = ProxyConfig.model_validate(
        {
            "listen": listen,
            "admin": admin,
            "upstream": f"http://127.0.0.1:{model_port}",
            "readiness": {"path": "/v2/health/ready", "interval": 2.0},
        }
    )
    app = ProxyApp(cfg)
    try:
        await app.start()
    except OSError as exc:
        print(f"cannot start the proxy: {exc}; pick free ports with --listen / --admin", file=sys.stderr)
        await runner.cleanup()
        return 1
    app.install_signal_handlers()
    phost, pport = app.proxy_address
    ahost, aport = app.admin_address
    print(
        f"infermon demo\n"
        f"  model server   http://127.0.0.1:{model_port}\n"
        f"  proxy          http://{phost}:{pport}   (try: curl -s http://{phost}:{pport}/v2/models/iris/infer "
        f"-d '{{\"inputs\":[{{\"name\":\"x\",\"shape\":[1,4],\"datatype\":\"FP32\",\"data\":[1,2,3,4]}}]}}')\n"
        f"  metrics        http://{ahost}:{aport}/metrics\n"
        f"  readiness      http://{ahost}:{aport}/readyz\n"
        f"sending ~{rate:g} requests/s{'' if duration is None else f' for {duration:g} s'}; Ctrl-C to stop",
        flush=True,
    )
    stats = TrafficStats()
    traffic = asyncio.create_task(generate(f"http://{phost}:{pport}", rate, duration, stats))
    stop = asyncio.create_task(app.wait_for_signal())
    reporter = asyncio.create_task(_report(stats))
    await asyncio.wait({traffic, stop}, return_when=asyncio.FIRST_COMPLETED)
    for task in (traffic, stop, reporter):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await app.shutdown()
    await runner.cleanup()
    print(f"sent {stats.sent} requests; statuses {dict(sorted(stats.by_status.items()))}; failures {stats.failures}")
    return 0


async def _report(stats: TrafficStats) -> None:
    while True:
        await asyncio.sleep(5)
        print(f"  {stats.sent} requests sent, statuses {dict(sorted(stats.by_status.items()))}", flush=True)
