"""A stand-in for Faktory Enterprise batches, sitting in front of the real Faktory OSS server.

No Ent binary exists for Linux, yet the batch tests need a server that speaks `BATCH`. This one
answers `BATCH NEW/OPEN/COMMIT/STATUS` itself, fires the callbacks the way Ent does
(docs/invariants.md, last section) and forwards every other command to the real server.

It is as permissive as Ent 1.9.4 (contribsys/faktory#465): anyone may reopen a committed batch,
push into it, hang a child batch under it, or push after a callback fired. The tests need that
permissiveness to show what the gateway refuses. So that they can prove what went on, the stand-in
keeps an audit, read with the test-only verb `STANDIN REPORT`: per batch, how many jobs and child
batches joined while it was committed, or after one of its callbacks was enqueued.

    python -m tests.support.standin --listen 127.0.0.1:PORT --upstream tcp://[:password@]HOST:PORT

Under faults it behaves as Faktory does (faktory-protocol.md, section 11): it handles one command
of a connection at a time, in order; it reads eagerly, and a reset does not throw away the lines
that had arrived: they are still handled (their replies go nowhere); and a client that does not
read its replies blocks the connection, as Faktory's `Write` does.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import secrets
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlsplit

from tests.support.client import RawClient
from tests.support.processes import REPO, Process, free_port

MAX_LINE = 64 * 2**20  # Faktory reads lines of any length; jobs of a few MB must pass
OK = b"+OK\r\n"
KINDS = ("complete", "success")  # the order they fire in
AUDIT = ("joined_while_committed", "joined_after_callback", "children_while_committed", "children_after_callback")  # fmt: skip


@dataclass
class Batch:
    bid: str
    parent: str | None
    description: str
    callbacks: dict[str, dict]  # "complete" / "success" -> the job hash given to BATCH NEW
    created_at: str
    committed: bool = False  # committed and not reopened since
    members: set[str] = field(default_factory=set)  # jids that joined
    ran: set[str] = field(default_factory=set)  # members that ran at least once (ACK or FAIL)
    acked: set[str] = field(default_factory=set)
    failing: set[str] = field(default_factory=set)  # failed and not ACKed since
    # Callback states, as BATCH STATUS shows them: "" not yet, "1" enqueued, "2" ACKed.
    st: dict[str, str] = field(default_factory=lambda: dict.fromkeys(KINDS, ""))
    children: list[str] = field(default_factory=list)
    audit: dict[str, int] = field(default_factory=lambda: dict.fromkeys(AUDIT, 0))

    @property
    def fired(self) -> bool:
        return any(self.st.values())

    def status(self) -> dict:
        status = {"bid": self.bid}
        if self.parent:
            status["parent_bid"] = self.parent
        return status | {
            "description": self.description,
            "created_at": self.created_at,
            "total": len(self.members),
            "pending": len(self.members - self.acked),
            "failed": len(self.failing),
            "complete_st": self.st["complete"],
            "success_st": self.st["success"],
        }

    def report(self) -> dict:
        return {"committed": self.committed, "complete_st": self.st["complete"],
                "success_st": self.st["success"], **self.audit, "total": len(self.members)}  # fmt: skip


@dataclass
class Join:
    """A job of a PUSH/PUSHB on its way to the server, with its batch's state when the line arrived."""

    jid: str
    batch: Batch
    while_committed: bool
    after_callback: bool


def bulk(text: str) -> bytes:
    data = text.encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


def error(message: str) -> bytes:
    return f"-ERR {message}\r\n".encode()


class Inbox(asyncio.Protocol):
    """The client side of one stand-in connection.

    Everything that arrives is kept until handled, and a reset (or a close) does not discard it:
    Linux hands queued bytes to read() before it reports a reset, and Faktory reads on, so what
    reached the server is handled. (An asyncio StreamReader raises on the next read instead, and a
    test that relied on it would under-report late joins.) Writes wait while the client is not
    reading, as the server's `Write` blocks; once the client is gone they are dropped."""

    def __init__(self, serve) -> None:
        self._serve = serve
        self.buffer = bytearray()
        self.gone = False
        self._more = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._serve(self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._more.set()

    def eof_received(self) -> bool:
        self.gone = True
        self._more.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self._more.set()
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    async def readline(self) -> bytes:
        """The next whole line, or b"" once the client is gone and no whole line is left."""
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[: end + 1])
                del self.buffer[: end + 1]
                return line
            if self.gone:
                return b""
            self._more.clear()
            await self._more.wait()

    async def write(self, data: bytes) -> None:
        if self.gone or self.transport.is_closing():
            return
        self.transport.write(data)
        await self._writable.wait()

    def close(self) -> None:
        self.transport.close()


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    """One RESP reply from the server, exactly as sent: `+...`, `-...`, `$-1` or `$n` and n bytes."""
    line = await reader.readuntil(b"\r\n")
    if line.startswith(b"$") and line != b"$-1\r\n":
        line += await reader.readexactly(int(line[1:-2]) + 2)
    return line


