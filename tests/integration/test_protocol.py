"""Protocol rules a conformance suite checks, over raw TLS streams against a real server.

Each test speaks XMPP by hand (tests/integration/clients.py RawClient), so
it sees exactly what the server sends: the echo of one's own presence
(RFC 6121 4.2.2), a subscription request kept whole for an offline user
(3.1.3), last activity and messages sent in the same write as
</stream:stream>, errors for remote domains (RFC 6120 10.4.3) and IQs with
no 'to' (10.3.3). Every test runs on the embedded and the cloud storage.
"""

from __future__ import annotations

import asyncio
import base64
import itertools

from lxml import etree

from tests.integration.clients import HEADER, RawClient
from tests.integration.conftest import StartServer
from xmppd.server import Server

SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
C = "{jabber:client}"
LAST = "jabber:iq:last"
NICK = "http://jabber.org/protocol/nick"
PARS = "urn:xmpp:pars:0"
USERS = {"alice": "alice-secret", "bob": "bob-secret"}
_ids = itertools.count()


class Stream:
    """A logged-in raw stream that parses what the server sends, stanza by stanza."""

    def __init__(self, raw: RawClient, jid: str) -> None:
        self.raw = raw
        self.jid = jid
        self.bare = jid.split("/", 1)[0]
        self.parser = etree.XMLPullParser(events=("end",))
        self.parser.feed(
            b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>"
        )
        self.pending: list[etree._Element] = []
        self.closed = False

    @classmethod
    async def login(cls, server: Server, user: str, resource: str) -> Stream:
        raw = await RawClient.open(server)
        await raw.send(HEADER)
        await raw.read_until(b"</stream:features>")
        token = base64.b64encode(f"\0{user}\0{USERS[user]}".encode()).decode()
        await raw.send(f"<auth xmlns='{SASL}' mechanism='PLAIN'>{token}</auth>")
        await raw.read_until(b"<success")
        await raw.send(HEADER)
        await raw.read_until(b"</stream:features>")
        await raw.send(
            "<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
            f"<resource>{resource}</resource></bind></iq>"
        )
        await raw.read_until(b"</iq>")
        return cls(raw, f"{user}@localhost/{resource}")

    async def send(self, xml: str) -> None:
        await self.raw.send(xml)

    async def _read(self) -> None:
        chunk = await self.raw.reader.read(65536)
        if not chunk:
            self.closed = True
            raise EOFError(self.jid)
        self.parser.feed(chunk.replace(b"</stream:stream>", b""))
        for _, element in self.parser.read_events():
            if element.getparent() is not None and element.getparent().getparent() is None:
                self.pending.append(element)

    async def next(self, match: str = "", timeout: float = 10) -> etree._Element:
        """The first stanza (in arrival order) whose serialization contains `match`."""
        async with asyncio.timeout(timeout):
            while True:
                for stanza in self.pending:
                    if match in etree.tostring(stanza).decode():
                        self.pending.remove(stanza)
                        return stanza
                await self._read()

    async def iq(self, body: str, to: str | None = None, type_: str = "get") -> etree._Element:
        """Send an IQ and return its answer (everything before it stays in `pending`)."""
        id_ = f"q{next(_ids)}"
        to_attr = f" to='{to}'" if to else ""
        await self.send(f"<iq type='{type_}' id='{id_}'{to_attr}>{body}</iq>")
        return await self.next(f'id="{id_}"')

    async def barrier(self) -> list[etree._Element]:
        """A round trip (roster get): what the server sent before its answer, taken out."""
        await self.iq("<query xmlns='jabber:iq:roster'/>")
        taken, self.pending = self.pending, []
        return taken

    async def read_to_close(self) -> None:
        while not self.closed:
            try:
                await self._read()
            except EOFError:
                return


def condition(stanza: etree._Element) -> str | None:
    error = stanza.find(f"{C}error")
    if error is None:
        return None
    return next(etree.QName(c).localname for c in error if etree.QName(c).namespace == STANZAS)


