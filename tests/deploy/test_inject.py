"""proxy/deploy/inject.py: realistic manifests injected, checked against the Kubernetes schemas, twice.

Each input in tests/deploy/manifests/ is a manifest a model-serving team would write (MLServer,
TorchServe, vLLM under an Argo Rollout, batch Jobs, a DaemonSet, a KServe predictor). The output must
pass the API's strict schemas for every version in kube.VERSIONS, route the Service through infermon,
keep the model server reachable by its own probes, keep every comment and unknown field, and come
out byte for byte the same when injected again.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.deploy.inject import (
    ADMIN_PORT_NAME,
    ANNOTATION,
    DOWNWARD_ENV,
    GRACE_SECONDS,
    InjectError,
    InjectOptions,
    inject_text,
)
from proxy.observe.tracing import K8S_ENV
from tests.deploy.kube import VERSIONS, find, load_all, pod_containers, resolve_port, validate_all

HERE = Path(__file__).resolve().parent
MANIFESTS = HERE / "manifests"
BASE = HERE.parents[1] / "deploy" / "k8s" / "base" / "deployment.yaml"
#: input file -> the options it is injected with
CASES: dict[str, InjectOptions] = {
    "mlserver.yaml": InjectOptions(),
    "torchserve.yaml": InjectOptions(port="inference"),
    "vllm-rollout.yaml": InjectOptions(image="registry.example/infermon:0.1.0"),
    "batch.yaml": InjectOptions(),
    "daemonset.yaml": InjectOptions(sidecar="classic"),
    "kserve.yaml": InjectOptions(),
    "iris-plain.yaml": InjectOptions(config_map="iris-infermon"),
}


def _inject(name: str, options: InjectOptions | None = None) -> tuple[str, str]:
    text = (MANIFESTS / name).read_text()
    return text, inject_text(text, options or CASES[name]).text


def _pod(doc: dict[str, Any]) -> dict[str, Any]:
    kind = doc["kind"]
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]  # type: ignore[no-any-return]
    if kind == "InferenceService":
        return doc["spec"]["predictor"]  # type: ignore[no-any-return]
    return doc["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def _template_annotations(doc: dict[str, Any]) -> dict[str, str]:
    if doc["kind"] == "InferenceService":
        return doc["metadata"].get("annotations", {})  # type: ignore[no-any-return]
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["metadata"].get("annotations", {})  # type: ignore[no-any-return]
    return doc["spec"]["template"]["metadata"].get("annotations", {})  # type: ignore[no-any-return]


def test_every_input_is_a_case() -> None:
    assert {p.name for p in MANIFESTS.glob("*.yaml")} == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_inputs_are_valid_before(name: str) -> None:
    validate_all(load_all((MANIFESTS / name).read_text()), VERSIONS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_output_is_valid_and_a_second_pass_changes_nothing(name: str) -> None:
    _, once = _inject(name)
    docs = load_all(once)
    assert validate_all(docs, VERSIONS) == len(docs)  # every resource, the custom ones' pod templates too
    twice = inject_text(once, CASES[name])
    assert twice.text == once
    assert twice.injected == 0 and twice.unchanged >= 1


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_service_of_the_input_that_reached_the_model_reaches_infermon(name: str) -> None:
    """Resolved as Kubernetes before 1.32 resolves a Service's targetPort: a port name is looked up
    among the pod's ``containers`` only, so a name on a native sidecar would give no endpoints."""
    text, out = _inject(name)
    before, after = load_all(text), load_all(out)
    checked = 0
    for doc, injected in zip(before, after, strict=True):
        if doc["kind"] in ("Service", "ConfigMap", "InferenceService"):
            continue  # KServe makes its own Services
        template = doc["spec"].get("template") or doc["spec"]["jobTemplate"]["spec"]["template"]
        labels = template.get("metadata", {}).get("labels", {})
        record = json.loads(_template_annotations(injected)[ANNOTATION])
        for service, pointed in zip(before, after, strict=True):
            selector = service["spec"].get("selector", {}) if service["kind"] == "Service" else {}
            if not selector or not selector.items() <= labels.items():
                continue
            for old, new in zip(service["spec"]["ports"], pointed["spec"]["ports"], strict=True):
                if resolve_port(_pod(doc), old.get("targetPort", old["port"])) == record["port"]:
                    assert resolve_port(_pod(injected), new["targetPort"]) == record["proxyPort"], new
                    checked += 1
    assert checked or name in ("batch.yaml", "kserve.yaml", "iris-plain.yaml")


