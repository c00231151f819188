"""A module's bug on the routing path costs the stanza, never silently.

A filter or routing-event handler that raises cannot judge the stanza: as
`Router.deliver` does for a "stanza/in" filter that raises at once, the sender
is answered with <internal-server-error/> (a message's bounce counted in the
ledger), whether the bug strikes synchronously (`ClientSession.receive`), after a
filter's wait (`Router._pass_after`), or for a stanza that waited in the sender's
pipeline (`ClientSession._run`). Errors are never answered with errors.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import pytest
from lxml import etree

from xmppd.ledger import MessageLedger
from xmppd.modulehost import Filter
from xmppd.router import Router
from xmppd.testing import ModuleHarness, TestSession, parse_stanza
from xmppd.xml import ns


async def node() -> tuple[ModuleHarness, TestSession, TestSession]:
    """A real router and module host; the tests' filters are registered through the
    module API, as a module's are."""
    harness = await ModuleHarness({}).start()
    return harness, harness.session("alice@localhost/phone"), harness.session("bob@localhost/desk")


def filters(
    harness: ModuleHarness, direction: str, kind: str, filter_: Filter
) -> None:
    harness.host.filter(f"stanza/{direction}", filter_, kinds=(kind,))


def send(alice: TestSession, xml: str) -> None:
    stanza = parse_stanza(xml)
    stanza.set("from", alice.jid)  # as the stream stamps it
    alice.receive(stanza)


def internal_error(stanza: etree._Element, id_: str) -> bool:
    return (
        stanza.get("type") == "error"
        and stanza.get("id") == id_
        and stanza.find(f"{ns.C_ERROR}/{{{ns.STANZA_ERRORS}}}internal-server-error") is not None
    )


def unchanged_but_bounced(router: Router, bounced: int) -> None:
    snapshot = router.ledger.snapshot()
    assert snapshot["bounced"] == bounced
    assert {k: v for k, v in snapshot.items() if k != "bounced"} == {
        k: v for k, v in MessageLedger().snapshot().items() if k != "bounced"
    }


MESSAGE = "<message to='bob@localhost/desk' type='chat' id='m1'><body>hi</body></message>"
IQ = "<iq to='bob@localhost/desk' type='get' id='m1'><query xmlns='jabber:iq:version'/></iq>"


@pytest.mark.timeout(20)
@pytest.mark.parametrize("xml", [MESSAGE, IQ], ids=["message", "iq"])
async def test_an_in_filter_that_raises_after_its_wait_answers_the_sender(xml: str) -> None:
    harness, alice, bob = await node()
    router = harness.router
    record: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    asked: list[etree._Element] = []

    def in_filter(stanza: etree._Element, session: object) -> bool | Awaitable[object]:
        if stanza.get("type") == "error":
            return True
        if not asked:
            asked.append(stanza)
            return record  # the recipient's record loads first
        raise RuntimeError("a module's bug once the record loaded")

    kind = "message" if xml is MESSAGE else "iq"
    filters(harness, "in", kind, in_filter)
    send(alice, xml)
    assert asked  # it waits now
    record.set_result(None)
    async with asyncio.timeout(10):
        await router.drain()
    assert bob.received == []
    replies = alice.take()
    assert len(replies) == 1 and internal_error(replies[0], "m1"), replies
    unchanged_but_bounced(router, 1 if kind == "message" else 0)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("xml", [MESSAGE, IQ], ids=["message", "iq"])
async def test_an_out_filter_that_raises_answers_the_sender(xml: str) -> None:
    harness, alice, bob = await node()
    router = harness.router

    def out_filter(stanza: etree._Element, origin: object) -> bool | Awaitable[object]:
        raise RuntimeError("a module's bug")

    filters(harness, "out", "message" if xml is MESSAGE else "iq", out_filter)
    send(alice, xml)
    await router.drain()
    assert bob.received == []
    replies = alice.take()
    assert len(replies) == 1 and internal_error(replies[0], "m1"), replies
    unchanged_but_bounced(router, 1 if xml is MESSAGE else 0)


@pytest.mark.timeout(20)
async def test_an_error_whose_routing_raises_is_not_answered() -> None:
    harness, alice, bob = await node()
    router = harness.router

    def out_filter(stanza: etree._Element, origin: object) -> bool | Awaitable[object]:
        raise RuntimeError("a module's bug")

    filters(harness, "out", "message", out_filter)
    send(alice, "<message to='bob@localhost/desk' type='error' id='e1'/>")
    await router.drain()
    assert alice.take() == [] and bob.received == []
    unchanged_but_bounced(router, 0)


@pytest.mark.timeout(20)
async def test_stanzas_that_waited_in_the_pipeline_and_raise_are_answered() -> None:
    """The first message waits for an out filter, then its routing event raises (the
    pipeline's wait fails: `_run`); the one queued behind it raises at once (`_route`);
    the third still goes through."""
    harness, alice, bob = await node()
    router = harness.router
    record: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def out_filter(stanza: etree._Element, origin: object) -> bool | Awaitable[object]:
        return record if stanza.get("id") == "m1" and not record.done() else True

    def handler(routed: object) -> bool:
        if routed.stanza.get("id") in ("m1", "m2"):  # type: ignore[attr-defined]
            raise RuntimeError("a module's bug")
        return False

    filters(harness, "out", "message", out_filter)
    harness.host.on("message/full", handler, priority=100)
    for id_ in ("m1", "m2", "m3"):
        send(alice, MESSAGE.replace("m1", id_))
    assert alice.input_holds == 1  # m2 and m3 wait behind m1
    record.set_result(None)
    async with asyncio.timeout(10):
        await router.drain()
    assert [m.get("id") for m in bob.received] == ["m3"]
    replies = alice.take()
    assert [r.get("id") for r in replies] == ["m1", "m2"]
    assert all(internal_error(r, r.get("id", "")) for r in replies), replies
    assert alice.input_holds == 0
    unchanged_but_bounced(router, 2)
