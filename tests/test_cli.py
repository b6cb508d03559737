"""The ``infermon`` command line, run as a real subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import proxy
from tests.helpers import TIMEOUT, Client, free_port, metric, parse_metrics, scrape, wait_until

REPO = Path(__file__).resolve().parent.parent
INFERMON = [sys.executable, "-m", "proxy"]


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without INFERMON_* settings, so only the test decides the config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERMON_")}
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*INFERMON, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 3,
        cwd=REPO,
        env=env or clean_env(),
        check=False,
    )


def test_bad_upstream_flag_exits_2_with_one_message() -> None:
    result = run_cli("proxy", "--upstream", "ftp://x")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("config error: upstream = 'ftp://x' (from flag --upstream)")
    assert "http:// or https://" in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_bad_env_value_exits_2_and_names_the_variable() -> None:
    result = run_cli("proxy", env=clean_env(INFERMON_LIMITS__MAX_IN_FLIGHT="lots"))
    assert result.returncode == 2
    assert "env INFERMON_LIMITS__MAX_IN_FLIGHT" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = run_cli("proxy", "--config", str(tmp_path / "none.yaml"))
    assert result.returncode == 2
    assert "cannot read config file" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_section_in_the_config_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "infermon.yaml"
    path.write_text("readines:\n  path: /ready\n")
    result = run_cli("proxy", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"config error: unknown key readines (from file {path}): remove it or check its spelling; "
        "did you mean readiness?"
    ]


def test_unknown_section_in_the_environment_names_the_variable() -> None:
    result = run_cli("proxy", env=clean_env(INFERMON_READINES__PATH="x"))
    assert result.returncode == 2
    assert "unknown key readines (from env INFERMON_READINES__PATH)" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"infermon {proxy.__version__}\n"


def test_help_lists_the_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: infermon")
    for command in ("proxy", "demo", "agent"):
        assert command in result.stdout


def test_proxy_help_lists_its_flags() -> None:
    result = run_cli("proxy", "--help")
    assert result.returncode == 0
    for flag in ("--listen", "--upstream", "--admin", "--config", "--log-level"):
        assert flag in result.stdout


def test_no_command_is_a_usage_error() -> None:
    result = run_cli()
    assert result.returncode == 2
    assert "usage: infermon" in result.stderr


def test_console_script_is_installed() -> None:
    script = REPO / ".venv" / "bin" / "infermon"
    if not script.exists():
        pytest.skip("no console script in .venv")
    result = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=TIMEOUT * 3, check=False, env=clean_env()
    )
    assert result.returncode == 0
    assert "usage: infermon" in result.stdout


@contextlib.asynccontextmanager
async def infermon_process(*args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """``infermon ARGS...`` as a child with piped output; killed on the way out if still running."""
    proc = await asyncio.create_subprocess_exec(
        *INFERMON,
        *args,
        cwd=REPO,
        env=clean_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), TIMEOUT)


async def _listening(addr: tuple[str, int], proc: asyncio.subprocess.Process) -> bool:
    if proc.returncode is not None:
        raise AssertionError(f"proxy exited early with {proc.returncode}")
    try:
        client = await Client.connect(addr)
    except OSError:
        return False
    await client.close()
    return True


async def test_proxy_serves_and_exits_0_on_sigterm(upstream: str) -> None:
    listen, admin = ("127.0.0.1", free_port()), ("127.0.0.1", free_port())
    async with infermon_process(
        "proxy", "--listen", f"{listen[0]}:{listen[1]}", "--admin", f"{admin[0]}:{admin[1]}", "--upstream", upstream
    ) as proc:

        async def up() -> bool:
            return await _listening(admin, proc) and await _listening(listen, proc)

        await wait_until(up)
        client = await Client.connect(listen)
        resp = await client.request("GET", "/echo/cli")
        await client.close()
        assert resp.status == 200
        data = resp.json()
        assert isinstance(data, dict)
        assert data["path"] == "/echo/cli"

        _, text = await scrape(admin)
        assert metric(parse_metrics(text), "infermon_requests_total", code="200") == 1

        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), TIMEOUT)
        assert proc.stderr is not None
        stderr = (await asyncio.wait_for(proc.stderr.read(), TIMEOUT)).decode()
    assert rc == 0, stderr
    assert "SIGTERM received" in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("busy_one", ["listen", "admin"])
async def test_proxy_port_in_use_is_one_line_and_exit_1(upstream: str, busy_one: str) -> None:
    busy = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = busy.sockets[0].getsockname()[1]
    addresses = {"listen": f"127.0.0.1:{free_port()}", "admin": f"127.0.0.1:{free_port()}"}
    addresses[busy_one] = f"127.0.0.1:{port}"
    try:
        async with infermon_process(
            "proxy", "--listen", addresses["listen"], "--admin", addresses["admin"], "--upstream", upstream
        ) as proc:
            rc = await asyncio.wait_for(proc.wait(), TIMEOUT)
            assert proc.stderr is not None
            stderr = (await proc.stderr.read()).decode()
    finally:
        busy.close()
    assert rc == 1, stderr
    # the last line, and the only one that is not an INFO log of the start-up before it
    lines = [line for line in stderr.splitlines() if " INFO " not in line]
    assert lines == [f"cannot listen on 127.0.0.1:{port}: Address already in use (change {busy_one} or --{busy_one})"]
    assert stderr.splitlines()[-1] == lines[0]


async def test_sigterm_lets_the_request_in_flight_finish(upstream: str, tmp_path: Path) -> None:
    listen, admin = ("127.0.0.1", free_port()), ("127.0.0.1", free_port())
    config = tmp_path / "proxy.yaml"
    config.write_text(
        f"listen: 127.0.0.1:{listen[1]}\nadmin: 127.0.0.1:{admin[1]}\nupstream: {upstream}\ndrain:\n  timeout: 5\n"
    )
    async with infermon_process("proxy", "--config", str(config)) as proc:

        async def up() -> bool:
            return await _listening(admin, proc) and await _listening(listen, proc)

        await wait_until(up)
        client = await Client.connect(listen)
        await client.send(b"GET /slow?delay=0.5 HTTP/1.1\r\nHost: t\r\n\r\n")

        async def in_flight() -> bool:
            _, text = await scrape(admin)
            return metric(parse_metrics(text), "infermon_requests_in_flight") == 1

        await wait_until(in_flight)
        proc.send_signal(signal.SIGTERM)
        resp = await client.response()
        assert resp.status == 200
        assert resp.header("connection") == "close"  # draining: no keep-alive
        await client.close()
        rc = await asyncio.wait_for(proc.wait(), TIMEOUT)
        assert proc.stderr is not None
        stderr = (await proc.stderr.read()).decode()
    assert rc == 0, stderr
    assert "drained" in stderr
