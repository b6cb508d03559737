"""The demo's model server over real sockets: Open Inference Protocol v2, KServe v1, SSE chat."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import orjson
import pytest

from proxy.demo.model import FEATURES, Models, sample
from proxy.demo.model_server import BadInput, build_model_app, features_of
from proxy.demo.traffic import infer_body
from tests.conftest import ProxyFactory
from tests.demo.conftest import serve
from tests.helpers import TIMEOUT, Client, metric, scrape_metrics


@pytest.fixture
async def stable(models: Models) -> AsyncIterator[str]:
    async for url in serve(build_model_app(models.stable, error_rate=0.0, delay=0.0005, seed=1)):
        yield url


@pytest.fixture
async def fake() -> AsyncIterator[str]:
    async for url in serve(build_model_app(error_rate=0.0, delay=0.0005, seed=1)):
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
    async for url in serve(build_model_app(models.canary, error_rate=0.5, delay=0.0, seed=3)):
        client = await Client.connect((url.split("//")[1].split(":")[0], int(url.rsplit(":", 1)[1])))
        body = orjson.dumps(infer_body(np.array([5.0, 3.4, 1.5, 0.2])))
        statuses = [(await client.request("POST", "/v2/models/iris/infer", body=body)).status for _ in range(200)]
        await client.close()
        assert set(statuses) == {200, 500}
        assert 60 < statuses.count(500) < 140


async def test_oip_v2_server_metadata_versions_and_datatypes(stable: str) -> None:
    """The parts of the Open Inference Protocol v2 REST API a client reads first: server metadata at
    /v2, the version routes (an unknown version is a 404 with an error body), and a tensor whose
    datatype is missing or not numeric is a 400 {"error": ...}, never a 500."""
    host, port = stable.split("//")[1].split(":")
    client = await Client.connect((host, int(port)))
    resp = await client.request("GET", "/v2")
    meta = resp.json()
    assert resp.status == 200 and isinstance(meta, dict)
    assert isinstance(meta["name"], str) and isinstance(meta["version"], str) and meta["extensions"] == []
    for path in ("/v2/models/iris/versions/1", "/v2/models/iris/versions/1/ready"):
        assert (await client.request("GET", path)).status == 200, path
    body = orjson.dumps(infer_body(np.array([5.0, 3.4, 1.5, 0.2])))
    ok = await client.request("POST", "/v2/models/iris/versions/1/infer", body=body)
    assert ok.status == 200 and ok.json()["model_version"] == "1"  # type: ignore[index]
    for method, path, data in [
        ("GET", "/v2/models/iris/versions/9", b""),
        ("GET", "/v2/models/iris/versions/9/ready", b""),
        ("POST", "/v2/models/iris/versions/9/infer", body),
    ]:
        resp = await client.request(method, path, body=data)
        assert resp.status == 404, path
        assert "no version '9'" in resp.json()["error"]  # type: ignore[index]
    for tensor in (
        {"name": "x", "shape": [1, 4], "data": [1, 2, 3, 4]},
        {"name": "x", "shape": [1, 4], "datatype": "BYTES", "data": [1, 2, 3, 4]},
    ):
        resp = await client.request("POST", "/v2/models/iris/infer", body=orjson.dumps({"inputs": [tensor]}))
        assert resp.status == 400
        assert "datatype" in resp.json()["error"]  # type: ignore[index]
    await client.close()


async def test_bad_input_is_a_400_even_on_a_failing_server(models: Models) -> None:
    """A request the model cannot read is the client's error: 400 every time, not a simulated 500."""
    async for url in serve(build_model_app(models.canary, error_rate=1.0, delay=0.0, seed=3)):
        client = await Client.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        for _ in range(5):
            resp = await client.request("POST", "/v2/models/iris/infer", body=b'{"inputs": []}')
            assert resp.status == 400
        await client.close()


@pytest.mark.parametrize(
    "body",
    [
        b'{"max_tokens": "many", "messages": []}',
        b'{"max_tokens": null}',
        b'{"messages": 3}',
        b'{"stream": true, "stream_options": [1]}',
        b'{"model": {"a": 1}}',
    ],
)
async def test_chat_refuses_bad_fields_with_a_400(stable: str, body: bytes, caplog: pytest.LogCaptureFixture) -> None:
    """OpenAI answers a malformed chat request 400 with an error; before, these raised in the handler
    (a 500 and a traceback printed on the demo's terminal)."""
    client = await Client.connect(("127.0.0.1", int(stable.rsplit(":", 1)[1])))
    async with asyncio.timeout(TIMEOUT):  # before, the 500 of the handler's exception never came
        resp = await client.request("POST", "/v1/chat/completions", body=body)
    await client.close()
    assert resp.status == 400
    assert isinstance(resp.json()["error"], str)  # type: ignore[index]
    assert not [r for r in caplog.records if r.exc_info]


async def test_chat_chunks_carry_what_openai_clients_read(stable: str) -> None:
    """Each chunk: id (the same in every chunk), object chat.completion.chunk, created, model, choices
    with a delta (the first naming the assistant role); then data: [DONE], as text/event-stream."""
    client = await Client.connect(("127.0.0.1", int(stable.rsplit(":", 1)[1])))
    resp = await client.request(
        "POST", "/v1/chat/completions", body=b'{"stream": true, "max_tokens": 3, "model": "m", "messages": []}'
    )
    assert resp.status == 200 and (resp.header("content-type") or "").startswith("text/event-stream")
    events = [e for e in resp.body.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    chunks = [orjson.loads(e[len(b"data: ") :]) for e in events[:-1]]
    assert len(chunks) == 3
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    for c in chunks:
        assert c["object"] == "chat.completion.chunk" and c["model"] == "m" and isinstance(c["created"], int)
        assert isinstance(c["choices"][0]["delta"]["content"], str)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]
    whole = await client.request("POST", "/v1/chat/completions", body=b'{"max_tokens": 2}')
    await client.close()
    doc = whole.json()
    assert isinstance(doc, dict) and doc["object"] == "chat.completion" and doc["id"].startswith("chatcmpl-")
    assert isinstance(doc["created"], int)
