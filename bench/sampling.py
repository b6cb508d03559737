"""What payload sampling costs: infermon with sampling off, at rate 0.1 and at rate 1.0, in one run.

Usage: ``.venv/bin/python -m bench.sampling [--duration 10] [--rounds 3] [--rows 4]`` (``make
bench-sampling``). One nginx upstream answers every request with a small JSON body; three infermon
proxies sit in front of it, the same build, differing only in ``sampling.rate``. wrk posts a KServe v1
request (``--rows`` instances of four features) at c=32 to each in turn, rounds interleaved, and the
medians are reported with the ratio to sampling off. The side path's own CPU per sample comes from
``infermon_sidepath_cpu_seconds_total`` / ``infermon_sidepath_jobs_total``. As in ``bench.run``,
wrk runs on the first half of the CPUs and the servers on the rest.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import upstreams, wrk
from bench.procs import LOOPBACK, Children, free_port, wait_for_port
from bench.run import http_get, infermon_argv, measure
from bench.sampler import ProcessTree, cpu_layout

RATES = (0.0, 0.1, 1.0)
TARGET_LOSS = 0.10  # throughput lost at rate 0.1, against sampling off


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.sampling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per proxy (2)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported (3)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=4, help="instances per request (4)")
    parser.add_argument("--infermon", default=None, help="infermon executable (beside this Python)")
    parser.add_argument("--no-pin", action="store_true")
    return parser.parse_args(argv)


def post_script(directory: Path, rows: int) -> Path:
    """wrk's request, built once: a KServe v1 predict call with `rows` instances."""
    instances = ",".join(f"[{5.1 + i * 0.1:.1f},3.5,1.4,0.2]" for i in range(rows))
    body = '{"instances":[' + instances + "]}"
    path = directory / "post.lua"
    path.write_text(
        f'wrk.method = "POST"\nwrk.body = \'{body}\'\nwrk.headers["Content-Type"] = "application/json"\n'
        + wrk.DONE_SCRIPT
    )
    return path


def metrics(admin: int) -> dict[str, float]:
    _, body = http_get(admin, "/metrics")
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line.startswith("#") or not line:
            continue
        name, _, value = line.rpartition(" ")
        key = name.split("{", 1)[0]
        out[key] = out.get(key, 0.0) + float(value)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    layout = cpu_layout(not args.no_pin)
    with Children() as children, tempfile.TemporaryDirectory(prefix="infermon-bench-sampling-") as tmp:
        directory = Path(tmp)
        script = post_script(directory, args.rows)
        up_port = free_port()
        upstream = upstreams.start_nginx(
            children, "upstream", directory, upstreams.upstream_config(directory, up_port), up_port
        )
        proxies: list[tuple[float, int, int, ProcessTree]] = []
        for rate in RATES:
            port, admin = free_port(), free_port()
            argv_ = [*infermon_argv(args), "proxy", "--listen", f"{LOOPBACK}:{port}", "--upstream", upstream.url]
            argv_ += ["--admin", f"{LOOPBACK}:{admin}", "--sample-rate", str(rate)]
            env = {**os.environ, "INFERMON_DRIFT__MIN_SAMPLES": "10"}
            child = children.start(f"infermon-rate-{rate:g}", argv_, directory, env)
            wait_for_port(LOOPBACK, port, timeout=30.0, child=child)
            wait_for_port(LOOPBACK, admin, timeout=30.0, child=child)
            proxies.append((rate, port, admin, ProcessTree(child.pid)))
        if layout is not None:
            load_cpus, server_cpus = layout
            os.sched_setaffinity(0, load_cpus)
            ProcessTree(upstream.child.pid).pin(server_cpus)
            for *_, tree in proxies:
                tree.pin(server_cpus)
        path = "/v1/models/iris:predict"
        for rate, port, _, _ in proxies:
            print(f"[rate {rate:g}] warm-up {args.warmup:g}s", file=sys.stderr, flush=True)
            wrk.run(f"http://{LOOPBACK}:{port}{path}", args.connections, args.threads, args.warmup, script)
        before = {rate: metrics(admin) for rate, _, admin, _ in proxies}
        rps: dict[float, list[float]] = {rate: [] for rate in RATES}
        cpu: dict[float, list[float]] = {rate: [] for rate in RATES}
        for r in range(args.rounds):
            for rate, port, _, tree in proxies:
                print(f"[round {r + 1}] rate {rate:g}: wrk -c{args.connections}", file=sys.stderr, flush=True)
                fig = measure(
                    f"rate-{rate:g}", f"http://{LOOPBACK}:{port}{path}", tree, args.connections, args.threads,
                    args.duration, script,
                )  # fmt: skip
                if fig.non_2xx or fig.socket_errors:
                    print(f"  {fig.non_2xx} non-2xx, {fig.socket_errors} socket errors", file=sys.stderr)
                rps[rate].append(fig.rps)
                cpu[rate].append(fig.cpu_us_per_request)
        time.sleep(1.0)  # the side path drains what the last run queued
        print(f"\nPOST {path}, {args.rows} rows per request, c={args.connections}, {args.rounds} rounds")
        print("| sampling.rate | rps (median) | vs off | CPU us/request | samples | dropped | side path us/sample |")
        print("|---|---|---|---|---|---|---|")
        base = statistics.median(rps[0.0])
        loss_at_tenth = 0.0
        for rate, _, admin, _ in proxies:
            m, b = metrics(admin), before[rate]
            samples = m.get("infermon_samples_total", 0.0) - b.get("infermon_samples_total", 0.0)
            dropped = m.get("infermon_samples_dropped_total", 0.0) - b.get("infermon_samples_dropped_total", 0.0)
            jobs = m.get("infermon_sidepath_jobs_total", 0.0) - b.get("infermon_sidepath_jobs_total", 0.0)
            side = m.get("infermon_sidepath_cpu_seconds_total", 0.0) - b.get("infermon_sidepath_cpu_seconds_total", 0.0)
            per_sample = f"{side / jobs * 1e6:.1f}" if jobs else "-"
            median = statistics.median(rps[rate])
            ratio = median / base if base else 0.0
            if rate == 0.1:
                loss_at_tenth = 1.0 - ratio
            print(
                f"| {rate:g} | {median:,.0f} | {ratio:.3f} | {statistics.median(cpu[rate]):.1f} | "
                f"{samples:,.0f} | {dropped:,.0f} | {per_sample} |"
            )
        verdict = "ok" if loss_at_tenth <= TARGET_LOSS else "MISS"
        print(f"\nthroughput lost at rate 0.1: {loss_at_tenth:.1%} (target <= {TARGET_LOSS:.0%}): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
