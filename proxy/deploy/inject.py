"""``infermon inject``: add the infermon sidecar to the pod templates of Kubernetes manifests.

Reads multi-document YAML and writes it back, comments, key order, quoting and unknown fields kept
(a round-trip YAML parser; documents it does not change, comment-only ones too, byte for byte),
with each supported workload's pod template changed so that the model server's traffic goes
through infermon. The pattern (docs/kubernetes.md, "How inject moves the port"):

* the model server keeps listening where it did (its flags are never touched); infermon listens on
  its own port (``--proxy-port``, default 9463) and forwards to ``127.0.0.1:<model port>``;
* the model server's container port *name* moves to infermon's port, the model server's port is
  renamed ``app-<number>``; a Service in the same input that reached the model's port (by number or
  by that name) is rewritten to infermon's: to its number for a native sidecar (before Kubernetes
  1.32 a Service looks a named ``targetPort`` up among the pod's ``containers`` only, and a native
  sidecar is an init container), to the name for a classic one;
* the model container's own probes that named the port are pointed at its new name, so they still
  check the model server directly;
* KServe InferenceServices follow KServe's collocation rule instead: the container that declares the
  port receives the traffic, so infermon declares it and the model container's declaration goes.

Injecting twice changes nothing (an ``infermon.io/inject`` annotation records what was done); an
already injected template with other settings, a container without a port, a port number or name
that is already taken, a pod on the node's network (hostNetwork) and kinds that are not supported are
refused with a message that says why.
Nothing is written when anything is refused.
"""

from __future__ import annotations

import io
import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from proxy import __version__

SidecarMode = Literal["auto", "native", "classic"]

DEFAULT_IMAGE = f"infermon:{__version__}"
PROXY_PORT = 9463
ADMIN_PORT = 9464
CONTAINER = "infermon"
ADMIN_PORT_NAME = "infermon-admin"
ANNOTATION = "infermon.io/inject"
CONFIG_VOLUME = "infermon-config"
CONFIG_DIR = "/etc/infermon"
#: the port KServe's model servers listen on when the predictor container declares none
KSERVE_PORT = 8080
KSERVE_CONTAINER = "kserve-container"
#: the only names Knative accepts on the one port of a Revision (they choose the protocol)
KNATIVE_PORT_NAMES = frozenset({"http1", "h2c"})
#: seconds: preStop pause, drain.timeout (default 30) and the trace flush (tracing.timeout, 10)
PRESTOP_SECONDS = 5
GRACE_SECONDS = PRESTOP_SECONDS + 30 + 10
#: the Downward API variables the proxy turns into trace resource attributes (proxy.observe.tracing.K8S_ENV)
DOWNWARD_ENV = {
    "K8S_POD_NAME": "metadata.name",
    "K8S_NAMESPACE_NAME": "metadata.namespace",
    "K8S_NODE_NAME": "spec.nodeName",
    "K8S_POD_UID": "metadata.uid",
}
#: the numeric user of the image (Dockerfile); Istio's proxy runs as 1337, never this
IMAGE_UID = 10001
#: ports the Istio sidecar (istio-proxy, pilot-agent) listens on or redirects to
ISTIO_PORTS = frozenset({15000, 15001, 15004, 15006, 15008, 15009, 15020, 15021, 15053, 15090})

#: kind -> (API group, path of the pod spec, path of the metadata whose annotations record the injection)
KINDS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "Pod": ("", ("spec",), ("metadata",)),
    "Deployment": ("apps", ("spec", "template", "spec"), ("spec", "template", "metadata")),
    "StatefulSet": ("apps", ("spec", "template", "spec"), ("spec", "template", "metadata")),
    "DaemonSet": ("apps", ("spec", "template", "spec"), ("spec", "template", "metadata")),
    "ReplicaSet": ("apps", ("spec", "template", "spec"), ("spec", "template", "metadata")),
    "Job": ("batch", ("spec", "template", "spec"), ("spec", "template", "metadata")),
    "CronJob": (
        "batch",
        ("spec", "jobTemplate", "spec", "template", "spec"),
        ("spec", "jobTemplate", "spec", "template", "metadata"),
    ),
    "Rollout": ("argoproj.io", ("spec", "template", "spec"), ("spec", "template", "metadata")),
    "InferenceService": ("serving.kserve.io", ("spec", "predictor"), ("metadata",)),
}
SUPPORTED = (
    "Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob, Argo Rollout and KServe InferenceService"
)
_PORT_NAME = re.compile(r"^(?=.{1,15}\Z)(?=.*[a-z])[a-z0-9]+(-[a-z0-9]+)*\Z")  # IANA_SVC_NAME, as the API checks


