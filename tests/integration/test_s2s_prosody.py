"""Federation with a real Prosody: users of xmppd (b.test) and of Prosody (a.test) talk.

Prosody runs on 127.0.18.2, xmppd on 127.0.18.3, each with a certificate from
a CA this test makes and trusts on both sides; streams are authenticated
with SASL EXTERNAL in both directions (Prosody's s2s_secure_auth on, so a
certificate that did not validate would fail the test rather than fall back
to dialback). The peers' setup is in tests/integration/s2s_peers.py and
docs/s2s.md. In CI a missing Prosody fails; elsewhere the test skips.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

import pytest
import slixmpp

from tests.integration.clients import close, read_until
from tests.integration.conftest import StartServer
from tests.integration.s2s_clients import (
    Peer,
    message_across,
    next_message,
    prosody_user,
    signed_in,
    subscribed,
    xmppd_user,
)
from tests.integration.s2s_peers import (
    CA,
    PROSODY_ADDRESS,
    XMPPD_ADDRESS,
    DNSServer,
    Prosody,
    free_port,
    make_ca,
    require_prosody,
    start_dns,
    start_prosody,
    xmppd_s2s,
    xmppd_tls,
)
from tests.integration.test_account_changes import xmppctl
from tests.integration.test_s2s_bad_input import header, read_features, read_to_end
from xmppd.metrics import exposition
from xmppd.server import Server

require_prosody()


@dataclass
class Federation:
    ca: CA
    prosody: Prosody
    xmppd: Server
    dns: DNSServer

    def users(self) -> AbstractAsyncContextManager[tuple[Peer, ...]]:
        """bob (xmppd) and anna (Prosody) logged in for the block; a timeout in it fails
        the test with Prosody's log."""
        return signed_in(xmppd_user(self.xmppd), prosody_user(self.prosody), diagnose=self.diagnose)

    def diagnose(self) -> str:
        return "prosody log:\n" + self.prosody.log[-6000:]


Federate = Callable[..., Awaitable[Federation]]


@pytest.fixture
async def federate(tmp_path: Path, start_server: StartServer) -> AsyncIterator[Federate]:
    """Starts Prosody (a.test) and xmppd (b.test) federated; stops them after the test."""
    started: list[Federation] = []

    async def start(
        *,
        xmppd_ca: CA | None = None,
        secure_auth: bool = True,
        srv: bool = False,
        direct_tls: bool = False,
        bidi: bool = False,
        prosody_ca: CA | None = None,
        accept_dialback: bool = False,
    ) -> Federation:
        """`xmppd_ca`: the CA of xmppd's certificate, default the one Prosody trusts;
        `secure_auth`: Prosody's s2s_secure_auth (off: it accepts dialback); `srv`: xmppd
        finds a.test through SRV and A records instead of a static override;
        `direct_tls`: both also listen for direct TLS (XEP-0368), which each prefers:
        the `_xmpps-server` record of a.test has the better priority, and Prosody
        tries b.test's direct TLS port first; `bidi`: Prosody loads mod_s2s_bidi
        (XEP-0288; xmppd offers and asks for it always); `prosody_ca`: the CA of
        Prosody's certificate, default the one xmppd trusts; `accept_dialback`: xmppd's
        s2s.accept_dialback."""
        ca = make_ca(tmp_path)
        s2s_port = free_port(XMPPD_ADDRESS)
        listeners = [{"address": XMPPD_ADDRESS, "port": s2s_port}]
        target: tuple[int | str, ...] = (XMPPD_ADDRESS, s2s_port)
        if direct_tls:
            direct_port = free_port(XMPPD_ADDRESS)
            listeners.append({"address": XMPPD_ADDRESS, "port": direct_port, "direct_tls": True})
            target += (direct_port,)
        prosody = await start_prosody(
            tmp_path / "prosody",
            ca,
            peers={"b.test": target},
            secure_auth=secure_auth,
            direct_tls=direct_tls,
            bidi=bidi,
            cert_ca=prosody_ca,
        )
        records = {
            ("_xmpp-server._tcp.a.test", "SRV"): [f"10 5 {prosody.s2s_port} a.test."],
            ("a.test", "A"): [PROSODY_ADDRESS],
        }
        if direct_tls:
            srv_direct = f"0 5 {prosody.direct_tls_port} a.test."
            records[("_xmpps-server._tcp.a.test", "SRV")] = [srv_direct]
        # Without `srv` it knows no domain: anything not overridden does not exist.
        dns = await start_dns(records if srv else {})
        domains = {} if srv else {"a.test": {"host": PROSODY_ADDRESS, "port": prosody.s2s_port}}
        fed = Federation(ca, prosody, None, dns)  # type: ignore[arg-type]
        started.append(fed)
        fed.xmppd = await start_server(
            users={},
            hosts=["b.test"],
            tls=xmppd_tls(tmp_path / "xmppd-cert", xmppd_ca or ca),
            # Prosody's certificate is from the test CA (unless `prosody_ca`)
            s2s=xmppd_s2s(
                ca, listeners, dns.port, domains=domains, accept_dialback=accept_dialback
            ),
        )
        await fed.xmppd.accounts["b.test"].register("bob", "bob-secret")
        return fed

    yield start
    for fed in started:
        fed.dns.close()
        await fed.prosody.stop()


