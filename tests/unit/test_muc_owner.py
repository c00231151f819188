"""The room owner function of multi-user chat on a cluster (modules/muc.py, `owner_of`):
every node must compute the same owner from the same node set, and a node joining or
leaving must move only the rooms it gains or had (rendezvous hashing), not reshuffle."""

from __future__ import annotations

from xmppd.modules.muc import owner_of

ROOMS = [f"room{n}@conference.example.org" for n in range(3000)]
THREE = frozenset({"xmpp1", "xmpp2", "xmpp3"})


def test_the_owner_depends_on_the_set_only_not_its_order() -> None:
    for room in ROOMS[:50]:
        assert owner_of(room, THREE) == owner_of(room, frozenset(sorted(THREE, reverse=True)))


def test_rooms_spread_over_the_nodes() -> None:
    counts = {node: 0 for node in THREE}
    for room in ROOMS:
        counts[owner_of(room, THREE)] += 1
    assert all(800 < count < 1200 for count in counts.values()), counts


def test_a_node_joining_takes_rooms_only_for_itself_and_leaving_moves_only_its_own() -> None:
    four = THREE | {"xmpp4"}
    moved = [room for room in ROOMS if owner_of(room, THREE) != owner_of(room, four)]
    assert all(owner_of(room, four) == "xmpp4" for room in moved)
    assert 500 < len(moved) < 1000  # about a quarter
    two = THREE - {"xmpp2"}
    for room in ROOMS:
        if owner_of(room, THREE) != "xmpp2":
            assert owner_of(room, two) == owner_of(room, THREE)
