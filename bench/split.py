"""What splitting costs: infermon with one upstream against a 50/50 split of two, in one run.

Usage: ``.venv/bin/python -m bench.split [--duration 10] [--rounds 3]`` (``make bench-split``). Two
nginx upstreams answer every request with a small JSON body; three infermon proxies of the same
build sit in front: one upstream (no split), a 50/50 weighted split between the two, and the same
split sticky on a request header. wrk sends the same GET at c=32 to each in turn, rounds
interleaved, pinned as ``bench.run`` pins (wrk on the first half of the CPUs, the servers on the
rest); medians are reported with the ratio to the proxy without a split.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from bench import upstreams, wrk
from bench.procs import LOOPBACK, Children, free_port, wait_for_port
from bench.run import infermon_argv, measure
from bench.sampler import ProcessTree, cpu_layout

SETUPS = ("one upstream", "split 50/50", "split 50/50, sticky")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.split", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per proxy (2)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported (3)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--infermon", default=None, help="infermon executable (beside this Python)")
    parser.add_argument("--no-pin", action="store_true")
    return parser.parse_args(argv)


def header_script(directory: Path) -> Path:
    """wrk's request with a user id header (the sticky key), built once."""
    path = directory / "user.lua"
    path.write_text('wrk.headers["X-User-Id"] = "user-42"\n' + wrk.DONE_SCRIPT)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    layout = cpu_layout(not args.no_pin)
    with Children() as children, tempfile.TemporaryDirectory(prefix="infermon-bench-split-") as tmp:
        directory = Path(tmp)
        script = header_script(directory)
        ups = []
        for name in ("upstream", "upstream2"):
            port = free_port()
            sub = directory / name
            sub.mkdir()
            ups.append(upstreams.start_nginx(children, name, sub, upstreams.upstream_config(sub, port), port))
        extra = {
            SETUPS[0]: [],
            SETUPS[1]: ["--upstream", f"canary={ups[1].url}", "--split", "stable=50,canary=50"],
            SETUPS[2]: [
                "--upstream",
                f"canary={ups[1].url}",
                "--split",
                "stable=50,canary=50",
                "--sticky",
                "header:x-user-id",
            ],
        }
        proxies: list[tuple[str, int, ProcessTree]] = []
        for setup in SETUPS:
            port, admin = free_port(), free_port()
            argv_ = [*infermon_argv(args), "proxy", "--listen", f"{LOOPBACK}:{port}", "--upstream", ups[0].url]
            argv_ += ["--admin", f"{LOOPBACK}:{admin}", *extra[setup]]
            child = children.start(f"infermon-{len(proxies)}", argv_, directory, dict(os.environ))
            wait_for_port(LOOPBACK, port, timeout=30.0, child=child)
            proxies.append((setup, port, ProcessTree(child.pid)))
        if layout is not None:
            load_cpus, server_cpus = layout
            os.sched_setaffinity(0, load_cpus)
            for up in ups:
                ProcessTree(up.child.pid).pin(server_cpus)
            for *_, tree in proxies:
                tree.pin(server_cpus)
        for setup, port, _ in proxies:
            print(f"[{setup}] warm-up {args.warmup:g}s", file=sys.stderr, flush=True)
            wrk.run(f"http://{LOOPBACK}:{port}/", args.connections, args.threads, args.warmup, script)
        rps: dict[str, list[float]] = {s: [] for s in SETUPS}
        cpu: dict[str, list[float]] = {s: [] for s in SETUPS}
        for r in range(args.rounds):
            for setup, port, tree in proxies:
                print(f"[round {r + 1}] {setup}: wrk -c{args.connections}", file=sys.stderr, flush=True)
                fig = measure(
                    setup, f"http://{LOOPBACK}:{port}/", tree, args.connections, args.threads, args.duration, script
                )
                if fig.non_2xx or fig.socket_errors:
                    print(f"  {fig.non_2xx} non-2xx, {fig.socket_errors} socket errors", file=sys.stderr)
                rps[setup].append(fig.rps)
                cpu[setup].append(fig.cpu_us_per_request)
        print(f"\nGET /, c={args.connections}, {args.rounds} rounds of {args.duration:g}s")
        print("| setup | rps (median) | vs one upstream | CPU us/request |")
        print("|---|---|---|---|")
        base = statistics.median(rps[SETUPS[0]])
        for setup in SETUPS:
            median = statistics.median(rps[setup])
            print(f"| {setup} | {median:,.0f} | {median / base:.3f} | {statistics.median(cpu[setup]):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
