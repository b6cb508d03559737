"""The ``infermon`` command: one entry point, one subcommand per process.

Each subcommand lives in its own module exposing ``register(subparsers)``; the module sets
``func`` on its parser to a callable ``(argparse.Namespace) -> int`` returning the exit status.
Exit statuses: 0 done, 1 an address cannot be bound (:class:`~proxy.errors.ListenError`, one line),
2 bad configuration or usage (:class:`~proxy.errors.ConfigError`), 130 interrupted before it started.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from proxy import __version__
from proxy.errors import ConfigError, ListenError

COMMAND_MODULES = (
    "proxy.dataplane.command",
    "proxy.demo.cli",
    "proxy.agent.command",
    "proxy.drift.baseline",
    "proxy.probes.command",
    "proxy.deploy.command",
    "proxy.alerts.command",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infermon",
        description="Monitoring sidecar for ML inference APIs.",
    )
    parser.add_argument("--version", action="version", version=f"infermon {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.func(args)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except ListenError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
