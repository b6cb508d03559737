"""JSONL sink: the line format, pandas loading, rotation and its disk bound, write errors, the queue."""

from __future__ import annotations

import math
import os
import shutil
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from proxy.errors import ConfigError
from proxy.sampling.sample import Extracted, Sample
from proxy.settings import JsonlSink as JsonlSinkConfig
from proxy.sinks.jsonl import METADATA, JsonlSink, lines_of
from tests.helpers import TIMEOUT, metric, parse_metrics, wait_until

pytestmark = pytest.mark.timeout(60)

T0 = 1_767_323_045.5  # 2026-01-02T03:04:05.500Z


def make_sample(request_id: str = "r-1", status: int = 200, timestamp: float = T0, duration: float = 0.25) -> Sample:
    return Sample(
        request_id=request_id,
        timestamp=timestamp,
        method="POST",
        path="/v1/models/iris:predict",
        status=status,
        model="iris",
        version="3",
        variant="blue",
        request_headers=[("content-type", "application/json")],
        response_headers=[("content-type", "application/json")],
        request_body=b"{}",
        response_body=b"{}",
        duration=duration,
    )


def extracted(rows: list[dict[str, Any]], predictions: list[dict[str, Any]] | None = None) -> Extracted:
    return Extracted(adapter="kserve_v1", rows=rows, predictions=predictions or [])


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def listing(folder: Path) -> dict[str, int]:
    """file name -> size"""
    return {p.name: p.stat().st_size for p in folder.iterdir()}


def config(path: Path, **overrides: Any) -> JsonlSinkConfig:
    return JsonlSinkConfig.model_validate({"path": str(path), **overrides})


async def started(cfg: JsonlSinkConfig) -> JsonlSink:
    sink = JsonlSink(cfg)
    await sink.start()
    return sink


# -- the line format --------------------------------------------------------------------------


def test_one_line_per_instance_metadata_first_then_features_then_predictions() -> None:
    rows: list[dict[str, Any]] = [
        {"sepal_length": 5.1, "species_hint": "setosa"},
        {"sepal_length": 6.2, "species_hint": None},
    ]
    preds = [{"prediction": 0}, {"prediction": 2}]
    lines = [orjson.loads(line) for line in lines_of(make_sample(), extracted(rows, preds))]
    assert len(lines) == 2
    assert list(lines[0]) == [*METADATA, "sepal_length", "species_hint", "prediction"]
    assert lines[0] == {
        "request_id": "r-1",
        "instance": 0,
        "timestamp": "2026-01-02T03:04:05.250Z",  # when the request started: the end minus the duration
        "model": "iris",
        "version": "3",
        "variant": "blue",
        "status": 200,
        "sepal_length": 5.1,
        "species_hint": "setosa",
        "prediction": 0,
    }
    assert lines[1]["instance"] == 1
    assert lines[1]["species_hint"] is None
    assert lines[1]["prediction"] == 2


def test_a_sample_without_rows_still_gets_its_line() -> None:
    (line,) = (orjson.loads(raw) for raw in lines_of(make_sample(status=503), extracted([])))
    assert line == {
        "request_id": "r-1",
        "instance": None,
        "timestamp": "2026-01-02T03:04:05.250Z",
        "model": "iris",
        "version": "3",
        "variant": "blue",
        "status": 503,
    }


def test_predictions_without_rows_and_rows_without_predictions() -> None:
    only_preds = [orjson.loads(raw) for raw in lines_of(make_sample(), extracted([], [{"p": 1}, {"p": 2}]))]
    assert [(line["instance"], line["p"]) for line in only_preds] == [(0, 1), (1, 2)]
    uneven = [orjson.loads(raw) for raw in lines_of(make_sample(), extracted([{"x": 1}, {"x": 2}], [{"p": 9}]))]
    assert uneven[0]["p"] == 9
    assert "p" not in uneven[1]


def test_names_that_collide_with_metadata_get_a_prefix() -> None:
    rows = [{"status": "gold", "model": "x1", "timestamp": 3, "feature.status": "taken", "plain": 1}]
    preds = [{"request_id": 7, "plain": 2}]
    (line,) = (orjson.loads(raw) for raw in lines_of(make_sample(), extracted(rows, preds)))
    assert line["status"] == 200  # the metadata is never overwritten
    assert line["model"] == "iris"
    assert line["request_id"] == "r-1"
    assert line["feature.model"] == "x1"
    assert line["feature.timestamp"] == 3
    # a name already taken (here by the renamed "status") gets the prefix again: nothing is lost
    assert line["feature.status"] == "gold"
    assert line["feature.feature.status"] == "taken"
    assert line["plain"] == 1
    assert line["prediction.plain"] == 2  # a prediction named like a feature
    assert line["prediction.request_id"] == 7


