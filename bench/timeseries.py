"""What one /timeseries reading costs: the worker thread's time per reading at N request label sets.

Usage: ``.venv/bin/python -m bench.timeseries [--sets 10 100 1000 5000] [--repeat 20]``. Each size
fills a fresh RequestMetrics with N label sets (N request series, N latency histogram label sets,
four variants) and times :func:`proxy.admin.timeseries.read_totals` as the status page's reading
runs it (with its short pauses for the event loop); the median is printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

from proxy.admin.timeseries import read_totals
from proxy.dataplane.exchange import Exchange
from proxy.observe.metrics import RequestMetrics
from proxy.settings import ProxyConfig


def filled(sets: int) -> RequestMetrics:
    metrics = RequestMetrics(ProxyConfig.model_validate({"labels": {"max_values": sets + 10}}))
    for i in range(sets):
        ex = Exchange(1.0, "127.0.0.1")
        ex.variant, ex.model, ex.method = f"v{i % 4}", f"m{i // 8}", "POST"
        ex.status = 500 if i % 8 == 7 else 200 + i % 7  # distinct codes: one histogram label set each
        ex.t_done = 1.0 + (i % 50) / 100
        metrics.on_complete(ex)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.timeseries", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", type=int, nargs="+", default=[10, 100, 1000, 5000])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args(argv)
    for sets in args.sets:
        metrics = filled(sets)
        series, hists = len(metrics.series_labels), len(metrics.hist_labels)
        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            read_totals(metrics, series, hists)
            times.append(time.perf_counter() - started)
        median_ms = statistics.median(times) * 1e3
        print(f"{series:6d} series, {hists:6d} histogram label sets: {median_ms:7.2f} ms per reading")


if __name__ == "__main__":
    main()
