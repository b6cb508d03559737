"""What splitting costs: infermon with one upstream against a 50/50 split of two, in one run.

Usage: ``.venv/bin/python -m bench.split [--duration 10] [--rounds 3]`` (``make bench-split``). Two
nginx upstreams answer every request with a small JSON body; four infermon proxies of the same
build sit in front: one upstream (no split), a 50/50 weighted split between the two (the canary
analysis on, as it is by default with a split), the same split with the analysis off, and the
split sticky on a request header. wrk sends the same GET at c=32 to each in turn, rounds
interleaved, pinned as ``bench.run`` pins (wrk on the first half of the CPUs, the servers on the
rest); medians are reported with the ratio to the proxy without a split.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from bench import upstreams, wrk
from bench.procs import Children, free_port
from bench.side_by_side import add_load_args, measure_rounds, pin, start_proxies, warm_up

SETUPS = ("one upstream", "split 50/50", "split 50/50, no analysis", "split 50/50, sticky")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.split", description=__doc__.split("\n\n")[0])
    add_load_args(parser)
    return parser.parse_args(argv)


def header_script(directory: Path) -> Path:
    """wrk's request with a user id header (the sticky key), built once."""
    path = directory / "user.lua"
    path.write_text('wrk.headers["X-User-Id"] = "user-42"\n' + wrk.DONE_SCRIPT)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with Children() as children, tempfile.TemporaryDirectory(prefix="infermon-bench-split-") as tmp:
        directory = Path(tmp)
        script = header_script(directory)
        no_analysis = directory / "no-analysis.yaml"
        no_analysis.write_text("canary:\n  enabled: false\n")
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
                "--config",
                str(no_analysis),
                "--upstream",
                f"canary={ups[1].url}",
                "--split",
                "stable=50,canary=50",
            ],
            SETUPS[3]: [
                "--upstream",
                f"canary={ups[1].url}",
                "--split",
                "stable=50,canary=50",
                "--sticky",
                "header:x-user-id",
            ],
        }
        proxies = start_proxies(args, children, directory, ups[0].url, extra)
        pin(args, [up.child.pid for up in ups], proxies)
        warm_up(args, proxies, "/", script)
        rps, cpu = measure_rounds(args, proxies, "/", script)
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
