"""The demo's traffic: requests from the training distribution, the shift, labels, chats."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest
from aiohttp import web

from proxy.demo import SHIFT_SD, SHIFTED
from proxy.demo.model import FEATURES, Models, sample, train_models
from proxy.demo.model_server import build_model_app, features_of
from proxy.demo.traffic import Traffic, TrafficStats, generate, infer_body, shift
from tests.conftest import ProxyFactory
from tests.helpers import TIMEOUT, bound_socket, metric, scrape_metrics, wait_until


def test_shift_moves_exactly_the_shifted_features_by_their_sd() -> None:
    x, _ = sample(np.random.default_rng(0), 100)
    std = np.array([1.0, 2.0, 3.0, 4.0])
    moved = shift(x, std)
    for i, name in enumerate(FEATURES):
        want = SHIFT_SD * std[i] if name in SHIFTED else 0.0
        assert np.allclose(moved[:, i] - x[:, i], want), name
    assert set(SHIFTED) < set(FEATURES) and len(SHIFTED) == 2


def test_infer_body_is_one_named_fp32_tensor_per_feature() -> None:
    body = infer_body(np.array([5.1, 3.5, 1.4, 0.2]))
    assert body == {
        "inputs": [
            {"name": name, "shape": [1], "datatype": "FP32", "data": [value]}
            for name, value in zip(FEATURES, [5.1, 3.5, 1.4, 0.2], strict=True)
        ]
    }
    assert features_of(body["inputs"]).tolist() == [[5.1, 3.5, 1.4, 0.2]]


def test_stats_figures() -> None:
    stats = TrafficStats()
    assert stats.error_rate() is None and stats.percentile_ms(50) is None
    stats.by_status = {200: 8, 500: 1}
    stats.failures = 1
    stats.latencies.extend([0.001, 0.002, 0.003])
    assert stats.error_rate() == pytest.approx(0.2)
    assert stats.percentile_ms(50) == pytest.approx(2.0)


@pytest.fixture(scope="module")
def models() -> Models:
    return train_models(seed=7)


@pytest.fixture
async def model_server(models: Models) -> AsyncIterator[str]:
    runner = web.AppRunner(build_model_app(models.stable, error_rate=0.0, delay=0.0005, seed=1),
                           access_log=None, handle_signals=False)  # fmt: skip
    await runner.setup()
    sock = bound_socket()
    await web.SockSite(runner, sock).start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    await runner.cleanup()


async def test_it_sends_shifts_and_posts_labels_that_join(make_proxy: ProxyFactory, model_server: str) -> None:
    app = await make_proxy(model_server, feedback={"enabled": True}, quality={"interval": 0.2, "min_labels": 5})
    (host, port), (ahost, aport) = app.proxy_address, app.admin_address
    stats = TrafficStats()
    traffic = Traffic(
        f"http://{host}:{port}", 300, stats, admin_url=f"http://{ahost}:{aport}", duration=0.6, shift_after=0.3,
        label_delay=(0.05, 0.1), chat_share=0.2,
    )  # fmt: skip
    await asyncio.wait_for(traffic.run(), TIMEOUT)
    assert stats.sent > 20 and stats.failures == 0
    assert stats.answered == stats.sent and set(stats.by_status) == {200}
    assert stats.chats > 0 and stats.infer > 0 and stats.chats + stats.infer == stats.sent
    assert 0 < stats.shifted < stats.infer and stats.shift_started is not None and stats.shift_started >= 0.3
    assert stats.labels_posted > 0 and stats.label_errors == 0
    assert stats.label_outcomes.get("joined") == stats.labels_posted  # every label found its prediction
    assert traffic.labels == []  # those not yet due were posted at the end

    async def scored() -> bool:
        return metric(await scrape_metrics(app.admin_address), "infermon_model_score", metric="accuracy") > 0

    await wait_until(scored, step=0.05)
    m = await scrape_metrics(app.admin_address)
    assert metric(m, "infermon_requests_total") == stats.sent


async def test_stop_lets_requests_in_flight_finish(make_proxy: ProxyFactory, models: Models) -> None:
    runner = web.AppRunner(build_model_app(models.stable, error_rate=0.0, delay=0.02, seed=2),
                           access_log=None, handle_signals=False)  # fmt: skip
    await runner.setup()
    sock = bound_socket()
    await web.SockSite(runner, sock).start()
    try:
        app = await make_proxy(f"http://127.0.0.1:{sock.getsockname()[1]}")
        host, port = app.proxy_address
        stats, stop = TrafficStats(), asyncio.Event()
        sending = asyncio.create_task(generate(f"http://{host}:{port}", 200, None, stats, stop=stop))

        async def in_flight() -> bool:
            return metric(await scrape_metrics(app.admin_address), "infermon_requests_in_flight") >= 2

        await wait_until(in_flight, step=0.01)
        stop.set()
        await asyncio.wait_for(sending, TIMEOUT)
        assert stats.sent >= 2 and stats.failures == 0
        assert stats.answered == stats.sent  # the ones in flight got their answers
        m = await scrape_metrics(app.admin_address)
        assert metric(m, "infermon_requests_total") == stats.sent
        assert metric(m, "infermon_client_aborts_total") == 0
    finally:
        await runner.cleanup()
