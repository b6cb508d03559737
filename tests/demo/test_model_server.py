"""The demo's model server over real sockets: Open Inference Protocol v2, KServe v1, SSE chat."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import orjson
import pytest
from aiohttp import web

from proxy.demo.model import FEATURES, Models, sample, train_models
from proxy.demo.model_server import BadInput, build_model_app, features_of
from proxy.demo.traffic import infer_body
from tests.conftest import ProxyFactory
from tests.helpers import Client, bound_socket, metric, scrape_metrics


@pytest.fixture(scope="module")
def models() -> Models:
    return train_models(seed=7)


async def _serve(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    sock = bound_socket()
    await web.SockSite(runner, sock).start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    await runner.cleanup()


@pytest.fixture
async def stable(models: Models) -> AsyncIterator[str]:
    async for url in _serve(build_model_app(models.stable, error_rate=0.0, delay=0.0005, seed=1)):
        yield url


@pytest.fixture
async def fake() -> AsyncIterator[str]:
    async for url in _serve(build_model_app(error_rate=0.0, delay=0.0005, seed=1)):
        yield url


def test_features_of_reads_one_tensor_per_feature_or_one_matrix() -> None:
    x, _ = sample(np.random.default_rng(0), 1)
    assert np.allclose(features_of(infer_body(x[0])["inputs"]), np.round(x, 3))
    matrix = {"name": "input-0", "shape": [2, 4], "datatype": "FP32", "data": [[1, 2, 3, 4], [5, 6, 7, 8]]}
    assert features_of([matrix]).tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    columns = [{"name": f, "shape": [2, 1], "datatype": "FP32", "data": [i, i + 10]} for i, f in enumerate(FEATURES)]
    assert features_of(list(reversed(columns))).tolist() == [[0, 1, 2, 3], [10, 11, 12, 13]]


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([], "non-empty list"),
        ([{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}], "shape [N, 4]"),
        ([{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3]}], "prod(shape)"),
        ([{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": ["a", 2, 3, 4]}], "numbers"),
        ([{"name": "sepal_length", "shape": [1], "data": [1]}, {"name": "x", "shape": [1], "data": [1]}], "missing"),
    ],
)
def test_features_of_refuses_what_it_cannot_read(inputs: list[object], message: str) -> None:
    with pytest.raises(BadInput, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        features_of(inputs)


async def test_oip_v2_routes_through_the_proxy(make_proxy: ProxyFactory, stable: str, models: Models) -> None:
    app = await make_proxy(stable)
    client = await Client.connect(app.proxy_address)
    for path, want in [
        ("/v2/health/ready", {"ready": True}),
        ("/v2/health/live", {"live": True}),
        ("/v2/models/iris/ready", {"name": "iris", "ready": True}),
    ]:
        resp = await client.request("GET", path)
        assert (resp.status, resp.json()) == (200, want), path
    resp = await client.request("GET", "/v2/models/iris")
    meta = resp.json()
    assert isinstance(meta, dict)
    assert [i["name"] for i in meta["inputs"]] == list(FEATURES)
    assert [o["name"] for o in meta["outputs"]] == ["label", "probabilities"]

    x, _ = sample(np.random.default_rng(5), 1)
    body = orjson.dumps({"id": "r1", **infer_body(x[0])})
    resp = await client.request("POST", "/v2/models/iris/infer", body=body)
    assert resp.status == 200
    data = resp.json()
    assert isinstance(data, dict)
    assert (data["model_name"], data["model_version"], data["id"]) == ("iris", "1", "r1")
    label, probs = data["outputs"]
    assert (label["name"], label["datatype"], label["shape"]) == ("label", "INT64", [1])
    assert (probs["name"], probs["datatype"], probs["shape"]) == ("probabilities", "FP32", [1, 3])
    assert sum(probs["data"]) == pytest.approx(1.0, abs=1e-5)
    expected = models.stable.predict_proba(np.round(x, 3))[0]
    assert probs["data"] == pytest.approx(expected.tolist(), abs=1e-6)
    assert label["data"] == [int(expected.argmax())]

    resp = await client.request("POST", "/v2/models/iris/infer", body=b'{"inputs": []}')
    assert resp.status == 400
    resp = await client.request("POST", "/v2/models/other/infer", body=body)
    assert resp.status == 404
    resp = await client.request("POST", "/v1/models/iris:predict", body=b'{"instances": [[5.0, 3.4, 1.5, 0.2]]}')
    assert resp.status == 200
    assert sum(resp.json()["predictions"][0]) == pytest.approx(1.0, abs=1e-5)  # type: ignore[index]
    await client.close()
    m = await scrape_metrics(app.admin_address)
    assert metric(m, "infermon_requests_total", model="iris") >= 5


async def test_chat_streams_events_and_usage(make_proxy: ProxyFactory, stable: str) -> None:
    app = await make_proxy(stable)
    client = await Client.connect(app.proxy_address)
    chat = b'{"stream": true, "max_tokens": 3, "stream_options": {"include_usage": true}, "messages": []}'
    resp = await client.request("POST", "/v1/chat/completions", body=chat)
    assert resp.status == 200
    events = [e for e in resp.body.split(b"\n\n") if e]
    assert len(events) == 5  # 3 tokens, the usage, [DONE]
    assert orjson.loads(events[3][len(b"data: ") :])["usage"]["completion_tokens"] == 3
    assert events[-1] == b"data: [DONE]"
    resp = await client.request("POST", "/v1/chat/completions", body=b'{"max_tokens": 2, "messages": []}')
    assert resp.status == 200
    assert resp.json()["usage"]["completion_tokens"] == 2  # type: ignore[index]
    await client.close()
    m = await scrape_metrics(app.admin_address)
    assert metric(m, "infermon_stream_chunk_gap_seconds_count") >= 3


async def test_without_a_model_it_answers_the_fixed_score(make_proxy: ProxyFactory, fake: str) -> None:
    """What the benchmarks use: any name, two classes, v1 and v2."""
    app = await make_proxy(fake)
    client = await Client.connect(app.proxy_address)
    body = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})
    resp = await client.request("POST", "/v2/models/any/versions/2/infer", body=body)
    assert resp.status == 200
    data = resp.json()
    assert isinstance(data, dict) and data["model_version"] == "2"
    assert sum(data["outputs"][0]["data"]) == pytest.approx(1.0)
    resp = await client.request("POST", "/v1/models/churn:predict", body=b'{"instances": [[0, 0, 0, 0]]}')
    assert resp.status == 200
    await client.close()


async def test_error_rate_is_the_share_of_500s(make_proxy: ProxyFactory, models: Models) -> None:
    async for url in _serve(build_model_app(models.canary, error_rate=0.5, delay=0.0, seed=3)):
        client = await Client.connect((url.split("//")[1].split(":")[0], int(url.rsplit(":", 1)[1])))
        body = orjson.dumps(infer_body(np.array([5.0, 3.4, 1.5, 0.2])))
        statuses = [(await client.request("POST", "/v2/models/iris/infer", body=body)).status for _ in range(200)]
        await client.close()
        assert set(statuses) == {200, 500}
        assert 60 < statuses.count(500) < 140
