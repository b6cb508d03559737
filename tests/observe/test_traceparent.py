"""Trace context parsing: W3C traceparent / tracestate, B3 single and multi, and the samplers."""

from __future__ import annotations

import random

import pytest
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from proxy.observe.traceparent import (
    Parent,
    format_b3_single,
    format_traceparent,
    new_span_id,
    new_trace_id,
    parse_b3_multi,
    parse_b3_single,
    parse_traceparent,
    parse_tracestate,
)
from proxy.observe.tracing import Sampler

TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"
VALID = f"00-{TRACE}-{SPAN}-01"

#: every malformed traceparent: each must start a new trace
MALFORMED = {
    "empty": "",
    "too short": VALID[:-1],
    "too long for version 00": VALID + "-",
    "version 00 with extra field": VALID + "-extra",
    "version ff": "ff" + VALID[2:],
    "version upper-case hex": "0A" + VALID[2:],
    "version not hex": "0g" + VALID[2:],
    "version one digit": "0" + VALID[2:],
    "trace id all zeros": f"00-{'0' * 32}-{SPAN}-01",
    "span id all zeros": f"00-{TRACE}-{'0' * 16}-01",
    "trace id upper-case": f"00-{TRACE.upper()}-{SPAN}-01",
    "span id upper-case": f"00-{TRACE}-{SPAN.upper()}-01",
    "trace id not hex": f"00-{TRACE[:-1]}x-{SPAN}-01",
    "span id not hex": f"00-{TRACE}-{SPAN[:-1]}z-01",
    "trace id short": f"00-{TRACE[:-1]}-{SPAN}-01",
    "span id short": f"00-{TRACE}-{SPAN[:-1]}-01",
    "trace id long": f"00-{TRACE}0-{SPAN}-01",
    "flags not hex": f"00-{TRACE}-{SPAN}-0g",
    "flags one digit": f"00-{TRACE}-{SPAN}-1",
    "flags three digits": f"00-{TRACE}-{SPAN}-011",
    "wrong separator": f"00_{TRACE}-{SPAN}-01",
    "missing separator": f"00{TRACE}-{SPAN}-01",
    "higher version, longer without dash": f"01-{TRACE}-{SPAN}-01x",
    "garbage": "hello world, this is not a traceparent header at all!!",
    "non-ascii": f"00-{TRACE}-{SPAN}-0\u00e9",
}


def test_valid_traceparent() -> None:
    assert parse_traceparent(VALID.encode()) == Parent(TRACE, SPAN, True)
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-00".encode()) == Parent(TRACE, SPAN, False)
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-ff".encode()) == Parent(TRACE, SPAN, True)  # other bits ignored
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-02".encode()) == Parent(TRACE, SPAN, False)


def test_higher_version_reads_the_first_four_fields() -> None:
    assert parse_traceparent(f"cc-{TRACE}-{SPAN}-01".encode()) == Parent(TRACE, SPAN, True)
    assert parse_traceparent(f"cc-{TRACE}-{SPAN}-01-what-the-future-holds".encode()) == Parent(TRACE, SPAN, True)


