"""What tracing costs the proxy: tracing off, propagation only (0 %), 10 % sampling, 10 % + keep_errors.

Usage: ``.venv/bin/python -m bench.tracing [--duration 4] [--rounds 6] [--connections 32]``

One run starts an nginx upstream (a small JSON body), a local OTLP/HTTP sink (bench/otlp_sink.py) and
one ``infermon proxy`` per variant. First it measures in-process the CPU that the tracing hooks and the
export thread add per request (the stable figure). Then, in each of ``--rounds`` rounds, it runs wrk
-c32 against tracing off and each variant back to back (order alternating), and prints per variant
the median over rounds of the throughput loss against the "off" run next to it and of the CPU
microseconds per request added, against the targets: at most 10 % fewer requests per second at 10 %
sampling, at most 5 % with propagation only. Pairing matters on small shared VMs, whose throughput
drifts by tens of percent over minutes. wrk sends no trace headers, so every request starts a trace
at the proxy and the ratio sampler decides.

On a machine with two or more CPUs, wrk, this harness and the sink share the first half of the CPUs,
nginx and infermon the rest (bench/sampler.py ``cpu_layout``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import upstreams, wrk
from bench.procs import LOOPBACK, Child, Children, free_port, wait_for_port
from bench.run import http_get, measure
from bench.sampler import MachineCpu, ProcessTree, cpu_layout

#: variant -> INFERMON_* settings (every variant exports to the sink when it samples)
VARIANTS: dict[str, dict[str, str]] = {
    "off": {},
    "0%": {"INFERMON_TRACING__ENABLED": "true", "INFERMON_TRACING__SAMPLER_ARG": "0"},
    "10%": {"INFERMON_TRACING__ENABLED": "true", "INFERMON_TRACING__SAMPLER_ARG": "0.1"},
    "10%+keep_errors": {
        "INFERMON_TRACING__ENABLED": "true",
        "INFERMON_TRACING__SAMPLER_ARG": "0.1",
        "INFERMON_TRACING__KEEP_ERRORS": "true",
    },
    "10%,sdk-exporter": {
        "INFERMON_TRACING__ENABLED": "true",
        "INFERMON_TRACING__SAMPLER_ARG": "0.1",
        "INFERMON_TRACING__EXPORTER": "sdk",
    },
    "100%": {"INFERMON_TRACING__ENABLED": "true", "INFERMON_TRACING__SAMPLER_ARG": "1"},
    "100%,gzip": {
        "INFERMON_TRACING__ENABLED": "true",
        "INFERMON_TRACING__SAMPLER_ARG": "1",
        "INFERMON_TRACING__COMPRESSION": "gzip",
    },
}
TARGETS = {"0%": 0.05, "10%": 0.10}  # largest allowed throughput loss against "off"


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def observer_cpu(names: list[str], sink_url: str, n: int = 50_000) -> dict[str, float]:
    """CPU microseconds per request that the tracing hooks and the export thread add, in-process.

    The same loop of Exchanges (headers as the data plane builds them for wrk's requests) runs with
    and without the observer; process CPU time counts the export thread too, and the queue is
    flushed to the sink (``aclose``) before the clock stops.
    """
    import asyncio

    from proxy.dataplane.exchange import Exchange
    from proxy.observe.tracing import TracingObserver
    from proxy.settings import Labels, Tracing

    headers = [
        (b"Host", b"127.0.0.1:8080"),
        (b"X-Forwarded-For", b"127.0.0.1"),
        (b"X-Forwarded-Proto", b"http"),
        (b"X-Forwarded-Host", b"127.0.0.1:8080"),
        (b"x-request-id", b"6f1c3bd4-4a5e-4c1e-9d9b-6f2a3e1d0c77"),
    ]

    async def loop(cfg: Tracing | None) -> tuple[float, int]:
        obs = None
        if cfg is not None:
            obs = TracingObserver(cfg, Labels())
            await obs.start()
        clock = time.perf_counter
        start = time.process_time()
        for _ in range(n):
            ex = Exchange(clock(), "127.0.0.1")
            ex.method, ex.path, ex.request_id, ex.request_headers = "GET", "/", "rid", list(headers)
            if obs is not None:
                obs.on_request_head(ex)
            ex.status, ex.bytes_out = 200, 27
            ex.t_upstream_connected = ex.t_upstream_head = ex.t_first_byte = ex.t_done = clock()
            if obs is not None:
                obs.on_complete(ex)
        lost = 0
        if obs is not None:
            await obs.aclose()
            lost = obs.dropped_queue_full + obs.failed + obs.rejected + obs.dropped_shutdown
        return (time.process_time() - start) / n * 1e6, lost

    out: dict[str, float] = {}
    base = min(asyncio.run(loop(None))[0] for _ in range(3))
    for name in names:
        if name == "off":
            continue
        env = VARIANTS[name]
        cfg = Tracing(
            enabled=True,
            endpoint=sink_url,
            sampler_arg=float(env["INFERMON_TRACING__SAMPLER_ARG"]),
            keep_errors=env.get("INFERMON_TRACING__KEEP_ERRORS") == "true",
            exporter="sdk" if env.get("INFERMON_TRACING__EXPORTER") == "sdk" else "infermon",
            compression="gzip" if env.get("INFERMON_TRACING__COMPRESSION") == "gzip" else "none",
            max_queue_size=1_000_000,  # the loop outruns any real rate: keep every span, count its cost
            timeout=60.0,  # the flush at the end sends every span
        )
        runs = [asyncio.run(loop(cfg)) for _ in range(3)]
        out[name] = min(cpu for cpu, _ in runs) - base
        lost = sum(lost for _, lost in runs)
        if lost:
            say(f"[{name}] in-process: {lost} spans lost")
        say(f"[{name}] in-process hooks + export: {out[name]:.2f} CPU us/request")
    return out


def span_counts(admin_port: int) -> dict[str, float]:
    """The proxy's own span counters: recorded, exported, dropped by reason (a lost span shows here)."""
    _, body = http_get(admin_port, "/metrics")
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line.startswith("infermon_trace_spans_") and "_created" not in line:
            name, _, value = line.rpartition(" ")
            out[name.removeprefix("infermon_trace_spans_").replace("_total", "")] = float(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tracing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per wrk run (4)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per variant (2)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of (off, variant) pairs; medians (6)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    listed = ";".join(VARIANTS).replace("%", "%%")  # argparse formats help with %
    parser.add_argument("--variants", default=";".join(VARIANTS), help=f"';'-separated subset of {listed}")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH")
    parser.add_argument("--no-micro", action="store_true", help="skip the in-process CPU measurement")
    parser.add_argument("--micro-only", action="store_true", help="only the in-process CPU measurement (no wrk)")
    args = parser.parse_args(argv)
    names = [v.strip() for v in args.variants.split(";") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or "off" not in names:
        parser.error(f"variants must include 'off' and come from {', '.join(VARIANTS)}")

    layout = cpu_layout(True)
    if layout is not None:
        os.sched_setaffinity(0, layout[0])
    with tempfile.TemporaryDirectory(prefix="infermon-bench-tracing-") as tmp, Children() as children:
        directory = Path(tmp)
        script = wrk.write_script(directory)
        up_port = free_port()
        upstream = upstreams.start_nginx(
            children, "upstream", directory, upstreams.upstream_config(directory, up_port), up_port
        )
        sink_port = free_port()
        sink_argv = [sys.executable, "-m", "bench.otlp_sink", "--port", str(sink_port)]
        sink = children.start("otlp-sink", sink_argv, directory)
        wait_for_port(LOOPBACK, sink_port, timeout=15.0, child=sink)
        if args.micro_only:
            for name, cpu in observer_cpu(names, f"http://{LOOPBACK}:{sink_port}").items():
                print(f"{name:<18} hooks + export thread: {cpu:.2f} CPU us/request (in-process, {os.cpu_count()} CPUs)")
            return 0
        if layout is not None:
            ProcessTree(upstream.child.pid).pin(layout[1])
        machine_cpu = MachineCpu(children.pids)
        proxies: dict[str, tuple[Child, int, ProcessTree]] = {}
        admins: dict[str, int] = {}
        for name in names:
            port, admin = free_port(), free_port()
            env = {
                **os.environ,
                **VARIANTS[name],
                "INFERMON_TRACING__ENDPOINT": f"http://{LOOPBACK}:{sink_port}",
                "INFERMON_LOG_LEVEL": "warning",
            }
            argv_ = [sys.executable, "-m", "proxy", "proxy", "--listen", f"{LOOPBACK}:{port}",
                     "--upstream", upstream.url, "--admin", f"{LOOPBACK}:{admin}"]  # fmt: skip
            label = "".join(c if c.isalnum() else "-" for c in name)
            child = children.start(f"infermon-{label}", argv_, directory, env=env)
            wait_for_port(LOOPBACK, port, timeout=30.0, child=child)
            tree = ProcessTree(child.pid)
            if layout is not None:
                tree.pin(layout[1])
            proxies[name] = (child, port, tree)
            admins[name] = admin
        micro = {} if args.no_micro else observer_cpu(names, f"http://{LOOPBACK}:{sink_port}")
        results: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in names if name != "off"}
        for name, (_, port, _) in proxies.items():
            say(f"[{name}] warm-up {args.warmup:g}s")
            wrk.run(f"http://{LOOPBACK}:{port}/", args.connections, args.threads, args.warmup, script)
        for r in range(args.rounds):
            for name in results:
                pair = ["off", name] if r % 2 == 0 else [name, "off"]  # each variant next to its baseline
                figs = {}
                for which in pair:
                    child, port, tree = proxies[which]
                    say(f"[{which}] round {r + 1}: wrk -c{args.connections} -d{args.duration:g}s")
                    fig = measure(which, f"http://{LOOPBACK}:{port}/", tree, args.connections, args.threads,
                                  args.duration, script, child, machine_cpu)  # fmt: skip
                    if fig.non_2xx or fig.socket_errors:
                        say(f"[{which}] {fig.non_2xx} non-2xx, {fig.socket_errors} socket errors")
                    figs[which] = fig
                off, var = figs["off"], figs[name]
                results[name].append((var.rps, var.cpu_us_per_request, off.rps, off.cpu_us_per_request))
        time.sleep(6.0)  # one schedule delay: let the last batches reach the sink
        _, body = http_get(sink_port, "/count")
        exported = json.loads(body)
        spans = {name: span_counts(admin) for name, admin in admins.items() if name not in ("off", "0%")}

    rows = []
    offs = [(o_rps, o_cpu) for runs in results.values() for _, _, o_rps, o_cpu in runs]
    print(f"infermon tracing cost, wrk -c{args.connections} -t{args.threads} {args.duration:g}s, {args.rounds} "
          f"rounds of (off, variant) pairs, {os.cpu_count()} CPUs, pinned={layout is not None}")  # fmt: skip
    print(f"tracing off: median {statistics.median(r for r, _ in offs):.0f} rps, "
          f"{statistics.median(c for _, c in offs):.1f} CPU us/request over {len(offs)} runs")
    print(f"{'variant':<18}{'rps':>9}{'cpu us/req':>11}{'rps vs off':>12}{'+cpu us':>9}{'hooks us':>10}{'target':>9}")
    for name, runs in results.items():
        loss = statistics.median(1 - v_rps / o_rps for v_rps, _, o_rps, _ in runs)
        added = statistics.median(v_cpu - o_cpu for _, v_cpu, _, o_cpu in runs)
        target = TARGETS.get(name)
        verdict = "" if target is None else ("ok" if loss <= target else "OVER")
        hooks = micro.get(name)
        rows.append({"variant": name, "rps": statistics.median(r[0] for r in runs),
                     "cpu_us_per_request": statistics.median(r[1] for r in runs), "throughput_loss": loss,
                     "cpu_added_us": added, "hooks_cpu_us": hooks, "target_loss": target, "verdict": verdict,
                     "runs": runs})  # fmt: skip
        shown = "" if target is None else f"<= {target:.0%}"
        hook_text = "" if hooks is None else f"{hooks:.2f}"
        print(f"{name:<18}{rows[-1]['rps']:>9.0f}{rows[-1]['cpu_us_per_request']:>11.1f}{-loss:>+12.1%}"
              f"{added:>+9.1f}{hook_text:>10}{shown:>9} {verdict}")  # fmt: skip
    print("rps vs off and +cpu us: medians of the per-pair differences; hooks us: CPU of the tracing hooks and")
    print("the export thread per request, measured in-process (no network, no wrk): the stable figure")
    print(f"spans received by the sink: {exported['spans']} in {exported['requests']} export requests")
    for name, counts in spans.items():
        print(f"[{name}] spans " + ", ".join(f"{key} {value:.0f}" for key, value in counts.items()))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "sink": exported, "spans": spans}, indent=2))
    return 0 if all(row["verdict"] != "OVER" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
