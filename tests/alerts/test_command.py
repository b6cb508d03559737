"""``infermon retrain-hook`` as a real process: arguments, the listening line, a run, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

from proxy.alerts.command import config_from
from proxy.cli import build_parser
from proxy.errors import ConfigError
from tests.alerts.test_hook import RECORD, alert, notification
from tests.helpers import wait_until

REPO = Path(__file__).resolve().parents[2]
_LISTENING = re.compile(r"retrain-hook listening on (http://\S+)")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERMON_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


async def _start(*args: str) -> tuple[asyncio.subprocess.Process, str, list[str]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "retrain-hook", *args,
        env=_env(), cwd=REPO, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    lines: list[str] = []
    while True:
        line = (await asyncio.wait_for(proc.stderr.readline(), timeout=20)).decode()
        if not line:
            raise AssertionError("the hook exited before listening:\n" + "".join(lines))
        lines.append(line)
        match = _LISTENING.search(line)
        if match:
            return proc, match.group(1), lines


async def _post(url: str, body: object, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.post(url + "/alerts", json=body, headers=headers) as resp,
    ):
        return resp.status


def test_cli_lists_retrain_hook() -> None:
    assert "retrain-hook" in build_parser().format_help()


async def test_runs_once_per_group_and_stops_its_command_on_sigterm(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    out.mkdir()
    token = tmp_path / "token"
    token.write_text("0123456789abcdef0123\n")
    release = tmp_path / "never"
    command = shlex.join([sys.executable, str(RECORD), str(out), "0", str(release)])
    proc, url, _ = await _start("--listen", "127.0.0.1:0", "--command", command, "--token-file", str(token))
    try:
        assert await _post(url, notification(alert())) == 401
        assert await _post(url, notification(alert()), token="0123456789abcdef0123") == 202
        assert await _post(url, notification(alert()), token="0123456789abcdef0123") == 200  # the repeat

        async def started() -> bool:
            return bool(list(out.glob("run-*.json")))

        await wait_until(started)  # the command runs in another process: only its file tells
        (run,) = sorted(out.glob("run-*.json"))
        record = json.loads(run.read_text())
        assert record["env"]["INFERMON_ALERT_MODEL"] == "iris"
        proc.send_signal(signal.SIGTERM)  # the command waits for a file that never comes: it is ended
        assert await asyncio.wait_for(proc.wait(), timeout=20) == 0
        with pytest.raises(ProcessLookupError):
            os.kill(record["pid"], 0)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--command", ""], "--command is empty"),
        (["--command", "no-such-program-here --flag"], "'no-such-program-here' is not an executable"),
        (["--command", "python 'unclosed"], "quote it as a shell would"),
        (["--command", "true", "--concurrency", "0"], "--concurrency 0 must be at least 1"),
        (["--command", "true", "--timeout", "0"], "--timeout 0 must be above 0"),
        (["--command", "true", "--listen", "nowhere"], "--listen 'nowhere'"),
        (["--command", "true", "--token-file", "/no/such/token"], "--token-file '/no/such/token'"),
    ],
)
def test_bad_arguments_are_config_errors_naming_the_flag(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from(build_parser().parse_args(["retrain-hook", *args]))


async def test_a_bad_argument_exits_2_with_its_message() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "retrain-hook", "--command", "",
        env=_env(), cwd=REPO, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), timeout=20)
    assert proc.returncode == 2
    assert "--command is empty" in err.decode()


async def test_a_busy_port_is_one_line_and_exit_1() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "retrain-hook", "--listen", f"127.0.0.1:{port}", "--command", "true",
            env=_env(), cwd=REPO, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), timeout=20)
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use (change --listen)" in err.decode()
