"""Drain a node under chat load, behind a real load balancer (HAProxy, TCP mode, round
robin) in front of three nodes sharing a real Redis: its clients resume on the others
through the balancer, and every message sent is delivered or stored offline.

Receivers speak XEP-0198 over raw TLS through HAProxy; they answer <r/>, and when their
connection drops they reconnect through HAProxy and resume. One sender, connected to a
node that stays, sends each receiver numbered messages throughout.
"""

from __future__ import annotations

import asyncio
import base64
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests.integration.clients import HEADER, RawClient, insecure_context
from tests.integration.conftest import StartServer, port_of
from tests.integration.haproxy import Balancers, free_port
from tests.integration.test_cluster import until
from tests.integration.test_sm_cluster import cluster
from tests.integration.test_stream_management import SASL, SM, Stream, message, sm_module
from tests.storage.services import service_factory, unavailable  # noqa: F401  (fixture)
from xmppd.server import Server
from xmppd.storage.devservices import LocalService

pytestmark = pytest.mark.timeout(90)

C = "{jabber:client}"
RECEIVERS = [f"r{n}" for n in range(6)]
PASSWORD = "secret-pass"
MESSAGES_EACH = 60


@pytest.fixture
async def haproxy(tmp_path: Path) -> AsyncIterator[Any]:
    balancers = Balancers(tmp_path)

    async def start(ports: list[int]) -> int:
        """HAProxy in front of these direct TLS ports (a node may start there later)."""
        servers = "\n".join(
            f"    server n{i} 127.0.0.1:{node} check inter 100 fall 1 rise 1"
            for i, node in enumerate(ports)
        )
        return await balancers.start(
            f"    balance roundrobin\n{servers}", "    retries 3\n    option redispatch\n"
        )

    yield start
    await balancers.stop()


