"""Feature and prediction extraction on real protocol bodies, hostile bodies and random ones."""

from __future__ import annotations

import gzip
import math
import random
import zlib
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.sampling.extract import Dropped, Extractor, evaluate, parse_path
from proxy.sampling.sample import Extracted, Sample
from proxy.settings import Adapter, Sampling

BODIES = Path(__file__).parent / "bodies"
IRIS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def body(name: str) -> bytes:
    return (BODIES / name).read_bytes()


def make(
    path: str,
    request: bytes | str = b"",
    response: bytes | str = b"",
    *,
    request_headers: list[tuple[str, str]] | None = None,
    response_headers: list[tuple[str, str]] | None = None,
    **fields: Any,
) -> Sample:
    return Sample(
        request_id="r1",
        timestamp=0.0,
        method="POST",
        path=path,
        status=200,
        model="m",
        version="",
        variant="",
        request_headers=request_headers or [],
        response_headers=response_headers or [],
        request_body=request.encode() if isinstance(request, str) else request,
        response_body=response.encode() if isinstance(response, str) else response,
        **fields,
    )


def extractor(columns: list[str] | None = None, **cfg: Any) -> Extractor:
    return Extractor(Sampling(**cfg), lambda: columns)


def run(sample: Sample, columns: list[str] | None = None, **cfg: Any) -> Extracted:
    return extractor(columns, **cfg).extract(sample)


def dropped(sample: Sample, columns: list[str] | None = None, **cfg: Any) -> str:
    with pytest.raises(Dropped) as info:
        run(sample, columns, **cfg)
    return info.value.reason


# -- KServe v1


def test_kserve_v1_rows_of_numbers_named_by_the_reference() -> None:
    sample = make("/v1/models/iris:predict", body("kserve_v1_iris_request.json"), body("kserve_v1_iris_response.json"))
    out = run(sample, IRIS)
    assert out.adapter == "kserve_v1"
    assert out.rows == [
        dict(zip(IRIS, [6.8, 2.8, 4.8, 1.4], strict=True)),
        dict(zip(IRIS, [6.0, 3.4, 4.5, 1.6], strict=True)),
    ]
    assert out.predictions == [{"prediction": 1}, {"prediction": 1}]
    assert orjson.loads(out.request_body) == orjson.loads(body("kserve_v1_iris_request.json"))
    assert out.response == {"predictions": [1, 1]}


def test_kserve_v1_rows_of_numbers_without_a_reference_or_of_another_width() -> None:
    sample = make("/v1/models/iris:predict", body("kserve_v1_iris_request.json"))
    for columns in (None, ["a", "b"]):
        out = run(sample, columns)
        assert out.rows[0] == {"0": 6.8, "1": 2.8, "2": 4.8, "3": 1.4}
        assert out.predictions == []


def test_kserve_v1_objects_and_probability_vectors() -> None:
    sample = make(
        "/v1/models/census:predict", body("kserve_v1_objects_request.json"), body("kserve_v1_objects_response.json")
    )
    out = run(sample, ["whatever"])
    assert out.adapter == "kserve_v1"
    assert [row["age"] for row in out.rows] == [39, 50, 38]
    assert out.rows[1]["workclass"] == "Self-emp-not-inc"
    assert out.predictions[2] == {"prediction[0]": 0.95, "prediction[1]": 0.05}


def test_kserve_v1_detected_by_body_on_any_path() -> None:
    out = run(make("/predict", body("kserve_v1_iris_request.json"), body("kserve_v1_iris_response.json")))
    assert out.adapter == "kserve_v1" and len(out.rows) == 2


def test_kserve_v1_scalar_instances_are_one_feature() -> None:
    out = run(
        make("/v1/models/m:predict", '{"instances": [1, 2.5, "x"]}', '{"predictions": [{"label": "a"}]}'), ["only"]
    )
    assert out.rows == [{"only": 1}, {"only": 2.5}, {"only": "x"}]
    assert out.predictions == [{"label": "a"}]
    assert run(make("/v1/models/m:predict", '{"instances": [1]}')).rows == [{"0": 1}]


# -- TensorFlow Serving


def test_tfserving_half_plus_three() -> None:
    sample = make(
        "/v1/models/half_plus_three:predict",
        body("tfserving_half_plus_three_request.json"),
        body("tfserving_half_plus_three_response.json"),
    )
    out = run(sample)
    assert out.adapter == "kserve_v1"  # the same body: read the same way
    assert out.rows == [{"0": 1.0}, {"0": 2.0}, {"0": 5.0}]
    assert out.predictions == [{"prediction": 3.5}, {"prediction": 4.0}, {"prediction": 5.5}]


