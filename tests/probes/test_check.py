"""Matching an answer against a probe: tolerance edges, JSON paths in the report, every kind of check."""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest

from proxy.probes import check as c
from proxy.probes import spec
from proxy.probes.check import Outcome
from proxy.sampling.extract import parse_path


def probe(expect: dict[str, Any]) -> spec.Probe:
    return spec.parse_line({"name": "p", "path": "/x", "expect": expect}, 1, env={})


def run(expect: dict[str, Any], answer: Any, *, status: int = 200, duration: float = 0.01, **kw: Any) -> Outcome:
    body = answer if isinstance(answer, bytes) else orjson.dumps(answer)
    kw.setdefault("rel_tol", 0.0)
    kw.setdefault("abs_tol", 0.0)
    return c.check(probe(expect), status=status, body=body, duration=duration, **kw)


def mismatches(outcome: Outcome) -> list[dict[str, Any]]:
    return [m.to_dict() for m in outcome.mismatches]


# -- numbers and tolerances -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expected", "got", "rel", "abs_", "ok"),
    [
        (1.0, 1.0, 0.0, 0.0, True),
        (1.0, 1.0 + 1e-15, 0.0, 0.0, False),  # both 0: exact
        (100.0, 100.001, 1e-5, 0.0, True),  # 1e-5 relative of 100.001 is 0.00100001: just inside
        (100.0, 100.0011, 1e-5, 0.0, False),  # just outside
        (1e-9, 3e-9, 1e-5, 0.0, False),  # near zero a relative tolerance says nothing
        (1e-9, 3e-9, 1e-5, 1e-7, True),  # ... the absolute one does
        (0.0, 1e-7, 0.0, 1e-7, True),  # the absolute bound is inclusive
        (0.0, 1.1e-7, 0.0, 1e-7, False),
        (1, 1.0, 0.0, 0.0, True),  # JSON numbers: 1 and 1.0 are the same
        (1_700_000_000, 1_700_000_001, 1e-5, 1e-7, False),  # two integers (a count, a timestamp): exact
        (3, 3.00001, 1e-5, 0.0, True),  # an integer and a float: the tolerance
        (-2.5, 2.5, 1.0, 0.0, False),
    ],
)
def test_number_tolerance_edges(expected: float, got: float, rel: float, abs_: float, ok: bool) -> None:
    outcome = run({"json": {"v": expected}}, {"v": got}, rel_tol=rel, abs_tol=abs_)
    assert outcome.ok is ok, outcome.reason


def test_integers_beyond_64_bits_agree_only_when_equal() -> None:
    # JSON integers of any size (RFC 8259 sets no limit): orjson reads one beyond 64 bits as a float,
    # which let two different ones agree within a relative tolerance
    big = 123456789012345678901234567890
    assert not run({"json": {"v": big}}, b'{"v": 123456789012345678901234567891}', rel_tol=1e-5).ok
    assert run({"json": {"v": big}}, b'{"v": 123456789012345678901234567890}', rel_tol=1e-5).ok
    [p] = spec.loads('{"path": "/x", "expect": {"json": {"v": 123456789012345678901234567890}}}', "f")
    assert p.expect.json == {"v": big} and type(p.expect.json["v"]) is int
    assert c.differences([{"id": big}, {"id": big + 1}], 1e-5, 1e-7) == ["$.id"]  # record ignores it


def test_an_integer_beyond_the_range_of_a_float_is_a_mismatch_not_a_broken_check() -> None:
    huge = b"1" + b"0" * 400
    for expected in (1.5, 10**400 + 1, math.nan):
        out = run({"json": {"v": expected}}, b'{"v": ' + huge + b"}", rel_tol=1e-5, abs_tol=1e-7)
        assert [m["check"] for m in mismatches(out)] == ["json"], out.reason
    assert c.differences([[10**400], [1.5]], 1e-5, 1e-7) == ["$[0]"]


def test_the_probe_s_own_tolerances_win_over_the_defaults() -> None:
    assert run({"json": [1.0], "rel_tol": 0.1}, [1.05], rel_tol=0.0).ok
    assert not run({"json": [1.0], "rel_tol": 0.0}, [1.05], rel_tol=0.1).ok


