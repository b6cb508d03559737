"""Child processes of one benchmark run: start each in its own process group, end them all.

Every server the harness starts (nginx, the SSE upstream, infermon) goes through `Children.start`,
so that one `Children.stop_all()` in a ``finally`` block ends them, on a normal exit, on an error
and on Ctrl-C alike. Each child gets its own session (``start_new_session=True``): a Ctrl-C in the
terminal reaches only this harness, which then ends its children in order, instead of the terminal
signalling every process at once.

Example::

    with Children() as children:
        proc = children.start("nginx", ["/usr/sbin/nginx", "-c", conf], log_dir)
        wait_for_port("127.0.0.1", port, timeout=5.0, proc=proc)
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

LOOPBACK = "127.0.0.1"


class ChildFailed(RuntimeError):
    """A child process exited or never became ready."""


def free_port() -> int:
    """A TCP port on the loopback address that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def tail(path: Path, limit: int = 2000) -> str:
    """The last `limit` characters of a log file, or an empty string."""
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


class Child:
    """One started process, with its log file."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.popen = popen
        self.log = log

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check_alive(self) -> None:
        code = self.popen.poll()
        if code is not None:
            raise ChildFailed(f"{self.name} exited with status {code}; its log ends with:\n{tail(self.log)}")


class Children:
    """All processes started by one run; `stop_all` ends them (TERM, then KILL after a grace period)."""

    def __init__(self, grace: float = 3.0) -> None:
        self.grace = grace
        self._children: list[Child] = []

    def start(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None) -> Child:
        log = log_dir / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        child = Child(name, popen, log)
        self._children.append(child)
        return child

    def pids(self) -> list[int]:
        """Process ids of the children still running."""
        return [child.pid for child in self._children if child.popen.poll() is None]

    def stop(self, child: Child) -> None:
        """End one child's whole process group, waiting at most `grace` seconds before KILL."""
        popen = child.popen
        if popen.poll() is None:
            _signal_group(popen.pid, signal.SIGTERM)
            try:
                popen.wait(timeout=self.grace)
            except subprocess.TimeoutExpired:
                _signal_group(popen.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    popen.wait(timeout=self.grace)
        # Workers left behind by a master that died first still belong to the group.
        _signal_group(popen.pid, signal.SIGKILL)
        if child in self._children:
            self._children.remove(child)

    def stop_all(self) -> None:
        for child in reversed(list(self._children)):
            self.stop(child)

    def __enter__(self) -> Children:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # A second Ctrl-C while stopping must not leave children running.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self.stop_all()
        finally:
            signal.signal(signal.SIGINT, previous)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def wait_for_port(host: str, port: int, timeout: float, child: Child | None = None) -> None:
    """Wait until `host:port` accepts a TCP connection; fail early if `child` exits."""
    deadline = time.monotonic() + timeout
    while True:
        if child is not None:
            child.check_alive()
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                name = child.name if child is not None else f"{host}:{port}"
                message = f"{name} did not accept connections on {host}:{port} within {timeout:g}s"
                raise ChildFailed(message) from exc
        time.sleep(0.05)
