"""Figures of one benchmark run, the targets they are held to, and how they are printed.

Targets (infermon against the same run's direct and nginx figures):

- throughput at c=32 is at least half of nginx's;
- p50 added over direct at c=1 is at most 80 us;
- CPU per request of the proxy process is at most 60 us, at c=1 and at c=32;
- CPU per request at c=32 is at most 3x the nginx proxy's;
- peak RSS is at most 60 MB.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from bench.scrape import ScrapeSummary
from bench.sse_client import SseSummary
from bench.syscalls import SampleGroup, SideOptions

MB = 1024 * 1024
TARGET_RPS_RATIO = 0.4  # the data-plane issue: at least 0.4x the nginx proxy at c=32
TARGET_ADDED_P50_US = 80.0
TARGET_CPU_US = 60.0
TARGET_CPU_RATIO = 3.0
#: the targets that are infermon builds: this checkout's, and the one --baseline names
INFERMONS = ("infermon", "infermon-before")
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
    # The split of cpu_us_per_request, and kernel counters, of the target's process tree per request
    user_us_per_request: float = 0.0
    system_us_per_request: float = 0.0
    voluntary_per_request: float = 0.0  # context switches where it blocked: wake-ups
    involuntary_per_request: float = 0.0  # preemptions
    minor_faults_per_request: float = 0.0
    # The upstream nginx's CPU per request during the same run (None on the direct rows: it is the target)
    upstream_user_us_per_request: float | None = None
    upstream_system_us_per_request: float | None = None
    upstream_voluntary_per_request: float | None = None

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
    before: SseSummary | None = None  # infermon-before (--baseline)
    added_first_event_us_before: float | None = None
    streamed_before: bool | None = None


@dataclass
class LatencyFigures:
    """One wrk run's latencies in microseconds and its rate."""

    rps: float
    p50_us: float
    p99_us: float
    max_us: float
    requests: int
    errors: int


@dataclass
class ScrapeFigures:
    """c=high runs of one infermon build without and with /metrics scraped every `interval` s."""

    target: str
    interval_s: float
    paths: int  # distinct inference paths sent first (label sets grown)
    seconds: float  # of each wrk run (longer than --duration when a scrape takes long)
    idle: ScrapeSummary  # back-to-back scrapes with no load
    without: LatencyFigures
    with_scrapes: LatencyFigures
    scrapes: ScrapeSummary  # those made during the `with_scrapes` run


@dataclass
class SyscallFigures:
    """strace of one server under wrk -c high: syscalls per request, a sample of I/O calls, socket options."""

    target: str
    seconds: float
    requests: int  # completed by wrk while strace -c was attached
    rps: float  # under strace (several times slower than without)
    counts: dict[str, tuple[float, float]]  # syscall -> (calls, errors) per request
    sample_requests: int = 0  # completed while the sample was taken
    sample: list[SampleGroup] = field(default_factory=list)
    sockets: list[SideOptions] = field(default_factory=list)


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
                user_us_per_request=median([f.user_us_per_request for f in group]),
                system_us_per_request=median([f.system_us_per_request for f in group]),
                voluntary_per_request=median([f.voluntary_per_request for f in group]),
                involuntary_per_request=median([f.involuntary_per_request for f in group]),
                minor_faults_per_request=median([f.minor_faults_per_request for f in group]),
                upstream_user_us_per_request=_median_or_none([f.upstream_user_us_per_request for f in group]),
                upstream_system_us_per_request=_median_or_none([f.upstream_system_us_per_request for f in group]),
                upstream_voluntary_per_request=_median_or_none([f.upstream_voluntary_per_request for f in group]),
            )
        )
    return out


def _median_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


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
    nginx_cpu = nginx_hi.cpu_us_per_request if nginx_hi else None
    cpu_ratio = infermon_hi.cpu_us_per_request / nginx_cpu if infermon_hi and nginx_cpu else None
    out.append(
        Check(
            f"CPU per request c={high} vs nginx",
            cpu_ratio,
            f"<= {TARGET_CPU_RATIO:g}x",
            None if cpu_ratio is None else cpu_ratio <= TARGET_CPU_RATIO,
        )
    )
    rss = [f.rss_peak_mb for f in load if f.target == "infermon"] + [
        f.rss_after_mb for f in load if f.target == "infermon"
    ]
    peak = max(rss) if rss else None
    out.append(Check("peak RSS (MB)", peak, f"<= {TARGET_RSS_MB:g}", None if peak is None else peak <= TARGET_RSS_MB))
    return out