class Standin:
    def __init__(self, upstream: str):
        url = urlsplit(upstream)
        if url.scheme != "tcp":
            raise SystemExit(f"standin: only tcp:// upstreams are supported, not {upstream}")
        self.host, self.port, self.password = url.hostname, url.port or 7419, url.password or ""
        self.batches: dict[str, Batch] = {}
        self.member_of: dict[str, str] = {}  # member jid -> bid
        self.callback_jobs: dict[str, tuple[str, str]] = {}  # callback jid -> (bid, kind)
        self._own: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._own_lock = asyncio.Lock()
        # Every connection's task, until it ends: held only by its own objects, a task waiting on
        # a slow upstream reply could be collected once its client is gone (test-peers.md).
        self._tasks: set[asyncio.Task] = set()
        self.busy = 0  # connections in the middle of a command (the report's own excluded)

    def accept(self, client: Inbox) -> None:
        task = asyncio.get_running_loop().create_task(self.serve(client))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- one client connection -----------------------------------------------------------------

    async def serve(self, client: Inbox) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(self.host, self.port, limit=MAX_LINE)
        except OSError:
            client.close()
            return
        try:
            # The handshake is relayed untouched: the password hash is bound to the salt the real
            # server chose for this very connection, so the client must answer the server's HI.
            await client.write(await read_reply(up_r))
            up_w.write(await client.readline())
            reply = await read_reply(up_r)
            await client.write(reply)
            # Pipelined lines simply wait in the inbox; they are answered one at a time, in order,
            # also after the client is gone (as Faktory does).
            while reply == OK and (line := await client.readline()):
                verb = line.split(maxsplit=1)[0] if line.strip() else b""
                if verb == b"END":
                    up_w.write(line)
                    break
                if verb == b"STANDIN":
                    await client.write(await self.command(verb, line, up_r, up_w))
                    continue
                self.busy += 1
                try:
                    answer = await self.command(verb, line, up_r, up_w)
                finally:
                    self.busy -= 1
                await client.write(answer)
        except (OSError, EOFError, ValueError):  # EOF: IncompleteReadError; ValueError: line too long
            pass
        finally:
            up_w.close()
            client.close()

    async def command(self, verb: bytes, line: bytes, up_r, up_w) -> bytes:
        text = line.rstrip(b"\r\n").decode(errors="replace")
        if verb == b"BATCH":
            return await self.batch_command(*text.partition(" ")[2].partition(" ")[::2])
        if verb == b"STANDIN":
            if text != "STANDIN REPORT":
                return error("unknown STANDIN subcommand")
            report = {"batches": {bid: b.report() for bid, b in self.batches.items()}, "busy": self.busy}
            return bulk(json.dumps(report))
        payload = text.partition(" ")[2]
        joins = self.joining(verb, payload)
        up_w.write(line)
        reply = b""
        try:
            reply = await read_reply(up_r)
        finally:  # also when the server went away: then nothing is known to have joined
            await self.settle(verb, joins, reply)
        if verb in (b"ACK", b"FAIL") and reply == OK:
            await self.job_ran(verb, payload)
        return reply

    # --- membership ----------------------------------------------------------------------------

    def joining(self, verb: bytes, payload: str) -> list[Join]:
        """Register the jobs of a PUSH/PUSHB that name a known batch, before the line goes upstream.

        Ent links a job to its batch the moment it takes the PUSH. Registering only after the
        server's +OK would leave a window in which a COMMIT on another connection finds the batch
        empty and fires, or a worker ACKs a job the stand-in does not know yet.
        """
        if verb not in (b"PUSH", b"PUSHB"):
            return []
        try:
            jobs = json.loads(payload)
        except ValueError:
            return []
        joins = []
        for job in jobs if isinstance(jobs, list) else [jobs]:
            custom = job.get("custom") if isinstance(job, dict) else None
            bid = custom.get("bid") if isinstance(custom, dict) else None
            jid = job.get("jid") if isinstance(job, dict) else None
            batch = self.batches.get(bid) if isinstance(bid, str) else None
            if batch and isinstance(jid, str) and jid not in batch.members:
                joins.append(Join(jid, batch, batch.committed, batch.fired))
                batch.members.add(jid)
                self.member_of[jid] = bid
        return joins

    async def settle(self, verb: bytes, joins: list[Join], reply: bytes) -> None:
        """Keep the jobs the server took (PUSH: +OK; PUSHB: not in the error map), drop the rest."""
        if not joins:
            return
        refused: set[str] | dict = {j.jid for j in joins}
        if verb == b"PUSH" and reply == OK:
            refused = set()
        elif verb == b"PUSHB" and reply.startswith(b"$") and reply != b"$-1\r\n":
            refused = json.loads(reply.split(b"\r\n", 1)[1])
        for join in joins:
            if join.jid in refused:
                join.batch.members.discard(join.jid)
                self.member_of.pop(join.jid, None)
                await self.evaluate(join.batch.bid)  # it may have been the batch's last open job
            else:
                join.batch.audit["joined_while_committed"] += join.while_committed
                join.batch.audit["joined_after_callback"] += join.after_callback

    async def job_ran(self, verb: bytes, payload: str) -> None:
        try:
            jid = json.loads(payload).get("jid")
        except (ValueError, AttributeError):
            return
        if jid in self.callback_jobs:
            # A callback job is no member: its ACK moves *_st to "2"; a FAIL leaves it at "1".
            if verb == b"ACK":
                bid, kind = self.callback_jobs.pop(jid)
                self.batches[bid].st[kind] = "2"
                await self.evaluate(bid)
        elif jid in self.member_of:
            batch = self.batches[self.member_of[jid]]
            batch.ran.add(jid)  # a first failure counts as "ran" for the complete callback
            if verb == b"ACK":
                batch.acked.add(jid)
                batch.failing.discard(jid)
            else:
                batch.failing.add(jid)
            await self.evaluate(batch.bid)

    # --- BATCH ---------------------------------------------------------------------------------

    async def batch_command(self, sub: str, arg: str) -> bytes:
        if sub == "NEW":
            return self.new_batch(arg)
        if sub not in ("OPEN", "COMMIT", "STATUS"):
            return error("unknown BATCH subcommand")
        batch = self.batches.get(arg.strip())
        if batch is None:
            return error(f"no such batch {arg.strip()}")
        if sub == "OPEN":
            batch.committed = False  # no questions asked, as in Ent 1.9.4 (#465)
            return bulk(batch.bid)
        if sub == "COMMIT":
            batch.committed = True
            await self.evaluate(batch.bid)  # an empty batch fires right here
            return OK
        return bulk(json.dumps(batch.status()))

    def new_batch(self, payload: str) -> bytes:
        try:
            spec = json.loads(payload)
            assert isinstance(spec, dict)
        except (ValueError, AssertionError):
            return error("invalid JSON for BATCH NEW")
        # The Go client always sends "bid":""; the bid is ours to choose, so that key is ignored.
        callbacks = {kind: spec[kind] for kind in KINDS if spec.get(kind)}
        if not callbacks:
            return error("batch must have a success or complete callback")
        if not all(isinstance(cb, dict) and cb.get("jobtype") for cb in callbacks.values()):
            return error("batch callbacks must be job hashes with a jobtype")
        parent = spec.get("parent_bid") or None
        if parent is not None and parent not in self.batches:
            return error(f"no such batch {parent}")
        bid = "b-" + secrets.token_urlsafe(12)  # 12 bytes -> 16 url-safe characters
        created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.batches[bid] = Batch(bid, parent, spec.get("description") or "", callbacks, created)
        if parent:
            owner = self.batches[parent]
            owner.children.append(bid)
            owner.audit["children_while_committed"] += owner.committed
            owner.audit["children_after_callback"] += owner.fired
        return bulk(bid)

    # --- callbacks -----------------------------------------------------------------------------

    def complete_ready(self, batch: Batch) -> bool:
        """Committed, every member ran once, and every child's complete stage is over."""
        return (batch.committed and batch.ran >= batch.members
                and all(self.stage_over(self.batches[c], "complete") for c in batch.children))  # fmt: skip

    def success_ready(self, batch: Batch) -> bool:
        """Committed, every member ACKed, our complete callback ACKed, every child's success over."""
        own_complete_done = "complete" not in batch.callbacks or batch.st["complete"] == "2"
        return (batch.committed and batch.acked >= batch.members and own_complete_done
                and all(self.stage_over(self.batches[c], "success") for c in batch.children))  # fmt: skip

    def stage_over(self, child: Batch, kind: str) -> bool:
        """What a parent waits for: the child's callback ACKed, or, without one, the child being ready."""
        if kind in child.callbacks:
            return child.st[kind] == "2"
        return self.complete_ready(child) if kind == "complete" else self.success_ready(child)

    async def evaluate(self, bid: str | None) -> None:
        """Fire what is due for this batch, then look at its parents: their wait may be over too."""
        while bid:
            batch = self.batches[bid]
            for kind, ready in (("complete", self.complete_ready), ("success", self.success_ready)):
                if kind in batch.callbacks and batch.st[kind] == "" and ready(batch):
                    await self.fire(batch, kind)
            bid = batch.parent

    async def fire(self, batch: Batch, kind: str) -> None:
        batch.st[kind] = "1"  # before any await: each callback fires at most once
        spec = batch.callbacks[kind]
        job = {**spec, "jid": spec.get("jid") or secrets.token_urlsafe(12),
               "args": spec.get("args") or [], "queue": spec.get("queue") or "default"}  # fmt: skip
        # Callback jobs carry _bid, never bid: they are not members of the batch.
        job["custom"] = {**(spec.get("custom") or {}), "_bid": batch.bid, "_cb": kind}
        if batch.parent:
            job["custom"]["_pbid"] = batch.parent
        self.callback_jobs[job["jid"]] = (batch.bid, kind)
        reply = await self.push_own(job)
        if reply != OK:
            print(f"standin: pushing the {kind} callback of {batch.bid} got {reply!r}", flush=True)

    async def push_own(self, job: dict) -> bytes:
        """PUSH over the stand-in's own upstream connection, dialled (again) when needed."""
        line = b"PUSH " + json.dumps(job, separators=(",", ":")).encode() + b"\r\n"
        async with self._own_lock:
            for attempt in (1, 2):  # a second try after the server restarted under us
                try:
                    if self._own is None:
                        self._own = await self.dial_own()
                    reader, writer = self._own
                    writer.write(line)
                    return await read_reply(reader)
                except (OSError, EOFError):
                    self._own = None
                    if attempt == 2:
                        raise
        raise AssertionError("unreachable")

    async def dial_own(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        hi = json.loads((await read_reply(reader))[4:-2])
        hello: dict = {"v": 2}
        if "s" in hi:  # protocol section 2.3: SHA-256 of password+salt, i times over
            digest = (self.password + hi["s"]).encode()
            for _ in range(hi["i"]):
                digest = hashlib.sha256(digest).digest()
            hello["pwdhash"] = digest.hex()
        writer.write(b"HELLO " + json.dumps(hello).encode() + b"\r\n")
        reply = await read_reply(reader)
        if reply != OK:
            raise OSError(f"upstream refused the stand-in's HELLO: {reply!r}")
        return reader, writer


class StandinProcess(Process):
    """The stand-in as its own process in front of a Faktory URL, like the other peers."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.port = free_port()
        argv = [sys.executable, "-m", "tests.support.standin",
                "--listen", f"127.0.0.1:{self.port}", "--upstream", upstream]  # fmt: skip
        super().__init__(argv, cwd=str(REPO))

    def start(self, timeout: float = 20.0) -> StandinProcess:
        super().start()
        self.wait_for_line("standin listening", timeout=timeout)
        return self

    @property
    def url(self) -> str:
        """Same password as the upstream: the handshake is the real server's."""
        password = urlsplit(self.upstream).password
        auth = f":{password}@" if password else ""
        return f"tcp://{auth}127.0.0.1:{self.port}"

    def report(self) -> dict:
        """The audit, {bid: {...}}, as `STANDIN REPORT` gives it."""
        with RawClient.connect(self.url) as client:
            return client.json("STANDIN REPORT")["batches"]

    def busy(self) -> int:
        """Connections in the middle of a command right now (one still handling what a client sent
        before it left counts too)."""
        with RawClient.connect(self.url) as client:
            return client.json("STANDIN REPORT")["busy"]


def main() -> None:
    parser = argparse.ArgumentParser(description="Faktory Enterprise batch stand-in (test support)")
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--upstream", required=True, help="tcp://[:password@]HOST:PORT of Faktory OSS")
    args = parser.parse_args()
    host, port = args.listen.rsplit(":", 1)
    standin = Standin(args.upstream)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Inbox(standin.accept), host, int(port))
        print(f"standin listening on {args.listen}", flush=True)
        async with server:
            await server.serve_forever()

    try:
        import uvloop
    except ImportError:
        asyncio.run(run())
    else:
        uvloop.run(run())


if __name__ == "__main__":
    main()
