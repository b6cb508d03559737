"""Model, version and variant labels for each exchange, with bounded cardinality.

Precedence, per label: a configured response header (read at the upstream head) > the request path
(KServe v1 ``/v1/models/{m}:predict``, Open Inference Protocol v2
``/v2/models/{m}[/versions/{v}]/...``) > on the OpenAI-compatible routes (``llm.routes``), the
``model`` field of the request body (a bounded byte scan of its first ``llm.scan_bytes``, no JSON
parse), or of the response body when the request names none > the configured value.

Two bounds keep the series count finite whatever the traffic:

- per label, a :class:`LabelCap`: an allow-list when configured, otherwise the first ``max_values``
  distinct values; anything else (and any invalid value) becomes ``other``;
- per combination, a budget: at most ``max_combinations`` distinct (model, version, variant) triples.
  A request whose triple does not fit reads ``other`` in all three labels.

A value named by traffic (path or response header) and not yet admitted is admitted only once the
upstream has answered that request with a 2xx head, and so is a new triple: a scan of 404 paths, a
request the proxy answers itself, an upstream failure or a client that leaves before the upstream
answers mints neither a label value nor a budget slot; such a request reads ``other`` in all three
labels. Admitted values and triples stay admitted for the life of the process and keep their labels
for any status. The configured defaults always pass, and so does the all-``other`` triple. With a
split, the variant is the configuration's: a (model, version) confirmed with one variant is admitted
with every variant of the split at once, so the requests of a variant that only ever fails keep its
name.

Labels are final from ``on_upstream_head`` on (or ``on_complete``, when no upstream head came; or, on
an OpenAI-compatible route whose request named no model, the first response body bytes); until
then a request that still waits for its answer reads ``other``. Every request whose labels read
``other`` for one of these reasons is counted in :attr:`Labeler.overflow`, by reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.dataplane.exchange import Exchange
from proxy.dataplane.hooks import Observer
from proxy.sampling.llm import scan_model
from proxy.settings import Labels, Llm

OTHER = "other"
MAX_LABEL_LENGTH = 128
_VALID = re.compile(r"^[A-Za-z0-9_.:@/+-]+\Z")

_V1 = re.compile(r"^/v1/models/([^/:]+)(?::[A-Za-z]+)?\Z")
_V2 = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(?:/[A-Za-z_]+)?\Z")

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"})

#: why a request's labels read ``other`` (the ``reason`` label of ``infermon_label_overflow_total``)
OVERFLOW_REASONS = ("max_combinations", "max_values", "invalid", "unconfirmed")
_ALL_OTHER = (OTHER, OTHER, OTHER)
_EXTRA_KEY = "labels"


def method_label(method: str) -> str:
    return method if method in METHODS else OTHER


class LabelCap:
    """Admit an allow-list, or the first ``max_values`` distinct values; the rest become ``other``.

    :meth:`lookup` answers without admitting anything; :meth:`admit` (also ``cap(value)``) admits.
    """

    def __init__(self, allow: list[str] | None, max_values: int) -> None:
        self.allow = frozenset(allow) if allow is not None else None
        self.max_values = max_values
        self.admitted: dict[str, str] = {}

    def refusal(self, value: str) -> str | None:
        """Why ``value`` is not admitted and cannot be (an :data:`OVERFLOW_REASONS` entry), or None."""
        if value in self.admitted:
            return None
        if len(value) > MAX_LABEL_LENGTH or not _VALID.fullmatch(value):
            return "invalid"
        if self.allow is not None:
            return None if value in self.allow else "max_values"
        return "max_values" if len(self.admitted) >= self.max_values else None

    def lookup(self, value: str) -> str | None:
        """The label of an admitted value, ``other`` for one that can never be admitted, else None."""
        found = self.admitted.get(value)
        if found is not None:
            return found
        return None if self.refusal(value) is None else OTHER

    def admit(self, value: str) -> str:
        found = self.admitted.get(value)
        if found is not None:
            return found
        if self.refusal(value) is not None:
            return OTHER
        self.admitted[value] = value
        return value

    __call__ = admit


def labels_from_path(path: str) -> tuple[str | None, str | None]:
    """(model, version) named by a KServe v1 or Open Inference Protocol v2 path, else (None, None)."""
    if path.startswith("/v2/models/"):
        m = _V2.fullmatch(path)
        if m:
            return m.group(1), m.group(2)
    elif path.startswith("/v1/models/"):
        m = _V1.fullmatch(path)
        if m:
            return m.group(1), None
    return None, None


class _Pending:
    """A request whose labels wait for the upstream's answer: each label's admitted value, or the
    not yet admitted traffic value (``raw`` names which: bit 0 model, 1 version, 2 variant)."""

    __slots__ = ("headed", "labels", "llm", "named", "raw", "reason", "scan")

    def __init__(self, labels: list[str], raw: int, reason: str | None) -> None:
        self.labels = labels
        self.raw = raw
        self.reason = reason  # the first refusal seen on the way (a capped or invalid value)
        #: OpenAI-compatible route: the body bytes scanned so far for ``model`` (None: not scanning)
        self.scan: bytearray | None = None
        self.llm = False  # on an OpenAI-compatible route
        self.named = False  # a body named the model
        self.headed = False  # the upstream head came; settling waits for the response body


class Labeler(Observer):
    """Sets ``ex.model``, ``ex.version`` and ``ex.variant``; registered before any observer that reads them."""

    name = "labels"

    def __init__(self, cfg: Labels, llm: Llm | None = None) -> None:
        self.cfg = cfg
        #: OpenAI-compatible routes whose body names the model
        self.llm_routes = frozenset(llm.routes) if llm is not None and llm.enabled and llm.model_from_body else None
        self.scan_bytes = llm.scan_bytes if llm is not None else 0
        if self.llm_routes is None:  # no body scan: the body hooks stay out of the chain
            self.on_request_body = None  # type: ignore[assignment]
            self.on_response_body = None  # type: ignore[assignment]
        self.defaults = (cfg.model, cfg.version, cfg.variant)
        self.caps = (
            LabelCap(cfg.allow.model, cfg.max_values),
            LabelCap(cfg.allow.version, cfg.max_values),
            LabelCap(cfg.allow.variant, cfg.max_values),
        )
        self.cap_model, self.cap_version, self.cap_variant = self.caps
        self.max_combinations = cfg.max_combinations
        #: admitted (model, version, variant) triples; the defaults and all-``other`` need no slot
        self.combinations: set[tuple[str, str, str]] = set()
        #: the variants of a split (configured upstream names, see :meth:`admit_variants`)
        self.split_variants: tuple[str, ...] = ()
        self.overflow: dict[str, int] = dict.fromkeys(OVERFLOW_REASONS, 0)
        #: a request header naming the variant (a mesh routes): read at the head, a traffic value
        self.variant_request_header = (
            cfg.variant_request_header.encode("latin-1") if cfg.variant_request_header else None
        )
        self.headers = [
            (h.encode("latin-1"), index)
            for h, index in ((cfg.model_header, 0), (cfg.version_header, 1), (cfg.variant_header, 2))
            if h is not None
        ]

    def collector(self) -> Collector:
        return LabelCollector(self)

    def admit_variants(self, names: list[str]) -> None:
        """The variants of a split (configured upstream names): admitted from the start, each with
        the default model and version, so their first requests need no 2xx to be labelled."""
        model, version, _ = self.defaults
        admitted = []
        for name in names:
            variant = self.cap_variant.admit(name)
            if variant != OTHER:
                admitted.append(variant)
                self.combinations.add((model, version, variant))
        self.split_variants = tuple(admitted)

    # -- hooks --------------------------------------------------------------------------------

    def on_request_head(self, ex: Exchange) -> None:
        cfg = self.cfg
        model, version, variant = self.defaults
        raw = 0
        reason: str | None = None
        if ex.variant:  # a split chose the variant (the upstream's name, from the configuration)
            variant = ex.variant
        elif self.variant_request_header is not None:  # a mesh names it in a request header
            value = ex.header(self.variant_request_header)
            text = value.decode("latin-1").strip() if value else ""
            if text:
                found = self.cap_variant.lookup(text)
                if found is None:
                    variant, raw = text, 4
                else:
                    variant = found
                    if found == OTHER:
                        reason = self.cap_variant.refusal(text)
        if not (cfg.from_path and ex.path.startswith(("/v1/models/", "/v2/models/"))):
            routes = self.llm_routes
            if routes is not None and ex.path in routes:  # the model comes from the body, if it says
                ex.model = ex.version = ex.variant = OTHER
                pending = self._pend(ex, [model, version, variant], raw, reason)
                pending.scan = bytearray()
                pending.llm = True
                return
            if not raw and reason is None:
                ex.model, ex.version, ex.variant = model, version, variant
                return
            raw_model = raw_version = None
        else:
            raw_model, raw_version = labels_from_path(ex.path)
        if raw_model is not None:
            found = self.cap_model.lookup(raw_model)
            if found is None:
                model, raw = raw_model, raw | 1
            else:
                model = found
                if found == OTHER:
                    reason = self.cap_model.refusal(raw_model)
        if raw_version is not None:
            found = self.cap_version.lookup(raw_version)
            if found is None:
                version, raw = raw_version, raw | 2
            else:
                version = found
                if found == OTHER and reason is None:
                    reason = self.cap_version.refusal(raw_version)
        combo = (model, version, variant)
        known = not raw and self._known(combo)
        if known:
            ex.model, ex.version, ex.variant = combo
            if reason is None:
                return  # the common case: admitted labels, nothing to wait for
            if not self.headers:
                self.overflow[reason] += 1
                return
        else:  # new: waits for a 2xx answer, and reads "other" until then
            ex.model = ex.version = ex.variant = OTHER
        self._pend(ex, [model, version, variant], raw, reason)

    def on_request_body(self, ex: Exchange, chunk: bytes) -> None:
        extra = ex.extra
        pending: _Pending | None = extra.get(_EXTRA_KEY) if extra else None
        if pending is not None and pending.scan is not None:
            self._scan(pending, chunk)

    def on_response_body(self, ex: Exchange, chunk: bytes) -> None:
        extra = ex.extra
        pending: _Pending | None = extra.get(_EXTRA_KEY) if extra else None
        if pending is None or not pending.headed:
            return
        if pending.scan is not None:
            self._scan(pending, chunk)
        if pending.scan is None:  # named, or nothing in the first bytes: the labels are final now
            extra.pop(_EXTRA_KEY, None)  # type: ignore[union-attr]
            self._settle(ex, pending, 200 <= ex.status < 300)

    def _scan(self, pending: _Pending, chunk: bytes) -> None:
        """Look for ``"model": "..."`` in the first ``scan_bytes`` of a body."""
        buf = pending.scan
        assert buf is not None
        room = self.scan_bytes - len(buf)
        buf += chunk[:room] if len(chunk) > room else chunk
        name = scan_model(bytes(buf))
        if name is not None:
            pending.scan = None
            pending.named = True
            found = self.cap_model.lookup(name)
            if found is None:
                pending.labels[0] = name
                pending.raw |= 1
            else:
                pending.labels[0] = found
                pending.raw &= ~1
                if found == OTHER and pending.reason is None:
                    pending.reason = self.cap_model.refusal(name)
        elif len(buf) >= self.scan_bytes:
            pending.scan = None

    def on_upstream_head(self, ex: Exchange) -> None:
        extra = ex.extra
        pending: _Pending | None = extra.pop(_EXTRA_KEY, None) if extra else None
        if pending is not None and pending.llm:
            pending.scan = None  # the request body is over
            body_follows = 200 <= ex.status < 300 and ex.status != 204 and ex.method != "HEAD"
            if not pending.named and body_follows and not self._headers(ex, pending) & 1:
                # the request named no model: the response's first bytes may (settled there)
                pending.scan = bytearray()
                pending.headed = True
                extra[_EXTRA_KEY] = pending  # type: ignore[index]
                return
        if not self.headers:
            if pending is not None:
                self._settle(ex, pending, 200 <= ex.status < 300)
            return
        if pending is None:
            pending = _Pending([ex.model, ex.version, ex.variant], 0, None)
        self._headers(ex, pending)
        self._settle(ex, pending, 200 <= ex.status < 300)

    def _headers(self, ex: Exchange, pending: _Pending) -> int:
        """Labels from the configured response headers (they win over the path and the body);
        returns which were set (bit 0 model, 1 version, 2 variant)."""
        labels = pending.labels
        found_bits = 0
        for name, index in self.headers:
            value = ex.response_header(name)
            if value is None:
                continue
            text = value.decode("latin-1").strip()
            if not text:  # an empty header names nothing: the path or default label stays
                continue
            found_bits |= 1 << index
            cap = self.caps[index]
            found = cap.lookup(text)
            if found is None:
                labels[index] = text
                pending.raw |= 1 << index
            else:
                labels[index] = found
                pending.raw &= ~(1 << index)
                if found == OTHER and pending.reason is None:
                    pending.reason = cap.refusal(text)
        return found_bits

    def on_complete(self, ex: Exchange) -> None:
        extra = ex.extra
        if extra:
            pending: _Pending | None = extra.pop(_EXTRA_KEY, None)
            if pending is not None:  # no upstream head came (nothing is admitted), or no body after it
                self._settle(ex, pending, pending.headed and 200 <= ex.status < 300)

    # -- decisions ----------------------------------------------------------------------------

    def _known(self, combo: tuple[str, str, str]) -> bool:
        return combo in self.combinations or combo == self.defaults or combo == _ALL_OTHER

    def _pend(self, ex: Exchange, labels: list[str], raw: int, reason: str | None) -> _Pending:
        pending = _Pending(labels, raw, reason)
        if ex.extra is None:
            ex.extra = {_EXTRA_KEY: pending}
        else:
            ex.extra[_EXTRA_KEY] = pending
        return pending

    def _settle(self, ex: Exchange, pending: _Pending, ok: bool) -> None:
        """Final labels: admit what a 2xx answer confirms and the budget allows, else all ``other``."""
        labels = pending.labels
        raw = pending.raw
        if raw and not ok:
            self._fold(ex, "unconfirmed")
            return
        caps = self.caps
        if raw:  # what the labels would be; admitted below only if the triple is admitted too
            for i in range(3):
                if raw & (1 << i) and caps[i].refusal(labels[i]) is not None:
                    if pending.reason is None:
                        pending.reason = caps[i].refusal(labels[i])
                    labels[i] = OTHER
        combo = (labels[0], labels[1], labels[2])
        if not self._known(combo):
            if not ok:
                self._fold(ex, "unconfirmed")
                return
            if len(self.combinations) >= self.max_combinations:
                self._fold(ex, "max_combinations")
                return
            self.combinations.add(combo)
            if combo[2] in self.split_variants:
                self._admit_siblings(combo)
        if raw:
            for i in range(3):
                if raw & (1 << i) and labels[i] != OTHER:
                    labels[i] = caps[i].admit(labels[i])
        ex.model, ex.version, ex.variant = combo
        if pending.reason is not None:
            self.overflow[pending.reason] += 1

    def _admit_siblings(self, combo: tuple[str, str, str]) -> None:
        """A (model, version) a 2xx answer confirmed with one variant of a split, admitted with
        every other variant of it too (the budget permitting): their names come from the
        configuration, so a canary that only ever fails still has its own label, not ``other``."""
        model, version, _ = combo
        for variant in self.split_variants:
            if len(self.combinations) >= self.max_combinations:
                return
            self.combinations.add((model, version, variant))

    def _fold(self, ex: Exchange, reason: str) -> None:
        ex.model = ex.version = ex.variant = OTHER
        self.overflow[reason] += 1


class LabelCollector(Collector):
    """``infermon_label_overflow_total`` and ``infermon_label_combinations``, read at scrape time."""

    def __init__(self, labeler: Labeler) -> None:
        self.labeler = labeler

    def collect(self) -> Iterator[Metric]:
        overflow = CounterMetricFamily(
            "infermon_label_overflow",
            "Requests whose model, version and variant labels read 'other', by reason: max_combinations, "
            "max_values, invalid, unconfirmed (no 2xx answer for a new value).",
            labels=("reason",),
        )
        for reason, n in self.labeler.overflow.items():
            overflow.add_metric((reason,), n)
        yield overflow
        yield GaugeMetricFamily(
            "infermon_label_combinations",
            "Distinct (model, version, variant) label combinations admitted (labels.max_combinations).",
            value=len(self.labeler.combinations),
        )
