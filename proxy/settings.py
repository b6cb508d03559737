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
from urllib.parse import SplitResult, urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?\Z")


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
    elif host and not _HOSTNAME.fullmatch(host):
        raise ValueError(f"{host!r} is not a host name or IPv4 address (write IPv6 as [::1]:PORT)")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} must be a number from 0 to 65535")
    return host or "0.0.0.0", int(port_text)


def _check_host_port(value: str) -> str:
    split_host_port(value)
    return value


HostPort = Annotated[str, AfterValidator(_check_host_port)]
PositiveFloat = Annotated[float, Field(gt=0)]
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")


def _check_header_name(value: str) -> str:
    if not _TOKEN.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid HTTP header name")
    return value.lower()


HeaderName = Annotated[str, AfterValidator(_check_header_name)]


_VARIANT = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")


def http_url_parts(value: str, wrong: str, example: str = "") -> SplitResult:
    """``value`` split, when it is an http:// or https:// URL with a host and a valid port.

    Else ``ValueError(wrong)``, or "has an invalid port" (with ``example`` after it when given).
    """
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(wrong)
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError(f"has an invalid port, for example {example}" if example else "has an invalid port") from None
    return parts


def check_upstream_url(value: str) -> str:
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
            "must not carry a path, query or fragment: requests keep their own path (write http://host:port)"
        )
    return value


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
    variant_request_header: HeaderName | None = None  # a request header naming the variant (a mesh routes)
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
        http_url_parts(
            value,
            "must be an http:// or https:// URL with a host (OTLP spec), for example "
            "http://otel-collector:4318, or http://otel-collector:4317 for grpc",
        )
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


_STATUS_RULE = re.compile(r"^[1-5](xx|[0-9]{2})\Z")


def _check_status_rule(value: str) -> str:
    value = value.strip().lower()
    if not _STATUS_RULE.match(value):
        raise ValueError(f"{value!r} is not a status (503) or a status class (5xx)")
    return value


StatusRule = Annotated[str, AfterValidator(_check_status_rule)]
Adapter = Literal["auto", "kserve_v1", "oip_v2", "openai", "tfserving", "mapping", "none"]


class SamplingAlways(_Section):
    """Requests sampled whatever ``sampling.rate`` says."""

    status: list[StatusRule] = Field(default_factory=list)  # "5xx", "429": every response with it
    variants: list[str] = Field(default_factory=list)  # every request of these variants


class Sampling(_Section):
    """Payload sampling: which requests have their bodies copied to the side path (docs/drift.md)."""

    rate: Annotated[float, Field(ge=0, le=1)] = 0.0  # share of requests sampled; 0: off
    always: SamplingAlways = Field(default_factory=SamplingAlways)
    max_body_bytes: Annotated[int, Field(ge=1)] = 262_144  # per body; a larger one is dropped (streams: cut)
    queue_size: Annotated[int, Field(ge=1)] = 1024  # samples waiting for the side path; full: dropped
    max_queue_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024 * 1024  # body bytes those samples hold
    #: JSON fields removed before a sample leaves the process: a name (anywhere) or a dotted path
    redact_fields: list[str] = Field(default_factory=list)
    redact_headers: list[HeaderName] = Field(default_factory=list)  # besides access_log's and the secrets
    adapter: Adapter = "auto"  # how features and predictions are read from the bodies
    #: adapter "mapping": feature name -> JSON path ($.a.b, $.rows[*].x; [*] gives one row per element)
    mapping: dict[str, str] = Field(default_factory=dict)
    prediction_mapping: dict[str, str] = Field(default_factory=dict)  # the same for predictions
    max_depth: Annotated[int, Field(ge=1, le=512)] = 64  # JSON nesting; deeper: dropped as hostile
    max_elements: Annotated[int, Field(ge=1)] = 1_000_000  # values in one body; more: dropped as hostile
    max_rows: Annotated[int, Field(ge=1)] = 10_000  # instances taken from one batched request
    max_parse_seconds: PositiveFloat = 0.25  # extraction of one sample; longer: dropped as hostile

    @field_validator("mapping", "prediction_mapping")
    @classmethod
    def _json_paths(cls, value: dict[str, str]) -> dict[str, str]:
        from proxy.sampling.extract import parse_path

        for name, path in value.items():
            try:
                parse_path(path)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return value

    @field_validator("redact_fields")
    @classmethod
    def _redact_fields(cls, value: list[str]) -> list[str]:
        from proxy.sampling.redact import Redactor

        Redactor(value)  # raises ValueError naming the bad entry
        return value

    @model_validator(mode="after")
    def _mapping_given(self) -> Sampling:
        if self.adapter == "mapping" and not (self.mapping or self.prediction_mapping):
            raise ValueError("adapter 'mapping' needs sampling.mapping (feature name -> JSON path)")
        return self


