"""What a round of golden-request probes costs the proxy: wall time, CPU per probe, loop stall.

Usage: ``.venv/bin/python -m bench.probe_cost [--probes 10,100] [--rounds 20] [--instances 1]
[--concurrency 1]``

The demo model server (no delay, no errors) runs in a child process, so its CPU is not counted. The
proxy runs in-process with a probe file of N KServe v1 probes, each expecting the exact JSON answer
(numbers within the default tolerances) and the argmax of its first instance. Rounds run one after
the other (``ProbeRunner.run_round``); the CPU is this process's (event loop and check thread), the
stall is the worst lateness of a 1 ms timer on the loop during the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

from proxy.app import ProxyApp
from proxy.demo.model_server import _score
from proxy.loop import run
from proxy.settings import ProxyConfig

SERVER = """
import sys
from aiohttp import web
from proxy.demo.model_server import build_model_app
web.run_app(build_model_app(error_rate=0.0, delay=0.0), host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _probe_file(n: int, instances: int) -> str:
    fd, path = tempfile.mkstemp(suffix=".jsonl")
    with os.fdopen(fd, "w") as f:
        for i in range(n):
            rows = [[float(i % 7), 1.0 + j, 2.0, 0.5] for j in range(instances)]
            scores = [_score(r) for r in rows]
            expect = {
                "json": {"predictions": scores},
                "label": {"path": "$.predictions[0]", "argmax": max(range(2), key=lambda k: scores[0][k])},
            }
            line = {"name": f"p{i}", "path": "/v1/models/m:predict", "body": {"instances": rows}, "expect": expect}
            f.write(json.dumps(line) + "\n")
    return path


async def _measure(url: str, n: int, rounds: int, instances: int, concurrency: int) -> dict[str, Any]:
    path = _probe_file(n, instances)
    listen, admin = socket.socket(), socket.socket()
    for s in (listen, admin):
        s.bind(("127.0.0.1", 0))
    cfg = ProxyConfig.model_validate(
        {"upstream": url, "probes": {"file": path, "interval": 3600, "concurrency": concurrency}}
    )
    app = ProxyApp(cfg)
    await app.start(listen=listen, admin=admin)
    runner = app.probe_runner
    assert runner is not None
    await runner.wait_rounds(1)  # the first round (at start) also warms the pool
    loop = asyncio.get_running_loop()
    worst = 0.0
    done = False

    async def ticker() -> None:
        nonlocal worst
        while not done:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            worst = max(worst, time.perf_counter() - t - 0.001)

    tick = loop.create_task(ticker())
    cpu0, wall0 = time.process_time(), time.perf_counter()
    outcomes = [await runner.run_round("stable") for _ in range(rounds)]
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    done = True
    await tick
    await app.shutdown()
    os.unlink(path)
    return {
        "probes": n,
        "instances": instances,
        "concurrency": concurrency,
        "rounds": rounds,
        "ok_rounds": outcomes.count("ok"),
        "round_wall_ms": round(wall / rounds * 1000, 2),
        "cpu_per_probe_us": round(cpu / (rounds * n) * 1e6, 1),
        "loop_stall_ms": round(worst * 1000, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--probes", default="10,100")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/v2/health/ready", timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        for n in (int(x) for x in args.probes.split(",")):
            result = run(_measure(url, n, args.rounds, args.instances, args.concurrency))
            print(json.dumps(result))
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
