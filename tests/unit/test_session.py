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
from tests.unit.test_pipeline import FakeTicket, ScriptedRules


class FakeSocket:
    def __init__(self, log):
        self.log = log

    def setsockopt(self, level, option, value):
        self.log.append(("setsockopt", level, option, value))


class FakeTransport:
    def __init__(self, name: str, log: list):
        self.name = name
        self.log = log
        self.closed = False

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
        self.closed = True

    def abort(self):
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
    session.connection_made(FakeTransport("client", log))
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


def test_the_session_imports_neither_the_server_nor_the_guard():
    code = "import sys, gateway.session; print(sorted(m for m in sys.modules if m.startswith('gateway.')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "gateway.server" not in loaded and "gateway.guard" not in loaded, loaded