DriftMethod = Literal["psi", "jensenshannon", "wasserstein", "ks", "chisquare", "z"]


class DriftFeature(_Section):
    """Per-feature override of the method that decides ``drifted``."""

    method: DriftMethod | None = None  # null: Evidently's default choice
    threshold: Annotated[float, Field(gt=0)] | None = None  # null: the method's default


class Drift(_Section):
    """Data drift on the side path, from sampled payloads (docs/drift.md)."""

    reference: str | None = None  # a profile from `infermon baseline build`; null: the first samples
    reference_samples: Annotated[int, Field(ge=10)] = 1000  # rows that become the reference without one
    reference_bins: Annotated[int, Field(ge=2, le=100)] = 10  # quantile bins of that reference
    reference_top_k: Annotated[int, Field(ge=1, le=1000)] = 20  # categories of that reference
    window_size: Annotated[int, Field(ge=1)] = 1000  # rows per feature in the live window
    window_seconds: PositiveFloat = 3600.0  # and no older than this
    min_samples: Annotated[int, Field(ge=1)] = 100  # fewer rows in the window: "insufficient data"
    interval: PositiveFloat = 10.0  # seconds between evaluations
    psi_warn: PositiveFloat = 0.1
    psi_drift: PositiveFloat = 0.25
    features: dict[str, DriftFeature] = Field(default_factory=dict)  # per feature: method, threshold
    #: bin series exported: variants x features x bins of infermon_feature_bin_total, plus features x
    #: bins of infermon_feature_reference_ratio (once); over it, the last columns of a variant are not
    #: exported (counted), their drift still is
    max_series: Annotated[int, Field(ge=1)] = 4000
    max_features: Annotated[int, Field(ge=1)] = 200  # distinct feature names tracked; more: counted, skipped
    #: variants (the variant label) with live windows of their own; rows of more: counted, not windowed
    max_variants: Annotated[int, Field(ge=1)] = 8

    @model_validator(mode="after")
    def _consistent(self) -> Drift:
        if self.window_size < self.min_samples:
            raise ValueError(
                f"drift.window_size ({self.window_size}) is below drift.min_samples ({self.min_samples}): the "
                "window could never hold enough rows and every feature would read 'insufficient data'; "
                "raise window_size or lower min_samples"
            )
        if self.psi_warn >= self.psi_drift:
            raise ValueError(
                f"drift.psi_warn ({self.psi_warn}) must be below drift.psi_drift ({self.psi_drift}): "
                "the warning level comes before the drift level"
            )
        return self

    @field_validator("reference")
    @classmethod
    def _reference_readable(cls, value: str | None) -> str | None:
        if value is not None and not os.path.isfile(value):
            raise ValueError(
                f"no profile file at {value!r} (build one with: infermon baseline build DATA --out profile.json)"
            )
        return value


class JsonlSink(_Section):
    """One JSON line per instance of each sample (docs/drift.md)."""

    path: str | None = None  # null: off
    max_bytes: Annotated[int, Field(ge=1024)] = 100 * 1024 * 1024  # rotate when the file reaches this
    max_files: Annotated[int, Field(ge=1)] = 5  # rotated files kept (path.1 .. path.N); disk <= (N+1) x max
    queue_size: Annotated[int, Field(ge=1)] = 10_000  # lines waiting for the writer; full: dropped

    @field_validator("path")
    @classmethod
    def _writable(cls, value: str | None) -> str | None:
        if value is None:
            return None
        folder = os.path.dirname(os.path.abspath(value))
        if os.path.isdir(value):
            raise ValueError("names a directory: name a file in it, for example /var/lib/infermon/samples.jsonl")
        if not os.path.isdir(folder):
            raise ValueError(f"the directory {folder!r} does not exist: create it or name a file in another one")
        if not os.access(folder, os.W_OK) or (os.path.exists(value) and not os.access(value, os.W_OK)):
            raise ValueError(f"cannot write there ({value!r} or its directory is not writable)")
        return value


