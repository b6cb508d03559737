"""Model, version and variant labels for each exchange, with bounded cardinality.

Precedence, per label: a configured response header (read at the upstream head) > the request path
(KServe v1 ``/v1/models/{m}:predict``, Open Inference Protocol v2
``/v2/models/{m}[/versions/{v}]/...``) > the configured value. Every traffic-fed value passes a
:class:`LabelCap`: an allow-list when configured, otherwise the first ``max_values`` distinct values;
anything else becomes ``other``.
"""

from __future__ import annotations

import re

from proxy.dataplane.exchange import Exchange
from proxy.dataplane.hooks import Observer
from proxy.settings import Labels

OTHER = "other"
MAX_LABEL_LENGTH = 128
_VALID = re.compile(r"^[A-Za-z0-9_.:@/+-]+$")

_V1 = re.compile(r"^/v1/models/([^/:]+)(?::[A-Za-z]+)?$")
_V2 = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(?:/[A-Za-z_]+)?$")

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"})


def method_label(method: str) -> str:
    return method if method in METHODS else OTHER


class LabelCap:
    """Admit an allow-list, or the first ``max_values`` distinct values; the rest become ``other``."""

    def __init__(self, allow: list[str] | None, max_values: int) -> None:
        self.allow = frozenset(allow) if allow is not None else None
        self.max_values = max_values
        self.admitted: dict[str, str] = {}

    def __call__(self, value: str) -> str:
        found = self.admitted.get(value)
        if found is not None:
            return found
        if len(value) > MAX_LABEL_LENGTH or not _VALID.match(value):
            return OTHER
        if self.allow is not None:
            if value not in self.allow:
                return OTHER
        elif len(self.admitted) >= self.max_values:
            return OTHER
        self.admitted[value] = value
        return value


def labels_from_path(path: str) -> tuple[str | None, str | None]:
    """(model, version) named by a KServe v1 or Open Inference Protocol v2 path, else (None, None)."""
    if path.startswith("/v2/models/"):
        m = _V2.match(path)
        if m:
            return m.group(1), m.group(2)
    elif path.startswith("/v1/models/"):
        m = _V1.match(path)
        if m:
            return m.group(1), None
    return None, None


class Labeler(Observer):
    """Sets ``ex.model``, ``ex.version`` and ``ex.variant``; registered before any observer that reads them."""

    name = "labels"

    def __init__(self, cfg: Labels) -> None:
        self.cfg = cfg
        self.cap_model = LabelCap(cfg.allow.model, cfg.max_values)
        self.cap_version = LabelCap(cfg.allow.version, cfg.max_values)
        self.cap_variant = LabelCap(cfg.allow.variant, cfg.max_values)
        self.headers = [
            (h.encode("latin-1"), attr, cap)
            for h, attr, cap in (
                (cfg.model_header, "model", self.cap_model),
                (cfg.version_header, "version", self.cap_version),
                (cfg.variant_header, "variant", self.cap_variant),
            )
            if h is not None
        ]
        if not self.headers:
            self.on_upstream_head = None  # type: ignore[assignment]

    def on_request_head(self, ex: Exchange) -> None:
        cfg = self.cfg
        ex.model = cfg.model
        ex.version = cfg.version
        ex.variant = cfg.variant
        if cfg.from_path and ex.path.startswith(("/v1/models/", "/v2/models/")):
            model, version = labels_from_path(ex.path)
            if model is not None:
                ex.model = self.cap_model(model)
            if version is not None:
                ex.version = self.cap_version(version)

    def on_upstream_head(self, ex: Exchange) -> None:
        for name, attr, cap in self.headers:
            value = ex.response_header(name)
            if value is not None:
                text = value.decode("latin-1").strip()
                if text:  # an empty header names nothing: the path or default label stays
                    setattr(ex, attr, cap(text))
