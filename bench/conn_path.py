"""CPU per chat message of xmppd's own Python, connection layer included, no sockets.

usage: python bench/conn_path.py [--users N] [--messages M] [--repeat R] [--batch B]
                                 [--per-turn K] [--tls]

A real node (`Server` with the bench's module set, SQLite in a temporary
folder) and N real `C2SConnection`s on fake transports (direct TLS assumed,
so no handshake): each logs in with SASL PLAIN, binds and sends initial
presence as bench/chatload.py's users do. Then M chat messages, each from a
random user to another one's bare JID, are handed to the sender's
connection one read at a time (or B per read), and the event loop (the
server's own, with no window) runs one iteration after each read, so the
recipients' flushes run as on a server that is not saturated; with
--per-turn K, after every K reads from K senders, as on a busy server whose
batch window gathered them. Prints the process CPU time per message, best
of R.

What it leaves out on purpose: TLS, the socket syscalls and uvloop's
transports (the rest of the whole-process profile, docs/bench.md). What it
keeps: everything xmppd's Python does per read and per write, over as many
connections as the live benchmark, so the A/B comparison of a change to
that path is deterministic enough on a busy machine where the live
benchmark's CPU per message moves with the batching the machine allows.

With --tls the same messages go over real loopback TCP connections to a
direct TLS listener, so the transport is in (uvloop, TLS records, socket
syscalls, the kernel's loopback TCP): the users log in over TLS 1.3, each
message is encrypted by its sender's client-side `ssl.SSLObject` before the
timing starts, and in the timed part the bench only sends each message's
record with one `send()` and lets the loop run until the server has
written the delivery (the ledger's `written` count); nothing is read on the
client side (30,000 deliveries fit in the sockets' buffers). So the time is
the server's whole per-message work plus one client `send()`, with one read
per loop iteration as above: comparable between two builds of the
transport, which plain conn_path cannot see.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import random
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from xmppd.batchloop import BatchingLoop
from xmppd.config import load_config
from xmppd.connection import C2SConnection
from xmppd.ledger import MessageLedger
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
        "listeners:\n  - type: direct_tls\n    address: 127.0.0.1\n    port: 0\n"
        "    backlog: 4096\n"
        "admin:\n  port: 0\n"
        "limits:\n  max_connections_per_ip: 0\n"
        "auth:\n  mechanisms: [PLAIN]\n  scram_iterations: 4096\n"
        f"modules:\n{modules}"
    )
    return path


@asynccontextmanager
async def node(users: int) -> AsyncIterator[Server]:
    """A node with the bench's config in a temporary folder, user1..user`users`
    registered; stopped after the block."""
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(load_config(write_config(Path(tmp))))
        await server.start()
        try:
            accounts = server.accounts[DOMAIN]
            for n in range(1, users + 1):
                await accounts.register(f"user{n}", f"pass{n}")
            yield server
        finally:
            await server.stop()


Sender = TypeVar("Sender")


def chat_plan(senders: list[Sender], messages: int) -> list[tuple[Sender, bytes]]:
    """`messages` chat messages, each from a random sender to another user's bare JID
    (the same ones every run: a fixed seed)."""
    users = len(senders)
    rng = random.Random(1)
    body = "x" * 64
    plan = []
    for i in range(messages):
        a = rng.randrange(users)
        b = rng.randrange(users - 1)
        b += b >= a
        plan.append((senders[a], (
            f"<message type='chat' to='user{b + 1}@{DOMAIN}' id='{i}'>"
            f"<body>chatload:{i}:{body}</body></message>"
        ).encode()))
    return plan


async def cpu_per_message(
    server: Server, count: int, repeat: int, ready: Callable[[], Callable[[], Awaitable[None]]]
) -> list[float]:
    """The process CPU microseconds per delivered message of `repeat` passes, after one
    that warms caches and lists up. `ready()` makes a pass's `count` messages ready
    outside the timing and returns what sends them, which is timed."""
    results = []
    for _ in range(repeat + 1):
        send = ready()
        delivered = server.router.ledger.delivered
        start = time.process_time()
        await send()
        elapsed = time.process_time() - start
        got = server.router.ledger.delivered - delivered
        assert got == count, (got, count)
        results.append(elapsed / got * 1e6)
    return results[1:]


async def until(predicate: Any, what: str) -> None:
    for _ in range(3000):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise SystemExit(f"timed out waiting for {what}")


def login_steps(n: int) -> list[bytes]:
    token = base64.b64encode(f"\0user{n}\0pass{n}".encode()).decode()
    return [
        HEADER,
        f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{token}</auth>".encode(),
        HEADER,
        b"<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
        b"<resource>r</resource></bind></iq>",
        b"<presence/>",
    ]


class PlainConnection(C2SConnection):
    """A direct TLS stream whose handshake is taken as done: without --tls, conn_path
    measures what xmppd does above TLS, on a transport that only counts bytes."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._tls = None
        self._open()


async def login(server: Server, n: int) -> C2SConnection:
    conn = PlainConnection(server, direct_tls=True)
    conn.connection_made(FakeTransport())  # type: ignore[arg-type]
    header, auth, header2, bind, presence = login_steps(n)
    conn.data_received(header)
    conn.data_received(auth)
    await until(lambda: conn.stream.authenticated, "authentication")
    conn.data_received(header2)
    conn.data_received(bind)
    await until(lambda: conn.session is not None, "bind")
    conn.data_received(presence)
    await until(lambda: conn.session is not None and conn.session.available, "presence")
    return conn


