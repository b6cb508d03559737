"""The head rules on their own: bytes and settings in, a prepared head or a rejection out (no sockets)."""

from __future__ import annotations

import pytest

from proxy.dataplane.exchange import Headers
from proxy.dataplane.heads import (
    CHUNKED,
    LENGTH,
    NO_BODY,
    UNTIL_CLOSE,
    HeadRules,
    RequestHead,
    connection_options,
    interim_head,
    prepare_request,
    prepare_response,
    response_framing,
    serialize_request,
)

RULES = HeadRules(b"x-request-id", max_request_body_bytes=1000)


def request(fields: list[tuple[str, str]], method: str = "POST", url: bytes = b"/infer", version: str = "1.1",
            keep_alive: bool = True) -> RequestHead:  # fmt: skip
    raw: Headers = [(k.encode(), v.encode()) for k, v in fields]
    return prepare_request(RULES, method, url, version, keep_alive, raw, "10.0.0.7")


def names(headers: Headers) -> list[str]:
    return [n.decode().lower() for n, _ in headers]


def value(headers: Headers, name: str) -> str | None:
    found = [v.decode() for n, v in headers if n.decode().lower() == name]
    return ", ".join(found) if found else None


def response(fields: list[tuple[str, str]], framing: int, *, http11: bool = True, head_only: bool = False,
             close: bool = False) -> tuple[str, bool, bool]:  # fmt: skip
    raw: Headers = [(k.encode(), v.encode()) for k, v in fields]
    wire, chunked, closing = prepare_response(
        RULES, 200, b"OK", raw, framing, request_id="rid-1", http11=http11, head_only=head_only, close=close
    )
    return wire.decode(), chunked, closing


# -- Connection options never strip framing or routing fields ---------------------------------------


@pytest.mark.parametrize(
    "protected",
    ["content-length", "Content-Length", "host", "x-forwarded-proto", "x-forwarded-for", "x-forwarded-host",
     "x-request-id", "transfer-encoding", "via", "forwarded", "x-forwarded-anything"],
)  # fmt: skip
def test_connection_option_naming_a_protected_field_is_ignored(protected: str) -> None:
    head = request(
        [("Host", "m"), ("Content-Length", "5"), ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "edge"),
         ("Forwarded", "for=1.2.3.4"), ("Connection", f"keep-alive, {protected}"), ("X-Other", "1")]
    )  # fmt: skip
    assert head.reject is None
    sent = names(head.headers)
    for field in ("host", "content-length", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-for",
                  "x-request-id", "via", "forwarded"):  # fmt: skip
        assert field in sent, field
    assert value(head.headers, "content-length") == "5"
    assert value(head.headers, "host") == "m"
    assert "connection" not in sent


def test_connection_option_naming_transfer_encoding_keeps_chunked_framing() -> None:
    head = request([("Host", "m"), ("Transfer-Encoding", "chunked"), ("Connection", "transfer-encoding")])
    assert head.reject is None and head.chunked
    assert value(head.headers, "transfer-encoding") == "chunked"


def test_connection_option_naming_an_ordinary_field_removes_it() -> None:
    head = request([("Host", "m"), ("X-Secret-Hop", "1"), ("Keep-Alive", "timeout=5"), ("Connection", "X-Secret-Hop")])
    assert "x-secret-hop" not in names(head.headers)
    assert "keep-alive" not in names(head.headers)


def test_connection_options_helper_is_shared_and_case_insensitive() -> None:
    assert connection_options([b"Close, X-A", b"HOST ,content-LENGTH, x-b"], RULES) == {b"x-a", b"x-b"}
    assert connection_options([b"upgrade"], RULES) == frozenset()


