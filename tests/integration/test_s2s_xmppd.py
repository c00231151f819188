"""Federation between two xmppd servers: b.test on 127.0.18.3 and d.test on 127.0.18.5.

Both run in this process, each with its own data folder, certificate (from a
CA this test makes, trusted by both) and s2s listeners: STARTTLS and direct
TLS (XEP-0368). Each reaches the other through a static override naming the
other's direct TLS port, so the one stream between them is direct TLS, and
bidirectional (XEP-0288): both offer and ask for it.
"""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any

import pytest
import slixmpp

from tests.integration.clients import close
from tests.integration.conftest import StartServer, write_config
from tests.integration.s2s_clients import (
    Peer,
    message_across,
    signed_in,
    subscribed,
    xmppd_user,
)
from tests.integration.s2s_peers import (
    CA,
    XMPPD_ADDRESS,
    free_port,
    make_ca,
    xmppd_s2s,
    xmppd_tls,
)
from tests.integration.test_cluster import until
from xmppd.config import load_config
from xmppd.s2s.connection import WORK_IN_FLIGHT, Outgoing, S2SConnection
from xmppd.s2s.tlsaccept import TLSAcceptTransport
from xmppd.server import Server

OTHER_ADDRESS = "127.0.18.5"  # d.test


def streams(server: Server) -> list[tuple[str, str, str, str, bool, int, int]]:
    """(direction, remote, mechanism, tls, bidi, stanzas in, out) of each s2s stream."""
    assert server.s2s is not None
    return sorted(
        (
            "out" if c.outgoing else "in",
            c.remote,
            c.stream.mechanism,
            "direct" if c.direct_tls else "starttls",
            c.stream.bidi,
            c.stanzas_in,
            c.stanzas_out,
        )
        for c in server.s2s.connections
    )


def free_s2s_ports() -> dict[tuple[str, str], int]:
    """A free s2s port of each kind ("starttls", "direct") on each node's address."""
    return {
        (address, kind): free_port(address)
        for address in (XMPPD_ADDRESS, OTHER_ADDRESS)
        for kind in ("starttls", "direct")
    }


async def bob_and_dora(b: Server, d: Server) -> tuple[Coroutine[Any, Any, Peer], ...]:
    """bob@b.test and dora@d.test registered; their logins, for `signed_in`."""
    await b.accounts["b.test"].register("bob", "bob-secret")
    await d.accounts["d.test"].register("dora", "dora-secret")
    return xmppd_user(b), xmppd_user(d, "dora@d.test/home", "dora-secret")


async def serve(
    start_server: StartServer,
    folder: Path,
    domain: str,
    ca: CA,
    listeners: list[dict[str, object]],
    domains: Mapping[str, object],
    cert_ca: CA | None = None,
) -> Server:
    """An xmppd serving `domain`, its data and its certificate (from `cert_ca`, default
    `ca`) in `folder`, trusting `ca`, reaching the other domain as `domains` says."""
    return await start_server(
        users={},
        hosts=[domain],
        data_dir=str(folder / "data"),
        tls=xmppd_tls(folder, cert_ca or ca, domain),
        s2s=xmppd_s2s(ca, listeners, domains=domains),
    )


async def direct_tls_pair(tmp_path: Path, start_server: StartServer) -> tuple[Server, Server]:
    """b.test and d.test, each reaching the other over direct TLS (one bidirectional
    stream between them once either sends)."""
    ca = make_ca(tmp_path)
    ports = free_s2s_ports()

    async def start(domain: str, address: str, other: str, other_address: str) -> Server:
        listeners = [
            {"address": address, "port": ports[(address, "starttls")]},
            {"address": address, "port": ports[(address, "direct")], "direct_tls": True},
        ]
        target = {"host": other_address, "port": ports[(other_address, "direct")]}
        domains = {other: {**target, "direct_tls": True}}
        return await serve(start_server, tmp_path / domain, domain, ca, listeners, domains)

    b = await start("b.test", XMPPD_ADDRESS, "d.test", OTHER_ADDRESS)
    d = await start("d.test", OTHER_ADDRESS, "b.test", XMPPD_ADDRESS)
    return b, d


