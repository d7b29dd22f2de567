"""Every Prometheus metric of the gateway, in one place.

Label values are bounded: verbs come from a fixed set (anything else is `other`), results and codes
are the gateway's own constants. No jid, bid, wid, queue or address ever becomes a label.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from . import __version__

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


def verb_label(verb: bytes) -> str:
    return VERB_LABELS.get(verb, "other")


class Metrics:
    """The metric objects of one gateway process, registered on their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.build_info = Info("build", "Version of the gateway", namespace=NAMESPACE, registry=r)
        self.build_info.info({"version": __version__})
        self.connections_active = Gauge(
            "connections_active", "Client connections open now", namespace=NAMESPACE, registry=r
        )
        self.connections = Counter(
            "connections", "Client connections accepted", namespace=NAMESPACE, registry=r
        )
        self.connections_refused = Counter(
            "connections_refused", "Client connections refused, by reason", ["reason"],
            namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.commands = Counter(
            "commands", "Client commands, by verb and result (ok, error, refused)", ["verb", "result"],
            namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.command_duration = Histogram(
            "command_duration_seconds", "Time from a command's arrival to its reply leaving, by verb",
            ["verb"], buckets=LATENCY_BUCKETS, namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.added_latency = Histogram(
            "added_latency_seconds", "Time a command spent in the gateway, excluding the upstream",
            buckets=OVERHEAD_BUCKETS, namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.refusals = Counter(
            "refusals", "Commands refused, by code", ["code"], namespace=NAMESPACE, registry=r
        )
        self.shadow_refusals = Counter(
            "shadow_refusals", "Commands shadow mode forwarded but would have refused, by code", ["code"],
            namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.store_calls = Counter(
            "store_calls", "Round trips to the batch store, by operation", ["operation"],
            namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.store_errors = Counter(
            "store_errors", "Failed round trips to the batch store, by operation", ["operation"],
            namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.fence_wait = Histogram(
            "commit_fence_wait_seconds", "Time BATCH COMMIT waited for in-flight pushes",
            buckets=LATENCY_BUCKETS, namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.upstream_dial_errors = Counter(
            "upstream_dial_errors", "Failed dials to the Faktory server", namespace=NAMESPACE, registry=r
        )
        self.bytes_received = Counter(
            "client_received_bytes", "Bytes read from clients", namespace=NAMESPACE, registry=r
        )
        self.bytes_sent = Counter(
            "client_sent_bytes", "Bytes written to clients", namespace=NAMESPACE, registry=r
        )
        self.draining = Gauge(
            "draining", "1 while the gateway drains for shutdown", namespace=NAMESPACE, registry=r
        )
        self.protocol_errors = Counter(
            "protocol_errors", "Connections closed for broken protocol, by side", ["side"],
            namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        # Children resolved once: labels() takes a lock and a dict lookup, too much per command.
        self._command_children = {
            (verb, result): self.commands.labels(verb, result)
            for verb in (*VERBS, "other")
            for result in ("ok", "error", "refused")
        }
        self._duration_children = {verb: self.command_duration.labels(verb) for verb in (*VERBS, "other")}

    def command_done(self, verb: str, result: str, duration: float, added: float) -> None:
        self._command_children[verb, result].inc()
        self._duration_children[verb].observe(duration)
        self.added_latency.observe(added)