def test_tfserving_row_and_columnar_formats_give_the_same_rows() -> None:
    rows = run(make("/v1/models/m:predict", body("tfserving_rows_request.json"), body("tfserving_rows_response.json")))
    columnar = run(
        make("/v1/models/m:predict", body("tfserving_columnar_request.json"), body("tfserving_columnar_response.json"))
    )
    assert rows.adapter == columnar.adapter == "tfserving"
    assert rows.rows == columnar.rows
    assert rows.rows[0] == {
        "tag": "foo",
        "signal[0]": 1,
        "signal[1]": 2,
        "signal[2]": 3,
        "signal[3]": 4,
        "signal[4]": 5,
    }
    # "sensor" is a matrix per instance: deeper than a vector, left out
    assert not any(key.startswith("sensor") for key in rows.rows[0])
    assert rows.predictions == columnar.predictions
    assert rows.predictions[1] == {"scores[0]": 0.9, "scores[1]": 0.1, "classes": 0}


def test_tfserving_columnar_list_and_scalar_inputs() -> None:
    out = run(make("/v1/models/m:predict", '{"inputs": [[1, 2], [3, 4]]}', '{"outputs": [[0.5], [0.25]]}'))
    assert out.adapter == "tfserving"
    assert out.rows == [{"0": 1, "1": 2}, {"0": 3, "1": 4}]
    assert out.predictions == [{"prediction[0]": 0.5}, {"prediction[0]": 0.25}]
    out = run(make("/v1/models/m:predict", '{"inputs": {"x": [1, 2], "threshold": 0.5}}', '{"outputs": 3}'))
    assert out.rows == [{"x": 1, "threshold": 0.5}, {"x": 2, "threshold": 0.5}]
    assert out.predictions == [{"prediction": 3}]


def test_tfserving_nan_and_infinity_tokens() -> None:
    request = '{"instances": [[1.0, NaN], [Infinity, -Infinity]]}'
    out = run(make("/v1/models/m:predict", request, '{"predictions": [NaN, 2]}'))
    assert out.rows[0]["0"] == 1.0 and math.isnan(out.rows[0]["1"])
    assert out.rows[1] == {"0": math.inf, "1": -math.inf}
    assert math.isnan(out.predictions[0]["prediction"])
    # what leaves the process is strict JSON: the non-finite numbers become null
    assert orjson.loads(out.request_body) == {"instances": [[1.0, None], [None, None]]}
    assert orjson.loads(out.response_body) == {"predictions": [None, 2]}


def test_tfserving_signature_name_selects_tfserving() -> None:
    out = run(make("/x", '{"signature_name": "serving_default", "instances": [[1]]}'))
    assert out.adapter == "tfserving" and out.rows == [{"0": 1}]


# -- Open Inference Protocol v2


def test_oip_v2_specification_example() -> None:
    out = run(make("/v2/models/mymodel/infer", body("oip_v2_request.json"), body("oip_v2_response.json")))
    assert out.adapter == "oip_v2"
    assert out.rows == [
        {"input0[0]": 1, "input0[1]": 2, "input1": True},
        {"input0[0]": 3, "input0[1]": 4, "input1": False},
    ]
    assert out.predictions == [
        {"output0[0]": 1.0, "output0[1]": 1.1, "output0[2]": 2.0},
        {"output0[0]": 2.1, "output0[1]": 3.0, "output0[2]": 3.1},
    ]


def test_oip_v2_single_tensor_named_by_the_reference_nested_data() -> None:
    sample = make(
        "/v2/models/iris/infer", body("oip_v2_iris_nested_request.json"), body("oip_v2_iris_nested_response.json")
    )
    out = run(sample, IRIS)
    assert out.rows[2] == dict(zip(IRIS, [7.7, 3.0, 6.1, 2.3], strict=True))
    assert out.predictions == [{"predict": 0}, {"predict": 1}, {"predict": 2}]
    without = run(sample, None)
    assert without.rows[0] == {"predict[0]": 5.1, "predict[1]": 3.5, "predict[2]": 1.4, "predict[3]": 0.2}


def test_triton_simple_model_with_versions_path() -> None:
    sample = make(
        "/v2/models/simple/versions/1/infer", body("triton_simple_request.json"), body("triton_simple_response.json")
    )
    out = run(sample, [f"c{i}" for i in range(16)])  # two tensors: the reference's names are not used
    assert out.adapter == "oip_v2"
    assert len(out.rows) == 1 and len(out.rows[0]) == 32
    assert out.rows[0]["INPUT0[15]"] == 15 and out.rows[0]["INPUT1[0]"] == 1
    assert out.predictions[0]["OUTPUT0[3]"] == 4 and out.predictions[0]["OUTPUT1[0]"] == -1


def test_mlserver_pandas_codec_request_and_response() -> None:
    sample = make(
        "/v2/models/income/infer", body("mlserver_pandas_request.json"), body("mlserver_pandas_response.json")
    )
    out = run(sample)
    assert out.adapter == "oip_v2"
    assert out.rows == [
        {"First Name": "Joanne", "Age": 34, "Income": 52000.5, "Member": True},
        {"First Name": "Michael", "Age": 22, "Income": None, "Member": False},
        {"First Name": "Ana", "Age": 41, "Income": 61000.0, "Member": True},
    ]
    assert out.predictions == [
        {"label": "<=50K", "score": 0.21},
        {"label": ">50K", "score": 0.77},
        {"label": ">50K", "score": 0.64},
    ]