@pytest.mark.parametrize("protected", ["content-length", "transfer-encoding", "x-request-id", "date"])
def test_response_connection_option_naming_a_protected_field_is_ignored(protected: str) -> None:
    wire, _, _ = response(
        [("Content-Length", "2"), ("X-Request-Id", "up-1"), ("Date", "Tue, 01 Dec 2026 09:00:00 GMT"),
         ("Connection", protected), ("X-Drop", "1"), ("Connection", "x-drop")],
        LENGTH,
    )  # fmt: skip
    lines = wire.lower().split("\r\n")
    assert "content-length: 2" in lines
    assert "x-request-id: rid-1" in lines  # always the proxy's id
    assert sum(line.startswith("date:") for line in lines) == 1
    assert not any(line.startswith(("x-drop", "connection")) for line in lines)


def test_interim_response_drops_hop_by_hop_and_connection_named_fields() -> None:
    wire = interim_head(RULES, 103, b"Early Hints", [(b"Link", b"</a.css>; rel=preload"), (b"Connection", b"x-h"),
                                                       (b"X-H", b"1"), (b"Keep-Alive", b"5")])  # fmt: skip
    assert wire == b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"


# -- transfer codings on the response side ---------------------------------------------------------


def test_close_delimited_response_with_gzip_is_relabelled_gzip_chunked() -> None:
    wire, chunked, close = response([("Transfer-Encoding", "gzip")], UNTIL_CLOSE)
    assert chunked and not close
    assert "\r\nTransfer-Encoding: gzip, chunked\r\n" in wire


def test_transfer_encoding_lines_are_read_together() -> None:
    fields: Headers = [(b"Transfer-Encoding", b"gzip"), (b"Transfer-Encoding", b"chunked")]
    assert response_framing(200, fields, head_only=False) == CHUNKED
    wire, chunked, _ = response([("Transfer-Encoding", "gzip"), ("Transfer-Encoding", "chunked")], CHUNKED)
    assert chunked and "\r\nTransfer-Encoding: gzip, chunked\r\n" in wire
    assert wire.count("Transfer-Encoding") == 1


def test_framing_decisions() -> None:
    assert response_framing(200, [(b"Transfer-Encoding", b"gzip")], head_only=False) == UNTIL_CLOSE
    assert response_framing(200, [(b"Content-Length", b"3")], head_only=False) == LENGTH
    assert response_framing(200, [], head_only=False) == UNTIL_CLOSE
    assert response_framing(204, [(b"Content-Length", b"3")], head_only=False) == NO_BODY
    assert response_framing(304, [], head_only=False) == NO_BODY
    assert response_framing(200, [(b"Transfer-Encoding", b"chunked")], head_only=True) == NO_BODY


def test_head_response_announces_the_coding_a_get_would_have() -> None:
    wire, chunked, _ = response([("Transfer-Encoding", "gzip")], NO_BODY, head_only=True)
    assert not chunked
    assert "\r\nTransfer-Encoding: gzip, chunked\r\n" in wire


def test_http10_client_gets_no_transfer_encoding_and_a_close() -> None:
    wire, chunked, close = response([("Transfer-Encoding", "gzip, chunked")], CHUNKED, http11=False)
    assert not chunked and close
    assert "transfer-encoding" not in wire.lower()
    assert "\r\nConnection: close\r\n" in wire


def test_request_id_and_date_added_when_absent() -> None:
    wire, _, _ = response([("Content-Length", "0")], LENGTH)
    assert "\r\nx-request-id: rid-1\r\n" in wire
    assert "\r\nDate: " in wire


# -- requests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        ([("Host", "m"), ("Content-Length", "3"), ("Transfer-Encoding", "chunked")], 400),
        ([("Host", "m"), ("Transfer-Encoding", "chunked, gzip")], 400),
        ([("Host", "m"), ("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")], 400),
        ([], 400),
        ([("Host", "a"), ("Host", "b")], 400),
        ([("Host", "a b")], 400),
        ([("Host", "m"), ("Expect", "200-ok")], 417),
        ([("Host", "m"), ("Content-Length", "1001")], 413),
    ],
)
def test_request_rejections(fields: list[tuple[str, str]], status: int) -> None:
    head = request(fields)
    assert head.reject is not None and head.reject.status == status
    assert head.request_id  # an error answer still carries a request id


