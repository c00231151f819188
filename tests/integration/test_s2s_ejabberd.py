"""Federation with a real ejabberd: users of xmppd (b.test) and of ejabberd (c.test) talk.

ejabberd (Debian's 23.01) runs on 127.0.18.4, xmppd on 127.0.18.3, each with a
certificate from a CA this module makes and both trust. Each side finds the
other through DNS: a DNS server on 127.0.18.1 (tests/integration/s2s_ejabberd.py)
answers `_xmpp-server._tcp` SRV and A records for both domains, and is the
only name server of both. ejabberd is started once for the module (it takes
about two seconds); each test starts its own xmppd on the same address and
port, on the embedded and the cloud storage. In CI a missing ejabberd fails;
elsewhere the tests skip.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

import pytest
import slixmpp
from slixmpp.jid import JID

from tests.integration.clients import close
from tests.integration.conftest import StartServer
from tests.integration.s2s_clients import (
    Peer,
    message_across,
    signed_in,
    subscribed,
    user_at,
    xmppd_user,
)
from tests.integration.s2s_ejabberd import (
    EJABBERD_ADDRESS,
    Ejabberd,
    ThreadedDNS,
    require_ejabberd,
    start_ejabberd,
)
from tests.integration.s2s_peers import (
    CA,
    XMPPD_ADDRESS,
    free_port,
    make_ca,
    xmppd_s2s,
    xmppd_tls,
)
from xmppd.server import Server

require_ejabberd()

PASSWORDS = {"carl": "carl-secret", "cleo": "cleo-secret"}


@dataclass
class Peers:
    ca: CA
    dns: ThreadedDNS
    ejabberd: Ejabberd
    xmppd_port: int  # where every test's xmppd listens for s2s (the SRV record says so)


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peers]:
    folder = tmp_path_factory.mktemp("ejabberd-peer")
    ca = make_ca(folder)
    xmppd_port = free_port(XMPPD_ADDRESS)
    records: dict[tuple[str, str], list[str]] = {
        ("_xmpp-server._tcp.b.test", "SRV"): [f"0 5 {xmppd_port} b.test."],
        ("c.test", "A"): [EJABBERD_ADDRESS],
    }
    dns = ThreadedDNS(records)
    try:
        ejabberd = start_ejabberd(
            folder / "ejabberd",
            ca,
            dns_port=dns.port,
            hosts={"b.test": XMPPD_ADDRESS},
            users=PASSWORDS,
        )
    except BaseException:
        dns.close()
        raise
    records[("_xmpp-server._tcp.c.test", "SRV")] = [f"0 5 {ejabberd.s2s_port} c.test."]
    try:
        yield Peers(ca, dns, ejabberd, xmppd_port)
    finally:
        ejabberd.stop()
        dns.close()


@dataclass
class Federation:
    peers: Peers
    xmppd: Server

    @property
    def ejabberd(self) -> Ejabberd:
        return self.peers.ejabberd

    def users(self, user: str = "carl") -> AbstractAsyncContextManager[tuple[Peer, ...]]:
        """bob (xmppd) and `user` (ejabberd) logged in for the block; a timeout in it
        fails the test with ejabberd's log."""
        return signed_in(
            xmppd_user(self.xmppd), ejabberd_user(self.ejabberd, user), diagnose=self.diagnose
        )

    def diagnose(self) -> str:
        return f"DNS queries: {self.peers.dns.queries}\nejabberd log:\n" + self.ejabberd.log[-6000:]


Federate = Callable[..., Awaitable[Federation]]