class InjectError(Exception):
    """A document cannot be injected; ``str(exc)`` says which one, why, and what to do."""


@dataclass(frozen=True)
class InjectOptions:
    image: str = DEFAULT_IMAGE
    container: str | None = None  # the model server's container; default: the only one (kserve-container)
    port: str | None = None  # the model server's port, by name or number; default: its only port
    proxy_port: int = PROXY_PORT
    admin_port: int = ADMIN_PORT
    sidecar: SidecarMode = "auto"  # auto: native, except classic for an InferenceService (Knative)
    config_map: str | None = None  # a ConfigMap holding infermon.yaml, mounted at /etc/infermon

    def __post_init__(self) -> None:
        for flag, value in (("--proxy-port", self.proxy_port), ("--admin-port", self.admin_port)):
            if not 1 <= value <= 65535:
                raise InjectError(f"{flag} {value}: a port is a number from 1 to 65535")
            if value in ISTIO_PORTS:
                raise InjectError(f"{flag} {value}: Istio's sidecar uses this port (15000-15090); choose another")
        if self.proxy_port == self.admin_port:
            raise InjectError(f"--proxy-port and --admin-port are both {self.proxy_port}: give them different ports")
        if not self.image.strip():
            raise InjectError("--image is empty: name the infermon image, for example infermon:0.1.0")


@dataclass
class _Front:
    """What one injected pod template looks like from a Service: the labels and the moved port."""

    namespace: str | None
    labels: dict[str, str]
    app_port: int
    front_name: str
    native: bool  # infermon is a native sidecar: Services must target its port by number
    proxy_port: int


@dataclass
class InjectResult:
    text: str
    notes: list[str] = field(default_factory=list)  # one line per document touched, for stderr
    injected: int = 0  # templates changed by this run
    unchanged: int = 0  # templates already injected with the same settings


# -- YAML -------------------------------------------------------------------------------------------


def _yaml(text: str) -> Any:
    from ruamel.yaml import YAML

    y = YAML(typ="rt")
    y.preserve_quotes = True
    y.width = 4096  # never fold a long line
    mapping, sequence, offset = _guess_indent(text)
    y.indent(mapping=mapping, sequence=sequence, offset=offset)
    return y


def _guess_indent(text: str) -> tuple[int, int, int]:
    """(mapping, sequence, offset) as the input writes them: ``- `` under its key or indented."""
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    mapping = offset = None
    for prev, line in itertools.pairwise(lines):
        if not prev.rstrip().endswith(":"):
            continue
        base = len(prev) - len(prev.lstrip(" "))
        ind = len(line) - len(line.lstrip(" "))
        if line.lstrip().startswith("- "):
            if offset is None and ind >= base:
                offset = ind - base
        elif mapping is None and ind > base:
            mapping = ind - base
        if mapping is not None and offset is not None:
            break
    mapping = mapping or 2
    offset = mapping if offset is None else offset
    return mapping, offset + 2, offset


def _new_map(*pairs: tuple[str, Any]) -> Any:
    from ruamel.yaml.comments import CommentedMap

    m = CommentedMap()
    for key, value in pairs:
        m[key] = value
    return m


def _flow_map(*pairs: tuple[str, Any]) -> Any:
    m = _new_map(*pairs)
    m.fa.set_flow_style()
    return m


def _seq(items: list[Any], flow: bool = False) -> Any:
    from ruamel.yaml.comments import CommentedSeq

    s = CommentedSeq(items)
    if flow:
        s.fa.set_flow_style()
    return s


