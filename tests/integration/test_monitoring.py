"""deploy/monitoring's dashboard and alerting rules query metrics the gateway really exposes.

Every PromQL expression of the Grafana dashboard (panel targets and template variables) and of the
Prometheus rules file is parsed with a real PromQL parser (promql-parser), and every metric name it
selects must be a sample name of a family in the `/metrics` output of a real gateway in front of
real Faktory (through the Ent stand-in) after traffic: a renamed or removed metric breaks this
test, not a dashboard nobody looks at until the night it matters.
"""

from __future__ import annotations

import json
import re

import promql_parser
import pytest
import yaml

from tests.support.client import RawClient, job, push_line
from tests.support.processes import REPO, GatewayProcess
from tests.support.standin import StandinProcess

MONITORING = REPO / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
RULES = MONITORING / "prometheus-rules.yaml"

# Grafana's interval variables stand where PromQL wants a duration; $job and the like appear
# only inside label matchers' quoted values, which the parser takes as they are.
GRAFANA_DURATIONS = re.compile(
    r"\$(__rate_interval|__interval|__range)\b|\$\{(__rate_interval|__interval|__range)\}"
)
LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*[a-zA-Z_][a-zA-Z0-9_]*\s*\)\s*$", re.DOTALL)

# Sample names each metric type carries, by suffix of the family name in `# TYPE` lines.
SUFFIXES = {
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "counter": ("",),  # the text format's counter families already end in _total
    "gauge": ("",),
    "untyped": ("",),
}


# --- expressions -------------------------------------------------------------------------------


def dashboard_expressions(dashboard: dict) -> list[str]:
    """Every PromQL expression of a dashboard: panel targets (rows' nested panels too) and the
    series selectors of `label_values(...)` template variables."""
    found = []

    def panels(items: list[dict]):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard["panels"]):
        found += [target["expr"] for target in panel.get("targets", []) if target.get("expr")]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = LABEL_VALUES.match(query)
            assert match, f"template variable {variable['name']}: not label_values(selector, label)"
            found.append(match.group(1))
    return found


def rules_expressions(rules: dict) -> list[str]:
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def metric_names(expression: str) -> set[str]:
    """The metric names an expression selects (by name, or by a `__name__="..."` matcher)."""
    expression = GRAFANA_DURATIONS.sub("5m", expression)
    names: set[str] = set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for matcher in node.matchers.matchers if node.matchers else []:
                if matcher.name == "__name__":
                    assert matcher.op == promql_parser.MatchOp.Equal, f"regex on __name__: {expression}"
                    names.add(matcher.value)

    promql_parser.walk(promql_parser.parse(expression), visit)
    return names


# --- what /metrics exposes -----------------------------------------------------------------------


def exposed_sample_names(exposition: str) -> set[str]:
    """The sample names the exposition's families carry: a histogram F has F_bucket, F_sum and
    F_count and no F; a counter, gauge or info has its own name."""
    names = set()
    for family, kind in re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.MULTILINE):
        names |= {family + suffix for suffix in SUFFIXES[kind]}
    return names


def samples_present(exposition: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in exposition.splitlines() if line and line[0] != "#"}


def missing(names: set[str], exposition: str) -> set[str]:
    return names - exposed_sample_names(exposition)


# --- the tests ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exposition(faktory) -> str:
    """/metrics of a real gateway in front of the Ent stand-in, after plain and batch traffic and a refusal."""
    standin = StandinProcess(faktory.url).start()
    gateway = GatewayProcess(standin.url, "--log-level", "error").start()
    try:
        with RawClient.connect(gateway.url, wid="w-monitoring") as client:
            client.call("INFO")
            assert client.call(push_line(job("plain-job-1", queue="monitoring"))) == b"+OK\r\n"
            client.call('ACK {"jid":"%s"}' % client.json("FETCH monitoring")["jid"])
            spec = {"success": {"jobtype": "Done", "args": [], "queue": "monitoring-cb"}}
            bid = client.value("BATCH NEW " + json.dumps(spec)).decode()
            member = push_line(job("member-job-1", queue="monitoring", custom={"bid": bid}))
            assert client.call(member) == b"+OK\r\n"
            assert client.call(f"BATCH COMMIT {bid}") == b"+OK\r\n"  # through the commit fence
            late = push_line(job("member-job-2", queue="monitoring", custom={"bid": bid}))
            assert client.call(late).startswith(b"-ERR BATCH_COMMITTED")
            client.call(f"BATCH STATUS {bid}")
        status, text = gateway.http("/metrics")
        assert status == 200
        return text
    finally:
        gateway.stop()
        standin.stop()


