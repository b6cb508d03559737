"""deploy/systemd: the unit starts infermon as the CLI expects and stops it within the drain.

The unit is read as systemd reads it (sections, repeated keys kept); ExecStart parses with
infermon's own CLI and its --config file loads; TimeoutStopSec covers the drain and the trace flush
of that file; the ordering makes infermon stop before the model server. ``systemd-analyze verify``
runs too where systemd is installed.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from proxy import config
from proxy.cli import build_parser
from proxy.settings import ProxyConfig, split_host_port

SYSTEMD = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
UNIT = SYSTEMD / "infermon.service"


def _unit() -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, line
        key, sep, value = line.partition("=")
        assert sep, line
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _one(section: dict[str, list[str]], key: str) -> str:
    (value,) = section[key]
    return value


def _config() -> ProxyConfig:
    words = shlex.split(_one(_unit()["Service"], "ExecStart"))
    assert words[0] == "/opt/infermon/bin/infermon"  # the image's and docs/local.md's venv
    args = build_parser().parse_args(words[1:])
    assert args.command == "proxy"
    assert args.config == "/etc/infermon/infermon.yaml"
    return config.load(ProxyConfig, file=SYSTEMD / "infermon.yaml", env={})


def test_execstart_is_a_valid_proxy_command_and_its_file_loads() -> None:
    cfg = _config()
    assert split_host_port(cfg.listen) == ("0.0.0.0", 8080)
    assert cfg.upstream_target() == ("http", "127.0.0.1", 8000)  # the model server on the loopback


def test_the_stop_covers_the_drain_and_the_trace_flush() -> None:
    service = _unit()["Service"]
    cfg = _config()
    assert _one(service, "KillSignal") == "SIGTERM"
    assert float(_one(service, "TimeoutStopSec")) > cfg.drain.delay + cfg.drain.timeout + cfg.tracing.timeout
    assert _one(service, "ExecReload") == "/bin/kill -HUP $MAINPID"


def test_infermon_starts_after_and_stops_before_the_model_server() -> None:
    unit = _unit()["Unit"]
    assert "model-server.service" in " ".join(unit["After"]).split()
    assert "model-server.service" in " ".join(unit["Wants"]).split()
    assert _unit()["Install"]["WantedBy"] == ["multi-user.target"]


def test_it_runs_without_privileges() -> None:
    service = _unit()["Service"]
    for key, value in {"DynamicUser": "yes", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "ProtectHome": "yes", "PrivateTmp": "yes", "CapabilityBoundingSet": ""}.items():  # fmt: skip
        assert _one(service, key) == value, key
    assert "User" not in service  # DynamicUser: never root


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify() -> None:
    # verify also wants ExecStart's file and the model server's unit on this machine: those two
    # complaints are expected here, any other is an error in the unit
    result = subprocess.run(
        ["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True, timeout=60, check=False
    )
    errors = [
        line for line in result.stderr.splitlines()
        if "infermon.service" in line and "not found" not in line and "No such file" not in line
        and "model-server.service" not in line
    ]  # fmt: skip
    assert errors == [], result.stderr
