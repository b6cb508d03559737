"""``infermon agent``: the node agent's subcommand and its asyncio main.

Runs the collection thread and the aiohttp server until SIGTERM or SIGINT, then stops both and
exits 0. An address that cannot be bound is one ``cannot listen on`` line and exit 1.
Configuration: defaults < ``--config`` file < ``INFERMON_AGENT_*`` environment < flags.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

import pynvml
from aiohttp import web
from prometheus_client import CollectorRegistry, ProcessCollector

from proxy.agent.config import AgentConfig
from proxy.agent.gpu import GpuCollector
from proxy.agent.host import HostCollector
from proxy.agent.podmap import PodMapper
from proxy.agent.podresources import PodResources
from proxy.agent.server import build_app
from proxy.agent.worker import Source, Worker
from proxy.config import load
from proxy.errors import ListenError
from proxy.loop import run as run_loop
from proxy.loop import until_stop_signal
from proxy.settings import split_host_port

log = logging.getLogger("infermon.agent")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "agent",
        help="node agent: GPU (NVML) and host metrics on /metrics",
        description="Serve NVML GPU and psutil host metrics on /metrics and /healthz (see docs/agent.md).",
    )
    parser.add_argument("--listen", metavar="HOST:PORT", help="address to serve on (default 0.0.0.0:9465)")
    parser.add_argument("--config", metavar="FILE", help="YAML configuration file")
    parser.add_argument("--interval", type=float, metavar="SECONDS", help="seconds between collections")
    parser.add_argument("--procfs", metavar="DIR", help="the host's /proc (default /proc)")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    config = load(
        AgentConfig,
        file=args.config,
        env_prefix="INFERMON_AGENT_",
        config_env="INFERMON_AGENT_CONFIG",
        flags={"listen": args.listen, "interval": args.interval, "procfs": args.procfs},
    )
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_loop(serve(config))


def build(config: AgentConfig, *, nvml: Any = pynvml) -> tuple[CollectorRegistry, Worker, list[Any]]:
    """The registry, the collection thread (not started) and the collectors, wired from ``config``."""
    registry = CollectorRegistry()
    collectors: list[Any] = []
    if config.nvml.enabled:
        socket = config.nvml.pod_resources_socket
        pod_resources = PodResources(socket, config.nvml.pod_resources_prefix) if socket else None
        collectors.append(
            GpuCollector(
                config.nvml,
                config.hostname,
                nvml=nvml,
                pods=PodMapper(config.procfs),
                pod_resources=pod_resources,
            )
        )
    if config.host.enabled:
        collectors.append(HostCollector(config.host, config.procfs))
    for collector in collectors:
        registry.register(collector)
    ProcessCollector(namespace="infermon_agent", registry=registry)
    sources: list[Source] = collectors
    return registry, Worker(sources, config.interval), collectors


async def serve(config: AgentConfig, *, nvml: Any = pynvml) -> int:
    registry, worker, collectors = build(config, nvml=nvml)
    host, port = split_host_port(config.listen)
    runner = web.AppRunner(build_app(registry, worker), access_log=None)
    await runner.setup()
    try:
        # bound before the collection thread starts: a busy port ends the agent before any NVML call
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise ListenError(config.listen, exc, "change listen or --listen") from None
        worker.start()
        for address in runner.addresses:
            log.info("infermon agent listening on http://%s:%s", *address[:2])
        await until_stop_signal()
        log.info("stopping")
    finally:
        await runner.cleanup()
        await asyncio.to_thread(worker.stop)
        for collector in collectors:
            if isinstance(collector, GpuCollector):
                await asyncio.to_thread(collector.close)
    return 0
