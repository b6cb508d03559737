"""``infermon demo`` end to end in a subprocess, and its model server in-process."""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import AsyncIterator

import orjson
import pytest
from aiohttp import web

from proxy.demo.model_server import build_model_app
from proxy.demo.traffic import TrafficStats, generate
from tests.conftest import ProxyFactory
from tests.helpers import TIMEOUT, Client, bound_socket, metric, scrape_metrics, wait_until
from tests.test_cli import infermon_process

METRICS_URL = re.compile(r"metrics\s+http://([\d.]+):(\d+)/metrics")
SENT = re.compile(r"sent (\d+) requests; statuses (\{.*\}); failures (\d+)")


async def test_demo_runs_for_its_duration_and_exits_0() -> None:
    args = ("demo", "--duration", "3", "--rate", "30", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0")
    async with infermon_process(*args) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        lines: list[str] = []
        found = None
        async with asyncio.timeout(TIMEOUT):
            while found is None:
                line = (await proc.stdout.readline()).decode()
                assert line, "demo exited before printing the metrics URL: " + "".join(lines)
                lines.append(line)
                found = METRICS_URL.search(line)
        admin = (found.group(1), int(found.group(2)))
        assert admin[1] != 0  # the real port, not the 0 it was asked for

        # while it runs, its own /metrics shows the traffic going through the proxy
        async def traffic_seen() -> bool:
            return metric(await scrape_metrics(admin), "infermon_requests_total") > 0

        await wait_until(traffic_seen, step=0.1)
        m = await scrape_metrics(admin)
        assert metric(m, "infermon_requests_total", model="iris") > 0

        rc = await asyncio.wait_for(proc.wait(), TIMEOUT)
        rest = (await proc.stdout.read()).decode()
        stderr = (await proc.stderr.read()).decode()
    assert rc == 0, stderr
    assert "Traceback" not in stderr
    summary = SENT.search(rest)
    assert summary is not None, rest
    assert int(summary.group(1)) > 10
    assert "200" in summary.group(2)
    assert int(summary.group(3)) == 0


async def test_demo_rejects_a_bad_rate() -> None:
    async with infermon_process("demo", "--rate", "0") as proc:
        _, stderr = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    assert proc.returncode == 2
    assert b"--rate must be a positive number" in stderr


@pytest.fixture
async def model_server() -> AsyncIterator[str]:
    runner = web.AppRunner(build_model_app(error_rate=0.0, delay=0.0005, seed=1), access_log=None, handle_signals=False)
    await runner.setup()
    sock = bound_socket()
    await web.SockSite(runner, sock).start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    await runner.cleanup()


async def test_model_server_endpoints_through_the_proxy(make_proxy: ProxyFactory, model_server: str) -> None:
    app = await make_proxy(model_server)
    client = await Client.connect(app.proxy_address)
    body = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})
    resp = await client.request("POST", "/v2/models/iris/versions/2/infer", body=body)
    assert resp.status == 200
    data = resp.json()
    assert isinstance(data, dict)
    assert (data["model_name"], data["model_version"]) == ("iris", "2")
    assert sum(data["outputs"][0]["data"]) == pytest.approx(1.0)

    resp = await client.request("POST", "/v1/models/churn:predict", body=b'{"instances": [[0, 0, 0, 0]]}')
    assert resp.status == 200

    chat = b'{"stream": true, "max_tokens": 3, "messages": []}'
    resp = await client.request("POST", "/v1/chat/completions", body=chat)
    assert resp.status == 200
    assert resp.body.count(b"data: ") == 4
    assert resp.body.endswith(b"data: [DONE]\n\n")
    await client.close()

    m = await scrape_metrics(app.admin_address)
    assert metric(m, "infermon_requests_total", model="iris", version="2") == 1
    assert metric(m, "infermon_requests_total", model="churn") == 1
    assert metric(m, "infermon_stream_chunk_gap_seconds_count") >= 3


async def test_traffic_generator_counts_what_it_sent(make_proxy: ProxyFactory, model_server: str) -> None:
    app = await make_proxy(model_server)
    host, port = app.proxy_address
    stats = TrafficStats()
    await asyncio.wait_for(generate(f"http://{host}:{port}", rate=200, duration=0.3, stats=stats), TIMEOUT)
    assert stats.sent > 5
    assert stats.failures == 0
    assert sum(stats.by_status.values()) == stats.sent
    m = await scrape_metrics(app.admin_address)
    assert metric(m, "infermon_requests_total") == stats.sent


async def test_demo_stops_cleanly_on_ctrl_c() -> None:
    async with infermon_process("demo", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0") as proc:
        assert proc.stdout is not None and proc.stderr is not None
        async with asyncio.timeout(TIMEOUT):
            while "Ctrl-C to stop" not in (line := (await proc.stdout.readline()).decode()):
                assert line, "demo exited early"
        proc.send_signal(signal.SIGINT)
        rc = await asyncio.wait_for(proc.wait(), TIMEOUT)
        rest = (await proc.stdout.read()).decode()
        stderr = (await proc.stderr.read()).decode()
    assert rc == 0, stderr
    assert "Traceback" not in stderr
    assert SENT.search(rest) is not None, rest