def test_mlserver_pandas_codec_as_its_guide_writes_it() -> None:
    out = run(make("/v2/models/m/infer", body("mlserver_pandas_guide_request.json")))
    assert out.rows == [{"First Name": "Joanne", "Age": 34}, {"First Name": "Michael", "Age": 22}]


def test_mlserver_mlflow_wine_one_input_per_column() -> None:
    sample = make(
        "/v2/models/wine-classifier/infer",
        body("mlserver_mlflow_wine_request.json"),
        body("mlserver_mlflow_wine_response.json"),
    )
    out = run(sample)
    assert len(out.rows) == 1 and len(out.rows[0]) == 11
    assert out.rows[0]["volatile acidity"] == 0.7 and out.rows[0]["pH"] == 3.51
    assert out.predictions == [{"output-1": 5.576883936610762}]


def test_oip_v2_detected_by_body_on_any_path() -> None:
    out = run(make("/infer", body("mlserver_pandas_request.json")))
    assert out.adapter == "oip_v2" and len(out.rows) == 3


def test_oip_v2_prediction_named_like_a_feature_gets_a_prefix() -> None:
    request = '{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]}]}'
    response = '{"outputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [3, 4]}]}'
    out = run(make("/v2/models/echo/infer", request, response))
    assert out.rows == [{"x": 1}, {"x": 2}]
    assert out.predictions == [{"prediction.x": 3}, {"prediction.x": 4}]


def test_oip_v2_malformed_tensors_are_left_out() -> None:
    request = orjson.dumps(
        {
            "inputs": [
                {"name": "ok", "shape": [2], "datatype": "INT32", "data": [1, 2]},
                {"name": "short", "shape": [2, 2], "datatype": "INT32", "data": [1, 2, 3]},
                {"name": "negative", "shape": [-1], "datatype": "INT32", "data": [1]},
                {"name": "huge", "shape": [10**12, 10**12], "datatype": "FP32", "data": [1]},
                {"name": "bool shape", "shape": [True], "datatype": "BOOL", "data": [1]},
                {"name": 5, "shape": [1], "data": [1]},
                {"name": "nodata", "shape": [1], "datatype": "FP32"},
                {"name": "objects", "shape": [2], "datatype": "BYTES", "data": [{"a": 1}, "s"]},
                {"name": "flags", "shape": [2], "datatype": "BOOL", "data": [1, 0]},
                "not a tensor",
            ]
        }
    )
    out = run(make("/v2/models/m/infer", request))
    assert out.rows == [
        {"ok": 1, "objects": None, "flags": True},
        {"ok": 2, "objects": "s", "flags": False},
    ]


def test_oip_v2_scalar_tensor_and_empty_batch() -> None:
    request = '{"inputs": [{"name": "t", "shape": [], "datatype": "FP32", "data": 0.5}]}'
    assert run(make("/v2/models/m/infer", request)).rows == [{"t": 0.5}]
    request = '{"inputs": [{"name": "t", "shape": [0, 4], "datatype": "FP32", "data": []}]}'
    assert run(make("/v2/models/m/infer", request)).rows == []


# -- OpenAI-compatible


def test_openai_chat_plain() -> None:
    out = run(make("/v1/chat/completions", body("openai_chat_request.json"), body("openai_chat_response.json")))
    assert out.adapter == "openai"
    assert out.rows == [
        {
            "messages": 2,
            "prompt_chars": len("You are a helpful assistant.") + len("Hello!"),
            "max_tokens": 128,
            "temperature": 0.7,
            "model": "gpt-4o-mini",
        }
    ]
    assert out.predictions == [{"prompt_tokens": 9, "completion_tokens": 12, "finish_reason": "stop"}]
    assert out.usage == {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}
    assert out.finish_reason == "stop"


def test_openai_content_parts_and_a_stream_with_usage() -> None:
    sample = make(
        "/v1/chat/completions",
        body("openai_chat_parts_request.json"),
        body("openai_chat_stream_usage.sse"),
        response_stream=True,
    )
    out = run(sample)
    assert out.rows == [
        {"messages": 1, "prompt_chars": len("What's in this image?"), "max_tokens": 300, "model": "gpt-4o"}
    ]
    assert out.predictions == [{"prompt_tokens": 19, "completion_tokens": 10, "finish_reason": "stop"}]
    assert isinstance(out.response, list) and len(out.response) == 12
    # the stream leaves as whole events, [DONE] included
    assert out.response_body.endswith(b"\n\ndata: [DONE]\n\n")
    assert out.response_body.count(b"\n\n") == 13


def test_openai_truncated_stream_takes_usage_from_the_tail() -> None:
    stream = body("openai_chat_stream_usage.sse")
    events = stream.split(b"\n\n")
    head = b"\n\n".join(events[:3]) + b"\n\n"
    sample = make(
        "/v1/chat/completions",
        body("openai_chat_request.json"),
        head,
        response_stream=True,
        response_truncated=True,
        response_tail=stream[-700:],
    )
    out = run(sample)
    assert out.usage == {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29}
    assert out.finish_reason == "stop"
    assert out.predictions == [{"prompt_tokens": 19, "completion_tokens": 10, "finish_reason": "stop"}]


