"""A load generator that accounts for every message it sends: run as its own process.

Many clients log in over direct TLS and send numbered chat messages to each
other as fast as the server takes them (`drain()` is the only pacing, so the
server's TCP backpressure is what slows a sender). Each message's id names
its sender and number, so the receiving side can say exactly which messages
arrived, how often, live or from offline storage (a <delay/>), or came back
as an error. Some clients leave midway and come back at the end to collect
what was stored for them; some messages go to an account that does not
exist and must bounce.

It runs in a process of its own so that the server under test, in the
test's process, has a core to itself and really falls behind. It reads its
plan as JSON on stdin and writes its account of the run as JSON on stdout.
A client that closes its stream reads on until the server closes too (RFC
6120 section 4.4), so a message the server wrote before it saw the close is
still counted.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import ssl
import sys
from dataclasses import dataclass, field
from typing import Any

from lxml import etree

HEADER = (
    "<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
    "xmlns:stream='http://etherx.jabber.org/streams' to='{host}' version='1.0'>"
)
DELAY = "{urn:xmpp:delay}delay"


@dataclass
class Plan:
    port: int
    host: str
    users: dict[str, str]  # name -> password
    messages_per_user: int
    leavers: list[str]  # leave after sending half of their messages, come back at the end
    ghost: str  # a name with no account: messages to it bounce
    ghost_every: int  # every Nth message goes to the ghost
    seed: int = 1


@dataclass
class Account:
    """What one user saw: ids of messages received live, from offline storage, as errors."""

    live: list[str] = field(default_factory=list)
    delayed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    sent: dict[str, str] = field(default_factory=dict)  # id -> recipient name


class Connection:
    def __init__(self, plan: Plan, name: str, account: Account) -> None:
        self.plan = plan
        self.name = name
        self.account = account
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter
        self._parser = etree.XMLPullParser(events=("start", "end"))
        self._depth = 0
        self._stanzas: asyncio.Queue[etree._Element | None] = asyncio.Queue()  # None: EOF
        self._reading: asyncio.Task[None] | None = None

    async def open(self) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        self.reader, self.writer = await asyncio.open_connection(
            "127.0.0.1", self.plan.port, ssl=ctx, server_hostname=self.plan.host
        )
        self._reading = asyncio.ensure_future(self._read())
        token = base64.b64encode(f"\0{self.name}\0{self.plan.users[self.name]}".encode())
        await self._send(HEADER.format(host=self.plan.host))
        await self._expect("features")
        await self._send(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
            f"{token.decode()}</auth>"
        )
        await self._expect("success")
        self._parser = etree.XMLPullParser(events=("start", "end"))
        self._depth = 0
        await self._send(HEADER.format(host=self.plan.host))
        await self._expect("features")
        await self._send(
            "<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
            "<resource>load</resource></bind></iq>"
        )
        await self._expect("iq")
        await self._send("<presence/>")
        await self._expect("presence")  # our own echo: we are available (RFC 6121 4.2.2)

    async def _send(self, data: str) -> None:
        self.writer.write(data.encode())
        await self.writer.drain()

    async def _expect(self, local: str) -> etree._Element:
        while True:
            element = await asyncio.wait_for(self._stanzas.get(), 30)
            if element is None:
                raise EOFError(f"{self.name}: the server closed the stream awaiting <{local}/>")
            if etree.QName(element).localname == local:
                return element
            if etree.QName(element).localname == "failure":
                raise RuntimeError(f"{self.name}: {etree.tostring(element)!r}")

    async def _read(self) -> None:
        while chunk := await self.reader.read(65536):
            self._parser.feed(chunk)
            for event, element in self._parser.read_events():
                if event == "start":
                    self._depth += 1
                    continue
                self._depth -= 1
                if self._depth == 1:
                    self._take(element)
                    element.getparent().remove(element)
        self._stanzas.put_nowait(None)  # read() gives b"" for ever now: tell _expect

    def _take(self, element: etree._Element) -> None:
        if etree.QName(element).localname != "message":
            self._stanzas.put_nowait(element)
            return
        id_ = element.get("id", "")
        if element.get("type") == "error":
            self.account.errors.append(id_)
        elif element.find(DELAY) is not None:
            self.account.delayed.append(id_)
        else:
            self.account.live.append(id_)

    async def send_messages(self, ids: list[tuple[str, str]]) -> None:
        for number, (id_, to) in enumerate(ids):
            self.account.sent[id_] = to
            self.writer.write(
                f"<message type='chat' to='{to}@{self.plan.host}' id='{id_}'>"
                f"<body>{id_}</body></message>".encode()
            )
            if number % 16 == 15:
                await self.writer.drain()
        await self.writer.drain()

    async def close(self) -> None:
        """Close our stream and read until the server has closed its own."""
        self.writer.write(b"</stream:stream>")
        await self.writer.drain()
        assert self._reading is not None
        await asyncio.wait_for(self._reading, 30)
        self.writer.close()


async def run(plan: Plan) -> dict[str, Any]:
    rng = random.Random(plan.seed)
    accounts = {name: Account() for name in plan.users}
    names = sorted(plan.users)
    connections = {name: Connection(plan, name, accounts[name]) for name in names}
    await asyncio.gather(*(c.open() for c in connections.values()))

    def ids_for(name: str, first: int, last: int) -> list[tuple[str, str]]:
        out = []
        # A leaver sends nothing to the ghost: the bounce could come back after it left,
        # and an error to a full JID with no session is dropped (RFC 6121 8.5.3.2.1).
        bounces = plan.ghost_every and name not in plan.leavers
        for n in range(first, last):
            if bounces and n % plan.ghost_every == plan.ghost_every - 1:
                to = plan.ghost
            else:
                to = rng.choice([other for other in names if other != name])
            out.append((f"{name}-{n}", to))
        return out

    half = plan.messages_per_user // 2
    await asyncio.gather(*(c.send_messages(ids_for(n, 0, half)) for n, c in connections.items()))
    leaving = [connections[name] for name in plan.leavers]
    await asyncio.gather(*(c.close() for c in leaving))
    staying = {n: c for n, c in connections.items() if n not in plan.leavers}
    await asyncio.gather(
        *(c.send_messages(ids_for(n, half, plan.messages_per_user)) for n, c in staying.items())
    )
    # The leavers come back and collect what was stored for them.
    back = {name: Connection(plan, name, accounts[name]) for name in plan.leavers}
    await asyncio.gather(*(c.open() for c in back.values()))
    await settled(accounts, plan.ghost)
    await asyncio.gather(*(c.close() for c in [*staying.values(), *back.values()]))
    return {
        name: {
            "sent": a.sent,
            "live": a.live,
            "delayed": a.delayed,
            "errors": a.errors,
        }
        for name, a in accounts.items()
    }


async def settled(accounts: dict[str, Account], ghost: str, timeout: float = 30) -> None:
    """Until every message sent has been seen somewhere, or `timeout` (a loss: reported)."""
    expected = {
        (to if to != ghost else sender, id_)
        for sender, account in accounts.items()
        for id_, to in account.sent.items()
    }
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        seen = {
            (name, id_)
            for name, a in accounts.items()
            for id_ in (*a.live, *a.delayed, *a.errors)
        }
        if expected <= seen:
            return
        await asyncio.sleep(0.05)


def main() -> None:
    plan = Plan(**json.load(sys.stdin))
    json.dump(asyncio.run(run(plan)), sys.stdout)


if __name__ == "__main__":
    main()
