"""OpenAI-compatible bodies read without a full parse: SSE, usage in a capped tail, the model scan."""

from __future__ import annotations

import gc
import math
import random
import time
from pathlib import Path

import orjson
import pytest

from proxy.sampling.llm import (
    MAX_MODEL_CHARS,
    parse_sse,
    response_usage,
    scan_model,
    sse_data,
    stream_usage,
    usage_from_tail,
)

BODIES = Path(__file__).parent / "bodies"
USAGE_STREAM = (BODIES / "openai_chat_stream_usage.sse").read_bytes()
PLAIN_STREAM = (BODIES / "openai_chat_stream.sse").read_bytes()
CHAT = (BODIES / "openai_chat_response.json").read_bytes()
STREAM_USAGE = {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29}


# -- Server-Sent Events, as the specification reads them


def test_sse_line_ends_lf_crlf_cr_all_end_lines() -> None:
    assert sse_data(b"data: a\n\ndata: b\r\n\r\ndata: c\r\rdata: d\r\n\n") == ["a", "b", "c", "d"]


def test_sse_data_fields_of_one_event_are_joined_with_newlines() -> None:
    assert sse_data(b"data: first\ndata: second\ndata:third\n\n") == ["first\nsecond\nthird"]


def test_sse_one_space_after_the_colon_is_dropped_no_more() -> None:
    assert sse_data(b"data:  two\n\ndata:none\n\n") == [" two", "none"]


def test_sse_a_field_without_colon_has_an_empty_value() -> None:
    # "data" alone appends an empty line: the event's data is "" and it is dispatched
    assert sse_data(b"data\n\n") == [""]
    assert sse_data(b"data\ndata\n\n") == ["\n"]


def test_sse_comments_and_other_fields_are_skipped() -> None:
    body = b": keep-alive\n\nevent: message\nid: 7\nretry: 100\ndata: x\n\n:another\ndata: y\n\n"
    assert sse_data(body) == ["x", "y"]


def test_sse_events_without_data_are_not_dispatched() -> None:
    assert sse_data(b"event: ping\n\nid: 3\n\n\n\ndata: z\n\n") == ["z"]


def test_sse_an_unfinished_last_event_is_left_out() -> None:
    assert sse_data(b"data: done\n\ndata: half") == ["done"]
    assert sse_data(b"data: done\n\ndata: half\n") == ["done"]


def test_sse_byte_order_mark_and_bad_utf8() -> None:
    assert sse_data(b"\xef\xbb\xbfdata: a\n\n") == ["a"]
    assert sse_data(b"data: \xff\n\n") == ["\ufffd"]


def test_sse_field_names_are_exact() -> None:
    # "Data" and "data " are other fields
    assert sse_data(b"Data: a\n\ndata : b\n\ndata: c\n\n") == ["c"]


def test_parse_sse_skips_done_and_non_json() -> None:
    assert parse_sse(b'data: {"a": 1}\n\ndata: not json\n\ndata: [DONE]\n\n') == [{"a": 1}]


def test_parse_sse_multi_line_json() -> None:
    assert parse_sse(b'data: {"a":\ndata: [1, 2]}\n\n') == [{"a": [1, 2]}]


# -- usage and finish_reason


def test_stream_usage_from_the_include_usage_chunk() -> None:
    events = parse_sse(USAGE_STREAM)
    assert len(events) == 12
    assert stream_usage(events) == (STREAM_USAGE, "stop")


def test_stream_without_usage_still_has_finish_reason() -> None:
    assert stream_usage(parse_sse(PLAIN_STREAM)) == (None, "length")


def test_stream_running_usage_on_every_chunk_takes_the_last() -> None:
    chunks = [
        {"choices": [{"delta": {}, "finish_reason": None}], "usage": {"prompt_tokens": 5, "completion_tokens": 1}}
    ]
    body = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks)
    body += b'data: {"choices":[{"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\n'
    assert usage_from_tail(body, stream=True) == ({"prompt_tokens": 5, "completion_tokens": 2}, "stop")


