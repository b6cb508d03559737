"""Model / version / variant labels: path parsing, the per-label caps, the 2xx rule, the combination
budget, and what reaches /metrics and the observers after the metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web

from proxy.dataplane.exchange import Exchange
from proxy.dataplane.hooks import Observer
from proxy.observe.labels import (
    MAX_LABEL_LENGTH,
    OTHER,
    OVERFLOW_REASONS,
    LabelCap,
    Labeler,
    labels_from_path,
    method_label,
)
from proxy.settings import Labels, Llm
from tests.conftest import ProxyFactory, Serve
from tests.helpers import (
    TIMEOUT,
    Client,
    RawUpstream,
    metric,
    parse_metrics,
    read_request_head,
    scrape,
    scrape_metrics,
    wait_until,
)

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


@pytest.mark.parametrize("value", ["", "has space", 'quote"', "new\nline", "trailing\n", "é", "{x}", "a,b"])
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


async def test_requests_the_proxy_rejects_keep_an_admitted_model_label(
    make_proxy: ProxyFactory, raw_upstream: Callable[..., Awaitable[RawUpstream]]
) -> None:
    """An overload 503 or a 413 for /v2/models/iris/... must count against iris once iris is known
    (one 2xx answer), or per-model error ratios miss exactly the errors that matter."""
    release = asyncio.Event()

    async def held(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            line, _, _ = await read_request_head(reader)
            if "/hold" in line:
                async with asyncio.timeout(TIMEOUT):
                    await release.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()

    up = await raw_upstream(held)
    app = await make_proxy(up.url, limits={"max_in_flight": 1, "max_request_body_bytes": 10})
    busy = await Client.connect(app.proxy_address)
    assert (await busy.request("GET", "/v2/models/iris/ready")).status == 200  # iris is admitted
    await busy.send(b"GET /v2/models/iris/hold HTTP/1.1\r\nHost: t\r\n\r\n")

    async def in_flight() -> bool:
        return metric(await scrape_metrics(app.admin_address), "infermon_requests_in_flight") == 1

    await wait_until(in_flight)
    other = await Client.connect(app.proxy_address)
    assert (await other.request("POST", "/v2/models/iris/infer", body=b"{}")).status == 503
    await other.close()
    other = await Client.connect(app.proxy_address)
    assert (await other.request("POST", "/v2/models/iris/infer", body=b"x" * 100)).status == 413
    await other.close()
    other = await Client.connect(app.proxy_address)
    assert (await other.request("POST", "/v2/models/bert/infer", body=b"{}")).status == 503  # bert: not known
    await other.close()
    release.set()
    assert (await busy.response()).status == 200
    await busy.close()

    m = await scrape_metrics(app.admin_address)
    assert metric(m, "infermon_requests_total", model="iris", code="200") == 2
    assert metric(m, "infermon_requests_total", model="iris", code="503") == 1
    assert metric(m, "infermon_requests_total", model="iris", code="413") == 1
    assert metric(m, "infermon_requests_total", model="other", version="other", variant="other", code="503") == 1
    assert metric(m, "infermon_label_overflow_total", reason="unconfirmed") == 1


# -- the 2xx rule and the combination budget, observer by observer -------------------------------


class Seen(Observer):
    """Registered after the metrics: the labels every later observer (tracing, access log) reads."""

    name = "seen"

    def __init__(self) -> None:
        self.labels: list[tuple[str, str, str, int]] = []

    def on_complete(self, ex: Exchange) -> None:
        self.labels.append((ex.model, ex.version, ex.variant, ex.status))


def exchange(path: str, method: str = "POST") -> Exchange:
    ex = Exchange(0.0, "127.0.0.1")
    ex.method = method
    ex.path = path
    return ex


def answered(labeler: Labeler, path: str, status: int | None, headers: dict[str, str] | None = None) -> Exchange:
    """What the data plane calls for one request: the head, the upstream's answer (None: no answer), the end."""
    ex = exchange(path)
    labeler.on_request_head(ex)
    if status is not None:
        ex.status = status
        ex.response_headers = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        labeler.on_upstream_head(ex)
    else:
        ex.status = 502
    labeler.on_complete(ex)
    return ex


def triple(ex: Exchange) -> tuple[str, str, str]:
    return ex.model, ex.version, ex.variant