def test_openai_stream_without_usage() -> None:
    sample = make(
        "/v1/chat/completions", body("openai_chat_request.json"), body("openai_chat_stream.sse"), response_stream=True
    )
    out = run(sample)
    assert out.usage is None and out.predictions == [{"finish_reason": "length"}]


def test_openai_completions_and_embeddings() -> None:
    out = run(
        make("/v1/completions", body("openai_completions_request.json"), body("openai_completions_response.json"))
    )
    assert out.rows == [{"prompt_chars": 18, "max_tokens": 7, "temperature": 0, "model": "gpt-3.5-turbo-instruct"}]
    assert out.predictions == [{"prompt_tokens": 5, "completion_tokens": 7, "finish_reason": "length"}]
    out = run(make("/v1/embeddings", body("openai_embeddings_request.json"), body("openai_embeddings_response.json")))
    assert out.rows == [{"prompt_chars": 40, "model": "text-embedding-ada-002"}]
    assert out.predictions == [{"prompt_tokens": 8}]
    # a list prompt counts its strings; token arrays are not characters
    out = run(make("/v1/completions", '{"model": "m", "prompt": ["ab", "cde"]}'))
    assert out.rows == [{"prompt_chars": 5, "model": "m"}]
    out = run(make("/v1/completions", '{"model": "m", "prompt": [1, 2, 3]}'))
    assert out.rows == [{"model": "m"}]


def test_openai_detected_by_body_on_another_path() -> None:
    out = run(make("/openai/deployments/x/chat", body("openai_chat_request.json")))
    assert out.adapter == "openai"
    out = run(make("/openai/v1/chat/completions", '{"anything": 1}'))
    assert out.adapter == "openai" and out.rows == [{}]


def test_openai_max_completion_tokens_wins() -> None:
    request = '{"model": "m", "messages": [], "max_tokens": 5, "max_completion_tokens": 9}'
    assert run(make("/v1/chat/completions", request)).rows == [
        {"messages": 0, "prompt_chars": 0, "max_tokens": 9, "model": "m"}
    ]


# -- mapping


def test_mapping_rows_line_up_by_the_first_wildcard() -> None:
    request = orjson.dumps(
        {
            "meta": {"source": "web"},
            "data": {"rows": [{"age": 30, "home city": "Oslo"}, {"home city": "Rome"}, {"age": 41, "v": [1, 2]}]},
        }
    )
    response = orjson.dumps({"result": [{"score": 0.1}, {"score": 0.9}, {}]})
    out = run(
        make("/score", request, response),
        adapter="mapping",
        mapping={
            "age": "$.data.rows[*].age",
            "city": "$.data.rows[*]['home city']",
            "source": "$.meta.source",
            "v": "$.data.rows[*].v",
            "absent": "$.nope",
        },
        prediction_mapping={"score": "$.result[*].score"},
    )
    assert out.adapter == "mapping"
    assert out.rows == [
        {"source": "web", "age": 30, "city": "Oslo"},
        {"source": "web", "city": "Rome"},
        {"source": "web", "age": 41, "v[0]": 1, "v[1]": 2},
    ]
    assert out.predictions == [{"score": 0.1}, {"score": 0.9}, {}]


def test_mapping_without_wildcard_is_one_row() -> None:
    out = run(
        make("/x", '{"a": {"b": [5, 6, 7]}}'), adapter="mapping", mapping={"last": "$.a.b[-1]", "first": '$["a"].b[0]'}
    )
    assert out.rows == [{"last": 7, "first": 5}]
    out = run(make("/x", '{"a": 1}'), adapter="mapping", mapping={"x": "$.zz"})
    assert out.rows == []


def test_jsonpath_subset() -> None:
    doc = {"a": [{"b": 1}, {"b": 2}, {"c": 3}], "d": {"e": 4, "f": 5}}
    assert evaluate(parse_path("$").steps, doc) == [doc]
    assert evaluate(parse_path("$.a[*].b").steps, doc) == [1, 2]
    assert evaluate(parse_path("$.a.*.c").steps, doc) == [3]
    assert evaluate(parse_path("$.d.*").steps, doc) == [4, 5]
    assert evaluate(parse_path("$.a[1]").steps, doc) == [{"b": 2}]
    assert evaluate(parse_path("$.a[-3].b").steps, doc) == [1]
    assert evaluate(parse_path("$.a[3]").steps, doc) == []
    assert evaluate(parse_path("$['d']['e']").steps, doc) == [4]
    assert evaluate(parse_path("$.a.b").steps, doc) == []  # no implicit look-through: [*] says it
    assert parse_path("$.a[*].b[*]").wildcard == 1


@pytest.mark.parametrize("text", ["a.b", "$.", "$..a", "$.a[", "$.a[x]", "$[?(@.a)]", "$.a b", "$['a]"])
def test_jsonpath_outside_the_subset_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="JSON path"):
        parse_path(text)


