"""Run wrk and read its figures.

wrk is run with a Lua script that defines only ``done()``: wrk then builds its request once and calls
no Lua per request, and ``done()`` prints exact figures (latency percentiles in microseconds from wrk's
histogram, request and error counts) on one line that `parse` reads. ``--latency`` output is kept in
`WrkResult.raw` for the log.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

WRK = "/usr/bin/wrk"
MARK = "BENCH-JSON "

DONE_SCRIPT = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"duration_us":%d,"requests":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d,"mean":%.2f}\\n',
    "MARK", summary.duration, summary.requests, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
""".replace("MARK", MARK)


class WrkFailed(RuntimeError):
    """wrk could not run or printed nothing to read."""


@dataclass
class WrkResult:
    """One wrk run. Latencies are in microseconds."""

    requests: int
    duration_s: float
    rps: float
    p50_us: float
    p90_us: float
    p99_us: float
    p999_us: float
    max_us: float
    mean_us: float
    non_2xx: int
    socket_errors: int
    bytes_read: int
    raw: str

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors


def write_script(directory: Path) -> Path:
    path = directory / "done.lua"
    path.write_text(DONE_SCRIPT)
    return path


def parse(output: str) -> WrkResult:
    for line in output.splitlines():
        if line.startswith(MARK):
            data = json.loads(line[len(MARK) :])
            break
    else:
        raise WrkFailed(f"wrk printed no figures:\n{output[-2000:]}")
    duration = data["duration_us"] / 1e6
    requests = int(data["requests"])
    sockets = sum(int(data[key]) for key in ("connect", "read", "write", "timeout"))
    return WrkResult(
        requests=requests,
        duration_s=duration,
        rps=requests / duration if duration > 0 else 0.0,
        p50_us=float(data["p50"]),
        p90_us=float(data["p90"]),
        p99_us=float(data["p99"]),
        p999_us=float(data["p999"]),
        max_us=float(data["max"]),
        mean_us=float(data["mean"]),
        non_2xx=int(data["status"]),
        socket_errors=sockets,
        bytes_read=int(data["bytes"]),
        raw=output,
    )


def _argv(url: str, connections: int, threads: int, seconds: float, script: Path) -> list[str]:
    return [
        WRK,
        f"-c{connections}",
        f"-t{threads}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "5s",
        "--latency",
        "-s",
        str(script),
        url,
    ]


def run(url: str, connections: int, threads: int, seconds: float, script: Path) -> WrkResult:
    """Run wrk against `url` for `seconds` and return its figures (bounded by a timeout)."""
    return finish(start(url, connections, threads, seconds, script), seconds)


def start(url: str, connections: int, threads: int, seconds: float, script: Path) -> subprocess.Popen[str]:
    """Start wrk in the background; `finish` waits for it and reads its figures."""
    argv = _argv(url, connections, threads, seconds, script)
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str], seconds: float) -> WrkResult:
    try:
        stdout, stderr = proc.communicate(timeout=seconds + 60)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        proc.communicate()
        raise WrkFailed(f"wrk did not finish within {seconds + 60:g}s") from exc
    if proc.returncode != 0:
        raise WrkFailed(f"wrk exited with status {proc.returncode}: {stderr.strip()[-2000:]}")
    return parse(stdout)
