"""A stand-in for Faktory Enterprise's batches, in front of the real Faktory OSS server.

No Ent binary exists for Linux. This server answers `BATCH NEW/OPEN/COMMIT/STATUS` itself, fires
callbacks the way Ent does (faktory-protocol.md section 7), and forwards every other command to
the real server. Like Ent 1.9.4 (contribsys/faktory#465) it enforces nothing: anyone may reopen a
committed batch, push into it, hang a child under it, or push after its callback was enqueued.

It also keeps an audit the tests read with the test-only verb `STANDIN REPORT`: for every batch,
how many jobs and child batches joined it while it was committed, or after a callback was enqueued.
A job counts as joining at the moment its PUSH line reaches the stand-in, since that is the moment
it would reach the server.

Run: python -m tests.support.ent_standin --listen 127.0.0.1:PORT --upstream tcp://[:pw@]HOST:PORT
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import secrets
import sys
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from tests.support.processes import REPO, Process, free_port


@dataclass
class Batch:
    bid: str
    parent: str | None
    description: str
    callbacks: dict  # "complete" / "success" -> job hash
    created_at: str
    committed: bool = False
    members: set = field(default_factory=set)
    ran: set = field(default_factory=set)  # executed once: ACKed or FAILed
    acked: set = field(default_factory=set)
    failed: int = 0
    state: dict = field(default_factory=lambda: {"complete": "", "success": ""})
    children: list = field(default_factory=list)
    audit: dict = field(default_factory=lambda: dict.fromkeys(
        ("joined_while_committed", "joined_after_callback", "children_while_committed", "children_after_callback"), 0
    ))  # fmt: skip

    @property
    def callback_enqueued(self) -> bool:
        return any(self.state.values())

    def status(self) -> dict:
        status = {
            "bid": self.bid,
            "description": self.description,
            "created_at": self.created_at,
            "total": len(self.members),
            "pending": len(self.members - self.acked),
            "failed": self.failed,
            "complete_st": self.state["complete"],
            "success_st": self.state["success"],
        }
        if self.parent:
            status["parent_bid"] = self.parent
        return status


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    line = await reader.readuntil(b"\r\n")
    if line.startswith(b"$") and line != b"$-1\r\n":
        line += await reader.readexactly(int(line[1:-2]) + 2)
    return line


def bulk(text: str) -> bytes:
    data = text.encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


def error(message: str) -> bytes:
    return f"-ERR {message}\r\n".encode()


class Standin:
    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.host, self.port, self.password = parts.hostname, parts.port or 7419, parts.password or ""
        self.batches: dict[str, Batch] = {}
        self.member_of: dict[str, str] = {}  # jid -> bid
        self.callback_of: dict[str, tuple[str, str]] = {}  # callback jid -> (bid, kind)
        self._control: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._control_lock = asyncio.Lock()

    async def dial(self, hello: bytes | None = None):
        """An upstream connection; with `hello=None`, the stand-in's own authenticated one."""
        reader, writer = await asyncio.open_connection(self.host, self.port)
        greeting = await read_reply(reader)
        if hello is None:
            hi = json.loads(greeting[4:-2])
            payload = {"v": 2}
            if "s" in hi:
                digest = (self.password + hi["s"]).encode()
                for _ in range(hi["i"]):
                    digest = hashlib.sha256(digest).digest()
                payload["pwdhash"] = digest.hex()
            writer.write(b"HELLO " + json.dumps(payload).encode() + b"\r\n")
            assert await read_reply(reader) == b"+OK\r\n"
        return reader, writer, greeting

    # --- per client -----------------------------------------------------------------------------

    async def serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w, greeting = await self.dial(hello=b"relayed")
        except OSError:
            client_w.close()
            return
        client_w.write(greeting)
        try:
            while line := await client_r.readline():
                verb, _, rest = line.rstrip(b"\r\n").partition(b" ")
                if verb == b"BATCH":
                    client_w.write(await self.batch(rest.decode()))
                elif verb == b"STANDIN":
                    client_w.write(bulk(json.dumps({"batches": {b: self.report(b) for b in self.batches}})))
                elif verb == b"END":
                    up_w.write(line)
                    break
                else:
                    joining = self.joining(verb, rest)  # judged as the line arrives
                    up_w.write(line)
                    reply = await read_reply(up_r)
                    client_w.write(reply)
                    await self.after(verb, rest, reply, joining)
                await client_w.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            up_w.close()
            client_w.close()

    def report(self, bid: str) -> dict:
        batch = self.batches[bid]
        return {"committed": batch.committed, "complete_st": batch.state["complete"],
                "success_st": batch.state["success"], "total": len(batch.members), **batch.audit}  # fmt: skip

    # --- membership and execution ---------------------------------------------------------------

    def joining(self, verb: bytes, rest: bytes) -> list[tuple[dict, Batch, bool, bool]]:
        """Jobs of this PUSH/PUSHB that name a known batch, with that batch's state right now."""
        if verb not in (b"PUSH", b"PUSHB"):
            return []
        try:
            payload = json.loads(rest)
        except ValueError:
            return []
        jobs = payload if isinstance(payload, list) else [payload]
        found = []
        for job in jobs:
            bid = (job.get("custom") or {}).get("bid") if isinstance(job, dict) else None
            if bid in self.batches:
                batch = self.batches[bid]
                found.append((job, batch, batch.committed, batch.callback_enqueued))
        return found

    async def after(self, verb: bytes, rest: bytes, reply: bytes, joining: list) -> None:
        if joining:
            refused = {}
            if verb == b"PUSHB" and reply.startswith(b"$"):
                refused = json.loads(reply.split(b"\r\n", 1)[1])
            elif reply != b"+OK\r\n":
                return
            for job, batch, was_committed, was_fired in joining:
                if job.get("jid") in refused:
                    continue
                batch.members.add(job["jid"])
                self.member_of[job["jid"]] = batch.bid
                batch.audit["joined_while_committed"] += was_committed
                batch.audit["joined_after_callback"] += was_fired
        elif verb in (b"ACK", b"FAIL") and reply == b"+OK\r\n":
            try:
                jid = json.loads(rest).get("jid")
            except ValueError:
                return
            if jid in self.callback_of and verb == b"ACK":
                bid, kind = self.callback_of.pop(jid)
                self.batches[bid].state[kind] = "2"
                await self.evaluate(bid)
            elif jid in self.member_of:
                batch = self.batches[self.member_of[jid]]
                if verb == b"FAIL" and jid not in batch.ran:
                    batch.failed += 1
                batch.ran.add(jid)
                if verb == b"ACK":
                    batch.acked.add(jid)
                await self.evaluate(batch.bid)

    # --- BATCH ------------------------------------------------------------------------------------

    async def batch(self, text: str) -> bytes:
        sub, _, arg = text.partition(" ")
        if sub == "NEW":
            try:
                spec = json.loads(arg)
            except ValueError as exc:
                return error(f"invalid JSON: {exc}")
            callbacks = {k: spec[k] for k in ("complete", "success") if spec.get(k)}
            if not callbacks:
                return error("batch must have a success or complete callback")
            parent = spec.get("parent_bid") or None
            if parent and parent not in self.batches:
                return error(f"no such batch {parent}")
            bid = "b-" + secrets.token_urlsafe(12)[:16]
            created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            self.batches[bid] = Batch(bid, parent, spec.get("description", ""), callbacks, created)
            if parent:
                owner = self.batches[parent]
                owner.children.append(bid)
                owner.audit["children_while_committed"] += owner.committed
                owner.audit["children_after_callback"] += owner.callback_enqueued
            return bulk(bid)
        batch = self.batches.get(arg)
        if sub not in ("OPEN", "COMMIT", "STATUS"):
            return error(f"unknown BATCH subcommand {sub}")
        if batch is None:
            return error(f"no such batch {arg}")
        if sub == "OPEN":
            batch.committed = False  # permissive, as Ent is: no questions asked
            return bulk(batch.bid)
        if sub == "COMMIT":
            batch.committed = True
            await self.evaluate(batch.bid)
            return b"+OK\r\n"
        return bulk(json.dumps(batch.status()))

    # --- callbacks --------------------------------------------------------------------------------

    def complete_done(self, batch: Batch) -> bool:
        """What a parent waits for: the child's complete callback finished, or it needs none."""
        if "complete" in batch.callbacks:
            return batch.state["complete"] == "2"
        return self.may_complete(batch)

    def success_done(self, batch: Batch) -> bool:
        if "success" in batch.callbacks:
            return batch.state["success"] == "2"
        return self.may_succeed(batch)

    def may_complete(self, batch: Batch) -> bool:
        children = [self.batches[c] for c in batch.children]
        return batch.committed and batch.ran >= batch.members and all(map(self.complete_done, children))

    def may_succeed(self, batch: Batch) -> bool:
        children = [self.batches[c] for c in batch.children]
        own_complete = "complete" not in batch.callbacks or batch.state["complete"] == "2"
        return (batch.committed and batch.acked >= batch.members and own_complete
                and all(map(self.success_done, children)))  # fmt: skip

    async def evaluate(self, bid: str | None) -> None:
        """Fire what is due for this batch, then look at its parent, whose wait may be over."""
        while bid:
            batch = self.batches[bid]
            if "complete" in batch.callbacks and not batch.state["complete"] and self.may_complete(batch):
                await self.fire(batch, "complete")
            if "success" in batch.callbacks and not batch.state["success"] and self.may_succeed(batch):
                await self.fire(batch, "success")
            bid = batch.parent

    async def fire(self, batch: Batch, kind: str) -> None:
        spec = batch.callbacks[kind]
        job = {**spec, "jid": spec.get("jid") or uuid.uuid4().hex[:16], "args": spec.get("args") or [],
               "queue": spec.get("queue") or "default"}  # fmt: skip
        job["custom"] = {**(spec.get("custom") or {}), "_bid": batch.bid, "_cb": kind}
        if batch.parent:
            job["custom"]["_pbid"] = batch.parent
        batch.state[kind] = "1"
        self.callback_of[job["jid"]] = (batch.bid, kind)
        async with self._control_lock:
            if self._control is None:
                self._control = (await self.dial())[:2]
            reader, writer = self._control
            writer.write(b"PUSH " + json.dumps(job).encode() + b"\r\n")
            reply = await read_reply(reader)
        assert reply == b"+OK\r\n", reply


class StandinProcess(Process):
    """The stand-in as a separate process, like the real server it stands in for."""

    def __init__(self, upstream: str):
        self.port = free_port()
        self.upstream = upstream
        argv = [sys.executable, "-m", "tests.support.ent_standin",
                "--listen", f"127.0.0.1:{self.port}", "--upstream", upstream]  # fmt: skip
        super().__init__(argv, cwd=str(REPO))

    def start(self) -> StandinProcess:
        super().start()
        self.wait_for_line("standin listening")
        return self

    @property
    def url(self) -> str:
        parts = urlsplit(self.upstream)
        auth = f":{parts.password}@" if parts.password else ""
        return f"tcp://{auth}127.0.0.1:{self.port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    host, port = args.listen.rsplit(":", 1)
    standin = Standin(args.upstream)

    async def run() -> None:
        server = await asyncio.start_server(standin.serve, host, int(port), limit=64 * 2**20)
        print(f"standin listening on {args.listen}", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(run())


if __name__ == "__main__":
    main()
