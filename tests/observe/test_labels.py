"""Model / version / variant labels: path parsing, the cardinality cap, and what reaches /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from proxy.observe.labels import MAX_LABEL_LENGTH, OTHER, LabelCap, labels_from_path, method_label
from tests.conftest import ProxyFactory
from tests.helpers import TIMEOUT, Client, RawUpstream, metric, read_request_head, scrape_metrics, wait_until

# -- labels_from_path -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1/models/m:predict", ("m", None)),
        ("/v1/models/sk-iris:explain", ("sk-iris", None)),
        ("/v1/models/m", ("m", None)),
        ("/v2/models/m/infer", ("m", None)),
        ("/v2/models/m/versions/3/infer", ("m", "3")),
        ("/v2/models/m/versions/3", ("m", "3")),
        ("/v2/models/m/ready", ("m", None)),
        ("/v2/models/m", ("m", None)),
        ("/v2/models/bert.large/versions/v1.2/infer", ("bert.large", "v1.2")),
    ],
)
def test_labels_from_known_paths(path: str, expected: tuple[str | None, str | None]) -> None:
    assert labels_from_path(path) == expected


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/echo",
        "/v2/health/ready",
        "/v2/models",
        "/v2/models/",
        "/v1/models/",
        "/v1/models/m/predict",
        "/v2/models/m/versions/3/infer/extra",
        "/v2/models/m/infer/extra",
        "/v1/chat/completions",
        "/api/v2/models/m/infer",
        "/V2/models/m/infer",
    ],
)
def test_labels_from_other_paths(path: str) -> None:
    assert labels_from_path(path) == (None, None)


def test_method_label() -> None:
    assert method_label("POST") == "POST"
    assert method_label("PROPFIND") == OTHER
    assert method_label("") == OTHER


# -- LabelCap ---------------------------------------------------------------------------------


def test_cap_admits_first_max_values_then_other() -> None:
    cap = LabelCap(None, max_values=2)
    assert cap("a") == "a"
    assert cap("b") == "b"
    assert cap("c") == OTHER
    assert cap("a") == "a"  # already admitted values keep passing
    assert cap("b") == "b"
    assert cap("d") == OTHER
    assert set(cap.admitted) == {"a", "b"}


def test_cap_allow_list() -> None:
    cap = LabelCap(["iris", "churn"], max_values=1)
    assert cap("iris") == "iris"
    assert cap("churn") == "churn"  # the allow-list, not max_values, decides
    assert cap("bert") == OTHER


@pytest.mark.parametrize("value", ["", "has space", 'quote"', "new\nline", "é", "{x}", "a,b"])
def test_cap_rejects_invalid_values(value: str) -> None:
    cap = LabelCap(None, max_values=10)
    assert cap(value) == OTHER
    assert cap.admitted == {}


def test_cap_rejects_too_long_values_without_using_a_slot() -> None:
    cap = LabelCap(None, max_values=1)
    assert cap("x" * (MAX_LABEL_LENGTH + 1)) == OTHER
    assert cap("x" * MAX_LABEL_LENGTH) == "x" * MAX_LABEL_LENGTH
    assert cap("y") == OTHER


def test_cap_invalid_value_on_allow_list_is_still_other() -> None:
    cap = LabelCap(["bad value"], max_values=5)
    assert cap("bad value") == OTHER


# -- through the proxy ------------------------------------------------------------------------


async def test_v2_path_sets_model_and_version(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream)
    client = await Client.connect(app.proxy_address)
    for _ in range(2):
        assert (await client.request("POST", "/v2/models/iris/versions/2/infer", body=b"{}")).status == 200
    assert (await client.request("POST", "/v1/models/churn:predict", body=b"{}")).status == 200
    assert (await client.request("GET", "/echo")).status == 200
    await client.close()

    m = await scrape_metrics(app.admin_address)
    name = "infermon_requests_total"
    assert metric(m, name, model="iris", version="2", variant="stable", method="POST", code="200") == 2
    assert metric(m, name, model="churn", version="unknown", variant="stable", method="POST", code="200") == 1
    assert metric(m, name, model="unknown", version="unknown", variant="stable", method="GET", code="200") == 1
    assert metric(m, name) == 4
    hist = "infermon_request_duration_seconds_count"
    assert metric(m, hist, model="iris", version="2", code_class="2xx") == 2


async def test_configured_defaults_when_the_path_names_nothing(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream, labels={"model": "llama", "version": "7b", "variant": "shadow"})
    client = await Client.connect(app.proxy_address)
    assert (await client.request("GET", "/echo")).status == 200
    assert (await client.request("GET", "/v2/models/iris/infer")).status == 200
    await client.close()
    m = await scrape_metrics(app.admin_address)
    assert metric(m, "infermon_requests_total", model="llama", version="7b", variant="shadow") == 1
    assert metric(m, "infermon_requests_total", model="iris", version="7b", variant="shadow") == 1


async def test_from_path_off(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream, labels={"from_path": False})
    client = await Client.connect(app.proxy_address)
    assert (await client.request("GET", "/v2/models/iris/versions/2/infer")).status == 200
    await client.close()
    m = await scrape_metrics(app.admin_address)
    assert metric(m, "infermon_requests_total", model="unknown", version="unknown") == 1
    assert metric(m, "infermon_requests_total", model="iris") == 0


async def test_variant_from_response_header(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream, labels={"variant_header": "X-Variant", "model_header": "X-Model"})
    client = await Client.connect(app.proxy_address)
    resp = await client.request("GET", "/respond-headers?X-Variant=canary")
    assert resp.status == 200
    assert resp.header("x-variant") == "canary"  # still forwarded to the client
    assert (await client.request("GET", "/respond-headers?X-Variant=canary&X-Model=bert")).status == 200
    assert (await client.request("GET", "/echo")).status == 200  # no header: the configured default
    await client.close()

    m = await scrape_metrics(app.admin_address)
    name = "infermon_requests_total"
    assert metric(m, name, model="unknown", variant="canary") == 1
    assert metric(m, name, model="bert", variant="canary") == 1
    assert metric(m, name, model="unknown", variant="stable") == 1


async def test_response_header_wins_over_path(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream, labels={"model_header": "x-model"})
    client = await Client.connect(app.proxy_address)
    resp = await client.request("GET", "/respond-headers?X-Model=iris-v3")
    assert resp.status == 200
    await client.close()
    m = await scrape_metrics(app.admin_address)
    assert metric(m, "infermon_requests_total", model="iris-v3") == 1


async def test_max_values_turns_the_third_model_into_other(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream, labels={"max_values": 2})
    client = await Client.connect(app.proxy_address)
    for model in ("a", "b", "c", "d", "a"):
        assert (await client.request("POST", f"/v2/models/{model}/infer", body=b"{}")).status == 200
    await client.close()

    m = await scrape_metrics(app.admin_address)
    name = "infermon_requests_total"
    assert metric(m, name, model="a") == 2
    assert metric(m, name, model="b") == 1
    assert metric(m, name, model="other") == 2
    models = {dict(labels)["model"] for labels in m[name]}
    assert models == {"a", "b", "other"}


async def test_allow_list_is_per_label(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream, labels={"allow": {"model": ["iris"]}})
    client = await Client.connect(app.proxy_address)
    for path in ("/v2/models/iris/versions/2/infer", "/v2/models/churn/versions/7/infer"):
        assert (await client.request("POST", path, body=b"{}")).status == 200
    await client.close()

    m = await scrape_metrics(app.admin_address)
    name = "infermon_requests_total"
    assert metric(m, name, model="iris", version="2") == 1
    assert metric(m, name, model="other", version="7") == 1  # versions have no list: they pass


async def test_invalid_header_value_becomes_other(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream, labels={"variant_header": "x-variant"})
    client = await Client.connect(app.proxy_address)
    assert (await client.request("GET", "/respond-headers?X-Variant=" + "v" * 200)).status == 200
    await client.close()
    m = await scrape_metrics(app.admin_address)
    assert metric(m, "infermon_requests_total", variant="other") == 1


async def test_empty_header_value_keeps_the_label_it_would_replace(make_proxy: ProxyFactory, upstream: str) -> None:
    """An empty X-Variant names no variant: the configured default stays (it is not a bad value)."""
    app = await make_proxy(upstream, labels={"variant_header": "x-variant", "model_header": "x-model"})
    client = await Client.connect(app.proxy_address)
    assert (await client.request("GET", "/respond-headers?X-Variant=&X-Model=%20")).status == 200
    assert (await client.request("POST", "/v2/models/iris/infer", body=b"{}")).status == 200
    await client.close()
    m = await scrape_metrics(app.admin_address)
    assert metric(m, "infermon_requests_total", model="unknown", variant="stable") == 1
    assert metric(m, "infermon_requests_total", model="iris", variant="stable") == 1
    assert metric(m, "infermon_requests_total", variant="other") == 0


async def test_requests_the_proxy_rejects_keep_their_model_label(
    make_proxy: ProxyFactory, raw_upstream: Callable[..., Awaitable[RawUpstream]]
) -> None:
    """An overload 503 or a 413 for /v2/models/iris/... must count against iris, or per-model error ratios
    miss exactly the errors that matter."""
    release = asyncio.Event()

    async def held(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        async with asyncio.timeout(TIMEOUT):
            await release.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    up = await raw_upstream(held)
    app = await make_proxy(up.url, limits={"max_in_flight": 1, "max_request_body_bytes": 10})
    busy = await Client.connect(app.proxy_address)
    await busy.send(b"GET /v2/models/iris/ready HTTP/1.1\r\nHost: t\r\n\r\n")

    async def in_flight() -> bool:
        return metric(await scrape_metrics(app.admin_address), "infermon_requests_in_flight") == 1

    await wait_until(in_flight)
    other = await Client.connect(app.proxy_address)
    assert (await other.request("POST", "/v2/models/iris/infer", body=b"{}")).status == 503
    await other.close()
    other = await Client.connect(app.proxy_address)
    assert (await other.request("POST", "/v2/models/iris/infer", body=b"x" * 100)).status == 413
    await other.close()
    release.set()
    assert (await busy.response()).status == 200
    await busy.close()

    m = await scrape_metrics(app.admin_address)
    assert metric(m, "infermon_requests_total", model="iris", code="200") == 1
    assert metric(m, "infermon_requests_total", model="iris", code="503") == 1
    assert metric(m, "infermon_requests_total", model="iris", code="413") == 1
