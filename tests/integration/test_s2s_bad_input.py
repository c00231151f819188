"""Server streams that misbehave: each gets the RFC 6120 stream error, nothing is delivered.

The peer here is a hand-driven stream (asyncio streams with STARTTLS and a
client certificate from the test CA), since no real server sends these.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
import slixmpp

from tests.integration.clients import Client, close, insecure_context, read_until
from tests.integration.conftest import StartServer, port_of
from tests.integration.s2s_peers import CA, PROSODY_ADDRESS, XMPPD_ADDRESS, issue, make_ca
from xmppd.server import Server

PEER_ADDRESS = PROSODY_ADDRESS  # where a.test is, played here by a fake
_FEATURES = re.compile(rb"<stream:features[^>]*/>|</stream:features>")


def header(sender: str) -> bytes:
    return (
        "<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
        f"xmlns:stream='http://etherx.jabber.org/streams' from='{sender}' to='b.test' "
        "version='1.0'>"
    ).encode()


async def read_features(reader: asyncio.StreamReader) -> bytes:
    buf = b""
    async with asyncio.timeout(10):
        while not _FEATURES.search(buf):
            chunk = await reader.read(65536)
            if not chunk:
                raise EOFError(buf)
            buf += chunk
    return buf


async def read_to_end(reader: asyncio.StreamReader) -> bytes:
    """Everything until the server closes the connection."""
    buf = b""
    async with asyncio.timeout(10):
        while chunk := await reader.read(65536):
            buf += chunk
    return buf


@dataclass
class Setup:
    server: Server
    ca: CA
    folder: Path

    @property
    def port(self) -> int:
        assert self.server.s2s is not None
        return self.server.s2s.listening[0][1]

    async def secured(
        self, sender: str, cert_domain: str, issuer: CA | None = None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
        """A stream from `sender` after STARTTLS, presenting a certificate for
        `cert_domain` from `issuer` (default: the CA of `s2s.ca_file`); returns the
        features the server offered then."""
        reader, writer = await asyncio.open_connection(XMPPD_ADDRESS, self.port)
        writer.write(header(sender))
        await read_features(reader)
        writer.write(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        await read_until(reader, b"<proceed")
        ctx = ssl.create_default_context(cafile=str(self.ca.path))
        ctx.load_cert_chain(*issue(issuer or self.ca, self.folder, cert_domain))
        await writer.start_tls(ctx, server_hostname="b.test")
        writer.write(header(sender))
        return reader, writer, await read_features(reader)

    async def authenticated(
        self, domain: str, bidi: bool = False
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A stream from `domain`, authenticated; with `bidi`, made bidirectional
        (XEP-0288), so that what the server sends `domain` comes back on it."""
        reader, writer, features = await self.secured(domain, domain)
        assert b"<mechanism>EXTERNAL</mechanism>" in features
        if bidi:
            writer.write(b"<bidi xmlns='urn:xmpp:bidi'/>")
        writer.write(
            b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>"
        )
        await read_until(reader, b"<success")
        writer.write(header(domain))
        await read_features(reader)
        return reader, writer


async def make_setup(
    tmp_path: Path,
    start_server: StartServer,
    hosts: tuple[str, ...] = ("b.test",),
    sections: dict[str, object] | None = None,
    **s2s: object,
) -> Setup:
    """b.test with its s2s listener; `sections`: more top-level config sections."""
    ca = make_ca(tmp_path)
    cert, key = issue(ca, tmp_path, "b.test")
    server = await start_server(
        users={},
        hosts=list(hosts),
        tls={"cert": str(cert), "key": str(key)},
        **(sections or {}),
        s2s={
            "listeners": [{"address": XMPPD_ADDRESS, "port": 0}],
            "ca_file": str(ca.path),
            "auth_timeout": 1.0,
            "max_stanza_bytes": 10240,
            **s2s,
        },
    )
    await server.accounts["b.test"].register("bob", "bob-secret")
    return Setup(server, ca, tmp_path)


@pytest.fixture
async def setup(tmp_path: Path, start_server: StartServer) -> Setup:
    return await make_setup(tmp_path, start_server)


async def bob(server: Server, jid: str = "bob@b.test/desk", password: str = "bob-secret") -> Client:
    client = Client(jid, password)
    client.ssl_context = insecure_context()
    client.enable_direct_tls = False
    client.enable_plaintext = False
    client.connect("127.0.0.1", port_of(server, "starttls"))
    await asyncio.wait_for(client.started.wait(), 15)
    client.send_presence()
    return client