def test_values_json_cannot_hold() -> None:
    rows = [{"nan": math.nan, "inf": math.inf, "big": 2**70, "obj": Decimal("1.5")}]
    (line,) = (orjson.loads(raw) for raw in lines_of(make_sample(), extracted(rows)))
    assert line["nan"] is None
    assert line["inf"] is None
    assert line["big"] == float(2**70)
    assert line["obj"] == "1.5"


# -- writing ------------------------------------------------------------------------------------


async def test_lines_are_written_and_load_into_pandas_with_one_call(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    sink = await started(config(path))
    for i in range(40):
        rows: list[dict[str, Any]] = [
            {"x": float(i), "colour": "red" if i % 2 else "blue"},
            {"x": i + 0.5, "colour": "green"},
        ]
        preds: list[dict[str, Any]] = [{"prediction": i % 3}, {"prediction": 1}]
        sink.offer(make_sample(f"req-{i}", timestamp=T0 + i), extracted(rows, preds))
    sink.offer(make_sample("no-rows", status=500, timestamp=T0 + 100), extracted([]))
    await sink.aclose()
    assert sink.stats.sent == 81
    assert sink.stats.dropped == dict.fromkeys(JsonlSink.reasons, 0)

    df = pd.read_json(path, lines=True)
    assert len(df) == 81
    assert list(df.columns) == [*METADATA, "x", "colour", "prediction"]
    assert str(df["timestamp"].dtype).startswith("datetime64")
    assert str(df["timestamp"].dt.tz) == "UTC"
    assert df["x"].dtype.kind == "f"
    assert set(df["colour"].dropna()) == {"red", "blue", "green"}
    last = df.iloc[-1]
    assert last["request_id"] == "no-rows"
    assert math.isnan(last["instance"])
    assert last["status"] == 500
    # the split the docs show: a reference window and a current one, by time
    cut = pd.Timestamp(T0 + 19.5, unit="s", tz="UTC")  # sample i started at T0 + i - 0.25
    reference = df[df["timestamp"] < cut][["x", "colour", "prediction"]]
    current = df[df["timestamp"] >= cut].dropna(subset=["instance"])[["x", "colour", "prediction"]]
    assert len(reference) == 40
    assert len(current) == 40


async def test_rotation_keeps_max_files_and_bounds_disk_use(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    cfg = config(path, max_bytes=1024, max_files=2)
    sink = await started(cfg)
    total = 300
    for i in range(total):
        sink.offer(make_sample(f"r{i:04d}"), extracted([{"x": i}]))
    await sink.aclose()
    assert sink.stats.sent == total
    assert sink.rotations > 2
    sizes = listing(tmp_path)
    assert sorted(sizes) == ["s.jsonl", "s.jsonl.1", "s.jsonl.2"]  # path.3 and older were removed
    assert all(0 < size <= cfg.max_bytes for size in sizes.values())
    assert sum(sizes.values()) <= (cfg.max_files + 1) * cfg.max_bytes
    # whole lines only, newest in path, each file continuing where the older one stopped
    flat = [
        line["request_id"] for name in ("s.jsonl.2", "s.jsonl.1", "s.jsonl") for line in read_lines(tmp_path / name)
    ]
    assert flat == [f"r{i:04d}" for i in range(total - len(flat), total)]


async def test_an_existing_file_is_appended_to_and_rotated_by_its_size(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"request_id":"old"}\n' * 50)  # 1050 bytes: over max_bytes already
    sink = await started(config(path, max_bytes=1024, max_files=1))
    sink.offer(make_sample("new"), extracted([{"x": 1}]))
    await sink.aclose()
    assert read_lines(tmp_path / "s.jsonl.1")[0] == {"request_id": "old"}
    assert [line["request_id"] for line in read_lines(path)] == ["new"]


async def test_a_line_longer_than_max_bytes_is_dropped_not_written(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    sink = await started(config(path, max_bytes=1024))
    sink.offer(make_sample("small-1"), extracted([{"x": 1}]))
    sink.offer(make_sample("huge"), extracted([{"blob": "x" * 2000}]))
    sink.offer(make_sample("small-2"), extracted([{"x": 2}]))
    await sink.aclose()
    assert [line["request_id"] for line in read_lines(path)] == ["small-1", "small-2"]
    assert sink.stats.dropped["too_large"] == 1
    assert sink.stats.sent == 2
    assert not (tmp_path / "s.jsonl.1").exists()


async def test_a_full_queue_drops_whole_samples_and_offer_returns_at_once(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    sink = JsonlSink(config(path, queue_size=10))  # not started: nothing takes from the queue yet
    times = []
    for i in range(200):
        t = time.perf_counter()
        sink.offer(make_sample(f"r{i}"), extracted([{"x": i}, {"x": -i}, {"x": 0}]))  # 3 lines each
        times.append(time.perf_counter() - t)
    assert sink.queued() == 9  # 3 whole samples; the 4th would not fit
    assert sink.stats.dropped["queue_full"] == 197 * 3
    times.sort()  # the 99th percentile: one call may lose the CPU to another process on a shared machine
    assert times[100] < 0.0001, f"median offer {times[100] * 1e6:.0f} us"
    assert times[198] < 0.001, f"99th percentile offer {times[198] * 1e6:.0f} us"
    await sink.start()
    await sink.aclose()
    assert [line["request_id"] for line in read_lines(path)] == ["r0"] * 3 + ["r1"] * 3 + ["r2"] * 3


async def test_written_while_running_with_latency_and_queue_metrics(tmp_path: Path) -> None:
    sink = await started(config(tmp_path / "s.jsonl"))
    try:
        sink.offer(make_sample(), extracted([{"x": 1}, {"x": 2}]))

        async def written() -> bool:
            return sink.stats.sent == 2

        await wait_until(written, timeout=TIMEOUT)
        registry = CollectorRegistry()
        registry.register(sink.collector())
        metrics = parse_metrics(generate_latest(registry).decode())
        assert metric(metrics, "infermon_sink_sent_total", sink="jsonl") == 2
        assert metric(metrics, "infermon_sink_latency_seconds_count", sink="jsonl") == 2
        assert metric(metrics, "infermon_sink_latency_seconds_bucket", sink="jsonl", le="+Inf") == 2
        assert metric(metrics, "infermon_sink_queue", sink="jsonl") == 0
        assert metric(metrics, "infermon_sink_dropped_total", sink="jsonl", reason="queue_full") == 0
    finally:
        await sink.aclose()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
async def test_disk_full_is_counted_and_kills_nothing() -> None:
    sink = await started(JsonlSinkConfig(path="/dev/full"))
    for i in range(5):
        sink.offer(make_sample(f"r{i}"), extracted([{"x": i}]))

    async def counted() -> bool:
        return sink.stats.dropped["write_error"] == 5

    await wait_until(counted, timeout=TIMEOUT)
    assert sink.stats.sent == 0
    sink.offer(make_sample("after"), extracted([{"x": 0}]))  # the writer is still there
    await sink.aclose()
    assert sink.stats.dropped["write_error"] == 6


async def test_an_unwritable_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        config(tmp_path / "missing-dir" / "s.jsonl")
    # valid when the config was read, gone by the time the sink starts
    folder = tmp_path / "gone"
    folder.mkdir()
    sink = JsonlSink(config(folder / "s.jsonl"))
    folder.rmdir()
    with pytest.raises(ConfigError, match=r"sinks\.jsonl\.path"):
        await sink.start()
    await sink.aclose()


async def test_a_directory_gone_at_run_time_is_counted_then_recovered(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    path = folder / "s.jsonl"
    sink = await started(config(path, max_bytes=1024, max_files=1))
    try:
        shutil.rmtree(folder)  # the open file still takes writes; rotating it cannot work
        for i in range(30):
            sink.offer(make_sample(f"lost{i}"), extracted([{"x": i}]))

        async def failed() -> bool:  # every line either written (to the removed file) or counted
            return sink.stats.dropped["write_error"] > 0 and sink.stats.sent + sink.stats.dropped["write_error"] == 30

        await wait_until(failed, timeout=TIMEOUT)
        folder.mkdir()
        before = sink.stats.sent
        sink.offer(make_sample("back"), extracted([{"x": 1}]))

        async def recovered() -> bool:
            return sink.stats.sent == before + 1

        await wait_until(recovered, timeout=TIMEOUT)
    finally:
        await sink.aclose()
    assert [line["request_id"] for line in read_lines(path)] == ["back"]
    assert sink.stats.sent + sink.stats.dropped["write_error"] == 31


async def test_offers_after_close_are_counted_as_shutdown(tmp_path: Path) -> None:
    sink = await started(config(tmp_path / "s.jsonl"))
    await sink.aclose()
    sink.offer(make_sample(), extracted([{"x": 1}, {"x": 2}]))
    assert sink.stats.dropped["shutdown"] == 2
