"""Faults: the Faktory server crashes, the network stalls or breaks, the server talks nonsense, Redis goes away.

Real processes only. What must hold (docs/invariants.md, I6): every command gets the server's reply or the
gateway's own refusal; when the upstream fails the client sees its connection close, never a made-up
`+OK`; and the gateway itself carries on serving, without a restart, without leaking.

About crashing Faktory: Faktory 1.9.4 runs a private Redis configured with RDB snapshots only
(`save 120 1`, `save 30 5`, no appendonly; see /tmp/redis.conf as Faktory writes it). SIGKILL to
Faktory *and* its Redis (FaktoryServer.kill(), which signals the process group) therefore loses
every job acknowledged since the last snapshot, through the gateway or not: that is Faktory's own
durability, not something a proxy can change. The crash tested here is SIGKILL of the Faktory
process alone: its Redis, started with PDEATHSIG=SIGTERM, then shuts down cleanly and saves, as it
would on a real host. The graceful case (SIGTERM) is tested too.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import threading
import time
from collections import Counter

import pytest

from tests.support.client import RawClient, ServerClosed, job, push_line, uid
from tests.support.faultproxy import FaultProxy
from tests.support.processes import FaktoryServer, GatewayProcess, Process, RedisServer, rss_kib
from tests.support.standin import StandinProcess

OK = b"+OK\r\n"


def silent_for(client: RawClient, seconds: float) -> bool:
    """True if nothing at all (no byte, no close) arrives on the client's socket for `seconds`."""
    readable, _, _ = select.select([client.sock], [], [], seconds)
    return not readable


def connection_closed(client: RawClient) -> bool:
    """True if the next read finds the connection closed (FIN or reset) rather than a reply."""
    try:
        reply = client.read_raw()
    except (ServerClosed, ConnectionError):
        return True
    raise AssertionError(f"expected the connection to close, got a reply: {reply!r}")


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def drain_queue(url: str, queue: str) -> list[str]:
    """FETCH every job of `queue` (straight from the server) and return their jids."""
    jids = []
    with RawClient.connect(url, wid="drain-" + uid()) as client:
        size = client.json("INFO")["faktory"]["queues"].get(queue, 0)
        for _ in range(size):
            jids.append(client.json("FETCH " + queue)["jid"])
        assert client.json("INFO")["faktory"]["queues"].get(queue, 0) == 0
    return jids


# --- Faktory crashes and comes back, under load ----------------------------------------------------


class Unavailable(Exception):
    """The gateway answered the connection with an error instead of the server's +HI."""


class Producer(threading.Thread):
    """PUSHes jobs through the gateway in a loop; on any failure, reconnects and carries on."""

    def __init__(self, url: str, queue: str):
        super().__init__(daemon=True)
        self.url = url
        self.queue = queue
        self.acked: list[str] = []  # jids that got +OK
        self.attempted: set[str] = set()  # every jid sent, answered or not
        self.failures: Counter = Counter()
        self.unexpected: list[bytes] = []  # a PUSH reply that is neither +OK nor -ERR
        self.stopping = threading.Event()

    def connect(self) -> RawClient:
        client = RawClient(self.url, timeout=10)
        greeting = client.read_raw()
        if not greeting.startswith(b"+HI "):
            client.close()
            raise Unavailable(greeting)
        client.send(b'HELLO {"v":2}\r\n')
        reply = client.read_raw()
        if reply != OK:
            client.close()
            raise Unavailable(reply)
        return client

    def run(self) -> None:
        client = None
        while not self.stopping.is_set():
            try:
                if client is None:
                    client = self.connect()
                jid = "crash-" + uid()
                self.attempted.add(jid)
                reply = client.call(push_line(job(jid, queue=self.queue)))
                if reply == OK:
                    self.acked.append(jid)
                    continue
                if reply.startswith(b"-ERR "):
                    self.failures["error reply: " + reply[:60].decode()] += 1
                else:
                    self.unexpected.append(reply)
            except Unavailable as exc:
                self.failures[exc.args[0].split(b" ")[1].decode()] += 1
            except (ServerClosed, OSError):  # closed, reset, refused, timed out
                self.failures["connection closed"] += 1
            if client is not None:
                client.close()
                client = None
            time.sleep(0.02)
        if client is not None:
            client.close()


