"""The flags of ``infermon demo``; the demo itself (:mod:`proxy.demo.command`) loads when it runs.

Kept apart so that building the CLI's parser imports neither numpy nor the demo's model.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from proxy import loop
from proxy.demo import SHIFT_SD, SHIFTED
from proxy.settings import split_host_port


def _host_port(value: str) -> str:
    try:
        split_host_port(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} must be a positive number")
    return number


def _at_least_zero(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not number >= 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} must be 0 or more")
    return number


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "demo",
        help="run a real small model (stable and canary) behind the proxy, with traffic",
        description="Trains a small model, serves a stable and a worse canary version over the Open "
        "Inference Protocol v2, puts infermon in front of both (split, drift, feedback, probes, canary "
        "analysis) and sends traffic that drifts after a while; prints a live summary. Stop with Ctrl-C. "
        "Port 0 picks a free port.",
    )
    p.add_argument(
        "--listen", type=_host_port, default="127.0.0.1:0", metavar="HOST:PORT",
        help="proxy address (default: %(default)s, a free port)",
    )  # fmt: skip
    p.add_argument(
        "--admin", type=_host_port, default="127.0.0.1:0", metavar="HOST:PORT",
        help="admin address: status page, /metrics, JSON endpoints (default: %(default)s, a free port)",
    )  # fmt: skip
    p.add_argument("--rate", type=float, default=50.0, help="requests per second (default: %(default)g)")
    p.add_argument(
        "--duration", type=_positive, default=None, metavar="SECONDS",
        help="stop after this many seconds (default: until Ctrl-C)",
    )  # fmt: skip
    p.add_argument(
        "--shift-after", type=_at_least_zero, default=None, metavar="SECONDS",
        help=f"shift {' and '.join(SHIFTED)} by +{SHIFT_SD:g} sd after this many seconds "
        "(default: a third of --duration, else 20)",
    )  # fmt: skip
    p.add_argument(
        "--every", type=_positive, default=5.0, metavar="SECONDS",
        help="seconds between live summaries (default: %(default)g)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=7, help="seed of the data, the models and the traffic (default: 7)")
    p.add_argument(
        "--summary-json", default=None, metavar="FILE",
        help="also write the final summary to FILE as JSON (default: none)",
    )  # fmt: skip
    p.add_argument(
        "--no-browser", action="store_true",
        help="do not open the status page in a browser (default: opened when the terminal is interactive)",
    )  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("infermon.probes").setLevel(logging.ERROR)  # the canary's failing probes: in the summary
    if not args.rate > 0 or args.rate == float("inf"):
        print("--rate must be a positive number of requests per second", file=sys.stderr)
        return 2
    shift_after = args.shift_after
    if shift_after is None:
        shift_after = args.duration / 3 if args.duration is not None else 20.0
    from proxy.demo.command import Options, demo  # numpy and the model load here

    opts = Options(
        listen=args.listen, admin=args.admin, rate=args.rate, duration=args.duration, shift_after=shift_after,
        every=args.every, seed=args.seed, summary_json=args.summary_json,
        browser=not args.no_browser and sys.stdout.isatty(),
    )  # fmt: skip
    return loop.run(demo(opts))
