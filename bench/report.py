"""Figures of one benchmark run, the targets they are held to, and how they are printed.

Targets (infermon against the same run's direct and nginx figures):

- throughput at c=32 is at least half of nginx's;
- p50 added over direct at c=1 is at most 80 us;
- CPU per request of the proxy process is at most 60 us, at c=1 and at c=32;
- peak RSS is at most 60 MB.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from bench.sse_client import SseSummary

MB = 1024 * 1024
TARGET_RPS_RATIO = 0.5
TARGET_ADDED_P50_US = 80.0
TARGET_CPU_US = 60.0
TARGET_RSS_MB = 60.0


@dataclass
class LoadFigures:
    """One wrk run against one target (direct, nginx or infermon) at one concurrency."""

    target: str
    connections: int
    threads: int
    seconds: float
    requests: int
    rps: float
    p50_us: float
    p90_us: float
    p99_us: float
    p999_us: float
    max_us: float
    non_2xx: int
    socket_errors: int
    cpu_s: float
    cpu_us_per_request: float
    rss_peak_mb: float
    rss_after_mb: float
    rounds: int = 1  # runs this row stands for (medians over them when more than one)
    other_cpu_pct: float = 0.0  # machine CPU used by processes outside this run, % of all cores
    steal_pct: float = 0.0

    @property
    def cpu_s_per_10k(self) -> float:
        return self.cpu_us_per_request * 1e4 / 1e6


@dataclass
class Check:
    name: str
    value: float | None
    limit: str
    passed: bool | None  # None: not measured

    @property
    def verdict(self) -> str:
        return "n/a" if self.passed is None else ("PASS" if self.passed else "MISS")


@dataclass
class SseFigures:
    events: int
    delay_ms: float
    direct: SseSummary | None = None
    infermon: SseSummary | None = None
    added_first_event_us: float | None = None
    streamed: bool | None = None


@dataclass
class SoakFigures:
    requested: int
    requests: int
    seconds: float
    rps: float
    non_2xx: int
    socket_errors: int
    rss_first_mb: float
    rss_last_mb: float
    rss_max_mb: float
    rss_min_mb: float
    rss_mid_mb: float
    samples: list[tuple[float, float]] = field(default_factory=list)


def combine(runs: list[LoadFigures]) -> list[LoadFigures]:
    """One row per (target, concurrency): medians of rates, latencies and CPU; peak of RSS; sums of counts.

    With one round this returns the runs unchanged.
    """
    groups: dict[tuple[str, int], list[LoadFigures]] = {}
    for figures in runs:
        groups.setdefault((figures.target, figures.connections), []).append(figures)
    out: list[LoadFigures] = []
    for group in groups.values():
        if len(group) == 1:
            out.append(group[0])
            continue
        median = statistics.median
        out.append(
            LoadFigures(
                target=group[0].target,
                connections=group[0].connections,
                threads=group[0].threads,
                seconds=sum(f.seconds for f in group),
                requests=sum(f.requests for f in group),
                rps=median([f.rps for f in group]),
                p50_us=median([f.p50_us for f in group]),
                p90_us=median([f.p90_us for f in group]),
                p99_us=median([f.p99_us for f in group]),
                p999_us=median([f.p999_us for f in group]),
                max_us=max(f.max_us for f in group),
                non_2xx=sum(f.non_2xx for f in group),
                socket_errors=sum(f.socket_errors for f in group),
                cpu_s=sum(f.cpu_s for f in group),
                cpu_us_per_request=median([f.cpu_us_per_request for f in group]),
                rss_peak_mb=max(f.rss_peak_mb for f in group),
                rss_after_mb=group[-1].rss_after_mb,
                rounds=len(group),
                other_cpu_pct=median([f.other_cpu_pct for f in group]),
                steal_pct=median([f.steal_pct for f in group]),
            )
        )
    return out


def find(load: list[LoadFigures], target: str, connections: int) -> LoadFigures | None:
    for figures in load:
        if figures.target == target and figures.connections == connections:
            return figures
    return None


def checks(load: list[LoadFigures], high: int) -> list[Check]:
    """The four targets, each PASS, MISS or n/a when a needed figure is missing."""
    infermon_lo, infermon_hi = find(load, "infermon", 1), find(load, "infermon", high)
    nginx_hi, direct_lo = find(load, "nginx", high), find(load, "direct", 1)
    out: list[Check] = []

    ratio = infermon_hi.rps / nginx_hi.rps if infermon_hi and nginx_hi and nginx_hi.rps else None
    out.append(
        Check(
            f"throughput c={high} vs nginx",
            ratio,
            f">= {TARGET_RPS_RATIO}x",
            None if ratio is None else ratio >= TARGET_RPS_RATIO,
        )
    )
    added = infermon_lo.p50_us - direct_lo.p50_us if infermon_lo and direct_lo else None
    out.append(
        Check(
            "added p50 c=1 (us)",
            added,
            f"<= {TARGET_ADDED_P50_US:g}",
            None if added is None else added <= TARGET_ADDED_P50_US,
        )
    )
    for figures, conc in ((infermon_lo, 1), (infermon_hi, high)):
        cpu = figures.cpu_us_per_request if figures else None
        out.append(
            Check(
                f"CPU per request c={conc} (us)",
                cpu,
                f"<= {TARGET_CPU_US:g}",
                None if cpu is None else cpu <= TARGET_CPU_US,
            )
        )
    rss = [f.rss_peak_mb for f in load if f.target == "infermon"] + [
        f.rss_after_mb for f in load if f.target == "infermon"
    ]
    peak = max(rss) if rss else None
    out.append(Check("peak RSS (MB)", peak, f"<= {TARGET_RSS_MB:g}", None if peak is None else peak <= TARGET_RSS_MB))
    return out


def ratios(load: list[LoadFigures], high: int) -> dict[str, float]:
    """infermon / nginx for each figure both have."""
    out: dict[str, float] = {}
    for conc in (1, high):
        mine, theirs = find(load, "infermon", conc), find(load, "nginx", conc)
        if not mine or not theirs:
            continue
        pairs = {
            "rps": (mine.rps, theirs.rps),
            "p50": (mine.p50_us, theirs.p50_us),
            "p99": (mine.p99_us, theirs.p99_us),
            "cpu_per_request": (mine.cpu_us_per_request, theirs.cpu_us_per_request),
            "rss_peak": (mine.rss_peak_mb, theirs.rss_peak_mb),
        }
        for name, (a, b) in pairs.items():
            if b:
                out[f"{name}_c{conc}"] = a / b
    return out


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def load_table(load: list[LoadFigures]) -> str:
    direct_p50 = {f.connections: f.p50_us for f in load if f.target == "direct"}
    header = (
        f"{'target':<9} {'conc':>4} {'rps':>9} {'p50 us':>8} {'p99 us':>8} {'+p50 us':>8} "
        f"{'cpu s/10k':>9} {'cpu us/req':>10} {'peak RSS MB':>11} {'RSS after MB':>12} {'errors':>7} "
        f"{'other %':>7}"
    )
    lines = [header, "-" * len(header)]
    for f in load:
        base = direct_p50.get(f.connections)
        added = None if f.target == "direct" or base is None else f.p50_us - base
        lines.append(
            f"{f.target:<9} {f.connections:>4} {f.rps:>9.0f} {f.p50_us:>8.0f} {f.p99_us:>8.0f} "
            f"{_num(added, '>8.0f'):>8} {f.cpu_s_per_10k:>9.3f} {f.cpu_us_per_request:>10.1f} "
            f"{f.rss_peak_mb:>11.1f} {f.rss_after_mb:>12.1f} {f.non_2xx + f.socket_errors:>7d} "
            f"{f.other_cpu_pct:>7.1f}"
        )
    return "\n".join(lines)


def checks_table(items: list[Check]) -> str:
    lines = []
    for item in items:
        value = _num(item.value, ".2f")
        lines.append(f"  {item.verdict:<4}  {item.name:<28} {value:>9}  (target {item.limit})")
    return "\n".join(lines)


def ratios_table(values: dict[str, float]) -> str:
    return "\n".join(f"  {name:<22} {value:6.2f}x" for name, value in values.items())


def sse_table(sse: SseFigures) -> str:
    header = f"{'target':<9} {'head ms':>8} {'1st event ms':>12} {'last event ms':>13} {'gap ms':>7} {'min gap ms':>10}"
    lines = [
        f"SSE: {sse.events} events, {sse.delay_ms:g} ms apart, medians over the streams",
        header,
        "-" * len(header),
    ]
    for name, summary in (("direct", sse.direct), ("infermon", sse.infermon)):
        if summary is None:
            continue
        lines.append(
            f"{name:<9} {summary.head_ms:>8.3f} {summary.first_event_ms:>12.3f} "
            f"{summary.last_event_ms:>13.1f} {summary.gap_ms:>7.2f} {summary.min_gap_ms:>10.2f}"
        )
    if sse.added_first_event_us is not None:
        lines.append(f"added time to first event: {sse.added_first_event_us:.0f} us")
    if sse.streamed is not None:
        verdict = "events arrive as sent (not buffered)" if sse.streamed else "BUFFERED (events held back)"
        lines.append(f"stream through infermon: {verdict}")
    return "\n".join(lines)


def soak_table(soak: SoakFigures) -> str:
    return "\n".join(
        [
            f"soak: {soak.requests} requests (asked {soak.requested}) in {soak.seconds:.0f} s, "
            f"{soak.rps:.0f} rps, non-2xx {soak.non_2xx}, socket errors {soak.socket_errors}",
            f"  RSS MB: first {soak.rss_first_mb:.1f}  mid {soak.rss_mid_mb:.1f}  "
            f"last {soak.rss_last_mb:.1f}  min {soak.rss_min_mb:.1f}  max {soak.rss_max_mb:.1f}  "
            f"({len(soak.samples)} samples)",
        ]
    )