@pytest.mark.parametrize("value", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_traceparent_is_rejected(value: str) -> None:
    assert parse_traceparent(value.encode("utf-8")) is None


def test_format_round_trip() -> None:
    trace, span = new_trace_id(), new_span_id()
    assert parse_traceparent(format_traceparent(trace, span, True)) == Parent(trace, span, True)
    assert parse_traceparent(format_traceparent(trace, span, False)) == Parent(trace, span, False)


def test_generated_ids_are_hex_and_non_zero() -> None:
    for _ in range(1000):
        trace, span = new_trace_id(), new_span_id()
        assert len(trace) == 32 and int(trace, 16) != 0
        assert len(span) == 16 and int(span, 16) != 0


class TestTracestate:
    def test_passed_unchanged(self) -> None:
        value = b"congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
        assert parse_tracestate([value]) is value

    def test_several_lines_are_combined(self) -> None:
        assert parse_tracestate([b"a=1", b"b=2 , ,c=3"]) == b"a=1,b=2,c=3"

    def test_multi_tenant_key(self) -> None:
        assert parse_tracestate([b"tenant@vendor=x"]) == b"tenant@vendor=x"

    @pytest.mark.parametrize(
        "value",
        [b"Upper=1", b"a=1,a=2", b"novalue", b"a=", b"a=b=c,=x", b"a=1\x01", b"k=\xff", b"a=1,b", b""],
        ids=["upper key", "duplicate key", "no equals", "empty value", "empty key", "control char",
             "non-ascii", "second member bad", "empty"],
    )  # fmt: skip
    def test_malformed_is_dropped(self, value: bytes) -> None:
        assert parse_tracestate([value]) is None

    def test_more_than_32_members_dropped(self) -> None:
        members = ",".join(f"k{i}=v" for i in range(33)).encode()
        assert parse_tracestate([members]) is None
        assert parse_tracestate([",".join(f"k{i}=v" for i in range(32)).encode()]) is not None

    def test_over_512_long_members_go_first(self) -> None:
        long = "big=" + "x" * 200
        small = [f"k{i}=" + "y" * 20 for i in range(14)]  # 14 * 25 = 350 characters
        out = parse_tracestate([",".join([small[0], long, *small[1:], long.replace("big", "big2")]).encode()])
        assert out == ",".join(small).encode()

    def test_over_512_members_from_the_end(self) -> None:
        members = [f"k{i:02d}=" + "v" * 60 for i in range(12)]  # 64 * 12 + 11 = 779
        out = parse_tracestate([",".join(members).encode()])
        assert out is not None and len(out) <= 512
        assert out == ",".join(members[:7]).encode()


class TestB3:
    def test_single_full(self) -> None:
        assert parse_b3_single(f"{TRACE}-{SPAN}-1-{SPAN}".encode()) == Parent(TRACE, SPAN, True)
        assert parse_b3_single(f"{TRACE}-{SPAN}-0".encode()) == Parent(TRACE, SPAN, False)
        assert parse_b3_single(f"{TRACE}-{SPAN}-d".encode()) == Parent(TRACE, SPAN, True)

    def test_single_deferred(self) -> None:
        assert parse_b3_single(f"{TRACE}-{SPAN}".encode()) == Parent(TRACE, SPAN, None)

    def test_single_64_bit_trace_id_padded(self) -> None:
        assert parse_b3_single(f"{SPAN}-{SPAN}-1".encode()) == Parent("0" * 16 + SPAN, SPAN, True)

    def test_single_decision_only(self) -> None:
        assert parse_b3_single(b"0") == Parent("", "", False)
        assert parse_b3_single(b"d") == Parent("", "", True)

    @pytest.mark.parametrize(
        "value",
        [b"x", f"{TRACE}-{SPAN}-2".encode(), f"{TRACE[:-2]}-{SPAN}-1".encode(), f"{'0' * 32}-{SPAN}-1".encode(),
         f"{TRACE}-{'0' * 16}-1".encode(), f"{TRACE}-{SPAN}-1-zz".encode(), f"{TRACE}-{SPAN}-1-{SPAN}-x".encode()],
    )  # fmt: skip
    def test_single_malformed(self, value: bytes) -> None:
        assert parse_b3_single(value) is None

    def test_multi(self) -> None:
        assert parse_b3_multi(TRACE.encode(), SPAN.encode(), b"1", None) == Parent(TRACE, SPAN, True)
        assert parse_b3_multi(TRACE.encode(), SPAN.encode(), b"0", None) == Parent(TRACE, SPAN, False)
        assert parse_b3_multi(TRACE.encode(), SPAN.encode(), None, b"1") == Parent(TRACE, SPAN, True)
        assert parse_b3_multi(TRACE.encode(), SPAN.encode(), None, None) == Parent(TRACE, SPAN, None)
        assert parse_b3_multi(TRACE.encode(), None, b"1", None) == Parent("", "", True)
        assert parse_b3_multi(b"nothex", SPAN.encode(), b"1", None) is None

    def test_format(self) -> None:
        assert format_b3_single(TRACE, SPAN, True) == f"{TRACE}-{SPAN}-1".encode()


class TestSampler:
    @pytest.mark.parametrize("ratio", [0.0, 0.001, 0.1, 0.5, 0.9, 1.0])
    def test_ratio_agrees_with_the_sdk(self, ratio: float) -> None:
        ours = Sampler("traceidratio", ratio)
        sdk = TraceIdRatioBased(ratio)
        rng = random.Random(7)
        for _ in range(3000):
            trace = f"{rng.getrandbits(128):032x}"
            sdk_says = sdk.should_sample(None, int(trace, 16), "span").decision.is_sampled()  # type: ignore[no-untyped-call]
            assert ours.should_sample(trace, None) is sdk_says

    def test_ratio_boundary(self) -> None:
        sampler = Sampler("traceidratio", 0.5)
        assert sampler.should_sample("f" * 16 + "7fffffffffffffff", None)
        assert not sampler.should_sample("0" * 16 + "8000000000000000", None)

    def test_parent_based_follows_the_caller(self) -> None:
        assert ParentBased(TraceIdRatioBased(0.0)) is not None  # the SDK's default shape
        sampler = Sampler("parentbased_traceidratio", 0.0)
        assert sampler.should_sample(TRACE, True)
        assert not Sampler("parentbased_always_on", 1.0).should_sample(TRACE, False)
        assert not sampler.should_sample(TRACE, None)  # no parent: the ratio decides
        assert Sampler("parentbased_always_on", 0.0).should_sample(TRACE, None)
        assert not Sampler("parentbased_always_off", 0.0).should_sample(TRACE, None)

    def test_non_parent_based_ignores_the_caller(self) -> None:
        assert not Sampler("always_off", 1.0).should_sample(TRACE, True)
        assert Sampler("always_on", 0.0).should_sample(TRACE, False)
        assert not Sampler("traceidratio", 0.0).should_sample(TRACE, True)
