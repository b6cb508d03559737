"""Shadow traffic: a share of client requests sent again to a shadow upstream, the answers compared.

The client only ever gets the primary's response, and the shadow adds no latency to it: the copy is
sent from ``on_complete``, after the client's response is over, through the data plane's own-request
API (:meth:`proxy.dataplane.core.DataPlane.send`). On the request path the observer only flips a coin
and keeps body pieces by reference (O(1) per hook); everything it holds is bounded:

- at most ``max_concurrency`` shadows at once, from the send to the end of their comparison; a
  request that finds them all busy is not shadowed (dropped, ``busy``);
- request and response bodies up to ``max_body_bytes``; a larger request is not shadowed
  (``oversized``), a larger response is not compared (``unparsable``);
- a shadow that does not answer within ``timeout`` is cut and counted ``failed``, like one that
  refuses connections or answers 5xx. None of this ever touches the client's exchange.

Which requests are shadowed: every method but CONNECT and protocol upgrades, chosen with probability
``ratio``, when the request arrived whole and the primary upstream answered it. The copy has the same
method, target, headers (hop-by-hop fields, Host and Content-Length left out; Host is the shadow's)
and body, plus ``x-infermon-shadow: 1``.

Comparison runs on one worker thread (off the loop): both response bodies are parsed (orjson, through
:class:`proxy.sampling.extract.Extractor`, so the same adapters read the predictions as for drift),
then instance by instance and prediction by prediction: class-like values (strings, booleans,
integers) agree or not; floats give an absolute difference. Only 2xx answers on both sides are
compared. A body that is not JSON, or is cut at the cap, is counted ``unparsable``.

Example::

    shadow = ShadowObserver(ShadowConfig(url="http://127.0.0.1:8002", ratio=0.1), lambda: app.plane)
    app = ProxyApp(cfg, observers=(shadow,))
    await app.start()
    shadow.attach(app.plane)        # registers the shadow's upstream pool
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.config import mask_url
from proxy.dataplane import http
from proxy.dataplane.exchange import Exchange, Headers
from proxy.dataplane.hooks import Observer
from proxy.dataplane.own import OwnRequest, OwnResult
from proxy.sampling.extract import Dropped, Extractor
from proxy.sampling.sample import Extracted, Sample
from proxy.settings import Sampling

if TYPE_CHECKING:
    from proxy.dataplane.core import DataPlane

log = logging.getLogger("infermon.shadow")

_KEY = "shadow"
#: header added to every shadow request, so the shadow (and its logs) can tell copies apart
SHADOW_HEADER = (b"x-infermon-shadow", b"1")
#: request fields never copied: framing and hop-by-hop (the own-request API sets framing), and Host
_SKIP_HEADERS = http.HOP_BY_HOP | {b"host", b"content-length", b"transfer-encoding", b"expect", b"upgrade"}
_SSE = b"text/event-stream"
DROP_REASONS = ("busy", "oversized", "unparsable")


@dataclass(frozen=True, slots=True)
class ShadowConfig:
    url: str  # the shadow upstream, http://host:port
    ratio: float = 0.1  # share of requests mirrored
    max_concurrency: int = 16  # shadows at once (sent, not yet compared); more: dropped, "busy"
    max_body_bytes: int = 1_048_576  # per body; a larger request is not shadowed, a larger response not compared
    timeout: float = 10.0  # seconds for the shadow's complete answer; longer: cut, "failed"
    name: str = "shadow"  # the shadow's upstream pool name and the `shadow` metric label

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"shadow url {self.url!r} must be an http:// URL, for example http://127.0.0.1:8002")
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"shadow ratio {self.ratio!r} must be between 0 and 1 (a share of requests)")
        if self.max_concurrency < 1:
            raise ValueError(f"shadow max_concurrency {self.max_concurrency!r} must be at least 1")
        if self.max_body_bytes < 1:
            raise ValueError(f"shadow max_body_bytes {self.max_body_bytes!r} must be at least 1")
        if not self.timeout > 0:
            raise ValueError(f"shadow timeout {self.timeout!r} must be a positive number of seconds")
        if not self.name:
            raise ValueError("shadow name must not be empty")


class _Capture:
    """What one chosen exchange keeps: body pieces by reference, up to the cap."""

    __slots__ = ("req", "req_n", "resp", "resp_n", "resp_over", "sse")

    def __init__(self) -> None:
        self.req: list[bytes] = []
        self.req_n = 0
        self.resp: list[bytes] = []
        self.resp_n = 0
        self.resp_over = False
        self.sse = False


class _Primary:
    """The primary's side of one comparison, taken from the exchange in ``on_complete``."""

    __slots__ = ("body", "duration", "method", "path", "req", "request_headers", "response_headers", "sse", "status")

    def __init__(self, ex: Exchange, cap: _Capture, duration: float) -> None:
        self.method = ex.method
        self.path = ex.path
        self.status = ex.status
        self.duration = duration
        self.request_headers = ex.request_headers
        self.response_headers = ex.response_headers
        self.req = cap.req
        self.body: list[bytes] | None = None if cap.resp_over else cap.resp
        self.sse = cap.sse