async def login_at(port: int, user: str, resource: str | None = None) -> Stream:
    """Authenticated through the balancer; bound to `resource` unless None."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=insecure_context(), server_hostname="localhost"
    )
    raw = RawClient(reader, writer)
    await raw.send(HEADER)
    await raw.read_until(b"</stream:features>")
    token = base64.b64encode(f"\0{user}\0{PASSWORD}".encode()).decode()
    await raw.send(f"<auth xmlns='{SASL}' mechanism='PLAIN'>{token}</auth>")
    await raw.read_until(b"<success")
    await raw.send(HEADER)
    features = await raw.read_until(b"</stream:features>")
    stream = Stream(raw, features)
    if resource is not None:
        await stream.send(
            "<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
            f"<resource>{resource}</resource></bind></iq>"
        )
        await stream.next("bind")
    return stream


class Receiver:
    """An XEP-0198 client: counts what it handles, acks on request, resumes on a drop."""

    def __init__(self, port: int, user: str) -> None:
        self.port = port
        self.user = user
        self.bodies: list[str] = []
        self.handled = 0
        self.resumed = 0
        self.failed: list[str] = []
        self.done = asyncio.Event()
        self.stream: Stream | None = None
        self.previd = ""

    async def start(self) -> None:
        self.stream = await login_at(self.port, self.user, "phone")
        self.previd = (await self.stream.enable()).get("id", "")
        await self.stream.send("<presence/>")

    async def run(self) -> None:
        assert self.stream is not None
        while not self.done.is_set():
            try:
                element = await self.stream.next("", timeout=30)
            except EOFError:
                await self._resume()
                continue
            tag = element.tag
            if tag in (f"{C}message", f"{C}presence", f"{C}iq"):
                self.handled += 1
                body = element.findtext(f"{C}body")
                if body == "end":
                    self.done.set()
                elif body is not None:
                    self.bodies.append(body)
            elif tag == f"{{{SM}}}r":
                await self.stream.send(f"<a xmlns='{SM}' h='{self.handled}'/>")

    async def _resume(self) -> None:
        for _ in range(20):
            try:
                stream = await login_at(self.port, self.user)
                await stream.send(
                    f"<resume xmlns='{SM}' previd='{self.previd}' h='{self.handled}'/>"
                )
                answer = await stream.next(SM)
            except (OSError, EOFError, TimeoutError):
                continue  # the balancer sent us to the node going away: again
            if etree.QName(answer).localname != "resumed":
                self.failed.append(etree.tostring(answer).decode())
                self.done.set()
                return
            self.resumed += 1
            self.stream = stream
            return
        self.failed.append("no node took the resumption")
        self.done.set()


async def test_drain_a_node_under_load_behind_haproxy(
    redis_service: LocalService,
    start_server: StartServer,
    haproxy: Any,
    storage_section: dict[str, Any] | None,
) -> None:
    users = {name: PASSWORD for name in [*RECEIVERS, "sender"]}
    extra: dict[str, Any] = {}
    if storage_section is None:
        # Three nodes on one embedded store: no in-process cache (each would be stale).
        extra["storage"] = {"cache": {"backend": "none"}}
    nodes = [
        await start_server(
            users=users if i == 0 else {}, cluster=cluster(redis_service, f"node-{i}"), **extra
        )
        for i in range(3)
    ]
    doomed, sender_node = nodes[0], nodes[2]
    port = await haproxy([port_of(node, "direct_tls") for node in nodes])
    receivers = [Receiver(port, user) for user in RECEIVERS]
    for receiver in receivers:
        await receiver.start()
    for receiver in receivers:
        await until(
            lambda r=receiver: sender_node.router.directory.get(f"{r.user}@localhost", "phone")
            is not None
        )
    on_doomed = sum(1 for r in RECEIVERS if doomed.router.directory.local.get(  # type: ignore[attr-defined]
        f"{r}@localhost", "phone") is not None)
    assert on_doomed >= 1  # round robin put some of them on the node to drain
    tasks = [asyncio.create_task(r.run()) for r in receivers]
    sender = await login_at(port_of(sender_node, "direct_tls"), "sender", "desk")
    sent: list[str] = []
    drained: asyncio.Task[None] | None = None
    for n in range(MESSAGES_EACH):
        for user in RECEIVERS:
            body = f"{user}-{n}"
            await sender.send(message(f"{user}@localhost/phone", body))
            sent.append(body)
        if n == MESSAGES_EACH // 3:
            drained = asyncio.create_task(doomed.stop())  # SIGTERM / xmppctl drain
        await asyncio.sleep(0.01)  # a steady chat rate, not a wait for anything
    assert drained is not None
    await drained
    await finish(receivers, sender, tasks)
    assert sum(r.resumed for r in receivers) == on_doomed
    assert sm_module(doomed).stats.handed_over == on_doomed

    lost = await lost_messages(port, receivers, nodes, sent, sender_node)
    assert lost == []


async def finish(receivers: list[Receiver], sender: Stream, tasks: list[Any]) -> None:
    """The sender's last word to each receiver; every receiver got it (live or resumed)."""
    for user in RECEIVERS:
        await sender.send(message(f"{user}@localhost/phone", "end"))
    await asyncio.wait_for(asyncio.gather(*(r.done.wait() for r in receivers)), 30)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert not [r.failed for r in receivers if r.failed]


