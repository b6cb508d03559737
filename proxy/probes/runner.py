"""Golden-request probes in a running proxy: the probe set replayed to every upstream on an interval.

:class:`ProbeRunner` sends each probe of the file straight to each named upstream pool (``stable``
and every variant of a split; never the shadow) through the data plane's own-request API
(:meth:`proxy.dataplane.core.DataPlane.send`): no observer sees a probe and nothing counts it as
client traffic. A round is every probe once against one upstream, ``probes.concurrency`` at a time;
each upstream has its own rounds, so a canary that hangs never holds up the stable upstream's probes.
A round still running when the next one is due is not doubled: the new one is skipped and counted.

The checks (:func:`proxy.probes.check.check`: JSON parsing and comparison) run in a worker thread,
one probe at a time; only the bookkeeping runs on the event loop, and the request path never waits
on any of it. ``GET /probes`` on the admin port shows each probe's last result per upstream with the
differences that made it fail; ``infermon_probe_*`` exports them. With ``probes.readiness_failures:
N`` the ``probes`` readiness gate closes after N consecutive failed rounds of ``stable`` (the other
upstreams are reported beside it, never gating) and opens again after a round that passes.

:func:`run_probe` and :func:`run_set` are shared with ``infermon probe check`` / ``record``
(:mod:`proxy.probes.command`), which send through a pool of their own: the same client, framing and
checks as the proxy's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import orjson
from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy import __version__
from proxy.dataplane.exchange import Headers
from proxy.dataplane.own import OwnRequest, OwnResult
from proxy.probes import spec
from proxy.probes.check import Outcome, check
from proxy.probes.spec import Probe
from proxy.readiness import Readiness
from proxy.settings import ProxyConfig

log = logging.getLogger("infermon.probes")

#: added to every probe request, so a model server (and its logs) can tell probes from traffic
PROBE_HEADER = b"x-infermon-probe"
USER_AGENT = f"infermon-probe/{__version__}".encode("ascii")
#: readiness gate of the stable upstream; the others are reports named ``probes:NAME``
GATE = "probes"
GATING_VARIANT = "stable"
ROUND_OUTCOMES = ("ok", "failed", "inconclusive")
#: a probe that could not get a connection because client traffic holds them all says nothing about
#: the model's answers: it fails, but a round with only such failures is inconclusive
BUSY = "pool_exhausted"


class Sender(Protocol):
    """What sends a probe: :meth:`DataPlane.send` in the proxy, a pool of its own in the CLI."""

    def send(
        self,
        upstream: str,
        method: str,
        target: bytes,
        headers: Headers,
        body: bytes,
        callback: Callable[[OwnResult], None],
        *,
        timeout: float,
        max_body_bytes: int = ...,
    ) -> OwnRequest: ...


def request_headers(probe: Probe) -> Headers:
    """The probe's headers as sent: its own, plus x-infermon-probe, a User-Agent and an Idempotency-Key
    (a probe is safe to repeat, so a pooled connection the server closed meanwhile is retried)."""
    headers: Headers = list(probe.headers)
    names = {n for n, _ in headers}
    headers.append((PROBE_HEADER, probe.name.encode("ascii")))
    if b"user-agent" not in names:
        headers.append((b"user-agent", USER_AGENT))
    if b"idempotency-key" not in names:
        headers.append((b"idempotency-key", uuid.uuid4().hex.encode("ascii")))
    return headers


async def run_probe(
    sender: Sender,
    upstream: str,
    probe: Probe,
    *,
    timeout: float,
    max_body_bytes: int,
    rel_tol: float,
    abs_tol: float,
    pending: set[OwnRequest] | None = None,
) -> Outcome:
    """Send one probe and check the answer (in a worker thread). Never raises but on cancellation."""
    loop = asyncio.get_running_loop()
    answered: asyncio.Future[OwnResult] = loop.create_future()

    def done(result: OwnResult) -> None:
        if not answered.done():
            answered.set_result(result)

    started = time.perf_counter()
    try:
        request = sender.send(
            upstream,
            probe.method,
            probe.target,
            request_headers(probe),
            probe.body,
            done,
            timeout=timeout,
            max_body_bytes=max_body_bytes,
        )
    except Exception as exc:  # an unknown upstream, a request the own-request API refuses
        why = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc  # str(KeyError) adds quotes
        return Outcome(False, 0, time.perf_counter() - started, "invalid", f"not sent: {why}")
    if pending is not None:
        pending.add(request)
    try:
        result = await answered
    finally:
        if pending is not None:
            pending.discard(request)
        if not answered.done():
            request.cancel()  # cancelled while waiting: the request goes too
    error = result.error
    kwargs: dict[str, Any] = {
        "status": result.status,
        "body": result.body,
        "duration": result.duration,
        "truncated": result.truncated,
        "rel_tol": rel_tol,
        "abs_tol": abs_tol,
    }
    if error is not None:
        kwargs.update(error_kind=error.kind, error=str(error) or error.kind)
    elif result.truncated:
        kwargs.update(error_kind="too_large", error=f"the answer is longer than {max_body_bytes} bytes")
    try:
        return await asyncio.to_thread(lambda: check(probe, **kwargs))
    except Exception as exc:  # a bug in a check must not end the round
        log.exception("probe %s: checking the answer failed", probe.name)
        return Outcome(False, result.status, result.duration, "internal", f"check failed: {exc!r}")


async def run_set(
    sender: Sender,
    upstream: str,
    probes: Sequence[Probe],
    *,
    concurrency: int,
    timeout: float,
    max_body_bytes: int,
    rel_tol: float,
    abs_tol: float,
    pending: set[OwnRequest] | None = None,
    each: Callable[[Probe, Outcome], None] | None = None,
) -> list[Outcome]:
    """Every probe once against ``upstream``, ``concurrency`` at a time; outcomes in the probes' order.
    ``each(probe, outcome)`` is called as each one ends."""
    gate = asyncio.Semaphore(concurrency)

    async def one(probe: Probe) -> Outcome:
        async with gate:
            outcome = await run_probe(
                sender,
                upstream,
                probe,
                timeout=timeout,
                max_body_bytes=max_body_bytes,
                rel_tol=rel_tol,
                abs_tol=abs_tol,
                pending=pending,
            )
        if each is not None:
            each(probe, outcome)
        return outcome

    return list(await asyncio.gather(*(one(p) for p in probes)))


def round_outcome(outcomes: Sequence[Outcome]) -> str:
    """ok (every probe passed), failed (one failed for a reason other than a full pool), inconclusive."""
    if all(o.ok for o in outcomes):
        return "ok"
    if any(not o.ok and o.error_kind != BUSY for o in outcomes):
        return "failed"
    return "inconclusive"


class _Result:
    """One probe against one upstream: its last outcome and its counters (event-loop thread only)."""

    __slots__ = ("errors", "last", "last_dict", "last_success", "last_time", "mismatches", "runs")

    def __init__(self) -> None:
        self.last: Outcome | None = None
        self.last_dict: dict[str, Any] = {}  # the last outcome as /probes shows it, made once per run
        self.last_time = 0.0  # unix time the last run ended
        self.last_success: float | None = None
        self.runs = 0
        self.mismatches = 0  # answers that failed an expectation
        self.errors: dict[str, int] = {}  # runs without an answer, by kind


class _Upstream:
    """One upstream's rounds (event-loop thread only)."""

    __slots__ = ("consecutive", "last_round", "rounds", "skipped", "skipping")

    def __init__(self) -> None:
        self.rounds = dict.fromkeys(ROUND_OUTCOMES, 0)
        self.skipped = 0
        self.skipping = False  # the last tick found a round still running (logged once per streak)
        self.consecutive = 0  # failed rounds in a row
        self.last_round: dict[str, Any] | None = None

    @property
    def completed(self) -> int:
        return sum(self.rounds.values())


