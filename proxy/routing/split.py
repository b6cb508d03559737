"""Weighted, sticky splitting of client traffic between named upstreams (canary and A/B releases).

The :class:`Splitter` is the first observer: at each request head it picks a variant and sets
``ex.variant`` to its name, which every later observer (labels, metrics, spans, logs, samples) sees;
the data plane's router then sends the request to the pool of that name. The choice:

1. ``split.force_header`` (off unless configured): a request naming a known variant goes there;
2. ``split.sticky`` (``header:NAME`` or ``cookie:NAME``): the key is hashed (BLAKE2b, no secret, so
   every replica computes the same point) to a point in [0, 1), and the variants' weights, in name
   order, are laid out on that interval: the same key keeps its variant across requests and
   replicas while the weights stay the same;
3. otherwise a random point, so requests split by weight.

With ``split.failover`` a variant whose upstream is down (its probe failed) gives its share to the
others. Weights change at run time (:meth:`set_weights`, from ``PUT /split`` and SIGHUP): each
change is logged and exported as ``infermon_split_weight{variant}``. A weight of 0 sends no new
request to a variant; its requests in flight finish.
"""

from __future__ import annotations

import hashlib
import logging
from bisect import bisect_right
from collections.abc import Callable, Iterator, Mapping
from random import random
from typing import TYPE_CHECKING

from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.dataplane.exchange import Exchange
from proxy.dataplane.hooks import Observer
from proxy.settings import ProxyConfig

if TYPE_CHECKING:
    from proxy.dataplane.upstream import UpstreamPool

log = logging.getLogger("infermon.split")

_SCALE = float(1 << 64)


