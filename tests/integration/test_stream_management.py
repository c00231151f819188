"""Stream Management (XEP-0198) on one node, over raw TLS streams and with slixmpp.

The raw streams see exactly what the server sends: <enabled/>, <r/>, <a/>,
<resumed/> and the stanzas replayed after it, <failed/> and its condition.
A dropped connection is a real one (the client's TCP transport aborted);
what goes to offline storage is read back by logging in again.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
from typing import Any

import pytest
from lxml import etree

from tests.integration.clients import HEADER, Client, RawClient, close, insecure_context
from tests.integration.conftest import USERS, StartServer, port_of
from xmppd import metrics
from xmppd.config import DEFAULT_MODULES
from xmppd.modules.stream_management import StreamManagement
from xmppd.server import Server

SM = "urn:xmpp:sm:3"
SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
STREAMS = "http://etherx.jabber.org/streams"
C = "{jabber:client}"
_ids = itertools.count()


def modules(**sm: Any) -> dict[str, Any]:
    """The default modules, stream management with `sm` as its options."""
    return {**{name: {} for name in DEFAULT_MODULES}, "stream_management": sm}


def sm_module(server: Server) -> StreamManagement:
    return server.modules.module(StreamManagement)


class Stream:
    """A raw stream that parses every top-level element the server sends."""

    def __init__(self, raw: RawClient, features: bytes) -> None:
        self.raw = raw
        self.features = features
        self.parser = etree.XMLPullParser(events=("end",))
        self.parser.feed(f"<stream:stream xmlns='jabber:client' xmlns:stream='{STREAMS}'>".encode())
        self.pending: list[etree._Element] = []
        self.closed = False

    @classmethod
    async def auth(cls, server: Server, user: str) -> Stream:
        """Authenticated, no resource bound yet."""
        raw = await RawClient.open(server)
        await raw.send(HEADER)
        await raw.read_until(b"</stream:features>")
        token = base64.b64encode(f"\0{user}\0{USERS[user]}".encode()).decode()
        await raw.send(f"<auth xmlns='{SASL}' mechanism='PLAIN'>{token}</auth>")
        await raw.read_until(b"<success")
        await raw.send(HEADER)
        features = await raw.read_until(b"</stream:features>")
        return cls(raw, features)

    @classmethod
    async def login(cls, server: Server, user: str, resource: str = "phone") -> Stream:
        stream = await cls.auth(server, user)
        await stream.send(
            "<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
            f"<resource>{resource}</resource></bind></iq>"
        )
        await stream.next("bind")
        return stream

    async def enable(self, attrs: str = "resume='true'") -> etree._Element:
        await self.send(f"<enable xmlns='{SM}' {attrs}/>")
        return await self.next("enabled")

    async def send(self, xml: str) -> None:
        await self.raw.send(xml)

    async def _read(self) -> None:
        chunk = await self.raw.reader.read(65536)
        if not chunk:
            self.closed = True
            raise EOFError
        self.parser.feed(chunk.replace(b"</stream:stream>", b""))
        for _, element in self.parser.read_events():
            parent = element.getparent()
            if parent is not None and parent.getparent() is None:
                self.pending.append(element)

    async def next(self, match: str = "", timeout: float = 10) -> etree._Element:
        """The first element (in arrival order) whose serialization contains `match`."""
        async with asyncio.timeout(timeout):
            while True:
                for element in self.pending:
                    if match in etree.tostring(element).decode():
                        self.pending.remove(element)
                        return element
                await self._read()

    async def ack_count(self) -> int:
        """Ask for the server's h."""
        await self.send(f"<r xmlns='{SM}'/>")
        return int((await self.next("<a ")).get("h", "-1"))

    async def error(self) -> str:
        """The condition of the stream error the server ends the stream with."""
        error = await self.next("stream:error")
        return etree.QName(error[0]).localname

    def drop(self) -> None:
        """Lose the TCP connection, with no </stream:stream>."""
        self.raw.writer.transport.abort()

    async def close(self) -> None:
        await self.raw.close()


def message(to: str, body: str) -> str:
    return f"<message to='{to}' type='chat' id='m{next(_ids)}'><body>{body}</body></message>"


def bodies(elements: list[etree._Element]) -> list[str]:
    return [el.findtext(f"{C}body") or "" for el in elements if el.tag == f"{C}message"]