class CloudEventsSink(_Section):
    """CloudEvents over HTTP, binary mode, as the KServe logger sends them (docs/drift.md)."""

    url: str | None = None  # null: off
    mode: Literal["binary", "batch"] = "binary"  # batch: application/cloudevents-batch+json
    #: ce-source: CloudEvents requires a non-empty URI-reference
    source: Annotated[str, Field(min_length=1)] = "http://localhost:9081/"
    inference_service: str = ""  # ce-inferenceservicename
    namespace: str = ""  # ce-namespace
    component: str = "predictor"  # ce-component
    endpoint: str = ""  # ce-endpoint
    headers: KeyValues = Field(default_factory=dict)  # sent with every event (a secret, masked)
    queue_size: Annotated[int, Field(ge=1)] = 10_000  # events waiting; full: dropped
    batch_size: Annotated[int, Field(ge=1)] = 100  # events per batch (batch mode) or sent concurrently
    timeout: PositiveFloat = 5.0  # per delivery attempt
    retries: Annotated[int, Field(ge=0)] = 5  # per event (per batch), with exponential backoff
    backoff: PositiveFloat = 0.5  # first retry delay, doubling, capped at 30 s

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("must be an http:// or https:// URL, for example http://event-display/")
        return value


class Sinks(_Section):
    """Where samples go besides the drift engine: never blocking, always counting."""

    jsonl: JsonlSink = Field(default_factory=JsonlSink)
    cloudevents: CloudEventsSink = Field(default_factory=CloudEventsSink)


class Llm(_Section):
    """Token usage on OpenAI-compatible routes, for every request (docs/drift.md)."""

    enabled: bool = True
    routes: list[str] = Field(
        default_factory=lambda: ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
    )
    tail_bytes: Annotated[int, Field(ge=256)] = 16_384  # response tail kept to find `usage`
    model_from_body: bool = True  # the request's (or response's) `model` field names the model label
    scan_bytes: Annotated[int, Field(ge=64)] = 4096  # the first body bytes searched for `model`


_STICKY = re.compile(r"^(header|cookie):([!#$%&'*+.^_`|~0-9A-Za-z-]+)\Z")


def _check_sticky(value: str | None) -> str | None:
    if value is None:
        return None
    m = _STICKY.match(value.strip())
    if not m:
        raise ValueError("must be header:NAME or cookie:NAME, for example header:x-user-id or cookie:session")
    kind, name = m.groups()
    return f"{kind}:{name.lower()}" if kind == "header" else f"{kind}:{name}"


class Split(_Section):
    """Weighted, sticky splitting of client traffic between the named upstreams (docs/canary.md)."""

    #: variant -> weight (shares, any scale); empty: every request goes to stable
    weights: Annotated[
        dict[str, Annotated[float, Field(ge=0, allow_inf_nan=False)]], BeforeValidator(_parse_kv_list)
    ] = Field(
        default_factory=dict
    )
    #: header:NAME or cookie:NAME: requests with the same key always get the same variant
    sticky: Annotated[str | None, AfterValidator(_check_sticky)] = None
    force_header: HeaderName | None = None  # a request header naming a variant sends it there (tests); off
    failover: bool = False  # a variant whose upstream is down gives its share to the others


