"""A renewed certificate reaches federation: b.test (127.0.18.3) renews its certificate
and reloads; d.test (127.0.18.5), another xmppd, sees the new one on every new stream.

Both nodes run in this process, each from its own config file (a reload reads it
again), with certificates from one test CA both trust. b.test reaches d.test over
STARTTLS, d.test reaches b.test over direct TLS (XEP-0368), so a new stream each way
shows what b.test presents as a client (its outgoing contexts) and as a server (its
listeners' contexts); raw TLS clients show both listeners' certificate directly.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import STOP_TIMEOUT, port_of, write_config
from tests.integration.s2s_clients import message_across, signed_in
from tests.integration.s2s_peers import (
    CA,
    XMPPD_ADDRESS,
    free_port,
    issue,
    make_ca,
    xmppd_s2s,
    xmppd_tls,
)
from tests.integration.test_cli_server import der_of, peer_certificate
from tests.integration.test_cluster import until
from tests.integration.test_s2s_xmppd import OTHER_ADDRESS, bob_and_dora, free_s2s_ports
from xmppd.config import load_config
from xmppd.s2s.tlsaccept import TLSAcceptTransport
from xmppd.server import Server

StartNode = Callable[..., Awaitable[Server]]


@pytest.fixture
async def start_node() -> AsyncIterator[StartNode]:
    """Start a node from a config file of its own in `folder` (its data there too):
    conftest's `start_server` writes one file for every node of a test, and a reload
    reads it again. Every node started is stopped after the test."""
    servers: list[Server] = []

    async def start(folder: Path, **sections: Any) -> Server:
        server = Server(load_config(config_in(folder, **sections)))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        async with asyncio.timeout(STOP_TIMEOUT):
            await server.stop()


def config_in(folder: Path, **sections: Any) -> Path:
    """The node's config file, written in `folder` (made if need be)."""
    folder.mkdir(parents=True, exist_ok=True)
    return write_config(folder, **sections)


def trusting(ca: CA) -> ssl.SSLContext:
    """A TLS client context that validates against `ca` (name included), offering
    ALPN 'xmpp-server' as a peer server on a direct TLS port does."""
    ctx = ssl.create_default_context(cafile=str(ca.path))
    ctx.set_alpn_protocols(["xmpp-server"])
    return ctx


async def read_until(reader: asyncio.StreamReader, marker: bytes) -> bytes:
    buf = b""
    async with asyncio.timeout(10):
        while marker not in buf:
            data = await reader.read(65536)
            if not data:
                raise EOFError(buf)
            buf += data
    return buf