def test_bad_mapping_path_is_a_config_error_naming_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy import config
    from proxy.errors import ConfigError
    from proxy.settings import ProxyConfig

    monkeypatch.setenv("INFERMON_SAMPLING__ADAPTER", "mapping")
    monkeypatch.setenv("INFERMON_SAMPLING__MAPPING", '{"age": "rows[*].age"}')
    with pytest.raises(ConfigError, match=r"sampling\.mapping[\s\S]*age: JSON path 'rows\[\*\]\.age' must start"):
        config.load(ProxyConfig)
    monkeypatch.setenv("INFERMON_SAMPLING__MAPPING", '{"a": "$.a"}')
    monkeypatch.setenv("INFERMON_SAMPLING__PREDICTION_MAPPING", '{"p": "$..p"}')
    with pytest.raises(ConfigError, match=r"sampling\.prediction_mapping[\s\S]*p: JSON path"):
        config.load(ProxyConfig)


# -- none, empty and non-JSON bodies


def test_none_adapter_keeps_bodies_only() -> None:
    out = run(make("/v1/models/m:predict", body("kserve_v1_iris_request.json"), b"not json"), adapter="none")
    assert out.adapter == "none" and out.rows == [] and out.predictions == []
    assert out.request is not None and out.response is None
    assert out.response_body == b"not json"
    out = run(make("/upload", b"\x89PNG\r\n", b"ok"), adapter="none")
    assert out.request_body == b"\x89PNG\r\n"


def test_bodies_that_cannot_be_redacted_do_not_leave() -> None:
    out = run(make("/upload", b"\x89PNG ssn=1", b"<html>ssn</html>"), adapter="none", redact_fields=["ssn"])
    assert out.request_body == b"" and out.response_body == b""
    out = run(make("/v1/models/m:predict", '{"instances": [1]}', b"<html>502</html>"), redact_fields=["ssn"])
    assert out.rows == [{"0": 1}] and out.response_body == b"" and out.predictions == []


def test_unknown_json_shape_is_adapter_none_under_auto() -> None:
    out = run(make("/whatever", '{"foo": [1, 2]}', '{"bar": 1}'))
    assert out.adapter == "none" and out.rows == [] and out.request == {"foo": [1, 2]}


def test_empty_request_is_no_rows_not_a_drop() -> None:
    out = run(make("/v2/models/m/infer", b"", body("oip_v2_response.json")))
    assert out.adapter == "oip_v2" and out.rows == [] and len(out.predictions) == 2
    out = run(make("/v1/models/m:predict", b"  \n"), adapter="kserve_v1")
    assert out.rows == [] and out.request_body == b""
    assert run(make("/health")).adapter == "none"


def test_non_json_request_is_unparsable() -> None:
    assert dropped(make("/v1/models/m:predict", b"instances=1")) == "unparsable"
    assert dropped(make("/v1/models/m:predict", b"\xff\xfe{}")) == "unparsable"
    assert dropped(make("/v1/models/m:predict", b'{"instances": ["\xff"]}')) == "unparsable"
    assert dropped(make("/v1/models/m:predict", b'{"instances": [NaN'), adapter="kserve_v1") == "unparsable"


@pytest.mark.parametrize(
    ("adapter", "request_body"),
    [
        ("kserve_v1", '{"inputs": []}'),
        ("kserve_v1", '{"instances": 5}'),
        ("kserve_v1", "[1, 2]"),
        ("tfserving", '{"messages": []}'),
        ("oip_v2", '{"inputs": {"a": [1]}}'),
        ("oip_v2", '"text"'),
        ("openai", '{"instances": [1]}'),
        ("openai", "[]"),
    ],
)
def test_explicit_adapter_refuses_another_shape(adapter: str, request_body: str) -> None:
    assert dropped(make("/x", request_body), adapter=adapter) == "unparsable"


def test_gzip_and_deflate_bodies_are_read() -> None:
    plain = body("mlserver_pandas_response.json")
    for coding, packed in (
        ("gzip", gzip.compress(plain)),
        ("deflate", zlib.compress(plain)),
        ("deflate", zlib.compress(plain)[2:-4]),  # raw deflate, as some servers send it
    ):
        sample = make(
            "/v2/models/m/infer",
            body("mlserver_pandas_request.json"),
            packed,
            response_headers=[("Content-Encoding", coding)],
        )
        out = run(sample)
        assert len(out.predictions) == 3, coding
        assert orjson.loads(out.response_body) == orjson.loads(plain)


def test_unreadable_or_oversized_coding_is_not_json() -> None:
    bomb = gzip.compress(b'{"predictions": [' + b"0," * 500_000 + b"0]}")
    sample = make("/v1/models/m:predict", '{"instances": [1]}', bomb, response_headers=[("content-encoding", "gzip")])
    out = run(sample, max_body_bytes=65_536)
    assert out.rows == [{"0": 1}] and out.predictions == [] and out.response is None
    sample = make(
        "/v1/models/m:predict", '{"instances": [1]}', b"\x00br", response_headers=[("content-encoding", "br")]
    )
    assert run(sample).response is None


# -- redaction


