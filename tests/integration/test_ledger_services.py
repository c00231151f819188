"""The message ledger balances on a real node (TLS streams) beyond one-to-one chat:
carbons a privacy list refuses, multi-user chat, archive results, blocking.

received + from_remote == delivered - copies - replayed - rerouted
                          + offline + bounced + to_remote + sum(dropped)
"""

from __future__ import annotations

from typing import Any

from tests.integration.conftest import StartServer
from tests.integration.test_stream_management import Stream, roundtrip
from xmppd.config import DEFAULT_MODULES
from xmppd.server import Server

USERS = {"alice": "alice-secret", "bob": "bob-secret", "carol": "carol-secret"}
CARBONS = "urn:xmpp:carbons:2"
PRIV = "jabber:iq:privacy"
MUC = "http://jabber.org/protocol/muc"
ROOM = "room@conference.localhost"
WITH_MUC = {**{m: {} for m in DEFAULT_MODULES}, "muc": {}}
WITH_MAM = {**{m: {} for m in DEFAULT_MODULES}, "mam": {}}


def fates(s: dict[str, Any]) -> int:
    """The right side of xmppd/ledger.py's equation, less from_service (moved left)."""
    return (
        s["delivered"] - s["copies"] - s["replayed"] - s["rerouted"] + s["offline"]
        + s["bounced"] + s["to_remote"] + s["to_service"] + sum(s["dropped"].values())
        - s["from_service"]
    )


def delta(server: Server, before: dict[str, Any]) -> dict[str, Any]:
    after = server.router.ledger.snapshot()
    out = {k: (v - before[k] if isinstance(v, int) else v) for k, v in after.items()}
    out["dropped"] = {r: n - before["dropped"].get(r, 0) for r, n in after["dropped"].items()}
    return out


def assert_balanced(server: Server, before: dict[str, Any]) -> dict[str, Any]:
    """The ledger's equation over what changed since `before`; the changes."""
    d = delta(server, before)
    assert d["received"] == fates(d), f"received {d['received']} != fates {fates(d)}: {d}"
    return d


async def settle(server: Server, *streams: Stream) -> None:
    await server.router.drain()
    for s in streams:
        await roundtrip(s)  # whatever the server sent before is read (and written)


async def online(server: Server, user: str, resource: str) -> Stream:
    stream = await Stream.login(server, user, resource)
    await stream.send("<presence/>")
    await stream.next("<presence")
    await server.router.drain()
    return stream


async def iq_ok(stream: Stream, payload: str, id_: str, to: str = "") -> None:
    to_attr = f" to='{to}'" if to else ""
    await stream.send(f"<iq type='set' id='{id_}'{to_attr}>{payload}</iq>")
    reply = await stream.next(f'id="{id_}"')
    assert reply.get("type") == "result", reply


async def test_a_carbon_a_privacy_list_refuses_is_dropped_as_refused(
    start_server: StartServer,
) -> None:
    server = await start_server(users=USERS)
    alice = await online(server, "alice", "a")
    one = await online(server, "bob", "one")
    two = await online(server, "bob", "two")
    for i, s in enumerate((one, two)):
        await iq_ok(s, f"<enable xmlns='{CARBONS}'/>", f"cb{i}")
    await iq_ok(
        two,
        f"<query xmlns='{PRIV}'><list name='noalice'><item type='jid' value='alice@localhost'"
        " action='deny' order='1'><message/></item></list></query>",
        "pl",
    )
    await iq_ok(two, f"<query xmlns='{PRIV}'><active name='noalice'/></query>", "pa")
    await settle(server, alice, one, two)
    before = server.router.ledger.snapshot()
    await alice.send(
        "<message to='bob@localhost/one' type='chat' id='c1'><body>hi</body></message>"
    )
    await one.next("<body>hi")
    await settle(server, alice, one, two)
    assert_balanced(server, before)


async def test_a_message_a_room_refuses_is_bounced(start_server: StartServer) -> None:
    server = await start_server(users=USERS, modules=WITH_MUC)
    alice = await online(server, "alice", "a")
    bob = await online(server, "bob", "b")
    await alice.send(f"<presence to='{ROOM}/alice'><x xmlns='{MUC}'/></presence>")
    await alice.next("201")  # created, locked until configured
    await settle(server, alice, bob)
    before = server.router.ledger.snapshot()
    await bob.send(f"<message to='{ROOM}' type='groupchat' id='g1'><body>early</body></message>")
    error = await bob.next('id="g1"')
    assert error.get("type") == "error"
    await settle(server, alice, bob)
    assert_balanced(server, before)


async def test_a_rooms_fan_out_is_made_by_the_server(start_server: StartServer) -> None:
    server = await start_server(users=USERS, modules=WITH_MUC)
    streams = [await online(server, u, r) for u, r in (("alice", "r"), ("bob", "r"), ("bob", "r2"))]
    await streams[0].send(f"<presence to='{ROOM}/alice'><x xmlns='{MUC}'/></presence>")
    await streams[0].next("201")
    await iq_ok(
        streams[0],
        f"<query xmlns='{MUC}#owner'><x xmlns='jabber:x:data' type='submit'/></query>",
        "cfg",
        ROOM,
    )
    for s, nick in zip(streams[1:], ("bob", "bob2"), strict=True):
        await s.send(f"<presence to='{ROOM}/{nick}'><x xmlns='{MUC}'/></presence>")
        await s.next("110")  # its own presence in the room
    await settle(server, *streams)
    before = server.router.ledger.snapshot()
    await streams[1].send(
        f"<message to='{ROOM}' type='groupchat' id='g2'><body>all</body></message>"
    )
    for s in streams:
        await s.next("<body>all")
    await settle(server, *streams)
    assert_balanced(server, before)


async def test_archive_results_are_made_by_the_server(start_server: StartServer) -> None:
    server = await start_server(users=USERS, modules=WITH_MAM)
    alice = await online(server, "alice", "a")
    bob = await online(server, "bob", "b")
    before = server.router.ledger.snapshot()
    for n in range(2):
        await alice.send(
            f"<message to='bob@localhost' type='chat' id='k{n}'><body>b{n}</body></message>"
        )
        await bob.next(f"<body>b{n}")
    await settle(server, alice, bob)
    d = delta(server, before)
    assert d["received"] == fates(d) == 2, d  # balanced so far
    await bob.send("<iq type='set' id='q1'><query xmlns='urn:xmpp:mam:2' queryid='f1'/></iq>")
    await bob.next('id="q1"')
    await settle(server, alice, bob)
    assert_balanced(server, before)


async def test_a_message_the_senders_blocklist_refuses_is_bounced(
    start_server: StartServer,
) -> None:
    server = await start_server(users=USERS)
    alice = await online(server, "alice", "a")
    bob = await online(server, "bob", "b")
    await iq_ok(bob, "<block xmlns='urn:xmpp:blocking'><item jid='alice@localhost'/></block>", "bl")
    await settle(server, alice, bob)
    before = server.router.ledger.snapshot()
    await bob.send("<message to='alice@localhost' type='chat' id='b1'><body>x</body></message>")
    error = await bob.next('id="b1"')
    assert error.get("type") == "error"
    await settle(server, alice, bob)
    d = assert_balanced(server, before)
    assert (d["received"], d["bounced"], d["lost"]) == (1, 1, 0), d
