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
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.clients import close
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
from tests.integration.test_cluster import until
from tests.storage.services import service_factory  # noqa: F401  (fixture)
from xmppd.cluster import RemoteTransport
from xmppd.server import Server
from xmppd.storage import devservices
from xmppd.storage.devservices import LocalService

require_prosody()

pytestmark = pytest.mark.timeout(90)


@dataclass
class ClusterFederation:
    prosody: Prosody
    dns: DNSServer
    a: Server  # Prosody's streams to b.test land here
    b: Server

    def carol(self) -> Coroutine[Any, Any, Peer]:
        return xmppd_user(self.b, "carol@b.test/phone", "carol-secret")

    @asynccontextmanager
    async def users(self) -> AsyncIterator[tuple[Peer, ...]]:
        """bob on node A, carol on node B (node A's directory has her), anna on Prosody,
        for the block; a timeout in it fails the test with Prosody's log."""
        logins = (xmppd_user(self.a), self.carol(), prosody_user(self.prosody))
        async with signed_in(*logins, diagnose=self.diagnose) as users:
            await until(lambda: self.a.router.directory.get("carol@b.test", "phone") is not None)
            yield users

    def diagnose(self) -> str:
        return "prosody log:\n" + self.prosody.log[-6000:]


Federate = Callable[..., Awaitable[ClusterFederation]]


@pytest.fixture
async def federate(
    tmp_path: Path,
    start_server: StartServer,
    redis_service: LocalService,
) -> AsyncIterator[Federate]:
    """Starts Prosody (a.test) and two xmppd nodes (b.test) federated; stops Prosody
    after the test (the nodes stop with the other servers of the test)."""
    peers: list[tuple[Prosody, DNSServer]] = []

    async def start(*, xmppd_ca: CA | None = None, secure_auth: bool = True) -> ClusterFederation:
        """`xmppd_ca`: the CA of the nodes' certificate, default the one Prosody trusts;
        `secure_auth`: Prosody's s2s_secure_auth (off: it accepts dialback)."""
        ca = make_ca(tmp_path)
        tls = xmppd_tls(tmp_path / "xmppd-cert", xmppd_ca or ca)  # one for the domain
        port_a, port_b = free_port(XMPPD_ADDRESS), free_port(XMPPD_ADDRESS)
        dns = await start_dns({})
        prosody = await start_prosody(
            tmp_path / "prosody",
            ca,
            peers={"b.test": (XMPPD_ADDRESS, port_a)},
            secure_auth=secure_auth,
        )
        peers.append((prosody, dns))
        domains = {"a.test": {"host": PROSODY_ADDRESS, "port": prosody.s2s_port}}
        nodes = []
        for name, port in (("node-a", port_a), ("node-b", port_b)):
            nodes.append(
                await start_server(
                    users={},
                    hosts=["b.test"],
                    tls=tls,
                    cluster={"redis_url": devservices.redis_url(redis_service), "node_name": name},
                    s2s=xmppd_s2s(
                        ca, [{"address": XMPPD_ADDRESS, "port": port}], dns.port, domains=domains
                    ),
                )
            )
        accounts = nodes[0].accounts["b.test"]
        await accounts.register("bob", "bob-secret")
        await accounts.register("carol", "carol-secret")
        return ClusterFederation(prosody, dns, nodes[0], nodes[1])

    yield start
    for prosody, dns in peers:
        dns.close()
        await prosody.stop()


def _streams(server: Server) -> list[tuple[str, str, str | None]]:
    assert server.s2s is not None
    return sorted(
        ("out" if c.outgoing else "in", c.remote, c.stream.mechanism)
        for c in server.s2s.connections
    )


async def test_users_on_both_nodes_talk_with_prosody(federate: Federate) -> None:
    fed = await federate()
    async with fed.users() as (bob, carol, anna):
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
        await message_across(anna, carol, "carol@b.test/phone", "to node B")
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


async def test_subscription_and_probe_to_a_user_on_the_other_node(federate: Federate) -> None:
    fed = await federate()
    async with fed.users() as (bob, carol, anna):
        # anna asks carol (node B): the request arrives on node A; carol's client
        # approves and asks back.
        await subscribed(anna, carol)
        assert carol.pushed == {"anna@a.test": "both"}
        # anna logs in again: Prosody probes carol, on node A, which answers from the
        # cluster's table with carol's presence (her session is node B's).
        await close(anna)
        async with signed_in(prosody_user(fed.prosody)) as (anna,):
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


async def test_any_node_vouches_for_a_dialback_key(tmp_path: Path, federate: Federate) -> None:
    # The nodes' certificate comes from a CA Prosody does not know: node B's outgoing
    # stream authenticates with dialback, and Prosody checks the key with b.test,
    # which for it is node A: node A vouches for a key node B made (the secret is the
    # cluster's, in the item store).
    folder = tmp_path / "unknown-ca"
    folder.mkdir()
    fed = await federate(xmppd_ca=make_ca(folder, "unknown CA"), secure_auth=False)
    logins = (fed.carol(), prosody_user(fed.prosody))
    async with signed_in(*logins, diagnose=fed.diagnose) as (carol, anna):
        await message_across(carol, anna, "anna@a.test", "vouched for by node A")
        assert _streams(fed.b) == [("out", "a.test", "dialback")]
        # Prosody knows b.test only at node A's port: it asked node A about the key.
        assert _streams(fed.a) == [("in", "a.test", "EXTERNAL")]
