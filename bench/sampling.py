"""What payload sampling costs: infermon with sampling off, at rate 0.1 and at rate 1.0, in one run.

Usage: ``.venv/bin/python -m bench.sampling [--duration 10] [--rounds 3] [--rows 4]`` (``make
bench-sampling``). One nginx upstream answers every request with a small JSON body; three infermon
proxies sit in front of it, the same build, differing only in ``sampling.rate``. wrk posts a KServe v1
request (``--rows`` instances of four features) at c=32 to each in turn, rounds interleaved, and the
medians are reported with the ratio to sampling off. The side path's own CPU per sample comes from
``infermon_sidepath_cpu_seconds_total`` / ``infermon_sidepath_jobs_total``. As in ``bench.run``,
wrk runs on the first half of the CPUs and the servers on the rest. ``--feedback`` adds a fourth
proxy, sampling off and ``--feedback`` on (every response kept for labels, docs/quality.md), and
``--only-feedback`` measures just that one beside sampling off.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import upstreams, wrk
from bench.procs import Children, free_port
from bench.run import http_get
from bench.side_by_side import add_load_args, measure_rounds, pin, start_proxies, warm_up

RATES = (0.0, 0.1, 1.0)
TARGET_LOSS = 0.10  # throughput lost at rate 0.1, against sampling off


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.sampling", description=__doc__.split("\n\n")[0])
    add_load_args(parser)
    parser.add_argument("--rows", type=int, default=4, help="instances per request (4)")
    parser.add_argument("--feedback", action="store_true", help="also: sampling off, --feedback on")
    parser.add_argument("--only-feedback", action="store_true", help="only sampling off and --feedback on")
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
    with Children() as children, tempfile.TemporaryDirectory(prefix="infermon-bench-sampling-") as tmp:
        directory = Path(tmp)
        script = post_script(directory, args.rows)
        up_port = free_port()
        upstream = upstreams.start_nginx(
            children, "upstream", directory, upstreams.upstream_config(directory, up_port), up_port
        )
        rates: list[tuple[float, bool]] = [(rate, False) for rate in RATES]
        if args.only_feedback:
            rates = [(0.0, False), (0.0, True)]
        elif args.feedback:
            rates.append((0.0, True))
        setups: dict[str, list[str]] = {}
        for rate, fb in rates:
            name = f"rate {rate:g}" + (" + feedback" if fb else "")
            setups[name] = ["--sample-rate", str(rate), *(["--feedback"] if fb else [])]
        proxies = start_proxies(args, children, directory, upstream.url, setups, {"INFERMON_DRIFT__MIN_SAMPLES": "10"})
        pin(args, [upstream.child.pid], proxies)
        path = "/v1/models/iris:predict"
        warm_up(args, proxies, path, script)
        before = {p.name: metrics(p.admin) for p in proxies}
        rps, cpu = measure_rounds(args, proxies, path, script)
        time.sleep(1.0)  # the side path drains what the last run queued
        print(f"\nPOST {path}, {args.rows} rows per request, c={args.connections}, {args.rounds} rounds")
        print(
            "| sampling.rate | rps (median) | vs off | CPU us/request | samples | dropped | side path us/sample "
            "| predictions kept | predictions dropped |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        base = statistics.median(rps[proxies[0].name])
        loss_at_tenth = 0.0
        for (rate, fb), proxy in zip(rates, proxies, strict=True):
            m, b = metrics(proxy.admin), before[proxy.name]
            samples = m.get("infermon_samples_total", 0.0) - b.get("infermon_samples_total", 0.0)
            dropped = m.get("infermon_samples_dropped_total", 0.0) - b.get("infermon_samples_dropped_total", 0.0)
            jobs = m.get("infermon_sidepath_jobs_total", 0.0) - b.get("infermon_sidepath_jobs_total", 0.0)
            side = m.get("infermon_sidepath_cpu_seconds_total", 0.0) - b.get("infermon_sidepath_cpu_seconds_total", 0.0)
            per_sample = f"{side / jobs * 1e6:.1f}" if jobs else "-"
            median = statistics.median(rps[proxy.name])
            ratio = median / base if base else 0.0
            if rate == 0.1 and not fb:
                loss_at_tenth = 1.0 - ratio
            kept = m.get("infermon_feedback_predictions_total", 0.0) - b.get("infermon_feedback_predictions_total", 0.0)
            lost = m.get("infermon_feedback_predictions_dropped_total", 0.0) - b.get(
                "infermon_feedback_predictions_dropped_total", 0.0
            )
            print(
                f"| {rate:g}{' + feedback' if fb else ''} | {median:,.0f} | {ratio:.3f} | "
                f"{statistics.median(cpu[proxy.name]):.1f} | {samples:,.0f} | {dropped:,.0f} | {per_sample} | "
                f"{kept:,.0f} | {lost:,.0f} |"
            )
        if not args.only_feedback:
            verdict = "ok" if loss_at_tenth <= TARGET_LOSS else "MISS"
            print(f"\nthroughput lost at rate 0.1: {loss_at_tenth:.1%} (target <= {TARGET_LOSS:.0%}): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