def test_redacted_fields_leave_no_trace_in_rows_nor_bodies() -> None:
    request = orjson.dumps({"instances": [{"age": 3, "ssn": "123-45-6789", "card": {"number": "4111"}}]})
    response = orjson.dumps({"predictions": [{"ssn": "x", "score": 0.5}]})
    out = run(make("/v1/models/m:predict", request, response), redact_fields=["ssn", "instances.card"])
    assert out.rows == [{"age": 3}]
    assert out.predictions == [{"score": 0.5}]
    assert b"123-45-6789" not in out.request_body and b"4111" not in out.request_body
    assert out.request == {"instances": [{"age": 3}]}
    assert b"ssn" not in out.response_body


def test_redacted_oip_v2_tensor_leaves_the_body() -> None:
    request = orjson.dumps(
        {
            "parameters": {"content_type": "pd"},
            "inputs": [
                {"name": "ssn", "shape": [2, 1], "datatype": "BYTES", "data": ["123-45-6789", "987-65-4321"]},
                {"name": "age", "shape": [2, 1], "datatype": "INT64", "data": [1, 2]},
            ],
        }
    )
    out = run(make("/v2/models/m/infer", request), redact_fields=["ssn"])
    assert out.rows == [{"age": 1}, {"age": 2}]
    assert b"123-45-6789" not in out.request_body and b"ssn" not in out.request_body


def test_redacted_column_of_numbers_is_nulled() -> None:
    columns = ["age", "ssn", "income"]
    request = '{"instances": [[30, 123456789, 5.5], [40, 987654321, 6.5]]}'
    out = run(make("/v1/models/m:predict", request), columns, redact_fields=["ssn"])
    assert out.rows == [{"age": 30, "income": 5.5}, {"age": 40, "income": 6.5}]
    assert orjson.loads(out.request_body) == {"instances": [[30, None, 5.5], [40, None, 6.5]]}
    data = [[30, 123456789, 5], [40, 987654321, 6]]
    tensor = orjson.dumps({"inputs": [{"name": "x", "shape": [2, 3], "datatype": "INT64", "data": data}]})
    out = run(make("/v2/models/m/infer", tensor), columns, redact_fields=["ssn"])
    assert out.rows == [{"age": 30, "income": 5}, {"age": 40, "income": 6}]
    assert orjson.loads(out.request_body)["inputs"][0]["data"] == [30, None, 5, 40, None, 6]


def test_redacted_prompt_is_not_measured() -> None:
    out = run(make("/v1/chat/completions", body("openai_chat_request.json")), redact_fields=["content"])
    assert out.rows == [{"messages": 2, "max_tokens": 128, "temperature": 0.7, "model": "gpt-4o-mini"}]
    assert b"helpful" not in out.request_body
    out = run(make("/v1/chat/completions", body("openai_chat_request.json")), redact_fields=["messages", "model"])
    assert out.rows == [{"max_tokens": 128, "temperature": 0.7}]


def test_redacted_usage_is_not_read_from_the_tail() -> None:
    stream = body("openai_chat_stream_usage.sse")
    sample = make(
        "/v1/chat/completions",
        body("openai_chat_request.json"),
        stream[:300],
        response_stream=True,
        response_truncated=True,
        response_tail=stream[-700:],
    )
    out = run(sample, redact_fields=["usage"])
    assert out.usage is None and out.predictions == [{"finish_reason": "stop"}]


def test_redaction_applies_inside_stream_events() -> None:
    sample = make(
        "/v1/chat/completions",
        body("openai_chat_request.json"),
        body("openai_chat_stream_usage.sse"),
        response_stream=True,
    )
    out = run(sample, redact_fields=["delta"])
    assert b"delta" not in out.response_body and b"Hello" not in out.response_body
    assert out.usage == {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29}


# -- bounds and hostile bodies


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def test_depth_bound() -> None:
    for path in ("/v1/models/m:predict", "/v2/models/m/infer", "/v1/chat/completions"):
        assert run(make(path, b'{"a": ' + nested(63) + b"}"), adapter="none").request is not None
        assert dropped(make(path, b'{"a": ' + nested(64) + b"}")) == "hostile"
        assert dropped(make(path, nested(10_000))) == "hostile"
        assert dropped(make(path, b'{"instances": [1]}', nested(10_000))) == "hostile"
    assert dropped(make("/x", b'{"a": ' + nested(5) + b"}"), max_depth=5) == "hostile"
    # the NaN-tolerant reader is bounded the same way
    assert dropped(make("/x", b"[" * 5000 + b"NaN" + b"]" * 5000)) == "hostile"
    assert dropped(make("/x", b"[" * 100 + b"NaN" + b"]" * 100)) == "hostile"


def test_element_bound() -> None:
    million = b"[" + b"0," * 1_000_000 + b"0]"
    assert dropped(make("/v1/models/m:predict", b'{"instances": ' + million + b"}")) == "hostile"
    assert dropped(make("/v1/models/m:predict", b'{"instances": [[1, 2]]}', million)) == "hostile"
    assert dropped(make("/x", orjson.dumps({"instances": [[1] * 10] * 10})), max_elements=100) == "hostile"
    # 1 (the object) + 1 (its key's value) + 8 (the rows) + 80 (their values)
    assert len(run(make("/x", orjson.dumps({"instances": [[1] * 10] * 8})), max_elements=90).rows) == 8