@pytest.fixture
async def federate(
    tmp_path: Path, start_server: StartServer, peers: Peers
) -> AsyncIterator[Federate]:
    async def start(
        *, xmppd_ca: CA | None = None, trusted_ca: CA | None = None, accept_dialback: bool = False
    ) -> Federation:
        """xmppd (b.test) federating with the module's ejabberd; `xmppd_ca`: the CA of
        xmppd's certificate, default the one ejabberd trusts; `trusted_ca`: the CA xmppd
        trusts, default the one of ejabberd's certificate; `accept_dialback`: xmppd's
        s2s.accept_dialback."""
        server = await start_server(
            users={},
            hosts=["b.test"],
            # dNSName only: ejabberd 23.01 (p1_xmpp 1.6.1) crashes on an XmppAddr in a
            # peer's certificate (xmpp_stream_pkix:get_cert_domains, `binary ++ list`).
            tls=xmppd_tls(tmp_path / "xmppd-cert", xmppd_ca or peers.ca, xmpp_addrs=[]),
            s2s=xmppd_s2s(
                trusted_ca or peers.ca,
                [{"address": XMPPD_ADDRESS, "port": peers.xmppd_port}],
                peers.dns.port,
                accept_dialback=accept_dialback,
            ),
        )
        await server.accounts["b.test"].register("bob", "bob-secret")
        return Federation(peers, server)

    yield start


@pytest.fixture
async def federation(federate: Federate) -> Federation:
    return await federate()


async def ejabberd_user(peer: Ejabberd, user: str) -> Peer:
    # A fresh resource each time: ejabberd keeps sessions of earlier tests' clients
    # only until they close, but the resource never collides.
    jid = f"{user}@{peer.domain}/t{uuid.uuid4().hex[:6]}"
    return await user_at(peer.address, peer.c2s_port, jid, PASSWORDS[user])


def _mechanisms(server: Server) -> tuple[list[str | None], list[str | None]]:
    """How the s2s streams of `server` authenticated: (outgoing, incoming)."""
    assert server.s2s is not None
    conns = sorted(server.s2s.connections, key=lambda c: c.outgoing)
    return (
        [c.stream.mechanism for c in conns if c.outgoing],
        [c.stream.mechanism for c in conns if not c.outgoing],
    )


async def test_messages_both_ways(federation: Federation) -> None:
    async with federation.users() as (bob, carl):
        await message_across(bob, carl, "carl@c.test", "hello from b.test")
        await message_across(carl, bob, "bob@b.test/desk", "hello from c.test")
        # Certificates validated both ways: SASL EXTERNAL, not dialback, each way.
        assert _mechanisms(federation.xmppd) == (["EXTERNAL"], ["EXTERNAL"])


async def test_presence_subscription_both_ways(federation: Federation) -> None:
    async with federation.users("cleo") as (bob, cleo):
        try:
            await subscribed(cleo, bob)  # from ejabberd's side this time
            await asyncio.wait_for(cleo.presence_from("bob@b.test"), 20)
            await asyncio.wait_for(bob.presence_from("cleo@c.test"), 20)
            # Bob leaves: cleo is told, through the subscription ejabberd stored.
            gone: asyncio.Queue[slixmpp.Presence] = asyncio.Queue()
            cleo.add_event_handler("presence_unavailable", gone.put_nowait)
            await close(bob)
            left = await asyncio.wait_for(gone.get(), 20)
            assert str(left["from"]) == "bob@b.test/desk"
        finally:
            # ejabberd outlives the test: cleo's side of the subscription goes.
            cleo.send_presence(pto="bob@b.test", ptype="unsubscribed")
            cleo.del_roster_item("bob@b.test")


