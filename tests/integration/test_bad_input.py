"""Abuse over real TLS sockets: each bad input gets its exact error; the state after is checked."""

from __future__ import annotations

import asyncio
import base64
import resource
import ssl
import time

import pytest
from lxml import etree
from slixmpp import JID

from tests.integration.clients import HEADER, RawClient, close, connect
from tests.integration.conftest import StartServer, port_of
from tests.integration.test_cluster import until
from xmppd.server import Server

SASL = "urn:ietf:params:xml:ns:xmpp-sasl"


def stream_error_of(data: bytes) -> str:
    """The condition of the stream error in everything the server sent, which ends the stream."""
    assert data.rstrip().endswith(b"</stream:stream>"), data[-200:]
    start = data.index(b"<stream:error")
    doc = (
        b"<s xmlns:stream='http://etherx.jabber.org/streams'>"
        + data[start : data.rindex(b"</stream:stream>")]
        + b"</s>"
    )
    err = etree.fromstring(doc)[0]
    return etree.QName(err[0]).localname


def plain(user: str, password: str) -> str:
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return f"<auth xmlns='{SASL}' mechanism='PLAIN'>{token}</auth>"


async def authenticated(server: Server, user: str = "alice") -> RawClient:
    """`user` (alice) on a raw stream, authenticated and restarted, no resource bound yet."""
    raw = await RawClient.open(server)
    await raw.send(HEADER)
    await raw.read_until(b"</stream:features>")
    await raw.send(plain(user, f"{user}-secret"))
    await raw.read_until(b"<success")
    await raw.send(HEADER)
    await raw.read_until(b"</stream:features>")
    return raw


async def logged_in(server: Server, user: str = "alice", resource: str = "raw") -> RawClient:
    raw = await authenticated(server, user)
    await raw.send(
        "<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
        f"<resource>{resource}</resource></bind></iq>"
    )
    await raw.read_until(b"</iq>")
    return raw


@pytest.mark.parametrize(
    ("payload", "condition"),
    [
        ("<message><body>broken</bdy></message>", "not-well-formed"),
        ("<message><!-- no comments --></message>", "restricted-xml"),
        ("<?php evil ?>", "restricted-xml"),
    ],
)
async def test_bad_xml_closes_with_exact_error(
    server: Server, payload: str, condition: str
) -> None:
    raw = await RawClient.open(server)
    await raw.send(HEADER)
    await raw.read_until(b"</stream:features>")
    await raw.send(payload)
    assert (
        stream_error_of(await raw.read_to_close()) == condition
    )  # read_to_close: the server hung up