def test_connect_is_405_and_bad_target_400() -> None:
    head = request([("Host", "m")], method="CONNECT", url=b"m:443")
    assert head.reject is not None and head.reject.status == 405
    head = request([("Host", "m")], method="GET", url=b"infer")
    assert head.reject is not None and head.reject.status == 400


def test_absolute_form_target_becomes_origin_form_with_its_authority() -> None:
    head = request([("Host", "ignored")], url=b"http://model:8000/v2/models/m/infer?x=1")
    assert head.reject is None
    assert head.target == b"/v2/models/m/infer?x=1" and head.path == "/v2/models/m/infer"
    assert value(head.headers, "host") == "model:8000"


def test_forwarding_fields() -> None:
    head = request([("Host", "m"), ("X-Forwarded-For", "1.1.1.1"), ("X-Request-Id", "abc")])
    assert value(head.headers, "x-forwarded-for") == "1.1.1.1, 10.0.0.7"
    assert value(head.headers, "x-forwarded-proto") == "http"
    assert value(head.headers, "x-forwarded-host") == "m"
    assert value(head.headers, "x-request-id") == "abc" and head.request_id == "abc"
    assert value(head.headers, "via") == "1.1 infermon"


def test_http10_request_without_host_gets_the_chosen_upstreams_authority() -> None:
    head = request([], method="GET", url=b"/x", version="1.0", keep_alive=False)
    assert head.reject is None and head.close and head.host is None
    wire = serialize_request(head, b"model-b:9000")
    assert wire.startswith(b"GET /x HTTP/1.1\r\n")
    assert b"\r\nHost: model-b:9000\r\n" in wire
    assert b"x-forwarded-host" not in wire.lower()  # the client named no host


@pytest.mark.parametrize(
    ("method", "fields", "idempotent"),
    [
        ("GET", [], True),
        ("PUT", [], True),
        ("DELETE", [], True),
        ("POST", [], False),
        ("PATCH", [], False),
        ("POST", [("Idempotency-Key", '"k-1"')], True),
    ],
)
def test_idempotency(method: str, fields: list[tuple[str, str]], idempotent: bool) -> None:
    head = request([("Host", "m"), *fields], method=method)
    assert head.idempotent is idempotent
    if fields:
        assert value(head.headers, "idempotency-key") == '"k-1"'  # forwarded as it is


# -- review round: more of each class ------------------------------------------------------------


@pytest.mark.parametrize("field", ["idempotency-key", "expect"])
def test_fields_the_proxy_decides_on_cannot_be_stripped_by_connection(field: str) -> None:
    head = request([("Host", "m"), ("Idempotency-Key", "k-1"), ("Expect", "100-continue"), ("Connection", field)])
    assert value(head.headers, "idempotency-key") == "k-1" and head.idempotent
    assert value(head.headers, "expect") == "100-continue"


def test_more_than_one_host_is_400_in_http10_too() -> None:
    head = request([("Host", "a.example"), ("Host", "b.example")], method="GET", version="1.0")
    assert head.reject is not None and head.reject.status == 400


@pytest.mark.parametrize(
    ("url", "host", "target"),
    [
        (b"http://h?x=1", "h", b"/?x=1"),
        (b"http://h:81/p?q", "h:81", b"/p?q"),
        (b"HTTP://H/p", "H", b"/p"),
        (b"http://h#frag", "h", b"/#frag"),
    ],
)
def test_absolute_form_authority_ends_at_slash_query_or_fragment(url: bytes, host: str, target: bytes) -> None:
    head = request([("Host", "ignored")], method="GET", url=url)
    assert head.reject is None
    assert value(head.headers, "host") == host and head.target == target


