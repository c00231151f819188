"""CPU per chat message of xmppd's own Python, connection layer included, no sockets.

usage: python bench/conn_path.py [--users N] [--messages M] [--repeat R] [--batch B]

A real node (`Server` with the bench's module set, SQLite in a temporary
folder) and N real `C2SConnection`s on fake transports (direct TLS assumed,
so no handshake): each logs in with SASL PLAIN, binds and sends initial
presence as bench/chatload.py's users do. Then M chat messages, each from a
random user to another one's bare JID, are handed to the sender's
connection one read at a time (or B per read), and the event loop runs one
iteration after each read, so the recipients' flushes run as on a server
that is not saturated. Prints the process CPU time per message, best of R.

What it leaves out on purpose: TLS, the socket syscalls and uvloop's
transports (the rest of the whole-process profile, docs/bench.md). What it
keeps: everything xmppd's Python does per read and per write, over as many
connections as the live benchmark, so the A/B comparison of a change to
that path is deterministic enough on a busy machine where the live
benchmark's CPU per message moves with the batching the machine allows.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from xmppd.config import load_config
from xmppd.connection import C2SConnection
from xmppd.server import Server

DOMAIN = "bench.local"
MODULES = (
    "disco ping version time roster presence carbons blocking privacy private vcard offline last"
)
HEADER = (
    f"<?xml version='1.0'?><stream:stream xmlns='jabber:client' to='{DOMAIN}' "
    "xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
).encode()


class FakeTransport:
    """What C2SConnection uses of an asyncio transport; written bytes are only counted."""

    def __init__(self) -> None:
        self.written = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        """Nothing to pause: the bench feeds the connection itself."""

    def resume_reading(self) -> None:
        """See pause_reading."""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


def write_config(folder: Path) -> Path:
    here = Path(__file__).resolve().parent.parent / "modules"
    modules = "".join(f"  {m}: {{}}\n" for m in MODULES.split() if (here / f"{m}.py").exists())
    path = folder / "xmppd.yml"
    path.write_text(
        f"hosts: [{DOMAIN}]\ndata_dir: {folder}/data\nlog_level: warning\n"
        "listeners:\n  - type: starttls\n    address: 127.0.0.1\n    port: 0\n"
        "admin:\n  port: 0\n"
        "limits:\n  max_connections_per_ip: 0\n"
        "auth:\n  mechanisms: [PLAIN]\n  scram_iterations: 4096\n"
        f"modules:\n{modules}"
    )
    return path


async def until(predicate: Any, what: str) -> None:
    for _ in range(3000):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise SystemExit(f"timed out waiting for {what}")


async def login(server: Server, n: int) -> C2SConnection:
    conn = C2SConnection(server, direct_tls=True)
    conn.connection_made(FakeTransport())  # type: ignore[arg-type]
    conn.data_received(HEADER)
    token = base64.b64encode(f"\0user{n}\0pass{n}".encode()).decode()
    conn.data_received(
        f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{token}</auth>".encode()
    )
    await until(lambda: conn.stream.authenticated, "authentication")
    conn.data_received(HEADER)
    conn.data_received(
        b"<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
        b"<resource>r</resource></bind></iq>"
    )
    await until(lambda: conn.session is not None, "bind")
    conn.data_received(b"<presence/>")
    await until(lambda: conn.session is not None and conn.session.available, "presence")
    return conn


def feed(reads: list[tuple[C2SConnection, bytes]]) -> asyncio.Future[None]:
    """Each read in a loop iteration of its own, as uvloop calls buffer_updated; the
    flushes a read schedules run before the next read (call_soon is FIFO)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    it = iter(reads)

    def step() -> None:
        for conn, data in it:
            conn.data_received(data)
            loop.call_soon(step)
            return
        done.set_result(None)

    loop.call_soon(step)
    return done


async def run(args: argparse.Namespace) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(load_config(write_config(Path(tmp))))
        await server.start()
        try:
            accounts = server.accounts[DOMAIN]
            for n in range(1, args.users + 1):
                await accounts.register(f"user{n}", f"pass{n}")
            conns = [await login(server, n) for n in range(1, args.users + 1)]
            await server.router.drain()
            rng = random.Random(1)
            body = "x" * 64
            plan = []
            for i in range(args.messages):
                a = rng.randrange(args.users)
                b = rng.randrange(args.users - 1)
                b += b >= a
                plan.append((conns[a], (
                    f"<message type='chat' to='user{b + 1}@{DOMAIN}' id='{i}'>"
                    f"<body>chatload:{i}:{body}</body></message>"
                ).encode()))
            results = []
            for _ in range(args.repeat + 1):  # the first pass warms caches and lists up
                delivered = server.router.ledger.delivered
                reads = [
                    (plan[i][0], b"".join(d for _, d in plan[i : i + args.batch]))
                    for i in range(0, len(plan), args.batch)
                ]
                start = time.process_time()
                await feed(reads)
                elapsed = time.process_time() - start
                got = server.router.ledger.delivered - delivered
                assert got == len(plan), (got, len(plan))
                results.append(elapsed / got * 1e6)
            return results[1:]
        finally:
            await server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=30000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, help="messages per read (default 1)")
    args = parser.parse_args(argv)
    results = uvloop.run(run(args))
    sys.stdout.write(
        f"conn_path: {args.users} users, {args.messages} messages, {args.batch} per read: "
        f"us CPU per message {' '.join(f'{r:.2f}' for r in results)} (best {min(results):.2f})\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