def _ratio_pairs(load: list[LoadFigures], mine: str, theirs: str, high: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for conc in (1, high):
        a, b = find(load, mine, conc), find(load, theirs, conc)
        if not a or not b:
            continue
        pairs = {
            "rps": (a.rps, b.rps),
            "p50": (a.p50_us, b.p50_us),
            "p99": (a.p99_us, b.p99_us),
            "cpu_per_request": (a.cpu_us_per_request, b.cpu_us_per_request),
            "user_per_request": (a.user_us_per_request, b.user_us_per_request),
            "system_per_request": (a.system_us_per_request, b.system_us_per_request),
            "rss_peak": (a.rss_peak_mb, b.rss_peak_mb),
        }
        for name, (x, y) in pairs.items():
            if y:
                out[f"{name}_c{conc}"] = x / y
    return out


def ratios(load: list[LoadFigures], high: int) -> dict[str, float]:
    """infermon / nginx for each figure both have."""
    return _ratio_pairs(load, "infermon", "nginx", high)


def ratio_matrix(load: list[LoadFigures], high: int) -> dict[str, dict[str, float]]:
    """'a/b' -> figure -> ratio, for each infermon build against nginx and direct, and after/before."""
    present = {f.target for f in load}
    pairs: list[tuple[str, str]] = [
        (m, other) for m in INFERMONS for other in ("nginx", "direct") if m in present and other in present
    ]
    if {"infermon", "infermon-before"} <= present:
        pairs.append(("infermon", "infermon-before"))
    out = {f"{a}/{b}": _ratio_pairs(load, a, b, high) for a, b in pairs}
    return {name: values for name, values in out.items() if values}


def matrix_table(matrix: dict[str, dict[str, float]]) -> str:
    names = list(matrix)
    keys: list[str] = []
    for values in matrix.values():
        keys += [k for k in values if k not in keys]
    width = max(8, *(len(n) for n in names))
    lines = [f"{'':<22}" + "".join(f" {n:>{width}}" for n in names)]
    for key in keys:
        cells = "".join(
            f" {format(matrix[n][key], '.2f') + 'x' if key in matrix[n] else '-':>{width}}" for n in names
        )
        lines.append(f"  {key:<20}" + cells)
    return "\n".join(lines)


def cpu_split_table(load: list[LoadFigures]) -> str:
    header = (
        f"{'target':<15} {'conc':>4} {'user us':>8} {'sys us':>7} {'total us':>8} {'wakeups':>8} "
        f"{'preempt':>8} {'minflt':>7} {'upstream user+sys us':>21} {'wakeups':>8}"
    )
    lines = [
        "CPU per request of each server process tree (/proc/PID/stat utime, stime; switches and faults per request)",
        header,
        "-" * len(header),
    ]
    for f in load:
        up = (
            "-"
            if f.upstream_user_us_per_request is None or f.upstream_system_us_per_request is None
            else f"{f.upstream_user_us_per_request:.1f} + {f.upstream_system_us_per_request:.1f}"
        )
        lines.append(
            f"{f.target:<15} {f.connections:>4} {f.user_us_per_request:>8.1f} {f.system_us_per_request:>7.1f} "
            f"{f.cpu_us_per_request:>8.1f} {f.voluntary_per_request:>8.2f} {f.involuntary_per_request:>8.2f} "
            f"{f.minor_faults_per_request:>7.2f} {up:>21} {_num(f.upstream_voluntary_per_request, '>8.2f'):>8}"
        )
    return "\n".join(lines)


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def load_table(load: list[LoadFigures]) -> str:
    direct_p50 = {f.connections: f.p50_us for f in load if f.target == "direct"}
    header = (
        f"{'target':<15} {'conc':>4} {'rps':>9} {'p50 us':>8} {'p99 us':>8} {'+p50 us':>8} "
        f"{'cpu s/10k':>9} {'cpu us/req':>10} {'peak RSS MB':>11} {'RSS after MB':>12} {'errors':>7} "
        f"{'other %':>7}"
    )
    lines = [header, "-" * len(header)]
    for f in load:
        base = direct_p50.get(f.connections)
        added = None if f.target == "direct" or base is None else f.p50_us - base
        lines.append(
            f"{f.target:<15} {f.connections:>4} {f.rps:>9.0f} {f.p50_us:>8.0f} {f.p99_us:>8.0f} "
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


def sse_table(sse: SseFigures) -> str:
    header = f"{'target':<9} {'head ms':>8} {'1st event ms':>12} {'last event ms':>13} {'gap ms':>7} {'min gap ms':>10}"
    lines = [
        f"SSE: {sse.events} events, {sse.delay_ms:g} ms apart, medians over the streams",
        header,
        "-" * len(header),
    ]
    for name, summary in (("direct", sse.direct), ("infermon", sse.infermon), ("before", sse.before)):
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
    if sse.added_first_event_us_before is not None:
        lines.append(f"added time to first event, infermon-before: {sse.added_first_event_us_before:.0f} us")
    if sse.streamed_before is not None:
        verdict = "not buffered" if sse.streamed_before else "BUFFERED"
        lines.append(f"stream through infermon-before: {verdict}")
    return "\n".join(lines)


def scrape_table(items: list[ScrapeFigures]) -> str:
    header = (
        f"{'target':<15} {'scraping':<8} {'rps':>7} {'p50 us':>8} {'p99 us':>8} {'max us':>8} {'errors':>6} "
        f"{'scrapes':>7} {'scrape ms med/max':>17}"
    )
    lines: list[str] = []
    for item in items:
        lines.append(
            f"{item.target}: {item.paths} inference paths sent first; exposition {item.idle.series} samples, "
            f"{item.idle.kib:.0f} KiB; idle scrape {item.idle.median_ms:.1f} ms (median of {item.idle.count}); "
            f"wrk runs of {item.seconds:g} s"
        )
    lines += [header, "-" * len(header)]
    for item in items:
        for label, run, scrapes in (("no", item.without, None), ("yes", item.with_scrapes, item.scrapes)):
            cells = "-".rjust(7) + " " + "-".rjust(17)
            if scrapes is not None:
                failed = f" ({scrapes.failed} failed)" if scrapes.failed else ""
                cells = f"{scrapes.count:>7} {f'{scrapes.median_ms:.1f}/{scrapes.max_ms:.1f}':>17}{failed}"
            lines.append(
                f"{item.target:<15} {label:<8} {run.rps:>7.0f} {run.p50_us:>8.0f} {run.p99_us:>8.0f} "
                f"{run.max_us:>8.0f} {run.errors:>6} {cells}"
            )
    return "\n".join(lines)


@dataclass
class PerfFigures:
    """perf stat of one server's tracepoints under wrk -c high, per request, at full speed."""

    target: str
    seconds: float
    requests: int
    rps: float
    counts: dict[str, tuple[float, float]]  # counter -> (per request, 0.0)
    # perf record of a second wrk run: us per request sampled on-CPU, in the kernel, under kernel functions
    profile: dict[str, tuple[float, float]] = field(default_factory=dict)  # label -> (us per request, 0.0)
    profile_rps: float = 0.0


def syscall_table(
    items: list[SyscallFigures] | list[PerfFigures],
    title: str = "syscalls per request under strace -c -f",
    keep_order: bool = False,
) -> str:
    """Counts per request, one column per server; errors (mostly EAGAIN) in parentheses."""
    names: dict[str, float] = {}
    for item in items:
        for name, (calls, _) in item.counts.items():
            names[name] = max(names.get(name, 0.0), calls)
    ranked = list(names.items()) if keep_order else sorted(names.items(), key=lambda kv: -kv[1])
    order = [n for n, top in ranked if top >= 0.005]
    width = max(15, *(len(i.target) for i in items))
    first = max([16, *(len(n) + 1 for n in order)])
    lines = [
        f"{title} (wrk -c high; rps meanwhile: " + ", ".join(f"{i.target} {i.rps:.0f}" for i in items) + ")",
        f"{'per request':<{first}}" + "".join(f" {i.target:>{width}}" for i in items),
    ]
    for name in order:
        cells = ""
        for item in items:
            calls, errors = item.counts.get(name, (0.0, 0.0))
            text = f"{calls:.2f}" + (f" ({errors:.2f})" if errors >= 0.005 else "")
            cells += f" {text:>{width}}"
        lines.append(f"{name:<{first}}" + cells)
    if not keep_order:
        totals = "".join(f" {sum(c for c, _ in i.counts.values()):>{width}.2f}" for i in items)
        lines.append(f"{'total':<{first}}" + totals)
    return "\n".join(lines)


def sample_table(item: SyscallFigures) -> str:
    lines = [
        f"{item.target}: first {sum(g.calls for g in item.sample)} I/O and epoll calls under strace -yy "
        f"({item.sample_requests} requests completed meanwhile); bytes per call, or events per epoll wait",
        f"  {'syscall':<13} {'side':<10} {'calls':>6} {'errors':>6} {'median':>7} {'min':>6} {'max':>7} {'iov':>4}",
    ]
    for g in item.sample:
        iov = f"{g.iov_median:.0f}" if g.iov_median else "-"
        lines.append(
            f"  {g.name:<13} {g.side:<10} {g.calls:>6} {g.errors:>6} {g.median:>7.0f} {g.low:>6} {g.high:>7} {iov:>4}"
        )
    if item.sockets:
        lines.append("  sockets: " + "; ".join(_side_options(s) for s in item.sockets))
    return "\n".join(lines)


def _side_options(s: SideOptions) -> str:
    buffers = f"sndbuf {'/'.join(map(str, s.sndbuf))} rcvbuf {'/'.join(map(str, s.rcvbuf))}"
    return f"{s.side} {s.sockets}: TCP_NODELAY {s.nodelay}/{s.sockets}, TCP_CORK {s.cork}, {buffers}"


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