async def messages(stream: Stream, count: int) -> list[str]:
    return [(await stream.next("<body>")).findtext(f"{C}body") or "" for _ in range(count)]


async def roundtrip(stream: Stream) -> None:
    """A roster get answered: what the server sent before is in `pending`."""
    id_ = f"rt{next(_ids)}"
    await stream.send(f"<iq type='get' id='{id_}'><query xmlns='jabber:iq:roster'/></iq>")
    await stream.next(f'id="{id_}"')


async def session_closed(server: Server) -> asyncio.Event:
    """An event set when any session ends (the "session/closed" hook)."""
    closed = asyncio.Event()

    async def on_closed(session: object) -> None:
        closed.set()

    server.modules.hook("session/closed", on_closed, priority=-100)
    return closed


def detached(server: Server) -> asyncio.Queue[object]:
    """Sessions as they start waiting to be resumed (the "session/detached" hook)."""
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def on_detached(session: object) -> None:
        queue.put_nowait(session)

    server.modules.hook("session/detached", on_detached)
    return queue


# --- enable -----------------------------------------------------------------------------


async def test_feature_and_enable(start_server: StartServer) -> None:
    server = await start_server(modules=modules(resume_timeout=120, max_resume_timeout=200))
    stream = await Stream.auth(server, "alice")
    assert f"<sm xmlns=\"{SM}\"/>".encode() in stream.features
    await stream.send(f"<enable xmlns='{SM}' resume='true'/>")  # before bind
    failed = await stream.next("failed")
    assert failed.find("{urn:ietf:params:xml:ns:xmpp-stanzas}unexpected-request") is not None
    await stream.send(
        "<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>"
    )
    await stream.next("bind")
    enabled = await stream.enable()
    assert enabled.get("resume") == "true" and len(enabled.get("id", "")) >= 16
    assert enabled.get("max") == "120"
    await stream.send(f"<enable xmlns='{SM}'/>")  # a second time
    assert (await stream.next("failed"))[0].tag.endswith("unexpected-request")
    asked = await Stream.login(server, "bob")
    assert (await asked.enable("resume='true' max='60'")).get("max") == "60"
    greedy = await Stream.login(server, "bob", "tablet")
    assert (await greedy.enable("resume='1' max='100000'")).get("max") == "200"
    plain = await Stream.login(server, "bob", "desk")
    enabled = await plain.enable("")
    assert enabled.get("id") is None and enabled.get("resume") is None
    for s in (stream, asked, greedy, plain):
        await s.close()


async def test_acks_both_ways(start_server: StartServer) -> None:
    server = await start_server(modules=modules(ack_every=3, ack_delay=30))
    alice = await Stream.login(server, "alice")
    bob = await Stream.login(server, "bob")
    await alice.enable()
    assert await alice.ack_count() == 0
    await alice.send(message("bob@localhost/phone", "one"))
    await alice.send("<iq type='get' id='r1'><query xmlns='jabber:iq:roster'/></iq>")
    await alice.next("r1")
    assert await alice.ack_count() == 2  # a message and an IQ handled
    for n in range(3):
        await bob.send(message("alice@localhost/phone", f"to alice {n}"))
    assert await messages(alice, 3) == ["to alice 0", "to alice 1", "to alice 2"]
    # The roster result and three messages are unacked: the third message asks.
    await alice.next(f'<r xmlns="{SM}"')
    (sm,) = sm_module(server).active
    assert len(sm.queue) == 4
    await alice.send(f"<a xmlns='{SM}' h='2'/>")
    assert await alice.ack_count() == 2  # a round trip: the <a/> was taken
    assert len(sm.queue) == 2
    await alice.send(f"<a xmlns='{SM}' h='4'/>")
    assert await alice.ack_count() == 2
    assert len(sm.queue) == 0
    await alice.close()
    await bob.close()


async def test_ack_requested_after_the_delay(start_server: StartServer) -> None:
    server = await start_server(modules=modules(ack_every=100, ack_delay=0.1))
    alice = await Stream.login(server, "alice")
    bob = await Stream.login(server, "bob")
    await alice.enable()
    await bob.send(message("alice@localhost/phone", "hello"))
    await alice.next("hello")
    await alice.next(f'<r xmlns="{SM}"', timeout=5)
    await alice.close()
    await bob.close()


