"""Messages queued for a client whose connection drops before the flush writes them.

The window: a message is delivered to the session (queued in its stream's output,
written at the end of the loop turn) and the TCP connection is lost in the same
turn. The tests make it deterministic on a real node with real TLS streams: the
server's side of the connection is aborted (its connection_lost is then the next
callback), and the message is routed right after, before the flush batch that
would write it (none is pending: the test waits until the batch of earlier
writes ran).

Without stream management, the message is routed again (`rerouted`): to the
account's other resource, else to offline storage. With it, the session's
unacknowledged queue has it (resent on resumption, or routed again by stream
management when the session ends): the connection neither counts it lost nor
routes it a second time.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from lxml import etree

from tests.integration.conftest import StartServer
from tests.integration.test_stream_management import (
    SM,
    Stream,
    detached,
    messages,
    roundtrip,
    session_closed,
)
from xmppd.connection import C2SConnection
from xmppd.server import Server

IN_FLIGHT = (
    "<message xmlns='jabber:client' from='alice@localhost/desk' to='bob@localhost/desk' "
    "type='chat' id='in-flight'><body>in flight</body></message>"
)


async def login(server: Server, resource: str) -> tuple[Stream, C2SConnection]:
    """bob on `resource`, available, and the server's connection of that stream."""
    stream = await Stream.login(server, "bob", resource)
    session = server.router.directory.get("bob@localhost", resource)
    assert session is not None
    connection = session.transport
    assert isinstance(connection, C2SConnection)
    await stream.send("<presence/>")
    await stream.next("<presence")
    # The stored messages' delivery that the presence queued ahead of anything else
    # for bob (XEP-0160) has run: a message routed now is delivered at once.
    await server.router.drain()
    return stream, connection


async def lose_with_a_message_queued(
    server: Server, connection: C2SConnection, serialized: bool = False
) -> None:
    """Deliver IN_FLIGHT to `connection`'s session and lose the connection before the
    flush: abort first (connection_lost is queued), then route (the flush is queued
    after it). `serialized`: handed over as bytes, as from another cluster node."""
    # A flush batch already queued (another write this turn: an SM <r/>) would run before
    # the loss: yield until it ran (one turn each, no timing), then do both in one step.
    while server.flushes._due:  # noqa: ASYNC110 - nothing signals a batch's end
        await asyncio.sleep(0)
    assert connection.transport is not None
    connection.transport.abort()
    if serialized:
        assert connection.session is not None
        message = etree.tostring(etree.fromstring(IN_FLIGHT))  # as the cluster's inbox has it
        assert connection.session.deliver_serialized(message)
    else:
        server.router.route(etree.fromstring(IN_FLIGHT))
    assert connection._queued_messages  # delivered, not written yet


def changes(server: Server, before: dict[str, Any]) -> dict[str, object]:
    after = server.router.ledger.snapshot()
    return {key: value for key, value in after.items() if value != before[key]}


@pytest.mark.parametrize("serialized", [False, True], ids=["element", "serialized"])
async def test_without_sm_it_goes_to_another_resource(
    start_server: StartServer, serialized: bool
) -> None:
    server = await start_server()
    desk, connection = await login(server, "desk")
    phone, _ = await login(server, "phone")
    before = server.router.ledger.snapshot()
    await lose_with_a_message_queued(server, connection, serialized)
    assert await messages(phone, 1) == ["in flight"]
    # delivered to desk, taken back, delivered and written to phone
    assert changes(server, before) == {"delivered": 2, "rerouted": 1, "written": 1}
    await phone.close()


async def test_without_sm_it_goes_offline(start_server: StartServer) -> None:
    server = await start_server()
    desk, connection = await login(server, "desk")
    closed = await session_closed(server)
    before = server.router.ledger.snapshot()
    await lose_with_a_message_queued(server, connection)
    await asyncio.wait_for(closed.wait(), 10)
    again, _ = await login(server, "phone")
    assert await messages(again, 1) == ["in flight"]
    after = changes(server, before)
    assert (after["rerouted"], after["offline"], after["replayed"]) == (1, 1, 1)
    assert "dropped" not in after
    await again.close()


async def test_with_sm_the_resumed_session_gets_it(start_server: StartServer) -> None:
    server = await start_server()
    desk, connection = await login(server, "desk")
    enabled = await desk.enable()
    await roundtrip(desk)  # the server has taken <enable/>: its queue holds what follows
    waiting = detached(server)
    before = server.router.ledger.snapshot()
    await lose_with_a_message_queued(server, connection)
    await asyncio.wait_for(waiting.get(), 10)
    # Kept in stream management's queue: neither lost nor routed again.
    assert changes(server, before) == {"delivered": 1}
    again = await Stream.auth(server, "bob")
    await again.send(f"<resume xmlns='{SM}' previd='{enabled.get('id')}' h='0'/>")
    await again.next("resumed")
    assert await messages(again, 1) == ["in flight"]
    await roundtrip(again)
    after = changes(server, before)  # the resent copy counts `delivered` once more
    assert after["written"] == 1 and "rerouted" not in after and "dropped" not in after
    await again.close()


async def test_with_sm_not_kept_it_is_routed_again_once(start_server: StartServer) -> None:
    server = await start_server()
    desk, connection = await login(server, "desk")
    phone, _ = await login(server, "phone")
    await desk.enable("")  # no resumption: the session ends with its connection
    await roundtrip(desk)
    closed = await session_closed(server)
    before = server.router.ledger.snapshot()
    await lose_with_a_message_queued(server, connection)
    await asyncio.wait_for(closed.wait(), 10)
    assert await messages(phone, 1) == ["in flight"]
    await roundtrip(phone)  # a second copy would have come before the answer
    assert "in flight" not in str([etree.tostring(e) for e in phone.pending])
    assert changes(server, before) == {"delivered": 2, "rerouted": 1, "written": 1}
    await phone.close()