def test_nan_matches_nan_and_nothing_else() -> None:
    nan_body = b'{"v": NaN}'
    assert run({"json": {"v": math.nan}}, nan_body).ok
    assert not run({"json": {"v": 1.0}}, nan_body).ok
    assert not run({"json": {"v": math.nan}}, {"v": 1.0}).ok


def test_booleans_are_not_numbers() -> None:
    out = run({"json": {"v": 1}}, {"v": True})
    assert mismatches(out) == [{"check": "json", "path": "$.v", "expected": 1, "got": True}]


# -- the report: paths, expected, got -------------------------------------------------------------


def test_a_wrong_number_is_reported_at_its_path() -> None:
    out = run(
        {"json": {"predictions": [[0.97, 0.02, 0.01]]}},
        {"predictions": [[0.97, 0.9, 0.01]]},
        rel_tol=1e-5,
        abs_tol=1e-7,
    )
    assert not out.ok
    [m] = mismatches(out)
    assert (m["check"], m["path"], m["expected"], m["got"]) == ("json", "$.predictions[0][1]", 0.02, 0.9)
    assert "differs by 0.88" in m["detail"]
    assert out.reason.startswith("json $.predictions[0][1]: expected 0.02, got 0.9")


def test_missing_extra_and_odd_keys() -> None:
    out = run({"json": {"a b": 1, "gone": 2}}, {"a b": 2, "new": 3})
    assert [(m["path"], m["expected"], m["got"]) for m in mismatches(out)] == [
        ("$['a b']", 1, 2),
        ("$.gone", 2, "<missing>"),
        ("$.new", "<absent>", 3),
    ]


@pytest.mark.parametrize("key", ["it's", "a b", "model-name", "a.b", "", "0", "abc\n", "x]['y", 'say "hi"'])
def test_a_reported_path_reads_back_as_the_same_path(key: str) -> None:
    # what /probes and probe check show is what an ignore or a condition accepts (and what record
    # writes into expect.ignore): the same key, whatever characters it holds
    text = c.path_text((key, 0))
    assert parse_path(text).steps == (key, 0), text
    [m] = mismatches(run({"json": {key: [1]}}, {key: [2]}))
    assert m["path"] == text


def test_a_key_the_path_syntax_cannot_write_is_left_out_by_its_parent() -> None:
    # the path syntax has no escapes: a key holding both quotes has no path; record then leaves out
    # the object that holds it, never a path the probe file refuses
    key = 'it\'s "x"'
    a, b = {"meta": {key: 1, "k": "a"}}, {"meta": {key: 2, "k": "a"}}
    assert c.differences([a, b], 0.0, 0.0) == ["$.meta"]
    assert c.path_text(("meta", key)) == "$.meta['it\\'s \"x\"']"  # shown as RFC 9535 writes it


def test_lists_of_another_length_and_other_types() -> None:
    out = run({"json": {"p": [1, 2, 3], "q": {"x": 1}}}, {"p": [1, 5], "q": [1]})
    assert [(m["path"], m["expected"], m["got"]) for m in mismatches(out)] == [
        ("$.p", "<a list of 3>", "<a list of 2>"),
        ("$.p[1]", 2, 5),
        ("$.q", "<an object of 1 keys>", "<a list of 1>"),
    ]


def test_ignored_paths_are_not_compared() -> None:
    expect = {
        "json": {"id": "a", "items": [{"ts": 1, "v": 1}, {"ts": 2, "v": 2}], "tail": [0, 0]},
        "ignore": ["$.id", "$.items[*].ts", "$.tail[-1]"],
    }
    assert run(expect, {"id": "b", "items": [{"ts": 9, "v": 1}, {"ts": 8, "v": 2}], "tail": [0, 7]}).ok
    out = run(expect, {"id": "b", "items": [{"ts": 9, "v": 1}, {"ts": 8, "v": 3}], "tail": [7, 7]})
    assert [m["path"] for m in mismatches(out)] == ["$.items[1].v", "$.tail[0]"]
    assert run({"json": {"a": 1}, "ignore": ["$.extra"]}, {"a": 1, "extra": 2}).ok  # an extra ignored key