def test_a_note_names_the_services_inject_could_not_see() -> None:
    result = inject_text((MANIFESTS / "mlserver.yaml").read_text(), InjectOptions())
    assert any("Services outside this input" in n and "9463" in n and "1.32" in n for n in result.notes)
    classic = inject_text((MANIFESTS / "daemonset.yaml").read_text(), CASES["daemonset.yaml"])
    assert not any("Services outside this input" in n for n in classic.notes)  # a name works there


@pytest.mark.parametrize("name", sorted(CASES))
def test_comments_are_kept(name: str) -> None:
    text, out = _inject(name)
    comments = [m.group(0).strip() for m in re.finditer(r"#.*$", text, re.M)]
    assert comments
    for comment in comments:
        assert comment in out, comment


def _sidecar(doc: dict[str, Any]) -> dict[str, Any]:
    return pod_containers(_pod(doc))["infermon"]


def test_mlserver_deployment() -> None:
    text, out = _inject("mlserver.yaml")
    docs = load_all(out)
    deployment = find(docs, "Deployment", "wine")
    pod = _pod(deployment)
    sidecar = pod["initContainers"][0]
    assert sidecar["name"] == "infermon" and sidecar["restartPolicy"] == "Always"
    assert sidecar["args"] == [
        "proxy", "--listen", "0.0.0.0:9463", "--upstream", "http://127.0.0.1:8080", "--admin", "0.0.0.0:9464"
    ]  # fmt: skip
    assert sidecar["ports"] == [
        {"name": "http", "containerPort": 9463, "protocol": "TCP"},
        {"name": ADMIN_PORT_NAME, "containerPort": 9464, "protocol": "TCP"},
    ]
    model = pod["containers"][0]
    assert model["ports"][0]["name"] == "app-8080" and model["ports"][0]["containerPort"] == 8080
    # the model server's own probes still reach it, by its new port name
    assert model["readinessProbe"]["httpGet"]["port"] == "app-8080"
    assert model["livenessProbe"]["httpGet"]["port"] == "app-8080"
    assert pod["terminationGracePeriodSeconds"] == 60  # longer than needed: kept
    # the Service that targeted the model's port now targets infermon's, by number (a native sidecar)
    assert find(docs, "Service", "wine")["spec"]["ports"][0]["targetPort"] == 9463
    assert find(docs, "Service", "other") == find(load_all(text), "Service", "other")
    assert find(docs, "ConfigMap") == find(load_all(text), "ConfigMap")
    annotations = _template_annotations(deployment)
    assert annotations["prometheus.io/port"] == "9464" and annotations["prometheus.io/scrape"] == "true"
    assert annotations["kubectl.kubernetes.io/default-container"] == "mlserver"
    record = json.loads(annotations[ANNOTATION])
    assert record["container"] == "mlserver" and record["port"] == 8080 and record["sidecar"] == "native"
    # the document's own annotation and field order are untouched
    assert deployment["metadata"]["annotations"] == {"deployment.kubernetes.io/revision": "3"}
    assert out.index("revisionHistoryLimit") < out.index("strategy:") < out.index("template:")
    # `kubectl get -o yaml` style lists stay that way
    assert "\n      - name: mlserver\n" in out