class Canary(_Section):
    """Automated canary analysis: each variant against the baseline (docs/canary.md)."""

    enabled: bool = True  # with upstreams (a split) or labels.variant_header (a mesh splits)
    baseline: Annotated[str, Field(min_length=1)] = "stable"  # the variant every other is compared with
    interval: PositiveFloat = 300.0  # seconds of traffic each evaluation looks at
    evaluate_every: PositiveFloat = 10.0  # seconds between evaluations
    window: Annotated[int, Field(ge=1)] = 10_000  # latencies and predictions kept per variant
    confidence: Annotated[float, Field(ge=0.5, lt=1)] = 0.98  # significant when p < 1 - confidence
    latency_tolerance: Annotated[float, Field(ge=1)] = 1.2  # canary median / baseline median allowed
    error_tolerance: Annotated[float, Field(ge=0, lt=1)] = 0.01  # absolute error-rate increase allowed
    #: Jensen-Shannon distance, natural log: sqrt(ln 2) = 0.8326 at most, so at most 0.83 here
    prediction_threshold: Annotated[float, Field(gt=0, le=0.83)] = 0.1
    min_requests: Annotated[int, Field(ge=1)] = 50  # per side, else inconclusive
    min_predictions: Annotated[int, Field(ge=1)] = 50
    max_variants: Annotated[int, Field(ge=1)] = 16
    prediction_bins: Annotated[int, Field(ge=2)] = 10  # numeric predictions: baseline quantile bins
    max_classes: Annotated[int, Field(ge=1)] = 64  # whole numbers with at most this many values are classes
    #: a variant's inputs count as drifted when this share of its feature columns drifted
    drift_share: Annotated[float, Field(gt=0, le=1)] = 0.5
    accuracy_tolerance: Annotated[float, Field(ge=0, lt=1)] = 0.02  # absolute accuracy drop allowed
    mae_tolerance: Annotated[float, Field(ge=1)] = 1.1  # canary MAE / baseline MAE allowed

    @model_validator(mode="after")
    def _window_holds_enough(self) -> Canary:
        if self.min_requests > self.window:
            raise ValueError(f"canary.min_requests ({self.min_requests}) must not exceed canary.window ({self.window})")
        return self


class Shadow(_Section):
    """Shadow traffic: a share of requests also sent to an upstream that serves no client (docs/canary.md)."""

    url: str | None = None  # null: off (flag --shadow)
    ratio: Annotated[float, Field(ge=0, le=1)] = 0.1  # share of requests mirrored (flag --shadow-ratio)
    max_concurrency: Annotated[int, Field(ge=1)] = 16  # shadows at once; more: dropped (busy)
    max_body_bytes: Annotated[int, Field(ge=1)] = 1_048_576  # larger requests not shadowed
    timeout: PositiveFloat = 10.0  # for the shadow's complete answer; longer: failed

    @field_validator("url")
    @classmethod
    def _shadow_url(cls, value: str | None) -> str | None:
        return None if value is None else check_upstream_url(value)


class Probes(_Section):
    """Golden-request probes: a probe file replayed to every upstream on an interval (docs/probes.md)."""

    interval: PositiveFloat = 30.0  # seconds between rounds (flag --probe-interval)
    timeout: PositiveFloat = 10.0  # per probe, for its complete answer; longer: failed (timeout)
    concurrency: Annotated[int, Field(ge=1)] = 1  # probes in flight at once, per upstream
    #: consecutive failed rounds of the stable upstream that close the /readyz gate; 0 or null: never
    readiness_failures: Annotated[int, Field(ge=0)] | None = None
    rel_tol: Annotated[float, Field(ge=0)] = 1e-5  # numbers in expect.json, for lines without their own
    abs_tol: Annotated[float, Field(ge=0)] = 1e-7
    max_probes: Annotated[int, Field(ge=1)] = 100  # probes in the file (each name is a metric label)
    max_body_bytes: Annotated[int, Field(ge=1)] = 1_048_576  # answer kept for the checks; longer: failed
    #: the probe file (flag --probes); null: off. Last, so that it is checked against max_probes
    file: str | None = None

    @field_validator("file")
    @classmethod
    def _probe_file(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        from proxy.probes.spec import ProbeFileError, load

        try:
            load(value, max_probes=info.data.get("max_probes", 100))
        except ProbeFileError as exc:
            raise ValueError(str(exc)) from None
        return value


class Feedback(_Section):
    """Predictions kept for labels that arrive later (``POST /feedback``; docs/quality.md)."""

    enabled: bool = False  # every request's prediction is kept, whatever sampling.rate (flag --feedback)
    max_entries: Annotated[int, Field(ge=1)] = 100_000  # predictions waiting for labels; full: oldest evicted
    ttl: PositiveFloat = 86_400.0  # seconds a prediction waits for its label; older: evicted
    #: ids of evicted (a label then counts as late) and fully labelled requests (duplicate) remembered
    remember: Annotated[int, Field(ge=0)] = 100_000
    #: one POST /feedback body; larger: 413. Parsing holds the GIL (about 7 ms per MiB, and garbage
    #: collections as the items grow): a larger cap lets one body hold the data plane's loop
    max_body_bytes: Annotated[int, Field(ge=1024)] = 1024 * 1024
    max_instances: Annotated[int, Field(ge=1)] = 1024  # predictions kept per request (a batch); beyond: not kept


_WINDOW_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,32}\Z")


