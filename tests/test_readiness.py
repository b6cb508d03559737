"""proxy/readiness.py: infermon_upstream_up follows each pool's readiness checks, traffic or not."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import generate_latest

from proxy.app import ProxyApp
from proxy.settings import ProxyConfig
from tests.conftest import upstream_app
from tests.helpers import bound_socket, free_port, scrape_metrics, wait_until


async def _up(app: ProxyApp) -> dict[str, float]:
    samples = (await scrape_metrics(app.admin_address)).get("infermon_upstream_up", {})
    return {dict(labels)["upstream"]: value for labels, value in samples.items()}


async def test_upstream_up_is_0_while_it_refuses_and_1_once_it_answers(upstream: str) -> None:
    port = free_port()  # nothing listens here yet: the canary is down
    cfg = ProxyConfig.model_validate(
        {
            "upstream": upstream,
            "upstreams": {"canary": f"http://127.0.0.1:{port}"},
            "readiness": {"interval": 0.05, "path": "/v2/health/ready"},
        }
    )
    app = ProxyApp(cfg)
    runner: web.AppRunner | None = None
    await app.start(listen=bound_socket(), admin=bound_socket())
    try:

        async def both_checked() -> bool:
            return len(await _up(app)) == 2

        await wait_until(both_checked)
        assert await _up(app) == {"stable": 1.0, "canary": 0.0}  # without a single request

        runner = web.AppRunner(upstream_app(), access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()

        async def canary_up() -> bool:
            return (await _up(app)).get("canary") == 1.0

        await wait_until(canary_up)
    finally:
        await app.shutdown()
        if runner is not None:
            await runner.cleanup()


async def test_no_series_before_the_first_check(upstream: str) -> None:
    app = ProxyApp(ProxyConfig.model_validate({"upstream": upstream}))
    # not started: no probe has run, so the family is there without a sample (not a made-up 0)
    text = generate_latest(app.registry).decode()
    assert "# TYPE infermon_upstream_up gauge" in text
    assert "infermon_upstream_up{" not in text