def test_response_usage_plain() -> None:
    assert response_usage(orjson.loads(CHAT)) == (
        {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21},
        "stop",
    )


def test_usage_counts_are_non_negative_ints_only() -> None:
    response = {"usage": {"prompt_tokens": "9", "completion_tokens": -1, "total_tokens": True}, "choices": [7]}
    assert response_usage(response) == (None, None)
    assert response_usage({"usage": {"prompt_tokens": 3, "completion_tokens": 1.5}}) == ({"prompt_tokens": 3}, None)


def test_usage_from_whole_plain_body() -> None:
    assert usage_from_tail(CHAT, stream=False) == (
        {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21},
        "stop",
    )


def test_usage_from_every_tail_of_a_plain_body() -> None:
    body = orjson.dumps(
        {
            "id": "chatcmpl-1",
            "choices": [{"index": 0, "message": {"content": "word " * 200}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 200, "total_tokens": 211, "x": {"y": 1}},
        }
    )
    whole = {"prompt_tokens": 11, "completion_tokens": 200, "total_tokens": 211}
    start_of_usage = body.rfind(b'"usage"')
    for cut in range(len(body) + 1):
        usage, reason = usage_from_tail(body[cut:], stream=False)
        if cut <= start_of_usage:
            assert usage == whole, cut
        else:
            assert usage is None, cut
        if cut <= body.find(b'"finish_reason"'):
            assert reason == "length", cut


def test_usage_in_escaped_content_is_not_taken() -> None:
    # a model may write the word usage in quotes: JSON escapes those quotes, the scan does not see a key
    body = orjson.dumps(
        {
            "usage": {"prompt_tokens": 4, "completion_tokens": 6},
            "choices": [{"message": {"content": 'the "usage": {"prompt_tokens": 999} and "finish_reason": "x"'}}],
        }
    )
    usage, reason = usage_from_tail(body[1:], stream=False)
    assert usage == {"prompt_tokens": 4, "completion_tokens": 6}
    assert reason is None


def test_embeddings_usage_has_no_completion_tokens() -> None:
    body = (BODIES / "openai_embeddings_response.json").read_bytes()
    assert usage_from_tail(body, stream=False) == ({"prompt_tokens": 8, "total_tokens": 8}, None)


def test_usage_from_every_tail_of_a_stream() -> None:
    usage_event = USAGE_STREAM.rfind(b"data: {")
    finish_event = USAGE_STREAM.rfind(b"data: {", 0, usage_event)
    for cut in range(len(USAGE_STREAM) + 1):
        usage, reason = usage_from_tail(USAGE_STREAM[cut:], stream=True)
        assert usage == (STREAM_USAGE if cut <= usage_event else None), cut
        assert reason == ("stop" if cut <= finish_event else None), cut


def test_usage_from_a_crlf_stream_tail() -> None:
    body = USAGE_STREAM.replace(b"\n", b"\r\n")
    usage_event = body.rfind(b"data: {")
    finish_event = body.rfind(b"data: {", 0, usage_event)
    # cut inside the event before the finish_reason chunk, then inside the finish_reason chunk
    assert usage_from_tail(body[finish_event - 40 :], stream=True) == (STREAM_USAGE, "stop")
    assert usage_from_tail(body[finish_event + 40 :], stream=True) == (STREAM_USAGE, None)
    for cut in range(len(body) + 1):
        usage, _ = usage_from_tail(body[cut:], stream=True)
        assert usage == (STREAM_USAGE if cut <= usage_event else None), cut


def test_usage_from_tail_never_raises() -> None:
    rng = random.Random(8)
    samples = [USAGE_STREAM, PLAIN_STREAM, CHAT, b"", b"\x00" * 10, b'"usage": {' * 50, b"data: {\n\n" * 20]
    for _ in range(2000):
        base = bytearray(rng.choice(samples))
        for _ in range(rng.randrange(4)):
            if base:
                base[rng.randrange(len(base))] = rng.randrange(256)
        cut = rng.randrange(len(base) + 1)
        for stream in (True, False):
            usage, reason = usage_from_tail(bytes(base[cut:]), stream)
            assert usage is None or all(type(v) is int and v >= 0 for v in usage.values())
            assert reason is None or isinstance(reason, str)


# -- the model, from the first body bytes


@pytest.mark.parametrize(
    ("head", "model"),
    [
        (b'{"model": "gpt-4o", "messages": []}', "gpt-4o"),
        (b'{"model":"meta-llama/Llama-3.1-8B-Instruct"}', "meta-llama/Llama-3.1-8B-Instruct"),
        (b'{\n  "messages": [],\n  "model"\n\t:\r\n "mistral"\n}', "mistral"),
        (b'{"model": "caf\xc3\xa9"}', "café"),
        # a "model" inside a string is escaped: never a key
        (b'{"messages":[{"content":"say \\"model\\": \\"evil\\""}],"model":"good"}', "good"),
        # "model" as a value, or a key without a string value: the next one
        (b'{"role":"model","x":{"model":3},"model":"real"}', "real"),
        (b'{"model":"real","x":{"model":3},"role":"model"}', "real"),
        (b'{"messages": [{"role": "model", "content": "' + b"y" * 300 + b'"}], "model":"gem"}', "gem"),
        (b'{"messages": []}', None),
        (b"", None),
        (b'{"model": "with \\"escape\\""}', None),  # rejected, not unescaped
        (b'{"model": ""}', None),
        (b'{"model": "cut off', None),  # the head ends inside the value
        (b'{"model": "\xff\xfe"}', None),  # not UTF-8
        (b'{"model": "' + b"m" * (MAX_MODEL_CHARS + 1) + b'"}', None),
        (b'{"model": "' + b"m" * MAX_MODEL_CHARS + b'"}', "m" * MAX_MODEL_CHARS),
    ],
)
def test_scan_model(head: bytes, model: str | None) -> None:
    assert scan_model(head) == model


def test_scan_model_front_then_from_the_end() -> None:
    assert scan_model(b'{"model": "front", "metadata": {"model": "nested"}}') == "front"
    padding = b'"' + b"x" * 300 + b'"'
    assert scan_model(b'{"messages": [' + padding + b', {"model": "nested"}], "model": "top"}') == "top"
    # within the first FRONT_BYTES the first key wins
    assert scan_model(b'{"messages": [{"model": "nested"}], "model": "top"}') == "nested"
    far = b'{"messages": ["' + b"x" * 1000 + b'"], "model": "top", "metadata": {"model": "nested"}}'
    # the documented limitation: no JSON parse, so a nested "model" key written last wins
    assert scan_model(far) == "nested"


def test_scan_model_cost_on_a_4k_body() -> None:
    messages = [{"role": "user", "content": "lorem ipsum dolor sit amet " * 6} for _ in range(24)]
    sdk = orjson.dumps({"messages": messages, "model": "gpt-4o-mini", "temperature": 0.2})[-4096:]
    curl = orjson.dumps({"model": "gpt-4o-mini", "messages": messages})[:4096]
    absent = orjson.dumps({"messages": messages})[:4096]
    for head, model in ((sdk, "gpt-4o-mini"), (curl, "gpt-4o-mini"), (absent, None)):
        assert len(head) == 4096 and scan_model(head) == model
        runs = 20_000
        gc.disable()
        try:
            best = math.inf
            for _ in range(3):
                start = time.perf_counter()
                for _ in range(runs):
                    scan_model(head)
                best = min(best, (time.perf_counter() - start) / runs)
        finally:
            gc.enable()
        # 1-2 us on the shared test machine (printed with -s); the bound is generous because other
        # test runs share the cores
        print(f"scan_model on 4 KiB, model {model!r}: {best * 1e6:.2f} us")
        assert best < 50e-6