async def test_vcard_and_disco_both_ways(federation: Federation) -> None:
    async with federation.users() as (bob, carl):
        for client, name in ((bob, "Bob of b.test"), (carl, "Carl of c.test")):
            vcard = client.plugin["xep_0054"].make_vcard()
            vcard["FN"] = name
            await client.plugin["xep_0054"].publish_vcard(vcard, timeout=10)
        # Each asks the other's server for the other's vCard (answered by that server).
        try:
            theirs = await bob.plugin["xep_0054"].get_vcard(
                JID("carl@c.test"), local=False, cached=False, timeout=20
            )
            ours = await carl.plugin["xep_0054"].get_vcard(
                JID("bob@b.test"), local=False, cached=False, timeout=20
            )
        except slixmpp.exceptions.IqTimeout:
            pytest.fail("no vCard across\n" + federation.diagnose())
        assert theirs["vcard_temp"]["FN"] == "Carl of c.test"
        assert ours["vcard_temp"]["FN"] == "Bob of b.test"

        disco = "http://jabber.org/protocol/disco#info"
        for client, domain, feature in (
            (bob, "c.test", "vcard-temp"),  # ejabberd's mod_vcard
            (carl, "b.test", "urn:xmpp:ping"),  # xmppd's ping module
        ):
            result = await client.make_iq_get(queryxmlns=disco, ito=domain).send(timeout=20)
            assert str(result["from"]) == domain
            features = {f.get("var") for f in result.xml.iter(f"{{{disco}}}feature")}
            assert feature in features, (domain, features)


async def test_bounces(federation: Federation) -> None:
    async with federation.users() as (bob, carl):
        carl_errors: asyncio.Queue[slixmpp.Message] = asyncio.Queue()
        # To a domain that does not exist in the DNS both use: bounced by xmppd.
        message = bob.make_message(mto="someone@nowhere.test", mbody="anyone?", mtype="chat")
        message["id"] = "m1"
        message.send()
        error = await asyncio.wait_for(bob.errors.get(), 15)
        assert (error["id"], error["error"]["condition"]) == ("m1", "remote-server-not-found")
        assert ("nowhere.test", "A") in federation.peers.dns.queries

        # To a user b.test does not have: xmppd's error goes back across to carl.
        carl.add_event_handler("message_error", carl_errors.put_nowait)
        message = carl.make_message(mto="ghost@b.test", mbody="boo", mtype="normal")
        message["id"] = "m2"
        message.send()
        try:
            back = await asyncio.wait_for(carl_errors.get(), 20)
        except TimeoutError:
            pytest.fail("carl got no error\n" + federation.diagnose())
        assert (back["id"], str(back["from"])) == ("m2", "ghost@b.test")
        assert back["error"]["condition"] == "service-unavailable"


async def test_dialback_when_our_certificate_does_not_validate(
    tmp_path: Path, federate: Federate
) -> None:
    # xmppd's certificate comes from a CA ejabberd does not know: ejabberd offers no
    # SASL EXTERNAL, so xmppd authenticates with dialback, and ejabberd checks the key
    # by asking b.test (xmppd again, on a stream ejabberd opens to it).
    folder = tmp_path / "unknown-ca"
    folder.mkdir()
    federation = await federate(xmppd_ca=make_ca(folder, "unknown CA"))
    async with federation.users() as (bob, carl):
        await message_across(bob, carl, "carl@c.test", "via dialback")
        outgoing, _ = _mechanisms(federation.xmppd)
        # ejabberd answered our key type='valid' after checking it with b.test.
        assert outgoing == ["dialback"]


async def test_ejabberd_authenticates_by_dialback_when_its_certificate_does_not_validate(
    federate: Federate, tmp_path: Path
) -> None:
    """xmppd trusts another CA than the one of ejabberd's certificate: the TLS handshake
    still succeeds, xmppd offers dialback (s2s.accept_dialback), ejabberd sends a key,
    xmppd verifies it with ejabberd (db:verify) and the message arrives. (ejabberd has no
    XEP-0288, so the answer cannot go back on that stream: xmppd's own stream to a
    server whose certificate it does not trust fails.)"""
    fed = await federate(trusted_ca=make_ca(tmp_path, "another CA"), accept_dialback=True)
    async with fed.users() as (bob, carl):
        await message_across(carl, bob, "bob@b.test/desk", "hello by dialback")
        assert _mechanisms(fed.xmppd)[1] == ["dialback"]
