"""What the demo's tests share: the trained models and a model server on a real socket."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from proxy.demo.model import Models, train_models
from tests.helpers import bound_socket


@pytest.fixture(scope="module")
def models() -> Models:
    return train_models(seed=7)


async def serve(app: web.Application) -> AsyncIterator[str]:
    """``async for url in serve(app)``: the app on a free port of 127.0.0.1 while the loop body runs."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    sock = bound_socket()
    await web.SockSite(runner, sock).start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    await runner.cleanup()