async def lost_messages(
    port: int, receivers: list[Receiver], nodes: list[Server], sent: list[str], last: Server,
    survivors: list[Server] | None = None,
) -> list[str]:
    """The messages sent that no receiver got live nor finds in offline storage (printed
    with the counts: sent, live, stored offline, duplicates). `survivors`: the nodes
    that may hold the receivers' sessions (`last` alone unless given)."""
    holding = survivors if survivors is not None else [last]
    live = Counter(body for r in receivers for body in r.bodies)
    stored = sum(node.router.ledger.offline for node in nodes)
    offline: Counter[str] = Counter()
    if stored:
        for receiver in receivers:
            assert receiver.stream is not None
            await receiver.stream.send("</stream:stream>")  # unacked ones: offline too
        await until(lambda: not any(sm_module(n).active for n in holding))  # queues routed...
        for node in holding:
            await node.router.drain()  # ...and stored
        stored = sum(node.router.ledger.offline for node in nodes)
        streams = [await login_at(port, user, "laptop") for user in RECEIVERS]
        for again in streams:
            await again.send("<presence/>")
            await again.next("<presence")  # the echo: its broadcast (and replay) started
        for node in holding:
            await node.router.drain()  # the replays of offline messages are done
        for again in streams:
            # A round trip: what its node replayed before the answer is read by then.
            await again.send("<iq type='get' id='done'><ping xmlns='urn:xmpp:ping'/></iq>")
            await again.next('id="done"')
            offline.update(
                el.findtext(f"{C}body") or "" for el in again.pending if el.tag == f"{C}message"
            )
    got = live + offline
    lost = [body for body in sent if got[body] == 0]
    duplicated = sum(count - 1 for count in live.values() if count > 1)
    print(f"\nsent {len(sent)}, live {sum(live.values())}, stored offline {stored} "
          f"(read back {sum(offline.values())}), lost {len(lost)}, duplicated live {duplicated}, "
          f"resumed {sum(r.resumed for r in receivers)}")
    return lost


async def test_scale_one_to_three_to_one_under_load_behind_haproxy(
    redis_service: LocalService,
    start_server: StartServer,
    haproxy: Any,
    storage_section: dict[str, Any] | None,
) -> None:
    """One node; two more join (HAProxy sees them come up); the first two are drained in
    turn while the chat goes on. Every receiver ends on the last node, nothing lost."""
    ports = [free_port() for _ in range(3)]
    extra: dict[str, Any] = {}
    if storage_section is None:
        extra["storage"] = {"cache": {"backend": "none"}}

    async def node(i: int, users: dict[str, str] | None = None) -> Server:
        return await start_server(
            users=users if users is not None else {},
            cluster=cluster(redis_service, f"node-{i}"),
            listeners=[{"type": "direct_tls", "address": "127.0.0.1", "port": ports[i]}],
            **extra,
        )

    nodes = [await node(0, {name: PASSWORD for name in [*RECEIVERS, "sender"]})]
    port = await haproxy(ports)  # the two others are down for now: HAProxy skips them
    receivers = [Receiver(port, user) for user in RECEIVERS]
    for receiver in receivers:
        await receiver.start()
    tasks = [asyncio.create_task(r.run()) for r in receivers]
    sender = await login_at(ports[0], "sender", "desk")
    sent: list[str] = []

    async def chat(rounds: int, start: int) -> None:
        for n in range(start, start + rounds):
            for user in RECEIVERS:
                body = f"{user}-{n}"
                await sender.send(message(f"{user}@localhost/phone", body))
                sent.append(body)
            await asyncio.sleep(0.01)  # a steady chat rate, not a wait for anything

    await chat(10, 0)
    nodes += [await node(1), await node(2)]  # scale up
    # The sender moves to the node that stays, after a round trip (all it sent is routed).
    await sender.send("<iq type='get' id='moved'><ping xmlns='urn:xmpp:ping'/></iq>")
    await sender.next('id="moved"')
    await sender.send("</stream:stream>")
    sender = await login_at(ports[2], "sender", "desk")
    await chat(10, 10)
    first = asyncio.create_task(nodes[0].stop())  # scale down: drain node 0 under load
    await chat(10, 20)
    await first
    second = asyncio.create_task(nodes[1].stop())  # and node 1
    await chat(10, 30)
    await second
    await chat(5, 40)
    await finish(receivers, sender, tasks)
    last = nodes[2]
    assert all(last.router.directory.local.get(f"{u}@localhost", "phone") is not None  # type: ignore[attr-defined]
               for u in RECEIVERS)
    assert sum(r.resumed for r in receivers) >= len(RECEIVERS)  # each moved at least once
    lost = await lost_messages(port, receivers, nodes, sent, last)
    assert lost == []
