"""Subscription options (XEP-0060 6.3) with a real slixmpp client on both storage
profiles: the form, then pubsub#include_body and pubsub#deliver at work."""

from __future__ import annotations

import asyncio

from slixmpp import JID, Message

from tests.integration.conftest import StartServer
from tests.integration.test_pep import MODULES, close, online

OPTIONS = "http://jabber.org/protocol/pubsub#subscribe_options"


async def test_subscription_options_with_slixmpp(start_server: StartServer) -> None:
    server = await start_server(modules={**MODULES, "pubsub": {}})
    alice = await online(server, "alice@localhost/desk", "alice-secret")
    bob = await online(server, "bob@localhost/home", "bob-secret")
    service = JID("pubsub.localhost")
    heard: asyncio.Queue[Message] = asyncio.Queue()
    bob.add_event_handler("pubsub_publish", heard.put_nowait)
    await alice.plugin["xep_0060"].create_node(service, "news", timeout=10)
    await bob.plugin["xep_0060"].subscribe(service, "news", timeout=10)
    result = await bob.plugin["xep_0060"].get_subscription_options(
        service, "news", JID("bob@localhost"), timeout=10)
    values = result["pubsub"]["options"]["options"].get_values()
    assert (values["pubsub#deliver"], values["pubsub#include_body"]) == (True, False)

    async def set_options(**fields: bool) -> None:
        # slixmpp's set_subscription_options sends a get (a bug): the same request, as set.
        form = bob.plugin["xep_0004"].make_form("submit")
        form.add_field("FORM_TYPE", ftype="hidden", value=OPTIONS)
        for var, value in fields.items():
            form.add_field(f"pubsub#{var}", value=value)
        iq = bob.Iq(sto=service, stype="set")
        iq["pubsub"]["options"]["node"] = "news"
        iq["pubsub"]["options"]["jid"] = JID("bob@localhost")
        iq["pubsub"]["options"]["options"] = form
        await iq.send(timeout=10)

    await set_options(include_body=True)
    payload = alice.plugin["xep_0172"].stanza.UserNick()
    payload["nick"] = "hello"
    await alice.plugin["xep_0060"].publish(service, "news", id="1", payload=payload.xml,
                                           timeout=10)
    message = await asyncio.wait_for(heard.get(), 10)
    assert message["body"] == "hello"
    await set_options(deliver=False)
    await alice.plugin["xep_0060"].publish(service, "news", id="2", payload=payload.xml,
                                           timeout=10)
    await set_options(deliver=True, include_body=False)
    await alice.plugin["xep_0060"].publish(service, "news", id="3", payload=payload.xml,
                                           timeout=10)
    message = await asyncio.wait_for(heard.get(), 10)
    # Item 2 never came; item 3 came without a body.
    assert message["pubsub_event"]["items"]["item"]["id"] == "3"
    assert message["body"] == ""
    for client in (alice, bob):
        await close(client)
