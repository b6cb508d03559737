"""proxy/deploy/healthcheck.py: the image's HEALTHCHECK against real HTTP servers."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from proxy.deploy import healthcheck
from tests.helpers import TIMEOUT, free_port

REPO = Path(__file__).resolve().parents[2]


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = 200 if self.path == "/healthz" else 503
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(TIMEOUT)


def test_a_200_is_healthy(server: str) -> None:
    assert healthcheck.main([f"{server}/healthz"]) == 0


def test_any_of_the_addresses_is_enough(server: str) -> None:
    down = f"http://127.0.0.1:{free_port()}/healthz"
    assert healthcheck.main([down, f"{server}/healthz"]) == 0


def test_a_503_or_nothing_listening_is_unhealthy(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert healthcheck.main([f"{server}/readyz"]) == 1
    assert healthcheck.main([f"http://127.0.0.1:{free_port()}/healthz"]) == 1
    assert "unhealthy: no 200 from" in capsys.readouterr().err


def test_the_defaults_are_the_proxy_and_agent_admin_ports() -> None:
    from proxy.agent.config import AgentConfig
    from proxy.settings import ProxyConfig

    ports = {int(url.split(":")[2].split("/")[0]) for url in healthcheck.DEFAULT_URLS}
    assert ports == {int(ProxyConfig().admin.listen.rsplit(":")[1]), int(AgentConfig().listen.rsplit(":")[1])}


def test_as_the_image_runs_it(server: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy.deploy.healthcheck", f"{server}/healthz"],
        capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
