"""The gateway is invisible: every command gets the reply the real Faktory server gives (I5, I6, I7).

Most tests run the same script twice, straight to Faktory and through the gateway, and compare
the replies byte for byte after blanking what differs between two runs (timestamps, counters).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
import time

import pytest

from tests.support.client import RawClient, ServerClosed, job, push_line, uid
from tests.support.processes import REPO, FaktoryServer, GatewayProcess, rss_kib

VOLATILE = re.compile(
    rb'"(now|server_utc_time|enqueued_at|created_at|uptime|used_memory_mb|connections|command_count'
    rb'|total_processed|total_enqueued|total_failures|failed_at|next_at|at)":("[^"]*"|[0-9.]+)'
)


def normalize(reply: bytes) -> bytes:
    """Blank fields that differ between two runs of the same script, then fix the bulk length."""
    if not reply.startswith(b"$") or reply == b"$-1\r\n":
        return reply
    body = reply.split(b"\r\n", 1)[1][:-2]
    if body.startswith(b'{"now"'):  # INFO: background task counters move on their own
        info = json.loads(body)
        body = json.dumps(
            [info["faktory"]["queues"], info["faktory"]["sets"], info["server"]["description"]]
        ).encode()
    body = VOLATILE.sub(rb'"\1":_', body)
    body = re.sub(rb":\d+\.\d+", b":_", body)  # latencies in seconds
    return b"$%d\r\n%s\r\n" % (len(body), body)


def run_script(url: str, lines: list[str], wid: str | None = None) -> list[bytes]:
    with RawClient.connect(url, wid=wid) as client:
        return [normalize(client.call(line)) for line in lines]


def differential(faktory, gateway, script, wid=None):
    """The replies to `script`, direct and through the gateway, each on a flushed server."""
    results = []
    for url in (faktory.url, gateway.url):
        with RawClient.connect(faktory.url) as admin:
            admin.call("FLUSH")
        results.append(run_script(url, script(), wid))
    return results


def jid() -> str:
    return uid()


def test_greeting_and_handshake_are_relayed(faktory, gateway):
    direct, through = RawClient(faktory.url), RawClient(gateway.url)
    assert direct.handshake() == through.handshake() == b"+OK\r\n"
    assert direct.greeting == through.greeting == b'+HI {"v":2}\r\n'


def test_core_commands_reply_as_the_server_does(faktory, gateway):
    wid = "w" + uid()

    def script():
        a, b, c = "jid-aaaa-0001", "jid-bbbb-0002", "jid-cccc-0003"
        bulk = json.dumps([job(b, queue="bulk"), job(c, queue="bulk"), {"jid": "x"}], separators=(",", ":"))
        return [
            push_line(job(a, queue="q1")),
            "PUSHB " + bulk,
            "INFO",
            "FETCH q1",
            'ACK {"jid":"%s"}' % a,
            "FETCH bulk",
            'FAIL {"jid":"%s","errtype":"RuntimeError","message":"boom","backtrace":["x.py:1"]}' % b,
            "FETCH nothing-here",
            'BEAT {"wid":"%s"}' % wid,
            "QUEUE PAUSE q1",
            "QUEUE LATENCY q1 bulk",
            "QUEUE RESUME q1",
            "QUEUE REMOVE bulk",
            'MUTATE {"cmd":"kill","target":"retries","filter":{"jobtype":"TestJob"}}',
            'MUTATE {"cmd":"clear","target":"dead"}',
            "NOSUCHVERB a b",
            "push lower-case",
            "BATCH NEW {}",
            "TRACK GET x",
            "PUSH {",
            "PUSH []",
            "FLUSH",
            'BEAT {"wid":"%s","current_state":"quiet"}' % wid,
            'BEAT {"wid":"%s","current_state":"terminate"}' % wid,
        ]

    direct, through = differential(faktory, gateway, script, wid=wid)
    assert through == direct
    # The script covered what it claims: a job came back, errors passed through, states changed.
    assert any(b'"jid":"jid-aaaa-0001"' in r for r in through)
    assert b"-ERR unknown command NOSUCHVERB\r\n" in through
    assert b"-ERR batch subsystem is only available in Faktory Enterprise\r\n" in through
    assert b"$-1\r\n" in through
    assert through[-1].endswith(b'{"state":"terminate"}\r\n')


def test_bare_lf_lines_work(faktory, gateway):
    with RawClient.connect(gateway.url) as client:
        client.send(push_line(job(jid(), queue="lf")).encode() + b"\n")
        assert client.read_raw() == b"+OK\r\n"
        client.send(b"INFO\n")
        assert client.read_raw().startswith(b"$")


def test_fifty_pipelined_commands_in_one_write_keep_their_order(gateway):
    queue = "pipe-" + jid()
    jids = [jid() for _ in range(25)]
    lines = []
    for i, j in enumerate(jids):
        lines.append(push_line(job(j, queue=queue, args=[i])))
        lines.append("FETCH " + queue)
    assert len(lines) == 50
    with RawClient.connect(gateway.url) as client:
        client.send("".join(line + "\r\n" for line in lines).encode())
        replies = [client.read_raw() for _ in lines]
    assert replies[0::2] == [b"+OK\r\n"] * 25
    fetched = [json.loads(r.split(b"\r\n", 1)[1]) for r in replies[1::2]]
    assert [f["jid"] for f in fetched] == jids
    assert [f["args"] for f in fetched] == [[i] for i in range(25)]


def test_a_one_mebibyte_job_passes_unchanged(gateway):
    queue = "big-" + jid()
    payload = "x" * (1024 * 1024)
    big = job(jid(), queue=queue, args=[payload])
    with RawClient.connect(gateway.url) as client:
        assert client.call(push_line(big)) == b"+OK\r\n"
        fetched = client.json("FETCH " + queue)
    assert fetched["args"] == [payload]
    assert fetched["jid"] == big["jid"]


def test_end_gets_no_reply_and_the_connection_closes(gateway):
    with RawClient.connect(gateway.url) as client:
        client.send(b"END\r\n")
        assert client.is_closed(timeout=5)


def test_client_closing_mid_fetch_closes_its_upstream_connection(faktory, gateway):
    def connections() -> int:
        with RawClient.connect(faktory.url) as admin:
            return admin.json("INFO")["server"]["connections"]

    before = connections()
    clients = [RawClient.connect(gateway.url) for _ in range(5)]
    for client in clients:
        client.send(b"FETCH empty-queue-" + jid().encode() + b"\r\n")
    time.sleep(0.3)
    assert connections() >= before + 5
    for client in clients:
        client.sock.shutdown(socket.SHUT_RDWR)
        client.close()
    deadline = time.monotonic() + 10
    while connections() > before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert connections() <= before


def test_password_is_checked_by_the_server_through_the_gateway():
    server = FaktoryServer(password="s3cret-pw").start()
    gateway = GatewayProcess(f"tcp://127.0.0.1:{server.port}").start()  # the gateway knows no password
    try:
        with RawClient(gateway.url) as client:
            assert client.handshake(password="s3cret-pw") == b"+OK\r\n"
            hi = json.loads(client.greeting[4:-2])
            assert hi["v"] == 2 and "s" in hi and 4000 <= hi["i"] <= 8095
            assert client.call(push_line(job(jid()))) == b"+OK\r\n"
        with RawClient(gateway.url) as client:
            assert client.handshake(password="wrong") == b"-ERR Invalid password\r\n"
            assert client.is_closed()
    finally:
        gateway.stop()
        server.cleanup()


def test_upstream_unreachable_gives_a_clear_error_then_close(faktory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    gateway = GatewayProcess(f"tcp://127.0.0.1:{dead_port}").start()
    try:
        with RawClient(gateway.url) as client:
            reply = client.read_raw()
            assert reply.startswith(b"-ERR UPSTREAM_UNAVAILABLE cannot reach the Faktory server")
            assert str(dead_port).encode() in reply
            assert client.is_closed()
        assert "faktory_gateway_upstream_dial_errors_total 1.0" in gateway.http("/metrics")[1]
    finally:
        gateway.stop()


def test_server_going_away_closes_clients_without_invented_replies(fresh_faktory):
    gateway = GatewayProcess(fresh_faktory.url).start()
    try:
        idle = RawClient.connect(gateway.url)
        blocked = RawClient.connect(gateway.url)
        blocked.send(b"FETCH nothing\r\n")
        time.sleep(0.2)
        fresh_faktory.stop()
        # The FETCH in flight gets no reply the server did not send: the connection just ends,
        # or the server's own last words pass through (`-ERR shutdown in progress`, or
        # `-ERR redis: client is closed` when its Redis went first). Never a job, +OK or $-1.
        try:
            reply = blocked.read_raw()
            assert reply.startswith(b"-ERR ") and b"UPSTREAM_UNAVAILABLE" not in reply, reply
        except (ServerClosed, ConnectionResetError):
            pass
        assert idle.is_closed(timeout=10)
        # The gateway itself keeps running and serves again once the server is back.
        fresh_faktory.start()
        with RawClient.connect(gateway.url) as client:
            assert client.call(push_line(job(jid()))) == b"+OK\r\n"
    finally:
        gateway.stop()


def test_back_pressure_a_client_that_does_not_read_is_not_buffered_without_bound(faktory):
    """A client pipelines INFOs for seconds and reads nothing: the gateway stops reading from it."""
    gateway = GatewayProcess(faktory.url).start()
    try:
        before = rss_kib(gateway.proc.pid)
        with RawClient.connect(gateway.url) as client:
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stop = threading.Event()
            sent = [0]

            def writer():
                lines = b"INFO\r\n" * 100
                client.sock.settimeout(0.5)
                while not stop.is_set():
                    try:
                        client.sock.sendall(lines)
                        sent[0] += 100
                    except (TimeoutError, OSError):
                        return

            thread = threading.Thread(target=writer, daemon=True)
            thread.start()
            time.sleep(4)
            grown = rss_kib(gateway.proc.pid) - before
            stop.set()
            thread.join(5)
            # Unbounded buffering would hold a ~600-byte INFO reply per command sent.
            assert sent[0] > 50_000, "the test did not push hard enough to show anything"
            assert grown * 1024 < sent[0] * 600 / 10, (grown, sent[0])
            assert grown < 64 * 1024, f"gateway grew {grown} KiB"
        with RawClient.connect(gateway.url) as other:  # and the gateway still serves others
            assert other.call("INFO").startswith(b"$")
    finally:
        gateway.stop()


@pytest.mark.parametrize("client_library", ["faktory", "pyfaktory"])
def test_python_client_libraries_push_fetch_and_ack(gateway, client_library):
    queue = f"lib-{client_library}-{jid()}"
    if client_library == "faktory":
        import faktory

        with faktory.connection(gateway.url) as client:
            assert client.queue("LibJob", args=(1, 2), queue=queue)
        with RawClient.connect(gateway.url) as raw:
            fetched = raw.json("FETCH " + queue)
        assert fetched["jobtype"] == "LibJob" and fetched["args"] == [1, 2]
    else:
        from pyfaktory import Client, Job, Producer

        with Client(faktory_url=gateway.url, role="producer") as client:
            assert Producer(client).push(Job(jobtype="LibJob", args=[3], queue=queue))
        # pyfaktory's Consumer forks worker processes; its client's fetch and ack are the protocol part.
        with Client(faktory_url=gateway.url, role="consumer") as consumer:
            fetched = consumer._fetch([queue])
            assert fetched["args"] == [3]
            assert consumer._ack(fetched["jid"])


def test_node_client_pipelines_through_the_gateway(gateway):
    """npm faktory-worker sends many commands on one socket before reading: replies keep their order."""
    queue = "node-" + jid()
    result = subprocess.run(
        ["node", str(REPO / "tests/clients/node/pipeline.js"), queue, "200"],
        env={**os.environ, "FAKTORY_URL": gateway.url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["pushReplies"] == ["OK"] * 200
    assert outcome["fetched"] == list(range(200))
    assert outcome["library"] == ["library"]


# --- jobs outside batches: the server's reply, whatever the bytes (issue 18) --------------------


def pushed_and_fetched(lines: list[bytes], queue: str) -> list[bytes]:
    """A script: each line, then a FETCH of what it pushed (the server's reading of the job)."""
    script = []
    for line in lines:
        script += [line, b"FETCH " + queue.encode()]
    return script


def test_jobs_from_gos_encoder_pass_unchanged(faktory, gateway, jobjson):
    """Go's json.Marshal, which the Go client uses, escapes <, > and & as \\u003c...: the job
    bytes hold `\\u`, which sends them through the gateway's reading."""
    lines = subprocess.run([str(jobjson), "encode"], capture_output=True, check=True).stdout.splitlines()
    assert any(b"\\u003c" in line for line in lines) and any(line.startswith(b"PUSHB ") for line in lines)
    fetches = sum(
        len(json.loads(line.partition(b" ")[2])) if line.startswith(b"PUSHB") else 1 for line in lines
    )
    script = [*lines, *[b"FETCH go-encoded"] * fetches]
    direct, through = differential(faktory, gateway, lambda: script)
    assert through == direct
    assert direct[: len(lines)] == [b"+OK\r\n"] * (len(lines) - 1) + [b"$2\r\n{}\r\n"]
    assert all(reply.startswith(b"$") and b"go-enc-" in reply for reply in direct[len(lines) :])


def test_jobs_from_pythons_encoder_pass_unchanged(faktory, gateway):
    """json.dumps escapes every non-ASCII character by default (ensure_ascii)."""
    texts = ["caf\u00e9 na\u00efve \u2713 \u65e5\u672c\u8a9e \U0001f680", "<script>x & y</script>", "\u2028"]

    def script():
        jobs = [
            job(f"py-enc-{i:04d}", queue="py-encoded", args=[text], custom={"note": text, "k": {"\u00e9": 1}})
            for i, text in enumerate(texts)
        ]
        return pushed_and_fetched([("PUSH " + json.dumps(j)).encode() for j in jobs], "py-encoded")

    direct, through = differential(faktory, gateway, script)
    assert through == direct
    assert direct[0::2] == [b"+OK\r\n"] * len(texts)
    assert b"\\u00e9" in script()[0] and b'"note":"caf\xc3\xa9' in direct[1]


DEEP = b"[" * 5000 + b"]" * 5000  # Go decodes 10,000 levels, Python's decoder about 1,000


@pytest.mark.parametrize(
    "body",
    [
        b'"args":[{"a":1,"a":2}],"custom":{"x":"\\u003c"}',  # a duplicate key, and an escape
        b'"args":["\xff\xfe\xe2\x82 \\u00e9"]',  # bytes that are not UTF-8: Go reads U+FFFD
        b'"args":' + DEEP + b',"custom":{"bid":""}',  # deeper than Python's decoder goes
        b'"args":[],"custom":{"x":' + DEEP + b',"y":"\\u0041"}',
        b'"args":[],"custom":{"a":1},"Custom":{"b":"\\u0062"}',  # Go merges both: still no batch
        b'"args":[],"custom":{"a":1},"CUSTOM":null,"x":"\xc3\\u0041"',
    ],
    ids=["duplicate-key", "invalid-utf8", "deep-args", "deep-custom", "custom-and-Custom", "custom-null"],
)
def test_jobs_the_server_accepts_pass_unchanged(faktory, gateway, body):
    line = b'PUSH {"jid":"accepted-%s","jobtype":"x","queue":"accepted",%s}' % (
        uid().encode(),
        body,
    )
    direct, through = differential(faktory, gateway, lambda: [line, b"FETCH accepted"])
    assert through == direct
    assert direct[0] == b"+OK\r\n" and direct[1].startswith(b"$")