def test_parse_time_bound() -> None:
    request = orjson.dumps({"instances": [{"a": i, "b": [i, i]} for i in range(20_000)]})
    assert dropped(make("/v1/models/m:predict", request), max_parse_seconds=1e-6, max_rows=100_000) == "hostile"
    assert len(run(make("/v1/models/m:predict", request), max_parse_seconds=10, max_rows=100_000).rows) == 20_000


def test_row_bound_takes_the_first_rows() -> None:
    request = orjson.dumps({"instances": [[i] for i in range(100)]})
    response = orjson.dumps({"predictions": list(range(100))})
    out = run(make("/v1/models/m:predict", request, response), max_rows=5)
    assert out.rows == [{"0": i} for i in range(5)]
    assert out.predictions == [{"prediction": i} for i in range(5)]
    assert orjson.loads(out.request_body) == orjson.loads(request)  # the body itself is not cut
    tensor = orjson.dumps({"inputs": [{"name": "x", "shape": [100], "datatype": "FP32", "data": list(range(100))}]})
    assert len(run(make("/v2/models/m/infer", tensor), max_rows=7).rows) == 7


def test_huge_strings_are_clipped_in_features_only() -> None:
    huge = "x" * 1_000_000
    out = run(make("/v1/models/m:predict", orjson.dumps({"instances": [{"text": huge, huge: 1}]})))
    assert out.rows[0]["text"] == "x" * 256
    assert len(out.request_body) > 2_000_000
    out = run(make("/v1/chat/completions", orjson.dumps({"model": huge, "messages": [{"content": huge}]})))
    assert out.rows == [{"messages": 1, "prompt_chars": 1_000_000, "model": "x" * 256}]


WRONG_TYPES = [
    '{"instances": {"a": 1}}',
    '{"instances": "abc"}',
    '{"instances": [null, true, {"a": {"b": 1}}, [[[]]], [{"x": 1}]]}',
    '{"instances": [1], "signature_name": 5}',
    '{"inputs": {"a": {"b": 1}, "c": null}}',
    '{"inputs": 7}',
    '{"inputs": [{"name": "a", "shape": "x", "datatype": 3, "data": {}}]}',
    '{"inputs": [{"name": "a", "shape": [1e3], "datatype": "FP32", "data": [1]}]}',
    '{"inputs": [{"name": "a", "shape": [1, 2], "data": [[1], [2]]}]}',
    '{"messages": "hi", "model": 3}',
    '{"messages": [1, null, {"content": 5}, {"content": [1, {"text": 2}, "x"]}], "temperature": [1], '
    '"max_tokens": {"a": 1}}',
    '{"prompt": {"a": 1}, "model": null}',
    '{"input": [[1, 2]], "model": "m"}',
    "[]",
    "null",
    "123",
    '"string"',
    "{}",
]
WRONG_RESPONSES = [
    "",
    "[]",
    "5",
    '{"predictions": null}',
    '{"predictions": {"a": [1, {"b": 2}]}}',
    '{"outputs": [{"name": "o", "shape": [2], "data": [1]}]}',
    '{"outputs": {"a": 5}}',
    '{"usage": {"prompt_tokens": "5"}, "choices": "x"}',
    '{"choices": [{"finish_reason": 7}], "usage": []}',
    '{"error": "boom"}',
]


@pytest.mark.parametrize("request_body", WRONG_TYPES)
def test_wrong_types_everywhere_give_rows_or_a_drop(request_body: str) -> None:
    for path in ("/v1/models/m:predict", "/v2/models/m/infer", "/v1/chat/completions", "/x"):
        for response in WRONG_RESPONSES:
            for adapter in ("auto", "kserve_v1", "tfserving", "oip_v2", "openai", "none"):
                outcome = attempt(extractor(["a", "b"], adapter=adapter), make(path, request_body, response))
                assert outcome in ("ok", "unparsable")


def test_an_unexpected_error_is_unparsable() -> None:
    def broken() -> list[str] | None:
        raise RuntimeError("the reference went away")

    with pytest.raises(Dropped) as info:
        Extractor(Sampling(), broken).extract(make("/v1/models/m:predict", '{"instances": [1]}'))
    assert info.value.reason == "unparsable"
    assert isinstance(info.value.__cause__, RuntimeError)


# -- random bodies: only Dropped is ever raised


def attempt(ex: Extractor, sample: Sample) -> str:
    """ "ok" (the extraction checked) or the reason it was dropped; any other exception fails the test."""
    try:
        out = ex.extract(sample)
    except Dropped as exc:
        return exc.reason
    check(out)
    return "ok"