@pytest.fixture
async def federation(federate: Federate) -> Federation:
    return await federate()


async def test_messages_both_ways(federation: Federation) -> None:
    async with federation.users() as (bob, anna):
        bob.send_message(mto="anna@a.test", mbody="hello from b.test", mtype="chat")
        got = await next_message(anna)
        assert got["body"] == "hello from b.test"
        assert str(got["from"]) == "bob@b.test/desk"
        anna.send_message(mto="bob@b.test/desk", mbody="hello from a.test", mtype="chat")
        back = await next_message(bob)
        assert back["body"] == "hello from a.test"
        assert str(back["from"]) == "anna@a.test/home"
        # One connection each way, reused: a second message opens none.
        outgoing = [c for c in federation.xmppd.s2s.connections if c.outgoing]  # type: ignore[union-attr]
        bob.send_message(mto="anna@a.test", mbody="again", mtype="chat")
        assert (await next_message(anna))["body"] == "again"
        assert [c for c in federation.xmppd.s2s.connections if c.outgoing] == outgoing  # type: ignore[union-attr]
        assert len(outgoing) == 1 and outgoing[0].stream.mechanism == "EXTERNAL"
        incoming = [c for c in federation.xmppd.s2s.connections if not c.outgoing]  # type: ignore[union-attr]
        assert [c.stream.authenticated_domain for c in incoming] == ["a.test"]
        metrics = exposition(federation.xmppd).decode()
        for direction in ("in", "out"):
            line = f'xmppd_s2s_connections{{direction="{direction}",mechanism="EXTERNAL"}} 1.0'
            assert line in metrics


async def test_presence_subscription_both_ways(federation: Federation) -> None:
    async with federation.users() as (bob, anna):
        await subscribed(bob, anna)
        await asyncio.wait_for(bob.presence_from("anna@a.test"), 20)
        await asyncio.wait_for(anna.presence_from("bob@b.test"), 20)
        assert bob.pushed == {"anna@a.test": "both"}
        assert anna.pushed == {"bob@b.test": "both"}


async def test_no_such_domain_bounces(federation: Federation) -> None:
    async with signed_in(xmppd_user(federation.xmppd)) as (bob,):
        message = bob.make_message(mto="someone@nowhere.test", mbody="anyone?", mtype="chat")
        message["id"] = "m1"
        message.send()
        error = await asyncio.wait_for(bob.errors.get(), 15)
        assert error["type"] == "error"
        assert error["id"] == "m1"
        assert error["error"]["condition"] == "remote-server-not-found"
        assert str(error["from"]) == "someone@nowhere.test"
        # Found out through DNS: both kinds of SRV record at once (XEP-0368), then the
        # domain's address (RFC 6120 3.2).
        queries = federation.dns.queries
        assert sorted(queries[:2]) == [
            ("_xmpp-server._tcp.nowhere.test", "SRV"),
            ("_xmpps-server._tcp.nowhere.test", "SRV"),
        ]
        assert queries[2:] == [("nowhere.test", "A")]
        assert "nowhere.test does not exist" in error["error"]["text"]
        metrics = exposition(federation.xmppd).decode()
        assert 'xmppd_s2s_link_failures_total{condition="remote-server-not-found"} 1.0' in metrics


