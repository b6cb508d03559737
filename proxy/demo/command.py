"""``infermon demo``: a built-in model server, the proxy in front of it, and traffic through it.

Stopping (Ctrl-C, SIGTERM or the end of ``--duration``) goes from the outside in: the traffic stops
sending and its requests in flight finish, then the proxy drains, then the model server stops, and
only the summary is printed. A port that cannot be bound is one ``cannot listen on`` line and exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
from typing import Any

from aiohttp import web

from proxy import loop
from proxy.app import ProxyApp
from proxy.demo.model_server import build_model_app
from proxy.demo.traffic import TrafficStats, generate
from proxy.errors import ListenError
from proxy.settings import ProxyConfig, split_host_port

log = logging.getLogger("infermon.demo")

#: seconds the demo's own requests in flight, then other clients' requests, get to finish on a stop
GRACE = 5.0


def _host_port(value: str) -> str:
    try:
        split_host_port(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _port(value: str) -> int:
    if not value.isdigit() or not 0 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"port {value!r} must be a number from 0 to 65535")
    return int(value)


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "demo",
        help="run a small model server behind the proxy, with traffic",
        description="Starts a built-in model server, infermon proxy in front of it and a traffic "
        "generator, then prints where to look. Stop with Ctrl-C. Port 0 picks a free port.",
    )
    p.add_argument(
        "--listen", type=_host_port, default="127.0.0.1:8080", metavar="HOST:PORT",
        help="proxy address (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--admin", type=_host_port, default="127.0.0.1:9464", metavar="HOST:PORT",
        help="admin address: /metrics, /readyz (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--model-port", type=_port, default=0, metavar="PORT",
        help="port of the model server on 127.0.0.1 (default: %(default)s, a free port)",
    )  # fmt: skip
    p.add_argument("--rate", type=float, default=20.0, help="requests per second (default: %(default)g)")
    p.add_argument(
        "--duration", type=float, default=None, metavar="SECONDS",
        help="stop after this many seconds (default: until Ctrl-C)",
    )  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.rate <= 0:
        print("--rate must be a positive number of requests per second", file=sys.stderr)
        return 2
    return loop.run(demo(args.listen, args.admin, args.rate, args.duration, model_port=args.model_port))


async def demo(listen: str, admin: str, rate: float, duration: float | None, *, model_port: int = 0) -> int:
    model_sock = socket.socket()
    try:
        model_sock.bind(("127.0.0.1", model_port))
    except OSError as exc:
        model_sock.close()
        raise ListenError(f"127.0.0.1:{model_port}", exc, "change --model-port") from None
    runner = web.AppRunner(build_model_app(), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        return await _serve(runner, model_sock, listen, admin, rate, duration)
    finally:
        await runner.cleanup()  # last: nothing reaches the model server any more


async def _serve(
    runner: web.AppRunner, model_sock: socket.socket, listen: str, admin: str, rate: float, duration: float | None
) -> int:
    await web.SockSite(runner, model_sock).start()
    model_port = model_sock.getsockname()[1]
    cfg = ProxyConfig.model_validate(
        {
            "listen": listen,
            "admin": admin,
            "upstream": f"http://127.0.0.1:{model_port}",
            "readiness": {"path": "/v2/health/ready", "interval": 2.0},
            "drain": {"timeout": GRACE},
        }
    )
    app = ProxyApp(cfg)
    try:
        await app.start()
    except OSError as exc:
        up = app.plane is not None and app.plane.server is not None  # the data plane is up: admin failed
        await app.shutdown()
        raise ListenError(admin if up else listen, exc, "change --admin" if up else "change --listen") from None
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
    stop = asyncio.Event()
    traffic = asyncio.create_task(generate(f"http://{phost}:{pport}", rate, duration, stats, stop=stop, grace=GRACE))
    signalled = asyncio.create_task(app.wait_for_signal())
    reporter = asyncio.create_task(_report(stats))
    try:
        await asyncio.wait({traffic, signalled}, return_when=asyncio.FIRST_COMPLETED)
        stop.set()
        await traffic  # no new requests; the ones in flight finish (or are cancelled after GRACE)
    finally:
        for task in (signalled, reporter, traffic):
            task.cancel()
        await asyncio.gather(signalled, reporter, traffic, return_exceptions=True)
        await app.shutdown()  # then the proxy drains what other clients still have in flight
    print(f"sent {stats.sent} requests; statuses {dict(sorted(stats.by_status.items()))}; failures {stats.failures}")
    return 0


async def _report(stats: TrafficStats) -> None:
    while True:
        await asyncio.sleep(5)
        print(f"  {stats.sent} requests sent, statuses {dict(sorted(stats.by_status.items()))}", flush=True)