def test_the_traffic_made_the_labelled_series_appear(exposition):
    present = samples_present(exposition)
    assert 'faktory_gateway_refusals_total{code="BATCH_COMMITTED"} 1.0' in exposition
    assert {
        "faktory_gateway_store_calls_total",
        "faktory_gateway_commit_fence_wait_seconds_bucket",
    } <= present
    assert re.search(r'^faktory_gateway_commands_total\{result="ok",verb="BATCH"\} [1-9]', exposition, re.M)


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_every_metric_a_query_uses_is_exposed_by_the_gateway(exposition, source):
    if source == "dashboard":
        expressions = dashboard_expressions(json.loads(DASHBOARD.read_text()))
    else:
        expressions = rules_expressions(yaml.safe_load(RULES.read_text()))
    assert len(expressions) >= 7
    used: dict[str, list[str]] = {}
    for expression in expressions:
        names = metric_names(expression)
        assert names, f"no metric in {expression!r}"
        for name in names:
            used.setdefault(name, []).append(expression)
    unknown = missing(set(used), exposition)
    assert not unknown, "not in the gateway's /metrics: " + "; ".join(
        f"{n} (in {used[n][0]!r})" for n in unknown
    )


def test_the_dashboard_shows_what_operators_need():
    names = set().union(*map(metric_names, dashboard_expressions(json.loads(DASHBOARD.read_text()))))
    for needed in (
        "faktory_gateway_refusals_total",
        "faktory_gateway_shadow_refusals_total",
        "faktory_gateway_commands_total",
        "faktory_gateway_added_latency_seconds_bucket",
        "faktory_gateway_commit_fence_wait_seconds_bucket",
        "faktory_gateway_store_calls_total",
        "faktory_gateway_store_errors_total",
        "faktory_gateway_connections_active",
        "faktory_gateway_upstream_dial_errors_total",
    ):
        assert needed in names, needed
    fence_timeouts = [
        e for e in dashboard_expressions(json.loads(DASHBOARD.read_text())) if "COMMIT_FENCE_TIMEOUT" in e
    ]
    assert fence_timeouts


EXPOSITION = """\
# HELP x_requests_total Requests
# TYPE x_requests_total counter
x_requests_total{code="a"} 1.0
# TYPE x_wait_seconds histogram
x_wait_seconds_bucket{le="+Inf"} 0.0
x_wait_seconds_count 0.0
x_wait_seconds_sum 0.0
# TYPE x_open gauge
"""


@pytest.mark.parametrize(
    "expression, unknown",
    [
        ('sum by (code) (rate(x_requests_total{job=~"$job"}[$__rate_interval]))', set()),
        ("histogram_quantile(0.9, sum by (le) (rate(x_wait_seconds_bucket[5m])))", set()),
        ("rate(x_wait_seconds_sum[5m]) / rate(x_wait_seconds_count[5m]) + x_open", set()),
        ("increase(x_request_total[10m]) > 0", {"x_request_total"}),  # renamed
        ("x_wait_seconds > 1", {"x_wait_seconds"}),  # a histogram has no bare series
        ("rate(x_requests_total_bucket[5m])", {"x_requests_total_bucket"}),  # a counter has no buckets
        ('x_open unless {__name__="x_closed"} offset 10m', {"x_closed"}),
    ],
)
def test_the_name_check_catches_what_it_must(expression, unknown):
    assert missing(metric_names(expression), EXPOSITION) == unknown


def test_the_expression_extraction_reads_panels_rows_and_variables():
    dashboard = {
        "panels": [
            {"type": "row", "panels": [{"targets": [{"expr": "a_total"}]}]},
            {"targets": [{"expr": "rate(b_total[$__rate_interval])"}, {"refId": "B"}]},
        ],
        "templating": {
            "list": [{"name": "job", "type": "query", "query": {"query": "label_values(c_info, job)"}}]
        },
    }
    expressions = dashboard_expressions(dashboard)
    assert set().union(*map(metric_names, expressions)) == {"a_total", "b_total", "c_info"}
    assert rules_expressions({"groups": [{"rules": [{"expr": "d > 0"}]}]}) == ["d > 0"]
    assert metric_names("sum(rate(e_total[${__range}]))") == {"e_total"}


def test_promql_parser_rejects_a_broken_expression():
    with pytest.raises(ValueError):
        metric_names("sum by (code (rate(x_total[5m]))")