async def s2s_certificate(ca: CA, port: int, direct_tls: bool) -> bytes:
    """The certificate (DER) b.test's s2s listener on `port` presents to a new peer:
    at once on a direct TLS port, after <starttls/> on a STARTTLS one."""
    if direct_tls:
        _, writer = await asyncio.open_connection(
            XMPPD_ADDRESS, port, ssl=trusting(ca), server_hostname="b.test"
        )
    else:
        reader, writer = await asyncio.open_connection(XMPPD_ADDRESS, port)
        writer.write(
            b"<?xml version='1.0'?><stream:stream xmlns='jabber:server'"
            b" xmlns:stream='http://etherx.jabber.org/streams'"
            b" from='d.test' to='b.test' version='1.0'>"
        )
        await read_until(reader, b"</stream:features>")
        writer.write(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        await read_until(reader, b"<proceed")
        await writer.start_tls(trusting(ca), server_hostname="b.test")
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return bytes(der)


def presented_by_b(d: Server) -> list[tuple[str, str, bytes | None]]:
    """(direction, mechanism, b.test's certificate) of each of d.test's streams with
    b.test: the server certificate of d.test's outgoing streams, the client
    certificate of its incoming ones."""
    assert d.s2s is not None
    seen = []
    for conn in d.s2s.connections:
        transport = conn.transport
        if isinstance(transport, TLSAcceptTransport):  # incoming: b.test connected
            der = transport.layer.peer_certificate()
        else:
            assert transport is not None
            der = transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
        seen.append(("out" if conn.outgoing else "in", str(conn.stream.mechanism), der))
    return seen


async def s2s_closed(*servers: Server) -> None:
    """End every s2s stream of `servers` and wait until both ends let them go: the next
    stanza across opens a new one."""
    for server in servers:
        assert server.s2s is not None
        for conn in list(server.s2s.connections):
            conn.close()
    await until(
        lambda: not any(server.s2s is not None and server.s2s.connections for server in servers),
        timeout=10,
    )


async def test_a_renewed_certificate_reaches_new_s2s_streams_both_ways(
    tmp_path: Path, start_node: StartNode
) -> None:
    ca = make_ca(tmp_path)
    ports = free_s2s_ports()

    async def start(domain: str, address: str, other: str, to_other: dict[str, object]) -> Server:
        listeners = [
            {"address": address, "port": ports[(address, "starttls")]},
            {"address": address, "port": ports[(address, "direct")], "direct_tls": True},
        ]
        folder = tmp_path / domain
        return await start_node(
            folder,
            hosts=[domain],
            tls=xmppd_tls(folder, ca, domain),
            s2s=xmppd_s2s(ca, listeners, domains={other: to_other}),
        )

    b_starttls, b_direct = ports[(XMPPD_ADDRESS, "starttls")], ports[(XMPPD_ADDRESS, "direct")]
    d_starttls = {"host": OTHER_ADDRESS, "port": ports[(OTHER_ADDRESS, "starttls")]}
    b = await start("b.test", XMPPD_ADDRESS, "d.test", d_starttls)
    b_direct_tls = {"host": XMPPD_ADDRESS, "port": b_direct, "direct_tls": True}
    d = await start("d.test", OTHER_ADDRESS, "b.test", b_direct_tls)
    logins = await bob_and_dora(b, d)
    cert, key = b.config.tls.cert, b.config.tls.key
    assert cert is not None and key is not None
    old = der_of(cert)

    async with signed_in(*logins) as (bob, dora):
        await message_across(bob, dora, "dora@d.test/home", "before the renewal")
        assert presented_by_b(d) == [("in", "EXTERNAL", old)]
        link = list(d.s2s.connections) if d.s2s is not None else []

        # certbot's renewal: a new key pair, still for b.test from the CA d.test trusts.
        (tmp_path / "renewal").mkdir()
        renewed = issue(ca, tmp_path / "renewal", "b.test")
        shutil.copy(renewed[0], cert)
        shutil.copy(renewed[1], key)
        new = der_of(cert)
        result = await b.reload()
        assert result.reloaded, result.problems
        assert f"certificate {cert} (renewed)" in result.changed

        # The stream that was up keeps its certificate and carries on.
        await message_across(dora, bob, "bob@b.test/desk", "over the old stream")
        assert d.s2s is not None and list(d.s2s.connections) == link
        assert presented_by_b(d) == [("in", "EXTERNAL", old)]
        # New peers at either of b.test's listeners are shown the new certificate.
        assert await s2s_certificate(ca, b_starttls, direct_tls=False) == new
        assert await s2s_certificate(ca, b_direct, direct_tls=True) == new

        # d.test opens a new stream (direct TLS): b.test's listener shows the new one.
        await s2s_closed(b, d)
        await message_across(dora, bob, "bob@b.test/desk", "d.test calls b.test")
        await message_across(bob, dora, "dora@d.test/home", "and back on its stream")
        assert presented_by_b(d) == [("out", "EXTERNAL", new)]

        # b.test opens a new stream (STARTTLS): SASL EXTERNAL with the new one.
        await s2s_closed(b, d)
        await message_across(bob, dora, "dora@d.test/home", "b.test calls d.test")
        await message_across(dora, bob, "bob@b.test/desk", "and back on its stream")
        assert presented_by_b(d) == [("in", "EXTERNAL", new)]


async def test_a_renewal_federation_cannot_use_refuses_the_whole_reload(
    tmp_path: Path, start_node: StartNode
) -> None:
    """The s2s contexts are made again with the new certificate in the reload's check:
    when that fails (here the s2s CA file went bad meanwhile), the reload is refused by
    name and the node keeps its old certificate, for clients and federation alike; put
    right, the next reload applies it to both."""
    ca = make_ca(tmp_path)
    trusted = CA(ca.cert, ca.key, tmp_path / "trusted.pem")  # s2s.ca_file, ours to spoil
    shutil.copy(ca.path, trusted.path)
    port = free_port(XMPPD_ADDRESS)
    listeners = [{"address": XMPPD_ADDRESS, "port": port, "direct_tls": True}]
    folder = tmp_path / "b.test"
    b = await start_node(
        folder,
        hosts=["b.test"],
        tls=xmppd_tls(folder, ca, "b.test"),
        s2s=xmppd_s2s(trusted, listeners),
    )
    cert, key = b.config.tls.cert, b.config.tls.key
    assert cert is not None and key is not None
    old = der_of(cert)
    (tmp_path / "renewal").mkdir()
    renewed = issue(ca, tmp_path / "renewal", "b.test")
    shutil.copy(renewed[0], cert)
    shutil.copy(renewed[1], key)
    trusted.path.write_text("not a certificate\n")

    result = await b.reload()
    assert not result.reloaded
    [problem] = result.problems
    assert problem.startswith(f"{folder / 'xmppd.yml'}:"), problem
    assert f"s2s: CA file {trusted.path}: no usable certificate in it" in problem
    c2s_direct = port_of(b, "direct_tls")
    assert await peer_certificate(c2s_direct) == old
    assert await s2s_certificate(ca, port, direct_tls=True) == old

    shutil.copy(ca.path, trusted.path)
    result = await b.reload()
    assert result.reloaded, result.problems
    new = der_of(cert)
    assert await peer_certificate(c2s_direct) == new
    assert await s2s_certificate(ca, port, direct_tls=True) == new


async def test_the_self_signed_certificate_made_again_for_new_hosts_reaches_federation(
    tmp_path: Path, start_node: StartNode
) -> None:
    """No tls.cert: a reload that adds a host makes the self-signed pair again (for
    every host), and new s2s streams are shown it, as new clients are."""
    port = free_port(XMPPD_ADDRESS)
    s2s = {"listeners": [{"address": XMPPD_ADDRESS, "port": port, "direct_tls": True}]}
    b = await start_node(tmp_path, hosts=["b.test"], s2s=s2s)
    insecure = ssl.create_default_context()
    insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE

    async def shown() -> bytes:
        _, writer = await asyncio.open_connection(XMPPD_ADDRESS, port, ssl=insecure)
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        return bytes(der)

    before = await shown()
    write_config(tmp_path, hosts=["b.test", "e.test"], s2s=s2s)
    result = await b.reload()
    assert result.reloaded, result.problems
    after = await shown()
    assert after != before
    assert after == await peer_certificate(port_of(b, "direct_tls"))
