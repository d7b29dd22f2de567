"""A TCP proxy that breaks the connection on request, for tests of what happens when the network fails.

In the spirit of asyncpg's test fuzzing proxy: it listens on a free loopback port, forwards every
connection to a target, and can be told, while the test runs, to:

- `delay(seconds, split=None)`: wait this long before forwarding each chunk (and, with `split`, cut
  each chunk into pieces of at most that many bytes, each delayed), in both directions;
- `stall(direction="both")`: stop forwarding ("up": client to target, "down": target to client);
  bytes already read are held, not dropped, and flow again on `resume()`;
- `stall_when(marker, direction="up")`: stall only the connections that carry `marker`, from the
  chunk that contains it on (that chunk is held too); the others flow;
- `stop_reading_after(marker)`: forward the client-to-target chunk that contains `marker`, then stop
  *reading* that client: what it sends next stays in the kernel's buffers (this proxy's receive
  queue, then the sender's send queue), as over a link that does not take bytes; `resume()` reads
  again. With `FaultProxy(..., rcvbuf=N)` the receive queue is small, so the bytes stay with the sender;
- `cut_all(rst=True)`: end every current connection on both sides, with a reset (or a FIN);
- `refuse()`: stop listening, so that new connections are refused (ECONNREFUSED);
- `resume()`: back to plain forwarding (and listening again after `refuse()`);
- `stop()`: cut everything and end the proxy's thread.

A client that *resets* its side of a connection (ECONNRESET on the proxy's read) while the proxy
holds stalled client-to-target bytes of it: those bytes are dropped, never delivered, and the
target's side is reset too (`dropped` lists them). A network does not deliver a reset connection's
bytes to the server's application; this is the assumption the gateway's commit fence makes (A2:
bytes a gateway wrote arrive within MARGIN or, once it reset the connection, never). Bytes held by
`delay` are in transit and still arrive; a client's orderly close (FIN) still lets held bytes go
out, then passes the FIN on.

It runs its own asyncio loop in a daemon thread, so blocking test code can drive it:

    proxy = FaultProxy(faktory.port).start()
    gateway = GatewayProcess(f"tcp://127.0.0.1:{proxy.port}")
    proxy.stall(); ...; proxy.resume(); proxy.cut_all(); proxy.stop()
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
import threading

DIRECTIONS = ("up", "down")


class _Link:
    """One proxied connection: the client's side and the target's side, and the two pumps between them."""

    def __init__(self, client: tuple[asyncio.StreamReader, asyncio.StreamWriter]):
        self.client = client
        self.target: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.tasks: list[asyncio.Task] = []
        self.stalled: set[str] = set()  # directions stalled for this link only (stall_when)
        self.unread = False  # the client's bytes are left unread (stop_reading_after)
        self.held: dict[str, bytes] = {}  # direction -> bytes read and not forwarded while stalled

    def writers(self) -> list[asyncio.StreamWriter]:
        return [self.client[1]] + ([self.target[1]] if self.target else [])


class FaultProxy:
    def __init__(
        self,
        target_port: int,
        target_host: str = "127.0.0.1",
        host: str = "127.0.0.1",
        rcvbuf: int | None = None,
    ):
        self.target = (target_host, target_port)
        self.host = host
        self.rcvbuf = rcvbuf  # SO_RCVBUF of the accepted connections (set on the listener, before listen)
        self.port = 0
        self.accepted = 0  # connections accepted since start
        self._delay = 0.0
        self._split: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._flowing: dict[str, asyncio.Event] = {}
        self._markers: dict[str, list[bytes]] = {d: [] for d in DIRECTIONS}
        self._unread_after: list[bytes] = []
        self._links: set[_Link] = set()
        self.dropped: list[bytes] = []  # held client-to-target bytes dropped because the client reset

    # --- the API, called from the test's thread ------------------------------------------------

    def start(self) -> FaultProxy:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._flowing = {d: asyncio.Event() for d in DIRECTIONS}
            for event in self._flowing.values():
                event.set()
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
        self._thread.start()
        ready.wait()
        self._run(self._listen())
        return self

    @property
    def url(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    @property
    def connections(self) -> int:
        """Connections being proxied now."""
        return self._run(self._count())

    def delay(self, seconds: float, split: int | None = None) -> None:
        self._delay = seconds
        self._split = split

    def stall(self, direction: str = "both") -> None:
        self._run(self._set_flow(direction, False))

    def stall_when(self, marker: bytes, direction: str = "up") -> None:
        """Stall, in `direction`, each connection on which `marker` passes, from that chunk on."""
        self._markers[direction].append(marker)

    def stop_reading_after(self, marker: bytes) -> None:
        """Once `marker` passed from a client, read nothing more from that client until `resume()`."""
        self._unread_after.append(marker)

    def held(self, direction: str = "up") -> bytes:
        """The bytes held (stalled) now in `direction`, all connections together."""
        return self._run(self._held(direction))

    def refuse(self) -> None:
        self._run(self._unlisten())

    def resume(self) -> None:
        """Plain forwarding again: no delay, no stall, and listening (on the same port) if refused."""
        self._delay, self._split = 0.0, None
        self._markers = {d: [] for d in DIRECTIONS}
        self._unread_after = []
        self._run(self._set_flow("both", True))
        if self._server is None:
            self._run(self._listen())

    def cut_all(self, rst: bool = True) -> int:
        """End every current connection, both sides; returns how many were cut."""
        return self._run(self._cut_all(rst))

    def stop(self) -> None:
        if self._loop is None or self._loop.is_closed():
            return
        self._run(self._unlisten())
        self._run(self._cut_all(True))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    # --- inside the proxy's loop ---------------------------------------------------------------

    async def _listen(self) -> None:
        # The same port again after refuse(): SO_REUSEADDR lets it be bound while old ones time-wait.
        if self.rcvbuf is None:
            self._server = await asyncio.start_server(self._accept, self.host, self.port, reuse_address=True)
        else:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            sock.bind((self.host, self.port))
            self._server = await asyncio.start_server(self._accept, sock=sock)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _unlisten(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _count(self) -> int:
        return len(self._links)

    async def _held(self, direction: str) -> bytes:
        return b"".join(link.held.get(direction, b"") for link in self._links)

    async def _set_flow(self, direction: str, flowing: bool) -> None:
        for name in DIRECTIONS if direction == "both" else (direction,):
            (self._flowing[name].set if flowing else self._flowing[name].clear)()
            if flowing:
                for link in self._links:
                    link.stalled.discard(name)
                    if name == "up" and link.unread:
                        link.unread = False
                        link.client[1].transport.resume_reading()

    async def _cut_all(self, rst: bool) -> int:
        links = list(self._links)
        for link in links:
            self._drop(link, rst)
        await asyncio.sleep(0)  # let the cancelled pumps finish
        return len(links)

    def _drop(self, link: _Link, rst: bool) -> None:
        self._links.discard(link)
        for task in link.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        for writer in link.writers():
            transport = writer.transport
            if transport.is_closing():
                continue
            if rst:  # SO_LINGER with a zero timeout: close() sends RST instead of FIN
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        link = _Link((reader, writer))
        self._links.add(link)
        try:
            link.target = await asyncio.open_connection(*self.target)
        except OSError:
            self._drop(link, rst=True)  # the target is down: the client sees a reset, as with no proxy
            return
        if link not in self._links:  # cut while dialling
            link.target[1].transport.abort()
            return
        link.tasks = [
            asyncio.create_task(self._pump(link, reader, link.target[1], "up")),
            asyncio.create_task(self._pump(link, link.target[0], writer, "down")),
        ]

    async def _pump(
        self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str
    ) -> None:
        try:
            while data := await reader.read(65536):
                if any(marker in data for marker in self._markers[direction]):
                    link.stalled.add(direction)
                step = self._split or len(data)
                for offset in range(0, len(data), step):
                    if self._delay:
                        await asyncio.sleep(self._delay)
                    if not await self._may_flow(link, reader, direction, data[offset:]):
                        return
                    writer.write(data[offset : offset + step])
                    await writer.drain()
                if direction == "up" and any(marker in data for marker in self._unread_after):
                    link.unread = True
                    link.client[1].transport.pause_reading()
            # An orderly close on one side: pass the FIN on, once what was held has gone out.
            if not await self._may_flow(link, reader, direction, b""):
                return
            if writer.can_write_eof():
                writer.write_eof()
        except (OSError, asyncio.IncompleteReadError):
            self._drop(link, rst=True)  # a reset on one side resets the other
        except asyncio.CancelledError:
            return
        if all(task.done() or task is asyncio.current_task() for task in link.tasks):
            self._drop(link, rst=False)

    async def _may_flow(self, link: _Link, reader: asyncio.StreamReader, direction: str, held: bytes) -> bool:
        """Wait while this direction is stalled. False when the client reset its side meanwhile:
        the held client-to-target bytes are then dropped and the target's side is reset."""
        flowing = self._flowing[direction]
        if flowing.is_set() and direction not in link.stalled:
            return True
        link.held[direction] = held
        try:
            while True:
                # Checked once more after a resume: a reset that came in just before it, not yet
                # seen by this loop, must still keep the held bytes from going out.
                if direction == "up" and self._client_reset(link, reader):
                    if held:
                        self.dropped.append(held)
                    self._drop(link, rst=True)
                    return False
                if flowing.is_set() and direction not in link.stalled:
                    return True
                await asyncio.sleep(0.02)
        finally:
            link.held.pop(direction, None)

    @staticmethod
    def _client_reset(link: _Link, reader: asyncio.StreamReader) -> bool:
        if isinstance(reader.exception(), ConnectionResetError):
            return True
        sock = link.client[1].transport.get_extra_info("socket")
        return sock is not None and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET
