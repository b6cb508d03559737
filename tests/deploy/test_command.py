"""proxy/deploy/command.py: ``infermon inject`` as a real subprocess, as a pipeline would run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.deploy.kube import load_all, pod_containers, validate_all
from tests.helpers import TIMEOUT

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = Path(__file__).resolve().parent / "manifests"


def _inject(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "inject", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 3,
        cwd=REPO,
        check=False,
    )


def test_inject_from_stdin_writes_the_manifests_and_notes_what_it_did() -> None:
    result = _inject("-", "--image", "registry.example/infermon:0.1.0", stdin=(MANIFESTS / "mlserver.yaml").read_text())
    assert result.returncode == 0, result.stderr
    docs = load_all(result.stdout)
    assert validate_all(docs) == 4
    sidecar = pod_containers(docs[1]["spec"]["template"]["spec"])["infermon"]
    assert sidecar["image"] == "registry.example/infermon:0.1.0"
    lines = result.stderr.splitlines()
    assert lines[0] == "Deployment/wine: injected (native sidecar; port http -> infermon :9463 -> mlserver :8080)"
    assert lines[1].startswith("Deployment/wine: Services outside this input")
    assert lines[2:] == ["Service/wine: port http now targets 9463 (infermon) instead of 8080"]


def test_inject_a_file_twice_through_a_pipe_changes_nothing() -> None:
    once = _inject(str(MANIFESTS / "torchserve.yaml"), "--port", "inference")
    assert once.returncode == 0, once.stderr
    twice = _inject("-", "--port", "inference", stdin=once.stdout)
    assert twice.returncode == 0 and twice.stdout == once.stdout
    assert "StatefulSet/resnet: already injected, unchanged" in twice.stderr


def test_a_refusal_exits_1_and_writes_nothing() -> None:
    result = _inject(str(MANIFESTS / "torchserve.yaml"))  # three ports, none chosen
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("infermon inject: StatefulSet/resnet: container 'torchserve' has several ports")
    assert "--port" in result.stderr and "Traceback" not in result.stderr


def test_usage_errors_exit_2() -> None:
    missing = _inject("/nonexistent/deployment.yaml")
    assert missing.returncode == 2 and "cannot read /nonexistent/deployment.yaml" in missing.stderr
    bad_port = _inject("-", "--proxy-port", "70000", stdin="")
    assert bad_port.returncode == 2 and "not a port number" in bad_port.stderr
    istio = _inject("-", "--admin-port", "15020", stdin="")
    assert istio.returncode == 2 and "Istio" in istio.stderr