async def test_an_ack_over_what_was_sent_ends_the_stream(start_server: StartServer) -> None:
    """Even by one: the server counts every stanza it sends (the stream's own answers
    too, tests/integration/test_sm_counting.py), so an h past it is a client's error."""
    server = await start_server()
    alice = await Stream.login(server, "alice")
    bob = await Stream.login(server, "bob")
    await alice.enable()
    await bob.send(message("alice@localhost/phone", "a"))
    await bob.send(message("alice@localhost/phone", "b"))
    await messages(alice, 2)
    await alice.send(f"<a xmlns='{SM}' h='3'/>")  # one more than sent
    assert await alice.error() == "undefined-condition"
    await bob.close()


# --- resumption ---------------------------------------------------------------------------


async def test_resume_after_a_dropped_connection(start_server: StartServer) -> None:
    server = await start_server()
    alice = await Stream.login(server, "alice")
    bob = await Stream.login(server, "bob")
    enabled = await alice.enable()
    await alice.send("<presence/>")  # available: a message to the bare JID is for it
    await alice.next("<presence")
    await alice.send(message("bob@localhost/phone", "from alice"))
    await bob.next("from alice")
    for n in range(3):
        await bob.send(message("alice@localhost/phone", f"before {n}"))
    await messages(alice, 3)
    await alice.send(f"<a xmlns='{SM}' h='2'/>")  # the echo and the first message
    assert await alice.ack_count() == 2
    waiting = detached(server)
    alice.drop()
    await asyncio.wait_for(waiting.get(), 10)
    offline_before = server.router.ledger.offline
    # Still routable: nothing bounces, nothing goes to offline storage.
    for n in range(2):
        await bob.send(message("alice@localhost/phone", f"during {n}"))
    await bob.send(message("alice@localhost", "to the bare JID"))
    await roundtrip(bob)
    assert server.router.ledger.offline == offline_before
    assert "error" not in str(bob.pending)

    again = await Stream.auth(server, "alice")
    await again.send(f"<resume xmlns='{SM}' previd='{enabled.get('id')}' h='2'/>")
    resumed = await again.next("resumed")
    assert resumed.get("previd") == enabled.get("id")
    assert resumed.get("h") == "2"  # its presence and its message
    assert await messages(again, 5) == [
        "before 1", "before 2", "during 0", "during 1", "to the bare JID",
    ]
    # The session is the same: a presence, a message, its counters go on.
    await again.send(message("bob@localhost/phone", "back"))
    await bob.next("back")
    assert await again.ack_count() == 3
    assert sm_module(server).stats.resumed == 1
    await again.close()
    await bob.close()


async def test_resume_refused_for_another_account_or_an_unknown_id(
    start_server: StartServer,
) -> None:
    server = await start_server()
    alice = await Stream.login(server, "alice")
    previd = (await alice.enable()).get("id")
    waiting = detached(server)
    alice.drop()
    await asyncio.wait_for(waiting.get(), 10)
    mallory = await Stream.auth(server, "bob")  # logged in, but not as alice
    await mallory.send(f"<resume xmlns='{SM}' previd='{previd}' h='0'/>")
    failed = await mallory.next("failed")
    assert failed[0].tag == "{urn:ietf:params:xml:ns:xmpp-stanzas}item-not-found"
    assert failed.get("h") is None
    await mallory.send(f"<resume xmlns='{SM}' previd='no-such-id' h='0'/>")
    assert (await mallory.next("failed"))[0].tag.endswith("item-not-found")
    # Refused resumptions leave the stream usable: it binds a resource of its own.
    await mallory.send(
        "<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>"
    )
    await mallory.next("bind")
    # ...and alice's session still waits for alice.
    again = await Stream.auth(server, "alice")
    await again.send(f"<resume xmlns='{SM}' previd='{previd}' h='0'/>")
    await again.next("resumed")
    assert sm_module(server).stats.resume_failed == 2
    await mallory.close()
    await again.close()


async def test_resume_takes_over_a_stream_not_yet_seen_dead(start_server: StartServer) -> None:
    """The client's old TCP connection is still open as far as the server knows."""
    server = await start_server()
    alice = await Stream.login(server, "alice")
    bob = await Stream.login(server, "bob")
    previd = (await alice.enable()).get("id")
    await bob.send(message("alice@localhost/phone", "unacked"))
    await alice.next("unacked")
    again = await Stream.auth(server, "alice")
    await again.send(f"<resume xmlns='{SM}' previd='{previd}' h='0'/>")
    await again.next("resumed")
    assert await messages(again, 1) == ["unacked"]
    assert await alice.error() == "conflict"  # the old stream is ended...
    await bob.send(message("alice@localhost/phone", "after"))
    assert await messages(again, 1) == ["after"]  # ...the session lives on
    assert server.router.directory.count() == 2
    await again.close()
    await bob.close()


