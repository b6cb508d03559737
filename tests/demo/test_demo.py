"""``infermon demo`` end to end, as a real subprocess.

One 20-second run (a module-scoped fixture) serves every check of its output and summary: the
suite runs twice on 2 cores, so the demo runs once per suite run, not once per test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.demo import SHIFTED
from proxy.demo.cli import register, run
from proxy.demo.model import FEATURES
from tests.helpers import TIMEOUT, metric, parse_metrics
from tests.test_cli import INFERMON, REPO, clean_env, infermon_process, run_cli

URL = re.compile(r"^\s+(status page|metrics)\s+(http://[\d.]+:(\d+)/\S*)$")
LIVE = re.compile(r"^\[\s*\d+ s\] \d+ requests")
DURATION = 20


@dataclass
class DemoRun:
    banner: list[str]
    rest: str  # stdout after the banner
    stderr: str
    returncode: int
    wall: float  # seconds from the start to the exit
    metrics_mid_run: dict[str, Any]  # /metrics scraped while it ran
    summary: dict[str, Any]  # --summary-json


def _read_banner(proc: subprocess.Popen[str]) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []
    while not lines or "Ctrl-C to stop" not in lines[-1]:
        line = proc.stdout.readline()
        assert line, "demo exited before its banner ended: " + "".join(lines)
        lines.append(line.rstrip("\n"))
    return lines


def _urls(banner: list[str]) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in map(URL.match, banner) if m}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    path = tmp_path_factory.mktemp("demo") / "summary.json"
    args = ["demo", "--duration", str(DURATION), "--no-browser", "--summary-json", str(path)]
    start = time.monotonic()
    proc = subprocess.Popen(
        [*INFERMON, *args], cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    watchdog = threading.Timer(DURATION + 60, proc.kill)  # a hung demo fails the tests, never the suite
    watchdog.start()
    try:
        banner = _read_banner(proc)
        metrics_url = _urls(banner)["metrics"]
        time.sleep(DURATION / 2)  # half way: both variants have had traffic
        with urllib.request.urlopen(metrics_url, timeout=TIMEOUT) as resp:
            metrics = parse_metrics(resp.read().decode())
        rest, stderr = proc.communicate(timeout=DURATION + 50)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wall = time.monotonic() - start
    return DemoRun(banner, rest, stderr, proc.returncode, wall, metrics, json.loads(path.read_text()))


def test_it_runs_for_its_duration_and_exits_0_quietly(demo_run: DemoRun) -> None:
    assert demo_run.returncode == 0, demo_run.stderr
    assert demo_run.stderr == ""
    assert DURATION <= demo_run.wall < DURATION + 30


def test_the_status_page_and_metrics_urls_come_first(demo_run: DemoRun) -> None:
    assert demo_run.banner[0] == "infermon demo"
    first = [m.group(1) for m in map(URL.match, demo_run.banner[1:3]) if m]
    assert first == ["status page", "metrics"], demo_run.banner
    urls = _urls(demo_run.banner)
    assert urls["status page"].endswith("/") and urls["metrics"] == urls["status page"] + "metrics"
    assert int(URL.match(demo_run.banner[1]).group(3)) != 0  # type: ignore[union-attr]  # the real port
    text = "\n".join(demo_run.banner)
    for word in ("proxy", "model servers", "stable accuracy", "Ctrl-C to stop"):
        assert word in text


def test_a_live_summary_every_few_seconds_then_the_final_one(demo_run: DemoRun) -> None:
    lines = demo_run.rest.splitlines()
    live = [line for line in lines if LIVE.match(line)]
    assert len(live) >= 3, demo_run.rest  # every 5 s in a 20 s run
    final = lines.index(next(line for line in lines if line.startswith("final summary after ")))
    block = lines[final + 1 :]
    assert [line.split()[0] for line in block[1:]] == ["drift", "canary", "scores", "probes"], demo_run.rest
    assert "requests" in block[0] and "p50" in block[0] and "p99" in block[0] and "errors" in block[0]


def test_both_variants_had_traffic_while_it_ran(demo_run: DemoRun) -> None:
    m = demo_run.metrics_mid_run
    stable = metric(m, "infermon_requests_total", variant="stable", model="iris")
    canary = metric(m, "infermon_requests_total", variant="canary", model="iris")
    assert stable > 50 and canary > 5, m.get("infermon_requests_total")
    assert stable > 4 * canary  # 90 / 10
    assert metric(m, "infermon_model_score", metric="accuracy", variant="stable") > 0.5


def test_drift_is_found_on_the_shifted_features_only(demo_run: DemoRun) -> None:
    s = demo_run.summary
    assert s["shift"]["features"] == list(SHIFTED)
    assert s["shift"]["started_s"] is not None and s["shift"]["requests"] > 100
    stable = s["drift"]["stable"]
    assert set(stable["drifted_features"]) == set(SHIFTED), stable
    assert not set(FEATURES) - set(SHIFTED) & set(stable["drifted_features"])


def test_the_canary_fails_on_evidence_and_is_worse_than_stable(demo_run: DemoRun) -> None:
    s = demo_run.summary
    canary = s["canary"]
    assert (canary["verdict"], canary["result"]) == (-1, "fail"), canary
    assert canary["first_fail_s"] is not None and canary["first_fail_s"] < DURATION, canary
    failed = {name for name, result in canary["checks"].items() if result == "fail"}
    assert failed & {"latency", "predictions", "quality", "errors"}, canary
    assert "quality" in canary["checks"]
    # model scores from the posted labels, for both variants, the canary's the worse
    q = s["quality"]
    assert q["stable"]["labels"] >= 100 and q["canary"]["labels"] >= 20, q
    assert 0 < q["canary"]["accuracy"] < q["stable"]["accuracy"] <= 1, q
    assert "f1_macro" in q["stable"]
    assert s["traffic"]["label_outcomes"]["joined"] > 100
    assert s["models"]["stable"]["accuracy"] > s["models"]["canary"]["accuracy"] + 0.1


def test_probes_pass_on_stable_and_fail_on_the_canary(demo_run: DemoRun) -> None:
    probes = demo_run.summary["probes"]
    assert probes["stable"]["outcome"] == "ok" and probes["stable"]["failed"] == [], probes
    assert probes["stable"]["rounds"]["ok"] >= 3
    assert probes["canary"]["outcome"] == "failed", probes  # its answers differ from stable's recorded ones


def test_every_request_got_its_answer(demo_run: DemoRun) -> None:
    t = demo_run.summary["traffic"]
    assert t["failures"] == 0
    assert sum(t["statuses"].values()) == t["requests"]
    assert t["statuses"].get("500", 0) > 0  # the canary's share of 500s
    assert t["chats"] > 0 and t["inference"] > 10 * DURATION
    assert t["p50_ms"] is not None and t["p50_ms"] <= t["p99_ms"]


async def test_ctrl_c_stops_it_cleanly_with_the_final_summary(tmp_path: Path) -> None:
    """SIGINT mid-run, with requests in flight: exit 0, nothing on stderr, the final summary."""
    path = tmp_path / "summary.json"
    args = ("demo", "--every", "1", "--no-browser", "--summary-json", str(path))
    async with infermon_process(*args) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        lines: list[str] = []
        async with asyncio.timeout(TIMEOUT * 2):
            while not any(LIVE.match(line) for line in lines):  # the first live summary: traffic flows
                line = (await proc.stdout.readline()).decode()
                assert line, "demo exited early: " + "".join(lines)
                lines.append(line)
        proc.send_signal(signal.SIGINT)
        rc = await asyncio.wait_for(proc.wait(), TIMEOUT * 2)
        rest = (await proc.stdout.read()).decode()
        stderr = (await proc.stderr.read()).decode()
    assert rc == 0, stderr
    assert stderr == ""
    assert "final summary after " in rest, rest
    summary = json.loads(path.read_text())
    assert summary["traffic"]["requests"] > 0
    assert summary["traffic"]["failures"] == 0  # the requests in flight finished: none was cut


@pytest.mark.parametrize("busy_one", ["--listen", "--admin"])
async def test_a_busy_port_is_one_line_and_exit_1(busy_one: str) -> None:
    busy = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = busy.sockets[0].getsockname()[1]
    options = {"--listen": "127.0.0.1:0", "--admin": "127.0.0.1:0", busy_one: f"127.0.0.1:{port}"}
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


async def test_the_same_port_for_listen_and_admin_is_one_line_and_exit_1() -> None:
    """Both bound with SO_REUSEADDR and neither listening yet, the two sockets shared the port and the
    admin server's start failed later with a traceback; now the second bind says it in one line."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    address = f"127.0.0.1:{port}"
    async with infermon_process("demo", "--listen", address, "--admin", address, "--no-browser") as proc:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    assert proc.returncode == 1, stderr
    assert stdout == b""
    assert stderr.decode().splitlines() == [f"cannot listen on {address}: Address already in use (change --admin)"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infermon")
    register(parser.add_subparsers())
    return parser


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--listen", "nonsense"), "argument --listen: expected HOST:PORT"),
        (("--duration", "-1"), "argument --duration: '-1' must be a positive number"),
        (("--every", "0"), "argument --every: '0' must be a positive number"),
        (("--shift-after", "soon"), "argument --shift-after: 'soon' is not a number"),
    ],
)
def test_bad_flags_are_usage_errors(args: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(["demo", *args])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_a_rate_that_is_not_positive_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    args = _parser().parse_args(["demo", "--rate", "0"])
    assert run(args) == 2
    assert capsys.readouterr().err == "--rate must be a positive number of requests per second\n"


def test_help_shows_every_option_with_its_default() -> None:
    result = run_cli("demo", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps the help text
    for option, default in [
        ("--listen", "(default: 127.0.0.1:0, a free port)"),
        ("--admin", "(default: 127.0.0.1:0, a free port)"),
        ("--rate", "(default: 50)"),
        ("--duration", "(default: until Ctrl-C)"),
        ("--shift-after", "(default: a third of --duration, else 20)"),
        ("--every", "(default: 5)"),
        ("--seed", "(default: 7)"),
        ("--summary-json", "(default: none)"),
        ("--no-browser", "(default: opened when the terminal is interactive)"),
    ]:
        assert option in text
        assert default in text, option