def sticky_point(key: bytes) -> float:
    """The key's point in [0, 1): the same on every replica and every run."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / _SCALE


def cookie_value(header: bytes, name: bytes) -> bytes | None:
    """The value of cookie ``name`` in a Cookie header (RFC 6265 5.4 form: ``a=1; b=2``)."""
    for part in header.split(b";"):
        key, sep, value = part.strip().partition(b"=")
        if sep and key == name:
            return value.strip().strip(b'"')
    return None


class _Table:
    """Cumulative weights over the variants in name order, for one bisect per request."""

    __slots__ = ("bounds", "names", "shares", "weights")

    def __init__(self, weights: Mapping[str, float]) -> None:
        self.weights = dict(weights)
        # scaled by the largest first: weights of any scale (1e308 each) must not sum to infinity
        top = max(weights.values(), default=0.0)
        scaled = {n: w / top if top > 0 else 0.0 for n, w in weights.items()}
        total = sum(scaled.values())
        #: each variant's share of new requests, 0 to 1
        self.shares = {n: w / total if total > 0 else 0.0 for n, w in scaled.items()}
        live = sorted((n, w) for n, w in self.shares.items() if w > 0)
        self.names = [n for n, _ in live]
        bounds: list[float] = []
        acc = 0.0
        for _, w in live:
            acc += w
            bounds.append(acc)
        if bounds:
            bounds[-1] = 1.0
        self.bounds = bounds

    def pick(self, point: float) -> str | None:
        if not self.names:
            return None
        return self.names[min(bisect_right(self.bounds, point), len(self.names) - 1)]


class Splitter(Observer):
    name = "split"

    def __init__(self, cfg: ProxyConfig) -> None:
        split = cfg.split
        self.variants = cfg.variants()
        self.failover = split.failover
        self.force = split.force_header.encode("latin-1") if split.force_header else None
        self.sticky_header: bytes | None = None
        self.sticky_cookie: bytes | None = None
        if split.sticky is not None:
            kind, _, name = split.sticky.partition(":")
            if kind == "header":
                self.sticky_header = name.encode("latin-1")
            else:
                self.sticky_cookie = name.encode("latin-1")
        weights = dict(split.weights) if split.weights else {"stable": 1.0}
        self.table = _Table({v: weights.get(v, 0.0) for v in self.variants})
        #: the variant's upstream health (its probe), set by ProxyApp once the probes run
        self.healthy: Callable[[str], bool] = lambda name: True
        self.pools: dict[str, UpstreamPool] = {}
        self.changes = 0

    # -- the request path ---------------------------------------------------------------------

    def on_request_head(self, ex: Exchange) -> None:
        ex.upstream = ex.variant = self.choose(ex)

    def choose(self, ex: Exchange) -> str:
        force = self.force
        if force is not None:
            named = ex.header(force)
            if named is not None:
                text = named.decode("latin-1").strip()
                if text in self.table.weights:
                    return text
        table = self.table
        key = self._key(ex)
        point = sticky_point(key) if key else random()
        name = table.pick(point)
        if name is None:
            return "stable"
        if self.failover and not self.healthy(name):
            up = {n: w for n, w in table.weights.items() if w > 0 and n != name and self.healthy(n)}
            if up:
                other = _Table(up).pick(point)
                if other is not None:
                    return other
        return name

    def _key(self, ex: Exchange) -> bytes | None:
        if self.sticky_header is not None:
            value = ex.header(self.sticky_header)
            return value.strip() if value else None
        if self.sticky_cookie is not None:
            for key, value in ex.request_headers:
                if key.lower() == b"cookie":
                    found = cookie_value(value, self.sticky_cookie)
                    if found:
                        return found
        return None

    def route(self, ex: Exchange) -> UpstreamPool:
        """The data plane's router: the pool of the variant chosen at the head."""
        return self.pools.get(ex.upstream) or self.pools["stable"]

    # -- run-time changes ---------------------------------------------------------------------

    def check_weights(self, weights: object) -> dict[str, float]:
        """Validated weights (every variant; those not named get 0), or ValueError saying what is wrong."""
        if not isinstance(weights, dict):
            raise ValueError('expected a JSON object of weights, for example {"stable": 95, "canary": 5}')
        out = dict.fromkeys(self.variants, 0.0)
        for name, weight in weights.items():
            if name not in out:
                raise ValueError(f"{name!r} is not a variant (variants: {', '.join(self.variants)})")
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight >= 0:
                raise ValueError(f"the weight of {name!r} must be a number >= 0, not {weight!r}")
            if weight == float("inf"):
                raise ValueError(f"the weight of {name!r} must be finite")
            out[name] = float(weight)
        if not any(w > 0 for w in out.values()):
            raise ValueError("every weight is 0: give at least one variant a weight above 0")
        return out

    def set_weights(self, weights: Mapping[str, float], source: str) -> None:
        old = self.table.weights
        self.table = _Table(weights)
        self.changes += 1
        log.info("split weights changed by %s: %s -> %s", source, _shares(old), _shares(self.table.weights))

    def state(self) -> dict[str, object]:
        table = self.table
        return {
            "weights": table.weights,
            "shares": {n: round(w, 6) for n, w in table.shares.items()},
            "sticky": self._sticky_text(),
            "force_header": self.force.decode("latin-1") if self.force else None,
            "failover": self.failover,
            "healthy": {n: self.healthy(n) for n in self.variants},
        }

    def _sticky_text(self) -> str | None:
        if self.sticky_header is not None:
            return "header:" + self.sticky_header.decode("latin-1")
        if self.sticky_cookie is not None:
            return "cookie:" + self.sticky_cookie.decode("latin-1")
        return None

    def collector(self) -> Collector:
        return SplitCollector(self)


def _shares(weights: Mapping[str, float]) -> str:
    return ", ".join(f"{n}={w:g}" for n, w in weights.items())


class SplitCollector(Collector):
    def __init__(self, splitter: Splitter) -> None:
        self.splitter = splitter

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "infermon_split_weight",
            "Weight of each variant in the traffic split (split.weights, PUT /split, SIGHUP).",
            labels=("variant",),
        )
        for name, weight in self.splitter.table.weights.items():
            gauge.add_metric((name,), weight)
        yield gauge