async def test_dialback_when_our_certificate_does_not_validate(
    tmp_path: Path, federate: Federate
) -> None:
    # xmppd's certificate comes from a CA Prosody does not know: no SASL EXTERNAL for
    # us, so xmppd authenticates with dialback, and Prosody checks the key by asking
    # b.test (xmppd again, on the stream Prosody opens to it).
    folder = tmp_path / "unknown-ca"
    folder.mkdir()
    federation = await federate(xmppd_ca=make_ca(folder, "unknown CA"), secure_auth=False)
    async with federation.users() as (bob, anna):
        await message_across(bob, anna, "anna@a.test", "via dialback")
        assert federation.xmppd.s2s is not None
        outgoing = [c for c in federation.xmppd.s2s.connections if c.outgoing]
        assert [c.stream.mechanism for c in outgoing] == ["dialback"]
        assert "Accepting SASL EXTERNAL identity from b.test" not in federation.prosody.log


async def test_remote_contact_offline_message_probe_and_disco(federation: Federation) -> None:
    async with federation.users() as (bob, anna):
        gone: asyncio.Queue[slixmpp.Presence] = asyncio.Queue()
        anna.add_event_handler("presence_unavailable", gone.put_nowait)
        await subscribed(bob, anna)
        await close(bob)
        # Bob's contact on a.test is told he left (the broadcast copies, bounce=False).
        left = await asyncio.wait_for(gone.get(), 20)
        assert str(left["from"]) == "bob@b.test/desk"

        anna.send_message(mto="bob@b.test", mbody="while you were away", mtype="chat")
        # A disco#info query to b.test itself, on the same stream after the message:
        # answered once the message was routed (to offline storage).
        info = anna.make_iq_get(queryxmlns="http://jabber.org/protocol/disco#info", ito="b.test")
        result = await info.send(timeout=20)
        features = {
            f.get("var") for f in result.xml.iter("{http://jabber.org/protocol/disco#info}feature")
        }
        assert "urn:xmpp:ping" in features
        await federation.xmppd.router.drain()
        assert federation.xmppd.router.ledger.offline == 1

        while not anna.available.empty():
            anna.available.get_nowait()
        async with signed_in(xmppd_user(federation.xmppd)) as (bob,):
            stored = await next_message(bob)
            assert (stored["body"], stored["from"].bare) == ("while you were away", "anna@a.test")
            # Bob's initial presence probes anna on a.test (Prosody answers), and reaches her.
            async with asyncio.timeout(20):
                while (await bob.available.get())["from"].bare != "anna@a.test":
                    pass
                while (await anna.available.get())["from"].bare != "bob@b.test":
                    pass


async def test_shutdown_tells_remote_contacts(federation: Federation) -> None:
    async with federation.users() as (bob, anna):
        gone: asyncio.Queue[slixmpp.Presence] = asyncio.Queue()
        anna.add_event_handler("presence_unavailable", gone.put_nowait)
        await subscribed(bob, anna)
        # The node's s2s streams close only after its sessions ended: the unavailable
        # presence of each still reaches its remote contacts.
        await federation.xmppd.stop()
        left = await asyncio.wait_for(gone.get(), 20)
        assert str(left["from"]) == "bob@b.test/desk"


async def test_srv_discovery(federate: Federate) -> None:
    federation = await federate(srv=True)
    async with federation.users() as (bob, anna):
        bob.send_message(mto="anna@a.test", mbody="found you", mtype="chat")
        got = await next_message(anna)
        assert got["body"] == "found you"
        # The SRV record's target and port, its address from the same DNS server.
        queries = federation.dns.queries
        assert sorted(queries[:2]) == [
            ("_xmpp-server._tcp.a.test", "SRV"),
            ("_xmpps-server._tcp.a.test", "SRV"),
        ]
        assert queries[2:] == [("a.test", "A"), ("a.test", "AAAA")]
        assert federation.xmppd.s2s is not None
        assert [c.direct_tls for c in federation.xmppd.s2s.outgoing()] == [False]


