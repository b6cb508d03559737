"""Benchmark infermon against direct access and an nginx reverse proxy, in one run, on this machine.

Usage: ``.venv/bin/python -m bench.run [--duration 10] [--warmup 2] [--soak 1000000] [--json PATH]``
(``make bench`` runs it with the defaults). See docs/benchmarks.md for what each figure means.

The run starts its own upstreams (nginx returning a small JSON body, and an SSE server), an nginx
reverse proxy and infermon, all on 127.0.0.1 ports picked at start, measures each with wrk at c=1 and
c=32, then times SSE streams direct and through infermon, and optionally soaks infermon with a fixed
number of requests while sampling its RSS. Every child runs in its own process group and is ended
when the run ends, on Ctrl-C and on SIGTERM too.
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

from bench import report, sse_client, upstreams, wrk
from bench.procs import LOOPBACK, Child, ChildFailed, Children, free_port, tail, wait_for_port
from bench.report import MB, LoadFigures, SoakFigures, SseFigures
from bench.sampler import MachineCpu, ProcessTree, RssSampler, cpu_layout

TARGETS = ("direct", "nginx", "infermon")


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
        default=",".join(TARGETS),
        help="comma-separated subset of direct,nginx,infermon for the load table (all)",
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
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write figures as JSON")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with configs and logs")
    args = parser.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    args.targets = [t for t in TARGETS if t in targets]
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


def infermon_argv(args: argparse.Namespace) -> list[str]:
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


def check_infermon(args: argparse.Namespace) -> str | None:
    """None when ``infermon proxy --help`` works, else a one-paragraph reason."""
    base = infermon_argv(args)
    command = " ".join([*base, "proxy", "--help"])
    try:
        helped = subprocess.run([*base, "proxy", "--help"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`{command}` failed: {exc}"
    if helped.returncode != 0:
        last = (helped.stderr or helped.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return f"`{command}` exited {helped.returncode} (is the proxy subcommand there yet?): {last[0]}"
    return None


def start_infermon(
    args: argparse.Namespace, children: Children, directory: Path, upstream_url: str, probe_path: str
) -> tuple[Child, int, int]:
    """Start ``infermon proxy`` with default monitoring in front of `upstream_url`; (child, port, admin)."""
    base = infermon_argv(args)
    port, admin = free_port(), free_port()
    argv = [*base, "proxy", "--listen", f"{LOOPBACK}:{port}", "--upstream", upstream_url]
    argv += ["--admin", f"{LOOPBACK}:{admin}"]
    child = children.start(f"infermon-{port}", argv, directory)
    try:
        wait_for_port(LOOPBACK, port, timeout=30.0, child=child)
        status, body = http_get(port, probe_path)
    except (ChildFailed, OSError, http.client.HTTPException) as exc:
        children.stop(child)
        raise InfermonUnavailable(
            f"infermon did not serve {probe_path} on {LOOPBACK}:{port}: {exc}\n{tail(child.log, 800)}"
        ) from exc
    if status != 200:
        children.stop(child)
        raise InfermonUnavailable(f"infermon answered {status} to a probe: {body[:300]!r}\n{tail(child.log, 800)}")
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
) -> LoadFigures:
    cpu_before = tree.cpu_seconds()
    machine_before = machine_cpu.reading() if machine_cpu else (0.0, 0.0, 0.0)
    started = time.monotonic()
    with RssSampler(tree, interval=0.2) as sampler:
        result = wrk.run(url, conns, threads, seconds, script)
    cpu = tree.cpu_seconds() - cpu_before
    other_pct = steal_pct = 0.0
    if machine_cpu is not None:
        busy, ours, steal = (b - a for a, b in zip(machine_before, machine_cpu.reading(), strict=True))
        capacity = (time.monotonic() - started) * (os.cpu_count() or 1) / 100
        other_pct, steal_pct = max(0.0, busy - ours) / capacity, steal / capacity
    time.sleep(0.3)
    rss_after = tree.rss_bytes()
    if check is not None:
        check.check_alive()
    per_request = cpu / result.requests * 1e6 if result.requests else 0.0
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
    )


@dataclass
class LoadTarget:
    """A server under load: where wrk sends requests and which processes to account."""

    name: str
    url: str
    tree: ProcessTree
    child: Child
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
        )
        target.sent += figures.requests
        if figures.non_2xx or figures.socket_errors:
            say(f"[{target.name}] c={conns}: {figures.non_2xx} non-2xx, {figures.socket_errors} socket errors")
        out.append(figures)
    return out


# --- SSE and soak -----------------------------------------------------------------------------------


def run_sse(args: argparse.Namespace, sse_port: int, infermon_port: int | None) -> SseFigures:
    target = f"/stream?events={args.sse_events}&delay_ms={args.sse_delay_ms:g}&first_ms=0"
    figures = SseFigures(events=args.sse_events, delay_ms=args.sse_delay_ms)
    say(f"[sse] {args.sse_streams} streams direct")
    figures.direct = sse_client.run(sse_port, target, args.sse_streams)
    if infermon_port is not None:
        say(f"[sse] {args.sse_streams} streams through infermon")
        figures.infermon = sse_client.run(infermon_port, target, args.sse_streams)
        figures.added_first_event_us = (figures.infermon.first_event_ms - figures.direct.first_event_ms) * 1e3
        figures.streamed = (
            figures.infermon.first_event_ms < figures.infermon.last_event_ms / 2
            and figures.infermon.gap_ms >= args.sse_delay_ms / 2
        )
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
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


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
        self.infermon_error: str | None = None
        if "infermon" in args.targets or args.soak_only or args.soak > 0:
            self.infermon_error = check_infermon(args)
            if self.infermon_error:
                self.problems.append(f"infermon not measured: {self.infermon_error}")
                say(f"[infermon] NOT MEASURED: {self.infermon_error}")

    def tree(self, child: Child) -> ProcessTree:
        """The server's process tree, bound to the server CPUs when pinning."""
        tree = ProcessTree(child.pid)
        if self.layout is not None:
            tree.pin(self.layout[1])
        return tree

    def infermon(self, upstream_url: str, probe_path: str, phase: str) -> tuple[Child, int, int] | None:
        if self.infermon_error:
            return None
        try:
            started = start_infermon(self.args, self.children, self.directory, upstream_url, probe_path)
        except InfermonUnavailable as exc:
            self.problems.append(f"infermon ({phase}): {exc}")
            say(f"[{phase}] infermon NOT MEASURED: {exc}")
            return None
        say(f"[{phase}] infermon on {LOOPBACK}:{started[1]}, admin on {started[2]}")
        return started

    def load_targets(self, upstream: upstreams.Server) -> list[LoadTarget]:
        """Start the proxies asked for (all at once; an idle one costs nothing) in front of `upstream`."""
        targets: list[LoadTarget] = []
        if "direct" in self.args.targets:
            tree = self.tree(upstream.child)
            targets.append(LoadTarget("direct", upstream.url + "/", tree, upstream.child))
        if "nginx" in self.args.targets:
            port = free_port()
            say(f"[nginx] reverse proxy on {LOOPBACK}:{port}")
            config = upstreams.proxy_config(self.directory, port, upstream.port)
            proxy = upstreams.start_nginx(self.children, "proxy", self.directory, config, port)
            targets.append(LoadTarget("nginx", proxy.url + "/", self.tree(proxy.child), proxy.child))
        if "infermon" in self.args.targets:
            started = self.infermon(upstream.url, "/", "infermon")
            if started is not None:
                child, port, admin = started
                url = f"http://{LOOPBACK}:{port}/"
                targets.append(LoadTarget("infermon", url, self.tree(child), child, admin))
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
        for target in targets:
            if target.admin is not None:
                self.out["metrics_check"] = {
                    "wrk_completed": target.sent,
                    "before": counted_before[target.name],
                    "after": requests_counted(target.admin),
                }
            if target.name != "direct":
                self.children.stop(target.child)

    def sse_runs(self) -> None:
        sse_port = free_port()
        sse = upstreams.start_sse_upstream(self.children, self.directory, sse_port)
        self.tree(sse.child)
        started = None
        if "infermon" in self.args.targets:
            started = self.infermon(sse.url, "/stream?events=1&delay_ms=0", "sse")
        self.out["sse"] = run_sse(self.args, sse_port, started[1] if started else None)
        if started is not None:
            self.children.stop(started[0])
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
    pinning = info.get("pinning")
    if pinning:
        print(f"pinned: wrk and harness on CPU {pinning['wrk']}, upstream and proxy on CPU {pinning['servers']}")
    else:
        print("not pinned: the scheduler places wrk and the servers")
    if out["load"]:
        print()
        print(report.load_table(out["load"]))
    if out.get("ratios"):
        print("\ninfermon / nginx:")
        print(report.ratios_table(out["ratios"]))
    if out.get("checks") is not None:
        print("\ntargets:")
        print(
            report.checks_table([report.Check(c["name"], c["value"], c["limit"], c["passed"]) for c in out["checks"]])
        )
    check = out.get("metrics_check")
    if check and check.get("after") is not None:
        before = sum((check.get("before") or {}).values())
        counted = sum(check["after"].values()) - before
        print(
            f"\ninfermon_requests_total grew by {counted:.0f} during the runs; wrk completed "
            f"{check['wrk_completed']} (by code after: {check['after']})"
        )
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
    out: dict[str, Any] = {"machine": machine(), "config": {}, "runs": [], "load": [], "problems": []}
    out["config"] = {k: v if not isinstance(v, Path) else str(v) for k, v in vars(args).items()}
    status = 1
    try:
        with Children() as children:
            status = execute(args, children, directory, out)
    except KeyboardInterrupt:
        say("interrupted; children stopped")
        status = 130
    except (ChildFailed, wrk.WrkFailed, sse_client.StreamError, OSError, TimeoutError) as exc:
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
