"""Event loop selection: uvloop where it is installed, the standard asyncio loop otherwise; and the
wait for a stop signal that the long-running commands (agent, retrain-hook) serve until."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on uvloop when available."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    result: T = uvloop.run(main)
    return result


async def until_stop_signal() -> None:
    """Return on the first SIGTERM or SIGINT, handled on the loop (a clean stop, no KeyboardInterrupt).

    The handlers are there only while this waits; the caller stops its servers afterwards.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