async def test_doctype_and_entity_bomb(server: Server) -> None:
    entities = "<!ENTITY lol 'lol'>" + "".join(
        f"<!ENTITY lol{i} '{(f'&lol{i - 1};' if i > 1 else '&lol;') * 10}'>"
        for i in range(1, 10)
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    raw = await RawClient.open(server)
    await raw.send(
        f"<?xml version='1.0'?><!DOCTYPE lolz [{entities}]>"
        + HEADER[21:]
        + "<message>&lol9;</message>"
    )
    assert stream_error_of(await raw.read_to_close()) == "restricted-xml"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 20_000  # KB


async def test_a_doctype_in_utf16_is_unsupported_encoding(server: Server) -> None:
    """The DOCTYPE ban held for UTF-8 bytes only: the same stream in UTF-16 had its
    entities expanded past the 10 KB limit before authentication."""
    raw = await RawClient.open(server)
    bomb = "<!DOCTYPE s [<!ENTITY a '" + "a" * 1000 + "'>]>" + HEADER[21:]
    body = "&a;" * 400  # 400,000 characters once expanded, under 2 KB sent
    stream = "<?xml version='1.0'?>" + bomb + f"<message><body>{body}</body></message>"
    await raw.send(stream.encode("utf-16"))
    assert stream_error_of(await raw.read_to_close()) == "unsupported-encoding"


async def test_stanza_over_size_limit(server: Server) -> None:
    raw = await logged_in(server)
    limit = server.config.limits.max_stanza_bytes
    await raw.send(
        "<message to='bob@localhost'><body>" + "x" * (limit + 10_000) + "</body></message>"
    )
    assert stream_error_of(await raw.read_to_close()) == "policy-violation"
    assert not server.router.directory.has("alice@localhost")


async def test_small_limit_before_auth(server: Server) -> None:
    raw = await RawClient.open(server)
    await raw.send(HEADER)
    await raw.read_until(b"</stream:features>")
    await raw.send(f"<auth xmlns='{SASL}' mechanism='PLAIN'>" + "A" * 20_000 + "</auth>")
    assert stream_error_of(await raw.read_to_close()) == "policy-violation"


async def test_endless_start_tag_before_auth_is_over_the_limit(server: Server) -> None:
    """A start tag that never ends gives libxml2 nothing to report: its bytes must still
    count against the unauthenticated stanza limit, not pile up to libxml2's 10 MB."""
    raw = await RawClient.open(server)
    await raw.send(HEADER)
    await raw.read_until(b"</stream:features>")
    await raw.send(f"<auth xmlns='{SASL}' mechanism='PLAIN' x='" + "A" * 200_000)
    assert stream_error_of(await raw.read_to_close()) == "policy-violation"


async def test_nesting_deeper_than_limit(server: Server) -> None:
    raw = await logged_in(server)
    await raw.send("<message>" + "<x>" * 10_000)
    assert stream_error_of(await raw.read_to_close()) == "policy-violation"


@pytest.mark.parametrize(
    ("header", "condition"),
    [
        (
            HEADER.replace("http://etherx.jabber.org/streams", "http://wrong.example/streams"),
            "invalid-namespace",
        ),
        (HEADER.replace("to='localhost'", "to='elsewhere.example'"), "host-unknown"),
        (HEADER.replace(" version='1.0'>", ">"), "unsupported-version"),
    ],
)
async def test_bad_stream_header(server: Server, header: str, condition: str) -> None:
    raw = await RawClient.open(server)
    await raw.send(header)
    data = await raw.read_to_close()
    assert data.startswith(b"<?xml version='1.0'?><stream:stream ")
    assert stream_error_of(data) == condition


async def test_auth_before_starttls_is_refused(server: Server) -> None:
    raw = await RawClient.open(server, direct_tls=False)
    await raw.send(HEADER)
    features = await raw.read_until(b"</stream:features>")
    assert b"<required/>" in features and b"mechanism" not in features
    await raw.send(plain("alice", "alice-secret"))
    reply = await raw.read_until(b"</failure>")
    assert b"<encryption-required/>" in reply
    # still open: STARTTLS works after the refusal
    await raw.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    assert b"<proceed" in await raw.read_until(b"<proceed")
    await raw.close()


async def test_stanza_before_auth_and_before_bind(server: Server) -> None:
    raw = await RawClient.open(server)
    await raw.send(HEADER)
    await raw.read_until(b"</stream:features>")
    await raw.send("<message to='bob@localhost'><body>sneaky</body></message>")
    assert stream_error_of(await raw.read_to_close()) == "not-authorized"

    raw = await authenticated(server)
    await raw.send("<message to='bob@localhost'><body>unbound</body></message>")
    assert stream_error_of(await raw.read_to_close()) == "not-authorized"


async def test_an_element_no_module_handles_ends_the_stream(server: Server) -> None:
    """After bind, and between auth and bind, a top-level element that is not a stanza
    goes to the modules; one none of them handles ends the stream, named."""
    raw = await logged_in(server)
    await raw.send("<enable xmlns='urn:xmpp:nothing-here:0'/>")
    assert stream_error_of(await raw.read_to_close()) == "unsupported-stanza-type"

    raw = await authenticated(server)
    await raw.send("<resume xmlns='urn:xmpp:nothing-here:0' previd='x' h='0'/>")
    assert stream_error_of(await raw.read_to_close()) == "unsupported-stanza-type"


async def test_spoofed_from_is_invalid_from(server: Server) -> None:
    bob = await connect(server, "bob@localhost/b", "bob-secret")
    bob.send_presence()
    raw = await logged_in(server)
    await raw.send(
        "<message from='bob@localhost/b' to='bob@localhost'><body>I am bob</body></message>"
    )
    assert stream_error_of(await raw.read_to_close()) == "invalid-from"
    await asyncio.sleep(0.2)
    assert bob.messages.empty()  # nothing forged was delivered
    await close(bob)


async def test_a_restart_to_another_host_after_sasl_is_refused(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    """alice@localhost's password must not open alice@other.test, a separate account
    of the same server: the restart after SASL may not name another host."""
    caplog.set_level("INFO", logger="xmppd")
    server = await start_server(hosts=["localhost", "other.test"])
    await server.accounts["other.test"].register("alice", "another-secret")
    raw = await RawClient.open(server)
    await raw.send(HEADER)
    await raw.read_until(b"</stream:features>")
    await raw.send(plain("alice", "alice-secret"))  # alice@localhost's password
    await raw.read_until(b"<success")
    await raw.send(HEADER.replace("to='localhost'", "to='other.test'"))
    assert stream_error_of(await raw.read_to_close()) == "host-unknown"
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert any("host-unknown" in r.getMessage() for r in refused), caplog.text
    assert not server.router.directory.has("alice@other.test")


async def test_idle_unauthenticated_connection_is_closed(start_server: StartServer) -> None:
    server = await start_server(limits={"auth_timeout": 0.5})
    raw = await RawClient.open(server)
    await raw.send(HEADER)
    started = time.monotonic()
    data = await raw.read_to_close(timeout=5)
    assert stream_error_of(data) == "connection-timeout"
    assert 0.4 <= time.monotonic() - started < 3


async def test_authenticated_connection_outlives_auth_timeout(start_server: StartServer) -> None:
    # 2 s, not 0.5: the login (STARTTLS, SASL, bind) itself must fit in it, and took
    # 0.08 s here on a quiet machine, 0.33 s on a busy one, more on a busier one
    auth_timeout = 2.0
    server = await start_server(limits={"auth_timeout": auth_timeout})
    started = time.monotonic()  # before the accept
    client = await connect(server, "alice@localhost/a", "alice-secret")
    await asyncio.sleep(started + auth_timeout + 0.5 - time.monotonic())  # past its timer
    assert not client.ended.is_set()
    await close(client)


async def test_connections_per_ip_limit(start_server: StartServer) -> None:
    """Counted from accept: two connections that never start their TLS handshake fill
    the limit of 2, so a third is refused at once on the direct TLS port (there is no
    stream to say why before TLS) and with <policy-violation/> on the STARTTLS one."""
    server = await start_server(limits={"max_connections_per_ip": 2})
    silent = [
        await asyncio.open_connection("127.0.0.1", port_of(server, "direct_tls"))
        for _ in range(2)
    ]
    with pytest.raises((ConnectionError, ssl.SSLError)):
        await RawClient.open(server)
    third = await RawClient.open(server, direct_tls=False)
    await third.send(HEADER)
    assert stream_error_of(await third.read_to_close()) == "policy-violation"
    for _, writer in silent:
        writer.close()
    await until(lambda: not server.connections, timeout=10)
    fourth = await RawClient.open(server)  # the count went down with them
    await fourth.send(HEADER)
    await fourth.read_until(b"</stream:features>")
    await fourth.close()


def plain_as(authzid: str, user: str, password: str) -> str:
    token = base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()
    return f"<auth xmlns='{SASL}' mechanism='PLAIN'>{token}</auth>"


async def test_authzid_must_be_self_unless_proxy_auth_allows(start_server: StartServer) -> None:
    server = await start_server(
        users={"alice": "alice-secret", "bob": "bob-secret", "admin": "admin-secret"},
        auth={"proxy_auth": ["admin@localhost"]},
    )
    raw = await RawClient.open(server)
    await raw.send(HEADER)
    await raw.read_until(b"</stream:features>")
    await raw.send(plain_as("bob@localhost", "alice", "alice-secret"))
    assert b"<invalid-authzid/>" in await raw.read_until(b"</failure>")
    await raw.send(plain_as("alice@localhost", "alice", "alice-secret"))  # itself: fine
    assert b"<success" in await raw.read_until(b"<success")
    await raw.close()

    raw = await RawClient.open(server)
    await raw.send(HEADER)
    await raw.read_until(b"</stream:features>")
    await raw.send(plain_as("nobody@localhost", "admin", "admin-secret"))
    assert b"<invalid-authzid/>" in await raw.read_until(b"</failure>")
    await raw.send(plain_as("bob@localhost", "admin", "admin-secret"))
    await raw.read_until(b"<success")
    await raw.send(HEADER)
    await raw.read_until(b"</stream:features>")
    await raw.send("<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>")
    assert b"<jid>bob@localhost/" in await raw.read_until(b"</iq>")
    await raw.close()


async def test_username_case_is_folded(server: Server) -> None:
    client = await connect(server, "Alice@localhost/up", "alice-secret")
    assert client.boundjid.bare == "alice@localhost"
    await close(client)


async def test_client_that_stops_reading_is_disconnected(start_server: StartServer) -> None:
    server = await start_server(limits={"max_stanza_bytes": 16384})
    sleeper = await logged_in(server)  # alice/raw, never reads again
    bob = await connect(server, "bob@localhost/flood", "bob-secret")
    body = "x" * 10_000
    sent = 0
    deadline = asyncio.get_running_loop().time() + 30
    while server.router.directory.has("alice@localhost") and sent < 5000:
        for _ in range(20):
            bob.send_message(mto=JID("alice@localhost/raw"), mbody=body, mtype="chat")
        sent += 20
        await asyncio.sleep(0.02)  # let the server read and route what bob sent
        if asyncio.get_running_loop().time() > deadline:
            break
    bound = server.router.directory.has("alice@localhost")
    assert not bound, f"still bound after {sent} messages"
    # the server holds at most its backlog limit for it, not the ~50 MB that was sent
    assert sent * len(body) > 4 * 16384 + 65536
    await close(bob)
    sleeper.writer.transport.abort()


async def test_a_refused_stream_is_logged_at_the_default_level(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="xmppd")
    raw = await RawClient.open(server)
    await raw.send(HEADER.replace("jabber:client", "jabber:server"))
    assert stream_error_of(await raw.read_to_close()) == "invalid-namespace"
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1, caplog.text
    assert refused[0].levelname == "INFO"
    assert "127.0.0.1" in refused[0].getMessage()
    assert "invalid-namespace" in refused[0].getMessage()
    await raw.close()


PING = "<ping xmlns='urn:xmpp:ping'/>"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"


async def nothing_reached_bob_before(alice: RawClient, bob: RawClient) -> bytes:
    """Alice sends bob a marker message; what bob read up to it is returned, and must
    be that message alone (alice's stanzas reach bob in the order she sent them)."""
    await alice.send("<message to='bob@localhost/b' id='marker'><body>after</body></message>")
    got = await bob.read_until(b"</message>")
    start = got.index(b"<message")
    assert got[:start].strip() == b"", got
    assert got.count(b"<message") == 1 and b"after" in got, got
    return got[start:]


async def refused_as_bad_request(server: Server, stanza: str, kind: str, reply_id: str) -> None:
    """alice sends `stanza` to bob: she gets a <bad-request/> of type modify to it (its
    `kind`, its id `reply_id`), and bob gets nothing."""
    bob = await logged_in(server, "bob", "b")
    alice = await logged_in(server)
    await alice.send(stanza)
    data = await alice.read_until(f"</{kind}>".encode())
    reply = etree.fromstring(data[data.index(f"<{kind}".encode()) :])
    assert reply.get("type") == "error" and reply.get("id") == reply_id, data
    assert reply.get("to") == "alice@localhost/raw"
    error = reply.find("{jabber:client}error")
    assert error is not None and error.get("type") == "modify", data
    assert error.find(f"{{{STANZAS}}}bad-request") is not None, data
    await nothing_reached_bob_before(alice, bob)
    await alice.close()
    await bob.close()


@pytest.mark.parametrize(
    ("stanza", "reply_id"),
    [
        (f"<iq to='bob@localhost/b' type='bogus' id='q1'>{PING}</iq>", "q1"),
        (f"<iq to='bob@localhost/b' id='q2'>{PING}</iq>", "q2"),
        (f"<iq to='localhost' type='bogus' id='q3'>{PING}</iq>", "q3"),
        (f"<iq to='alice@localhost' id='q4'>{PING}</iq>", "q4"),
        (f"<iq to='bob@localhost/b' type='get'>{PING}</iq>", ""),
        (f"<iq to='localhost' type='get'>{PING}</iq>", ""),
        ("<iq to='bob@localhost/b' type='get' id='q5'/>", "q5"),
        (f"<iq to='bob@localhost/b' type='set' id='q6'>{PING}{PING}</iq>", "q6"),
        (f"<iq to='localhost' type='get' id='q7'>{PING}{PING}</iq>", "q7"),
    ],
)
async def test_a_malformed_iq_gets_bad_request_and_reaches_nobody(
    server: Server, stanza: str, reply_id: str
) -> None:
    await refused_as_bad_request(server, stanza, "iq", reply_id)


async def test_a_presence_of_unknown_type_gets_bad_request_and_reaches_nobody(
    server: Server,
) -> None:
    stanza = "<presence to='bob@localhost/b' type='online' id='p1'/>"
    await refused_as_bad_request(server, stanza, "presence", "p1")


async def test_a_response_without_id_is_dropped_unanswered(server: Server) -> None:
    """RFC 6120 8.2.3: a result is never answered, and one without an id answers no
    request: it is neither delivered nor answered."""
    bob = await logged_in(server, "bob", "b")
    alice = await logged_in(server)
    await alice.send("<iq to='bob@localhost/b' type='result'/>")
    await nothing_reached_bob_before(alice, bob)
    await alice.send(f"<iq to='localhost' type='get' id='after'>{PING}</iq>")
    data = await alice.read_until(b"/>")  # the ping result is the first thing alice gets
    assert data.lstrip().startswith(b"<iq") and b'id="after"' in data, data
    assert b"error" not in data, data
    await alice.close()
    await bob.close()


async def test_a_message_of_unknown_type_is_delivered_as_normal(server: Server) -> None:
    """RFC 6121 5.2.2: an unknown message type means 'normal' (xmppd.stream.stanzarules);
    the ledger counts it as received and delivered, as any message."""
    bob = await logged_in(server, "bob", "b")
    alice = await logged_in(server)
    before = server.router.ledger.snapshot()
    await alice.send("<message to='bob@localhost/b' type='shout'><body>hey</body></message>")
    data = await bob.read_until(b"</message>")
    message = etree.fromstring(data[data.index(b"<message") :])
    assert message.get("type") == "normal" and message.findtext("{jabber:client}body") == "hey"
    after = server.router.ledger.snapshot()
    assert after["received"] == before["received"] + 1  # type: ignore[operator]
    assert after["delivered"] == before["delivered"] + 1  # type: ignore[operator]
    await alice.close()
    await bob.close()
