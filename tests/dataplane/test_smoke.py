from __future__ import annotations

from proxy.app import ProxyApp
from tests.conftest import ProxyFactory
from tests.helpers import Client


async def test_get_passes_through_with_request_id(make_proxy: ProxyFactory, upstream: str) -> None:
    app: ProxyApp = await make_proxy(upstream)
    client = await Client.connect(app.proxy_address)
    resp = await client.request("GET", "/echo/a?b=1")
    assert resp.status == 200
    data = resp.json()
    assert isinstance(data, dict)
    assert data["path"] == "/echo/a?b=1"
    assert resp.header("x-request-id")
    await client.close()