async def test_direct_tls_both_ways(federate: Federate) -> None:
    federation = await federate(srv=True, direct_tls=True)
    async with federation.users() as (bob, anna):
        bob.send_message(mto="anna@a.test", mbody="over direct TLS", mtype="chat")
        anna.send_message(mto="bob@b.test/desk", mbody="and back", mtype="chat")
        got, back = await next_message(anna), await next_message(bob)
        assert (got["body"], back["body"]) == ("over direct TLS", "and back")
        s2s = federation.xmppd.s2s
        assert s2s is not None
        # xmppd took a.test's _xmpps-server record (the better priority): TLS from the
        # first byte to Prosody's direct TLS port, SNI a.test, ALPN offered.
        (out,) = s2s.outgoing()
        assert out.direct_tls and out.stream.mechanism == "EXTERNAL"
        assert out.peer.endswith(f":{federation.prosody.direct_tls_port}")
        ssl_object = out.transport.get_extra_info("ssl_object")  # type: ignore[union-attr]
        assert ssl_object.server_hostname == "a.test"
        # Prosody came to xmppd's direct TLS listener and authenticated there.
        (incoming,) = [c for c in s2s.connections if not c.outgoing]
        assert incoming.direct_tls
        assert (incoming.stream.authenticated_domain, incoming.stream.mechanism) == (
            "a.test",
            "EXTERNAL",
        )
        assert "Stream encrypted" in federation.prosody.log


async def test_xmppctl_s2s_lists_the_live_streams(federation: Federation) -> None:
    async with federation.users() as (bob, anna):
        code, out, err = await xmppctl(federation.xmppd, "s2s")
        assert (code, out) == (0, ""), err  # no stream yet
        bob.send_message(mto="anna@a.test", mbody="one", mtype="chat")
        bob.send_message(mto="anna@a.test", mbody="two", mtype="chat")
        assert [(await next_message(anna))["body"] for _ in range(2)] == ["one", "two"]
        anna.send_message(mto="bob@b.test/desk", mbody="three", mtype="chat")
        assert (await next_message(bob))["body"] == "three"

        code, out, err = await xmppctl(federation.xmppd, "s2s")
        assert code == 0, err
        rows = sorted(line.split("\t") for line in out.splitlines())
        # DIRECTION REMOTE LOCAL AUTH TLS SINCE IN OUT PEER NODE BIDI
        assert [r[:5] + r[6:8] + r[9:] for r in rows] == [
            ["in", "a.test", "b.test", "EXTERNAL", "starttls", "1", "0", "-", "-"],
            ["out", "a.test", "b.test", "EXTERNAL", "starttls", "0", "2", "-", "-"],
        ]
        assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", r[5]) for r in rows)
        assert rows[1][8] == f"{PROSODY_ADDRESS}:{federation.prosody.s2s_port}"
        assert re.fullmatch(r"127\.[\d.]+:\d+", rows[0][8])  # Prosody's source address

        code, out, err = await xmppctl(federation.xmppd, "s2s", "elsewhere.test")
        assert (code, out) == (0, ""), err


def _streams(server: Server) -> list[tuple[str, str, bool, int, int]]:
    """(direction, remote, bidi, stanzas in, out) of each s2s stream of `server`."""
    assert server.s2s is not None
    return sorted(
        ("out" if c.outgoing else "in", c.remote, c.stream.bidi, c.stanzas_in, c.stanzas_out)
        for c in server.s2s.connections
    )


@pytest.mark.parametrize("first", ["xmppd", "prosody"])
async def test_bidirectional_stream(federate: Federate, first: str) -> None:
    # XEP-0288: whoever opens the stream asks for bidi (Prosody's mod_s2s_bidi or
    # xmppd), the other offers it; the answer then comes back on the same stream.
    federation = await federate(bidi=True)
    async with federation.users() as (bob, anna):
        if first == "xmppd":
            bob.send_message(mto="anna@a.test", mbody="one stream", mtype="chat")
            got = await next_message(anna)
            anna.send_message(mto="bob@b.test/desk", mbody="both ways", mtype="chat")
            back = await next_message(bob)
        else:
            anna.send_message(mto="bob@b.test/desk", mbody="one stream", mtype="chat")
            got = await next_message(bob)
            bob.send_message(mto="anna@a.test", mbody="both ways", mtype="chat")
            back = await next_message(anna)
        assert (got["body"], back["body"]) == ("one stream", "both ways")
        direction = "out" if first == "xmppd" else "in"
        assert _streams(federation.xmppd) == [(direction, "a.test", True, 1, 1)]


def _reconciles(ledger: dict[str, object]) -> bool:
    """The ledger's equation (xmppd/ledger.py), federation included."""
    counts = {k: v for k, v in ledger.items() if isinstance(v, int)}
    dropped = ledger["dropped"]
    assert isinstance(dropped, dict)
    return counts["received"] + counts["from_remote"] == (
        counts["delivered"]
        - counts["copies"]
        - counts["replayed"]
        - counts["rerouted"]
        + counts["offline"]
        + counts["bounced"]
        + counts["to_remote"]
        + sum(dropped.values())
    )