def test_an_answer_that_differs_as_a_whole_is_ignored_as_a_whole() -> None:
    # probe record writes $ when repeated answers differ at the root (a bare sampled string, a list
    # of generated tokens of another length): the comparison then leaves the whole answer out
    assert c.differences([[1, 2, 3], [1, 2]], 0.0, 0.0) == ["$"]
    assert c.differences(["sampled a", "sampled b"], 0.0, 0.0) == ["$"]
    assert run({"json": [1, 2, 3], "ignore": ["$"]}, [4]).ok
    assert run({"json": "sampled a", "ignore": ["$"]}, "sampled c").ok
    assert not run({"json": "sampled a", "ignore": ["$"]}, "x", status=500).ok  # the other checks still hold


def test_mismatches_are_capped_and_counted() -> None:
    out = run({"json": list(range(50))}, [x + 1 for x in range(50)])
    assert len(out.mismatches) == c.MAX_MISMATCHES and out.more == 50 - c.MAX_MISMATCHES
    assert out.reason.endswith(f"(and {50 - 1} more)")


def test_long_values_are_cut_in_the_report() -> None:
    out = run({"json": {"t": "a"}}, {"t": "b" * 1000})
    got = mismatches(out)[0]["got"]
    assert isinstance(got, str) and len(got) == c.MAX_SHOWN + 3
    orjson.dumps(mismatches(run({"json": [1]}, b"[NaN]")))  # what /probes shows is always valid JSON


def test_a_token_the_answer_echoes_is_never_shown() -> None:
    # a server that echoes the caller's credentials: what /probes, the log line and probe check show
    # of a failing answer never holds the value of a ${NAME} the probe's headers use
    token = "s3cret-token-from-the-environment"
    line = {"name": "p", "path": "/x", "headers": {"Authorization": "Bearer ${TOKEN}"}}
    p = spec.parse_line({**line, "expect": {"json": {"user": "a", "n": 1}}}, 1, env={"TOKEN": token})
    echo = {"user": f"Bearer {token}", "n": 2, "extra": {"auth": token}}
    out = c.check(p, status=200, body=orjson.dumps(echo), duration=0.01, rel_tol=0.0, abs_tol=0.0)
    shown = [(m["path"], m["got"]) for m in mismatches(out)]
    assert shown == [
        ("$.user", "<redacted: holds ${TOKEN}>"),
        ("$.n", 2),
        ("$.extra", "<redacted: holds ${TOKEN}>"),
    ]
    error = orjson.dumps({"error": f"token {token} has expired"})
    out = c.check(p, status=401, body=error, duration=0.01, rel_tol=0.0, abs_tol=0.0)
    assert token not in out.reason and "redacted" in out.reason
    assert token not in orjson.dumps(out.to_dict()).decode()
    cut = orjson.dumps({"error": "x" * (c.MAX_SHOWN - 20) + token})  # straddling the cut
    out = c.check(p, status=401, body=cut, duration=0.01, rel_tol=0.0, abs_tol=0.0)
    assert token[:12] not in out.reason


# -- status, latency, body ------------------------------------------------------------------------


def test_status_defaults_to_any_2xx_and_stops_the_body_checks() -> None:
    assert run({}, {}, status=204).ok
    out = run({"json": {"a": 1}}, {"error": "model not loaded"}, status=500)
    [m] = mismatches(out)
    assert (m["check"], m["expected"], m["got"]) == ("status", "<2xx>", 500)
    assert "model not loaded" in m["detail"]
    assert run({"status": [200, 404]}, {}, status=404).ok
    assert mismatches(run({"status": 201}, {}, status=200))[0]["expected"] == 201


def test_latency_bound() -> None:
    assert run({"max_latency_ms": 100}, {}, duration=0.1).ok  # inclusive
    out = run({"max_latency_ms": 100}, {}, duration=0.25)
    assert [(m["check"], m["expected"], m["got"]) for m in mismatches(out)] == [
        ("latency", "<at most 100 ms>", "<250.0 ms>")
    ]


