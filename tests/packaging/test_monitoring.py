"""deploy/monitoring (alerting rules, Grafana dashboard) and their Helm templates, checked offline.

- `promtool` (Debian's prometheus package, installed by scripts/install-test-deps.sh) checks the
  rules file and runs its unit tests (prometheus-rules.test.yaml), which pin down when each alert
  fires and when it does not;
- the chart's PrometheusRule, rendered by Helm's own library, carries exactly the rules of the
  plain file (the connection-limit threshold follows config.limits.max_connections) and passes
  promtool too; the dashboard's ConfigMap carries exactly the dashboard.

That the queries name metrics the gateway really exposes is tests/integration/test_monitoring.py.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml

from tests.packaging.test_packaging import CHART, KUBE_VERSION, render, validate_k8s

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
RULES = MONITORING / "prometheus-rules.yaml"
RULES_TESTS = MONITORING / "prometheus-rules.test.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
ENABLED = {
    "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
    "grafanaDashboard": {"enabled": True},
}
ALERTS = {
    "FaktoryGatewayBatchRuleRefusals",
    "FaktoryGatewayShadowRefusals",
    "FaktoryGatewayCommitFenceTimeouts",
    "FaktoryGatewayBatchLeaseLost",
    "FaktoryGatewayShieldedLines",
    "FaktoryGatewayBatchesStalled",
    "FaktoryGatewayBatchCountsLost",
    "FaktoryGatewayStoreUnavailable",
    "FaktoryGatewayUpstreamUnreachable",
    "FaktoryGatewayConnectionLimitNear",
    "FaktoryGatewayConnectionsRefused",
}


def promtool(*args: str) -> subprocess.CompletedProcess:
    found = shutil.which("promtool")
    assert found, "promtool is not installed: scripts/install-test-deps.sh installs Debian's prometheus"
    return subprocess.run([found, *args], capture_output=True, text=True, timeout=60)


def alerts_of(rules: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}


@pytest.fixture(scope="module")
def chart() -> helm_python.Chart:
    loaded = helm_python.Chart.load(CHART)
    yield loaded
    loaded.close()


def rendered(chart: helm_python.Chart, values: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in render(chart, values) if doc["kind"] == kind]


# --- the plain files ----------------------------------------------------------------------------


def test_promtool_checks_the_rules_file():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout
    assert set(alerts_of(yaml.safe_load(RULES.read_text()))) == ALERTS


def test_promtool_unit_tests_of_the_alerts_pass():
    result = promtool("test", "rules", str(RULES_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    tested = {case["alertname"] for test in yaml.safe_load(RULES_TESTS.read_text())["tests"]
              for case in test["alert_rule_test"]}  # fmt: skip
    assert tested == ALERTS, "every alert has unit tests"


def test_promtool_rejects_broken_rules_and_an_alert_that_fires_differently(tmp_path):
    rules = yaml.safe_load(RULES.read_text())
    broken = copy.deepcopy(rules)
    alerts_of(broken)["FaktoryGatewayUpstreamUnreachable"]["expr"] = "sum by (job (up)"
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    result = promtool("check", "rules", str(tmp_path / "broken.yaml"))
    assert result.returncode != 0 and "parse error" in (result.stdout + result.stderr)

    # The unit tests see behaviour: without its first-refusal half, the refusal alert misses the
    # first refusal of a code, and the tests say so.
    naive = copy.deepcopy(rules)
    alert = alerts_of(naive)["FaktoryGatewayBatchRuleRefusals"]
    alert["expr"] = alert["expr"].split("\nor\n")[0]
    (tmp_path / "prometheus-rules.yaml").write_text(yaml.safe_dump(naive))
    shutil.copy(RULES_TESTS, tmp_path / "tests.yaml")
    result = promtool("test", "rules", str(tmp_path / "tests.yaml"))
    assert result.returncode != 0
    assert "alertname: FaktoryGatewayBatchRuleRefusals, time: 6m" in result.stdout + result.stderr


def test_every_alert_has_a_severity_and_explains_itself():
    for name, rule in alerts_of(yaml.safe_load(RULES.read_text())).items():
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
    readme = (ROOT / "README.md").read_text()
    observing = readme.split("## Observing it", 1)[1].split("\n## ", 1)[0]
    for name in ALERTS:
        assert f"`{name}`" in observing, f"README's 'Observing it' does not explain {name}"


def test_dashboard_is_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "faktory-gateway" and dashboard["title"]
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= variables
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and panel["description"], panel["title"]
        for target in panel["targets"]:
            assert 'job=~"$job"' in target["expr"] and 'instance=~"$instance"' in target["expr"], target
    # No two panels overlap on the grid.
    cells = set()
    for panel in panels:
        grid = panel["gridPos"]
        mine = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine


# --- the Helm chart -----------------------------------------------------------------------------


def test_chart_renders_neither_by_default(chart):
    kinds = {doc["kind"] for doc in render(chart, {})}
    assert "PrometheusRule" not in kinds
    assert not [d for d in rendered(chart, {}, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]


def test_prometheus_rule_carries_the_plain_rules_file(chart, tmp_path):
    (rule,) = rendered(chart, ENABLED, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule) == {"apiVersion", "kind", "metadata", "spec"}
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    assert rule["metadata"]["labels"]["app.kubernetes.io/name"] == "faktory-gateway"
    assert rule["spec"] == yaml.safe_load(RULES.read_text()), "the chart's rules are the plain file's"
    (tmp_path / "rendered.yaml").write_text(yaml.safe_dump(rule["spec"]))
    result = promtool("check", "rules", str(tmp_path / "rendered.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_rule_threshold_follows_the_connection_limit(chart):
    values = {**ENABLED, "config": {"limits": {"max_connections": 20000}}}
    (rule,) = rendered(chart, values, "PrometheusRule")
    plain = yaml.safe_load(RULES.read_text())
    near = alerts_of(rule["spec"])["FaktoryGatewayConnectionLimitNear"]
    assert near["expr"].strip().endswith("(faktory_gateway_connections_active) > 16000")
    near["expr"] = alerts_of(plain)["FaktoryGatewayConnectionLimitNear"]["expr"]
    assert rule["spec"] == plain, "nothing else differs"


def test_chart_with_monitoring_enabled_lints_clean_and_the_dashboard_configmap_is_valid(chart):
    report = helm_python.lint(CHART, ENABLED, strict=True, kube_version=KUBE_VERSION)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    values = {**ENABLED, "grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "Faktory"}}}
    (configmap,) = rendered(chart, values, "ConfigMap")
    validate_k8s(configmap)
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "Faktory"}
    assert json.loads(configmap["data"]["faktory-gateway.json"]) == json.loads(DASHBOARD.read_text())


def test_schema_rejects_unknown_monitoring_keys(chart):
    for values in ({"prometheusRule": {"enable": True}}, {"grafanaDashboard": {"labels": {"a": 1}}}):
        with pytest.raises(helm_python.HelmValuesError):
            chart.validate_schema(values)