async def nothing_more_for(client: Client) -> None:
    """The client's next message is one it sends itself now: nothing came before it."""
    client.send_message(mto=client.boundjid, mbody="marker")
    got = await asyncio.wait_for(client.messages.get(), 10)
    assert got["body"] == "marker", f"delivered: {got}"


def message(sender: str, body: str) -> bytes:
    return (
        f"<message from='{sender}' to='bob@b.test/desk' type='chat'><body>{body}</body></message>"
    ).encode()


async def test_spoofed_from_is_a_stream_error(setup: Setup) -> None:
    client = await bob(setup.server)
    try:
        reader, writer = await setup.authenticated("a.test")
        writer.write(message("anna@a.test/home", "genuine"))
        got = await asyncio.wait_for(client.messages.get(), 10)
        assert (got["body"], str(got["from"])) == ("genuine", "anna@a.test/home")
        writer.write(message("mallory@c.test/x", "spoofed"))
        rest = await read_to_end(reader)
        assert b"<invalid-from xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" in rest.replace(
            b'"', b"'"
        )
        assert rest.endswith(b"</stream:stream>")
        await nothing_more_for(client)
        writer.close()
    finally:
        await close(client)


async def test_a_stanza_for_another_of_our_domains_ends_the_stream(
    tmp_path: Path, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The node serves b.test and d.test; a.test's stream was opened to b.test, so
    it carries the pair (a.test, b.test) only (RFC 6120 8.1.1.2): a stanza for d.test
    on it ends it with <host-unknown/>, reaches nobody, and the end is logged."""
    caplog.set_level(logging.INFO, logger="xmppd.s2s")
    setup = await make_setup(tmp_path, start_server, hosts=("b.test", "d.test"))
    await setup.server.accounts["d.test"].register("dora", "dora-secret")
    dora = await bob(setup.server, "dora@d.test/home", "dora-secret")
    try:
        reader, writer = await setup.authenticated("a.test")
        writer.write(message("anna@a.test/home", "not on this stream").replace(
            b"bob@b.test/desk", b"dora@d.test/home"
        ))
        rest = (await read_to_end(reader)).replace(b'"', b"'")
        assert b"<host-unknown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" in rest, rest
        assert b"this stream is to b.test, not to d.test" in rest, rest
        await nothing_more_for(dora)
        writer.close()
    finally:
        await close(dora)
    ended = [r.getMessage() for r in caplog.records if "ended: host-unknown" in r.getMessage()]
    assert any("incoming stream from a.test" in m for m in ended), ended


@pytest.mark.parametrize(
    ("stanza", "reply_id"),
    [
        (
            "<iq from='anna@a.test/home' to='bob@b.test/desk' type='bogus' id='q1'>"
            "<ping xmlns='urn:xmpp:ping'/></iq>",
            "q1",
        ),
        (
            "<iq from='anna@a.test/home' to='bob@b.test/desk' type='get'>"
            "<ping xmlns='urn:xmpp:ping'/></iq>",
            "",
        ),
        ("<iq from='anna@a.test/home' to='bob@b.test/desk' type='get' id='q2'/>", "q2"),
        ("<presence from='anna@a.test/home' to='bob@b.test/desk' type='online' id='q3'/>", "q3"),
    ],
)
async def test_a_malformed_stanza_gets_bad_request_and_reaches_nobody(
    setup: Setup, stanza: str, reply_id: str
) -> None:
    """The stream stays up; the <bad-request/> goes back to the sender (on this stream,
    which the peer made bidirectional), and bob gets nothing."""
    client = await bob(setup.server)
    try:
        reader, writer = await setup.authenticated("a.test", bidi=True)
        writer.write(stanza.encode())
        kind = stanza[1 : stanza.index(" ")].encode()
        data = (await read_until(reader, b"</" + kind + b">")).replace(b'"', b"'")
        start = data.index(b"<" + kind)
        assert f"id='{reply_id}'".encode() in data[start : data.index(b">", start)], data
        assert b"type='error'" in data and b"to='anna@a.test/home'" in data, data
        assert b"<error type='modify'><bad-request" in data, data
        await nothing_more_for(client)
        writer.close()
    finally:
        await close(client)


async def external_refused(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sender: str, client: Client
) -> None:
    """EXTERNAL tried anyway on a stream that was not offered it, and a message sent
    after: the SASL failure, the stream ended (not-authorized), nothing delivered."""
    writer.write(
        b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>"
    )
    writer.write(message(sender, "sneaking in"))
    rest = (await read_to_end(reader)).replace(b'"', b"'")
    assert b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>" in rest
    assert b"<not-authorized xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" in rest
    await nothing_more_for(client)
    writer.close()


async def test_certificate_for_another_domain_is_refused(setup: Setup) -> None:
    client = await bob(setup.server)
    try:
        reader, writer, features = await setup.secured("a.test", "evil.test")
        assert b"EXTERNAL" not in features  # not offered: the certificate names evil.test
        await external_refused(reader, writer, "anna@a.test/home", client)
    finally:
        await close(client)


async def test_a_ca_of_one_domain_vouches_for_that_domain_only(
    tmp_path: Path, start_server: StartServer
) -> None:
    """a.test has a CA of its own (`s2s.domains."a.test".ca_file`); every other peer's
    certificate chains to the CA of `s2s.ca_file`. OpenSSL takes a chain to either in
    the handshake (the peer is named only after it): the stream must then offer
    EXTERNAL only if the chain leads to a CA trusted for the domain its header names.
    So a.test's CA cannot vouch for c.test, and the general CA not for a.test."""
    own_ca = make_ca(tmp_path, "a.test CA")
    setup = await make_setup(
        tmp_path, start_server, domains={"a.test": {"ca_file": str(own_ca.path)}}
    )
    for claimed, issuer, offered in (
        ("a.test", own_ca, True),
        ("c.test", setup.ca, True),
        ("c.test", own_ca, False),
        ("a.test", setup.ca, False),
        ("a.test.", setup.ca, False),  # the same domain, written with its root dot
    ):
        domain = claimed.rstrip(".")
        reader, writer, features = await setup.secured(claimed, domain, issuer)
        assert (b"<mechanism>EXTERNAL</mechanism>" in features) is offered, (claimed, issuer)
        writer.close()
    # A certificate for c.test from a.test's CA: EXTERNAL refused when tried anyway,
    # and nothing it sends is delivered.
    client = await bob(setup.server)
    try:
        reader, writer, _ = await setup.secured("c.test", "c.test", own_ca)
        await external_refused(reader, writer, "carl@c.test/home", client)
    finally:
        await close(client)


async def test_chains_through_intermediate_cas_are_verified_per_domain(
    tmp_path: Path, start_server: StartServer
) -> None:
    """Peers present their certificate with an intermediate CA (as public CAs issue
    them); only the roots are configured: the general one as `s2s.ca_file`, a.test's
    own as its `ca_file`. The chain the peer sent is verified again for the domain
    claimed, the intermediate with it: EXTERNAL for each domain through its own root,
    not for c.test through a.test's."""
    general = make_ca(tmp_path, "general root", path_length=1)
    own = make_ca(tmp_path, "a.test root", path_length=1)
    setup = await make_setup(
        tmp_path,
        start_server,
        ca_file=str(general.path),
        domains={"a.test": {"ca_file": str(own.path)}},
    )
    via_general = make_ca(tmp_path, "general intermediate", issuer=general)
    via_own = make_ca(tmp_path, "a.test intermediate", issuer=own)
    for domain, issuer, offered in (
        ("a.test", via_own, True),
        ("c.test", via_general, True),
        ("c.test", via_own, False),
    ):
        reader, writer, features = await setup.secured(domain, domain, issuer)
        assert (b"<mechanism>EXTERNAL</mechanism>" in features) is offered, (domain, issuer)
        writer.close()


@pytest.mark.parametrize("claimed", ["b.test", "gateway.b.test", "b.test."])
async def test_a_peer_claiming_one_of_our_domains_is_refused(
    tmp_path: Path, start_server: StartServer, caplog: pytest.LogCaptureFixture, claimed: str
) -> None:
    """No remote server speaks for a domain this node serves, a host or a component's:
    a stream header naming one as 'from' ends the stream with <invalid-from/> at once,
    before TLS and any certificate or dialback key, and the end is logged."""
    caplog.set_level(logging.INFO, logger="xmppd.s2s")
    components = {
        "listeners": [{"address": "127.0.0.1", "port": 0}],
        "domains": {"gateway.b.test": {"secret": "gateway-secret-0123456789"}},
    }
    setup = await make_setup(tmp_path, start_server, sections={"components": components})
    reader, writer = await asyncio.open_connection(XMPPD_ADDRESS, setup.port)
    writer.write(header(claimed))
    rest = (await read_to_end(reader)).replace(b'"', b"'")
    assert b"<invalid-from xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" in rest, rest
    domain = claimed.rstrip(".")  # as addresses are prepared (RFC 7622)
    assert f"{domain} is served here".encode() in rest, rest
    assert b"starttls" not in rest
    assert rest.endswith(b"</stream:stream>")
    writer.close()
    ended = [r.getMessage() for r in caplog.records if "ended: invalid-from" in r.getMessage()]
    assert any(f"incoming stream from {domain}" in m for m in ended), ended


async def test_direct_tls_checks_the_certificate_for_the_domain_the_header_names(
    tmp_path: Path, start_server: StartServer
) -> None:
    # On a direct TLS listener (XEP-0368) the handshake comes before the stream header,
    # so the certificate's names are checked against the 'from' that follows: a.test
    # with a certificate for a.test gets EXTERNAL, with one for evil.test it does not.
    setup = await make_setup(
        tmp_path,
        start_server,
        listeners=[{"address": XMPPD_ADDRESS, "port": 0, "direct_tls": True}],
    )
    client = await bob(setup.server)
    try:
        for cert_domain, offered in (("a.test", True), ("evil.test", False)):
            ctx = ssl.create_default_context(cafile=str(setup.ca.path))
            ctx.load_cert_chain(*issue(setup.ca, setup.folder, cert_domain))
            ctx.set_alpn_protocols(["xmpp-server"])
            reader, writer = await asyncio.open_connection(
                XMPPD_ADDRESS, setup.port, ssl=ctx, server_hostname="b.test"
            )
            tls = writer.get_extra_info("ssl_object")
            assert tls.selected_alpn_protocol() == "xmpp-server"
            writer.write(header("a.test"))
            features = await read_features(reader)
            assert b"starttls" not in features  # already TLS
            assert (b"<mechanism>EXTERNAL</mechanism>" in features) is offered, cert_domain
            writer.write(
                b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>"
            )
            if offered:
                await read_until(reader, b"<success")
                writer.write(header("a.test"))
                await read_features(reader)
                writer.write(message("anna@a.test/home", "over direct TLS"))
                got = await asyncio.wait_for(client.messages.get(), 10)
                assert got["body"] == "over direct TLS"
            else:
                writer.write(message("anna@a.test/home", "sneaking in"))
                rest = (await read_to_end(reader)).replace(b'"', b"'")
                assert b"<not-authorized xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" in rest
                await nothing_more_for(client)
            writer.close()
    finally:
        await close(client)


async def test_stream_that_never_authenticates_is_closed(setup: Setup) -> None:
    reader, writer = await asyncio.open_connection(XMPPD_ADDRESS, setup.port)
    writer.write(header("a.test"))
    rest = (await read_to_end(reader)).replace(b'"', b"'")
    assert b"<connection-timeout xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" in rest
    writer.close()


async def test_oversized_stanza_is_a_policy_violation(setup: Setup) -> None:
    client = await bob(setup.server)
    try:
        reader, writer = await setup.authenticated("a.test")
        writer.write(message("anna@a.test/home", "x" * 20000))
        rest = (await read_to_end(reader)).replace(b'"', b"'")
        assert b"<policy-violation xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" in rest
        await nothing_more_for(client)
        writer.close()
    finally:
        await close(client)


async def test_idle_stream_is_closed(tmp_path: Path, start_server: StartServer) -> None:
    setup = await make_setup(tmp_path, start_server, idle_timeout=0.5)
    reader, writer = await setup.authenticated("a.test")
    rest = await read_to_end(reader)  # the server closes it: nothing to wait for but that
    assert rest.endswith(b"</stream:stream>")
    assert b"error" not in rest
    writer.close()


class FakePeer:
    """A server for a.test that answers STARTTLS with `cert`, or stays silent."""

    def __init__(self, cert: tuple[Path, Path] | None) -> None:
        self.cert = cert
        self.handshakes = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, PEER_ADDRESS, 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.cert is None:
                await reader.read()  # never answers
                return
            await read_until(reader, b">")
            writer.write(
                b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
                b"xmlns:stream='http://etherx.jabber.org/streams' from='a.test' id='f' "
                b"version='1.0'><stream:features><starttls "
                b"xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls>"
                b"</stream:features>"
            )
            await read_until(reader, b"<starttls")
            writer.write(b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*self.cert)
            self.handshakes += 1
            await writer.start_tls(ctx)
            await reader.read()
        except (OSError, ssl.SSLError, EOFError, TimeoutError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        assert self.server is not None
        self.server.close()


async def bounced(
    tmp_path: Path, start_server: StartServer, peer: FakePeer, **s2s: object
) -> tuple[str, str]:
    """Bob's message to anna@a.test, with a.test at `peer`: the error's condition, text."""
    port = await peer.start()
    try:
        setup = await make_setup(
            tmp_path,
            start_server,
            domains={"a.test": {"host": PEER_ADDRESS, "port": port}},
            **s2s,
        )
        client = await bob(setup.server)
        errors: asyncio.Queue[slixmpp.Message] = asyncio.Queue()
        client.add_event_handler("message_error", errors.put_nowait)
        try:
            client.send_message(mto="anna@a.test", mbody="hello?", mtype="chat")
            error = await asyncio.wait_for(errors.get(), 15)
            # It waited in the link's queue, which failed: bounced, and counted so.
            ledger = setup.server.router.ledger.snapshot()
            assert (ledger["received"], ledger["bounced"], ledger["to_remote"]) == (1, 1, 0)
            assert ledger["lost"] == 0, ledger
            return error["error"]["condition"], error["error"]["text"]
        finally:
            await close(client)
    finally:
        peer.close()


async def test_peer_certificate_from_an_untrusted_ca_bounces(
    tmp_path: Path, start_server: StartServer
) -> None:
    folder = tmp_path / "other"
    folder.mkdir()
    peer = FakePeer(issue(make_ca(folder, "another CA"), folder, "a.test"))
    condition, text = await bounced(tmp_path, start_server, peer)
    assert peer.handshakes == 1
    assert condition == "remote-server-not-found"
    assert "certificate verify failed" in text


async def test_peer_certificate_for_another_domain_bounces(
    tmp_path: Path, start_server: StartServer
) -> None:
    folder = tmp_path / "peer"
    folder.mkdir()
    ca = make_ca(folder)
    peer = FakePeer(issue(ca, folder, "evil.test"))
    # A CA xmppd trusts (make_setup makes its own: this one is trusted instead).
    condition, text = await bounced(tmp_path, start_server, peer, ca_file=str(ca.path))
    assert peer.handshakes == 1
    assert condition == "remote-server-not-found"
    assert "not valid for a.test" in text


async def test_silent_peer_bounces_with_a_timeout(
    tmp_path: Path, start_server: StartServer
) -> None:
    condition, _ = await bounced(tmp_path, start_server, FakePeer(None), connect_timeout=1.0)
    assert condition == "remote-server-timeout"


async def test_a_stream_over_its_byte_rate_is_read_slower(
    tmp_path: Path, start_server: StartServer
) -> None:
    setup = await make_setup(tmp_path, start_server, max_bytes_per_second=4096)
    client = await bob(setup.server)
    reader, writer = await setup.authenticated("a.test")
    try:
        # About 9 KiB at once against 4 KiB per second (a bucket of one second's worth):
        # what was read is delivered, then the stream is not read for about 1.2 s.
        batch = b"".join(message("anna@a.test/home", f"{i}" + "x" * 3000) for i in range(3))
        writer.write(batch)
        for i in range(3):
            got = await asyncio.wait_for(client.messages.get(), 10)
            assert got["body"].startswith(f"{i}x")
        assert setup.server.s2s is not None
        (incoming,) = [c for c in setup.server.s2s.connections if not c.outgoing]
        assert incoming.transport is not None and not incoming.transport.is_reading()
        # A stanza sent now waits in the socket (TCP backpressure) until reading resumes.
        loop = asyncio.get_running_loop()
        sent = loop.time()
        writer.write(message("anna@a.test/home", "after the pause"))
        got = await asyncio.wait_for(client.messages.get(), 10)
        assert got["body"] == "after the pause"
        assert loop.time() - sent > 0.8
    finally:
        writer.close()
        await close(client)


async def test_too_many_streams_from_one_address_are_refused(
    tmp_path: Path, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    setup = await make_setup(tmp_path, start_server, max_connections_per_address=2)
    client = await bob(setup.server)
    try:
        reader, writer = await setup.authenticated("a.test")
        second = await asyncio.open_connection(XMPPD_ADDRESS, setup.port)
        second[1].write(header("a.test"))
        await read_features(second[0])
        # A third from the same address: a stream error before anything else, closed.
        third_reader, third_writer = await asyncio.open_connection(XMPPD_ADDRESS, setup.port)
        refused = (await read_to_end(third_reader)).replace(b'"', b"'")
        assert b"<policy-violation xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" in refused
        assert refused.endswith(b"</stream:stream>")
        third_writer.close()
        assert any(
            "refused an incoming stream from" in r.getMessage() and r.levelname == "WARNING"
            for r in caplog.records
        )
        # Another address is not counted with it.
        other = await asyncio.open_connection(
            XMPPD_ADDRESS, setup.port, local_addr=("127.0.18.9", 0)
        )
        other[1].write(header("c.test"))
        await read_features(other[0])
        other[1].close()
        # The streams already open go on; once one closes, a new one is taken.
        writer.write(message("anna@a.test/home", "still here"))
        got = await asyncio.wait_for(client.messages.get(), 10)
        assert got["body"] == "still here"
        second[1].write(b"</stream:stream>")
        await read_to_end(second[0])  # the server closed it (counted off before the FIN)
        second[1].close()
        assert setup.server.s2s is not None
        assert sum(setup.server.s2s.per_address.values()) == 1
        again = await asyncio.open_connection(XMPPD_ADDRESS, setup.port)
        again[1].write(header("a.test"))
        assert b"starttls" in await read_features(again[0])
        again[1].close()
        writer.close()
    finally:
        await close(client)


class HungPeer:
    """A server for a.test that authenticates xmppd's outgoing stream (STARTTLS, SASL
    EXTERNAL) and then reads nothing more: a peer that hangs."""

    def __init__(self, cert: tuple[Path, Path]) -> None:
        self.cert = cert
        self.server: asyncio.Server | None = None
        self.authenticated = asyncio.Event()
        self.ended = asyncio.Event()  # xmppd closed the connection
        self.resume = asyncio.Event()  # read again, until the connection ends

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, PEER_ADDRESS, 0)
        return int(self.server.sockets[0].getsockname()[1])

    def _features(self, features: bytes) -> bytes:
        return (
            b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
            b"xmlns:stream='http://etherx.jabber.org/streams' from='a.test' to='b.test' "
            b"id='hung' version='1.0'><stream:features>" + features + b"</stream:features>"
        )

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await read_until(reader, b">")
            writer.write(
                self._features(
                    b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls>"
                )
            )
            await read_until(reader, b"<starttls")
            writer.write(b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*self.cert)
            await writer.start_tls(ctx)
            await read_until(reader, b"<stream:stream")
            writer.write(
                self._features(
                    b"<mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
                    b"<mechanism>EXTERNAL</mechanism></mechanisms>"
                )
            )
            await read_until(reader, b"</auth>")
            writer.write(b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>")
            await read_until(reader, b"<stream:stream")
            writer.write(self._features(b""))
            self.authenticated.set()
            await self.resume.wait()  # meanwhile nothing is read: the buffers fill up
            while await reader.read(65536):
                pass
        except (OSError, ssl.SSLError, EOFError, TimeoutError):
            pass
        finally:
            self.ended.set()
            writer.close()

    def close(self) -> None:
        assert self.server is not None
        self.server.close()


async def test_a_peer_that_stops_reading_is_cut_off(
    tmp_path: Path, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A remote server that no longer reads its socket must not make us buffer what our
    users send it without bound: past the backlog limit the stream ends with
    <policy-violation/> (logged, counted as a link failure) and the connection is cut."""
    caplog.set_level(logging.INFO, logger="xmppd.s2s")
    folder = tmp_path / "peer"
    folder.mkdir()
    ca = make_ca(folder)  # trusted by xmppd instead of make_setup's own
    peer = HungPeer(issue(ca, folder, "a.test"))
    port = await peer.start()
    try:
        setup = await make_setup(
            tmp_path,
            start_server,
            ca_file=str(ca.path),
            domains={"a.test": {"host": PEER_ADDRESS, "port": port}},
        )
        service = setup.server.s2s
        assert service is not None
        client = await bob(setup.server)
        try:
            client.send_message(mto="anna@a.test", mbody="hello", mtype="chat")
            await asyncio.wait_for(peer.authenticated.wait(), 15)
            (hung,) = [c for c in service.connections if c.outgoing]
            body = "x" * 8000
            sent = 0
            # 16 MB at most, in batches each followed by a message to bob himself: once
            # it arrives the batch before it was routed (a client's stanzas in order).
            while not service.failures["policy-violation"] and sent < 2000:
                for _ in range(50):
                    client.send_message(mto="anna@a.test", mbody=body, mtype="chat")
                sent += 50
                await nothing_more_for(client)
            assert service.failures["policy-violation"] == 1, f"not cut after {sent} messages"
            peer.resume.set()
            await asyncio.wait_for(peer.ended.wait(), 10)  # the connection is gone
            assert hung not in service.connections and hung.transport is None
            logged = [r.getMessage() for r in caplog.records if r.name == "xmppd.s2s"]
            assert any(
                "outgoing stream to a.test" in line and "ended: policy-violation" in line
                for line in logged
            ), logged
        finally:
            await close(client)
    finally:
        peer.close()


async def test_a_bidirectional_stream_carries_nothing_before_its_restart(
    tmp_path: Path, start_server: StartServer
) -> None:
    """XEP-0288 after SASL EXTERNAL: the peer restarts the stream on <success/> (RFC 6120
    6.4.6) and reads our new stream header first. A stanza for its domain routed in
    between waits (here in the link's queue, our own connection to a.test hanging on a
    silent address) and leaves on the bidirectional stream after that header, instead of
    arriving where the header must be (which a real peer takes for bad XML, losing the
    stanza and the stream)."""
    silent = FakePeer(None)
    port = await silent.start()
    setup = await make_setup(
        tmp_path,
        start_server,
        domains={"a.test": {"host": PEER_ADDRESS, "port": port}},
        connect_timeout=5.0,  # the node's stop waits for that connection attempt
    )
    client = await bob(setup.server)
    try:
        reader, writer, features = await setup.secured("a.test", "a.test")
        assert b"urn:xmpp:features:bidi" in features
        writer.write(b"<bidi xmlns='urn:xmpp:bidi'/>")
        writer.write(
            b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>"
        )
        got = await read_until(reader, b"<success")
        after_success = got[got.index(b"<success") :]
        client.send_message(mto="anna@a.test/home", mbody="between", mtype="chat")
        await nothing_more_for(client)  # bob's message was routed (his stanzas in order)
        writer.write(header("a.test"))
        rest = after_success + await read_until(reader, b"</message>")
        assert b"<stream:stream" in rest, rest
        assert rest.index(b"<stream:stream") < rest.index(b"<message"), rest
        assert b"between" in rest
        writer.close()
    finally:
        await close(client)
        silent.close()


class Authority:
    """a.test's authoritative server as dialback finds it: takes the db:verify stream
    and never answers, so the check lasts until something ends it."""

    def __init__(self) -> None:
        self.accepted = asyncio.Event()
        self.ended = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, PEER_ADDRESS, 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted.set()
        try:
            await reader.read()  # until xmppd closes it
        except OSError:
            pass
        finally:
            self.ended.set()
            writer.close()

    def close(self) -> None:
        assert self.server is not None
        self.server.close()


async def test_a_dialback_check_ends_with_the_stream_that_asked_for_it(
    tmp_path: Path, start_server: StartServer
) -> None:
    """XEP-0220: a db:result makes xmppd open a stream to the claimed domain's
    authoritative server. A peer that sends one and hangs up at once must not leave that
    stream behind (up to s2s.connect_timeout, here a minute): otherwise it can make the
    node hold any number of connections to any domain while it holds none itself
    (s2s.max_connections_per_address counts its open streams only)."""
    authority = Authority()
    port = await authority.start()
    setup = await make_setup(
        tmp_path,
        start_server,
        accept_dialback=True,
        connect_timeout=60.0,
        domains={"a.test": {"host": PEER_ADDRESS, "port": port}},
    )
    try:
        # A certificate that is not a.test's: dialback is offered instead of EXTERNAL.
        reader, writer, features = await setup.secured("a.test", "evil.test")
        assert b"urn:xmpp:features:dialback" in features
        writer.write(
            b"<db:result xmlns:db='jabber:server:dialback' from='a.test' to='b.test'>"
            b"k3y</db:result>"
        )
        await asyncio.wait_for(authority.accepted.wait(), 10)  # the check began
        writer.close()
        await asyncio.wait_for(authority.ended.wait(), 10)  # and ended with the stream
    finally:
        authority.close()


@pytest.mark.parametrize(
    "claimed",
    ["a.test&#10;xmppd.s2s: forged line", "anna@a.test", "a.test/desk", "a..test"],
)
async def test_a_header_from_that_is_not_a_domain_is_refused(
    setup: Setup, caplog: pytest.LogCaptureFixture, claimed: str
) -> None:
    """The stream header's 'from' names the peer's domain (RFC 6120 4.7.1): anything
    else ends the stream with <improper-addressing/> at once, before it is logged,
    offered TLS, or looked up in DNS for dialback. A character reference survives XML
    attribute normalisation, so without that a peer could write lines into our log."""
    caplog.set_level(logging.INFO, logger="xmppd.s2s")
    reader, writer = await asyncio.open_connection(XMPPD_ADDRESS, setup.port)
    writer.write(header(claimed))
    rest = (await read_to_end(reader)).replace(b'"', b"'")
    assert b"<improper-addressing xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" in rest, rest
    assert b"starttls" not in rest
    assert rest.endswith(b"</stream:stream>")
    writer.close()
    logged = [r.getMessage() for r in caplog.records if r.name == "xmppd.s2s"]
    assert any("ended: improper-addressing" in m for m in logged), logged
    assert not any("\n" in m or "forged" in m for m in logged), logged


async def test_a_bidirectional_stream_outlives_our_own_failed_connection(
    tmp_path: Path, start_server: StartServer
) -> None:
    """XEP-0288: a.test's bidirectional stream became the link for a.test while our own
    connection there was still being set up (here to a silent address). That attempt
    failing later must not drop the link: the next stanza still leaves on a.test's
    stream, instead of starting another attempt that bounces it."""
    silent = FakePeer(None)
    port = await silent.start()
    setup = await make_setup(
        tmp_path,
        start_server,
        domains={"a.test": {"host": PEER_ADDRESS, "port": port}},
        connect_timeout=2.0,
    )
    s2s = setup.server.s2s
    assert s2s is not None
    client = await bob(setup.server)
    try:
        client.send_message(mto="anna@a.test/home", mbody="first", mtype="chat")
        await nothing_more_for(client)  # routed: waiting for our connection to a.test
        reader, writer, _ = await setup.secured("a.test", "a.test")
        writer.write(b"<bidi xmlns='urn:xmpp:bidi'/>")
        writer.write(
            b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>"
        )
        await read_until(reader, b"<success")
        writer.write(header("a.test"))
        # The restarted stream's features, then the waiting message on a.test's stream.
        assert b"first" in await read_until(reader, b"</message>")
        # Our own attempt gives up (a poll on server state: nothing signals it).
        while not s2s.failures["remote-server-timeout"]:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        client.send_message(mto="anna@a.test/home", mbody="second", mtype="chat")
        assert b"second" in await read_until(reader, b"</message>")
        writer.close()
    finally:
        await close(client)
        silent.close()


async def test_a_stanza_routed_before_the_restart_waits_for_the_bidi_stream(
    tmp_path: Path, start_server: StartServer
) -> None:
    """XEP-0288 is for a peer we cannot reach ourselves: our own connection to a.test is
    refused at once. A stanza routed between <success/> and a.test's restart starts that
    attempt, which fails before the restart; the stanza must wait for a.test's stream,
    which becomes the link a moment later, not bounce."""
    with socket.socket() as probe:
        probe.bind((PEER_ADDRESS, 0))
        refused = int(probe.getsockname()[1])  # nothing listens there once closed
    setup = await make_setup(
        tmp_path, start_server, domains={"a.test": {"host": PEER_ADDRESS, "port": refused}}
    )
    s2s = setup.server.s2s
    assert s2s is not None
    client = await bob(setup.server)
    errors: asyncio.Queue[slixmpp.Message] = asyncio.Queue()
    client.add_event_handler("message_error", errors.put_nowait)
    try:
        reader, writer, features = await setup.secured("a.test", "a.test")
        assert b"urn:xmpp:features:bidi" in features
        writer.write(b"<bidi xmlns='urn:xmpp:bidi'/>")
        writer.write(
            b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>"
        )
        await read_until(reader, b"<success")
        client.send_message(mto="anna@a.test/home", mbody="between", mtype="chat")
        # Our own attempt is refused before the peer restarts (a poll on server state).
        while not s2s.failures["remote-server-not-found"]:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        writer.write(header("a.test"))
        got = await asyncio.wait_for(read_until(reader, b"</message>"), 5)
        assert b"between" in got
        assert errors.empty(), errors.get_nowait()["error"]
        writer.close()
    finally:
        await close(client)


async def test_a_stream_never_restarted_after_sasl_is_closed(setup: Setup) -> None:
    """RFC 6120 6.4.6: on <success/> the peer must open a new stream. One that never does
    has not finished the handshake and is ended with <connection-timeout/> after
    s2s.auth_timeout, like one that never authenticates, not left open until
    s2s.idle_timeout (ten minutes by default)."""
    reader, writer, features = await setup.secured("a.test", "a.test")
    assert b"<mechanism>EXTERNAL</mechanism>" in features
    writer.write(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>")
    rest = (await read_to_end(reader)).replace(b'"', b"'")
    assert b"<success" in rest
    assert b"<connection-timeout xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" in rest, rest
    assert rest.endswith(b"</stream:stream>")
    writer.close()
