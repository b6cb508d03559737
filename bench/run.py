"""Benchmark infermon against direct access and an nginx reverse proxy, in one run, on this machine.

Usage: ``.venv/bin/python -m bench.run [--duration 10] [--warmup 2] [--soak 1000000] [--json PATH]``
(``make bench`` runs it with the defaults). See docs/benchmarks.md for what each figure means.

The run starts its own upstreams (nginx returning a small JSON body, and an SSE server), an nginx
reverse proxy and infermon (and, with ``--baseline PATH``, a second infermon build as
``infermon-before``), all on 127.0.0.1 ports picked at start, measures each with wrk at c=1 and
c=32, then times SSE streams direct and through infermon, and optionally soaks infermon with a fixed
number of requests while sampling its RSS. ``--strace`` adds syscalls per request for each server,
``--scrape-interval`` the latency of infermon's requests while its /metrics is scraped. Every child
runs in its own process group and is ended when the run ends, on Ctrl-C and on SIGTERM too.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from bench import report, scrape, sse_client, syscalls, upstreams, wrk
from bench.procs import LOOPBACK, Child, ChildFailed, Children, free_port, tail, wait_for_port
from bench.report import (
    INFERMONS,
    MB,
    LatencyFigures,
    LoadFigures,
    PerfFigures,
    ScrapeFigures,
    SoakFigures,
    SseFigures,
    SyscallFigures,
)
from bench.sampler import Counters, MachineCpu, ProcessTree, RssSampler, cpu_layout

TARGETS = ("direct", "nginx", "infermon", "infermon-before")
DEFAULT_LABEL_VALUES = 50  # infermon's labels.max_values default
DEFAULT_COMBINATIONS = 100  # infermon's labels.max_combinations default


class InfermonUnavailable(RuntimeError):
    """infermon's proxy could not be started or did not answer."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured wrk run (10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up load per target (2)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat the load runs, targets interleaved; medians reported (1)",
    )
    parser.add_argument("--connections", type=int, default=32, help="high concurrency, wrk -c (32)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads at high concurrency (2)")
    parser.add_argument(
        "--targets",
        default=None,
        help="comma-separated subset of direct,nginx,infermon,infermon-before for the load table "
        "(all; infermon-before only with --baseline)",
    )
    parser.add_argument(
        "--no-pin", action="store_true", help="let the scheduler place wrk and the servers (default: pinned)"
    )
    parser.add_argument("--no-sse", action="store_true", help="skip the SSE time-to-first-event run")
    parser.add_argument("--sse-streams", type=int, default=30, help="SSE streams per target (30)")
    parser.add_argument("--sse-events", type=int, default=20, help="events per SSE stream (20)")
    parser.add_argument("--sse-delay-ms", type=float, default=10.0, help="ms between SSE events (10)")
    parser.add_argument(
        "--soak",
        type=int,
        default=0,
        metavar="N",
        help="also send N requests through infermon",
    )
    parser.add_argument("--soak-only", action="store_true", help="run only the soak (with --soak N)")
    parser.add_argument("--soak-interval", type=float, default=2.0, help="seconds between RSS samples (2)")
    parser.add_argument("--soak-max-seconds", type=float, default=3600.0, help="stop the soak after this long (3600)")
    parser.add_argument("--infermon", default=None, help="infermon executable (beside this Python)")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        metavar="PATH",
        help="another infermon executable (an older build), measured as the extra target infermon-before",
    )
    parser.add_argument(
        "--baseline-name", default=None, metavar="TEXT", help="what --baseline is, for the report (its path)"
    )
    parser.add_argument(
        "--strace",
        action="store_true",
        help="after the load runs, count each server's syscalls per request with strace (needs strace)",
    )
    parser.add_argument(
        "--perf",
        action="store_true",
        help="after the load runs, count each server's syscalls and wake-ups per request with perf stat",
    )
    parser.add_argument(
        "--trace-seconds", type=float, default=3.0, help="seconds of wrk under strace -c, and under perf stat (3)"
    )
    parser.add_argument(
        "--strace-sample", type=int, default=400, metavar="N", help="I/O and epoll calls kept in the sample (400)"
    )
    parser.add_argument(
        "--scrape-interval",
        type=float,
        default=0.0,
        metavar="S",
        help="also run each infermon at high concurrency without and with /metrics scraped every S seconds",
    )
    parser.add_argument(
        "--scrape-paths",
        type=int,
        default=0,
        metavar="N",
        help="before the scrape runs, send one request on each of N distinct inference paths (more series)",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write figures as JSON")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with configs and logs")
    args = parser.parse_args(argv)
    if args.targets is None:
        targets = [t for t in TARGETS if t != "infermon-before" or args.baseline is not None]
    else:
        targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    args.targets = [t for t in TARGETS if t in targets]
    if "infermon-before" in args.targets and args.baseline is None:
        parser.error("target infermon-before needs --baseline PATH (another infermon executable)")
    if args.baseline is not None:
        args.baseline = args.baseline.expanduser().absolute()
        if not (args.baseline.is_file() and os.access(args.baseline, os.X_OK)):
            parser.error(f"--baseline {args.baseline}: not an executable file (give an infermon command)")
    if args.strace and syscalls.available() is not None:
        parser.error(syscalls.MISSING)
    if args.perf and syscalls.perf_available() is not None:
        parser.error(str(syscalls.perf_available()))
    if args.trace_seconds < 1 or args.strace_sample < 1:
        parser.error("need --trace-seconds >= 1 and --strace-sample >= 1")
    if args.scrape_interval < 0 or args.scrape_paths < 0:
        parser.error("need --scrape-interval >= 0 and --scrape-paths >= 0")
    if args.scrape_paths and not args.scrape_interval:
        parser.error("--scrape-paths N needs --scrape-interval S")
    if args.sse_streams < 1 or args.sse_events < 1 or args.sse_delay_ms < 0:
        parser.error("need --sse-streams >= 1, --sse-events >= 1 and --sse-delay-ms >= 0")
    if args.soak_only and args.soak <= 0:
        parser.error("--soak-only needs --soak N")
    if (
        args.rounds < 1
        or args.duration < 1
        or args.connections < 1
        or args.threads < 1
        or args.threads > args.connections
    ):
        parser.error("need --rounds >= 1, --duration >= 1 and 1 <= --threads <= --connections")
    return args


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- infermon ---------------------------------------------------------------------------------------


