"""``infermon retrain-hook``: Alertmanager's webhook receiver that runs a retraining command.

Runs until SIGTERM or SIGINT, then ends the running commands (SIGTERM, SIGKILL after 10 s) and
exits 0. A command that is not there or an empty one is a usage error (exit 2); an address that
cannot be bound is one ``cannot listen on`` line and exit 1. See docs/alerts.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.alerts.hook import TOKEN_ENV, HookConfig, RetrainHook
from proxy.errors import ConfigError, ListenError
from proxy.loop import run as run_loop
from proxy.loop import until_stop_signal
from proxy.settings import split_host_port

log = logging.getLogger("infermon.retrain_hook")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "retrain-hook",
        help="Alertmanager webhook receiver: run a command once per firing group (retraining)",
        description=(
            "Receive Alertmanager's webhook and run COMMAND once per firing alert group, with the alerts' "
            "labels in INFERMON_ALERT_* variables and the payload on its standard input (docs/alerts.md)."
        ),
    )
    parser.add_argument("--listen", metavar="HOST:PORT", default="0.0.0.0:9466", help="default 0.0.0.0:9466")
    parser.add_argument(
        "--command", required=True, metavar="COMMAND",
        help="the command line, split like a shell's words but never run by a shell, e.g. 'python retrain.py'",
    )  # fmt: skip
    parser.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS",
                        help="a run still going after this is stopped (default 3600)")  # fmt: skip
    parser.add_argument("--concurrency", type=int, default=1, metavar="N", help="commands at once (default 1)")
    parser.add_argument("--max-pending", type=int, default=100, metavar="N",
                        help="runs that may wait for a slot; beyond, new groups get 503 (default 100)")  # fmt: skip
    parser.add_argument("--forget-after", type=float, default=172_800.0, metavar="SECONDS",
                        help="forget a group not heard of for this long (default 172800, two days)")  # fmt: skip
    parser.add_argument("--token-file", metavar="FILE",
                        help=f"require Authorization: Bearer <the file's content> (or set ${TOKEN_ENV})")  # fmt: skip
    parser.set_defaults(func=main)


def config_from(args: argparse.Namespace) -> tuple[HookConfig, str]:
    """Checked arguments -> the hook's configuration and its listen address; ConfigError names the flag."""
    try:
        argv = shlex.split(args.command)
    except ValueError as exc:
        raise ConfigError(f"--command {args.command!r}: {exc} (quote it as a shell would)") from None
    if not argv:
        raise ConfigError("--command is empty: give the retraining command, e.g. --command 'python retrain.py'")
    program = argv[0]
    if ("/" in program and not os.access(program, os.X_OK)) or ("/" not in program and not shutil.which(program)):
        raise ConfigError(f"--command: {program!r} is not an executable file or on PATH")
    for flag, value, least in (("--timeout", args.timeout, 0.0), ("--forget-after", args.forget_after, 0.0)):
        if not value > least:
            raise ConfigError(f"{flag} {value:g} must be above 0")
    for flag, count in (("--concurrency", args.concurrency), ("--max-pending", args.max_pending)):
        if count < 1:
            raise ConfigError(f"{flag} {count} must be at least 1")
    try:
        split_host_port(args.listen)
    except ValueError as exc:
        raise ConfigError(f"--listen {args.listen!r}: {exc}") from None
    token = os.environ.get(TOKEN_ENV) or None
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"--token-file {args.token_file!r}: {exc.strerror or exc}") from None
        if not token:
            raise ConfigError(f"--token-file {args.token_file!r} is empty")
    cfg = HookConfig(
        command=argv,
        timeout=args.timeout,
        concurrency=args.concurrency,
        max_pending=args.max_pending,
        forget_after=args.forget_after,
        token=token,
    )
    return cfg, args.listen


def main(args: argparse.Namespace) -> int:
    cfg, listen = config_from(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_loop(serve(cfg, listen))


async def serve(cfg: HookConfig, listen: str) -> int:
    hook = RetrainHook(cfg)
    host, port = split_host_port(listen)
    runner = web.AppRunner(hook.app(), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            raise ListenError(listen, exc, "change --listen") from None
        for address in runner.addresses:
            log.info("infermon retrain-hook listening on http://%s:%s", *address[:2])
        if cfg.token is None:
            log.warning("no bearer token (--token-file or $%s): anyone who reaches the port can start runs", TOKEN_ENV)
        await until_stop_signal()
        log.info("stopping")
    finally:
        await runner.cleanup()
        await hook.aclose()
    return 0