class QualityWindow(_Section):
    """One rolling window of labels: no older than ``seconds``, at most ``max_labels``."""

    seconds: PositiveFloat
    max_labels: Annotated[int, Field(ge=1)]


class Mlflow(_Section):
    """Rolling scores logged to an MLflow tracking server through its REST API (docs/quality.md)."""

    tracking_uri: str | None = None  # http(s)://host:port of the tracking server; null: off
    experiment: Annotated[str, Field(min_length=1)] = "infermon"
    interval: PositiveFloat = 60.0  # seconds between exports
    timeout: PositiveFloat = 10.0  # per call to the tracking server

    @field_validator("tracking_uri")
    @classmethod
    def _http_uri(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(
                    "must be the http:// or https:// URL of an MLflow tracking server, for example "
                    "http://mlflow:5000 (file and database URIs need a server in front of them: mlflow server)"
                )
        return value


class Quality(_Section):
    """Model quality from delayed labels: rolling scores per model, version and variant (docs/quality.md)."""

    #: window name (the ``window`` label) -> its bounds; the first one is the canary's
    windows: dict[str, QualityWindow] = Field(
        default_factory=lambda: {
            "1h": QualityWindow(seconds=3600.0, max_labels=10_000),
            "1d": QualityWindow(seconds=86_400.0, max_labels=100_000),
        }
    )
    interval: PositiveFloat = 10.0  # seconds between recomputations of the scores
    min_labels: Annotated[int, Field(ge=1)] = 30  # fewer labels in a window: no score, and /quality says so
    max_label_sets: Annotated[int, Field(ge=1)] = 100  # (model, version, variant) scored; more: counted, skipped
    max_classes: Annotated[int, Field(ge=2)] = 20  # classes in a window beyond which only accuracy is given
    mlflow: Mlflow = Field(default_factory=Mlflow)

    @field_validator("windows")
    @classmethod
    def _windows(cls, value: dict[str, QualityWindow]) -> dict[str, QualityWindow]:
        if not value:
            raise ValueError("needs at least one window, for example {1h: {seconds: 3600, max_labels: 10000}}")
        for name in value:
            if not _WINDOW_NAME.fullmatch(name):
                raise ValueError(
                    f"{name!r} is not a window name: letters, digits, '_', '.', '-', at most 32 (it becomes the "
                    "window label)"
                )
        return value


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


class Status(_Section):
    """The status page on the admin port and the JSON it reads: /timeseries, /gpu (docs/status-page.md)."""

    interval: Annotated[float, Field(ge=0.1)] = 2.0  # seconds between two /timeseries points
    history: PositiveFloat = 600.0  # seconds of /timeseries kept (history / interval points, at most 3600)
    #: the node agent (infermon agent) whose GPU figures /gpu and the page show; null: no GPU panel
    agent: str | None = None
    agent_timeout: PositiveFloat = 2.0  # seconds for one read of the agent's /metrics

    @field_validator("agent")
    @classmethod
    def _agent_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = http_url_parts(
            value,
            "must be the http:// URL of the node agent, for example http://10.0.0.5:9465 "
            "(its /metrics is read; a path, when given, is used instead)",
            example="http://10.0.0.5:9465",
        )
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query or fragment, for example http://10.0.0.5:9465")
        return value


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
    SECRET_KEYS: ClassVar[frozenset[str]] = frozenset(
        {"admin.token", "tracing.headers", "sinks.cloudevents.headers"}
    )

    listen: HostPort = "0.0.0.0:8080"
    upstream: str = "http://127.0.0.1:8000"
    #: more named upstreams (variants) beside ``upstream`` (named stable): name -> URL
    upstreams: dict[str, str] = Field(default_factory=dict)
    split: Split = Field(default_factory=Split)
    canary: Canary = Field(default_factory=Canary)
    shadow: Shadow = Field(default_factory=Shadow)
    probes: Probes = Field(default_factory=Probes)
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
    sampling: Sampling = Field(default_factory=Sampling)
    drift: Drift = Field(default_factory=Drift)
    sinks: Sinks = Field(default_factory=Sinks)
    llm: Llm = Field(default_factory=Llm)
    feedback: Feedback = Field(default_factory=Feedback)
    quality: Quality = Field(default_factory=Quality)
    status: Status = Field(default_factory=Status)

    @field_validator("upstream")
    @classmethod
    def _upstream_url(cls, value: str) -> str:
        return check_upstream_url(value)

    @field_validator("upstreams")
    @classmethod
    def _upstream_urls(cls, value: dict[str, str]) -> dict[str, str]:
        for name, url in value.items():
            if not _VARIANT.fullmatch(name):
                raise ValueError(
                    f"{name!r} is not an upstream name: letters, digits, '_', '.', '-', at most 64 "
                    "(it becomes the variant label)"
                )
            try:
                check_upstream_url(url)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return value

    @model_validator(mode="before")
    @classmethod
    def _stable_in_upstreams(cls, data: Any) -> Any:
        """``upstreams: {stable: URL}`` (or ``--upstream stable=URL``) is ``upstream: URL``."""
        if isinstance(data, dict) and isinstance(data.get("upstreams"), dict) and "stable" in data["upstreams"]:
            data = dict(data)
            upstreams = dict(data["upstreams"])
            data["upstream"] = upstreams.pop("stable")
            data["upstreams"] = upstreams
        return data

    @model_validator(mode="after")
    def _split_names_known(self) -> ProxyConfig:
        if "shadow" in self.upstreams:
            raise ValueError(
                "upstreams.shadow: the name shadow belongs to the shadow upstream (shadow.url); rename the variant"
            )
        known = {"stable", *self.upstreams}
        unknown = [n for n in self.split.weights if n not in known]
        if unknown:
            raise ValueError(
                f"split.weights names {', '.join(map(repr, unknown))}, not an upstream (known: "
                f"{', '.join(sorted(known))}); add it with --upstream NAME=URL or upstreams.NAME"
            )
        if self.split.weights and not any(w > 0 for w in self.split.weights.values()):
            raise ValueError("split.weights: every weight is 0; give at least one variant a weight above 0")
        if self.upstreams and self.canary.enabled and self.canary.baseline not in known:
            raise ValueError(
                f"canary.baseline {self.canary.baseline!r} is not an upstream (known: {', '.join(sorted(known))}): "
                "name the variant the others are compared with"
            )
        return self

    def variants(self) -> list[str]:
        """Every upstream name, ``stable`` first."""
        return ["stable", *sorted(self.upstreams)]

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
        data["upstreams"] = {name: mask_url(url) for name, url in self.upstreams.items()}
        if data["shadow"]["url"]:
            data["shadow"]["url"] = mask_url(data["shadow"]["url"])
        data["admin"]["token"] = "***" if self.admin.token is not None else None
        data["tracing"]["headers"] = {key: "***" for key in self.tracing.headers}
        data["sinks"]["cloudevents"]["headers"] = {key: "***" for key in self.sinks.cloudevents.headers}
        if data["sinks"]["cloudevents"]["url"]:
            data["sinks"]["cloudevents"]["url"] = mask_url(data["sinks"]["cloudevents"]["url"])
        if data["quality"]["mlflow"]["tracking_uri"]:
            data["quality"]["mlflow"]["tracking_uri"] = mask_url(data["quality"]["mlflow"]["tracking_uri"])
        if data["status"]["agent"]:
            data["status"]["agent"] = mask_url(data["status"]["agent"])
        for key in ("endpoint", "traces_endpoint"):
            if data["tracing"][key]:
                data["tracing"][key] = mask_url(data["tracing"][key])
        return data