def test_security_probes_resources_and_downward_api() -> None:
    _, out = _inject("mlserver.yaml")
    sidecar = _sidecar(find(load_all(out), "Deployment"))
    sc = sidecar["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001 and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["allowPrivilegeEscalation"] is False
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": ADMIN_PORT_NAME}
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": ADMIN_PORT_NAME}
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/healthz", "port": ADMIN_PORT_NAME}
    assert "memory" in sidecar["resources"]["limits"] and "cpu" in sidecar["resources"]["requests"]
    env = {e["name"]: e for e in sidecar["env"]}
    # exactly the variables the proxy turns into resource attributes
    assert set(env) == set(K8S_ENV)
    assert set(DOWNWARD_ENV) | {"K8S_CONTAINER_NAME"} == set(K8S_ENV)
    for var, path in DOWNWARD_ENV.items():
        assert env[var]["valueFrom"]["fieldRef"]["fieldPath"] == path
    assert "lifecycle" not in sidecar  # native: it stops after the model server, nothing to wait for


def test_the_base_deployment_is_what_inject_writes() -> None:
    """deploy/k8s/base/deployment.yaml and inject's output for the same model server agree."""
    _, out = _inject("iris-plain.yaml")
    injected = find(load_all(out), "Deployment")
    base = yaml.safe_load(BASE.read_text())
    assert _pod(injected) == _pod(base)
    annotations = _template_annotations(injected)
    assert annotations.pop(ANNOTATION)
    assert annotations == base["spec"]["template"]["metadata"]["annotations"]


def test_torchserve_fronts_the_chosen_port_and_keeps_its_own_scrape_annotations() -> None:
    result = inject_text((MANIFESTS / "torchserve.yaml").read_text(), CASES["torchserve.yaml"])
    docs = load_all(result.text)
    pod = _pod(find(docs, "StatefulSet"))
    sidecar = pod_containers(pod)["infermon"]
    assert sidecar["args"][4] == "http://127.0.0.1:8080"
    assert sidecar["ports"][0]["name"] == "inference"
    ports = {p["name"]: p["containerPort"] for p in pod["containers"][0]["ports"]}
    assert ports == {"app-8080": 8080, "management": 8081, "metrics": 8082}
    annotations = _template_annotations(find(docs, "StatefulSet"))
    assert annotations["prometheus.io/port"] == "8082"  # TorchServe's metrics, not overwritten
    assert any("kept the pod's own prometheus.io" in n for n in result.notes)
    # inference now reaches infermon (by number: a native sidecar), management still TorchServe
    service = find(docs, "Service")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [9463, "management"]
    assert "volumeClaimTemplates" in find(docs, "StatefulSet")["spec"]


def test_an_unnamed_port_gets_the_name_http() -> None:
    _, out = _inject("vllm-rollout.yaml")
    docs = load_all(out)
    rollout = find(docs, "Rollout")
    pod = _pod(rollout)
    sidecar = pod_containers(pod)["infermon"]
    assert sidecar["image"] == "registry.example/infermon:0.1.0"
    assert sidecar["ports"][0] == {"name": "http", "containerPort": 9463, "protocol": "TCP"}
    assert pod["containers"][0]["ports"] == [{"containerPort": 8000}]  # unnamed: untouched
    assert pod["containers"][0]["startupProbe"]["httpGet"]["port"] == 8000
    assert find(docs, "Service")["spec"]["ports"][0]["targetPort"] == 9463
    assert rollout["spec"]["strategy"]["canary"]["steps"][0] == {"setWeight": 20}
    # a long line is never folded
    assert '"--gpu-memory-utilization", "0.9"]' in out


def test_jobs_get_a_native_sidecar_after_their_init_containers() -> None:
    _, out = _inject("batch.yaml")
    docs = load_all(out)
    job = _pod(find(docs, "Job"))
    assert [c["name"] for c in job["initContainers"]] == ["fetch-model", "infermon"]
    assert job["terminationGracePeriodSeconds"] == GRACE_SECONDS
    cron = _pod(find(docs, "CronJob"))
    assert [c["name"] for c in cron["initContainers"]] == ["infermon"]


def test_a_job_with_a_classic_sidecar_is_refused() -> None:
    with pytest.raises(InjectError, match="never completes"):
        inject_text((MANIFESTS / "batch.yaml").read_text(), InjectOptions(sidecar="classic"))


def test_a_classic_sidecar_waits_in_prestop_and_the_service_port_is_rewritten() -> None:
    _, out = _inject("daemonset.yaml")
    docs = load_all(out)
    pod = _pod(find(docs, "DaemonSet"))
    assert "initContainers" not in pod
    sidecar = pod["containers"][1]
    assert sidecar["name"] == "infermon" and "restartPolicy" not in sidecar and "startupProbe" not in sidecar
    assert sidecar["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    # `port: 7000` without targetPort meant 7000
    assert find(docs, "Service")["spec"]["ports"][0] == {"port": 7000, "targetPort": "http"}


def test_kserve_predictor_infermon_declares_the_port() -> None:
    _, out = _inject("kserve.yaml")
    isvc = find(load_all(out), "InferenceService")
    predictor = isvc["spec"]["predictor"]
    model, sidecar = predictor["containers"]
    assert model["name"] == "kserve-container" and "ports" not in model  # KServe: one container declares it
    assert "readinessProbe" not in model  # moved to infermon: Knative probes the serving container only
    assert sidecar["name"] == "infermon" and sidecar["ports"][0]["containerPort"] == 9463
    assert sidecar["args"][4] == "http://127.0.0.1:8080"
    assert "lifecycle" not in sidecar and "livenessProbe" not in sidecar  # Knative rejects them here
    assert "initContainers" not in predictor and predictor["minReplicas"] == 1
    assert json.loads(isvc["metadata"]["annotations"][ANNOTATION])["sidecar"] == "classic"


def _knative_errors(predictor: dict[str, Any]) -> list[str]:
    """What Knative Serving's webhook (a Serverless InferenceService becomes a Knative Service) rejects
    in a Revision's containers, with its feature flags at their defaults: one port across all
    containers, named '', 'http1' or 'h2c'; no probes on the containers without it (the
    multi-container-probing flag is off); no lifecycle hooks; no Downward API env (the
    kubernetes.podspec-fieldref flag is off)."""
    errors = [f"{key} in the pod" for key in ("initContainers", "terminationGracePeriodSeconds") if key in predictor]
    containers = predictor["containers"]
    ports = [(c["name"], p) for c in containers for p in c.get("ports", [])]
    if len(ports) != 1:
        errors.append(f"{len(ports)} container ports across the containers: exactly one is allowed")
    errors += [f"{name}: port name {p['name']!r}" for name, p in ports if p.get("name", "") not in ("", "http1", "h2c")]
    serving = {name for name, _ in ports}
    for c in containers:
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            if probe in c and c["name"] not in serving:
                errors.append(f"{c['name']}: {probe} on a container that serves no port")
        if "lifecycle" in c:
            errors.append(f"{c['name']}: lifecycle")
        for env in c.get("env", []):
            if {"fieldRef", "resourceFieldRef"} & set(env.get("valueFrom", {})):
                errors.append(f"{c['name']}: env {env['name']} from the Downward API")
    return errors


def test_kserve_output_passes_knatives_rules() -> None:
    predictor = find(load_all((MANIFESTS / "kserve.yaml").read_text()), "InferenceService")["spec"]["predictor"]
    assert _knative_errors(predictor) == []  # the input is a valid Serverless predictor ...
    _, out = _inject("kserve.yaml")
    predictor = find(load_all(out), "InferenceService")["spec"]["predictor"]
    assert _knative_errors(predictor) == []  # ... and so is inject's output
    _, sidecar = predictor["containers"]
    # the model's readiness is checked through infermon, on the one port the Revision serves
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/v1/models/sentiment", "port": 9463}
    assert sidecar["ports"] == [{"containerPort": 9463, "protocol": "TCP"}]
    assert {e["name"] for e in sidecar["env"]} == {"K8S_CONTAINER_NAME"}
    # a port Knative knows by its name (h2c, http1) keeps it
    named = "- name: h2c\n            containerPort: 8080"
    text = (MANIFESTS / "kserve.yaml").read_text().replace("- containerPort: 8080", named)
    predictor = find(load_all(inject_text(text, InjectOptions()).text), "InferenceService")["spec"]["predictor"]
    assert predictor["containers"][1]["ports"] == [{"name": "h2c", "containerPort": 9463, "protocol": "TCP"}]


@pytest.mark.parametrize(
    ("probe", "message"),
    [
        ("livenessProbe:\n          httpGet: {path: /, port: 8080}", "livenessProbe; .*only on the container that"),
        ("startupProbe:\n          tcpSocket: {port: 8080}", "startupProbe; .*only on the container that"),
    ],
)
def test_kserve_probes_that_cannot_move_are_refused(probe: str, message: str) -> None:
    text = (MANIFESTS / "kserve.yaml").read_text().replace("resources:", probe + "\n        resources:")
    with pytest.raises(InjectError, match=message):
        inject_text(text, InjectOptions())
    exec_probe = (MANIFESTS / "kserve.yaml").read_text().replace("httpGet: {path: /v1/models/sentiment, port: 8080}",
                                                                  "exec: {command: [cat, /tmp/ready]}")
    with pytest.raises(InjectError, match="exec readinessProbe"):
        inject_text(exec_probe, InjectOptions())


def test_a_kserve_model_spec_is_refused_with_the_way_out() -> None:
    text = """
apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata: {name: iris}
spec:
  predictor:
    model:
      modelFormat: {name: sklearn}
      storageUri: gs://models/iris
"""
    with pytest.raises(InjectError, match=r"uses model; .*spec\.predictor\.containers"):
        inject_text(text, InjectOptions())
    with pytest.raises(InjectError, match="--sidecar classic"):
        inject_text((MANIFESTS / "kserve.yaml").read_text(), InjectOptions(sidecar="native"))


def test_unknown_fields_and_quoting_are_kept() -> None:
    text = """apiVersion: apps/v1
kind: Deployment
metadata:
  name: m
  x-team: {owner: 'ml-platform'}   # not a Kubernetes field
spec:
  selector: {matchLabels: {app: m}}
  template:
    metadata: {labels: {app: m}}
    spec:
      containers:
        - name: m
          image: "m:1"
          ports: [{name: http, containerPort: 8000}]
          x-future-field: [1, 2]
"""
    out = inject_text(text, InjectOptions()).text
    assert "x-team: {owner: 'ml-platform'}   # not a Kubernetes field" in out
    assert 'image: "m:1"' in out
    assert "x-future-field: [1, 2]" in out
    assert inject_text(out, InjectOptions()).text == out


def test_comment_only_documents_and_untouched_documents_are_kept_as_written() -> None:
    """A licence header before the first ``---``, the empty documents ``helm template`` writes for a
    template that renders nothing (``# Source: ...`` alone), separators with comments: all kept; the
    documents inject does not change come out byte for byte as they went in."""
    mlserver = (MANIFESTS / "mlserver.yaml").read_text()
    text = (
        "# Copyright the model team. Licensed under Apache-2.0.\n"
        "---\n"
        "# Source: wine/templates/hpa.yaml\n"
        "---\n"
        "apiVersion: v1\nkind: ConfigMap   # passes through\nmetadata: {name: settings}\ndata:\n"
        "  model.yaml: |\n    name:   wine\n    replicas:    3\n"
        "--- # the model server\n"
        + mlserver
        + "---\n# Source: wine/templates/pdb.yaml\n"
    )
    out = inject_text(text, InjectOptions()).text
    for line in text.splitlines():
        if line.lstrip().startswith("#") or line.startswith("---"):
            assert line in out.splitlines(), line
    header = "# Copyright the model team. Licensed under Apache-2.0.\n---\n# Source: wine/templates/hpa.yaml\n"
    assert out.startswith(header)
    config_map = text[text.index("apiVersion: v1\nkind: ConfigMap") : text.index("--- # the model server")]
    assert config_map in out  # untouched: its own spacing and comment too
    assert out.endswith("---\n# Source: wine/templates/pdb.yaml\n")
    assert find(load_all(out), "Deployment", "wine")
    assert inject_text(out, InjectOptions()).text == out


def test_crlf_input_keeps_its_line_endings() -> None:
    text = (MANIFESTS / "mlserver.yaml").read_text().replace("\n", "\r\n")
    out = inject_text(text, InjectOptions()).text
    assert "\r\n" in out and "\n" not in out.replace("\r\n", "")
    assert find(load_all(out), "Deployment", "wine")
    assert inject_text(out, InjectOptions()).text == out  # injecting twice changes nothing, not even line ends


def test_a_list_from_kubectl_get() -> None:
    deployment = load_all((MANIFESTS / "mlserver.yaml").read_text())[1]
    text = yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": [deployment]}, sort_keys=False)
    out = load_all(inject_text(text, InjectOptions()).text)
    assert "infermon" in pod_containers(_pod(out[0]["items"][0]))


# -- refusals -------------------------------------------------------------------------------------


def _deployment(containers: str, extra: str = "") -> str:
    return f"""apiVersion: apps/v1
kind: Deployment
metadata: {{name: m}}
spec:
  selector: {{matchLabels: {{app: m}}}}
  template:
    metadata: {{labels: {{app: m}}{extra}}}
    spec:
      containers:
{containers}"""


MODEL = "        - {name: model, image: m, ports: [{name: http, containerPort: 8080}]}\n"
TWO_NAMED = (
    "        - {{name: model, image: m, ports: "
    "[{{name: {a}, containerPort: 8080}}, {{name: {b}, containerPort: 8081}}]}}\n"
)


@pytest.mark.parametrize(
    ("text", "options", "message"),
    [
        (_deployment("        - {name: model, image: m}\n"), InjectOptions(), "declares no TCP container port"),
        (
            _deployment(MODEL + "        - {name: cache, image: c, ports: [{containerPort: 9463}]}\n"),
            InjectOptions(container="model"),
            "port 9463 is already taken by container 'cache'.*--proxy-port",
        ),
        (
            _deployment("        - {name: model, image: m, ports: [{containerPort: 8080}, {containerPort: 9464}]}\n"),
            InjectOptions(port="8080"),
            "port 9464 is already taken by container 'model'.*--admin-port",
        ),
        (_deployment(MODEL), InjectOptions(proxy_port=8080), "port 8080 is already taken by container 'model'"),
        (
            _deployment(TWO_NAMED.format(a="http", b="app-8080")),
            InjectOptions(port="http"),
            "would be renamed app-8080",
        ),
        (
            _deployment(MODEL + "        - {name: other, image: o, ports: [{containerPort: 7000}]}\n"),
            InjectOptions(),
            r"2 containers \(model, other\); name the model server with --container",
        ),
        (
            _deployment(TWO_NAMED.format(a="a", b="b")),
            InjectOptions(),
            "several ports .*choose one with --port",
        ),
        (_deployment(MODEL), InjectOptions(container="nope"), r"no container named 'nope' \(containers: model\)"),
        (_deployment(MODEL), InjectOptions(port="grpc"), "has no TCP port 'grpc'"),
        (
            _deployment("        - {name: model, image: m, ports: [{containerPort: 8080, hostPort: 80}]}\n"),
            InjectOptions(),
            "hostPort",
        ),
        (
            _deployment(MODEL).replace("    spec:\n", "    spec:\n      hostNetwork: true\n"),
            InjectOptions(),
            "hostNetwork: .*node's address",
        ),
        (
            _deployment(MODEL + "        - {name: infermon, image: x}\n"),
            InjectOptions(container="model"),
            "already has a container named infermon that infermon inject did not add",
        ),
        (
            "apiVersion: apps.kruise.io/v1alpha1\nkind: CloneSet\nmetadata: {name: c}\n"
            "spec:\n  template:\n    spec:\n      containers: [{name: m, image: m}]\n",
            InjectOptions(),
            "CloneSet/c .*not supported; infermon inject handles Pod, Deployment",
        ),
        (
            "apiVersion: argoproj.io/v1alpha1\nkind: Rollout\nmetadata: {name: r}\n"
            "spec:\n  workloadRef: {apiVersion: apps/v1, kind: Deployment, name: d}\n",
            InjectOptions(),
            "inject the Deployment it names",
        ),
        ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n", InjectOptions(), "nothing to inject"),
        ("a: [b\n", InjectOptions(), "not valid YAML"),
    ],
)
def test_refusals(text: str, options: InjectOptions, message: str) -> None:
    with pytest.raises(InjectError, match=message):
        inject_text(text, options)


def test_bad_options_are_refused() -> None:
    with pytest.raises(InjectError, match="Istio"):
        InjectOptions(proxy_port=15006)
    with pytest.raises(InjectError, match="different ports"):
        InjectOptions(proxy_port=9000, admin_port=9000)


def test_already_injected_with_other_settings_is_refused_and_the_same_settings_are_not() -> None:
    once = inject_text(_deployment(MODEL), InjectOptions()).text
    other = r"already injected with other settings: image 'infermon:0.1.0' \(now 'x:2'\)"
    with pytest.raises(InjectError, match=other):
        inject_text(once, InjectOptions(image="x:2"))
    with pytest.raises(InjectError, match=r"proxyPort 9463 \(now 9000\)"):
        inject_text(once, InjectOptions(proxy_port=9000))
    # naming the same container and port as before is the same injection
    assert inject_text(once, InjectOptions(container="model", port="http")).text == once
    assert inject_text(once, InjectOptions(port="8080")).text == once


def test_every_refusal_is_reported_and_nothing_is_written() -> None:
    bad = _deployment("        - {name: model, image: m}\n")
    text = bad + "---\n" + bad.replace("name: m}", "name: n}", 1)
    with pytest.raises(InjectError) as info:
        inject_text(text, InjectOptions())
    lines = str(info.value).splitlines()
    assert [line.split(":")[0] for line in lines] == ["Deployment/m", "Deployment/n"]