async def test_two_xmppd_servers_over_one_direct_tls_bidirectional_stream(
    tmp_path: Path, start_server: StartServer
) -> None:
    b, d = await direct_tls_pair(tmp_path, start_server)
    async with signed_in(*await bob_and_dora(b, d)) as (bob, dora):
        await message_across(bob, dora, "dora@d.test", "hello d.test")
        await message_across(dora, bob, "bob@b.test/desk", "hello b.test")
        # One TCP connection: b.test opened it (direct TLS), d.test answered on it.
        assert streams(b) == [("out", "d.test", "EXTERNAL", "direct", True, 1, 1)]
        assert streams(d) == [("in", "b.test", "EXTERNAL", "direct", True, 1, 1)]
        # XEP-0368: SNI the remote domain, ALPN 'xmpp-server' offered and selected.
        assert b.s2s is not None and d.s2s is not None
        for conn in (*b.s2s.connections, *d.s2s.connections):
            assert conn.transport is not None
            if not conn.outgoing:  # xmppd's own TLS layer for incoming streams
                assert isinstance(conn.transport, TLSAcceptTransport)
                assert conn.transport.layer.alpn() == b"xmpp-server"
                continue
            tls = conn.transport.get_extra_info("ssl_object")
            assert tls.selected_alpn_protocol() == "xmpp-server"
            assert tls.server_hostname == "d.test"

        # Presence subscriptions both ways ride the same stream.
        await subscribed(bob, dora)
        assert len(streams(b)) == 1 and len(streams(d)) == 1


def drop_as_they_take_a_stanza(monkeypatch: pytest.MonkeyPatch, server: Server, times: int) -> None:
    """The next `times` streams of `server` that take a stanza lose their connection in
    that loop iteration, before the stream writes it: a reset the peer never read."""
    send = S2SConnection.send
    left = times

    def send_then_drop(conn: S2SConnection, item: Outgoing) -> bool:
        nonlocal left
        taken = send(conn, item)
        if taken and conn.service is server.s2s and left:
            left -= 1
            assert conn.transport is not None
            conn.transport.abort()
        return taken

    monkeypatch.setattr(S2SConnection, "send", send_then_drop)


