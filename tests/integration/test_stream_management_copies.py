"""Stream Management (XEP-0198): what a session that ends gives back, and what it must
not; and h on a resume that comes while the old stream's stanzas are still routed.

A session that ends with messages unacknowledged routes them again, so that none is
lost; but a message that reaches the client (or offline storage) twice is a duplicate
the protocol lets the server avoid: a carbon copy (the original was delivered), or a
message to the bare JID that other resources received in the same delivery.
Raw streams over real TLS connections on a real server, as in test_stream_management.
"""

from __future__ import annotations

import asyncio

from lxml import etree

from tests.integration.conftest import StartServer
from tests.integration.test_stream_management import (
    SM,
    Stream,
    detached,
    message,
    modules,
    roundtrip,
    sm_module,
)
from xmppd.server import Server

CARBONS = "urn:xmpp:carbons:2"
C = "{jabber:client}"


async def enable_carbons(stream: Stream) -> None:
    await stream.send(f"<iq type='set' id='carbons'><enable xmlns='{CARBONS}'/></iq>")
    await stream.next('id="carbons"')


def sessions_closed(server: Server) -> asyncio.Queue[object]:
    """Sessions as they end ("session/closed", after stream management's own hook)."""
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def on_closed(session: object) -> None:
        queue.put_nowait(session)

    server.modules.hook("session/closed", on_closed, priority=-100)
    return queue


async def time_out(server: Server, *streams: Stream) -> None:
    """Drop the streams' connections and wait until their sessions, not resumed within
    the (short) resume timeout, have ended."""
    waiting = detached(server)
    closed = sessions_closed(server)
    for stream in streams:
        stream.drop()
    for _ in streams:
        await asyncio.wait_for(waiting.get(), 10)
    for _ in streams:
        await asyncio.wait_for(closed.get(), 10)


def mentioning(stream: Stream, text: str) -> list[str]:
    """What the server sent `stream` so far (see `roundtrip`) that contains `text`."""
    return [etree.tostring(el).decode() for el in stream.pending
            if text in etree.tostring(el).decode()]


async def offline_bodies(server: Server, user: str, until: str) -> list[str]:
    """Log in as `user`, become available, and read the bodies of the messages offline
    storage replays, up to the one whose body is `until` (stored last)."""
    stream = await Stream.login(server, user, "later")
    await stream.send("<presence/>")
    got: list[str] = []
    while not got or got[-1] != until:
        el = await stream.next("<body>")
        carbon = el.find(f"{{{CARBONS}}}sent") or el.find(f"{{{CARBONS}}}received")
        got.append("CARBON" if carbon is not None else el.findtext(f"{C}body") or "")
    await stream.close()
    return got


# --- carbon copies ----------------------------------------------------------------------


async def test_an_unacked_sent_carbon_is_not_routed_back_to_its_sender(
    start_server: StartServer,
) -> None:
    server = await start_server(modules=modules(resume_timeout=0.3, ack_every=100, ack_delay=30))
    phone = await Stream.login(server, "alice", "phone")
    desk = await Stream.login(server, "alice", "desk")
    bob = await Stream.login(server, "bob", "phone")
    for stream in (phone, desk, bob):
        await stream.send("<presence/>")
    await enable_carbons(phone)
    await enable_carbons(desk)
    await phone.enable()
    await desk.send(message("bob@localhost/phone", "from desk"))
    await bob.next("from desk")
    carbon = await phone.next("from desk")  # the sent carbon, never acked
    assert carbon.find(f"{{{CARBONS}}}sent") is not None
    await time_out(server, phone)
    await roundtrip(desk)
    assert mentioning(desk, "from desk") == []  # desk sent it: no copy of its own message
    await roundtrip(bob)
    assert mentioning(bob, "from desk") == []
    assert sm_module(server).stats.rerouted == 0
    await desk.close()
    await bob.close()


