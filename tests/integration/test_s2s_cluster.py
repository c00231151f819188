"""Federation from a cluster: two xmppd nodes (one Redis) serve b.test, Prosody a.test.

Both nodes listen for s2s on 127.0.18.3, each on its own port; Prosody reaches
b.test at node A's port only, so every stream Prosody opens lands on node A
(as a peer's streams land on whichever node DNS or the load balancer gives
it), while each node opens its own outgoing stream to a.test when one of its
users writes there (docs/s2s.md, "In a cluster": per-node outgoing links).
Stanzas Prosody sends for a user on node B arrive on node A and go through
the cluster directory and node B's inbox like any other.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.clients import close
from tests.integration.conftest import StartServer
from tests.integration.s2s_clients import Peer, next_message, user_at, xmppd_user
from tests.integration.s2s_peers import (
    CA,
    PROSODY,
    PROSODY_ADDRESS,
    XMPPD_ADDRESS,
    DNSServer,
    Prosody,
    free_port,
    issue,
    make_ca,
    start_dns,
    start_prosody,
)
from tests.integration.test_cluster import until
from tests.storage.services import service_factory  # noqa: F401  (fixture)
from xmppd.cluster import RemoteTransport
from xmppd.server import Server
from xmppd.storage import devservices
from xmppd.storage.devservices import LocalService

if not Path(PROSODY).exists():
    import os

    if os.environ.get("CI"):
        raise RuntimeError("CI needs Prosody (apt-get install prosody) for the s2s tests")
    pytest.skip("prosody is not installed", allow_module_level=True)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def redis_service(
    service_factory: Callable[[Callable[[], LocalService]], LocalService],  # noqa: F811
) -> Iterator[LocalService]:
    yield service_factory(devservices.redis_server)


@dataclass
class ClusterFederation:
    prosody: Prosody
    dns: DNSServer
    a: Server  # Prosody's streams to b.test land here
    b: Server


async def _start(
    tmp_path: Path,
    start_server: StartServer,
    redis: LocalService,
    *,
    xmppd_ca: CA | None = None,
    secure_auth: bool = True,
) -> ClusterFederation:
    ca = make_ca(tmp_path)
    own = tmp_path / "xmppd-cert"
    own.mkdir()
    cert, key = issue(xmppd_ca or ca, own, "b.test")  # one certificate for the domain
    port_a, port_b = free_port(XMPPD_ADDRESS), free_port(XMPPD_ADDRESS)
    prosody = await start_prosody(
        tmp_path / "prosody",
        ca,
        users={"anna": "anna-secret"},
        peers={"b.test": (XMPPD_ADDRESS, port_a)},
        secure_auth=secure_auth,
    )
    dns = await start_dns({})
    nodes = []
    for name, port in (("node-a", port_a), ("node-b", port_b)):
        nodes.append(
            await start_server(
                users={},
                hosts=["b.test"],
                tls={"cert": str(cert), "key": str(key)},
                cluster={"redis_url": devservices.redis_url(redis), "node_name": name},
                s2s={
                    "listeners": [{"address": XMPPD_ADDRESS, "port": port}],
                    "ca_file": str(ca.path),
                    "connect_timeout": 10.0,
                    "dns_servers": [f"127.0.18.1:{dns.port}"],
                    "domains": {"a.test": {"host": PROSODY_ADDRESS, "port": prosody.s2s_port}},
                },
            )
        )
    accounts = nodes[0].accounts["b.test"]
    await accounts.register("bob", "bob-secret")
    await accounts.register("carol", "carol-secret")
    return ClusterFederation(prosody, dns, nodes[0], nodes[1])


@pytest.fixture
async def started(
    redis_service: LocalService, start_server: StartServer
) -> AsyncIterator[list[ClusterFederation]]:
    feds: list[ClusterFederation] = []
    yield feds
    for fed in feds:
        assert fed.dns.transport is not None
        fed.dns.transport.close()
        await fed.prosody.stop()


def _diagnose(fed: ClusterFederation) -> str:
    return "prosody log:\n" + fed.prosody.log[-6000:]


def _streams(server: Server) -> list[tuple[str, str, str | None]]:
    assert server.s2s is not None
    return sorted(
        ("out" if c.outgoing else "in", c.remote, c.stream.mechanism)
        for c in server.s2s.connections
    )


async def _users(fed: ClusterFederation) -> tuple[Peer, Peer, Peer]:
    bob = await xmppd_user(fed.a, "bob@b.test/desk", "bob-secret")
    carol = await xmppd_user(fed.b, "carol@b.test/phone", "carol-secret")
    anna = await user_at(
        fed.prosody.address, fed.prosody.c2s_port, "anna@a.test/home", "anna-secret"
    )
    await until(lambda: fed.a.router.directory.get("carol@b.test", "phone") is not None)
    return bob, carol, anna


async def test_users_on_both_nodes_talk_with_prosody(
    redis_service: LocalService,
    tmp_path: Path,
    start_server: StartServer,
    started: list[ClusterFederation],
) -> None:
    fed = await _start(tmp_path, start_server, redis_service)
    started.append(fed)
    bob, carol, anna = await _users(fed)
    try:
        bob.send_message(mto="anna@a.test", mbody="from node A", mtype="chat")
        got = await next_message(anna)
        carol.send_message(mto="anna@a.test", mbody="from node B", mtype="chat")
        got2 = await next_message(anna)
        assert {(str(got["from"]), got["body"]), (str(got2["from"]), got2["body"])} == {
            ("bob@b.test/desk", "from node A"),
            ("carol@b.test/phone", "from node B"),
        }
        anna.send_message(mto="bob@b.test/desk", mbody="to node A", mtype="chat")
        assert (await next_message(bob))["body"] == "to node A"
        # Arrives on node A's incoming stream; carol's session is node B's: forwarded
        # through the cluster directory (node B's inbox), to the full and the bare JID.
        session = fed.a.router.directory.get("carol@b.test", "phone")
        assert session is not None and isinstance(session.transport, RemoteTransport)
        anna.send_message(mto="carol@b.test/phone", mbody="to node B", mtype="chat")
        back = await next_message(carol)
        assert (back["body"], str(back["from"])) == ("to node B", "anna@a.test/home")
        anna.send_message(mto="carol@b.test", mbody="bare, to node B", mtype="chat")
        assert (await next_message(carol))["body"] == "bare, to node B"
        # Each node has its own outgoing stream to a.test (no hop through another
        # node); Prosody's streams to b.test all came to node A.
        assert _streams(fed.a) == [
            ("in", "a.test", "EXTERNAL"),
            ("out", "a.test", "EXTERNAL"),
        ]
        assert _streams(fed.b) == [("out", "a.test", "EXTERNAL")]
        # The message ledger over both nodes: what came from clients and from a.test
        # was handed to a.test's streams or delivered (on the node of the session).
        totals: Counter[str] = Counter()
        for node in (fed.a, fed.b):
            await node.router.drain()
            snapshot = node.router.ledger.snapshot()
            totals.update({k: v for k, v in snapshot.items() if isinstance(v, int)})
        assert (totals["received"], totals["from_remote"]) == (2, 3)
        assert (totals["to_remote"], totals["delivered"], totals["lost"]) == (2, 3, 0)
        assert fed.b.router.ledger.delivered == 2  # carol's, forwarded by node A
    except TimeoutError:
        pytest.fail("no message across\n" + _diagnose(fed))
    finally:
        for client in (bob, carol, anna):
            await close(client)


async def test_subscription_and_probe_to_a_user_on_the_other_node(
    redis_service: LocalService,
    tmp_path: Path,
    start_server: StartServer,
    started: list[ClusterFederation],
) -> None:
    fed = await _start(tmp_path, start_server, redis_service)
    started.append(fed)
    bob, carol, anna = await _users(fed)
    try:
        # anna asks carol (node B): the request arrives on node A; carol's client
        # approves and asks back (slixmpp's auto_authorize and auto_subscribe).
        anna.send_presence(pto="carol@b.test", ptype="subscribe")
        async with asyncio.timeout(20):
            await carol.subscription_both("anna@a.test")
            await anna.subscription_both("carol@b.test")
        assert carol.pushed == {"anna@a.test": "both"}
        # anna logs in again: Prosody probes carol, on node A, which answers from the
        # cluster's table with carol's presence (her session is node B's).
        await close(anna)
        anna = await user_at(
            fed.prosody.address, fed.prosody.c2s_port, "anna@a.test/home", "anna-secret"
        )
        async with asyncio.timeout(20):
            while (await anna.available.get())["from"] != "carol@b.test/phone":
                pass
        # And carol, on node B, sees anna come back (Prosody's broadcast, via node A).
        async with asyncio.timeout(20):
            while True:
                presence = await carol.available.get()
                if presence["from"] == "anna@a.test/home":
                    break
        assert all(c.remote == "a.test" for c in fed.b.s2s.connections)  # type: ignore[union-attr]
        assert not [c for c in fed.b.s2s.connections if not c.outgoing]  # type: ignore[union-attr]
    except TimeoutError:
        pytest.fail("no presence across\n" + _diagnose(fed))
    finally:
        for client in (bob, carol, anna):
            await close(client)


async def test_any_node_vouches_for_a_dialback_key(
    redis_service: LocalService,
    tmp_path: Path,
    start_server: StartServer,
    started: list[ClusterFederation],
) -> None:
    # The nodes' certificate comes from a CA Prosody does not know: node B's outgoing
    # stream authenticates with dialback, and Prosody checks the key with b.test,
    # which for it is node A: node A vouches for a key node B made (the secret is the
    # cluster's, in the item store).
    folder = tmp_path / "unknown-ca"
    folder.mkdir()
    fed = await _start(
        tmp_path,
        start_server,
        redis_service,
        xmppd_ca=make_ca(folder, "unknown CA"),
        secure_auth=False,
    )
    started.append(fed)
    carol = await xmppd_user(fed.b, "carol@b.test/phone", "carol-secret")
    anna = await user_at(
        fed.prosody.address, fed.prosody.c2s_port, "anna@a.test/home", "anna-secret"
    )
    try:
        carol.send_message(mto="anna@a.test", mbody="vouched for by node A", mtype="chat")
        got = await next_message(anna)
        assert (got["body"], str(got["from"])) == ("vouched for by node A", "carol@b.test/phone")
        assert _streams(fed.b) == [("out", "a.test", "dialback")]
        # Prosody knows b.test only at node A's port: it asked node A about the key.
        assert _streams(fed.a) == [("in", "a.test", "EXTERNAL")]
    except TimeoutError:
        pytest.fail("anna got nothing\n" + _diagnose(fed))
    finally:
        await close(carol)
        await close(anna)