async def test_the_ledger_counts_federated_messages(federation: Federation) -> None:
    async with federation.users() as (bob, anna):
        ledger = federation.xmppd.router.ledger
        # Queued while the stream to a.test is set up, then handed to it.
        bob.send_message(mto="anna@a.test", mbody="one", mtype="chat")
        bob.send_message(mto="anna@a.test", mbody="two", mtype="chat")
        assert [(await next_message(anna))["body"] for _ in range(2)] == ["one", "two"]
        anna.send_message(mto="bob@b.test/desk", mbody="three", mtype="chat")
        assert (await next_message(bob))["body"] == "three"
        # Queued for a domain whose stream cannot be set up: bounced, counted so.
        bob.send_message(mto="someone@nowhere.test", mbody="anyone?", mtype="chat")
        error = await asyncio.wait_for(bob.errors.get(), 15)
        assert error["error"]["condition"] == "remote-server-not-found"
        await federation.xmppd.router.drain()
        snapshot = ledger.snapshot()
        assert (snapshot["received"], snapshot["to_remote"], snapshot["bounced"]) == (3, 2, 1)
        assert (snapshot["from_remote"], snapshot["delivered"]) == (1, 1)
        assert snapshot["lost"] == 0 and _reconciles(snapshot), snapshot
        metrics = exposition(federation.xmppd).decode()
        assert "xmppd_messages_to_remote_total 2.0" in metrics
        assert "xmppd_messages_from_remote_total 1.0" in metrics


PRIVACY = "jabber:iq:privacy"


def _condition(error: slixmpp.Message) -> str:
    assert error["type"] == "error", error
    return str(error["error"]["condition"])


async def _refused_in_order(anna: Peer, bob: Peer, status: str) -> None:
    """anna changes her presence, then writes to bob: the message comes back as
    <service-unavailable/>, so xmppd had handled the presence before it (one stream,
    in order), and bob got neither."""
    anna.send_presence(pstatus=status)
    message = anna.make_message(mto="bob@b.test", mbody=f"{status}: refused", mtype="chat")
    message["id"] = f"refused-{status}"
    message.send()
    error = await asyncio.wait_for(anna.errors.get(), 20)
    assert (error["id"], _condition(error)) == (f"refused-{status}", "service-unavailable")
    assert str(error["from"]) == "bob@b.test"
    # A round trip for bob: whatever xmppd wrote to him before has arrived.
    await bob.make_iq_get(queryxmlns="http://jabber.org/protocol/disco#info", ito="b.test").send(
        timeout=10
    )
    assert bob.messages.empty()
    seen = []
    while not bob.available.empty():
        seen.append(bob.available.get_nowait())
    # (Her earlier presences may still be in the queue: this one has the status.)
    assert not [p for p in seen if p["status"] == status], seen


async def test_blocking_a_remote_contact(federation: Federation) -> None:
    async with federation.users() as (bob, anna):
        gone: asyncio.Queue[slixmpp.Presence] = asyncio.Queue()
        anna.add_event_handler("presence_unavailable", gone.put_nowait)
        bob.register_plugin("xep_0191")
        await subscribed(bob, anna)
        # XEP-0191 3.3: blocking a contact who sees bob's presence sends them bob's
        # unavailable presence, across to a.test.
        await bob.plugin["xep_0191"].block(slixmpp.JID("anna@a.test"), timeout=10)
        left = await asyncio.wait_for(gone.get(), 20)
        assert str(left["from"]) == "bob@b.test/desk"
        # Her presence and messages from a.test stop at xmppd; the message is answered.
        await _refused_in_order(anna, bob, "blocked")
        # bob's own message to her is refused by his server, with <blocked/>.
        bob.send_message(mto="anna@a.test", mbody="to a blocked contact", mtype="chat")
        error = await asyncio.wait_for(bob.errors.get(), 10)
        assert _condition(error) == "not-acceptable"
        assert error.xml.find(".//{urn:xmpp:blocking:errors}blocked") is not None
        # Unblocked: she sees bob again, and her messages arrive.
        while not anna.available.empty():
            anna.available.get_nowait()
        await bob.plugin["xep_0191"].unblock(slixmpp.JID("anna@a.test"), timeout=10)
        async with asyncio.timeout(20):
            while (await anna.available.get())["from"] != "bob@b.test/desk":
                pass
        await message_across(anna, bob, "bob@b.test", "unblocked")