async def test_an_unacked_received_carbon_does_not_reach_offline_storage(
    start_server: StartServer,
) -> None:
    """The other resource got the original and left: the next login finds the messages
    stored for the account, and no carbon among them."""
    server = await start_server(modules=modules(resume_timeout=0.3, ack_every=100, ack_delay=30))
    phone = await Stream.login(server, "alice", "phone")
    desk = await Stream.login(server, "alice", "desk")
    bob = await Stream.login(server, "bob", "phone")
    for stream in (phone, desk, bob):
        await stream.send("<presence/>")
    await enable_carbons(phone)
    await enable_carbons(desk)
    await phone.enable()
    await desk.send(message("bob@localhost/phone", "from desk"))  # a sent carbon to phone
    await bob.next("from desk")
    await bob.send(message("alice@localhost/desk", "to desk"))  # a received carbon to phone
    await desk.next("to desk")
    await phone.next("from desk")
    await phone.next("to desk")
    closed = sessions_closed(server)
    await desk.close()
    await asyncio.wait_for(closed.get(), 10)
    await time_out(server, phone)
    await bob.send(message("alice@localhost", "stored"))  # nobody online: offline storage
    await roundtrip(bob)
    assert await offline_bodies(server, "alice", "stored") == ["stored"]
    await bob.close()


# --- one message, several resources -------------------------------------------------------


async def test_a_message_other_resources_received_is_not_delivered_to_them_again(
    start_server: StartServer,
) -> None:
    server = await start_server(modules=modules(resume_timeout=0.3, ack_every=100, ack_delay=30))
    phone = await Stream.login(server, "alice", "phone")
    desk = await Stream.login(server, "alice", "desk")  # no stream management
    bob = await Stream.login(server, "bob", "phone")
    for stream in (phone, desk, bob):
        await stream.send("<presence/>")
    await phone.enable()
    await bob.send(message("alice@localhost", "to bare"))  # equal priorities: both get it
    await phone.next("to bare")
    await desk.next("to bare")
    await time_out(server, phone)
    await roundtrip(desk)
    assert mentioning(desk, "to bare") == []
    await desk.close()
    await bob.close()


async def test_sessions_that_all_time_out_store_a_shared_message_once(
    start_server: StartServer,
) -> None:
    server = await start_server(modules=modules(resume_timeout=0.3, ack_every=100, ack_delay=30))
    phone = await Stream.login(server, "alice", "phone")
    desk = await Stream.login(server, "alice", "desk")
    bob = await Stream.login(server, "bob", "phone")
    for stream in (phone, desk, bob):
        await stream.send("<presence/>")
    await phone.enable()
    await desk.enable()
    await bob.send(message("alice@localhost", "to bare"))
    await phone.next("to bare")
    await desk.next("to bare")
    await time_out(server, phone, desk)  # neither acked it: the last to end stores it
    await bob.send(message("alice@localhost", "stored"))
    await roundtrip(bob)
    assert await offline_bodies(server, "alice", "stored") == ["to bare", "stored"]
    await bob.close()


async def test_a_shared_message_one_session_acked_is_not_stored(
    start_server: StartServer,
) -> None:
    server = await start_server(modules=modules(resume_timeout=0.3, ack_every=100, ack_delay=30))
    phone = await Stream.login(server, "alice", "phone")
    desk = await Stream.login(server, "alice", "desk")
    bob = await Stream.login(server, "bob", "phone")
    for stream in (phone, desk, bob):
        await stream.send("<presence/>")
    await phone.enable()
    await desk.enable()
    await bob.send(message("alice@localhost", "to bare"))
    await phone.next("to bare")
    await desk.next("to bare")
    # desk acknowledges everything it was sent since <enable/>, the message included
    (desk_sm,) = [sm for sm in sm_module(server).active if sm.session.resource == "desk"]
    await desk.send(f"<a xmlns='{SM}' h='{desk_sm.sent}'/>")
    await desk.ack_count()  # a round trip: the <a/> was taken
    assert not desk_sm.queue
    closed = sessions_closed(server)
    await desk.close()
    await asyncio.wait_for(closed.get(), 10)
    await time_out(server, phone)
    await bob.send(message("alice@localhost", "stored"))
    await roundtrip(bob)
    assert await offline_bodies(server, "alice", "stored") == ["stored"]
    await bob.close()