def test_new_values_wait_for_a_2xx_answer() -> None:
    labeler = Labeler(Labels())
    for status in (404, 500, 101, None):
        assert triple(answered(labeler, "/v2/models/iris/versions/1/infer", status)) == (OTHER, OTHER, OTHER)
    assert labeler.cap_model.admitted == {} and labeler.cap_version.admitted == {}
    assert labeler.combinations == set()
    assert labeler.overflow["unconfirmed"] == 4
    assert triple(answered(labeler, "/v2/models/iris/versions/1/infer", 200)) == ("iris", "1", "stable")
    for status in (404, 503, None):  # admitted: any status keeps the labels
        assert triple(answered(labeler, "/v2/models/iris/versions/1/infer", status)) == ("iris", "1", "stable")
    # a known model with a new version: the new triple waits for its own 2xx
    assert triple(answered(labeler, "/v2/models/iris/versions/2/infer", 404)) == (OTHER, OTHER, OTHER)
    assert triple(answered(labeler, "/v2/models/iris/infer", 204)) == ("iris", "unknown", "stable")
    assert labeler.combinations == {("iris", "1", "stable"), ("iris", "unknown", "stable")}


def test_labels_read_other_until_the_upstream_answers() -> None:
    labeler = Labeler(Labels())
    ex = exchange("/v2/models/iris/infer")
    labeler.on_request_head(ex)
    assert triple(ex) == (OTHER, OTHER, OTHER)
    ex.status = 200
    labeler.on_upstream_head(ex)
    assert triple(ex) == ("iris", "unknown", "stable")
    ex2 = exchange("/v2/models/iris/infer")
    labeler.on_request_head(ex2)  # now known: set at once
    assert triple(ex2) == ("iris", "unknown", "stable")
    assert ex2.extra is None  # nothing to wait for, nothing allocated


def test_defaults_pass_without_a_slot() -> None:
    labeler = Labeler(Labels(max_combinations=1))
    assert triple(answered(labeler, "/echo", 404)) == ("unknown", "unknown", "stable")
    assert triple(answered(labeler, "/healthz", None)) == ("unknown", "unknown", "stable")
    assert labeler.combinations == set()
    assert sum(labeler.overflow.values()) == 0


def test_budget_of_combinations() -> None:
    labeler = Labeler(Labels(max_combinations=3))
    paths = [f"/v2/models/m{i}/versions/{v}/infer" for i in range(3) for v in range(2)]
    got = [triple(answered(labeler, path, 200)) for path in paths]
    assert got[:3] == [("m0", "0", "stable"), ("m0", "1", "stable"), ("m1", "0", "stable")]
    assert got[3:] == [(OTHER, OTHER, OTHER)] * 3
    assert len(labeler.combinations) == 3
    assert labeler.overflow["max_combinations"] == 3
    # values of a refused triple are not admitted either: m2 took no slot of labels.max_values
    assert set(labeler.cap_model.admitted) == {"m0", "m1"}
    assert triple(answered(labeler, "/v2/models/m0/versions/1/infer", 500)) == ("m0", "1", "stable")


def test_max_values_then_the_triple_budget() -> None:
    labeler = Labeler(Labels(max_values=1, max_combinations=10))
    assert triple(answered(labeler, "/v2/models/a/infer", 200)) == ("a", "unknown", "stable")
    assert triple(answered(labeler, "/v2/models/b/infer", 200)) == (OTHER, "unknown", "stable")
    assert triple(answered(labeler, "/v2/models/c/infer", 404)) == (OTHER, "unknown", "stable")  # known triple
    assert labeler.overflow["max_values"] == 2
    assert triple(answered(labeler, "/v2/models/" + "x" * 200 + "/infer", 200)) == (OTHER, "unknown", "stable")
    assert labeler.overflow["invalid"] == 1


def test_allow_listed_values_also_wait_for_a_2xx() -> None:
    labeler = Labeler(Labels.model_validate({"allow": {"model": ["iris"]}}))
    assert triple(answered(labeler, "/v2/models/iris/infer", 503)) == (OTHER, OTHER, OTHER)
    assert triple(answered(labeler, "/v2/models/iris/infer", 200)) == ("iris", "unknown", "stable")
    assert triple(answered(labeler, "/v2/models/bert/infer", 200)) == (OTHER, "unknown", "stable")


