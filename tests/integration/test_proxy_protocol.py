"""Behind a real haproxy: the PROXY protocol gives the node each client's own address.

Clients connect to haproxy from different loopback addresses (127.0.0.2,
127.0.0.3); haproxy connects to the node from 127.0.0.1 and sends a PROXY
header (version 2, or version 1 on a second frontend). The node must see the
client's address, so that a stranger's wrong passwords ban the stranger and
not every user of the balancer (without it, all of them come from 127.0.0.1,
and the owner's login below is refused). A connection from an address not in
`trusted_proxies`, and one without a header, are refused.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests.integration.clients import HEADER, insecure_context, read_until
from tests.integration.conftest import StartServer, port_of
from tests.integration.haproxy import Balancers
from tests.integration.test_cluster import until
from xmppd.server import Server

pytestmark = pytest.mark.timeout(90)

SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
OWNER, STRANGER = "127.0.0.2", "127.0.0.3"
Balancer = Callable[[int, str], Awaitable[int]]


@pytest.fixture
async def balancer(tmp_path: Path) -> AsyncIterator[Balancer]:
    """start(node port, "send-proxy-v2" or "send-proxy"): haproxy in front of it."""
    balancers = Balancers(tmp_path)

    async def start(node: int, proxy: str) -> int:
        return await balancers.start(f"    server n0 127.0.0.1:{node} {proxy}")

    yield start
    await balancers.stop()


async def proxied_node(start_server: StartServer, **listener: object) -> Server:
    return await start_server(
        listeners=[
            {"type": "direct_tls", "address": "127.0.0.1", "port": 0,
             "proxy_protocol": True, **listener},
            {"type": "starttls", "address": "127.0.0.1", "port": 0},
        ],
        limits={"auth_failures_before_ban": 3, "auth_failure_delay": 0.05},
    )


async def attempt(port: int, source: str, password: str) -> bytes:
    """One PLAIN login as alice over direct TLS from `source`: the server's answer."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=insecure_context(), server_hostname="localhost",
        local_addr=(source, 0),
    )
    try:
        writer.write(HEADER.encode())
        await read_until(reader, b"</stream:features>")
        token = base64.b64encode(f"\0alice\0{password}".encode()).decode()
        writer.write(f"<auth xmlns='{SASL}' mechanism='PLAIN'>{token}</auth>".encode())
        answer = b""
        async with asyncio.timeout(10):
            while b"<success" not in answer and b"</failure>" not in answer:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                answer += chunk
        return answer
    finally:
        writer.close()


async def test_a_strangers_guesses_ban_the_stranger_not_the_balancer(
    start_server: StartServer, balancer: Balancer
) -> None:
    server = await proxied_node(start_server)
    port = await balancer(port_of(server, "direct_tls"), "send-proxy-v2")
    for _ in range(4):
        await attempt(port, STRANGER, "wrong-guess")
    assert server.throttle.stats.bans == 1
    assert await server.throttle.refused(STRANGER, "alice")
    answer = await attempt(port, OWNER, "alice-secret")
    assert b"<success" in answer, answer


async def test_the_client_address_reaches_the_node_with_either_version(
    start_server: StartServer, balancer: Balancer
) -> None:
    server = await proxied_node(start_server)
    for version in ("send-proxy-v2", "send-proxy"):
        port = await balancer(port_of(server, "direct_tls"), version)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=insecure_context(), server_hostname="localhost",
            local_addr=(OWNER, 0),
        )
        writer.write(HEADER.encode())
        await read_until(reader, b"</stream:features>")
        assert {conn.ip for conn in server.connections} == {OWNER}, version
        writer.close()
        await until(lambda: not server.connections, timeout=10)


async def test_untrusted_or_headerless_connections_are_refused(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = await proxied_node(start_server, trusted_proxies=["127.0.0.1"])
    port = port_of(server, "direct_tls")
    # Not a balancer: a client that reached the node's port directly.
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(OWNER, 0))
    async with asyncio.timeout(10):
        assert await reader.read(100) == b""
    writer.close()
    # A trusted address that sends no header but a TLS ClientHello.
    with pytest.raises((ConnectionError, OSError, asyncio.IncompleteReadError)):
        async with asyncio.timeout(10):
            await asyncio.open_connection(
                "127.0.0.1", port, ssl=insecure_context(), server_hostname="localhost"
            )
    assert not server.connections
    refusals = [r.getMessage() for r in caplog.records if "PROXY protocol listener" in r.message]
    assert any(f"from {OWNER}" in m and "trusted_proxies" in m for m in refusals), refusals
    assert any("from 127.0.0.1" in m and "no PROXY protocol header" in m for m in refusals)