def presences(stanzas: list[etree._Element]) -> list[tuple[str | None, str | None, str | None]]:
    return [(s.get("type"), s.get("from"), s.get("to")) for s in stanzas if s.tag == f"{C}presence"]


# --- RFC 6121 4.2.2 / 4.5.2: one's own presence comes back, once ------------------------


async def test_own_presence_is_echoed_once_to_every_available_resource(
    start_server: StartServer,
) -> None:
    server = await start_server(users=USERS)
    desk = await Stream.login(server, "alice", "desk")
    await desk.send("<presence><status>here</status></presence>")
    echo = await desk.next("<presence")
    assert (echo.get("from"), echo.findtext(f"{C}status")) == ("alice@localhost/desk", "here")
    await server.router.drain()
    assert presences(await desk.barrier()) == []  # exactly one

    phone = await Stream.login(server, "alice", "phone")
    await phone.send("<presence/>")
    got = [await phone.next("<presence"), await phone.next("<presence")]
    assert sorted(presences(got), key=str) == sorted(
        [(None, "alice@localhost/phone", None), (None, "alice@localhost/desk", phone.jid)],
        key=str,
    )
    await server.router.drain()
    assert presences(await phone.barrier()) == []
    assert presences(await desk.barrier()) == [(None, "alice@localhost/phone", None)]

    await phone.send("<presence type='unavailable'/>")
    assert presences([await phone.next("<presence")]) == [
        ("unavailable", "alice@localhost/phone", None)
    ]
    assert presences(await phone.barrier()) == []
    assert presences(await desk.barrier()) == [("unavailable", "alice@localhost/phone", None)]
    for stream in (desk, phone):
        await stream.raw.close()


# --- RFC 6121 3.1.3: a request for an offline user is kept whole --------------------------


async def test_subscription_request_is_kept_whole_until_answered(
    start_server: StartServer,
) -> None:
    server = await start_server(users=USERS)
    alice = await Stream.login(server, "alice", "desk")
    await alice.send("<presence/>")
    await alice.send(
        "<presence type='subscribe' to='bob@localhost' id='ask'>"
        f"<nick xmlns='{NICK}'>Alice A.</nick><preauth xmlns='{PARS}' token='t0k3n'/>"
        "<status>it is me</status></presence>"
    )
    await alice.barrier()
    await server.router.drain()  # the request is stored (bob is offline)

    # every resource of bob gets it at its initial presence, as alice sent it
    for resource in ("phone", "laptop"):
        bob = await Stream.login(server, "bob", resource)
        await bob.send("<presence/>")
        request = await bob.next('type="subscribe"')
        assert (request.get("from"), request.get("to")) == ("alice@localhost", "bob@localhost")
        assert request.findtext(f"{{{NICK}}}nick") == "Alice A."
        assert request.find(f"{{{PARS}}}preauth").get("token") == "t0k3n"  # type: ignore[union-attr]
        assert request.findtext(f"{C}status") == "it is me"
        assert request.get("id") == "ask"

    # bob approves: the request is gone, from the store too
    await bob.send("<presence type='subscribed' to='alice@localhost'/>")
    await alice.next('type="subscribed"')
    await server.router.drain()
    kept = await server.modules.items("localhost", "subscription-requests").query(prefix="bob/")
    assert kept.items == []
    again = await Stream.login(server, "bob", "tablet")
    await again.send("<presence/>")
    got = await again.barrier()  # the presence was processed,
    await server.router.drain()  # and what it set off is done
    got += await again.barrier()
    assert [p for p in got if p.get("type") == "subscribe"] == []
    for stream in (alice, bob, again):
        await stream.raw.close()


# --- what the server accepted before </stream:stream> counts ------------------------------


