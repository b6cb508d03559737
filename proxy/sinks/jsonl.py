"""JSONL file sink: one JSON line per instance of each sample, written by its own thread.

Line format (docs/drift.md): the metadata keys first, always present, in this order::

    request_id, instance, timestamp, model, version, variant, status

then the instance's features under their own names, then its predictions under theirs. ``instance``
is the index of the instance in the batched request (0, 1, ...); a sample with no rows (an unparsed
body, a request without instances) still gets one line with the metadata and ``instance: null``, so
every sampled exchange is in the file. ``timestamp`` is when the request started (RFC 3339, UTC,
milliseconds), as in the access log. A feature whose name is a metadata key is written as
``feature.<name>``, a prediction's as ``prediction.<name>`` (a name already taken gets the prefix again).
NaN and infinite values are written as ``null``. ``pandas.read_json(path, lines=True)`` loads a file.

Writing. ``offer`` (side-path thread) encodes the lines of a sample and appends them to a bounded
deque: all of them or, when they do not fit in ``queue_size``, none (counted ``queue_full``). The
writer thread wakes on an offer, waits ``LINGER`` (50 ms) for more, then writes what is queued with
one ``write`` per batch (two when the batch crosses a rotation). Nothing waits on a write: a full
disk or a removed directory costs the lines of that batch (``write_error``, logged at most once a
minute, the file cut back to its last whole line when it can be) and the next batch tries again,
reopening the file.

Rotation. Before a batch would take the file past ``max_bytes``, ``path`` becomes ``path.1``, ``path.1``
becomes ``path.2`` ..., ``path.<max_files>`` is removed, and a new ``path`` is started, so the files
never hold more than ``(max_files + 1) x max_bytes`` bytes. A single line longer than ``max_bytes``
would break that bound: it is dropped and counted (``too_large``), never written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
from collections import deque
from typing import Any

import orjson

from proxy.errors import ConfigError
from proxy.sampling.sample import Extracted, Sample
from proxy.settings import JsonlSink as JsonlSinkConfig
from proxy.sinks.base import LogLimiter, Sink, rfc3339

log = logging.getLogger("infermon.sinks.jsonl")

#: the keys every line starts with, in this order
METADATA = ("request_id", "instance", "timestamp", "model", "version", "variant", "status")
_METADATA = frozenset(METADATA)
CLOSE_TIMEOUT = 5.0  # seconds aclose waits for the writer by default
MAX_BATCH_LINES = 10_000  # lines taken from the queue for one batch (bounds the writer's memory)
LINGER = 0.05  # seconds the writer waits after a wake-up for more lines: at most ~20 writes a second


def _plain(value: Any) -> Any:
    """A value orjson refused (an int beyond 64 bits, an unknown type), as something it takes."""
    if isinstance(value, bool | str | None):
        return value
    if isinstance(value, int):
        return float(value) if abs(value) < 2**1023 else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return str(value)


def _add(record: dict[str, Any], values: dict[str, Any], prefix: str) -> None:
    """``values`` into ``record``; a name already there (a metadata key, a feature) gets ``prefix``."""
    if record.keys().isdisjoint(values):  # the usual case: one C-level update
        record.update(values)
        return
    for name, value in values.items():
        key = name
        while key in record or key in _METADATA:
            key = prefix + key
        record[key] = value


def lines_of(sample: Sample, extracted: Extracted) -> list[bytes]:
    """The JSON lines of one sample, without their newlines."""
    rows, predictions = extracted.rows, extracted.predictions
    n = max(len(rows), len(predictions))
    base: dict[str, Any] = {
        "request_id": sample.request_id,
        "instance": None,
        "timestamp": rfc3339(sample.timestamp - sample.duration),
        "model": sample.model,
        "version": sample.version,
        "variant": sample.variant,
        "status": sample.status,
    }
    if n == 0:
        return [orjson.dumps(base)]
    out: list[bytes] = []
    for i in range(n):
        record = base.copy()
        record["instance"] = i
        if i < len(rows):
            _add(record, rows[i], "feature.")
        if i < len(predictions):
            _add(record, predictions[i], "prediction.")
        try:
            out.append(orjson.dumps(record, default=str))
        except (TypeError, orjson.JSONEncodeError):  # an int beyond 64 bits
            out.append(orjson.dumps({k: _plain(v) for k, v in record.items()}))
    return out


class JsonlSink(Sink):
    name = "jsonl"
    reasons = ("queue_full", "write_error", "too_large", "unserializable", "shutdown")

    def __init__(self, cfg: JsonlSinkConfig) -> None:
        super().__init__()
        if cfg.path is None:
            raise ValueError("JsonlSink needs sinks.jsonl.path")
        self.cfg = cfg
        self.path: str = cfg.path
        self.max_bytes = cfg.max_bytes
        self.max_files = cfg.max_files
        self.queue_size = cfg.queue_size
        #: (time.monotonic() when offered, line)
        self.queue: deque[tuple[float, bytes]] = deque()
        self.rotations = 0
        self._fd: int | None = None
        self._size = 0  # bytes in the current file
        self._wake = threading.Event()
        self._stop = False  # drain what is queued, then end
        self._abandon = False  # end after the batch being written
        self._closed = False
        self._thread: threading.Thread | None = None
        self._errors = LogLimiter(log)
        self._full = LogLimiter(log)
        self._closing = threading.Event()  # cuts the writer's linger short

    # -- side path ----------------------------------------------------------------------------

    def offer(self, sample: Sample, extracted: Extracted) -> None:
        try:
            n = max(1, len(extracted.rows), len(extracted.predictions))
            if self._closed:
                self.stats.drop("shutdown", n)
                return
            if len(self.queue) + n > self.queue_size:
                self.stats.drop("queue_full", n)
                self._full.warning("jsonl sink: queue full (%d lines): dropping", self.queue_size)
                return
            try:
                lines = lines_of(sample, extracted)
            except Exception as exc:
                self.stats.drop("unserializable", n)
                self._errors.error("jsonl sink: sample %s not written: %r", sample.request_id, exc)
                return
            now = time.monotonic()
            self.queue.extend([(now, line) for line in lines])
            if not self._wake.is_set():  # set until the writer takes the batch: a read, not a lock
                self._wake.set()
        except Exception:  # never into the worker
            log.exception("jsonl sink: offer failed")

    def queued(self) -> int:
        return len(self.queue)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._thread is not None:
            return
        try:
            self._open()
        except OSError as exc:
            raise ConfigError(
                f"config error: sinks.jsonl.path = {self.path!r}: cannot open it for appending "
                f"({exc.strerror}); name a writable file in an existing directory"
            ) from None
        self._thread = threading.Thread(target=self._run, name="infermon-sink-jsonl", daemon=True)
        self._thread.start()

    async def aclose(self, timeout: float | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop = True
        self._closing.set()
        self._wake.set()
        thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join, CLOSE_TIMEOUT if timeout is None else timeout)
            self._abandon = True
        left = 0
        with contextlib.suppress(IndexError):
            while True:
                self.queue.popleft()
                left += 1
        self.stats.drop("shutdown", left)
        if left:
            log.warning("jsonl sink shut down with %d lines not written", left)
        if thread is None or not thread.is_alive():
            self._close_file()

    # -- writer thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._closing.wait(LINGER)  # what comes meanwhile goes in the same write
            self._wake.clear()
            while self.queue and not self._abandon:
                try:
                    self._write_batch(self._take())
                except Exception as exc:  # the writer never dies
                    self._errors.error("jsonl sink: writer error: %r", exc)
            if self._stop or self._abandon:
                break
        if not self._abandon:
            self._close_file()

    def _take(self) -> list[tuple[float, bytes]]:
        batch: list[tuple[float, bytes]] = []
        popleft = self.queue.popleft
        with contextlib.suppress(IndexError):
            for _ in range(MAX_BATCH_LINES):
                batch.append(popleft())
        return batch

    def _write_batch(self, batch: list[tuple[float, bytes]]) -> None:
        max_bytes = self.max_bytes
        if self._fd is None:  # closed after a failed write: reopened, so the size is the file's own
            with contextlib.suppress(OSError):
                self._open()
        chunk: list[bytes] = []
        times: list[float] = []
        size = 0
        for i, (t, line) in enumerate(batch):
            n = len(line) + 1
            if n > max_bytes:
                self.stats.drop("too_large")
                self._errors.error(
                    "jsonl sink: a line of %d bytes is longer than sinks.jsonl.max_bytes (%d): dropped", n, max_bytes
                )
                continue
            if self._size + size + n > max_bytes and (self._size + size) > 0:
                if chunk:
                    self._write(chunk, times)
                    chunk, times, size = [], [], 0
                if self._size > 0 and not self._rotate():
                    # not written rather than past the disk bound; the next batch tries again
                    self.stats.drop("write_error", len(batch) - i)
                    return
            chunk.append(line)
            times.append(t)
            size += n
        if chunk:
            self._write(chunk, times)

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            self._size = os.fstat(fd).st_size
        except OSError:
            os.close(fd)
            raise
        self._fd = fd

    def _close_file(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _write(self, chunk: list[bytes], times: list[float]) -> None:
        chunk.append(b"")
        data = memoryview(b"\n".join(chunk))
        start = self._size
        try:
            if self._fd is None:
                self._open()
                start = self._size
            fd = self._fd
            assert fd is not None
            while data:
                written = os.write(fd, data)
                data = data[written:]
                self._size += written
        except OSError as exc:
            lost = len(times)
            self.stats.drop("write_error", lost)
            self._errors.error("jsonl sink: writing %s failed, %d lines lost: %s", self.path, lost, exc)
            if self._fd is not None and self._size > start:  # a part of the batch went in: cut it off
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, start)
                    self._size = start
            self._close_file()  # reopened by the next batch: the path may have been replaced
            return
        now = time.monotonic()
        stats = self.stats
        for t in times:
            stats.observe(now - t)
        stats.sent += len(times)

    def _rotate(self) -> bool:
        """path -> path.1 -> ... -> path.N (the oldest removed); a new, empty path. False: it failed."""
        self._close_file()
        path = self.path
        try:
            for i in range(self.max_files - 1, 0, -1):
                older = f"{path}.{i}"
                if os.path.exists(older):
                    os.replace(older, f"{path}.{i + 1}")
            os.replace(path, f"{path}.1")
            self._open()
        except OSError as exc:
            self._errors.error("jsonl sink: rotating %s failed: %s", path, exc)
            return False
        self.rotations += 1
        return True