@pytest.mark.parametrize("url", [b"http://user:pw@h/p", b"http:///p", b"http://a b/", b"https://"])
def test_absolute_form_without_a_valid_host_is_400(url: bytes) -> None:
    head = request([("Host", "m")], method="GET", url=url)
    assert head.reject is not None and head.reject.status == 400


def test_http10_absolute_form_uses_the_targets_authority() -> None:
    head = request([], method="GET", url=b"http://model:9000/x", version="1.0", keep_alive=False)
    assert head.reject is None and value(head.headers, "host") == "model:9000"
    assert b"\r\nHost: model:9000\r\n" in serialize_request(head, b"pool-default")
    assert serialize_request(head, b"pool-default").count(b"\r\nHost:") == 1


@pytest.mark.parametrize("version", ["2.0", "0.9", "1.2"])
def test_other_http_versions_are_505(version: str) -> None:
    head = request([("Host", "m")], method="GET", version=version)
    assert head.reject is not None and head.reject.status == 505


def test_http10_ignores_upgrade_and_expect() -> None:
    head = request(
        [("Upgrade", "websocket"), ("Connection", "upgrade"), ("Expect", "100-continue")], method="GET", version="1.0"
    )
    assert head.reject is None and not head.upgrade
    assert "upgrade" not in names(head.headers) and "expect" not in names(head.headers)
    head = request([("Expect", "something-else")], method="GET", version="1.0")
    assert head.reject is None  # ignored, not a 417


def test_asterisk_form_is_for_options_only() -> None:
    assert request([("Host", "m")], method="OPTIONS", url=b"*").reject is None
    head = request([("Host", "m")], method="GET", url=b"*")
    assert head.reject is not None and head.reject.status == 400


@pytest.mark.parametrize(
    "values", [[b"chunked", b"chunked"], [b"chunked, chunked"], [b"chunked, gzip"], [b"chunked", b"gzip"]]
)
def test_response_applying_chunked_twice_or_not_last_is_invalid(values: list[bytes]) -> None:
    from proxy.dataplane.heads import INVALID, framing_of

    assert framing_of(200, values, False, False) == INVALID
    assert response_framing(200, [(b"Transfer-Encoding", v) for v in values], head_only=False) == INVALID


def test_upstream_request_id_is_replaced_by_the_proxys() -> None:
    wire, _, _ = response([("X-Request-Id", "upstream-id"), ("Content-Length", "0")], LENGTH)
    assert "upstream-id" not in wire and wire.count("x-request-id: rid-1") == 1


def test_switching_head_keeps_upgrade_and_drops_other_hop_fields() -> None:
    from proxy.dataplane.heads import switching_head

    wire = switching_head(
        RULES,
        b"Switching Protocols",
        [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade, x-secret"), (b"X-Secret", b"1"),
         (b"Keep-Alive", b"5"), (b"Sec-WebSocket-Accept", b"abc")],
        "rid-9",
    )  # fmt: skip
    lines = wire.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 101 Switching Protocols"
    assert "Sec-WebSocket-Accept: abc" in lines and "Upgrade: websocket" in lines
    assert "Connection: Upgrade" in lines and "x-request-id: rid-9" in lines
    assert not any(line.lower().startswith(("x-secret", "keep-alive")) for line in lines)
    assert wire.endswith(b"\r\n\r\n")


def test_trailers_keep_only_what_may_be_a_trailer() -> None:
    from proxy.dataplane.heads import forward_trailers

    kept = forward_trailers(
        RULES,
        [(b"Connection", b"close"), (b"Transfer-Encoding", b"chunked"), (b"Keep-Alive", b"1"), (b"Trailer", b"x"),
         (b"x-request-id", b"spoof"), (b"Content-Length", b"9"), (b"grpc-status", b"0"), (b"X-Checksum", b"ab")],
    )  # fmt: skip
    assert kept == [(b"grpc-status", b"0"), (b"X-Checksum", b"ab")]