class ProbeRunner:
    """The probe set on an interval against every upstream of a proxy (module docstring)."""

    def __init__(self, cfg: ProxyConfig, readiness: Readiness, probes: list[Probe] | None = None) -> None:
        p = cfg.probes
        if probes is None:
            if p.file is None:
                raise ValueError("probes.file is not set")
            probes = spec.load(p.file, max_probes=p.max_probes)
        self.cfg = p
        self.probes = probes
        self.readiness = readiness
        #: every named upstream, stable first; the shadow is not one of them
        self.variants = cfg.variants()
        self.failures = p.readiness_failures or 0
        self.upstreams = {v: _Upstream() for v in self.variants}
        self.results: dict[tuple[str, str], _Result] = {
            (probe.name, v): _Result() for probe in probes for v in self.variants
        }
        self._sender: Sender | None = None
        self._task: asyncio.Task[None] | None = None
        self._rounds: dict[str, asyncio.Task[None]] = {}
        self._pending: set[OwnRequest] = set()
        self._waiters: list[tuple[str, int, asyncio.Future[None]]] = []
        self._closed = False
        if self.failures:
            for variant in self.variants:
                self._gate(variant, True, "no probe round yet")

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, sender: Sender, *, schedule: bool = True) -> None:
        """Start the rounds on ``sender`` (the data plane), the first one now; ``schedule=False``
        starts nothing (rounds then run only through :meth:`run_round`, as in tests)."""
        self._sender = sender
        if schedule:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def aclose(self) -> None:
        self._closed = True
        tasks = [t for t in (self._task, *self._rounds.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for request in list(self._pending):
            request.cancel()
        self._pending.clear()
        for _, _, fut in self._waiters:
            if not fut.done():
                fut.cancel()
        self._waiters.clear()

    async def _run(self) -> None:
        while True:
            self.tick()
            await asyncio.sleep(self.cfg.interval)

    def tick(self) -> None:
        """Start a round on every upstream whose previous round is over; count the others as skipped."""
        loop = asyncio.get_running_loop()
        for variant in self.variants:
            task = self._rounds.get(variant)
            state = self.upstreams[variant]
            if task is not None and not task.done():
                state.skipped += 1
                if not state.skipping:
                    log.warning(
                        "probe round of %s still running after %g s: the next is skipped (probes.interval, "
                        "probes.timeout, probes.concurrency)",
                        variant,
                        self.cfg.interval,
                    )
                state.skipping = True
                continue
            state.skipping = False
            self._rounds[variant] = loop.create_task(self._round_task(variant))

    async def _round_task(self, variant: str) -> None:
        try:
            await self.run_round(variant)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("probe round of %s failed", variant)

    # -- a round --------------------------------------------------------------------------------

    async def run_round(self, variant: str) -> str:
        """Every probe once against ``variant`` now; returns the round's outcome."""
        sender = self._sender
        if sender is None:
            raise RuntimeError("the probe runner is not started")
        started = time.time()
        t0 = time.perf_counter()
        p = self.cfg
        outcomes = await run_set(
            sender,
            variant,
            self.probes,
            concurrency=p.concurrency,
            timeout=p.timeout,
            max_body_bytes=p.max_body_bytes,
            rel_tol=p.rel_tol,
            abs_tol=p.abs_tol,
            pending=self._pending,
            each=lambda probe, outcome: self._record(probe, variant, outcome),
        )
        outcome = round_outcome(outcomes)
        self._round_done(variant, outcome, outcomes, started, time.perf_counter() - t0)
        return outcome

    def _record(self, probe: Probe, variant: str, outcome: Outcome) -> None:
        r = self.results[(probe.name, variant)]
        outcome.answer = None  # the parsed answer is for probe record: not kept for every probe
        was_ok = r.last.ok if r.last is not None else None
        now = time.time()
        r.last = outcome
        r.last_time = now
        r.last_dict = {**outcome.to_dict(), "time": now, "reason": outcome.reason or None}
        r.runs += 1
        if outcome.ok:
            r.last_success = now
            if was_ok is False:
                log.warning("probe %s on %s passes again", probe.name, variant)
            return
        if outcome.error_kind is None:
            r.mismatches += 1
        else:
            r.errors[outcome.error_kind] = r.errors.get(outcome.error_kind, 0) + 1
        if was_ok is not False:  # logged when it starts failing, not on every round
            log.warning("probe %s on %s fails: %s", probe.name, variant, outcome.reason)

    def _round_done(self, variant: str, outcome: str, outcomes: list[Outcome], started: float, duration: float) -> None:
        state = self.upstreams[variant]
        state.rounds[outcome] += 1
        failed = [(p.name, o.reason) for p, o in zip(self.probes, outcomes, strict=True) if not o.ok]
        if outcome == "ok":
            state.consecutive = 0
        elif outcome == "failed":
            state.consecutive += 1
        state.last_round = {
            "started": started,
            "duration_seconds": round(duration, 6),
            "outcome": outcome,
            "passed": len(outcomes) - len(failed),
            "failed": [name for name, _ in failed],
        }
        if self.failures:
            self._readiness(variant, outcome, failed)
        done = state.completed
        keep = []
        for waiter in self._waiters:
            name, n, fut = waiter
            if name == variant and done >= n:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append(waiter)
        self._waiters = keep

    # -- readiness --------------------------------------------------------------------------------

    def _gate(self, variant: str, ok: bool, reason: str) -> None:
        gating = variant == GATING_VARIANT
        self.readiness.set(GATE if gating else f"{GATE}:{variant}", ok, reason, gating)

    def _readiness(self, variant: str, outcome: str, failed: list[tuple[str, str]]) -> None:
        state = self.upstreams[variant]
        n = self.failures
        if outcome == "ok":
            self._gate(variant, True, f"probe round passed ({len(self.probes)} probes)")
            return
        first = f"{failed[0][0]}: {failed[0][1]}" if failed else ""
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        if outcome == "inconclusive":
            return  # neither evidence of wrong answers nor of right ones: the gate stays as it is
        if state.consecutive >= n:
            rounds = "round" if state.consecutive == 1 else "rounds"
            self._gate(variant, False, f"{state.consecutive} failed probe {rounds} in a row; {first}{more}")
        else:
            self._gate(variant, True, f"{state.consecutive} of {n} failed probe rounds; {first}{more}")

    # -- reading ----------------------------------------------------------------------------------

    async def wait_rounds(self, n: int, variant: str = GATING_VARIANT) -> None:
        """Until ``variant`` has completed ``n`` rounds (for tests and tools)."""
        if self.upstreams[variant].completed >= n:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((variant, n, fut))
        await fut

    def report(self) -> dict[str, Any]:
        """The state, for /probes: per probe the last result on each upstream, with the mismatches.
        Header values and request bodies are never part of it."""
        probes = []
        for probe in self.probes:
            results: dict[str, Any] = {}
            for variant in self.variants:
                r = self.results[(probe.name, variant)]
                entry: dict[str, Any] = {
                    "runs": r.runs,
                    "mismatches_total": r.mismatches,
                    "errors_total": dict(r.errors),
                    "last_success": r.last_success,
                }
                entry.update(r.last_dict)
                results[variant] = entry
            probes.append(
                {
                    "name": probe.name,
                    "line": probe.line,
                    "method": probe.method,
                    "path": probe.path,
                    "headers": probe.header_names,  # names only: values may be secrets
                    "results": results,
                }
            )
        upstreams = {}
        for variant in self.variants:
            state = self.upstreams[variant]
            upstreams[variant] = {
                "rounds": dict(state.rounds),
                "skipped_rounds": state.skipped,
                "consecutive_failed_rounds": state.consecutive,
                "gating": bool(self.failures) and variant == GATING_VARIANT,
                "last_round": state.last_round,
            }
        return {
            "file": self.cfg.file,
            "interval_seconds": self.cfg.interval,
            "timeout_seconds": self.cfg.timeout,
            "readiness_failures": self.failures or None,
            "upstreams": upstreams,
            "probes": probes,
        }

    def add_routes(self, app: web.Application) -> None:
        async def view(request: web.Request) -> web.Response:
            # the report is assembled on the loop (where the state changes), written in a thread
            report = self.report()
            body = await asyncio.to_thread(orjson.dumps, report, option=orjson.OPT_INDENT_2)
            return web.Response(body=body, content_type="application/json")

        app.router.add_get("/probes", view)

    def collector(self) -> Collector:
        return ProbeCollector(self)


class ProbeCollector(Collector):
    """``infermon_probe_*``: read on the event loop at scrape time, like the other small collectors."""

    def __init__(self, runner: ProbeRunner) -> None:
        self.runner = runner

    def collect(self) -> Iterator[Metric]:
        runner = self.runner
        labels = ("probe", "variant")
        success = GaugeMetricFamily(
            "infermon_probe_success", "1 when the probe's last run matched every expectation, else 0.", labels=labels
        )
        duration = GaugeMetricFamily(
            "infermon_probe_duration_seconds",
            "Duration of the probe's last run, send to the end of the answer (or the failure).",
            labels=labels,
        )
        mismatch = CounterMetricFamily(
            "infermon_probe_mismatch",
            "Probe runs whose answer failed an expectation (status, JSON, label, condition, latency).",
            labels=labels,
        )
        errors = CounterMetricFamily(
            "infermon_probe_errors",
            "Probe runs that got no answer, by kind (connect, timeout, reset, protocol, pool_exhausted, "
            "too_large, invalid).",
            labels=(*labels, "kind"),
        )
        last = GaugeMetricFamily(
            "infermon_probe_last_success_timestamp_seconds",
            "Unix time of the probe's last successful run (absent until one succeeds).",
            labels=labels,
        )
        for (name, variant), r in runner.results.items():
            key = (name, variant)
            if r.last is not None:
                success.add_metric(key, 1.0 if r.last.ok else 0.0)
                duration.add_metric(key, r.last.duration)
            if r.runs:
                mismatch.add_metric(key, r.mismatches)
            for kind, n in r.errors.items():
                errors.add_metric((*key, kind), n)
            if r.last_success is not None:
                last.add_metric(key, r.last_success)
        rounds = CounterMetricFamily(
            "infermon_probe_rounds",
            "Probe rounds completed, by outcome (ok, failed, inconclusive: only probes that found the "
            "connection pool full).",
            labels=("variant", "outcome"),
        )
        skipped = CounterMetricFamily(
            "infermon_probe_rounds_skipped",
            "Probe rounds not started because the previous round of that upstream was still running.",
            labels=("variant",),
        )
        consecutive = GaugeMetricFamily(
            "infermon_probe_consecutive_failed_rounds",
            "Failed probe rounds in a row (what probes.readiness_failures compares with).",
            labels=("variant",),
        )
        for variant, state in runner.upstreams.items():
            for outcome, n in state.rounds.items():
                rounds.add_metric((variant, outcome), n)
            skipped.add_metric((variant,), state.skipped)
            consecutive.add_metric((variant,), state.consecutive)
        yield from (success, duration, mismatch, errors, last, rounds, skipped, consecutive)


__all__ = ["PROBE_HEADER", "ProbeCollector", "ProbeRunner", "Sender", "request_headers", "run_probe", "run_set"]