def infermon_argv(args: argparse.Namespace, build: str = "infermon") -> list[str]:
    """The command of one infermon build: this checkout's (``infermon``) or the --baseline one."""
    if build == "infermon-before":
        return [str(args.baseline)]
    if args.infermon:
        return [args.infermon]
    script = Path(sys.executable).parent / "infermon"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "proxy"]


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def check_infermon(args: argparse.Namespace, build: str = "infermon") -> str | None:
    """None when ``infermon proxy --help`` works, else a one-paragraph reason."""
    base = infermon_argv(args, build)
    command = " ".join([*base, "proxy", "--help"])
    try:
        helped = subprocess.run([*base, "proxy", "--help"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`{command}` failed: {exc}"
    if helped.returncode != 0:
        last = (helped.stderr or helped.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return f"`{command}` exited {helped.returncode} (is the proxy subcommand there yet?): {last[0]}"
    return None


def infermon_env(args: argparse.Namespace, build: str) -> dict[str, str] | None:
    """The environment of one infermon build: label caps raised so --scrape-paths grows every series.

    labels.max_combinations exists only in this checkout's build (a baseline older than it has no
    combination budget at all and would refuse the variable), so it is raised for ``infermon`` only:
    both builds then keep one label set per path.
    """
    models, versions = scrape.label_values(args.scrape_paths)
    extra: dict[str, str] = {}
    if max(models, versions) > DEFAULT_LABEL_VALUES:
        extra["INFERMON_LABELS__MAX_VALUES"] = str(max(models, versions))
    if build == "infermon" and args.scrape_paths > DEFAULT_COMBINATIONS:
        extra["INFERMON_LABELS__MAX_COMBINATIONS"] = str(args.scrape_paths)
    return {**os.environ, **extra} if extra else None


def start_infermon(
    args: argparse.Namespace,
    children: Children,
    directory: Path,
    upstream_url: str,
    probe_path: str,
    build: str = "infermon",
    env: dict[str, str] | None = None,
) -> tuple[Child, int, int]:
    """Start ``infermon proxy`` with default monitoring in front of `upstream_url`; (child, port, admin)."""
    base = infermon_argv(args, build)
    port, admin = free_port(), free_port()
    argv = [*base, "proxy", "--listen", f"{LOOPBACK}:{port}", "--upstream", upstream_url]
    argv += ["--admin", f"{LOOPBACK}:{admin}"]
    child = children.start(f"{build}-{port}", argv, directory, env)
    try:
        wait_for_port(LOOPBACK, port, timeout=30.0, child=child)
        status, body = http_get(port, probe_path)
    except (ChildFailed, OSError, http.client.HTTPException) as exc:
        children.stop(child)
        raise InfermonUnavailable(
            f"{build} did not serve {probe_path} on {LOOPBACK}:{port}: {exc}\n{tail(child.log, 800)}"
        ) from exc
    if status != 200:
        children.stop(child)
        raise InfermonUnavailable(f"{build} answered {status} to a probe: {body[:300]!r}\n{tail(child.log, 800)}")
    return child, port, admin


def requests_counted(admin: int) -> dict[str, float] | None:
    """infermon_requests_total from the admin /metrics, summed per status code (None if unreadable)."""
    try:
        status, body = http_get(admin, "/metrics")
    except (OSError, http.client.HTTPException):
        return None
    if status != 200:
        return None
    counts: dict[str, float] = {}
    for line in body.decode(errors="replace").splitlines():
        if not line.startswith("infermon_requests_total"):
            continue
        labels, _, value = line.rpartition(" ")
        code = "all"
        if 'code="' in labels:
            code = labels.split('code="', 1)[1].split('"', 1)[0]
        counts[code] = counts.get(code, 0.0) + float(value)
    return counts


# --- load runs --------------------------------------------------------------------------------------


def measure(
    name: str,
    url: str,
    tree: ProcessTree,
    conns: int,
    threads: int,
    seconds: float,
    script: Path,
    check: Child | None = None,
    machine_cpu: MachineCpu | None = None,
    upstream: ProcessTree | None = None,
) -> LoadFigures:
    """One wrk run; CPU, switches and faults of `tree` (and of `upstream`, when given) over it."""
    before = tree.counters()
    upstream_before = upstream.counters() if upstream else Counters()
    machine_before = machine_cpu.reading() if machine_cpu else (0.0, 0.0, 0.0)
    started = time.monotonic()
    with RssSampler(tree, interval=0.2) as sampler:
        result = wrk.run(url, conns, threads, seconds, script)
    used = tree.counters() - before
    upstream_used = upstream.counters() - upstream_before if upstream else None
    cpu = used.cpu_s
    other_pct = steal_pct = 0.0
    if machine_cpu is not None:
        busy, ours, steal = (b - a for a, b in zip(machine_before, machine_cpu.reading(), strict=True))
        capacity = (time.monotonic() - started) * (os.cpu_count() or 1) / 100
        other_pct, steal_pct = max(0.0, busy - ours) / capacity, steal / capacity
    time.sleep(0.3)
    rss_after = tree.rss_bytes()
    if check is not None:
        check.check_alive()
    n = result.requests or 1  # wrk completed none: every figure per request is 0
    per_request = cpu / n * 1e6 if result.requests else 0.0
    return LoadFigures(
        target=name,
        connections=conns,
        threads=threads,
        seconds=result.duration_s,
        requests=result.requests,
        rps=result.rps,
        p50_us=result.p50_us,
        p90_us=result.p90_us,
        p99_us=result.p99_us,
        p999_us=result.p999_us,
        max_us=result.max_us,
        non_2xx=result.non_2xx,
        socket_errors=result.socket_errors,
        cpu_s=cpu,
        cpu_us_per_request=per_request,
        rss_peak_mb=sampler.peak / MB,
        rss_after_mb=rss_after / MB,
        other_cpu_pct=other_pct,
        steal_pct=steal_pct,
        user_us_per_request=used.user_s / n * 1e6,
        system_us_per_request=used.system_s / n * 1e6,
        voluntary_per_request=used.voluntary_switches / n,
        involuntary_per_request=used.involuntary_switches / n,
        minor_faults_per_request=used.minor_faults / n,
        upstream_user_us_per_request=upstream_used.user_s / n * 1e6 if upstream_used else None,
        upstream_system_us_per_request=upstream_used.system_s / n * 1e6 if upstream_used else None,
        upstream_voluntary_per_request=upstream_used.voluntary_switches / n if upstream_used else None,
    )


@dataclass
class LoadTarget:
    """A server under load: where wrk sends requests and which processes to account."""

    name: str
    url: str
    tree: ProcessTree
    child: Child
    port: int  # where wrk connects
    upstream_port: int | None  # where it connects (None for direct: it is the upstream)
    upstream: ProcessTree | None = None  # the upstream's processes, None for direct
    admin: int | None = None
    sent: int = 0  # requests wrk completed against it, warm-up included


def load_round(
    args: argparse.Namespace, target: LoadTarget, script: Path, first: bool, machine_cpu: MachineCpu
) -> list[LoadFigures]:
    """A warm-up in the first round, then c=1 and c=high."""
    out: list[LoadFigures] = []
    if first and args.warmup > 0:
        say(f"[{target.name}] warm-up {args.warmup:g}s")
        target.sent += wrk.run(target.url, args.connections, args.threads, args.warmup, script).requests
    for conns, threads in ((1, 1), (args.connections, args.threads)):
        say(f"[{target.name}] wrk -c{conns} -t{threads} -d{args.duration:g}s")
        figures = measure(
            target.name,
            target.url,
            target.tree,
            conns,
            threads,
            args.duration,
            script,
            target.child,
            machine_cpu,
            target.upstream,
        )
        target.sent += figures.requests
        if figures.non_2xx or figures.socket_errors:
            say(f"[{target.name}] c={conns}: {figures.non_2xx} non-2xx, {figures.socket_errors} socket errors")
        out.append(figures)
    return out


# --- SSE and soak -----------------------------------------------------------------------------------


def run_sse(args: argparse.Namespace, sse_port: int, infermon_ports: dict[str, int]) -> SseFigures:
    """Streams direct, then through each infermon build in `infermon_ports` (build -> port)."""
    target = f"/stream?events={args.sse_events}&delay_ms={args.sse_delay_ms:g}&first_ms=0"
    figures = SseFigures(events=args.sse_events, delay_ms=args.sse_delay_ms)
    say(f"[sse] {args.sse_streams} streams direct")
    direct = figures.direct = sse_client.run(sse_port, target, args.sse_streams)
    for build, port in infermon_ports.items():
        say(f"[sse] {args.sse_streams} streams through {build}")
        summary = sse_client.run(port, target, args.sse_streams)
        added = (summary.first_event_ms - direct.first_event_ms) * 1e3
        streamed = summary.first_event_ms < summary.last_event_ms / 2 and summary.gap_ms >= args.sse_delay_ms / 2
        if build == "infermon":
            figures.infermon, figures.added_first_event_us, figures.streamed = summary, added, streamed
        else:
            figures.before, figures.added_first_event_us_before, figures.streamed_before = summary, added, streamed
    return figures


def run_soak(args: argparse.Namespace, url: str, tree: ProcessTree, script: Path, child: Child) -> SoakFigures:
    """Send about `args.soak` requests at high concurrency in wrk slices, sampling RSS throughout."""
    total = non_2xx = socket_errors = 0
    start = time.monotonic()
    deadline = start + args.soak_max_seconds
    slice_s = 2.0  # a short first slice measures the rate; later slices aim at N without overshooting
    with RssSampler(tree, interval=args.soak_interval) as sampler:
        while total < args.soak and time.monotonic() < deadline:
            result = wrk.run(url, args.connections, args.threads, slice_s, script)
            child.check_alive()
            total += result.requests
            non_2xx += result.non_2xx
            socket_errors += result.socket_errors
            say(f"[soak] {total}/{args.soak} requests, RSS {tree.rss_bytes() / MB:.1f} MB")
            if result.rps <= 0:
                break
            remaining = (args.soak - total) / result.rps
            slice_s = max(1.0, min(10.0, remaining, deadline - time.monotonic()))
    seconds = time.monotonic() - start
    samples = [(round(t, 2), rss / MB) for t, rss in sampler.samples]
    values = [rss for _, rss in samples]
    return SoakFigures(
        requested=args.soak,
        requests=total,
        seconds=seconds,
        rps=total / seconds if seconds else 0.0,
        non_2xx=non_2xx,
        socket_errors=socket_errors,
        rss_first_mb=values[0],
        rss_last_mb=values[-1],
        rss_max_mb=max(values),
        rss_min_mb=min(values),
        rss_mid_mb=values[len(values) // 2],
        samples=samples,
    )


# --- syscalls and scrapes --------------------------------------------------------------------------


def trace_syscalls(args: argparse.Namespace, target: LoadTarget, script: Path, directory: Path) -> SyscallFigures:
    """strace -c over a wrk run, then a short strace -yy sample with the socket options read meanwhile."""
    pids = target.tree.pids()
    conns, threads = args.connections, args.threads
    attach = " -p ".join(map(str, pids))
    say(f"[strace] {target.name}: strace -c -f -p {attach}, wrk -c{conns} {args.trace_seconds:g}s")
    counter = syscalls.counting(pids, directory / f"strace-c-{target.name}.txt")
    try:
        result = wrk.run(target.url, conns, threads, args.trace_seconds, script)
    finally:
        table = counter.stop()
    target.sent += result.requests
    rows = syscalls.parse_count(table)
    if not rows:
        raise syscalls.StraceFailed(f"strace -c printed no table for {target.name}: {table[-800:]!r}")
    n = result.requests or 1
    figures = SyscallFigures(
        target=target.name,
        seconds=result.duration_s,
        requests=result.requests,
        rps=result.rps,
        counts={row.name: (row.calls / n, row.errors / n) for row in rows},
    )
    say(f"[strace] {target.name}: strace -yy sample of {args.strace_sample} calls, socket options")
    sampler = syscalls.sampling(pids, directory / f"strace-yy-{target.name}.txt")
    try:
        load = wrk.start(target.url, conns, threads, 2.0, script)
        options = wait_for_client_sockets(pids, target, conns, deadline=time.monotonic() + 1.5)
        sampled = wrk.finish(load, 2.0)
    finally:
        trace = sampler.stop()
    target.sent += sampled.requests
    figures.sample_requests = sampled.requests
    calls = syscalls.parse_sample(trace, args.strace_sample)
    figures.sample = syscalls.summarize_sample(calls, target.port, target.upstream_port)
    figures.sockets = syscalls.summarize_options(options)
    return figures


def perf_counts(args: argparse.Namespace, target: LoadTarget, script: Path, directory: Path) -> PerfFigures:
    """perf stat of syscall and scheduler tracepoints over a wrk run at full speed."""
    pids = target.tree.pids()
    attach = ",".join(map(str, pids))
    say(f"[perf] {target.name}: perf stat -p {attach}, wrk -c{args.connections} {args.trace_seconds:g}s")
    counter = syscalls.PerfStat(pids, directory / f"perf-{target.name}.txt", syscalls.perf_events())
    try:
        result = wrk.run(target.url, args.connections, args.threads, args.trace_seconds, script)
    finally:
        text = counter.stop()
    target.sent += result.requests
    counts = syscalls.parse_perf(text)
    if not counts:
        raise syscalls.StraceFailed(f"perf stat counted nothing for {target.name}: {counter.failure()}")
    n = result.requests or 1
    figures = PerfFigures(
        target=target.name,
        seconds=result.duration_s,
        requests=result.requests,
        rps=result.rps,
        counts={
            label: (counts[event] / n, 0.0) for event, label in syscalls.PERF_EVENTS.items() if event in counts
        },
    )
    say(f"[perf] {target.name}: perf record -e cpu-clock -g -p {attach}, wrk -c{args.connections}")
    data = directory / f"perf-{target.name}.data"
    recorder = syscalls.PerfRecord(pids, data)
    try:
        result = wrk.run(target.url, args.connections, args.threads, args.trace_seconds, script)
    finally:
        recorder.stop()
    target.sent += result.requests
    found = syscalls.profile(data)
    if not found.cpu_s or not result.requests:
        raise syscalls.StraceFailed(f"perf record sampled nothing for {target.name}: {recorder.failure()}")
    us = found.cpu_s / result.requests * 1e6
    figures.profile_rps = result.rps
    figures.profile = {"on CPU (sampled)": (us, 0.0), "in the kernel": (us * found.kernel_share, 0.0)}
    for function, label in syscalls.PROFILED.items():
        figures.profile[f"{function} ({label})"] = (us * found.under.get(function, 0.0), 0.0)
    data.unlink(missing_ok=True)
    return figures


def wait_for_client_sockets(
    pids: list[int], target: LoadTarget, conns: int, deadline: float
) -> list[syscalls.SocketOptions]:
    """The server's TCP socket options once wrk's `conns` connections are open (or at `deadline`).

    Read from 0.5 s into the load on: a server may set an option only once a connection has served a
    request (nginx sets TCP_NODELAY when a connection first goes idle in keep-alive).
    """
    time.sleep(0.5)
    while True:
        found = syscalls.socket_options(pids, target.port, target.upstream_port)
        if sum(1 for s in found if s.side == "client") >= conns or time.monotonic() >= deadline:
            return found
        time.sleep(0.05)


def scrape_runs(args: argparse.Namespace, target: LoadTarget, script: Path) -> ScrapeFigures:
    """Grow the label sets, scrape idle, then c=high without and with /metrics scraped every interval."""
    assert target.admin is not None
    if args.scrape_paths:
        say(f"[scrape] {target.name}: one request on each of {args.scrape_paths} inference paths")
        ok = scrape.grow_series(target.port, args.scrape_paths)
        target.sent += args.scrape_paths
        if ok != args.scrape_paths:
            say(f"[scrape] {target.name}: only {ok} of {args.scrape_paths} answered 2xx")
    idle = scrape.idle_scrapes(target.admin)
    conns, threads = args.connections, args.threads

    def latency(result: wrk.WrkResult) -> LatencyFigures:
        target.sent += result.requests
        return LatencyFigures(
            result.rps, result.p50_us, result.p99_us, result.max_us, result.requests, result.errors
        )

    seconds, last_start = scrape.run_seconds(args.duration, args.scrape_interval, idle.max_ms / 1e3)
    say(f"[scrape] {target.name}: wrk -c{conns} {seconds:g}s without scraping")
    without = latency(wrk.run(target.url, conns, threads, seconds, script))
    say(f"[scrape] {target.name}: wrk -c{conns} {seconds:g}s, /metrics every {args.scrape_interval:g}s")
    with scrape.Scraper(target.admin, args.scrape_interval, last_start) as scraper:
        with_scrapes = latency(wrk.run(target.url, conns, threads, seconds, script))
    target.child.check_alive()
    return ScrapeFigures(
        target=target.name,
        interval_s=args.scrape_interval,
        paths=args.scrape_paths,
        seconds=seconds,
        idle=idle,
        without=without,
        with_scrapes=with_scrapes,
        scrapes=scrape.summarize(scraper.scrapes),
    )


# --- the run ----------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    def version(argv: list[str]) -> str:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return "unknown"
        text = (proc.stdout + proc.stderr).strip()
        return text.splitlines()[0] if text else "unknown"

    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "nginx": version([upstreams.NGINX, "-v"]),
        "wrk": version([wrk.WRK, "--version"]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "infermon_commit": checkout_commit(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def checkout_commit() -> str:
    """This checkout's commit, with "-dirty" when files differ from it (what "infermon" is)."""
    here = Path(__file__).resolve().parent
    try:
        proc = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return proc.stdout.strip() or "unknown"


class Run:
    """One benchmark run: the temp directory, the children, the wrk script and the figures so far."""

    def __init__(self, args: argparse.Namespace, children: Children, directory: Path, out: dict[str, Any]) -> None:
        self.args = args
        self.children = children
        self.directory = directory
        self.out = out
        self.script = wrk.write_script(directory)
        self.machine_cpu = MachineCpu(children.pids)
        self.problems: list[str] = out["problems"]
        self.layout = cpu_layout(not args.no_pin)
        if self.layout is not None:
            os.sched_setaffinity(0, self.layout[0])  # this harness, and wrk started from it
            out["machine"]["pinning"] = {"wrk": sorted(self.layout[0]), "servers": sorted(self.layout[1])}
        else:
            out["machine"]["pinning"] = None
        self.infermon_errors: dict[str, str] = {}
        builds = [b for b in INFERMONS if b in args.targets]
        if (args.soak_only or args.soak > 0) and "infermon" not in builds:
            builds.insert(0, "infermon")
        for build in builds:
            error = check_infermon(args, build)
            if error:
                self.infermon_errors[build] = error
                self.problems.append(f"{build} not measured: {error}")
                say(f"[{build}] NOT MEASURED: {error}")

    def tree(self, child: Child) -> ProcessTree:
        """The server's process tree, bound to the server CPUs when pinning."""
        tree = ProcessTree(child.pid)
        if self.layout is not None:
            tree.pin(self.layout[1])
        return tree

    def infermon(
        self,
        upstream_url: str,
        probe_path: str,
        phase: str,
        build: str = "infermon",
        env: dict[str, str] | None = None,
    ) -> tuple[Child, int, int] | None:
        if build in self.infermon_errors:
            return None
        try:
            started = start_infermon(
                self.args, self.children, self.directory, upstream_url, probe_path, build, env
            )
        except InfermonUnavailable as exc:
            self.problems.append(f"{build} ({phase}): {exc}")
            say(f"[{phase}] {build} NOT MEASURED: {exc}")
            return None
        say(f"[{phase}] {build} on {LOOPBACK}:{started[1]}, admin on {started[2]}")
        return started

    def load_targets(self, upstream: upstreams.Server) -> list[LoadTarget]:
        """Start the proxies asked for (all at once; an idle one costs nothing) in front of `upstream`."""
        targets: list[LoadTarget] = []
        upstream_tree = self.tree(upstream.child)
        if "direct" in self.args.targets:
            targets.append(LoadTarget("direct", upstream.url + "/", upstream_tree, upstream.child, upstream.port, None))
        if "nginx" in self.args.targets:
            port = free_port()
            say(f"[nginx] reverse proxy on {LOOPBACK}:{port}")
            config = upstreams.proxy_config(self.directory, port, upstream.port)
            proxy = upstreams.start_nginx(self.children, "proxy", self.directory, config, port)
            tree = self.tree(proxy.child)
            targets.append(LoadTarget("nginx", proxy.url + "/", tree, proxy.child, port, upstream.port, upstream_tree))
        for build in INFERMONS:
            if build not in self.args.targets:
                continue
            started = self.infermon(upstream.url, "/", build, build, infermon_env(self.args, build))
            if started is not None:
                child, port, admin = started
                url = f"http://{LOOPBACK}:{port}/"
                tree = self.tree(child)
                targets.append(LoadTarget(build, url, tree, child, port, upstream.port, upstream_tree, admin))
        return targets

    def load_runs(self, upstream: upstreams.Server) -> None:
        args = self.args
        targets = self.load_targets(upstream)
        counted_before = {t.name: requests_counted(t.admin) for t in targets if t.admin is not None}
        runs: list[LoadFigures] = self.out["runs"]
        for number in range(args.rounds):
            if args.rounds > 1:
                say(f"[load] round {number + 1} of {args.rounds}")
            for target in targets:
                runs += load_round(args, target, self.script, number == 0, self.machine_cpu)
        if args.strace:
            traced: list[SyscallFigures] = self.out["syscalls"]
            for target in targets:
                try:
                    traced.append(trace_syscalls(args, target, self.script, self.directory))
                except syscalls.StraceFailed as exc:
                    self.problems.append(f"strace of {target.name}: {exc}")
                    say(f"[strace] {target.name} NOT MEASURED: {exc}")
        if args.perf:
            counted: list[PerfFigures] = self.out["perf"]
            for target in targets:
                try:
                    counted.append(perf_counts(args, target, self.script, self.directory))
                except syscalls.StraceFailed as exc:
                    self.problems.append(f"perf of {target.name}: {exc}")
                    say(f"[perf] {target.name} NOT MEASURED: {exc}")
        if args.scrape_interval > 0:
            scraped: list[ScrapeFigures] = self.out["scrape"]
            for target in targets:
                if target.admin is not None:
                    scraped.append(scrape_runs(args, target, self.script))
        checks: dict[str, Any] = self.out["metrics_checks"]
        for target in targets:
            if target.admin is not None:
                checks[target.name] = {
                    "wrk_completed": target.sent,
                    "before": counted_before[target.name],
                    "after": requests_counted(target.admin),
                }
            if target.name != "direct":
                self.children.stop(target.child)
        if "infermon" in checks:
            self.out["metrics_check"] = checks["infermon"]

    def sse_runs(self) -> None:
        sse_port = free_port()
        sse = upstreams.start_sse_upstream(self.children, self.directory, sse_port)
        self.tree(sse.child)
        started: dict[str, tuple[Child, int, int]] = {}
        for build in INFERMONS:
            if build in self.args.targets:
                one = self.infermon(sse.url, "/stream?events=1&delay_ms=0", "sse", build)
                if one is not None:
                    started[build] = one
        self.out["sse"] = run_sse(self.args, sse_port, {build: one[1] for build, one in started.items()})
        for child, _, _ in started.values():
            self.children.stop(child)
        self.children.stop(sse.child)

    def soak_run(self, upstream: upstreams.Server) -> None:
        started = self.infermon(upstream.url, "/", "soak")
        if started is None:
            return
        child, port, _ = started
        say(f"[soak] {self.args.soak} requests through infermon at c={self.args.connections}")
        url = f"http://{LOOPBACK}:{port}/"
        self.out["soak"] = run_soak(self.args, url, self.tree(child), self.script, child)
        self.children.stop(child)


def execute(args: argparse.Namespace, children: Children, directory: Path, out: dict[str, Any]) -> int:
    run = Run(args, children, directory, out)
    port = free_port()
    say(f"[setup] nginx upstream on {LOOPBACK}:{port}")
    config = upstreams.upstream_config(directory, port)
    upstream = upstreams.start_nginx(children, "upstream", directory, config, port)
    run.tree(upstream.child)  # binds it to the server CPUs before any load
    if not args.soak_only:
        run.load_runs(upstream)
        if not args.no_sse:
            run.sse_runs()
    if args.soak > 0:
        run.soak_run(upstream)
    return 1 if run.problems else 0


def print_report(out: dict[str, Any], args: argparse.Namespace) -> None:
    info = out["machine"]
    print(f"infermon benchmark  {info['time']}  {info['cpus']} CPUs  {info['platform']}")
    print(f"{info['nginx']}  |  {info['wrk']}  |  Python {info['python']}")
    print(
        f"load average at start {info['loadavg_at_start']}, at end {info.get('loadavg_at_end')} "
        "(other work on the machine shows up as noise)"
    )
    print(
        f"wrk {args.duration:g}s per run after {args.warmup:g}s warm-up; c=1 -t1 and c={args.connections} "
        f"-t{args.threads}; proxies: nginx 1 worker, infermon 1 process"
    )
    print(f"infermon: this checkout at {info.get('infermon_commit')}", end="")
    if args.baseline is not None:
        print(f"; infermon-before: {args.baseline_name or args.baseline}", end="")
    print()
    pinning = info.get("pinning")
    if pinning:
        print(f"pinned: wrk and harness on CPU {pinning['wrk']}, upstream and proxy on CPU {pinning['servers']}")
    else:
        print("not pinned: the scheduler places wrk and the servers")
    if out["load"]:
        print()
        print(report.load_table(out["load"]))
        print()
        print(report.cpu_split_table(out["load"]))
    if out.get("ratio_matrix"):
        print("\nratios, same run (a/b: a's figure over b's):")
        print(report.matrix_table(out["ratio_matrix"]))
    if out.get("checks") is not None:
        print("\ntargets:")
        print(
            report.checks_table([report.Check(c["name"], c["value"], c["limit"], c["passed"]) for c in out["checks"]])
        )
    for build, check in out.get("metrics_checks", {}).items():
        if check.get("after") is None:
            continue
        before = sum((check.get("before") or {}).values())
        counted = sum(check["after"].values()) - before
        print(
            f"\n{build}: infermon_requests_total grew by {counted:.0f} during the runs; wrk and the harness "
            f"completed {check['wrk_completed']} (by code after: {check['after']})"
        )
    if out.get("perf"):
        print()
        print(report.syscall_table(out["perf"], "perf stat tracepoints per request, full speed", keep_order=True))
        print()
        profiles = [
            PerfFigures(f.target, f.seconds, f.requests, f.profile_rps, f.profile) for f in out["perf"] if f.profile
        ]
        if profiles:
            print(report.syscall_table(profiles, "perf record -e cpu-clock -g: us per request", keep_order=True))
    if out.get("syscalls"):
        print()
        print(report.syscall_table(out["syscalls"]))
        for item in out["syscalls"]:
            print()
            print(report.sample_table(item))
    if out.get("scrape"):
        print(f"\nlatency while /metrics is scraped every {args.scrape_interval:g} s (c={args.connections}):")
        print(report.scrape_table(out["scrape"]))
    if out.get("sse") is not None:
        print()
        print(report.sse_table(out["sse"]))
    if out.get("soak") is not None:
        print()
        print(report.soak_table(out["soak"]))
    for problem in out["problems"]:
        print(f"\nPROBLEM: {problem}")


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in (upstreams.NGINX, wrk.WRK):
        if not Path(tool).exists():
            say(f"{tool} is missing: install the Debian packages nginx-light and wrk")
            return 2
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    directory = Path(tempfile.mkdtemp(prefix="infermon-bench-"))
    directory.chmod(0o755)  # nginx workers drop to `nobody` when started as root
    out: dict[str, Any] = {
        "machine": machine(),
        "config": {},
        "runs": [],
        "load": [],
        "syscalls": [],
        "perf": [],
        "scrape": [],
        "metrics_checks": {},
        "problems": [],
    }
    out["config"] = {k: v if not isinstance(v, Path) else str(v) for k, v in vars(args).items()}
    status = 1
    try:
        with Children() as children:
            status = execute(args, children, directory, out)
    except KeyboardInterrupt:
        say("interrupted; children stopped")
        status = 130
    except (
        ChildFailed,
        wrk.WrkFailed,
        sse_client.StreamError,
        syscalls.StraceFailed,
        OSError,
        TimeoutError,
        http.client.HTTPException,
    ) as exc:
        out["problems"].append(f"{type(exc).__name__}: {exc}")
        status = 1
    finally:
        if args.keep_logs:
            say(f"configs and logs kept in {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    out["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    # Figures measured before a failure are still reported.
    out["load"] = report.combine(out["runs"])
    if out["load"]:
        found = report.checks(out["load"], args.connections)
        out["checks"] = [asdict(c) | {"verdict": c.verdict} for c in found]
        out["ratios"] = report.ratios(out["load"], args.connections)
        out["ratio_matrix"] = report.ratio_matrix(out["load"], args.connections)
    print_report(out, args)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=_jsonable) + "\n")
        say(f"figures written to {args.json}")
    return status


def _jsonable(value: object) -> object:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main())