async def test_last_activity_of_a_stream_closed_in_the_same_write(
    start_server: StartServer,
) -> None:
    server = await start_server(users=USERS)  # every default module, vcard included
    write = (
        "<presence><status>Hello</status></presence>"
        "<presence type='unavailable'><status>Goodbye</status></presence></stream:stream>"
    )
    # the user's only session: its presence waits for the avatar hash when the stream ends
    alice = await Stream.login(server, "alice", "raw")
    await alice.send(write)
    await alice.read_to_close()
    again = await Stream.login(server, "alice", "again")  # the owner may always ask
    answer = await again.iq(f"<query xmlns='{LAST}'/>", to="alice@localhost")
    assert answer.get("type") == "result", etree.tostring(answer)
    assert answer.findtext(f"{{{LAST}}}query") == "Goodbye"
    await server.router.drain()
    item = await server.modules.items("localhost", "last").get("alice")
    assert item is not None and item.attrs["status"] == "Goodbye"

    # asked right after the close by a session that was there all along
    alice = await Stream.login(server, "alice", "raw")
    await alice.send(write.replace("Goodbye", "Goodbye again"))
    await alice.read_to_close()
    answer = await again.iq(f"<query xmlns='{LAST}'/>", to="alice@localhost")
    assert answer.findtext(f"{{{LAST}}}query") == "Goodbye again", etree.tostring(answer)
    await again.raw.close()


async def test_last_activity_asked_right_after_unavailable(start_server: StartServer) -> None:
    server = await start_server(users=USERS)
    watcher = await Stream.login(server, "alice", "watcher")
    alice = await Stream.login(server, "alice", "raw")
    for n in range(3):
        await alice.send("<presence/>")
        await alice.next("<presence")  # the echo: the server applied it
        await alice.send(f"<presence type='unavailable'><status>brb {n}</status></presence>")
        await alice.next("unavailable")
        answer = await watcher.iq(f"<query xmlns='{LAST}'/>", to="alice@localhost")
        assert answer.findtext(f"{{{LAST}}}query") == f"brb {n}", etree.tostring(answer)
    for stream in (alice, watcher):
        await stream.raw.close()


async def test_message_in_the_same_write_as_the_stream_close(start_server: StartServer) -> None:
    server = await start_server(users=USERS)
    bob = await Stream.login(server, "bob", "online")
    await bob.send("<presence/>")
    await bob.barrier()
    alice = await Stream.login(server, "alice", "raw")
    await alice.send(
        "<message to='bob@localhost' type='chat'><body>to the online bob</body></message>"
        "</stream:stream>"
    )
    await alice.read_to_close()
    assert (await bob.next("<message")).findtext(f"{C}body") == "to the online bob"
    await bob.send("<presence type='unavailable'/></stream:stream>")
    await bob.read_to_close()

    alice = await Stream.login(server, "alice", "raw")
    await alice.send(
        "<message to='bob@localhost' type='chat'><body>while you were out</body></message>"
        "</stream:stream>"
    )
    await alice.read_to_close()
    bob = await Stream.login(server, "bob", "later")
    await bob.send("<presence/>")
    assert (await bob.next("<message")).findtext(f"{C}body") == "while you were out"
    await bob.raw.close()


# --- RFC 6120 10.4.3: a remote domain we cannot reach is reported ---------------------------