class TLSClient:
    """One user over a real loopback socket, TLS done by hand on memory BIOs so that
    its records can be made before the timed part and sent with one send() each."""

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = self.context.wrap_bio(self.incoming, self.outgoing, server_side=False)
        self.text = b""

    async def pump(self) -> None:
        """Send what TLS has for the server, then wait for and take in its answer."""
        loop = asyncio.get_running_loop()
        out = self.outgoing.read()
        if out:
            await loop.sock_sendall(self.sock, out)
        data = await loop.sock_recv(self.sock, 65536)
        if not data:
            raise SystemExit("the server closed a connection during login")
        self.incoming.write(data)
        while True:
            try:
                self.text += self.tls.read(65536)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                return

    async def until(self, marker: bytes) -> None:
        while marker not in self.text:
            await self.pump()
        self.text = b""

    def record(self, data: bytes) -> bytes:
        self.tls.write(data)
        return self.outgoing.read()


async def tls_login(port: int, n: int) -> TLSClient:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    client = TLSClient(sock)
    while True:
        try:
            client.tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            await client.pump()
    header, auth, header2, bind, presence = login_steps(n)
    for data, marker in ((header, b"</stream:features>"), (auth, b"<success"),
                         (header2, b"</stream:features>"), (bind, b"</iq>")):
        await loop.sock_sendall(sock, client.record(data))
        await client.until(marker)
    await loop.sock_sendall(sock, client.record(presence))
    return client


def drain(clients: list[TLSClient]) -> None:
    """Read and drop what the server sent (presence, tickets): empty buffers to start."""
    for client in clients:
        while True:
            try:
                if not client.sock.recv(65536):
                    break
            except BlockingIOError:
                break


class WatchedLedger(MessageLedger):
    """The server's ledger, calling `hook` when a delivery is written to a transport:
    the bench waits for that in epoll, not by spinning the loop (which would count)."""

    __slots__ = ("_written", "hook")

    def __init__(self) -> None:
        self._written = 0
        self.hook: Any = None
        super().__init__()

    @property  # type: ignore[override]
    def written(self) -> int:
        return self._written

    @written.setter
    def written(self, value: int) -> None:
        self._written = value
        if self.hook is not None:
            self.hook()


def send_each(
    reads: list[tuple[socket.socket, bytes]], ledger: WatchedLedger
) -> asyncio.Future[None]:
    """Send each record, then wait until the server has written its delivery before
    the next: one read per loop iteration, as feed() does without sockets."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    it = iter(reads)

    def step() -> None:
        for sock, data in it:
            sock.send(data)
            return
        ledger.hook = None
        done.set_result(None)

    ledger.hook = lambda: loop.call_soon(step)
    step()
    return done


async def run_tls(args: argparse.Namespace) -> list[float]:
    async with node(args.users) as server:
        port = server.listening[0].port
        # Before the clients connect: each connection keeps the ledger it found.
        ledger = server.router.ledger = WatchedLedger()
        clients = [await tls_login(port, n) for n in range(1, args.users + 1)]
        await until(
            lambda: sum(1 for c in server.connections
                        if c.session is not None and c.session.available) == args.users,
            "presence",
        )
        await server.router.drain()
        await asyncio.sleep(0.2)
        plan = chat_plan(clients, args.messages)

        def ready() -> Callable[[], Awaitable[None]]:
            drain(clients)
            reads = [(c.sock, c.record(data)) for c, data in plan]
            return lambda: send_each(reads, ledger)

        results = await cpu_per_message(server, len(plan), args.repeat, ready)
        for c in clients:
            c.sock.close()
        return results


def feed(reads: list[tuple[C2SConnection, bytes]], per_turn: int) -> asyncio.Future[None]:
    """`per_turn` reads in each loop iteration, as uvloop hands a busy server the
    reads of that many connections at once; the flushes they schedule run before
    the next iteration's reads (call_soon is FIFO)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    it = iter(reads)
    left = len(reads)

    def step() -> None:
        nonlocal left
        for conn, data in itertools.islice(it, per_turn):
            conn.data_received(data)
        left -= per_turn
        if left > 0:
            loop.call_soon(step)
        else:
            done.set_result(None)

    loop.call_soon(step)
    return done


async def run(args: argparse.Namespace) -> list[float]:
    async with node(args.users) as server:
        conns = [await login(server, n) for n in range(1, args.users + 1)]
        await server.router.drain()
        plan = chat_plan(conns, args.messages)

        def ready() -> Callable[[], Awaitable[None]]:
            reads = [
                (plan[i][0], b"".join(d for _, d in plan[i : i + args.batch]))
                for i in range(0, len(plan), args.batch)
            ]
            return lambda: feed(reads, args.per_turn)

        return await cpu_per_message(server, len(plan), args.repeat, ready)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=30000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, help="messages per read (default 1)")
    parser.add_argument(
        "--per-turn", type=int, default=1,
        help="reads per loop iteration, from as many senders (default 1; a busy server's "
        "batch window gathers dozens)",
    )
    parser.add_argument("--tls", action="store_true", help="over loopback TLS (see above)")
    args = parser.parse_args(argv)
    if args.per_turn < 1 or args.batch < 1:
        parser.error("--per-turn and --batch take 1 or more")
    # The server's own loop (xmppd.cli.serve), with no window: its call_soon is counted.
    with asyncio.Runner(loop_factory=lambda: BatchingLoop(0.0)) as runner:
        results = runner.run(run_tls(args) if args.tls else run(args))
    how = "over TLS" if args.tls else f"{args.batch} per read, {args.per_turn} reads per turn"
    sys.stdout.write(
        f"conn_path: {args.users} users, {args.messages} messages, {how}: "
        f"us CPU per message {' '.join(f'{r:.2f}' for r in results)} (best {min(results):.2f})\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