def check(out: Extracted) -> None:
    assert isinstance(out, Extracted)
    for rows in (out.rows, out.predictions):
        assert isinstance(rows, list)
        for row in rows:
            for key, value in row.items():
                assert isinstance(key, str)
                assert value is None or type(value) in (bool, int, float, str)
                assert type(value) is not str or len(value) <= 256
    if out.request is not None:
        orjson.loads(out.request_body)
    if out.response is not None and out.response_body and not out.response_body.startswith(b"data:"):
        orjson.loads(out.response_body)


KEYS = [
    "instances",
    "inputs",
    "outputs",
    "predictions",
    "messages",
    "prompt",
    "input",
    "model",
    "name",
    "shape",
    "datatype",
    "data",
    "content",
    "text",
    "usage",
    "choices",
    "finish_reason",
    "max_tokens",
    "temperature",
    "parameters",
    "content_type",
    "signature_name",
    "a",
    "ssn",
    "",
]
DATATYPES = ["BOOL", "UINT8", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES", "bogus"]


def random_value(rng: random.Random, depth: int) -> Any:
    choice = rng.random()
    if depth > 6 or choice < 0.35:
        return rng.choice(
            [
                None,
                True,
                False,
                0,
                -1,
                2**63 - 1,
                1.5,
                -0.0,
                1e308,
                "",
                "x",
                "ssn",
                "é\u2028",
                "[DONE]",
                18446744073709551615,
            ]
        )
    if choice < 0.55:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(6))]
    if choice < 0.65:  # a tensor
        n = rng.randrange(4)
        width = rng.randrange(1, 4)
        data = [random_value(rng, 7) for _ in range(n * width + rng.choice([0, 0, 0, 1, -1]))]
        shape = rng.choice([[n, width], [n * width], [n, width, 1], [], [-1], "x"])
        return {"name": rng.choice(KEYS), "shape": shape, "datatype": rng.choice(DATATYPES), "data": data}
    return {rng.choice(KEYS): random_value(rng, depth + 1) for _ in range(rng.randrange(6))}


def test_random_json_only_ever_raises_dropped() -> None:
    rng = random.Random(20240808)
    adapters: list[Adapter] = ["auto", "kserve_v1", "tfserving", "oip_v2", "openai", "mapping", "none"]
    paths = ["/v1/models/m:predict", "/v2/models/m/infer", "/v1/chat/completions", "/v1/embeddings", "/x"]
    extractors = {
        (adapter, redact): Extractor(
            Sampling(
                adapter=adapter,
                mapping={"a": "$.a", "rows": "$.instances[*].a", "deep": "$.*.*[0]"},
                prediction_mapping={"p": "$.predictions[*]"},
                redact_fields=["ssn", "inputs.name"] if redact else [],
                max_rows=50,
            ),
            lambda: ["a", "b"],
        )
        for adapter in adapters
        for redact in (False, True)
    }
    outcomes = {"ok": 0, "unparsable": 0, "hostile": 0}
    for _ in range(1500):
        request = {rng.choice(KEYS): random_value(rng, 1) for _ in range(rng.randrange(1, 5))}
        response = random_value(rng, 0)
        stream = rng.random() < 0.2
        request_bytes = orjson.dumps(request)
        response_bytes = (
            b"".join(b"data: " + orjson.dumps(random_value(rng, 2)) + b"\n\n" for _ in range(3))
            if stream
            else orjson.dumps(response)
        )
        if rng.random() < 0.2:  # cut or flip bytes
            request_bytes = request_bytes[: rng.randrange(len(request_bytes) + 1)]
        if rng.random() < 0.1 and response_bytes:
            flipped = bytearray(response_bytes)
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
            response_bytes = bytes(flipped)
        sample = make(
            rng.choice(paths),
            request_bytes,
            response_bytes,
            response_stream=stream,
            response_truncated=stream and rng.random() < 0.5,
            response_tail=response_bytes[-rng.randrange(1, 200) :] if stream else b"",
        )
        ex = extractors[(rng.choice(adapters), rng.random() < 0.5)]
        outcomes[attempt(ex, sample)] += 1
    assert outcomes["ok"] > 500 and outcomes["unparsable"] > 50


def test_mlserver_bytes_tensor_with_the_string_length_in_its_shape_is_one_categorical_column() -> None:
    """MLServer's content-type example (its docs, examples/content-type) sends a BYTES input of two
    strings with shape [2, 11]: the trailing dimension is the string length, not a feature axis.
    The column is categorical and must not be left out (one row per instance, BYTES categorical)."""
    request = {
        "inputs": [
            {"name": "parameters-np", "datatype": "INT32", "shape": [2, 2], "data": [1, 2, 3, 4],
             "parameters": {"content_type": "np"}},
            {"name": "parameters-str", "datatype": "BYTES", "shape": [2, 11],
             "data": ["hello world 😁", "bye bye 😁"], "parameters": {"content_type": "str"}},
        ],
        "parameters": {"content_type": "pd"},
    }  # fmt: skip
    out = run(make("/v2/models/content-type-example/infer", orjson.dumps(request)))
    assert out.adapter == "oip_v2"
    assert [row.get("parameters-str") for row in out.rows] == ["hello world 😁", "bye bye 😁"]
    assert [row["parameters-np[1]"] for row in out.rows] == [2, 4]
