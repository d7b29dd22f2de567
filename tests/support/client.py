"""A deliberately plain Faktory client for tests: a blocking socket, one line out, one reply in.

It does not use the gateway's own framers, so the tests do not check the gateway against itself.
"""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import uuid
from urllib.parse import urlsplit


class ServerClosed(ConnectionError):
    pass


def pwdhash(password: str, salt: str, iterations: int) -> str:
    digest = (password + salt).encode()
    for _ in range(iterations):
        digest = hashlib.sha256(digest).digest()
    return digest.hex()


class RawClient:
    def __init__(
        self,
        url: str,
        timeout: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        source: str | None = None,
    ):
        """`source`: the local address to connect from (any of 127.0.0.0/8 reaches loopback on Linux),
        for tests that need a client to come from another address than 127.0.0.1."""
        parts = urlsplit(url)
        self.password = parts.password
        sock = socket.create_connection(
            (parts.hostname, parts.port or 7419),
            timeout=timeout,
            source_address=(source, 0) if source else None,
        )
        if parts.scheme == "tcp+tls":
            sock = (ssl_context or ssl.create_default_context()).wrap_socket(
                sock, server_hostname=parts.hostname
            )
        self.sock = sock
        self.file = sock.makefile("rb")
        self.greeting: bytes | None = None

    @classmethod
    def connect(cls, url: str, wid: str | None = None, password: str | None = None, **kwargs) -> RawClient:
        """Connect and complete the handshake; raises if the server does not answer +OK."""
        client = cls(url, **kwargs)
        reply = client.handshake(wid=wid, password=password)
        if reply != b"+OK\r\n":
            raise AssertionError(f"handshake failed: {reply!r}")
        return client

    def handshake(self, wid: str | None = None, password: str | None = None) -> bytes:
        self.greeting = self.read_raw()
        hi = json.loads(self.greeting[4:-2])
        hello: dict = {"v": 2, "hostname": "test", "pid": 1}
        if wid:
            hello.update(wid=wid, labels=["test"])
        if "s" in hi:
            hello["pwdhash"] = pwdhash(
                password if password is not None else self.password or "", hi["s"], hi["i"]
            )
        self.send(b"HELLO " + json.dumps(hello).encode() + b"\r\n")
        return self.read_raw()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_raw(self) -> bytes:
        """One RESP reply, exactly as it came (header and body)."""
        line = self.file.readline()
        if not line:
            raise ServerClosed("connection closed")
        if line.startswith(b"$") and line != b"$-1\r\n":
            body = self.file.read(int(line[1:-2]) + 2)
            return line + body
        return line

    def call(self, line: str | bytes) -> bytes:
        """Send one command, return its raw reply."""
        data = line.encode() if isinstance(line, str) else line
        self.send(data + b"\r\n")
        return self.read_raw()

    def value(self, line: str | bytes):
        """Send one command; return the reply's payload (bytes), None for $-1; raise on -ERR."""
        raw = self.call(line)
        if raw.startswith(b"-"):
            raise CommandError(raw[1:-2].decode())
        if raw.startswith(b"$"):
            return None if raw == b"$-1\r\n" else raw.split(b"\r\n", 1)[1][:-2]
        return raw[1:-2]

    def json(self, line: str | bytes):
        return json.loads(self.value(line))

    def is_closed(self, timeout: float = 5.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, ssl.SSLError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CommandError(Exception):
    """The server (or the gateway) answered -ERR; the message is the text after the dash."""


def uid() -> str:
    """A fresh 12-character id for a test's jids, queues and workers (unique per test run)."""
    return uuid.uuid4().hex[:12]


def job(jid: str, jobtype: str = "TestJob", queue: str = "default", **fields) -> dict:
    return {"jid": jid, "jobtype": jobtype, "args": fields.pop("args", [1, "two"]), "queue": queue, **fields}


def push_line(payload: dict) -> str:
    return "PUSH " + json.dumps(payload, separators=(",", ":"))