async def test_a_message_whose_connection_dropped_before_its_write_goes_on_a_new_one(
    tmp_path: Path, start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """b.test's stream to d.test takes bob's message and the connection drops before the
    write: d.test never saw it. It goes on a new connection, and is counted once."""
    b, d = await direct_tls_pair(tmp_path, start_server)
    async with signed_in(*await bob_and_dora(b, d)) as (bob, dora):
        await message_across(bob, dora, "dora@d.test", "hello d.test")
        assert b.s2s is not None
        [first] = b.s2s.outgoing()
        drop_as_they_take_a_stanza(monkeypatch, b, 1)
        await message_across(bob, dora, "dora@d.test", "in flight")
        [second] = b.s2s.outgoing()
        assert second is not first and second.stanzas_out == 1
        sent = b.router.ledger.snapshot()
        assert (sent["received"], sent["to_remote"], sent["bounced"]) == (2, 2, 0)
        assert d.router.ledger.from_remote == 2


async def test_a_message_two_connections_dropped_before_its_write_bounces(
    tmp_path: Path, start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer whose connections all drop as they take a message does not keep it: given
    back once, it bounces the second time, counted as bounced and never as sent."""
    b, d = await direct_tls_pair(tmp_path, start_server)
    async with signed_in(*await bob_and_dora(b, d)) as (bob, dora):
        await message_across(bob, dora, "dora@d.test", "hello d.test")
        assert b.s2s is not None
        drop_as_they_take_a_stanza(monkeypatch, b, 2)
        message = bob.make_message(mto=slixmpp.JID("dora@d.test"), mbody="dropped twice")
        message["id"] = "m2"
        message.send()
        error = await asyncio.wait_for(bob.errors.get(), 20)
        assert (error["id"], error["error"]["condition"]) == ("m2", "remote-server-timeout")
        assert list(b.s2s.outgoing()) == [] and not b.s2s.links
        sent = b.router.ledger.snapshot()
        assert (sent["received"], sent["to_remote"], sent["bounced"]) == (2, 1, 1)
        assert d.router.ledger.from_remote == 1


async def test_workers_share_the_s2s_ports(tmp_path: Path) -> None:
    """`xmppd --workers N` starts N nodes with reuse_port (xmppd.cli.server): each binds
    the s2s ports, STARTTLS and direct TLS, as it binds the client ports."""
    starttls, direct = free_port(XMPPD_ADDRESS), free_port(XMPPD_ADDRESS)
    section = {
        "listeners": [
            {"address": XMPPD_ADDRESS, "port": starttls},
            {"address": XMPPD_ADDRESS, "port": direct, "direct_tls": True},
        ]
    }
    workers: list[Server] = []
    try:
        for _ in range(2):
            worker = Server(load_config(write_config(tmp_path, s2s=section)), reuse_port=True)
            await worker.start()
            workers.append(worker)
        for worker in workers:
            assert worker.s2s is not None
            assert sorted(port for _, port in worker.s2s.listening) == sorted([starttls, direct])
    finally:
        for worker in workers:
            await worker.stop()


async def test_dialback_between_two_xmppd_servers_per_domain_policy(
    tmp_path: Path, start_server: StartServer
) -> None:
    """d.test's certificate is from a CA b.test does not trust; b.test lets d.test (and
    only it: `domains."d.test".accept_dialback`) use dialback. d.test's stream to b.test
    (direct TLS) authenticates with dialback: b.test checks the key with d.test on a
    db:verify stream of its own, d.test vouches for it, and the answer goes back on the
    same (XEP-0288) stream."""
    ca, other_ca = make_ca(tmp_path), make_ca(tmp_path, "untrusted CA")
    ports = {address: free_port(address) for address in (XMPPD_ADDRESS, OTHER_ADDRESS)}

    async def start(
        domain: str, address: str, other: str, cert_ca: CA, policy: dict[str, object]
    ) -> Server:
        other_address = OTHER_ADDRESS if address == XMPPD_ADDRESS else XMPPD_ADDRESS
        listeners: list[dict[str, object]] = [
            {"address": address, "port": ports[address], "direct_tls": True}
        ]
        target = {"host": other_address, "port": ports[other_address]}
        domains = {other: {**target, "direct_tls": True, **policy}}
        server = await serve(
            start_server, tmp_path / domain, domain, ca, listeners, domains, cert_ca
        )
        await server.accounts[domain].register(domain[0] * 3, "secret")
        return server

    b = await start("b.test", XMPPD_ADDRESS, "d.test", ca, {"accept_dialback": True})
    d = await start("d.test", OTHER_ADDRESS, "b.test", other_ca, {})
    logins = (
        xmppd_user(b, "bbb@b.test/desk", "secret"),
        xmppd_user(d, "ddd@d.test/home", "secret"),
    )
    async with signed_in(*logins) as (bbb, ddd):
        await message_across(ddd, bbb, "bbb@b.test/desk", "hello b.test")
        await message_across(bbb, ddd, "ddd@d.test/home", "hello d.test")
        assert streams(b) == [("in", "d.test", "dialback", "direct", True, 1, 1)]
        assert streams(d) == [("out", "b.test", "dialback", "direct", True, 1, 1)]


async def test_a_blocked_contact_on_the_other_server_sees_no_more_presence(
    tmp_path: Path, start_server: StartServer
) -> None:
    """bob@b.test blocks dora@d.test, his contact (subscription both): she is told he
    went away (XEP-0191 3.3), and then sees none of his presence, neither his next
    status nor his logout, though b.test makes those copies itself, with no client
    stanza for its privacy filters to judge. carl@b.test's messages to dora, on the
    same s2s stream, mark how far she has read."""
    b, d = await direct_tls_pair(tmp_path, start_server)
    await b.accounts["b.test"].register("carl", "carl-secret")
    logins = (*await bob_and_dora(b, d), xmppd_user(b, "carl@b.test/desk", "carl-secret"))
    async with signed_in(*logins) as (bob, dora, carl):
        await subscribed(bob, dora)
        seen: asyncio.Queue[slixmpp.Presence] = asyncio.Queue()
        dora.add_event_handler("presence", seen.put_nowait)

        async def bobs_presence_up_to_a_message(body: str) -> list[str]:
            """The type of each presence dora gets from bob before carl's `body`."""
            await message_across(carl, dora, "dora@d.test/home", body)
            got = []
            while not seen.empty():
                presence = seen.get_nowait()
                if presence["from"].bare == "bob@b.test":
                    got.append(presence["type"])
            return got

        bob.send_presence(pshow="chat")
        await bob.get_roster()
        await b.router.drain()
        assert "chat" in await bobs_presence_up_to_a_message("before the block")

        block = bob.make_iq_set()
        block.append(
            ET.fromstring("<block xmlns='urn:xmpp:blocking'><item jid='dora@d.test'/></block>")
        )
        await block.send(timeout=10)
        assert await bobs_presence_up_to_a_message("blocked") == ["unavailable"]
        bob.send_presence(pshow="away")
        await bob.get_roster()  # a round trip: b.test has the presence
        await b.router.drain()  # and routed its copies (after a roster read)
        assert await bobs_presence_up_to_a_message("away") == []
        await close(bob)
        async with asyncio.timeout(10):
            while b.router.directory.has("bob@b.test"):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        await b.router.drain()
        assert await bobs_presence_up_to_a_message("gone") == []


@pytest.mark.timeout(180)
async def test_a_peer_faster_than_storage_is_not_read_until_storage_catches_up(
    tmp_path: Path, start_server: StartServer
) -> None:
    """bob@b.test writes 600 messages of 3 KB to 20 offline users of d.test while d.test's store
    holds every write: d.test stops reading the stream once WORK_IN_FLIGHT of its
    stanzas wait on storage (TCP slows b.test) instead of queueing them all in memory;
    when the store goes on, every message is stored offline, none bounced."""
    b, d = await direct_tls_pair(tmp_path, start_server)
    await b.accounts["b.test"].register("bob", "bob-secret")
    users = [f"u{n}" for n in range(20)]
    for user in users:
        await d.accounts["d.test"].register(user, "secret")
    s2s = d.s2s
    assert s2s is not None
    async with signed_in(xmppd_user(b)) as (bob,):
        bob.send_message(mto=slixmpp.JID("u0@d.test"), mbody="the stream is up")
        await until(lambda: d.router.ledger.offline == 1, timeout=20)
        [incoming] = [c for c in s2s.connections if c.stanzas_in]
        gate = asyncio.Event()
        items = d.storage.items
        transact = items.transact

        async def held(writes: Any) -> None:
            await gate.wait()
            await transact(writes)

        items.transact = held  # type: ignore[method-assign]
        body = "x" * 3000
        try:
            for n in range(30):
                for user in users:
                    bob.send_message(mto=slixmpp.JID(f"{user}@d.test"), mbody=f"{n} {body}")
            await until(lambda: incoming.stanzas_in > WORK_IN_FLIGHT, timeout=20)
            await asyncio.sleep(1)  # ample for 1.8 MB over loopback, were the stream read
            # Each read of the stream may bring up to ~85 of these stanzas (256 KB).
            assert incoming.stanzas_in < 400, "the peer's stream was read on"
        finally:
            gate.set()  # also on a failure: the servers stop only once their writes end
        await until(lambda: d.router.ledger.offline == 601, timeout=90)
        assert incoming.stanzas_in == 601
        assert d.router.ledger.bounced == b.router.ledger.bounced == 0
