"""The asyncio driver over fake transports: what it writes when, back-pressure, SO_LINGER, imports."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys

from gateway.config import build
from gateway.decisions import Forward
from gateway.metrics import Metrics
from gateway.session import RESET_ON_CLOSE, Session, SessionContext
from tests.support.fakes import FakeTicket, ScriptedRules


class FakeSocket:
    def __init__(self, log):
        self.log = log

    def setsockopt(self, level, option, value):
        self.log.append(("setsockopt", level, option, value))


class FakeTransport(asyncio.Transport):
    def __init__(self, name: str, log: list):
        super().__init__()
        self.name = name
        self.log = log
        self.closed = False
        self.buffered = 0  # what get_write_buffer_size() reports

    def get_write_buffer_size(self):
        return self.buffered

    def write(self, data):
        self.log.append((self.name, data))

    def get_extra_info(self, key):
        if key == "peername":
            return ("10.0.0.2", 4000)
        return FakeSocket(self.log) if key == "socket" else None

    def pause_reading(self):
        self.log.append((self.name, "pause"))

    def resume_reading(self):
        self.log.append((self.name, "resume"))

    def is_closing(self):
        return self.closed

    def close(self):
        self.log.append((self.name, "close"))
        self.closed = True

    def abort(self):
        self.log.append((self.name, "abort"))
        self.closed = True


async def connected(rules, **limits):
    config = build([("test", {"upstream": "tcp://faktory:7419", **limits})])
    log: list = []
    upstream = FakeTransport("upstream", log)
    opened, closed = [], []

    async def dial(factory):
        session.upstream_protocol = factory()
        return upstream

    context = SessionContext(
        config.limits, Metrics(), rules, "faktory:7419", dial, opened.append, closed.append
    )
    session = Session(context)
    session.client_transport = FakeTransport("client", log)
    session.connection_made(session.client_transport)
    await asyncio.sleep(0)
    assert opened == [session]
    session.upstream_protocol.data_received(b'+HI {"v":2}\r\n')
    session.data_received(b'HELLO {"v":2}\r\n')
    session.upstream_protocol.data_received(b"+OK\r\n")
    log.clear()
    return session, log


def test_so_linger_is_set_before_the_first_ticketed_write():
    async def scenario():
        ticket = FakeTicket()
        session, log = await connected(
            ScriptedRules({b"PUSH": lambda command: Forward(command.raw, None, ticket)})
        )
        session.data_received(b"INFO\r\nPUSH x\r\n")
        linger = ("setsockopt", socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
        assert log == [linger, ("upstream", b"INFO\r\nPUSH x\r\n")]
        assert ticket.calls == ["writable", "written"]

    asyncio.run(scenario())


def test_client_reads_pause_at_max_pipeline_and_resume_as_replies_drain():
    async def scenario():
        session, log = await connected(ScriptedRules(), **{"limits.max_pipeline": "3"})
        session.data_received(b"INFO\r\nINFO\r\nINFO\r\n")
        assert log[-1] == ("client", "pause")
        session.upstream_protocol.data_received(b"+1\r\n")
        assert log[-2:] == [("client", b"+1\r\n"), ("client", "resume")]

    asyncio.run(scenario())


def ticketing(ticket):
    return ScriptedRules({b"PUSH": lambda command: Forward(command.raw, None, ticket)})


def test_a_client_that_does_not_read_cannot_keep_an_admitted_commands_reply_unread():
    """The client's buffer is full, so the upstream's reads are paused; an admitted command is
    written anyway (nothing is ahead of it): its reply must be read, or its lease lives forever."""

    async def scenario():
        ticket = FakeTicket()
        session, log = await connected(ticketing(ticket))
        session.pause_writing()  # the client's write buffer went over its high-water mark
        assert log == [("upstream", "pause")]
        session.data_received(b"PUSH x\r\n")
        assert log[-2:] == [("upstream", b"PUSH x\r\n"), ("upstream", "resume")]
        session.upstream_protocol.data_received(b"+OK\r\n")
        assert ticket.calls[-1] == "answered"
        assert log[-2:] == [("client", b"+OK\r\n"), ("upstream", "pause")]  # and back to back-pressure

    asyncio.run(scenario())


def test_plain_replies_to_a_client_that_does_not_read_wait_upstream():
    async def scenario():
        session, log = await connected(ScriptedRules())
        session.data_received(b"INFO\r\n")
        session.pause_writing()
        assert log[-1] == ("upstream", "pause")
        session.upstream_protocol.data_received(b"+1\r\n")  # a read already under way
        assert log[-1] == ("client", b"+1\r\n")  # relayed; reads stay paused
        session.resume_writing()
        assert log[-1] == ("upstream", "resume")

    asyncio.run(scenario())


def test_a_client_whose_backlog_passes_the_bound_is_closed_and_the_upstream_kept_for_the_lease():
    async def scenario():
        ticket = FakeTicket()
        session, log = await connected(ticketing(ticket), **{"limits.max_line_bytes": "1KiB"})
        session.data_received(b"INFO\r\nPUSH x\r\n")
        session.pause_writing()  # the INFO is owed, and so is the PUSH: reading goes on
        session.client_transport.buffered = 2048  # a backlog over max_line_bytes
        session.upstream_protocol.data_received(b"$3\r\nbig\r\n")
        assert session.closed and ("client", "close") in log
        assert ("upstream", "close") not in log and ("upstream", "abort") not in log
        session.upstream_protocol.data_received(b"+OK\r\n")  # the admitted command is answered
        assert ticket.calls[-1] == "answered"
        assert log[-1] == ("upstream", "close")

    asyncio.run(scenario())


def test_the_session_imports_neither_the_server_nor_the_batch_rules():
    code = "import sys, gateway.session; print(sorted(m for m in sys.modules if m.startswith('gateway.')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "gateway.server" not in loaded and not any(m.startswith("gateway.batches") for m in loaded), loaded