# --- resuming while the old stream's stanzas are still on their way ------------------------


async def test_resumed_h_counts_what_the_old_stream_still_had_queued(
    start_server: StartServer,
) -> None:
    """The first message waits on a filter (a privacy record loading, say), the two
    behind it in the session's pipeline; the client resumes on a new connection
    meanwhile. <resumed h=''/> must count all three, or the client sends again the
    ones it leaves out, which the server routes as well: duplicates."""
    server = await start_server(modules=modules(ack_every=100, ack_delay=30))
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def slow(stanza: etree._Element, origin: object) -> bool | asyncio.Future[None]:
        # Asked again once the wait is over, it lets the stanza pass.
        return gate if not gate.done() and b"slow" in etree.tostring(stanza) else True

    server.modules.filter("stanza/out", slow, priority=500)
    alice = await Stream.login(server, "alice")
    bob = await Stream.login(server, "bob")
    await bob.send("<presence/>")
    previd = (await alice.enable()).get("id")
    sent = ["slow", "b1", "b2"]
    # One write: the server reads the <r/> with them, though it reads no more from the
    # connection while the first one waits. Only that one reached the filters so far.
    await alice.send("".join(message("bob@localhost/phone", body) for body in sent)
                     + f"<r xmlns='{SM}'/>")
    assert (await alice.next("<a ")).get("h") == "1"
    # The old connection is still open as far as the server knows (XEP-0198 5: the
    # client's network changed); the client resumes on a new one.
    again = await Stream.auth(server, "alice")
    await again.send(f"<resume xmlns='{SM}' previd='{previd}' h='0'/>")
    assert await alice.error() == "conflict"  # the server took the <resume/>...
    gate.set_result(None)  # ...before the first message could go on
    resumed = await again.next("resumed")
    h = int(resumed.get("h", "-1"))
    assert h == len(sent)
    for body in sent[h:]:  # a conforming client sends again what h leaves out
        await again.send(message("bob@localhost/phone", body))
    await again.send(message("bob@localhost/phone", "last"))
    got = [(await bob.next("<body>")).findtext(f"{C}body") for _ in range(len(sent) + 1)]
    assert got == [*sent, "last"]
    assert await again.ack_count() == len(sent) + 1
    await again.close()
    await bob.close()


async def test_a_later_resume_during_the_wait_takes_the_session(
    start_server: StartServer,
) -> None:
    """Two <resume/>s of one session while its old stream's stanzas wait: the later one
    gets it once they are routed, the earlier one <failed/>."""
    server = await start_server(modules=modules(ack_every=100, ack_delay=30))
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def slow(stanza: etree._Element, origin: object) -> bool | asyncio.Future[None]:
        return gate if not gate.done() and b"slow" in etree.tostring(stanza) else True

    server.modules.filter("stanza/out", slow, priority=500)
    alice = await Stream.login(server, "alice")
    bob = await Stream.login(server, "bob")
    previd = (await alice.enable()).get("id")
    await alice.send(message("bob@localhost/phone", "slow") + message("bob@localhost/phone", "b1")
                     + f"<r xmlns='{SM}'/>")
    assert (await alice.next("<a ")).get("h") == "1"
    first = await Stream.auth(server, "alice")
    await first.send(f"<resume xmlns='{SM}' previd='{previd}' h='0'/>")
    assert await alice.error() == "conflict"
    second = await Stream.auth(server, "alice")
    # The <r/> (no session on this stream yet) is answered right after the <resume/>
    # was taken: then both wait.
    await second.send(f"<resume xmlns='{SM}' previd='{previd}' h='0'/><r xmlns='{SM}'/>")
    assert (await second.next("failed"))[0].tag.endswith("unexpected-request")
    gate.set_result(None)
    assert (await first.next("failed"))[0].tag.endswith("item-not-found")
    assert (await second.next("resumed")).get("h") == "2"
    await second.send(message("bob@localhost/phone", "last"))
    assert [(await bob.next("<body>")).findtext(f"{C}body") for _ in range(3)] == [
        "slow", "b1", "last",
    ]
    await second.close()
    await bob.close()
