"""An s2s listener behind a real haproxy: the PROXY protocol gives d.test its peer's address.

b.test (127.0.18.3) reaches d.test (127.0.18.5) through haproxy on
127.0.0.1, so b.test's connection comes from 127.0.0.1; haproxy connects on to
d.test from its own address, 127.0.18.9 (`source`), the only one in d.test's
`trusted_proxies`, and sends a PROXY header first (version 2 to the STARTTLS
listener, version 1 to the direct TLS one, whose TLS handshake may follow the
header in the same read). d.test must see 127.0.0.1, the peer, not the
balancer: in the per-address limit, the logs and `xmppctl s2s`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.integration.conftest import StartServer
from tests.integration.haproxy import Balancers
from tests.integration.s2s_clients import message_across, signed_in
from tests.integration.s2s_peers import XMPPD_ADDRESS, make_ca
from tests.integration.test_s2s_xmppd import OTHER_ADDRESS, bob_and_dora, free_s2s_ports, serve

pytestmark = pytest.mark.timeout(90)

BALANCER = "127.0.18.9"  # haproxy's address towards d.test
PEER = "127.0.0.1"  # b.test's address towards haproxy
BEHIND = {"proxy_protocol": True, "trusted_proxies": [BALANCER]}  # d.test's listeners


@pytest.fixture
async def balancers(tmp_path: Path) -> AsyncIterator[Balancers]:
    balancers = Balancers(tmp_path)
    yield balancers
    await balancers.stop()


@pytest.mark.parametrize(
    ("kind", "proxy"), [("starttls", "send-proxy-v2"), ("direct", "send-proxy")]
)
async def test_the_peer_address_reaches_an_s2s_listener_behind_haproxy(
    tmp_path: Path,
    start_server: StartServer,
    balancers: Balancers,
    caplog: pytest.LogCaptureFixture,
    kind: str,
    proxy: str,
) -> None:
    caplog.set_level(logging.INFO, logger="xmppd.s2s")
    ca = make_ca(tmp_path)
    ports = free_s2s_ports()
    port = ports[(OTHER_ADDRESS, kind)]
    front = await balancers.start(
        f"    server d0 {OTHER_ADDRESS}:{port} {proxy} source {BALANCER}"
    )
    d = await serve(
        start_server,
        tmp_path / "d.test",
        "d.test",
        ca,
        [
            {"address": OTHER_ADDRESS, "port": ports[(OTHER_ADDRESS, "starttls")], **BEHIND},
            {
                "address": OTHER_ADDRESS,
                "port": ports[(OTHER_ADDRESS, "direct")],
                "direct_tls": True,
                **BEHIND,
            },
        ],
        {"b.test": {"host": XMPPD_ADDRESS, "port": ports[(XMPPD_ADDRESS, "starttls")]}},
    )
    b = await serve(
        start_server,
        tmp_path / "b.test",
        "b.test",
        ca,
        [{"address": XMPPD_ADDRESS, "port": ports[(XMPPD_ADDRESS, "starttls")]}],
        {"d.test": {"host": "127.0.0.1", "port": front, "direct_tls": kind == "direct"}},
    )
    assert d.s2s is not None
    async with signed_in(*await bob_and_dora(b, d)) as (bob, dora):
        await message_across(bob, dora, "dora@d.test", "through the balancer")
        await message_across(dora, bob, "bob@b.test/desk", "and back on the same stream")
    (incoming,) = [c for c in d.s2s.connections if not c.outgoing]
    assert incoming.stream.authenticated_domain == "b.test"
    assert incoming.peer == PEER and incoming.view()["peer"] == PEER
    assert dict(d.s2s.per_address) == {PEER: 1}
    authenticated = [
        r.getMessage() for r in caplog.records if "incoming stream from b.test" in r.getMessage()
    ]
    assert any(f"({PEER}) authenticated" in m for m in authenticated), authenticated


async def test_an_s2s_proxy_listener_refuses_whoever_is_not_a_balancer(
    tmp_path: Path, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    ca = make_ca(tmp_path)
    port = free_s2s_ports()[(OTHER_ADDRESS, "starttls")]
    d = await serve(
        start_server,
        tmp_path / "d.test",
        "d.test",
        ca,
        [{"address": OTHER_ADDRESS, "port": port, **BEHIND}],
        {},
    )
    # A server that reached the port directly: refused before anything is read.
    reader, writer = await asyncio.open_connection(
        OTHER_ADDRESS, port, local_addr=(XMPPD_ADDRESS, 0)
    )
    writer.write(b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' to='d.test'>")
    async with asyncio.timeout(10):
        assert await reader.read(100) == b""
    writer.close()
    assert d.s2s is not None and not d.s2s.connections and not d.s2s.per_address
    refusals = [r.getMessage() for r in caplog.records if "PROXY protocol listener" in r.message]
    assert any(f"from {XMPPD_ADDRESS}" in m and "trusted_proxies" in m for m in refusals)
