"""The operator's surface: probes, metrics, signals, reload, limits."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

from tests.support.client import RawClient, ServerClosed, job, push_line, uid
from tests.support.processes import GatewayProcess, free_port, metric, rss_kib


def test_probes(faktory):
    gateway = GatewayProcess(faktory.url).start()
    try:
        assert gateway.http("/liveness") == (200, "ok\n")
        assert gateway.http("/startup") == (200, "ok\n")
        assert gateway.http("/readiness") == (200, "ok\n")
        assert gateway.http_status("/quitquitquit", "POST") in (404, 405)  # off by default
    finally:
        gateway.stop()


def test_readiness_fails_when_the_upstream_cannot_be_dialled():
    gateway = GatewayProcess(f"tcp://127.0.0.1:{free_port()}").start()
    try:
        assert gateway.http("/liveness")[0] == 200
        assert gateway.http("/readiness") == (503, "upstream cannot be dialled\n")
    finally:
        gateway.stop()


def test_readiness_fails_at_the_connection_limit_and_extra_clients_get_an_error(faktory):
    gateway = GatewayProcess(faktory.url, env={"FAKTORY_GATEWAY_LIMITS_MAX_CONNECTIONS": "2"}).start()
    try:
        first, second = RawClient.connect(gateway.url), RawClient.connect(gateway.url)
        assert gateway.http("/readiness") == (503, "at the connection limit\n")
        with RawClient(gateway.url) as third:
            assert third.read_raw().startswith(b"-ERR TOO_MANY_CONNECTIONS")
            assert third.is_closed()
        first.close()
        time.sleep(0.2)
        assert gateway.http("/readiness")[0] == 200
        second.close()
        text = gateway.http("/metrics")[1]
        assert metric(text, "faktory_gateway_connections_refused_total", reason="max_connections") == 1
    finally:
        gateway.stop()


def test_metrics_move_with_traffic(faktory):
    gateway = GatewayProcess(faktory.url).start()
    try:
        before = gateway.http("/metrics")[1]
        queue = "m-" + uid()
        with RawClient.connect(gateway.url) as client:
            for i in range(5):
                client.call(push_line(job(f"m-{i}-{uid()}", queue=queue)))
            client.call("NOPE")
            client.call("FETCH " + queue)
            text = gateway.http("/metrics")[1]
            assert metric(text, "faktory_gateway_connections_active") == 1
        assert metric(before, "faktory_gateway_commands_total", result="ok", verb="PUSH") == 0
        assert metric(text, "faktory_gateway_commands_total", result="ok", verb="PUSH") == 5
        assert metric(text, "faktory_gateway_commands_total", result="error", verb="other") == 1
        assert metric(text, "faktory_gateway_commands_total", result="ok", verb="FETCH") == 1
        assert metric(text, "faktory_gateway_command_duration_seconds_count", verb="PUSH") == 5
        assert metric(text, "faktory_gateway_added_latency_seconds_count") >= 8
        assert metric(text, "faktory_gateway_client_received_bytes_total") > 500
        assert metric(text, "faktory_gateway_client_sent_bytes_total") > 100
        assert metric(text, "faktory_gateway_connections_total") >= 1
        assert metric(text, "faktory_gateway_draining") == 0
        assert 'faktory_gateway_build_info{version="' in text
        # Bounded labels: no queue name, jid or address ever becomes a label value.
        assert queue not in text and "127.0.0.1" not in text
    finally:
        gateway.stop()


def test_sigterm_drains_in_flight_commands_then_exits_zero(faktory):
    gateway = GatewayProcess(faktory.url, env={"FAKTORY_GATEWAY_SHUTDOWN_MIN_DELAY": "1s"}).start()
    idle = RawClient.connect(gateway.url)
    busy = RawClient.connect(gateway.url)
    queue = "drain-" + uid()
    busy.send(f"FETCH {queue}\r\n".encode())  # blocks ~2 s on the server
    time.sleep(0.2)
    gateway.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert gateway.http("/readiness")[0] == 503
    # During min_delay the gateway still accepts and serves new clients.
    with RawClient.connect(gateway.url) as late:
        assert late.call(push_line(job("late-" + uid(), queue=queue + "-x"))) == b"+OK\r\n"
    assert busy.read_raw() == b"$-1\r\n"  # the in-flight FETCH got its real reply
    assert busy.is_closed(timeout=5) and idle.is_closed(timeout=5)
    assert gateway.proc.wait(10) == 0
    assert any('"clean":true' in line for line in gateway.output)


def test_drain_cut_at_max_delay_exits_3_unless_told_otherwise(faktory):
    for exit_zero, expected in (("false", 3), ("true", 0)):
        gateway = GatewayProcess(faktory.url, env={
            "FAKTORY_GATEWAY_SHUTDOWN_MAX_DELAY": "500ms",
            "FAKTORY_GATEWAY_SHUTDOWN_EXIT_ZERO_ON_SIGTERM": exit_zero,
        }).start()  # fmt: skip
        client = RawClient.connect(gateway.url)
        client.send(b"FETCH never-" + uid().encode() + b"\r\n")
        time.sleep(0.1)
        gateway.send_signal(signal.SIGTERM)
        assert gateway.proc.wait(10) == expected
        client.close()


def test_second_signal_exits_at_once(faktory):
    gateway = GatewayProcess(faktory.url, env={"FAKTORY_GATEWAY_SHUTDOWN_MIN_DELAY": "20s",
                                               "FAKTORY_GATEWAY_SHUTDOWN_MAX_DELAY": "30s"}).start()  # fmt: skip
    gateway.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    started = time.monotonic()
    gateway.send_signal(signal.SIGINT)
    assert gateway.proc.wait(5) == 130
    assert time.monotonic() - started < 3


def test_quitquitquit_only_when_enabled_and_from_loopback(faktory):
    gateway = GatewayProcess(faktory.url, env={"FAKTORY_GATEWAY_HTTP_QUITQUITQUIT": "true"}).start()
    assert gateway.http("/quitquitquit", "POST") == (200, "shutting down\n")
    assert gateway.proc.wait(10) == 0


def test_sighup_reloads_policy_without_dropping_connections(faktory, tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text("mode: strict\n")
    gateway = GatewayProcess(faktory.url, "--config", str(path)).start()
    try:
        with RawClient.connect(gateway.url) as client:
            path.write_text("mode: [broken\n")
            gateway.send_signal(signal.SIGHUP)
            gateway.wait_for_line("reload refused")
            path.write_text("mode: shadow\n")
            gateway.send_signal(signal.SIGHUP)
            line = gateway.wait_for_line("configuration reloaded")
            assert json.loads(line)["mode"] == "shadow"
            assert client.call("INFO").startswith(b"$")  # the same connection still works
    finally:
        gateway.stop()


def test_refusals_are_logged_once_with_the_audit_fields(faktory):
    gateway = GatewayProcess(faktory.url, env={"FAKTORY_GATEWAY_UNKNOWN_BATCH": "reject"}).start()
    try:
        with RawClient.connect(gateway.url, wid="audit-wid") as client:
            secret = "personal-data-" + uid()
            reply = client.call(push_line(job("a-" + uid(), args=[secret], custom={"bid": "b-audit"})))
            assert reply.startswith(b"-ERR BATCH_UNKNOWN")
        line = gateway.wait_for_line('"refused"')
    finally:
        gateway.stop()
    entry = json.loads(line)
    assert {k: entry[k] for k in ("code", "verb", "bid", "wid", "mode")} == {
        "code": "BATCH_UNKNOWN", "verb": "PUSH", "bid": "b-audit", "wid": "audit-wid", "mode": "strict"
    }  # fmt: skip
    assert entry["peer"].startswith("127.0.0.1:")
    assert [out for out in gateway.output if '"refused"' in out] == [line]
    assert not any(secret in out for out in gateway.output)


def test_handshake_timeout_closes_a_silent_client(faktory):
    gateway = GatewayProcess(faktory.url, env={"FAKTORY_GATEWAY_LIMITS_HANDSHAKE_TIMEOUT": "300ms"}).start()
    try:
        with RawClient(gateway.url) as client:
            assert client.read_raw().startswith(b"+HI")
            assert client.read_raw().startswith(b"-ERR HANDSHAKE_TIMEOUT")
            assert client.is_closed()
    finally:
        gateway.stop()


def test_idle_timeout_closes_a_silent_connection(faktory):
    gateway = GatewayProcess(faktory.url, env={"FAKTORY_GATEWAY_LIMITS_IDLE_TIMEOUT": "500ms"}).start()
    try:
        with RawClient.connect(gateway.url) as client:
            assert client.call("INFO").startswith(b"$")
            assert client.is_closed(timeout=5)
    finally:
        gateway.stop()


def test_endless_line_is_refused_and_memory_stays_bounded(faktory):
    gateway = GatewayProcess(faktory.url, env={"FAKTORY_GATEWAY_LIMITS_MAX_LINE_BYTES": "1MiB"}).start()
    try:
        client = RawClient.connect(gateway.url)
        chunk = b"PUSH " + b"x" * 65536
        try:
            for _ in range(64):  # 4 MiB without a line end
                client.send(chunk)
        except OSError:
            pass
        try:
            reply = client.read_raw()
            assert reply.startswith(b"-ERR LINE_TOO_LONG"), reply
        except (ServerClosed, ConnectionResetError):
            pass  # the close may overtake the error when the socket buffer was full
        assert client.is_closed()
        with RawClient.connect(gateway.url) as other:
            assert other.call("INFO").startswith(b"$")
    finally:
        gateway.stop()


def test_many_clients_vanishing_mid_command_leak_nothing(faktory):
    gateway = GatewayProcess(faktory.url).start()
    try:

        def fds() -> int:
            import os

            return len(os.listdir(f"/proc/{gateway.proc.pid}/fd"))

        def churn(n: int) -> None:
            for i in range(n):
                client = RawClient.connect(gateway.url)
                client.send(b'PUSH {"jid":"half' if i % 2 else b"FETCH nothing-" + str(i).encode() + b"\r\n")
                client.sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
                client.close()

        churn(500)  # warm up allocator pools and caches before the baseline
        time.sleep(1)
        baseline = fds()
        baseline_rss = rss_kib(gateway.proc.pid)
        threads = [threading.Thread(target=churn, args=(2500,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        deadline = time.monotonic() + 15
        while fds() > baseline + 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert fds() <= baseline + 2
        text = gateway.http("/metrics")[1]
        assert metric(text, "faktory_gateway_connections_active") == 0
        assert metric(text, "faktory_gateway_connections_total") >= 10500
        # 10,000 sessions came and went; a leak of even 1 KiB each would show as 10 MiB.
        assert rss_kib(gateway.proc.pid) - baseline_rss < 4096
    finally:
        gateway.stop()
