"""The hot-path metrics: plain counters turned into Prometheus families when scraped."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import Metrics


def scrape(metrics: Metrics) -> dict:
    samples = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def test_commands_and_latency_histograms_are_exposed_cumulatively():
    metrics = Metrics()
    for duration in (0.00004, 0.00005, 0.0003, 3.0):
        metrics.command_done("PUSH", "ok", duration, duration / 10)
    metrics.command_done("other", "error", 0.001, 0.0001)
    samples = scrape(metrics)
    push = (("verb", "PUSH"),)
    assert samples["faktory_gateway_commands_total", (("result", "ok"), ("verb", "PUSH"))] == 4
    assert samples["faktory_gateway_commands_total", (("result", "error"), ("verb", "other"))] == 1
    assert (
        samples["faktory_gateway_command_duration_seconds_bucket", (("le", "5e-05"), *push)] == 2
    )  # le is inclusive
    assert samples["faktory_gateway_command_duration_seconds_bucket", (("le", "0.00025"), *push)] == 2
    assert samples["faktory_gateway_command_duration_seconds_bucket", (("le", "0.0005"), *push)] == 3
    assert samples["faktory_gateway_command_duration_seconds_bucket", (("le", "+Inf"), *push)] == 4
    assert samples["faktory_gateway_command_duration_seconds_count", push] == 4
    assert abs(samples["faktory_gateway_command_duration_seconds_sum", push] - 3.00039) < 1e-9
    assert samples["faktory_gateway_added_latency_seconds_count", ()] == 5


def test_byte_counters():
    metrics = Metrics()
    metrics.hot.bytes_received += 100
    metrics.hot.bytes_sent += 7
    samples = scrape(metrics)
    assert samples["faktory_gateway_client_received_bytes_total", ()] == 100
    assert samples["faktory_gateway_client_sent_bytes_total", ()] == 7


def test_every_refusal_code_the_gateway_sends_is_exposed_from_zero():
    """A code missing from REFUSAL_CODES would appear only after its first use: rate() misses it."""
    import re
    from pathlib import Path

    from gateway.metrics import REFUSAL_CODES

    sources = "\n".join(p.read_text() for p in Path("gateway").rglob("*.py"))
    sent = set(re.findall(r'(?:Refusal|error_reply)\(\s*"([A-Z_]+)"', sources))
    sent -= {"TOO_MANY_CONNECTIONS", "UPSTREAM_UNAVAILABLE"}  # connections refused, not commands
    assert sent and sent <= set(REFUSAL_CODES), sent - set(REFUSAL_CODES)
    samples = scrape(Metrics())
    for code in REFUSAL_CODES:
        assert samples["faktory_gateway_refusals_total", (("code", code),)] == 0
    assert samples["faktory_gateway_protocol_errors_total", (("side", "upstream"),)] == 0
    assert samples["faktory_gateway_connections_refused_total", (("reason", "max_connections"),)] == 0
