"""Every Prometheus metric of the gateway, in one place.

Label values are bounded: verbs come from a fixed set (anything else is `other`), results and codes
are the gateway's own constants. No jid, bid, wid, queue or address ever becomes a label.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Awaitable, Iterable
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from . import __version__, shield

T = TypeVar("T")

NAMESPACE = "faktory_gateway"

# The verbs Faktory knows, OSS and Enterprise; anything else is counted as `other`.
VERBS = ("HELLO", "END", "PUSH", "PUSHB", "FETCH", "ACK", "FAIL", "BEAT", "INFO", "FLUSH", "MUTATE",
         "BATCH", "TRACK", "QUEUE")  # fmt: skip
VERB_LABELS = {verb.encode(): verb for verb in VERBS}

# Buckets from 50 µs (the gateway's own overhead) to 10 s (FETCH blocks for 2 s on the server).
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                   0.5, 1.0, 2.5, 5.0, 10.0)  # fmt: skip
OVERHEAD_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                    0.1, 1.0)  # fmt: skip


# Every code the gateway answers with (README, "Errors"): each series starts at zero, so that
# rate() and the alerts see the first refusal, and a dashboard shows 0 rather than nothing.
REFUSAL_CODES = ("BATCH_COMMITTED", "BATCH_CALLBACK_FIRED", "BATCH_UNKNOWN", "PARENT_SEALED",
                 "COMMIT_FENCE_TIMEOUT", "BATCH_COMMAND_TOO_LARGE", "MALFORMED", "RESERVED_KEY",
                 "STATE_UNAVAILABLE", "LINE_TOO_LONG", "HANDSHAKE_TIMEOUT")  # fmt: skip
BATCH_REFUSAL_CODES = REFUSAL_CODES[:9]  # the ones shadow mode may forward instead
CONNECTION_REFUSALS = ("max_connections",)
PROTOCOL_ERROR_SIDES = ("upstream",)  # the client's broken lines are refusals (LINE_TOO_LONG)


def verb_label(verb: bytes) -> str:
    return VERB_LABELS.get(verb, "other")


class Metrics:
    """The metric objects of one gateway process, registered on their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()

        def metric(kind, name: str, doc: str, labels: tuple[str, ...] = (), **options):
            return kind(name, doc, labels, namespace=NAMESPACE, registry=self.registry, **options)

        self.build_info = metric(Info, "build", "Version of the gateway")
        self.build_info.info({"version": __version__})
        self.connections_active = metric(Gauge, "connections_active", "Client connections open now")
        self.connections = metric(Counter, "connections", "Client connections accepted")
        self.connections_refused = metric(
            Counter, "connections_refused", "Client connections refused, by reason", ("reason",)
        )
        self.refusals = metric(Counter, "refusals", "Commands refused, by code", ("code",))
        self.shadow_refusals = metric(
            Counter,
            "shadow_refusals",
            "Commands shadow mode forwarded but would have refused, by code",
            ("code",),
        )
        _from_zero(self.connections_refused, CONNECTION_REFUSALS)
        _from_zero(self.refusals, REFUSAL_CODES)
        _from_zero(self.shadow_refusals, BATCH_REFUSAL_CODES)
        self.store_calls = metric(
            Counter, "store_calls", "Round trips to the batch store, by operation", ("operation",)
        )
        self.store_errors = metric(
            Counter, "store_errors", "Failed round trips to the batch store, by operation", ("operation",)
        )
        self.fence_wait = metric(
            Histogram, "commit_fence_wait_seconds", "Time BATCH COMMIT waited for in-flight pushes",
            buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.lease_aborts = metric(
            Counter,
            "lease_aborts",
            "Upstream connections reset because their batch lease could not be renewed in time",
        )
        self.lease_lost = metric(
            Counter, "lease_lost", "Admitted commands refused before the write: their batch lease lapsed"
        )
        self.upstream_dial_errors = metric(
            Counter, "upstream_dial_errors", "Failed dials to the Faktory server"
        )
        self.draining = metric(Gauge, "draining", "1 while the gateway drains for shutdown")
        self.shielded = metric(
            Counter,
            "shielded",
            "Lines the Faktory server would crash on, answered by the gateway instead, by verb",
            ("verb",),
        )
        _from_zero(self.shielded, sorted(verb.decode() for verb in shield.BARE_VERBS))
        self.protocol_errors = metric(
            Counter, "protocol_errors", "Connections closed for broken protocol, by side", ("side",)
        )
        _from_zero(self.protocol_errors, PROTOCOL_ERROR_SIDES)
        # batches: gateway (the engine)
        self.callbacks = metric(
            Counter,
            "callbacks",
            "Batch callbacks the gateway pushed (pushed), that the server refused (refused), that "
            "were left to another gateway (deferred) or taken over from one (taken_over)",
            ("kind", "result"),
        )
        for kind in ("complete", "success"):
            for result in ("pushed", "refused", "deferred", "taken_over"):
                self.callbacks.labels(kind, result)
        self.callback_latency = metric(
            Histogram,
            "callback_latency_seconds",
            "From the reply that made a callback due (the last ACK, a commit) to the server's +OK for it",
            buckets=LATENCY_BUCKETS,
        )
        self.batches_stalled = metric(
            Gauge,
            "batches_stalled",
            "Committed batches with pending jobs and no progress for batch_stall_after",
        )
        self.engine_lost_counts = metric(
            Counter, "engine_lost_counts", "Batch counts the ledger did not take within the retry time"
        )
        self.hot = HotPathStats()
        self.registry.register(self.hot)
        self.command_done = self.hot.command_done


def _from_zero(counter: Counter, values: Iterable[str]) -> None:
    """Expose one series per label value from the start, at zero."""
    for value in values:
        counter.labels(value)


def _buckets(counts: list[int], bounds: tuple[float, ...]) -> list[tuple[str, int]]:
    """Cumulative (le, count) pairs, as the exposition wants them, from per-bucket counts."""
    total, pairs = 0, []
    for bound, count in zip((*bounds, float("inf")), counts, strict=True):
        total += count
        pairs.append(("+Inf" if bound == float("inf") else repr(bound), total))
    return pairs


class HotPathStats:
    """The per-command metrics, kept as plain integers and floats and turned into Prometheus
    families only when scraped.

    prometheus-client takes a lock per observation; three observations per command cost more than
    the rest of the gateway's own work on a PUSH. The event loop is the only writer, and the
    scrape runs on the same loop, so no lock is needed.
    """

    def __init__(self):
        labels = (*VERBS, "other")
        self.commands = {(verb, result): 0 for verb in labels for result in ("ok", "error", "refused")}
        self.durations = {verb: [0] * (len(LATENCY_BUCKETS) + 1) for verb in labels}
        self.duration_sums = dict.fromkeys(labels, 0.0)
        self.added = [0] * (len(OVERHEAD_BUCKETS) + 1)
        self.added_sum = 0.0
        self.bytes_received = 0
        self.bytes_sent = 0

    def command_done(self, verb: str, result: str, duration: float, added: float) -> None:
        self.commands[verb, result] += 1
        self.durations[verb][bisect_left(LATENCY_BUCKETS, duration)] += 1
        self.duration_sums[verb] += duration
        self.added[bisect_left(OVERHEAD_BUCKETS, added)] += 1
        self.added_sum += added

    def collect(self):
        name = f"{NAMESPACE}_"
        commands = CounterMetricFamily(
            name + "commands",
            "Client commands, by verb and result (ok, error, refused)",
            labels=["verb", "result"],
        )
        for (verb, result), count in self.commands.items():
            commands.add_metric([verb, result], count)
        yield commands
        duration = HistogramMetricFamily(
            name + "command_duration_seconds",
            "Time from a command's arrival to its reply leaving, by verb",
            labels=["verb"],
        )
        for verb, counts in self.durations.items():
            duration.add_metric([verb], _buckets(counts, LATENCY_BUCKETS), self.duration_sums[verb])
        yield duration
        added = HistogramMetricFamily(
            name + "added_latency_seconds", "Time a command spent in the gateway, excluding the upstream"
        )
        added.add_metric([], _buckets(self.added, OVERHEAD_BUCKETS), self.added_sum)
        yield added
        yield CounterMetricFamily(
            name + "client_received_bytes", "Bytes read from clients", value=self.bytes_received
        )
        yield CounterMetricFamily(
            name + "client_sent_bytes", "Bytes written to clients", value=self.bytes_sent
        )


async def counted(metrics: Metrics, operation: str, awaitable: Awaitable[T]) -> T:
    """Await one store call, counting it, and its failure, under `operation`."""
    metrics.store_calls.labels(operation).inc()
    try:
        return await awaitable
    except Exception:
        metrics.store_errors.labels(operation).inc()
        raise