def test_response_header_values_follow_the_same_rule() -> None:
    labeler = Labeler(Labels(model_header="x-model", variant_header="x-variant"))
    canary = {"x-model": "llama", "x-variant": "canary"}
    assert triple(answered(labeler, "/v1/chat/completions", 404, canary)) == (OTHER, OTHER, OTHER)
    assert labeler.cap_model.admitted == {} and labeler.cap_variant.admitted == {}
    assert triple(answered(labeler, "/v1/chat/completions", 200, canary)) == ("llama", "unknown", "canary")
    assert triple(answered(labeler, "/v1/chat/completions", 500, canary)) == ("llama", "unknown", "canary")
    # the header wins over the path, and a path value it replaces is not admitted
    assert triple(answered(labeler, "/v2/models/iris/infer", 200, {"x-model": "llama"})) == (
        "llama", "unknown", "stable",
    )  # fmt: skip
    assert "iris" not in labeler.cap_model.admitted
    # without a header, the path value: new, so it needs this 2xx
    assert triple(answered(labeler, "/v2/models/iris/infer", 200)) == ("iris", "unknown", "stable")
    # no upstream answer: the path value stays unconfirmed
    assert triple(answered(labeler, "/v2/models/bert/infer", None)) == (OTHER, OTHER, OTHER)


def test_labeler_keeps_no_raw_value() -> None:
    """Nothing the Labeler keeps grows with traffic that was not admitted."""
    labeler = Labeler(Labels(max_values=5, max_combinations=5))
    for i in range(300):
        answered(labeler, f"/v2/models/scan-{i}/versions/{i}/infer", 404)
        answered(labeler, f"/v2/models/ok-{i}/versions/{i}/infer", 200)
    assert len(labeler.cap_model.admitted) <= 5 and len(labeler.cap_version.admitted) <= 5
    assert len(labeler.combinations) <= 5
    assert set(labeler.overflow) == set(OVERFLOW_REASONS)


# -- through the proxy ------------------------------------------------------------------------


def model_server(known: set[str]) -> web.Application:
    """An OIP v2 server that knows some models: 404 for the others; ``?status=`` forces a status."""

    async def infer(request: web.Request) -> web.StreamResponse:
        if request.match_info["model"] not in known:
            return web.json_response({"error": "unknown model"}, status=404)
        status = int(request.query.get("status", "200"))
        if request.query.get("stream"):
            response = web.StreamResponse(status=status)
            await response.prepare(request)
            for _ in range(3):
                await response.write(b"data: x\n\n")
            await response.write_eof()
            return response
        return web.json_response({"outputs": []}, status=status)

    app = web.Application()
    app.router.add_route("*", "/v2/models/{model}/infer", infer)
    app.router.add_route("*", "/v2/models/{model}/versions/{version}/infer", infer)
    return app


async def test_a_scan_of_404_paths_mints_nothing(
    make_proxy: ProxyFactory, serve: Callable[[web.Application], Awaitable[str]]
) -> None:
    seen = Seen()
    app = await make_proxy(await serve(model_server({"iris"})), observers=(seen,))
    client = await Client.connect(app.proxy_address)
    for i in range(40):
        assert (await client.request("POST", f"/v2/models/scan{i}/versions/{i}/infer", body=b"{}")).status == 404
    assert (await client.request("POST", "/v2/models/iris/versions/1/infer", body=b"{}")).status == 200
    assert (await client.request("POST", "/v2/models/iris/versions/1/infer?status=500", body=b"{}")).status == 500
    await client.close()

    m = await scrape_metrics(app.admin_address)
    name = "infermon_requests_total"
    assert metric(m, name, model="other", version="other", variant="other", code="404") == 40
    assert metric(m, name, model="iris", version="1", variant="stable", code="200") == 1
    assert metric(m, name, model="iris", version="1", variant="stable", code="500") == 1  # admitted: kept
    assert {dict(k)["model"] for k in m[name]} == {"other", "iris"}
    assert metric(m, "infermon_label_overflow_total", reason="unconfirmed") == 40
    assert metric(m, "infermon_label_combinations") == 1
    assert seen.labels.count(("other", "other", "other", 404)) == 40  # later observers read the same
    assert seen.labels[-1] == ("iris", "1", "stable", 500)
    assert len(app.metrics.series) == 3