def _get(node: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _ensure_map(parent: Any, key: str, before: str | None = None) -> Any:
    if not isinstance(parent.get(key), dict):
        value = _new_map()
        if key not in parent and before is not None and before in parent:
            parent.insert(list(parent).index(before), key, value)
        else:
            parent[key] = value
    return parent[key]


# -- the documents ----------------------------------------------------------------------------------


#: a line that starts or ends a document: never content, wherever it stands (YAML's c-forbidden)
_START = re.compile(r"---(?=[ \t\r\n]|$)")
_END = re.compile(r"\.\.\.(?=[ \t\r\n]|$)")
_CLEAN_START = re.compile(r"---[ \t]*(#.*)?\r?\n?")


@dataclass
class _Segment:
    """One document of the stream as written: its ``---`` line, its body, its ``...`` line."""

    head: str  # the ``---`` line (with its comment), kept as written; "" for the first bare document
    body: str
    tail: str  # the ``...`` line and what follows it up to the next document
    docs: list[Any] = field(default_factory=list)
    changed: bool = False


def _segments(text: str) -> list[_Segment]:
    """The stream cut at its document markers, so that ``"".join`` of the parts gives ``text`` back."""
    segments = [_Segment("", "", "")]
    for line in text.splitlines(keepends=True):
        current = segments[-1]
        if _START.match(line):
            segments.append(_Segment(line, "", ""))
        elif _END.match(line) or (current.tail and _blank_or_comment(line)):
            current.tail += line
        elif current.tail:  # a bare document after ``...``
            segments.append(_Segment("", line, ""))
        else:
            current.body += line
    return segments


def _blank_or_comment(line: str) -> bool:
    return not line.strip() or line.lstrip().startswith("#")


def _has_content(body: str) -> bool:
    """Anything but comments, blank lines and directives (``%YAML``, which only precede a ``---``)."""
    return any(not _blank_or_comment(line) and not line.startswith("%") for line in body.splitlines())


def inject_text(text: str, options: InjectOptions) -> InjectResult:
    """Inject every supported document of a YAML stream; raise InjectError and write nothing on any refusal.

    Documents that nothing changes (a ConfigMap, a Service left as it is, a template already
    injected, a document of comments only) are written back exactly as they were read; a changed
    one is written by the round-trip parser, its comments, order and quoting kept, with the line
    ends of the input.
    """
    from ruamel.yaml.error import YAMLError

    try:
        list(_yaml(text).load_all(text))  # the stream as a whole, so an error names its real line
    except YAMLError as exc:
        raise InjectError(f"the input is not valid YAML: {exc}") from None
    segments = _segments(text)
    for segment in segments:
        if segment.head and not _CLEAN_START.fullmatch(segment.head):
            segment.body, segment.head = segment.head + segment.body, ""  # content on the --- line
        if _has_content(segment.body):
            loaded = _yaml(segment.body).load_all(segment.body)
            segment.docs = [d for d in loaded if d is not None]
    result = InjectResult(text="")
    fronts: list[_Front] = []
    errors: list[str] = []
    for segment in segments:
        for doc in _walk(segment.docs):
            before = result.injected
            try:
                front = _inject_document(doc, options, result)
            except InjectError as exc:
                errors.append(str(exc))
                continue
            segment.changed |= result.injected > before
            if front is not None:
                fronts.append(front)
    if errors:
        raise InjectError("\n".join(errors))
    for segment in segments:
        for doc in _walk(segment.docs):
            if doc.get("kind") == "Service" and _group(doc) == "":
                segment.changed |= _point_service(doc, fronts, result)
    if result.injected == 0 and result.unchanged == 0:
        raise InjectError(f"nothing to inject: no workload in the input (supported: {SUPPORTED})")
    out: list[str] = []
    for segment in segments:
        body = segment.body
        if segment.changed:
            y = _yaml(segment.body)
            y.explicit_start = not segment.head and segment.body.lstrip().startswith("---")
            written = io.StringIO()
            y.dump_all(segment.docs, written)
            body = written.getvalue()
            if "\r\n" in segment.body:
                body = body.replace("\r\n", "\n").replace("\n", "\r\n")
        out += [segment.head, body, segment.tail]
    result.text = "".join(out)
    return result


def _walk(docs: list[Any]) -> Iterator[Any]:
    """Every resource, the items of a ``kind: List`` (what ``kubectl get -o yaml`` writes) included."""
    for doc in docs:
        if not isinstance(doc, dict):
            continue
        if doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            yield from _walk(doc["items"])
        else:
            yield doc


def _group(doc: Any) -> str:
    api = str(doc.get("apiVersion") or "")
    return api.rpartition("/")[0] if "/" in api else ""


def _label(doc: Any) -> str:
    name = _get(doc, ("metadata", "name")) or "<no name>"
    return f"{doc.get('kind')}/{name}"


def _inject_document(doc: Any, options: InjectOptions, result: InjectResult) -> _Front | None:
    kind = doc.get("kind")
    label = _label(doc)
    if kind not in KINDS or KINDS[kind][0] != _group(doc):
        if _get(doc, ("spec", "template", "spec", "containers")) is not None or (
            kind != "Service" and _get(doc, ("spec", "containers")) is not None
        ):
            raise InjectError(
                f"{label} ({doc.get('apiVersion')}): this kind is not supported; infermon inject handles "
                f"{SUPPORTED} (add the sidecar by hand: docs/kubernetes.md)"
            )
        return None
    _, spec_path, meta_path = KINDS[kind]
    if kind == "Rollout" and _get(doc, ("spec", "workloadRef")) is not None:
        raise InjectError(
            f"{label}: the Rollout takes its pod template from spec.workloadRef; inject the Deployment it "
            "names instead"
        )
    pod = _get(doc, spec_path)
    if kind == "InferenceService":
        pod = _get(doc, ("spec", "predictor"))
        if not isinstance(pod, dict):
            raise InjectError(f"{label}: no spec.predictor to inject")
        frameworks = [k for k in pod if k not in _PODSPEC_KEYS and isinstance(pod[k], dict)]
        if not isinstance(pod.get("containers"), list) or frameworks:
            raise InjectError(
                f"{label}: the predictor uses {'/'.join(frameworks) or 'no containers'}; KServe puts a "
                "sidecar in the model's path only for a custom container predictor (spec.predictor.containers "
                f"with the model server as {KSERVE_CONTAINER}): write the predictor that way and inject it"
            )
    if not isinstance(pod, dict) or not isinstance(pod.get("containers"), list) or not pod["containers"]:
        raise InjectError(f"{label}: no containers in {'.'.join(spec_path)}")
    meta = _get(doc, meta_path)
    if meta is None:
        parent = _get(doc, meta_path[:-1])
        meta = _ensure_map(parent, meta_path[-1], before="spec")
    return _inject_pod(label, kind, doc, pod, meta, options, result)


#: keys of a PodSpec and of KServe's component extension that may sit beside containers in a predictor
_PODSPEC_KEYS = frozenset(
    {
        "containers", "initContainers", "ephemeralContainers", "volumes", "restartPolicy",
        "terminationGracePeriodSeconds", "activeDeadlineSeconds", "dnsPolicy", "nodeSelector",
        "serviceAccountName", "serviceAccount", "automountServiceAccountToken", "nodeName", "hostNetwork",
        "hostPID", "hostIPC", "shareProcessNamespace", "securityContext", "imagePullSecrets", "hostname",
        "subdomain", "affinity", "schedulerName", "tolerations", "hostAliases", "priorityClassName",
        "priority", "dnsConfig", "readinessGates", "runtimeClassName", "enableServiceLinks",
        "preemptionPolicy", "overhead", "topologySpreadConstraints", "setHostnameAsFQDN", "os",
        "hostUsers", "schedulingGates", "resourceClaims", "resources",
        # ComponentExtensionSpec
        "minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType", "containerConcurrency",
        "timeout", "canaryTrafficPercent", "logger", "batcher", "labels", "annotations",
        "deploymentStrategy", "autoScaling", "storageUris", "workerSpec",
    }
)  # fmt: skip


def _containers(pod: Any) -> list[Any]:
    return [c for key in ("initContainers", "containers") for c in (pod.get(key) or []) if isinstance(c, dict)]


def _port_number(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _inject_pod(
    label: str, kind: str, doc: Any, pod: Any, meta: Any, options: InjectOptions, result: InjectResult
) -> _Front | None:
    isvc = kind == "InferenceService"
    mode = options.sidecar
    if mode == "auto":
        mode = "classic" if isvc else "native"
    if isvc and mode == "native":
        raise InjectError(
            f"{label}: KServe (Knative) runs a predictor's containers, not restartable init containers: "
            "use --sidecar classic (the default for an InferenceService)"
        )
    if kind in ("Job", "CronJob") and mode == "classic":
        raise InjectError(
            f"{label}: a {kind} with a classic sidecar never completes (infermon keeps running after the "
            "model container exits); use --sidecar native (Kubernetes 1.29 and later)"
        )
    if pod.get("hostNetwork") is True:
        raise InjectError(
            f"{label}: the pod uses hostNetwork: every port in it is a port of the node, so the model server "
            "stays reachable on the node's address around infermon, and infermon's ports "
            f"{options.proxy_port} and {options.admin_port} would be taken on the node (one such pod per "
            "node); run the pod on its own network (a Service reaches it) or put infermon in front of it "
            "on the node (docs/local.md)"
        )
    namespace = _get(doc, ("metadata", "namespace"))
    labels = dict(_get(meta, ("labels",)) or {})
    existing = [c for c in _containers(pod) if c.get("name") == CONTAINER]
    if existing:
        front = _already(label, meta, options, mode, namespace, labels, result)
        return None if isvc else front  # KServe makes the Services itself

    app = _choose_container(label, pod, options, isvc)
    entry, app_port = _choose_port(label, app, options, isvc)
    taken_numbers: dict[int, str] = {}
    taken_names: dict[str, str] = {}
    for c in _containers(pod):
        for p in c.get("ports") or []:
            if isinstance(p, dict) and p is not entry:
                if (n := _port_number(p.get("containerPort"))) is not None:
                    taken_numbers[n] = c.get("name", "?")
                if p.get("name"):
                    taken_names[str(p["name"])] = c.get("name", "?")
    taken_numbers[app_port] = app.get("name", "?")
    for flag, number in (("--proxy-port", options.proxy_port), ("--admin-port", options.admin_port)):
        if number in taken_numbers:
            raise InjectError(
                f"{label}: port {number} is already taken by container {taken_numbers[number]!r}; infermon "
                f"needs it ({flag}): choose a free one with {flag}"
            )
    if ADMIN_PORT_NAME in taken_names:
        raise InjectError(
            f"{label}: the port name {ADMIN_PORT_NAME} is already taken by container "
            f"{taken_names[ADMIN_PORT_NAME]!r}; rename that port"
        )
    old_name = str(entry["name"]) if entry is not None and entry.get("name") else None
    if isvc:  # Knative: the Revision's one port is named http1, h2c or nothing
        front_name = old_name if old_name in KNATIVE_PORT_NAMES else ""
        app_name = None
    elif old_name is not None:
        front_name = old_name
        app_name = f"app-{app_port}"
        if app_name in taken_names:
            raise InjectError(
                f"{label}: the model server's port {old_name} would be renamed {app_name}, which container "
                f"{taken_names[app_name]!r} already uses; rename that port"
            )
    else:
        front_name = "http" if "http" not in taken_names else "infermon-http"
        app_name = None
        if front_name in taken_names:
            raise InjectError(f"{label}: the port names http and infermon-http are both taken; rename one")

    # the model container: its port keeps its number under a new name (or goes, for KServe)
    readiness = _kserve_readiness(label, app, options, result) if isvc else None
    if isvc:
        if entry is not None:
            app["ports"].remove(entry)
            if not app["ports"]:
                del app["ports"]
    elif entry is not None and app_name is not None:
        entry["name"] = app_name
        _retarget_probes(app, old_name, app_name)

    sidecar = _sidecar(options, mode, app_port, front_name, isvc)
    if readiness is not None:
        sidecar.insert(list(sidecar).index("resources"), "readinessProbe", readiness)
    if options.config_map:
        volumes = pod.get("volumes")
        if not isinstance(volumes, list):
            pod["volumes"] = volumes = _seq([])
        if any(isinstance(v, dict) and v.get("name") == CONFIG_VOLUME for v in volumes):
            raise InjectError(f"{label}: a volume named {CONFIG_VOLUME} already exists; rename it")
        volumes.append(_new_map(("name", CONFIG_VOLUME), ("configMap", _flow_map(("name", options.config_map)))))
    if mode == "native":
        if not isinstance(pod.get("initContainers"), list):
            pod.insert(list(pod).index("containers"), "initContainers", _seq([]))
        pod["initContainers"].append(sidecar)
    else:
        pod["containers"].append(sidecar)
    grace = _port_number(pod.get("terminationGracePeriodSeconds"))
    if not isvc and (grace is None or grace < GRACE_SECONDS):  # Knative sets it from the Revision's timeout
        pod["terminationGracePeriodSeconds"] = GRACE_SECONDS

    annotations = _ensure_map(meta, "annotations", before="spec")
    record = {
        "version": 1,
        **_settings(options, mode),
        "container": str(app.get("name")),
        "port": app_port,
        "portName": old_name,
        "front": front_name,
    }
    annotations[ANNOTATION] = json.dumps(record, sort_keys=True, separators=(",", ":"))
    if not isvc:
        annotations.setdefault("kubectl.kubernetes.io/default-container", app.get("name"))
        wanted = {"prometheus.io/scrape": "true", "prometheus.io/port": str(options.admin_port)}
        clash = {k: v for k, v in wanted.items() if k in annotations and str(annotations[k]) != v}
        if clash:
            result.notes.append(
                f"{label}: kept the pod's own {', '.join(f'{k}={annotations[k]}' for k in clash)}; Prometheus "
                f"finds infermon through the {ADMIN_PORT_NAME} port (PodMonitor) instead"
            )
        else:
            for key, value in wanted.items():
                annotations[key] = value
            annotations.setdefault("prometheus.io/path", "/metrics")
    result.injected += 1
    via = f"port {front_name or 'of the Revision'} -> infermon :{options.proxy_port} -> {app.get('name')} :{app_port}"
    result.notes.append(f"{label}: injected ({mode} sidecar; {via})")
    if isvc:
        return None
    if mode == "native":
        result.notes.append(
            f"{label}: Services outside this input: point their targetPort at {options.proxy_port}, by number "
            f"(before Kubernetes 1.32 a Service finds no port of a native sidecar by its name, {front_name} "
            f"included, and gets no endpoints; one that targets {app_port} still reaches {app.get('name')} "
            "directly)"
        )
    return _Front(namespace, labels, app_port, front_name, mode == "native", options.proxy_port)


def _kserve_readiness(label: str, app: Any, options: InjectOptions, result: InjectResult) -> Any:
    """The model container's readinessProbe, taken off it and pointed at infermon's port: Knative
    accepts probes only on the container that declares the Revision's port (infermon, once injected;
    the multi-container-probing feature is off by default). Through infermon it still asks the model
    server. A probe that cannot move that way is refused."""
    for key in ("livenessProbe", "startupProbe"):
        if app.get(key) is not None:
            raise InjectError(
                f"{label}: {app.get('name')} has a {key}; Knative accepts probes only on the container that "
                f"declares the port, which is infermon once injected (unless the multi-container-probing "
                f"feature is on), and moved to infermon a {key} would restart infermon, not the model "
                f"server: remove it (its readinessProbe moves to infermon and checks the model through it)"
            )
    probe = app.get("readinessProbe")
    if probe is None:
        result.notes.append(
            f"{label}: {app.get('name')} has no readinessProbe; Knative then only checks that infermon's "
            "port accepts connections: give the model a readinessProbe (httpGet) and inject again"
        )
        return None
    if not isinstance(probe, dict) or not any(isinstance(probe.get(k), dict) for k in ("httpGet", "tcpSocket")):
        handler = next((k for k in ("exec", "grpc") if k in probe), "such a") if isinstance(probe, dict) else "such a"
        raise InjectError(
            f"{label}: {app.get('name')} has an {handler} readinessProbe, which cannot move to infermon (Knative "
            "accepts probes only on the container that declares the port); write it as an httpGet probe of "
            "the model server's readiness path"
        )
    del app["readinessProbe"]
    if isinstance(probe.get("httpGet"), dict):
        probe["httpGet"]["port"] = options.proxy_port  # through infermon to the model server's path
    else:
        probe["tcpSocket"]["port"] = options.proxy_port
        result.notes.append(
            f"{label}: {app.get('name')}'s tcpSocket readinessProbe now checks infermon's port only: an httpGet "
            "probe of the model server's readiness path would check the model through infermon"
        )
    return probe


def _settings(options: InjectOptions, mode: str) -> dict[str, Any]:
    """The part of the record that the options decide (compared when a template is injected again)."""
    return {
        "image": options.image,
        "proxyPort": options.proxy_port,
        "adminPort": options.admin_port,
        "sidecar": mode,
        "configMap": options.config_map,
    }


def _already(
    label: str,
    meta: Any,
    options: InjectOptions,
    mode: str,
    namespace: str | None,
    labels: dict[str, str],
    result: InjectResult,
) -> _Front:
    raw = _get(meta, ("annotations", ANNOTATION))
    try:
        record = json.loads(str(raw)) if raw is not None else None
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise InjectError(
            f"{label}: it already has a container named {CONTAINER} that infermon inject did not add (no "
            f"valid {ANNOTATION} annotation); remove or rename that container"
        )
    wanted = {**record, **_settings(options, mode)}
    if options.container is not None:
        wanted["container"] = options.container
    if options.port is not None and options.port not in (str(record.get("port")), record.get("portName")):
        wanted["port"] = options.port
    differ = [f"{k} {record.get(k)!r} (now {v!r})" for k, v in wanted.items() if record.get(k) != v]
    if differ:
        raise InjectError(
            f"{label}: already injected with other settings: {'; '.join(differ)}. Inject the original "
            f"manifest again, or remove the {CONTAINER} container and the {ANNOTATION} annotation first"
        )
    result.unchanged += 1
    result.notes.append(f"{label}: already injected, unchanged")
    port, front = _port_number(record.get("port")), record.get("front")
    if port is None or not isinstance(front, str):
        raise InjectError(f"{label}: the {ANNOTATION} annotation is damaged (no port or front); inject the original")
    return _Front(namespace, labels, port, front, mode == "native", options.proxy_port)


def _choose_container(label: str, pod: Any, options: InjectOptions, isvc: bool) -> Any:
    containers = [c for c in pod["containers"] if isinstance(c, dict)]
    names = [str(c.get("name")) for c in containers]
    if options.container is not None:
        for c in containers:
            if c.get("name") == options.container:
                return c
        raise InjectError(f"{label}: no container named {options.container!r} (containers: {', '.join(names)})")
    if len(containers) == 1:
        return containers[0]
    if isvc and KSERVE_CONTAINER in names:
        return containers[names.index(KSERVE_CONTAINER)]
    with_ports = [c for c in containers if c.get("ports")]
    if len(with_ports) == 1:
        return with_ports[0]
    raise InjectError(
        f"{label}: {len(containers)} containers ({', '.join(names)}); name the model server with --container"
    )


def _choose_port(label: str, app: Any, options: InjectOptions, isvc: bool) -> tuple[Any, int]:
    name = app.get("name")
    ports = [p for p in app.get("ports") or [] if isinstance(p, dict) and p.get("protocol", "TCP") == "TCP"]
    if options.port is not None:
        for p in ports:
            if options.port in (str(p.get("name")), str(p.get("containerPort"))):
                number = _port_number(p.get("containerPort"))
                if number is None:
                    break
                return p, number
        if isvc and options.port.isdigit() and not ports:
            return None, int(options.port)
        listed = ", ".join(f"{p.get('name') or '-'} {p.get('containerPort')}" for p in ports) or "none"
        raise InjectError(f"{label}: container {name!r} has no TCP port {options.port!r} (its ports: {listed})")
    if not ports:
        if isvc:
            return None, KSERVE_PORT
        raise InjectError(
            f"{label}: container {name!r} declares no TCP container port, so infermon cannot tell where the "
            "model server listens; add it to the container's ports (containerPort, with a name)"
        )
    if len(ports) > 1:
        listed = ", ".join(f"{p.get('name') or '-'} {p.get('containerPort')}" for p in ports)
        raise InjectError(f"{label}: container {name!r} has several ports ({listed}); choose one with --port")
    number = _port_number(ports[0].get("containerPort"))
    if number is None:
        raise InjectError(f"{label}: container {name!r}: containerPort {ports[0].get('containerPort')!r} is no number")
    if ports[0].get("hostPort"):
        raise InjectError(
            f"{label}: container {name!r}'s port {number} has a hostPort: traffic to the node's port would "
            "reach the model server directly; remove the hostPort (a Service reaches the pod)"
        )
    return ports[0], number


def _retarget_probes(app: Any, old_name: str | None, new: str | int) -> None:
    """The model container's probes and hooks that named its port keep checking the model server."""
    if old_name is None:
        return
    handlers = [app.get(k) for k in ("livenessProbe", "readinessProbe", "startupProbe")]
    lifecycle = app.get("lifecycle")
    if isinstance(lifecycle, dict):
        handlers += [lifecycle.get("postStart"), lifecycle.get("preStop")]
    for handler in handlers:
        if not isinstance(handler, dict):
            continue
        for action in ("httpGet", "tcpSocket"):
            target = handler.get(action)
            if isinstance(target, dict) and target.get("port") == old_name:
                target["port"] = new


def _sidecar(options: InjectOptions, mode: str, app_port: int, front_name: str, isvc: bool) -> Any:
    admin = ADMIN_PORT_NAME
    args = [
        "proxy",
        "--listen", f"0.0.0.0:{options.proxy_port}",
        "--upstream", f"http://127.0.0.1:{app_port}",
        "--admin", f"0.0.0.0:{options.admin_port}",
    ]  # fmt: skip
    env = []
    if options.config_map:
        env.append(_new_map(("name", "INFERMON_CONFIG"), ("value", f"{CONFIG_DIR}/infermon.yaml")))
    if not isvc:  # Knative refuses the Downward API in env unless kubernetes.podspec-fieldref is on
        env += [
            _new_map(("name", var), ("valueFrom", _flow_map(("fieldRef", _flow_map(("fieldPath", path))))))
            for var, path in DOWNWARD_ENV.items()
        ]
    env.append(_new_map(("name", "K8S_CONTAINER_NAME"), ("value", CONTAINER)))
    c = _new_map(("name", CONTAINER), ("image", options.image))
    if mode == "native":
        c["restartPolicy"] = "Always"  # a native sidecar: starts before the model server, stops after it
    c["args"] = _seq(args, flow=True)
    front = _flow_map(("name", front_name), ("containerPort", options.proxy_port), ("protocol", "TCP"))
    if isvc:
        # Knative: one port in the whole Revision; the admin port is served, not declared
        if not front_name:
            del front["name"]
        c["ports"] = _seq([front])
    else:
        admin_port = _flow_map(("name", admin), ("containerPort", options.admin_port), ("protocol", "TCP"))
        c["ports"] = _seq([front, admin_port])
    c["env"] = _seq(env)
    if not isvc:  # Knative: the model's readinessProbe moves here (_kserve_readiness), no hooks
        if mode == "native":
            c["startupProbe"] = _flow_map(
                ("httpGet", _flow_map(("path", "/healthz"), ("port", admin))),
                ("periodSeconds", 1),
                ("failureThreshold", 30),
            )
        c["readinessProbe"] = _flow_map(
            ("httpGet", _flow_map(("path", "/readyz"), ("port", admin))), ("periodSeconds", 2)
        )
        c["livenessProbe"] = _flow_map(
            ("httpGet", _flow_map(("path", "/healthz"), ("port", admin))),
            ("periodSeconds", 10),
            ("failureThreshold", 3),
        )
        if mode == "classic":
            # the endpoints controllers take the pod out of the Service before infermon stops accepting
            c["lifecycle"] = _new_map(
                ("preStop", _new_map(("exec", _flow_map(("command", _seq(["sleep", str(PRESTOP_SECONDS)], True))))))
            )
    c["resources"] = _new_map(
        ("requests", _flow_map(("cpu", "250m"), ("memory", "96Mi"))),
        ("limits", _flow_map(("memory", "256Mi"))),
    )
    c["securityContext"] = _new_map(
        ("runAsNonRoot", True),
        ("runAsUser", IMAGE_UID),
        ("runAsGroup", IMAGE_UID),
        ("allowPrivilegeEscalation", False),
        ("readOnlyRootFilesystem", True),
        ("capabilities", _flow_map(("drop", _seq(["ALL"], flow=True)))),
        ("seccompProfile", _flow_map(("type", "RuntimeDefault"))),
    )
    if options.config_map:
        c["volumeMounts"] = _seq(
            [_flow_map(("name", CONFIG_VOLUME), ("mountPath", CONFIG_DIR), ("readOnly", True))]
        )
    return c


def _point_service(doc: Any, fronts: list[_Front], result: InjectResult) -> bool:
    """A Service in the input that selects an injected pod and reached the model's port now reaches
    infermon's: by number for a native sidecar (before Kubernetes 1.32 a Service's named targetPort
    is looked up among the pod's ``containers`` only), by the moved name for a classic one. True
    when it was changed."""
    selector = _get(doc, ("spec", "selector"))
    ports = _get(doc, ("spec", "ports"))
    changed = False
    if not isinstance(selector, dict) or not selector or not isinstance(ports, list):
        return changed
    namespace = _get(doc, ("metadata", "namespace"))
    for front in fronts:
        if front.namespace != namespace or any(front.labels.get(k) != v for k, v in selector.items()):
            continue
        for port in ports:
            if not isinstance(port, dict) or port.get("protocol", "TCP") != "TCP":
                continue
            target = port.get("targetPort", port.get("port"))
            new: int | str = front.proxy_port if front.native else front.front_name
            if _port_number(target) == front.app_port or (front.native and target == front.front_name):
                port["targetPort"] = new
                changed = True
                result.notes.append(
                    f"{_label(doc)}: port {port.get('name') or port.get('port')} now targets {new} "
                    f"(infermon) instead of {target}"
                )
    return changed