def test_a_body_that_is_not_json() -> None:
    out = run({"json": {}}, b"<html>oops</html>")
    expected = {"check": "body", "path": "$", "expected": "<a JSON answer>", "got": "<html>oops</html>"}
    assert mismatches(out) == [expected]
    assert run({}, b"<html>fine</html>").ok  # nothing asked of the body
    out = c.check(probe({"json": {}}), status=200, body=b"{", duration=0, truncated=True, rel_tol=0, abs_tol=0)
    assert mismatches(out)[0]["got"] == "<a body over the size limit, cut>"


def test_an_error_is_a_failure_with_its_reason() -> None:
    out = c.check(
        probe({}), status=0, body=b"", duration=2.0, error_kind="timeout", error="no answer in 2 s", rel_tol=0,
        abs_tol=0,
    )  # fmt: skip
    assert not out.ok and out.reason == "timeout: no answer in 2 s"
    assert out.to_dict()["error"] == {"kind": "timeout", "reason": "no answer in 2 s"}


# -- labels and conditions ------------------------------------------------------------------------


def test_class_label_by_value_and_by_argmax() -> None:
    assert run({"label": {"path": "$.predictions[0]", "value": "setosa"}}, {"predictions": ["setosa"]}).ok
    out = run({"label": {"path": "$.predictions[0]", "value": "setosa"}}, {"predictions": ["virginica"]})
    assert mismatches(out) == [{"check": "label", "path": "$.predictions[0]", "expected": "setosa", "got": "virginica"}]
    assert run({"label": {"path": "$.predictions[0]", "argmax": 0}}, {"predictions": [[0.97, 0.02, 0.01]]}).ok
    out = run({"label": {"path": "$.predictions[*]", "argmax": 0}}, {"predictions": [[0.9, 0.1], [0.2, 0.8]]})
    [m] = mismatches(out)
    assert (m["path"], m["expected"], m["got"]) == ("$.predictions[1]", 0, 1)
    out = run({"label": {"path": "$.predictions[0]", "value": 1}}, {"predictions": []})
    assert mismatches(out)[0]["got"] == "<missing>"
    assert run({"label": {"path": "$.p", "value": 2}}, {"p": 2.0}).ok


def test_conditions() -> None:
    chat = {
        "choices": [{"message": {"content": "Hello there"}, "finish_reason": "stop"}],
        "usage": {"completion_tokens": 3},
    }
    good = [
        {"path": "$.choices[0].message.content", "type": "string", "min_length": 1, "matches": "(?i)hello"},
        {"path": "$.choices[*].finish_reason", "one_of": ["stop", "eos"]},
        {"path": "$.usage.completion_tokens", "min": 1, "max": 512, "type": "integer"},
        {"path": "$.error", "exists": False},
        {"path": "$.choices", "max_length": 1},
    ]
    assert run({"conditions": good}, chat).ok
    bad = {
        "choices": [{"message": {"content": ""}, "finish_reason": "length"}],
        "usage": {"completion_tokens": 0},
        "error": "x",
    }
    out = run({"conditions": good}, bad)
    assert [(m["path"], m["detail"]) for m in mismatches(out)] == [
        ("$.choices[0].message.content", "length 0"),
        ("$.choices[0].message.content", "matches"),
        ("$.choices[0].finish_reason", "one_of"),
        ("$.usage.completion_tokens", "min"),
        ("$.error", "exists: false"),
    ]
    out = run({"conditions": [{"path": "$.nothing", "type": "string"}]}, chat)
    assert mismatches(out) == [{"check": "condition", "path": "$.nothing", "expected": "<a value>", "got": "<missing>"}]
    out = run({"conditions": [{"path": "$.usage.completion_tokens", "type": "string"}]}, chat)
    assert mismatches(out)[0]["detail"] == "type integer"
    assert run({"conditions": [{"path": "$.v", "equals": 0.5}]}, {"v": 0.5000001}, rel_tol=1e-5).ok


def test_differences_between_repeated_answers() -> None:
    a = {"id": "1", "created": 5, "choices": [{"text": "x"}], "model": "m", "p": [0.5]}
    b = {"id": "2", "created": 6, "choices": [{"text": "y"}], "model": "m", "p": [0.5 + 1e-12]}
    assert c.differences([a, b, a], 1e-5, 1e-7) == ["$.choices[0].text", "$.created", "$.id"]
    assert c.differences([a], 1e-5, 1e-7) == []
