"""The ``infermon proxy`` configuration schema (see docs/configuration.md for every key).

Validated by pydantic; loaded through :func:`proxy.config.load`. All durations are seconds, all sizes
bytes. ``null`` means "no limit" where a limit is optional.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")


def split_host_port(value: str) -> tuple[str, int]:
    """``"0.0.0.0:8080"`` -> ``("0.0.0.0", 8080)``; ``"[::1]:80"`` -> ``("::1", 80)``; ``":80"`` binds all."""
    host, sep, port_text = value.rpartition(":")
    if not sep:
        raise ValueError("expected HOST:PORT, for example 0.0.0.0:8080 or [::1]:8080")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    elif host and not _HOSTNAME.match(host):
        raise ValueError(f"{host!r} is not a host name or IPv4 address (write IPv6 as [::1]:PORT)")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} must be a number from 0 to 65535")
    return host or "0.0.0.0", int(port_text)


def _check_host_port(value: str) -> str:
    split_host_port(value)
    return value


HostPort = Annotated[str, AfterValidator(_check_host_port)]
PositiveFloat = Annotated[float, Field(gt=0)]
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _check_header_name(value: str) -> str:
    if not _TOKEN.match(value):
        raise ValueError(f"{value!r} is not a valid HTTP header name")
    return value.lower()


HeaderName = Annotated[str, AfterValidator(_check_header_name)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(_Section):
    """Client-side limits. Going over one is answered with the status in the comment."""

    max_connections: Annotated[int, Field(ge=1)] = 10_000  # 503, then close
    max_in_flight: Annotated[int, Field(ge=1)] = 4_096  # 503
    max_header_bytes: Annotated[int, Field(ge=1024)] = 65_536  # 431: request line + all header lines
    max_headers: Annotated[int, Field(ge=1)] = 100  # 431: header fields in one request head
    max_request_body_bytes: Annotated[int, Field(ge=0)] | None = None  # 413; null = no limit
    header_timeout: PositiveFloat = 10.0  # 408 when the whole request head has not arrived in time
    body_timeout: PositiveFloat = 60.0  # 408 when the request body stalls for this long
    keepalive_timeout: PositiveFloat = 75.0  # idle client connections are closed after this


class LimitValues:
    """The ``limits`` values as plain attributes, for the data plane's hot path.

    A pydantic model's attribute reads go through its ``__getattr__`` hook; these do not.
    """

    __slots__ = (
        "body_timeout",
        "header_timeout",
        "keepalive_timeout",
        "max_connections",
        "max_header_bytes",
        "max_headers",
        "max_in_flight",
        "max_request_body_bytes",
    )

    def __init__(self, limits: Limits) -> None:
        self.max_connections = limits.max_connections
        self.max_in_flight = limits.max_in_flight
        self.max_header_bytes = limits.max_header_bytes
        self.max_headers = limits.max_headers
        self.max_request_body_bytes = limits.max_request_body_bytes
        self.header_timeout = limits.header_timeout
        self.body_timeout = limits.body_timeout
        self.keepalive_timeout = limits.keepalive_timeout


class Upstream(_Section):
    """The model server connection pool."""

    max_connections: Annotated[int, Field(ge=1)] = 256
    max_idle: Annotated[int, Field(ge=0)] = 64
    idle_timeout: PositiveFloat = 30.0  # below the common 60 s keep-alive of model servers
    connect_timeout: PositiveFloat = 5.0  # 504
    pool_timeout: PositiveFloat = 5.0  # waiting for a free connection at max_connections: 503
    response_timeout: PositiveFloat = 600.0  # request sent -> response head: 504 (LLM calls are slow)
    read_timeout: PositiveFloat = 600.0  # silence between response body bytes
    retry_buffer_bytes: Annotated[int, Field(ge=0)] = 65_536  # request bodies kept for the stale retry
    # RFC 9110 9.2.2: only idempotent methods (or requests with Idempotency-Key) are retried unless set
    retry_non_idempotent: bool = False


class LabelAllow(_Section):
    """Per-label allow-lists; a label with a list admits only those traffic-fed values."""

    model: list[str] | None = None
    version: list[str] | None = None
    variant: list[str] | None = None


class Labels(_Section):
    """Where the model, version and variant labels come from, and how many values they may take."""

    model: str = "unknown"
    version: str = "unknown"
    variant: str = "stable"
    from_path: bool = True  # KServe v1 /v1/models/{m}:predict and Open Inference v2 paths
    model_header: HeaderName | None = None  # a response header naming the model
    version_header: HeaderName | None = None
    variant_header: HeaderName | None = None
    allow: LabelAllow = Field(default_factory=lambda: LabelAllow())  # per label: only these values pass
    max_values: Annotated[int, Field(ge=1)] = 50  # distinct traffic-fed values per label, then "other"
    #: distinct (model, version, variant) triples, then all three read "other"; bounds the series count
    max_combinations: Annotated[int, Field(ge=1)] = 100


class Readiness(_Section):
    """How /readyz decides the model server is reachable."""

    path: str | None = None  # GET this path on the upstream and expect 2xx; null = TCP connect only
    interval: PositiveFloat = 5.0
    timeout: PositiveFloat = 2.0

    @field_validator("path")
    @classmethod
    def _path_absolute(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError("must start with '/', for example /v2/health/ready")
        return value


class Drain(_Section):
    """SIGTERM / SIGINT handling."""

    delay: Annotated[float, Field(ge=0)] = 0.0  # keep serving with /readyz false before closing listeners
    timeout: Annotated[float, Field(ge=0)] = 30.0  # in-flight requests get this long to finish


class Metrics(_Section):
    duration_buckets: list[PositiveFloat] = Field(
        default_factory=lambda: [
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
            1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
        ]
    )  # fmt: skip
    size_buckets: list[PositiveFloat] = Field(
        default_factory=lambda: [float(4**n) for n in range(3, 16)]  # 64 B .. 1 GiB
    )
    gap_buckets: list[PositiveFloat] = Field(
        default_factory=lambda: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
    )

    @field_validator("duration_buckets", "size_buckets", "gap_buckets")
    @classmethod
    def _increasing(cls, value: list[float]) -> list[float]:
        if not value or any(b <= a for a, b in itertools.pairwise(value)):
            raise ValueError("must be a non-empty list of strictly increasing numbers")
        return value


def _parse_kv_list(value: Any) -> Any:
    """``"k1=v1,k2=v2"`` (the OTEL_RESOURCE_ATTRIBUTES / OTEL_EXPORTER_OTLP_HEADERS form) -> dict."""
    if not isinstance(value, str):
        return value
    from urllib.parse import unquote

    out: dict[str, str] = {}
    for item in value.split(","):
        if not item.strip():
            continue
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{item.strip()!r} is not key=value (write k1=v1,k2=v2)")
        out[unquote(key.strip())] = unquote(val.strip())
    return out


def _parse_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip().lower() for part in value.split(",") if part.strip()]
    return value


KeyValues = Annotated[dict[str, str], BeforeValidator(_parse_kv_list)]
Sampler = Literal[
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
]
Propagator = Literal["tracecontext", "b3", "b3multi", "baggage", "none"]


class Tracing(_Section):
    """Trace context propagation and span export (docs/tracing.md).

    The standard ``OTEL_*`` variables fill these keys (``OTEL_ENV`` below):
    they rank with the environment, above the file and below ``INFERMON_TRACING__*`` and flags.
    """

    enabled: bool = False  # off: no observer, traceparent passes through untouched
    propagators: Annotated[list[Propagator], BeforeValidator(_parse_csv)] = Field(
        default_factory=lambda: list[Propagator](["tracecontext"])
    )
    sampler: Sampler = "parentbased_traceidratio"
    sampler_arg: Annotated[float, Field(ge=0, le=1)] = 1.0  # the ratio of the *traceidratio samplers
    service_name: str = "infermon-proxy"
    resource_attributes: KeyValues = Field(default_factory=dict)
    protocol: Literal["http/protobuf", "grpc"] = "http/protobuf"
    endpoint: str | None = None  # base URL; http/protobuf appends /v1/traces. Default localhost:4318 / :4317
    traces_endpoint: str | None = None  # full URL, used as it is (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)
    headers: KeyValues = Field(default_factory=dict)  # sent with every export; a secret, masked in /config
    timeout: PositiveFloat = 10.0  # per export, retries included; also the most shutdown waits to flush
    compression: Literal["gzip", "none"] = "none"  # gzip: Content-Encoding: gzip (HTTP), grpc's gzip (gRPC)
    exporter: Literal["infermon", "sdk"] = "infermon"  # our cheap OTLP encoder, or the SDK's exporters
    max_queue_size: Annotated[int, Field(ge=1)] = 2048  # ended spans waiting for export; full: dropped
    max_export_batch_size: Annotated[int, Field(ge=1)] = 512
    schedule_delay: PositiveFloat = 5.0  # seconds between exports when the batch is not full
    keep_errors: bool = False  # also keep the proxy span of every 5xx / failed / slow request
    slow_threshold: PositiveFloat = 1.0  # seconds; "slow" for keep_errors

    @field_validator("endpoint", "traces_endpoint")
    @classmethod
    def _endpoint_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                "must be an http:// or https:// URL with a host (OTLP spec), for example "
                "http://otel-collector:4318, or http://otel-collector:4317 for grpc"
            )
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise ValueError("has an invalid port") from None
        return value

    def export_url(self) -> str:
        """Where spans go: the signal endpoint for HTTP, host:port (or URL) for gRPC."""
        if self.traces_endpoint:
            return self.traces_endpoint
        if self.protocol == "grpc":
            return self.endpoint or "http://localhost:4317"
        base = (self.endpoint or "http://localhost:4318").rstrip("/")
        return base + "/v1/traces"


class AccessLog(_Section):
    """One JSON line per request (docs/logging.md)."""

    enabled: bool = False
    path: str = "-"  # "-" is stdout, anything else a file opened for appending
    success_ratio: Annotated[float, Field(ge=0, le=1)] = 1.0  # share of non-error requests logged
    error_status: Annotated[int, Field(ge=400, le=600)] = 500  # statuses from here up always count as errors
    redact_headers: list[HeaderName] = Field(default_factory=list)  # never recorded, in logs nor spans
    max_queue_size: Annotated[int, Field(ge=1)] = 65_536  # lines waiting for the writer; full: dropped
    flush_interval: PositiveFloat = 0.2  # the writer wakes this often


def _sdk_disabled(raw: str) -> bool:
    return raw.strip().lower() != "true"  # OTEL_SDK_DISABLED=true switches tracing off


#: The standard OpenTelemetry variables, read as the SDK reads them (signal-specific ones listed
#: after the generic ones win). OTEL_SDK_DISABLED=true turns tracing off; it never turns it on.
OTEL_ENV: dict[str, tuple[str, Any]] = {
    "OTEL_SDK_DISABLED": ("tracing.enabled", _sdk_disabled),
    "OTEL_PROPAGATORS": ("tracing.propagators", None),
    "OTEL_TRACES_SAMPLER": ("tracing.sampler", lambda raw: raw.strip().lower()),
    "OTEL_TRACES_SAMPLER_ARG": ("tracing.sampler_arg", None),
    "OTEL_SERVICE_NAME": ("tracing.service_name", None),
    "OTEL_RESOURCE_ATTRIBUTES": ("tracing.resource_attributes", None),
    "OTEL_EXPORTER_OTLP_PROTOCOL": ("tracing.protocol", None),
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": ("tracing.protocol", None),
    "OTEL_EXPORTER_OTLP_ENDPOINT": ("tracing.endpoint", None),
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ("tracing.traces_endpoint", None),
    "OTEL_EXPORTER_OTLP_HEADERS": ("tracing.headers", None),
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS": ("tracing.headers", None),
    "OTEL_EXPORTER_OTLP_TIMEOUT": ("tracing.timeout", lambda raw: float(raw) / 1000.0),  # milliseconds
    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": ("tracing.timeout", lambda raw: float(raw) / 1000.0),
    "OTEL_EXPORTER_OTLP_COMPRESSION": ("tracing.compression", lambda raw: raw.strip().lower()),
    "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": ("tracing.compression", lambda raw: raw.strip().lower()),
    "OTEL_BSP_MAX_QUEUE_SIZE": ("tracing.max_queue_size", None),
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": ("tracing.max_export_batch_size", None),
    "OTEL_BSP_SCHEDULE_DELAY": ("tracing.schedule_delay", lambda raw: float(raw) / 1000.0),  # milliseconds
}


def _admin_shorthand(value: Any) -> Any:
    """``admin: HOST:PORT`` (the form before the section existed) is ``admin.listen``."""
    return {"listen": value} if isinstance(value, str) else value


class Admin(_Section):
    """The admin server: /metrics, /healthz, /readyz, /config and the state-changing endpoints."""

    listen: HostPort = "0.0.0.0:9464"
    #: bearer token the state-changing endpoints require when set; never shown in /config or logs
    token: SecretStr | None = None
    #: a file holding the token (a mounted Kubernetes Secret); read at start-up, trailing newline dropped
    token_file: str | None = None

    @field_validator("token")
    @classmethod
    def _token_usable(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            raw = value.get_secret_value()
            _check_token(_read_token_file(raw) if _names_a_file(raw) else raw)
        return value

    @field_validator("token_file")
    @classmethod
    def _token_file_readable(cls, value: str | None) -> str | None:
        if value is not None:
            _check_token(_read_token_file(value))
        return value

    @model_validator(mode="after")
    def _one_token_source(self) -> Admin:
        if self.token is not None and self.token_file is not None:
            raise ValueError("set admin.token or admin.token_file, not both")
        return self

    def resolved_token(self) -> str | None:
        """The token in force: ``token`` (the content of the file it names, when it is the path of a
        file: a mounted Kubernetes Secret), or the content of ``token_file``; None when unset."""
        if self.token is not None:
            raw = self.token.get_secret_value()
            return _read_token_file(raw) if _names_a_file(raw) else raw
        if self.token_file is not None:
            return _read_token_file(self.token_file)
        return None


def _names_a_file(value: str) -> bool:
    """A token value that is an absolute or ./-relative path of an existing file is read from it."""
    return value.startswith(("/", "./")) and os.path.isfile(value)


def _read_token_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().rstrip("\r\n")
    except OSError as exc:
        raise ValueError(f"cannot read the token file {path!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"the token file {path!r} is not UTF-8 text") from None


def _check_token(token: str) -> None:
    if not token:
        raise ValueError("the admin token is empty")
    if not all(0x21 <= ord(c) <= 0x7E for c in token):
        raise ValueError("the admin token must be visible ASCII without spaces (it travels in a header)")


class ProxyConfig(_Section):
    ENV_ALIASES: ClassVar[dict[str, tuple[str, Any]]] = OTEL_ENV
    #: a section that may also be written as one string, and the key that string sets
    SHORTHANDS: ClassVar[dict[str, str]] = {"admin": "listen"}
    #: keys whose values config errors never show
    SECRET_KEYS: ClassVar[frozenset[str]] = frozenset({"admin.token", "tracing.headers"})

    listen: HostPort = "0.0.0.0:8080"
    upstream: str = "http://127.0.0.1:8000"
    admin: Annotated[Admin, BeforeValidator(_admin_shorthand)] = Field(default_factory=Admin)
    request_id_header: HeaderName = "x-request-id"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    limits: Limits = Field(default_factory=Limits)
    upstream_pool: Upstream = Field(default_factory=Upstream)
    labels: Labels = Field(default_factory=Labels)
    readiness: Readiness = Field(default_factory=Readiness)
    drain: Drain = Field(default_factory=Drain)
    metrics: Metrics = Field(default_factory=Metrics)
    tracing: Tracing = Field(default_factory=Tracing)
    access_log: AccessLog = Field(default_factory=AccessLog)

    @field_validator("upstream")
    @classmethod
    def _upstream_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https"):
            raise ValueError("must be an http:// or https:// URL, for example http://127.0.0.1:8000")
        if not parts.hostname:
            raise ValueError("has no host, for example http://127.0.0.1:8000")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise ValueError("has an invalid port") from None
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(
                "must not carry a path, query or fragment: requests keep their own path "
                "(write http://host:port)"
            )
        return value

    def upstream_target(self) -> tuple[str, str, int]:
        """(scheme, host, port) of the upstream URL."""
        parts = urlsplit(self.upstream)
        scheme = parts.scheme
        port = parts.port or (443 if scheme == "https" else 80)
        return scheme, parts.hostname or "", port

    def public_dict(self) -> dict[str, Any]:
        """The effective configuration with secrets masked, for /config."""
        from proxy.config import mask_url

        data = self.model_dump(mode="json")
        data["upstream"] = mask_url(self.upstream)
        data["admin"]["token"] = "***" if self.admin.token is not None else None
        data["tracing"]["headers"] = {key: "***" for key in self.tracing.headers}
        for key in ("endpoint", "traces_endpoint"):
            if data["tracing"][key]:
                data["tracing"][key] = mask_url(data["tracing"][key])
        return data