async def test_timeout_then_failed_and_offline_storage(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await start_server(modules=modules(resume_timeout=0.3))
    alice = await Stream.login(server, "alice")
    bob = await Stream.login(server, "bob")
    previd = (await alice.enable()).get("id")
    await alice.send(message("bob@localhost/phone", "hi"))
    await bob.next("hi")
    await bob.send(message("alice@localhost/phone", "sent, never acked"))
    await alice.next("never acked")
    # The 0.3 s runs out while bob's two stanzas wait for the session; on a busy host it
    # could end before the server had read them (and they met no waiting session). The
    # timer still runs its 0.3 s; what it does then waits until bob's stanzas were read.
    sm = sm_module(server)
    bob_read = asyncio.Event()
    timeout = sm._timeout

    def timeout_once_bob_was_read(state: Any) -> None:
        waited = asyncio.ensure_future(bob_read.wait())
        waited.add_done_callback(lambda _: timeout(state))

    monkeypatch.setattr(sm, "_timeout", timeout_once_bob_was_read)
    waiting = detached(server)
    closed = await session_closed(server)
    alice.drop()
    await asyncio.wait_for(waiting.get(), 10)
    await bob.send(message("alice@localhost/phone", "queued"))
    await bob.send("<iq type='get' id='ask' to='alice@localhost/phone'>"
                   "<query xmlns='jabber:iq:version'/></iq>")
    # answered after the server read (and routed, in order) what bob sent before it
    await bob.send("<iq type='get' id='read' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
    assert (await bob.next('id="read"')).get("type") == "result"
    assert not closed.is_set()  # the session still waited for a resume
    bob_read.set()
    await asyncio.wait_for(closed.wait(), 10)  # the timeout ended the session
    error = await bob.next('id="ask"')
    assert error.get("type") == "error"
    again = await Stream.auth(server, "alice")
    await again.send(f"<resume xmlns='{SM}' previd='{previd}' h='0'/>")
    failed = await again.next("failed")
    assert failed[0].tag.endswith("item-not-found")
    assert failed.get("h") == "1"  # the server had handled alice's one message
    await again.send(
        "<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>"
    )
    await again.next("bind")
    await again.send("<presence/>")
    assert sorted(await messages(again, 2)) == ["queued", "sent, never acked"]
    stats = sm_module(server).stats
    assert (stats.timed_out, stats.rerouted, stats.errored) == (1, 2, 1)
    scraped = metrics.exposition(server).decode()
    for line in (
        "xmppd_sm_timed_out_total 1.0",
        "xmppd_sm_timeout_messages_total 2.0",
        "xmppd_sm_errored_total 1.0",
        "xmppd_sm_resume_failed_total 1.0",  # the late <resume/>
        "xmppd_sm_waiting 0.0",
    ):
        assert line in scraped, line
    await again.close()
    await bob.close()


async def test_too_many_unacked_ends_the_stream(start_server: StartServer) -> None:
    server = await start_server(modules=modules(max_unacked=3, ack_every=100))
    alice = await Stream.login(server, "alice")
    bob = await Stream.login(server, "bob")
    await alice.enable()
    closed = await session_closed(server)
    for n in range(4):
        await bob.send(message("alice@localhost/phone", f"m{n}"))
    assert await alice.error() == "resource-constraint"
    await asyncio.wait_for(closed.wait(), 10)
    # Not resumable: every unacked message went to offline storage.
    again = await Stream.login(server, "alice")
    await again.send("<presence/>")
    assert sorted(await messages(again, 4)) == ["m0", "m1", "m2", "m3"]
    await again.close()
    await bob.close()


async def test_without_resume_a_drop_ends_the_session(start_server: StartServer) -> None:
    server = await start_server()
    alice = await Stream.login(server, "alice")
    bob = await Stream.login(server, "bob")
    await alice.enable("")
    await bob.send(message("alice@localhost/phone", "unacked"))
    await alice.next("unacked")
    closed = await session_closed(server)
    alice.drop()
    await asyncio.wait_for(closed.wait(), 10)
    assert server.router.directory.get("alice@localhost", "phone") is None
    again = await Stream.login(server, "alice")
    await again.send("<presence/>")
    assert await messages(again, 1) == ["unacked"]
    await again.close()
    await bob.close()


async def test_clean_close_sends_unacked_messages_offline(start_server: StartServer) -> None:
    server = await start_server()
    alice = await Stream.login(server, "alice")
    bob = await Stream.login(server, "bob")
    await alice.enable()
    await bob.send(message("alice@localhost/phone", "unacked"))
    await alice.next("unacked")
    closed = await session_closed(server)
    await alice.send("</stream:stream>")
    await asyncio.wait_for(closed.wait(), 10)
    assert not sm_module(server).resumable  # a closed stream cannot be resumed
    again = await Stream.login(server, "alice")
    await again.send("<presence/>")
    assert await messages(again, 1) == ["unacked"]
    await again.close()
    await bob.close()
    # The ledger: delivered twice (live, then from storage), stored once, and the
    # unacknowledged first delivery taken back, so the equation holds.
    await server.router.drain()
    ledger = server.router.ledger.snapshot()
    fates = {k: ledger[k] for k in ("received", "delivered", "rerouted", "offline", "replayed")}
    assert fates == {"received": 1, "delivered": 2, "rerouted": 1, "offline": 1, "replayed": 1}
    assert ledger["received"] == (
        ledger["delivered"] - ledger["copies"] - ledger["replayed"] - ledger["rerouted"]
        + ledger["offline"] + ledger["bounced"]
    )


async def test_stop_sends_waiting_sessions_offline(start_server: StartServer) -> None:
    """SIGTERM on a single node: a session waiting to be resumed cannot be resumed
    after the node is gone; its messages are in offline storage for the next login."""
    server = await start_server()
    alice = await Stream.login(server, "alice")
    bob = await Stream.login(server, "bob")
    await alice.enable()
    await bob.send(message("alice@localhost/phone", "unacked"))
    await alice.next("unacked")
    waiting = detached(server)
    alice.drop()
    await asyncio.wait_for(waiting.get(), 10)
    await bob.send(message("alice@localhost/phone", "queued"))
    await roundtrip(bob)
    await bob.close()
    await server.stop()
    restarted = await start_server(users={})
    again = await Stream.login(restarted, "alice")
    await again.send("<presence/>")
    assert sorted(await messages(again, 2)) == ["queued", "unacked"]
    await again.close()


async def test_slixmpp_resumes_after_a_dropped_connection(server: Server) -> None:
    """slixmpp's own XEP-0198 plugin: enable, lose TCP, reconnect, resume, receive
    what was sent meanwhile, and the session (same full JID) goes on."""
    client = Client("alice@localhost/laptop", USERS["alice"])
    client.register_plugin("xep_0198")
    client.ssl_context = insecure_context()
    client.enable_direct_tls = True
    client.enable_plaintext = False
    enabled, resumed = asyncio.Event(), asyncio.Event()
    client.add_event_handler("sm_enabled", lambda _: enabled.set())
    client.add_event_handler("session_resumed", lambda _: resumed.set())
    client.connect("127.0.0.1", port_of(server, "direct_tls"))
    await asyncio.wait_for(enabled.wait(), 15)
    client.send_presence()
    bob = await Stream.login(server, "bob")
    await bob.send(message("alice@localhost/laptop", "before"))
    assert (await asyncio.wait_for(client.messages.get(), 10))["body"] == "before"
    waiting = detached(server)
    client.ended.clear()
    assert client.transport is not None
    client.transport.abort()
    await asyncio.wait_for(client.ended.wait(), 10)
    await asyncio.wait_for(waiting.get(), 10)
    await bob.send(message("alice@localhost/laptop", "while away"))
    await roundtrip(bob)
    client.connect("127.0.0.1", port_of(server, "direct_tls"))
    await asyncio.wait_for(resumed.wait(), 15)
    assert (await asyncio.wait_for(client.messages.get(), 10))["body"] == "while away"
    client.send_message(mto="bob@localhost/phone", mbody="resumed", mtype="chat")
    await bob.next("resumed")
    assert sm_module(server).stats.resumed == 1
    await close(client)
    await bob.close()