async def test_budget_folds_into_other_in_every_family(
    make_proxy: ProxyFactory, serve: Callable[[web.Application], Awaitable[str]]
) -> None:
    seen = Seen()
    models = {f"m{i}" for i in range(4)}
    app = await make_proxy(await serve(model_server(models)), observers=(seen,), labels={"max_combinations": 2})
    client = await Client.connect(app.proxy_address)
    for i in range(4):
        resp = await client.request("GET", f"/v2/models/m{i}/infer?stream=1")
        assert resp.status == 200 and resp.chunked
    await client.close()

    text = await scrape(app.admin_address)
    m = parse_metrics(text[1])
    assert metric(m, "infermon_requests_total", model="m0") == 1
    assert metric(m, "infermon_requests_total", model="m1") == 1
    assert metric(m, "infermon_requests_total", model="other", version="other", variant="other") == 2
    assert metric(m, "infermon_label_overflow_total", reason="max_combinations") == 2
    assert metric(m, "infermon_label_combinations") == 2
    for family in ("infermon_request_duration_seconds_count", "infermon_stream_chunk_gap_seconds_count"):
        assert {tuple(dict(k)[n] for n in ("model", "version", "variant")) for k in m[family]} == {
            ("m0", "unknown", "stable"), ("m1", "unknown", "stable"), ("other", "other", "other")
        }, family  # fmt: skip
    folded = ("other", "other", "other")
    assert [s[:3] for s in seen.labels] == [("m0", "unknown", "stable"), ("m1", "unknown", "stable"), folded, folded]


