"""The hold on a busy sender (Router._hold_if_busy) waits for the account's other work.

Past WORK_PER_SENDER pieces of an account's work in flight, a stanza a "stanza/out"
filter took makes its sender wait for some of that work. The sender's own queue of
waiting stanzas (`ClientSession._run`) is part of that work: waiting for it from
inside it can only end at the 15 s SENDER_WAIT, a stall of every stanza behind.
"""

from __future__ import annotations

import asyncio

import pytest
from lxml import etree

from xmppd import router as router_module
from xmppd.events import Events, kind_chain
from xmppd.router import Router
from xmppd.testing import TestSession, parse_stanza

HOST = "localhost"


async def user_exists(user: str, host: str) -> bool:
    return True


@pytest.mark.timeout(20)
async def test_a_held_stanza_never_waits_for_its_own_senders_queue(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(router_module, "WORK_PER_SENDER", 1)
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waited: set[str] = set()

    def out_filter(stanza: etree._Element, origin: object) -> object:
        kind = stanza.get("id", "")
        if kind == "wait" and kind not in waited:
            waited.add(kind)
            return gate  # a record loading: the sender's next stanzas queue behind
        return kind != "take"  # taken by the filter, as a subscription request is

    events = Events()
    events.on("stanza/out", out_filter)
    events.on(kind_chain("stanza/out", "message"), out_filter)
    router = Router([HOST], user_exists, events=events)
    alice = TestSession("alice@localhost/phone")
    bob = TestSession("bob@localhost/desk")
    for session in (alice, bob):
        session.router = router
        router.bind(session)
    for id_ in ("wait", "take", "chat"):
        stanza = parse_stanza(
            f"<message to='bob@localhost/desk' type='chat' id='{id_}'><body>{id_}</body></message>"
        )
        stanza.set("from", alice.jid)
        alice.receive(stanza)
    assert alice.input_holds == 1  # the first waits; the other two queue behind it
    gate.set_result(None)
    # "take" finds one piece of alice's work in flight, her own queue's runner, and
    # must not wait for it: "chat" is routed at once, not after SENDER_WAIT.
    async with asyncio.timeout(5):
        await router.drain()
    assert [m.get("id") for m in bob.received] == ["wait", "chat"]
    assert alice.input_holds == 0
