"""Redaction of JSON fields (names anywhere, dotted paths exactly, through lists) and header fields."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.sampling.redact import SECRET_HEADERS, Redactor


def test_a_name_is_removed_at_any_depth_and_through_lists() -> None:
    body: dict[str, Any] = {
        "ssn": "1",
        "instances": [{"ssn": "2", "age": 3}, [{"deep": {"ssn": "4", "keep": 5}}]],
        "nested": {"a": {"b": {"ssn": None}}},
    }
    assert Redactor(["ssn"]).redact(body) == {
        "instances": [{"age": 3}, [{"deep": {"keep": 5}}]],
        "nested": {"a": {"b": {}}},
    }


def test_a_value_equal_to_a_name_is_kept() -> None:
    body = {"role": "ssn", "tags": ["ssn"]}
    assert Redactor(["ssn"]).redact(body) == {"role": "ssn", "tags": ["ssn"]}


def test_a_dotted_path_removes_exactly_that_key() -> None:
    body = {
        "customer": {"address": {"zip": "12345", "city": "Oslo"}, "zip": "kept"},
        "zip": "kept too",
        "other": {"customer": {"address": {"zip": "kept: not from the root"}}},
    }
    assert Redactor(["customer.address.zip"]).redact(body) == {
        "customer": {"address": {"city": "Oslo"}, "zip": "kept"},
        "zip": "kept too",
        "other": {"customer": {"address": {"zip": "kept: not from the root"}}},
    }


def test_a_dotted_path_looks_through_lists() -> None:
    body = {"instances": [{"ssn": 1, "age": 2}, {"ssn": 3}, 7, [{"ssn": 4}]], "ssn": "top"}
    assert Redactor(["instances.ssn"]).redact(body) == {
        "instances": [{"age": 2}, {}, 7, [{}]],
        "ssn": "top",
    }


def test_a_path_whose_parent_is_missing_or_a_scalar_is_harmless() -> None:
    body = {"a": 1, "b": [1, 2], "c": {"d": "x"}}
    assert Redactor(["a.b", "b.c", "c.d.e", "zz.y"]).redact(body) == {"a": 1, "b": [1, 2], "c": {"d": "x"}}


def test_names_and_paths_together_and_a_list_root() -> None:
    body = [{"messages": [{"role": "user", "content": "secret", "name": "bob"}], "user": "u1"}]
    assert Redactor(["user", "messages.content"]).redact(body) == [{"messages": [{"role": "user", "name": "bob"}]}]


def test_without_fields_nothing_changes_and_scalars_pass() -> None:
    body = {"a": {"b": 1}}
    assert Redactor([]).redact(body) is body and body == {"a": {"b": 1}}
    assert Redactor(["a"]).redact("text") == "text"
    assert Redactor(["a"]).redact(None) is None
    assert not Redactor([]).active and Redactor(["a.b"]).active and Redactor(["a"]).active


def test_very_deep_bodies_need_no_recursion() -> None:
    depth = 100_000
    body: Any = {"ssn": 1}
    for _ in range(depth):
        body = [{"x": body}]
    Redactor(["ssn"]).redact(body)
    node = body
    for _ in range(depth):
        node = node[0]["x"]
    assert node == {}


def test_removes_and_covers() -> None:
    redactor = Redactor(["ssn", "messages.content", "a.b.c"])
    assert redactor.removes("ssn") and redactor.removes("ssn[3]")
    assert not redactor.removes("ssn_x") and not redactor.removes("[ssn]") and not redactor.removes("content")
    assert redactor.covers(("messages", "content"))
    assert redactor.covers(("messages", "content", "text"))
    assert redactor.covers(("x", "ssn", "y"))
    assert redactor.covers(("a", "b", "c"))
    assert not redactor.covers(("a", "b"))
    assert not redactor.covers(("messages",))
    assert not redactor.covers(("content",))
    assert not Redactor([]).removes("x")


@pytest.mark.parametrize("field", ["", ".", "a.", ".a", "a..b"])
def test_a_bad_field_is_a_config_error_naming_the_key(field: str) -> None:
    with pytest.raises(ValueError, match=r"sampling\.redact_fields"):
        Redactor([field])


def test_secret_headers_always_go() -> None:
    fields = [(name.upper() if i % 2 else name, "v") for i, name in enumerate(sorted(SECRET_HEADERS))]
    fields += [("Content-Type", "application/json"), ("X-Request-Id", "r1")]
    assert Redactor([]).headers(fields) == [("Content-Type", "application/json"), ("X-Request-Id", "r1")]


def test_configured_headers_go_case_insensitively() -> None:
    redactor = Redactor([], headers=["X-Tenant", "user-agent"])
    fields = [("x-tenant", "t"), ("User-Agent", "curl"), ("Cookie", "c"), ("Accept", "*/*")]
    assert redactor.headers(fields) == [("Accept", "*/*")]


def test_the_secret_set() -> None:
    assert {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-api-key",
        "api-key",
        "x-auth-token",
    } == SECRET_HEADERS
