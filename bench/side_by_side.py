"""Several infermon proxies of one build, differing only in their flags, measured in one run.

Shared by ``bench.sampling`` and ``bench.split``: start the proxies, pin them beside their
upstreams (``bench.sampler.cpu_layout``), warm them up, then measure them in interleaved rounds so
that the machine's drift over the run falls on all of them alike.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from bench import wrk
from bench.procs import LOOPBACK, Children, free_port, wait_for_port
from bench.run import infermon_argv, measure
from bench.sampler import ProcessTree, cpu_layout


@dataclass
class Proxy:
    name: str
    port: int
    admin: int
    tree: ProcessTree


def add_load_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per proxy (2)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported (3)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--infermon", default=None, help="infermon executable (beside this Python)")
    parser.add_argument("--no-pin", action="store_true")


def start_proxies(
    args: argparse.Namespace,
    children: Children,
    directory: Path,
    upstream_url: str,
    setups: dict[str, list[str]],
    env: dict[str, str] | None = None,
) -> list[Proxy]:
    """``infermon proxy`` once per setup (name -> extra flags), each on its own ports."""
    proxies: list[Proxy] = []
    for name, flags in setups.items():
        port, admin = free_port(), free_port()
        argv = [*infermon_argv(args), "proxy", "--listen", f"{LOOPBACK}:{port}", "--upstream", upstream_url]
        argv += ["--admin", f"{LOOPBACK}:{admin}", *flags]
        child = children.start(f"infermon-{len(proxies)}", argv, directory, {**os.environ, **(env or {})})
        wait_for_port(LOOPBACK, port, timeout=30.0, child=child)
        wait_for_port(LOOPBACK, admin, timeout=30.0, child=child)
        proxies.append(Proxy(name, port, admin, ProcessTree(child.pid)))
    return proxies


def pin(args: argparse.Namespace, upstream_pids: list[int], proxies: list[Proxy]) -> None:
    """wrk (this process) on the first half of the CPUs, the upstreams and proxies on the rest."""
    layout = cpu_layout(not args.no_pin)
    if layout is None:
        return
    load_cpus, server_cpus = layout
    os.sched_setaffinity(0, load_cpus)
    for pid in upstream_pids:
        ProcessTree(pid).pin(server_cpus)
    for proxy in proxies:
        proxy.tree.pin(server_cpus)


def warm_up(args: argparse.Namespace, proxies: list[Proxy], path: str, script: Path) -> None:
    for proxy in proxies:
        print(f"[{proxy.name}] warm-up {args.warmup:g}s", file=sys.stderr, flush=True)
        wrk.run(f"http://{LOOPBACK}:{proxy.port}{path}", args.connections, args.threads, args.warmup, script)


def measure_rounds(
    args: argparse.Namespace, proxies: list[Proxy], path: str, script: Path
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """``args.rounds`` interleaved wrk runs per proxy: (rps, CPU us per request) by proxy name."""
    rps: dict[str, list[float]] = {p.name: [] for p in proxies}
    cpu: dict[str, list[float]] = {p.name: [] for p in proxies}
    for r in range(args.rounds):
        for proxy in proxies:
            print(f"[round {r + 1}] {proxy.name}: wrk -c{args.connections}", file=sys.stderr, flush=True)
            url = f"http://{LOOPBACK}:{proxy.port}{path}"
            fig = measure(proxy.name, url, proxy.tree, args.connections, args.threads, args.duration, script)
            if fig.non_2xx or fig.socket_errors:
                print(f"  {fig.non_2xx} non-2xx, {fig.socket_errors} socket errors", file=sys.stderr)
            rps[proxy.name].append(fig.rps)
            cpu[proxy.name].append(fig.cpu_us_per_request)
    return rps, cpu