async def test_stanzas_to_a_remote_domain_get_remote_server_not_found(
    start_server: StartServer,
) -> None:
    server = await start_server(users=USERS)
    alice = await Stream.login(server, "alice", "raw")  # no initial presence: none needed
    remote = "x@remote.example"
    bounced = {
        "subscribe": f"<presence type='subscribe' to='{remote}' id='{{id}}'/>",
        "unsubscribe": f"<presence type='unsubscribe' to='{remote}' id='{{id}}'/>",
        "probe": f"<presence type='probe' to='{remote}' id='{{id}}'/>",
        "directed": f"<presence to='{remote}/r' id='{{id}}'/>",
        "iq get": f"<iq type='get' to='{remote}' id='{{id}}'><ping xmlns='urn:xmpp:ping'/></iq>",
        "iq set": "<iq type='set' to='remote.example' id='{id}'><q xmlns='urn:x'/></iq>",
        "message": f"<message to='{remote}' id='{{id}}'><body>hi</body></message>",
    }
    for name, xml in bounced.items():
        await alice.send(xml.format(id=name.replace(" ", "-")))
        error = await alice.next(f'id="{name.replace(" ", "-")}"')
        assert error.get("type") == "error", name
        assert condition(error) == "remote-server-not-found", name
        assert error.get("from") in (remote, f"{remote}/r", "remote.example"), name
    # never an error for an error or a result
    for xml in (
        f"<message type='error' to='{remote}' id='e1'><error type='cancel'>"
        f"<item-not-found xmlns='{STANZAS}'/></error></message>",
        f"<presence type='error' to='{remote}' id='e2'/>",
        f"<iq type='result' to='{remote}' id='e3'/>",
    ):
        await alice.send(xml)
    assert [s for s in await alice.barrier() if s.get("id") in ("e1", "e2", "e3")] == []
    await alice.raw.close()


async def test_presence_to_remote_contacts_reports_each_once(start_server: StartServer) -> None:
    """The probe at initial presence reports a remote contact unreachable; broadcasts do not."""
    server = await start_server(users=USERS)
    roster = server.modules.modules["roster"]
    for contact in ("x@remote.example", "y@elsewhere.example"):

        def both(_item: object, contact: str = contact) -> object:
            from xmppd.modules.roster import RosterItem

            return RosterItem(jid=contact, subscription="both")

        await roster.update("alice@localhost", contact, both)  # type: ignore[attr-defined]
    alice = await Stream.login(server, "alice", "raw")
    await alice.send("<presence/>")
    got = await alice.barrier()
    await server.router.drain()  # probes and broadcast copies are routed
    errors = [s for s in got + await alice.barrier() if s.get("type") == "error"]
    assert sorted((e.get("from"), condition(e)) for e in errors) == [
        ("x@remote.example", "remote-server-not-found"),
        ("y@elsewhere.example", "remote-server-not-found"),
    ]
    await alice.send("<presence><show>away</show></presence>")
    await alice.send("<presence type='unavailable'/>")
    got = await alice.barrier()
    await server.router.drain()
    assert [s for s in got + await alice.barrier() if s.get("type") == "error"] == []
    await alice.raw.close()


# --- RFC 6120 10.3.3: an IQ with no 'to' is handled for the account -------------------------


async def test_iq_with_no_to_or_to_ones_own_bare_jid(start_server: StartServer) -> None:
    server = await start_server(users=USERS)
    alice = await Stream.login(server, "alice", "raw")
    await alice.send("<presence/>")  # available: her last activity is "now"
    await alice.barrier()
    payloads = {
        "ping": "<ping xmlns='urn:xmpp:ping'/>",
        "version": "<query xmlns='jabber:iq:version'/>",
        "time": "<time xmlns='urn:xmpp:time'/>",
        "disco#info": "<query xmlns='http://jabber.org/protocol/disco#info'/>",
        "roster": "<query xmlns='jabber:iq:roster'/>",
        "vcard": "<vCard xmlns='vcard-temp'/>",
        "private": "<query xmlns='jabber:iq:private'><x xmlns='urn:test'/></query>",
        "last": f"<query xmlns='{LAST}'/>",
    }
    for to in (None, "alice@localhost"):
        for name, payload in payloads.items():
            answer = await alice.iq(payload, to=to)
            assert answer.get("type") == "result", (to, name, etree.tostring(answer))
            assert answer.get("from") in (None, "alice@localhost"), (to, name)
    version = await alice.iq(payloads["version"])
    assert version.findtext("{jabber:iq:version}query/{jabber:iq:version}name") == "xmppd"
    # someone else's bare JID: the server does not answer a ping for bob
    other = await alice.iq(payloads["ping"], to="bob@localhost")
    assert condition(other) == "service-unavailable"
    await alice.raw.close()