async def test_privacy_list_denying_a_remote_contact(federation: Federation) -> None:
    async with federation.users() as (bob, anna):
        gone: asyncio.Queue[slixmpp.Presence] = asyncio.Queue()
        anna.add_event_handler("presence_unavailable", gone.put_nowait)
        await subscribed(bob, anna)

        async def privacy(inner: str) -> None:
            iq = bob.make_iq_set()
            iq.append(ET.fromstring(f"<query xmlns='{PRIVACY}'>{inner}</query>"))
            await iq.send(timeout=10)

        # XEP-0016: a list denying anna@a.test messages and presence both ways.
        await privacy(
            "<list name='no-anna'>"
            "<item type='jid' value='anna@a.test' action='deny' order='1'>"
            "<message/><presence-in/><presence-out/></item>"
            "<item action='allow' order='2'/></list>"
        )
        await privacy("<default name='no-anna'/>")
        # Made the default, it hides bob from her: she is sent his unavailable presence.
        left = await asyncio.wait_for(gone.get(), 20)
        assert str(left["from"]) == "bob@b.test/desk"
        await _refused_in_order(anna, bob, "denied")
        # Declined (no default list): her messages arrive again.
        await privacy("<default/>")
        await message_across(anna, bob, "bob@b.test", "allowed again")


async def test_prosody_authenticates_by_dialback_when_its_certificate_does_not_validate(
    federate: Federate, tmp_path: Path
) -> None:
    """Prosody's certificate is from a CA xmppd does not trust: the TLS handshake still
    succeeds, xmppd offers dialback instead of EXTERNAL (s2s.accept_dialback), asks
    a.test's authoritative server (Prosody) about the key with db:verify, and takes the
    stream; being bidirectional (XEP-0288), it also carries bob's answer back (xmppd
    could not open a stream of its own to a server whose certificate it does not trust)."""
    fed = await federate(
        prosody_ca=make_ca(tmp_path, "untrusted CA"),
        secure_auth=False,
        bidi=True,
        accept_dialback=True,
    )
    async with fed.users() as (bob, anna):
        await message_across(anna, bob, "bob@b.test/desk", "hello by dialback")
        code, out, err = await xmppctl(fed.xmppd, "s2s")
        assert code == 0, err
        rows = [line.split("\t") for line in out.splitlines()]
        assert [r[:4] for r in rows] == [["in", "a.test", "b.test", "dialback"]]
        await message_across(bob, anna, "anna@a.test/home", "hello back")


async def test_a_dialback_key_that_does_not_verify_is_refused(federate: Federate) -> None:
    """A stream that claims a.test (no certificate) and gives a made-up key: xmppd asks
    a.test's authoritative server (Prosody), which says invalid; the peer gets
    db:result type='invalid' and <not-authorized/>, and its stanza reaches nobody."""
    fed = await federate(secure_auth=False, accept_dialback=True)
    bob = await xmppd_user(fed.xmppd)
    assert fed.xmppd.s2s is not None
    reader, writer = await asyncio.open_connection(XMPPD_ADDRESS, fed.xmppd.s2s.listening[0][1])
    try:
        writer.write(header("a.test"))
        await read_features(reader)
        writer.write(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        await read_until(reader, b"<proceed")
        await writer.start_tls(
            ssl.create_default_context(cafile=str(fed.ca.path)), server_hostname="b.test"
        )
        writer.write(header("a.test"))
        features = await read_features(reader)
        assert b"urn:xmpp:features:dialback" in features
        assert b"EXTERNAL" not in features
        writer.write(
            b"<db:result xmlns:db='jabber:server:dialback' from='a.test' to='b.test'>"
            b"0123456789abcdef</db:result>"
        )
        rest = await read_to_end(reader)
        assert re.search(rb"<db:result [^>]*type=.invalid", rest), rest
        assert b"<not-authorized" in rest
        assert "dialback" in fed.prosody.log  # Prosody was asked (db:verify)
        incoming = [c for c in fed.xmppd.s2s.connections if not c.outgoing]
        assert all(c.stream.authenticated_domain is None for c in incoming)
        # Nothing from the refused stream reached bob: his next message is his own.
        bob.send_message(mto="bob@b.test/desk", mbody="marker", mtype="chat")
        assert (await next_message(bob))["body"] == "marker"
    finally:
        writer.close()
        await close(bob)