async def test_no_upstream_answer_mints_nothing(
    make_proxy: ProxyFactory, raw_upstream: Callable[..., Awaitable[RawUpstream]]
) -> None:
    """Upstream failures and clients that leave before the answer: no new label, no slot; a model
    admitted before keeps its label through them."""

    async def hang_up_on_some(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            line, _, _ = await read_request_head(reader)
            if "hangup" in line:
                return  # closes without answering: 502, kind="reset"
            if "never" in line:
                await reader.read()  # until the proxy gives up
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()

    up = await raw_upstream(hang_up_on_some)
    app = await make_proxy(up.url)

    async def one(path: str) -> int:
        client = await Client.connect(app.proxy_address)
        try:
            return (await client.request("GET", path)).status
        finally:
            await client.close()

    assert await one("/v2/models/bert/versions/hangup/infer") == 502
    assert await one("/v2/models/iris/versions/1/infer") == 200
    assert await one("/v2/models/iris/versions/1/infer?hangup") == 502
    leaver = await Client.connect(app.proxy_address)
    await leaver.send(b"GET /v2/models/gpt/versions/never/infer HTTP/1.1\r\nHost: t\r\n\r\n")

    async def in_flight() -> bool:
        return metric(await scrape_metrics(app.admin_address), "infermon_requests_in_flight") == 1

    await wait_until(in_flight)
    await leaver.close()

    async def aborted() -> bool:
        return metric(await scrape_metrics(app.admin_address), "infermon_client_aborts_total") == 1

    await wait_until(aborted)
    m = await scrape_metrics(app.admin_address)
    assert metric(m, "infermon_upstream_errors_total", kind="reset", model="other", version="other") == 1
    assert metric(m, "infermon_upstream_errors_total", kind="reset", model="iris", version="1") == 1
    assert metric(m, "infermon_client_aborts_total", model="other", version="other", variant="other") == 1
    assert metric(m, "infermon_requests_total", model="other", code="499") == 1
    assert metric(m, "infermon_label_overflow_total", reason="unconfirmed") == 2
    assert metric(m, "infermon_label_combinations") == 1
    labeler = next(o for o in app.hooks.observers if isinstance(o, Labeler))
    assert set(labeler.cap_model.admitted) == {"iris"}


async def test_method_and_code_labels_are_bounded_and_so_is_every_dict(
    make_proxy: ProxyFactory, raw_upstream: Callable[..., Awaitable[RawUpstream]]
) -> None:
    async def odd_status(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            line, _, _ = await read_request_head(reader)
            status = b"999" if "odd" in line else b"200"
            writer.write(b"HTTP/1.1 " + status + b" X\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()

    up = await raw_upstream(odd_status)
    app = await make_proxy(up.url)
    client = await Client.connect(app.proxy_address)
    methods = ("PROPFIND", "MKCOL", "LOCK", "UNLOCK", "COPY", "MOVE", "SEARCH", "REPORT", "PURGE", "GET")
    for method in methods:
        assert (await client.request(method, "/x")).status == 200
    assert (await client.request("GET", "/odd")).status == 999
    await client.close()

    m = await scrape_metrics(app.admin_address)
    name = "infermon_requests_total"
    assert metric(m, name, method="other", code="200") == len(methods) - 1
    assert metric(m, name, method="GET", code="200") == 1
    assert metric(m, name, method="GET", code="other") == 1
    assert metric(m, "infermon_request_duration_seconds_count", method="GET", code_class="other") == 1
    assert {dict(k)["method"] for k in m[name]} == {"GET", "other"}
    # the internal dicts are keyed by the bounded labels, not by what the traffic sent
    assert {key[3] for key in app.metrics.series} == {"GET", "other"}
    assert {key[4] for key in app.metrics.series} == {200, 0}
    assert len(app.metrics.series) == 3


# -- the model named by an OpenAI-compatible request or response body ------------------------------


def llm_exchange(
    labeler: Labeler,
    request: bytes,
    status: int,
    response: bytes = b"",
    path: str = "/v1/chat/completions",
    chunks: int = 1,
) -> Exchange:
    """Head, the request body in `chunks` pieces, the upstream head, the response body, the end."""
    ex = exchange(path)
    labeler.on_request_head(ex)
    step = max(1, -(-len(request) // chunks))
    scans = labeler.on_request_body is not None  # None: the hook is out of the chain
    for i in range(0, len(request), step):
        if scans:
            labeler.on_request_body(ex, request[i : i + step])
    ex.status = status
    labeler.on_upstream_head(ex)
    if response and scans:
        labeler.on_response_body(ex, response)
    labeler.on_complete(ex)
    return ex


def test_model_label_from_the_request_body() -> None:
    labeler = Labeler(Labels(), Llm())
    body = b'{"model": "llama-3-8b", "messages": [{"role": "user", "content": "hi"}]}'
    assert triple(llm_exchange(labeler, body, 200)) == ("llama-3-8b", "unknown", "stable")
    # split across reads: still found
    assert triple(llm_exchange(labeler, b'{"messages": [], "model": "mistral-7b"}', 200, chunks=5)) == (
        "mistral-7b",
        "unknown",
        "stable",
    )


def test_model_from_the_body_waits_for_a_2xx_like_a_path() -> None:
    labeler = Labeler(Labels(), Llm())
    assert triple(llm_exchange(labeler, b'{"model": "probe-1"}', 404)) == (OTHER, OTHER, OTHER)
    assert labeler.cap_model.admitted == {}
    assert labeler.overflow["unconfirmed"] == 1


def test_model_from_the_body_is_capped_by_the_label_budget() -> None:
    labeler = Labeler(Labels(max_values=2), Llm())
    got = [llm_exchange(labeler, b'{"model": "m%d"}' % i, 200).model for i in range(4)]
    assert got == ["m0", "m1", OTHER, OTHER]
    assert labeler.overflow["max_values"] == 2


def test_model_from_the_response_when_the_request_names_none() -> None:
    labeler = Labeler(Labels(), Llm())
    response = b'{"id": "x", "object": "chat.completion", "model": "served-model", "choices": []}'
    assert triple(llm_exchange(labeler, b'{"messages": []}', 200, response)) == ("served-model", "unknown", "stable")
    stream = b'data: {"id": "c", "object": "chat.completion.chunk", "model": "streamed", "choices": []}\n\n'
    assert llm_exchange(labeler, b'{"prompt": "x"}', 200, stream, path="/v1/completions").model == "streamed"
    # no model anywhere: the configured default
    assert llm_exchange(labeler, b'{"prompt": "x"}', 200, b'{"choices": []}', path="/v1/completions").model == (
        "unknown"
    )


def test_model_beyond_the_scan_bytes_is_not_looked_for() -> None:
    labeler = Labeler(Labels(), Llm(scan_bytes=64))
    body = b'{"messages": [{"role": "user", "content": "' + b"x" * 100 + b'"}], "model": "late"}'
    assert llm_exchange(labeler, body, 200).model == "unknown"


def test_response_header_wins_over_the_body() -> None:
    labeler = Labeler(Labels(model_header="x-model"), Llm())
    ex = exchange("/v1/chat/completions")
    labeler.on_request_head(ex)
    labeler.on_request_body(ex, b'{"model": "from-body"}')
    ex.status = 200
    ex.response_headers = [(b"x-model", b"from-header")]
    labeler.on_upstream_head(ex)
    labeler.on_complete(ex)
    assert ex.model == "from-header"


def test_body_scan_off_leaves_the_hooks_out() -> None:
    from proxy.dataplane.hooks import Hooks

    hooks = Hooks([Labeler(Labels(), Llm(model_from_body=False))])
    assert not hooks.request_body and not hooks.response_body
    assert llm_exchange(Labeler(Labels(), Llm(enabled=False)), b'{"model": "x"}', 200).model == "unknown"


async def test_llm_requests_are_split_by_model_in_metrics(make_proxy: ProxyFactory, serve: Serve) -> None:
    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"model": body.get("model"), "choices": [], "usage": {"total_tokens": 1}})

    app_ = web.Application()
    app_.router.add_post("/v1/chat/completions", chat)
    app = await make_proxy(await serve(app_))
    client = await Client.connect(app.proxy_address)
    for model in ("gpt-a", "gpt-b", "gpt-a"):
        body = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}]}' % model.encode()
        resp = await client.request(
            "POST", "/v1/chat/completions", headers={"Content-Type": "application/json"}, body=body
        )
        assert resp.status == 200
    m = await scrape_metrics(app.admin_address)
    assert metric(m, "infermon_requests_total", model="gpt-a", code="200") == 2
    assert metric(m, "infermon_requests_total", model="gpt-b", code="200") == 1


