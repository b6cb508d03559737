"""The probe file format: what a line may say, and the errors that name the file, the line and the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy import config
from proxy.errors import ConfigError
from proxy.probes import spec
from proxy.probes.spec import UNSET, ProbeFileError
from proxy.settings import ProxyConfig


def lines(*objs: Any) -> str:
    return "\n".join(o if isinstance(o, str) else orjson.dumps(o).decode() for o in objs) + "\n"


def error(text: str, **kw: Any) -> str:
    with pytest.raises(ProbeFileError) as info:
        spec.loads(text, "probes.jsonl", **kw)
    return str(info.value)


def test_a_line_with_defaults() -> None:
    [probe] = spec.loads(lines({"path": "/v1/models/m:predict", "body": {"instances": [[1, 2]]}}), "f")
    assert probe.name == "line-1"
    assert probe.method == "POST"  # a body: POST
    assert probe.target == b"/v1/models/m:predict"
    assert probe.body == b'{"instances":[[1,2]]}'
    assert probe.headers == ((b"content-type", b"application/json"),)
    assert probe.expect.status is None and probe.expect.json is UNSET and not probe.expect.needs_json


def test_get_without_body_and_body_text_as_it_is() -> None:
    a, b = spec.loads(
        lines(
            {"name": "ready", "path": "/v2/health/ready"},
            {"name": "csv", "path": "/predict", "body_text": "1,2,3\n", "headers": {"Content-Type": "text/csv"}},
        ),
        "f",
    )
    assert (a.method, a.body, a.headers) == ("GET", b"", ())
    assert (b.method, b.body, b.headers) == ("POST", b"1,2,3\n", ((b"content-type", b"text/csv"),))


def test_blank_lines_are_skipped_and_lines_keep_their_numbers() -> None:
    text = "\n" + lines({"path": "/a"}) + "   \n" + lines({"path": "/b"})
    a, b = spec.loads(text, "f")
    assert (a.line, a.name, b.line, b.name) == (2, "line-2", 4, "line-4")


def test_expectations_parse() -> None:
    [probe] = spec.loads(
        lines(
            {
                "path": "/x",
                "expect": {
                    "status": [200, 201],
                    "json": None,
                    "ignore": ["$.id", "$.items[*].ts"],
                    "rel_tol": 0.01,
                    "abs_tol": 0,
                    "label": [{"path": "$.p[0]", "value": "cat"}, {"path": "$.q[0]", "argmax": 2}],
                    "conditions": [{"path": "$.t", "type": ["string", "null"], "matches": "^a", "max_length": 9}],
                    "max_latency_ms": 250,
                },
            }
        ),
        "f",
    )
    e = probe.expect
    assert e.status == (200, 201)
    assert e.json is None and e.needs_json  # null is an expected document, not "no json"
    assert [p.text for p in e.ignore] == ["$.id", "$.items[*].ts"]
    assert (e.rel_tol, e.abs_tol, e.max_latency_ms) == (0.01, 0.0, 250.0)
    assert e.labels[0].value == "cat" and e.labels[1].argmax == 2
    assert e.conditions[0].type == ("string", "null") and e.conditions[0].max_length == 9


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"path": "/x", "expectt": {}}, "probes.jsonl:1: unknown key 'expectt' in the probe (known: name, method,"),
        ({"path": "/x", "expect": {"stauts": 200}}, "probes.jsonl:1: unknown key 'stauts' in expect (known: status,"),
        (
            {"path": "/x", "expect": {"conditions": [{"path": "$.a", "exist": True}]}},
            "probes.jsonl:1: unknown key 'exist' in expect.conditions[0]",
        ),
        ({"path": "/x", "expect": {"label": {"path": "$.a", "valeu": 1}}}, "unknown key 'valeu' in expect.label"),
        ({"body": {}}, "path is missing"),
        ({"path": "v1/models"}, "path must start with '/'"),
        ({"path": "/a b"}, "path must start with '/' and be ASCII without spaces"),
        ({"path": "/x", "method": "post"}, "method must be an HTTP method in capitals"),
        ({"path": "/x", "name": "has space"}, "name must be 1 to 64 letters"),
        ({"path": "/x", "body": 1, "body_text": "1"}, "not both"),
        ({"path": "/x", "expect": {"status": 700}}, "expect.status must be a status from 100 to 599"),
        ({"path": "/x", "expect": {"rel_tol": -1}}, "expect.rel_tol must be at least 0"),
        ({"path": "/x", "expect": {"max_latency_ms": 0}}, "expect.max_latency_ms must be above 0"),
        ({"path": "/x", "expect": {"ignore": ["id"]}}, "expect.ignore[0]: JSON path 'id' must start with '$'"),
        ({"path": "/x", "expect": {"label": {"path": "$.a"}}}, "needs one of value"),
        ({"path": "/x", "expect": {"conditions": [{"path": "$.a"}]}}, "nothing to check there"),
        ({"path": "/x", "expect": {"conditions": [{"path": "$.a", "type": "str"}]}}, "type must be one of string"),
        ({"path": "/x", "expect": {"conditions": [{"path": "$.a", "matches": "("}]}}, "not a regular expression"),
        ({"path": "/x", "headers": {"Content-Length": "3"}}, "header 'Content-Length' is set by the proxy"),
        ({"path": "/x", "headers": {"bad name": "v"}}, "not a valid HTTP field name"),
        # field names are case-insensitive: two Host lines are a request every server must refuse
        ({"path": "/x", "headers": {"Host": "a", "host": "b"}}, "header 'host' is given twice"),
        ({"path": "/x", "headers": {"X-Infermon-Probe": "p"}}, "header 'X-Infermon-Probe' is set by the proxy"),
        ([1, 2], "a probe is a JSON object, not a list"),
    ],
)
def test_bad_lines_name_the_file_the_line_and_the_key(obj: Any, message: str) -> None:
    assert message in error(lines(obj))


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"path": "/x", "name": "iris\n"}, "name must be 1 to 64 letters"),
        ({"path": "/x", "method": "GET\n"}, "method must be an HTTP method in capitals"),
        ({"path": "/x", "headers": {"x-model\n": "v"}}, "not a valid HTTP field name"),
    ],
)
def test_a_trailing_line_break_is_refused_where_it_would_be_sent(obj: Any, message: str) -> None:
    # the name goes out as x-infermon-probe, the method and header names into the request head: a
    # trailing LF there ends a header line early (a regular expression's $ matches before a final
    # newline, so each must match the whole string)
    assert message in error(lines(obj))


def test_malformed_json_names_the_line() -> None:
    text = lines({"path": "/ok"}) + '{"path": "/x", \n'
    message = error(text)
    assert message.startswith("probes.jsonl:2: not valid JSON")


def test_names_are_unique() -> None:
    message = error(lines({"name": "a", "path": "/x"}, {"name": "a", "path": "/y"}))
    assert message.startswith("probes.jsonl:2: probe name 'a' is used on line 1 already")


def test_the_number_of_probes_is_capped() -> None:
    text = lines(*({"path": f"/{i}"} for i in range(4)))
    assert "more than 3 probes" in error(text, max_probes=3)
    assert len(spec.loads(text, "f", max_probes=4)) == 4


def test_an_empty_file_is_an_error() -> None:
    assert error("\n\n") == "probes.jsonl: no probes in the file (one JSON object per line)"


def test_header_values_come_from_the_environment_and_are_never_shown() -> None:
    line = lines({"path": "/x", "headers": {"Authorization": "Bearer ${MODEL_TOKEN}"}})
    [probe] = spec.loads(line, "f", env={"MODEL_TOKEN": "s3cret"})
    assert probe.headers == ((b"authorization", b"Bearer s3cret"),)
    assert probe.raw["headers"] == {"Authorization": "Bearer ${MODEL_TOKEN}"}  # record writes it back as written
    assert "s3cret" not in repr(probe)
    message = error(line, env={})
    assert "header 'Authorization' uses ${MODEL_TOKEN}, which is not set in the environment" in message
    bad = lines({"path": "/x", "headers": {"Authorization": "Bearer ${T}"}})
    message = error(bad, env={"T": "abc\r\nX-Injected: 1"})
    assert "control character" in message and "abc" not in message
    message = error(lines({"path": "/x", "headers": {"Authorization": 12345}}))
    assert "must have a string value" in message and "12345" not in message


def test_nan_in_an_expected_answer_is_read() -> None:
    [probe] = spec.loads('{"path": "/x", "expect": {"json": {"v": NaN}}}\n', "f")
    assert probe.expect.json["v"] != probe.expect.json["v"]


def test_load_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ProbeFileError, match=r"none.jsonl: cannot read the probe file"):
        spec.load(tmp_path / "none.jsonl")


def test_the_examples_in_the_documentation_are_valid_probes() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "probes.md").read_text()
    examples = [line for line in doc.splitlines() if line.startswith('{"name": ')]
    assert len(examples) >= 6
    probes = spec.loads("\n".join(examples), "docs/probes.md", env={"MODEL_TOKEN": "t", "OPENAI_API_KEY": "k"})
    names = [p.name for p in probes]
    assert {"iris-v1", "iris-v2", "chat-hello", "ready"} <= set(names)


def test_the_configuration_reads_the_file_and_its_cap(tmp_path: Path) -> None:
    path = tmp_path / "probes.jsonl"
    path.write_text(lines(*({"path": f"/{i}"} for i in range(3))))
    cfg = config.load(ProxyConfig, env={}, flags={"probes.file": str(path)}, flag_names={"probes.file": "probes"})
    assert cfg.probes.file == str(path) and cfg.probes.interval == 30.0 and cfg.probes.readiness_failures is None
    with pytest.raises(ConfigError) as info:
        config.load(ProxyConfig, env={"INFERMON_PROBES__MAX_PROBES": "2"}, flags={"probes.file": str(path)})
    assert str(info.value).startswith(f"config error: probes.file = '{path}' (from flag --file): ")
    assert f"{path}:3: more than 2 probes" in str(info.value)
