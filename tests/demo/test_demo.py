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
from tests.helpers import TIMEOUT, Client, bound_socket, free_port, metric, scrape_metrics, wait_until
from tests.test_cli import infermon_process, run_cli

METRICS_URL = re.compile(r"metrics\s+http://([\d.]+):(\d+)/metrics")
MODEL_URL = re.compile(r"model server\s+http://([\d.]+):(\d+)")
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


async def test_traffic_generator_stops_sending_and_lets_requests_in_flight_finish(make_proxy: ProxyFactory) -> None:
    runner = web.AppRunner(build_model_app(error_rate=0.0, delay=0.02, seed=2), access_log=None, handle_signals=False)
    await runner.setup()
    sock = bound_socket()
    await web.SockSite(runner, sock).start()
    try:
        app = await make_proxy(f"http://127.0.0.1:{sock.getsockname()[1]}")
        host, port = app.proxy_address
        stats, stop = TrafficStats(), asyncio.Event()
        traffic = asyncio.create_task(generate(f"http://{host}:{port}", 200, None, stats, stop=stop))

        async def in_flight() -> bool:
            return metric(await scrape_metrics(app.admin_address), "infermon_requests_in_flight") >= 2

        await wait_until(in_flight, step=0.01)
        stop.set()
        await asyncio.wait_for(traffic, TIMEOUT)
        sent = stats.sent
        assert sent >= 2
        assert stats.failures == 0
        assert sum(stats.by_status.values()) == sent  # the ones in flight got their answers
        m = await scrape_metrics(app.admin_address)
        assert metric(m, "infermon_requests_total") == sent
        assert metric(m, "infermon_client_aborts_total") == 0
    finally:
        await runner.cleanup()


async def _banner(proc: asyncio.subprocess.Process) -> list[str]:
    """The lines the demo prints up to "Ctrl-C to stop"."""
    assert proc.stdout is not None
    lines: list[str] = []
    async with asyncio.timeout(TIMEOUT):
        while not lines or "Ctrl-C to stop" not in lines[-1]:
            line = (await proc.stdout.readline()).decode()
            assert line, "demo exited early: " + "".join(lines)
            lines.append(line)
    return lines


async def test_demo_stops_cleanly_on_ctrl_c_while_requests_stream() -> None:
    """SIGINT with requests in flight (streams among them): they finish, then only the summary is printed."""
    args = ("demo", "--rate", "200", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0")
    async with infermon_process(*args) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        banner = "".join(await _banner(proc))
        found = METRICS_URL.search(banner)
        assert found is not None, banner
        admin = (found.group(1), int(found.group(2)))

        async def streams_done_and_some_in_flight() -> bool:
            m = await scrape_metrics(admin)
            chunked = metric(m, "infermon_stream_chunk_gap_seconds_count") > 0
            return chunked and metric(m, "infermon_requests_in_flight") >= 2

        await wait_until(streams_done_and_some_in_flight, step=0.01)
        proc.send_signal(signal.SIGINT)
        rc = await asyncio.wait_for(proc.wait(), TIMEOUT)
        rest = (await proc.stdout.read()).decode()
        stderr = (await proc.stderr.read()).decode()
    assert rc == 0, stderr
    assert stderr == ""
    lines = [line for line in rest.splitlines() if not line.startswith("  ")]  # the 5 s progress lines
    assert len(lines) == 1, rest
    summary = SENT.search(lines[0])
    assert summary is not None, rest
    statuses = orjson.loads(re.sub(r"(\d+):", r'"\1":', summary.group(2)))
    # every request sent got its answer: none was cut by the shutdown
    assert int(summary.group(3)) == 0, rest
    assert sum(statuses.values()) == int(summary.group(1)), rest


def test_demo_help_shows_every_option_with_its_default() -> None:
    result = run_cli("demo", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps the help text
    for option, default in [
        ("--listen", "(default: 127.0.0.1:8080)"),
        ("--admin", "(default: 127.0.0.1:9464)"),
        ("--model-port", "(default: 0, a free port)"),
        ("--rate", "(default: 20)"),
        ("--duration", "(default: until Ctrl-C)"),
    ]:
        assert option in text
        assert default in text


async def test_demo_takes_the_model_server_port() -> None:
    port = free_port()
    args = ("demo", "--model-port", str(port), "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0")
    async with infermon_process(*args) as proc:
        found = MODEL_URL.search("".join(await _banner(proc)))
        assert found is not None
        assert int(found.group(2)) == port
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), TIMEOUT) == 0


@pytest.mark.parametrize("busy_one", ["--listen", "--admin", "--model-port"])
async def test_demo_busy_port_is_one_line_and_exit_1(busy_one: str) -> None:
    busy = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = busy.sockets[0].getsockname()[1]
    options = {"--listen": "127.0.0.1:0", "--admin": "127.0.0.1:0", "--model-port": "0"}
    options[busy_one] = str(port) if busy_one == "--model-port" else f"127.0.0.1:{port}"
    try:
        async with infermon_process("demo", *[x for pair in options.items() for x in pair]) as proc:
            stdout, stderr = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    finally:
        busy.close()
    assert proc.returncode == 1, stderr
    assert stdout == b""
    assert stderr.decode().splitlines() == [
        f"cannot listen on 127.0.0.1:{port}: Address already in use (change {busy_one})"
    ]


def test_demo_rejects_a_bad_address() -> None:
    result = run_cli("demo", "--listen", "nonsense")
    assert result.returncode == 2
    assert "argument --listen: expected HOST:PORT" in result.stderr
    assert "Traceback" not in result.stderr