def _text_headers(headers: Headers) -> list[tuple[str, str]]:
    return [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in headers]


def _is_number(value: Any) -> bool:
    return type(value) is float


class _Stats:
    """The comparison figures; every change and every read under the observer's lock."""

    __slots__ = (
        "abs_diff_count",
        "abs_diff_sum",
        "agreements",
        "compared",
        "comparisons",
        "dropped",
        "failed",
        "failed_by",
        "latency_count",
        "latency_sum",
        "missing",
        "ok",
        "sent",
    )

    def __init__(self) -> None:
        self.sent = 0
        self.ok = 0
        self.failed = 0
        self.failed_by: dict[str, int] = {}
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self.compared = 0  # response pairs compared
        self.agreements = 0
        self.comparisons = 0  # class-like predictions compared
        self.abs_diff_sum = 0.0
        self.abs_diff_count = 0  # numeric predictions compared
        self.missing = 0  # numeric predictions one side has and the other lacks
        self.latency_sum = 0.0  # shadow duration - primary duration, seconds
        self.latency_count = 0


class ShadowObserver(Observer):
    """Mirrors a share of requests to a shadow upstream and compares the answers (module docstring)."""

    name = "shadow"

    def __init__(
        self,
        cfg: ShadowConfig,
        plane_getter: Callable[[], DataPlane | None] = lambda: None,
        *,
        sampling: Sampling | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self._plane_getter = plane_getter
        self._plane: DataPlane | None = None
        self._random = (rng or random.Random()).random
        # the drift adapters (sampling.adapter, mappings, redaction) read the predictions; bodies up to our cap
        base = sampling or Sampling()
        self.extractor = Extractor(base.model_copy(update={"max_body_bytes": cfg.max_body_bytes}), lambda: None)
        self._lock = threading.Lock()
        self._stats = _Stats()
        self.in_flight = 0  # shadows sent (or about to be) and not yet compared; changed under the lock
        self._pending: set[OwnRequest] = set()
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._worker()

    def _worker(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infermon-{self.cfg.name}")
        return self._executor

    def attach(self, plane: DataPlane) -> None:
        """Keep ``plane`` and register the shadow's upstream pool on it (once per plane)."""
        if self._plane is plane:
            return
        if self.cfg.name in plane.upstreams:
            raise ValueError(
                f"shadow name {self.cfg.name!r} is already an upstream of the proxy: give the shadow another name"
            )
        plane.add_upstream(self.cfg.name, self.cfg.url)
        self._plane = plane

    def _current_plane(self) -> DataPlane | None:
        if self._plane is None:
            plane = self._plane_getter()
            if plane is not None:
                self.attach(plane)
        return self._plane

    async def aclose(self) -> None:
        self._closed = True
        for request in list(self._pending):
            request.cancel()  # their callbacks never run: give their slots back here
        with self._lock:
            self.in_flight -= len(self._pending)
        self._pending.clear()
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, True, cancel_futures=True)

    # -- request path: O(1), never waits ------------------------------------------------------

    def on_request_head(self, ex: Exchange) -> None:
        ratio = self.cfg.ratio
        if ratio <= 0.0 or ex.method == "CONNECT" or ex.header(b"upgrade") is not None:
            return
        if ratio < 1.0 and self._random() >= ratio:
            return
        length = ex.header(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.cfg.max_body_bytes:
            self._drop("oversized")
            return
        if ex.extra is None:
            ex.extra = {_KEY: _Capture()}
        else:
            ex.extra[_KEY] = _Capture()

    def on_request_body(self, ex: Exchange, chunk: bytes) -> None:
        extra = ex.extra
        cap: _Capture | None = extra.get(_KEY) if extra is not None else None
        if cap is None or extra is None:
            return
        n = cap.req_n + len(chunk)
        if n > self.cfg.max_body_bytes:
            del extra[_KEY]  # chunked, longer than the cap: not shadowed
            self._drop("oversized")
            return
        cap.req.append(chunk)
        cap.req_n = n

    def on_upstream_head(self, ex: Exchange) -> None:
        extra = ex.extra
        cap: _Capture | None = extra.get(_KEY) if extra is not None else None
        if cap is None:
            return
        ctype = ex.response_header(b"content-type")
        cap.sse = ctype is not None and ctype.lstrip().lower().startswith(_SSE)

    def on_response_body(self, ex: Exchange, chunk: bytes) -> None:
        extra = ex.extra
        cap: _Capture | None = extra.get(_KEY) if extra is not None else None
        if cap is None or cap.resp_over:
            return
        n = cap.resp_n + len(chunk)
        if n > self.cfg.max_body_bytes:
            cap.resp_over = True  # still shadowed (latency, errors); the answers are not compared
            cap.resp = []
            return
        cap.resp.append(chunk)
        cap.resp_n = n

    def on_complete(self, ex: Exchange) -> None:
        extra = ex.extra
        if extra is None:
            return
        cap: _Capture | None = extra.pop(_KEY, None)
        if cap is None or self._closed:
            return
        # only a request that arrived whole and that the primary answered is worth a copy
        if ex.t_body_done == 0.0 or ex.t_upstream_head == 0.0 or ex.upgraded:
            return
        if self.in_flight >= self.cfg.max_concurrency:
            self._drop("busy")
            return
        with self._lock:
            self.in_flight += 1
        started = ex.t_upstream_connected or ex.t_head
        primary = _Primary(ex, cap, ex.t_done - started)
        asyncio.get_running_loop().call_soon(self._send, primary, ex.target)

    # -- the shadow request (on the loop, after the client's exchange) --------------------------

    def _send(self, primary: _Primary, target: bytes) -> None:
        plane = None
        try:
            plane = self._current_plane()
        except Exception:
            log.exception("shadow %s: cannot register its upstream", self.cfg.name)
        if plane is None or self._closed:
            self._failed("not_attached" if plane is None else "closed")
            self._release()
            return
        headers: Headers = [(k, v) for k, v in primary.request_headers if k.lower() not in _SKIP_HEADERS]
        headers.append(SHADOW_HEADER)
        body = b"".join(primary.req)
        sent: list[OwnRequest] = []  # set once send returns; a callback may come before that
        finished = False

        def done(result: OwnResult) -> None:
            nonlocal finished
            finished = True
            if sent:
                self._pending.discard(sent[0])
            self._answered(primary, result)

        try:
            request = plane.send(
                self.cfg.name,
                primary.method,
                target,
                headers,
                body,
                done,
                timeout=self.cfg.timeout,
                max_body_bytes=self.cfg.max_body_bytes,
            )
        except Exception as exc:  # a method or target the own-request API refuses: never the client's problem
            log.debug("shadow %s: request not sent: %r", self.cfg.name, exc)
            self._failed("invalid")
            self._release()
            return
        with self._lock:
            self._stats.sent += 1
        if not finished:
            sent.append(request)
            self._pending.add(request)

    def _answered(self, primary: _Primary, result: OwnResult) -> None:
        if result.error is not None or result.status >= 500:
            self._failed(result.error.kind if result.error is not None else "5xx")
            self._release()
            return
        with self._lock:
            stats = self._stats
            stats.ok += 1
            stats.latency_sum += result.duration - primary.duration
            stats.latency_count += 1
        if not (200 <= primary.status < 300 and 200 <= result.status < 300) or self._closed:
            self._release()
            return
        try:
            self._worker().submit(self._compare, primary, result)
        except RuntimeError:  # shut down meanwhile
            self._release()

    # -- the comparison (worker thread) ---------------------------------------------------------

    def _compare(self, primary: _Primary, result: OwnResult) -> None:
        try:
            self._compare_bodies(primary, result)
        except Exception:  # a bug here must not lose the slot
            log.exception("shadow %s: comparison failed", self.cfg.name)
        finally:
            self._release()

    def _extract(self, primary: _Primary, headers: Headers, body: bytes, status: int) -> Extracted | None:
        sample = Sample(
            request_id="",
            timestamp=0.0,
            method=primary.method,
            path=primary.path,
            status=status,
            model="",
            version="",
            variant="",
            request_headers=_text_headers(primary.request_headers),
            response_headers=_text_headers(headers),
            request_body=b"".join(primary.req),
            response_body=body,
            response_stream=primary.sse,
        )
        try:
            extracted = self.extractor.extract(sample)
        except Dropped:
            return None
        if body.strip() and extracted.response is None:
            return None  # the response is not JSON
        return extracted

    def _compare_bodies(self, primary: _Primary, result: OwnResult) -> None:
        if primary.body is None or result.truncated:
            self._drop("unparsable")
            return
        mine = self._extract(primary, primary.response_headers, b"".join(primary.body), primary.status)
        theirs = self._extract(primary, result.headers, result.body, result.status) if mine is not None else None
        if mine is None or theirs is None:
            self._drop("unparsable")
            return
        agreements = comparisons = missing = diff_n = 0
        diff_sum = 0.0
        a, b = mine.predictions, theirs.predictions
        for i in range(max(len(a), len(b))):
            p = a[i] if i < len(a) else {}
            s = b[i] if i < len(b) else {}
            for key in p.keys() | s.keys():
                pv = p.get(key, _ABSENT)
                sv = s.get(key, _ABSENT)
                if _is_number(pv) or _is_number(sv):
                    if type(pv) in (float, int) and type(sv) in (float, int):
                        d = abs(float(pv) - float(sv))
                        if math.isfinite(d):
                            diff_sum += d
                            diff_n += 1
                    else:
                        missing += 1
                else:
                    comparisons += 1
                    agreements += pv is not _ABSENT and type(pv) is type(sv) and pv == sv
        with self._lock:
            stats = self._stats
            stats.compared += 1
            stats.agreements += agreements
            stats.comparisons += comparisons
            stats.abs_diff_sum += diff_sum
            stats.abs_diff_count += diff_n
            stats.missing += missing

    # -- counters -------------------------------------------------------------------------------

    def _drop(self, reason: str) -> None:
        with self._lock:
            self._stats.dropped[reason] += 1

    def _failed(self, reason: str) -> None:
        with self._lock:
            stats = self._stats
            stats.failed += 1
            stats.failed_by[reason] = stats.failed_by.get(reason, 0) + 1

    def _release(self) -> None:
        with self._lock:
            self.in_flight -= 1

    # -- reading ----------------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """The figures, for the /shadow admin JSON; ratios and means are None until there is one."""
        with self._lock:
            s = self._stats
            return {
                "name": self.cfg.name,
                "url": mask_url(self.cfg.url),  # a password in it never reaches /shadow
                "ratio": self.cfg.ratio,
                "in_flight": self.in_flight,
                "max_concurrency": self.cfg.max_concurrency,
                "sent": s.sent,
                "ok": s.ok,
                "failed": s.failed,
                "failed_by_reason": dict(s.failed_by),
                "dropped": dict(s.dropped),
                "compared": s.compared,
                "class_comparisons": s.comparisons,
                "agreements": s.agreements,
                "agreement_ratio": s.agreements / s.comparisons if s.comparisons else None,
                "numeric_comparisons": s.abs_diff_count,
                "numeric_missing": s.missing,
                "abs_diff_mean": s.abs_diff_sum / s.abs_diff_count if s.abs_diff_count else None,
                "latency_diff_seconds_mean": s.latency_sum / s.latency_count if s.latency_count else None,
                "latency_samples": s.latency_count,
            }

    def collector(self) -> Collector:
        return ShadowCollector(self)


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


_ABSENT: Any = _Absent()


class ShadowCollector(Collector):
    """Prometheus families of one shadow, read from :meth:`ShadowObserver.report` (any thread)."""

    def __init__(self, observer: ShadowObserver) -> None:
        self.observer = observer

    def collect(self) -> Iterator[Metric]:
        r = self.observer.report()
        label = (r["name"],)
        requests = CounterMetricFamily(
            "infermon_shadow_requests",
            "Shadow requests answered, by outcome (failed: timeout, connect error or 5xx).",
            labels=("shadow", "outcome"),
        )
        requests.add_metric((*label, "ok"), r["ok"])
        requests.add_metric((*label, "failed"), r["failed"])
        yield requests
        dropped = CounterMetricFamily(
            "infermon_shadow_dropped",
            "Requests not shadowed (busy, oversized) or shadow answers not compared (unparsable).",
            labels=("shadow", "reason"),
        )
        for reason, n in r["dropped"].items():
            dropped.add_metric((*label, reason), n)
        yield dropped
        gauges = (
            (
                "infermon_shadow_agreement_ratio",
                "Share of class predictions the shadow answered alike.",
                "agreement_ratio",
            ),
            ("infermon_shadow_abs_diff", "Mean absolute difference of numeric predictions.", "abs_diff_mean"),
            (
                "infermon_shadow_latency_diff_seconds",
                "Mean shadow duration minus the primary's, seconds.",
                "latency_diff_seconds_mean",
            ),
        )
        for name, doc, key in gauges:
            family = GaugeMetricFamily(name, doc, labels=("shadow",))
            if r[key] is not None:
                family.add_metric(label, r[key])
            yield family
        in_flight = GaugeMetricFamily(
            "infermon_shadow_in_flight", "Shadow requests sent and not yet compared.", labels=("shadow",)
        )
        in_flight.add_metric(label, r["in_flight"])
        yield in_flight


__all__ = ["SHADOW_HEADER", "ShadowCollector", "ShadowConfig", "ShadowObserver"]