def crash(faktory: FaktoryServer, how: str) -> None:
    if how == "sigterm":
        faktory.stop()
        return
    faktory.proc.send_signal(signal.SIGKILL)  # Faktory alone; its Redis gets SIGTERM and saves
    faktory.proc.wait()
    deadline = time.monotonic() + 15
    while True:  # until the Redis child has saved and gone, so the restart finds the data
        try:
            os.killpg(faktory.proc.pid, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, "Faktory's redis did not exit"
        time.sleep(0.02)


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_faktory_crash_and_restart_under_load_keeps_every_acknowledged_job(fresh_faktory, how):
    gateway = GatewayProcess(fresh_faktory.url, "--log-level", "warning").start()
    queue = "crash-" + uid()
    producers = [Producer(gateway.url, queue) for _ in range(4)]
    try:
        for producer in producers:
            producer.start()
        wait_until(lambda: all(len(p.acked) >= 30 for p in producers), 10, "traffic before the crash")
        crash(fresh_faktory, how)
        # While Faktory is down, the producers keep trying through the gateway and are turned away.
        wait_until(
            lambda: all(sum(p.failures.values()) >= 3 for p in producers), 10, "failures during the outage"
        )
        fresh_faktory.restart()
        counts = [len(p.acked) for p in producers]
        wait_until(
            lambda: all(len(p.acked) >= n + 30 for p, n in zip(producers, counts, strict=True)),
            10,
            "traffic after the restart, through the same gateway",
        )
    finally:
        for producer in producers:
            producer.stopping.set()
        for producer in producers:
            producer.join(15)
        alive = gateway.proc.poll() is None
        gateway.stop()
    assert alive, "the gateway must ride out the crash"

    acked = [jid for p in producers for jid in p.acked]
    attempted = set().union(*(p.attempted for p in producers))
    assert not [reply for p in producers for reply in p.unexpected]
    failures = sum((p.failures for p in producers), Counter())
    # Turned away with a closed connection, the gateway's UPSTREAM_UNAVAILABLE instead of +HI, or
    # (SIGTERM) Faktory's own refusal while it shuts down, relayed.
    allowed = {"connection closed", "UPSTREAM_UNAVAILABLE", "error reply: -ERR shutdown in progress\r\n"}
    assert set(failures) <= allowed, failures
    assert failures["UPSTREAM_UNAVAILABLE"] > 0, failures
    assert "upstream dial failed" in gateway.text()

    stored = drain_queue(fresh_faktory.url, queue)
    assert len(stored) == len(set(stored))
    missing = set(acked) - set(stored)
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged jobs are not in Faktory"
    assert set(stored) <= attempted, "a job nobody sent is in the queue"
    # Only jobs whose reply was lost with the connection may be stored without an +OK.
    assert len(stored) - len(acked) <= failures["connection closed"]


# --- the network between the gateway and Faktory fails --------------------------------------------


@pytest.fixture
def proxied(faktory):
    """A fault proxy in front of the shared Faktory, and a gateway whose upstream is the proxy."""
    proxy = FaultProxy(faktory.port).start()
    gateway = GatewayProcess(proxy.url, "--log-level", "warning").start()
    yield proxy, gateway
    gateway.stop()
    proxy.stop()


def fetch_jid(url: str, queue: str) -> str | None:
    with RawClient.connect(url, wid="check-" + uid()) as client:
        if not client.json("INFO")["faktory"]["queues"].get(queue):
            return None
        return client.json("FETCH " + queue)["jid"]


@pytest.mark.parametrize("direction", ["up", "down", "both"])
def test_a_stalled_upstream_makes_the_command_wait_for_the_real_reply(proxied, faktory, direction):
    proxy, gateway = proxied
    queue, jid = "stall-" + uid(), "stall-" + uid()
    with RawClient.connect(gateway.url) as client:
        proxy.stall(direction)
        client.send((push_line(job(jid, queue=queue)) + "\r\n").encode())
        assert silent_for(client, 1.5), "the gateway answered while the server could not have"
        if direction == "up":
            assert fetch_jid(faktory.url, queue) is None  # still held by the network
        proxy.resume()
        assert client.read_raw() == OK
        assert client.call("INFO").startswith(b"$")
    assert fetch_jid(faktory.url, queue) == jid


@pytest.mark.parametrize("rst", [True, False], ids=["reset", "fin"])
def test_a_cut_upstream_closes_the_client_and_the_gateway_keeps_serving(proxied, faktory, rst):
    proxy, gateway = proxied
    queue = "cut-" + uid()
    idle = RawClient.connect(gateway.url)
    busy = RawClient.connect(gateway.url)
    assert busy.call(push_line(job("cut-" + uid(), queue=queue))) == OK
    proxy.stall("down")  # the next PUSH reaches Faktory, its +OK does not come back
    busy.send((push_line(job("cut-" + uid(), queue=queue)) + "\r\n").encode())
    assert silent_for(busy, 0.5)
    assert proxy.cut_all(rst=rst) == 2
    assert connection_closed(busy), "the in-flight PUSH must end with a closed connection, not a reply"
    assert connection_closed(idle)
    idle.close()
    busy.close()

    proxy.resume()
    with RawClient.connect(gateway.url) as fresh:
        jid = "cut-after-" + uid()
        assert fresh.call(push_line(job(jid, queue="after-" + queue))) == OK
    assert fetch_jid(faktory.url, "after-" + queue) == jid
    assert gateway.http("/readiness") == (200, "ok\n")
    wait_until(
        lambda: gateway.metric("faktory_gateway_connections_active") == 0,
        5,
        "the cut sessions to be gone",
    )


def test_a_refused_upstream_is_an_error_for_new_clients_until_it_returns(proxied):
    proxy, gateway = proxied
    proxy.refuse()
    with RawClient(gateway.url) as client:
        assert client.read_raw().startswith(b"-ERR UPSTREAM_UNAVAILABLE ")
        assert client.is_closed()
    time.sleep(1.1)  # the readiness probe reuses a dial result for a second
    assert gateway.http("/readiness") == (503, "upstream cannot be dialled\n")
    proxy.resume()
    with RawClient.connect(gateway.url) as client:
        assert client.call("INFO").startswith(b"$")
    time.sleep(1.1)
    assert gateway.http("/readiness") == (200, "ok\n")


def test_delay_adds_latency_but_pipelined_replies_stay_in_order(proxied):
    proxy, gateway = proxied
    with RawClient.connect(gateway.url, wid="delay-" + uid()) as client:
        started = time.monotonic()
        client.call("INFO")
        direct = time.monotonic() - started
        proxy.delay(0.1)
        started = time.monotonic()
        client.call("INFO")
        delayed = time.monotonic() - started
        assert delayed >= 0.2 > direct, (direct, delayed)  # one delay each way

        # Many small pieces, each late: replies split anywhere, and a pipeline of 90 commands.
        proxy.delay(0.001, split=13)
        queue = "order-" + uid()
        jids = [f"order-{i:03d}-{uid()}" for i in range(30)]
        lines = []
        for jid in jids:
            lines += [push_line(job(jid, queue=queue)), "NOPE " + jid, "FETCH " + queue]
        client.send(("\r\n".join(lines) + "\r\n").encode())
        for jid in jids:
            assert client.read_raw() == OK
            assert client.read_raw() == b"-ERR unknown command NOPE\r\n"
            assert json.loads(client.read_raw().split(b"\r\n", 1)[1])["jid"] == jid
        proxy.resume()
        assert client.call("INFO").startswith(b"$")


# --- a server that talks nonsense -----------------------------------------------------------------


class NonsenseServer:
    """A tiny fake Faktory: `+HI`, then `+OK` to everything, except that it answers `self.garbage`
    to the HELLO of a worker with wid `nonsense`, and to the command `NONSENSE`."""

    def __init__(self):
        self.garbage = b""
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        with sock, sock.makefile("rb") as lines:
            sock.sendall(b'+HI {"v":2}\r\n')
            for line in lines:
                if line.startswith(b"HELLO"):
                    nonsense = json.loads(line[6:]).get("wid") == "nonsense"
                    sock.sendall(self.garbage if nonsense else OK)
                elif line.startswith(b"NONSENSE"):
                    sock.sendall(self.garbage)
                else:
                    sock.sendall(OK)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def nonsense():
    server = NonsenseServer()
    gateway = GatewayProcess(f"tcp://127.0.0.1:{server.port}").start()
    yield server, gateway
    gateway.stop()
    server.close()


GARBAGE = {
    "array": b"*3\r\n",
    "unknown type": b"%garbage\r\n",
    "bad bulk length": b"$abc\r\n",
    "bulk without CRLF": b"$3\r\nabcXY\r\n",
    "huge bulk": b"$99999999999\r\n",
    "endless bulk header": b"$" + b"9" * 100,
    "binary": b"\x00\xff\x13\r\n",
}
UPSTREAM_ERRORS = "faktory_gateway_protocol_errors_total"


@pytest.mark.parametrize("when", ["handshake", "later"])
@pytest.mark.parametrize("garbage", GARBAGE.values(), ids=GARBAGE.keys())
def test_a_server_that_answers_garbage_loses_that_client_only(nonsense, garbage, when):
    server, gateway = nonsense
    server.garbage = garbage
    before = gateway.metric(UPSTREAM_ERRORS, side="upstream")
    bystander = RawClient.connect(gateway.url)
    victim = RawClient(gateway.url)
    assert victim.read_raw() == b'+HI {"v":2}\r\n'
    if when == "handshake":
        victim.send(b'HELLO {"v":2,"wid":"nonsense"}\r\n')
    else:
        victim.send(b'HELLO {"v":2}\r\n')
        assert victim.read_raw() == OK
        assert victim.call("PING") == OK
        victim.send(b"NONSENSE\r\n")
    assert connection_closed(victim)
    victim.close()
    after = gateway.metric(UPSTREAM_ERRORS, side="upstream")
    assert after == before + 1
    assert "upstream sent bytes that are not RESP; closing" in gateway.text()
    # The gateway goes on: the connection that was open, and a new one.
    assert bystander.call("PING") == OK
    bystander.close()
    with RawClient.connect(gateway.url) as fresh:
        assert fresh.call("PING") == OK
    assert gateway.proc.poll() is None


# --- Redis goes away and comes back under load ----------------------------------------------------


def rss_and_fds(pid: int) -> tuple[int, int]:
    return rss_kib(pid) * 1024, len(os.listdir(f"/proc/{pid}/fd"))


class Load(threading.Thread):
    """Either plain PUSHes, or whole batches (NEW, three member PUSHes, COMMIT), on one connection."""

    def __init__(self, url: str, batches: bool):
        super().__init__(daemon=True)
        self.url = url
        self.batches = batches
        self.results: Counter = Counter()
        self.cycles = 0  # plain PUSHes answered +OK, or batches committed
        self.stopping = threading.Event()

    def run(self) -> None:
        client = None
        while not self.stopping.is_set():
            try:
                client = client or RawClient.connect(self.url)
                ok = self.batch(client) if self.batches else self.push(client)
                self.cycles += ok
            except (ServerClosed, OSError) as exc:
                self.results[f"closed: {exc}"] += 1
                client = None
            time.sleep(0.002)
        if client:
            client.close()

    def outcome(self, reply: bytes) -> bool:
        self.results[reply.split(b" ")[1].decode() if reply.startswith(b"-ERR") else reply[:3].decode()] += 1
        return reply == OK

    def push(self, client: RawClient) -> bool:
        return self.outcome(client.call(push_line(job("plain-" + uid(), queue="redis-plain"))))

    def batch(self, client: RawClient) -> bool:
        spec = {"success": {"jobtype": "Done", "args": [], "queue": "redis-callbacks"}}
        reply = client.call("BATCH NEW " + json.dumps(spec))
        if not reply.startswith(b"$"):
            return self.outcome(reply)
        bid = reply.split(b"\r\n")[1].decode()
        for _ in range(3):
            if not self.outcome(
                client.call(push_line(job("m-" + uid(), queue="redis-work", custom={"bid": bid})))
            ):
                return False
        return self.outcome(client.call("BATCH COMMIT " + bid))


def test_redis_outage_under_load_needs_no_restart_and_leaks_nothing(faktory):
    standin = StandinProcess(faktory.url).start()
    redis = RedisServer().start()
    gateway = GatewayProcess(standin.url, "--redis", redis.url, "--log-level", "error").start()
    pid = gateway.proc.pid
    loads = [Load(gateway.url, batches=False)] + [Load(gateway.url, batches=True) for _ in range(3)]
    samples: dict[str, list[tuple[int, int]]] = {"before": [], "outage": [], "after": []}

    def run_for(phase: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            samples[phase].append(rss_and_fds(pid))
            time.sleep(0.1)

    try:
        for load in loads:
            load.start()
        wait_until(lambda: all(load.cycles >= 20 for load in loads), 10, "load before the outage")
        run_for("before", 1.0)
        batch_results = sum((load.results for load in loads[1:]), Counter())

        redis.kill()
        run_for("outage", 0.5)  # commands already past the ledger finish
        cycles = [load.cycles for load in loads]
        run_for("outage", 2.5)
        refused = sum((load.results for load in loads[1:]), Counter()) - batch_results
        assert refused["STATE_UNAVAILABLE"] > 20, refused
        # No batch got through while the ledger was away (I1: no guess), plain PUSHes did.
        assert all(load.cycles == n for load, n in zip(loads[1:], cycles[1:], strict=True))
        assert loads[0].cycles > cycles[0] + 50

        old, redis = redis, RedisServer(port=redis.port).start()  # empty: the ledger's records are gone
        old.cleanup()
        cycles = [load.cycles for load in loads]
        wait_until(
            lambda: all(load.cycles >= n + 10 for load, n in zip(loads, cycles, strict=True)),
            10,
            "batches to go through again",
        )
        run_for("after", 2.0)
    finally:
        for load in loads:
            load.stopping.set()
        for load in loads:
            load.join(10)
        alive = gateway.proc.poll() is None
        gateway.stop()
        standin.stop()
        redis.cleanup()
    assert alive and gateway.proc.pid == pid
    assert not loads[0].results.keys() - {"+OK"}, loads[0].results  # plain traffic never noticed
    assert not [key for load in loads for key in load.results if key.startswith("closed")]

    base_rss = max(rss for rss, _ in samples["before"])
    base_fds = max(fds for _, fds in samples["before"])
    for phase in ("outage", "after"):
        rss = max(rss for rss, _ in samples[phase])
        fds = max(fds for _, fds in samples[phase])
        assert fds <= base_fds + 5, f"open fds {base_fds} before the outage, {fds} {phase}"
        assert rss <= base_rss + 6 * 2**20, f"RSS {base_rss >> 20} MiB before, {rss >> 20} MiB {phase}"


def test_a_wrong_redis_password_leaks_no_connections(faktory):
    """Each failed ledger dial must close its socket: Redis rejecting AUTH leaves the TCP connection open."""
    redis = RedisServer()
    redis.argv += ["--requirepass", "right-" + uid()]
    redis.start()
    gateway = GatewayProcess(faktory.url, "--redis", f"redis://:wrong@127.0.0.1:{redis.port}/0")
    Process.start(gateway)  # not GatewayProcess.start: /startup stays 503 while the store refuses
    try:
        gateway.wait_for_line("gateway listening")
        fds = rss_and_fds(gateway.proc.pid)[1]
        with RawClient.connect(gateway.url) as client:
            for _ in range(50):
                reply = client.call(push_line(job("p-" + uid(), custom={"bid": "b-" + uid()})))
                assert reply.startswith(b"-ERR STATE_UNAVAILABLE "), reply
        leaked = rss_and_fds(gateway.proc.pid)[1] - fds
        assert leaked <= 3, f"{leaked} file descriptors more after 50 failed ledger dials"
    finally:
        gateway.stop()
        redis.cleanup()
