"""Fixtures for the tracing and access-log tests: real OTLP receivers (tests/otlp.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.otlp import Receiver, grpc_receiver, http_receiver


@pytest.fixture
async def otlp_http() -> AsyncIterator[Receiver]:
    async for receiver in http_receiver():
        yield receiver


@pytest.fixture
async def otlp_grpc() -> AsyncIterator[Receiver]:
    async for receiver in grpc_receiver():
        yield receiver