def test_variant_from_a_request_header_when_a_mesh_routes() -> None:
    labeler = Labeler(Labels(variant_request_header="x-variant", max_values=2))

    def with_header(value: str, status: int, path: str = "/echo") -> Exchange:
        ex = exchange(path)
        ex.request_headers = [(b"x-variant", value.encode())]
        labeler.on_request_head(ex)
        ex.status = status
        labeler.on_upstream_head(ex)
        labeler.on_complete(ex)
        return ex

    assert triple(with_header("canary", 503)) == (OTHER, OTHER, OTHER)  # a new value waits for a 2xx
    assert triple(with_header("canary", 200)) == ("unknown", "unknown", "canary")
    assert triple(with_header("canary", 503)) == ("unknown", "unknown", "canary")  # admitted now
    assert with_header("blue", 200, "/v2/models/iris/infer").variant == "blue"
    assert with_header("green", 200).variant == OTHER  # over labels.max_values
    assert triple(answered(labeler, "/echo", 200)) == ("unknown", "unknown", "stable")  # no header: default


def test_a_split_variant_that_only_fails_keeps_its_name() -> None:
    """A model confirmed by stable's 2xx is admitted with every variant of the split: the canary's
    500s on it read variant=canary, not other, or a canary that always fails would be invisible."""
    labeler = Labeler(Labels(max_combinations=10))
    labeler.admit_variants(["stable", "canary"])

    def routed(variant: str, status: int) -> Exchange:
        ex = exchange("/v1/models/iris:predict")
        ex.variant = variant  # the split chose it, before the labeler runs
        labeler.on_request_head(ex)
        ex.status = status
        labeler.on_upstream_head(ex)
        labeler.on_complete(ex)
        return ex

    assert triple(routed("canary", 500)) == (OTHER, OTHER, OTHER)  # the model is not confirmed yet
    assert triple(routed("stable", 200)) == ("iris", "unknown", "stable")
    assert triple(routed("canary", 500)) == ("iris", "unknown", "canary")
    assert ("iris", "unknown", "canary") in labeler.combinations
    # the budget still bounds them: one slot left, the sibling does not fit
    tight = Labeler(Labels(max_combinations=3))
    tight.admit_variants(["stable", "canary"])
    ex = exchange("/v1/models/iris:predict")
    ex.variant = "stable"
    tight.on_request_head(ex)
    ex.status = 200
    tight.on_upstream_head(ex)
    assert len(tight.combinations) == 3 and ("iris", "unknown", "stable") in tight.combinations
