"""The authorize access model (XEP-0060 6.1.6, 8.6) of pubsub.localhost with real slixmpp
clients, on both storage profiles: the subscriber waits, the owner approves with the
form the service sent, the subscriber is told and then gets the items."""

from __future__ import annotations

import asyncio

from slixmpp import JID, Message

from tests.integration.conftest import StartServer
from tests.integration.test_pep import MODULES, NICK, close, listen, online


async def test_owner_approves_a_pending_subscription(start_server: StartServer) -> None:
    server = await start_server(modules={**MODULES, "pubsub": {}})
    alice = await online(server, "alice@localhost/desk", "alice-secret")
    bob = await online(server, "bob@localhost/home", "bob-secret")
    service = JID("pubsub.localhost")
    requests: asyncio.Queue[Message] = asyncio.Queue()
    alice.add_event_handler("message_xform", requests.put_nowait)
    outcomes: asyncio.Queue[str] = asyncio.Queue()
    bob.add_event_handler(
        "pubsub_subscription",
        lambda msg: outcomes.put_nowait(msg["pubsub_event"]["subscription"]["subscription"]))
    heard = listen(bob)
    config = alice.plugin["xep_0004"].make_form("submit")
    config.add_field("FORM_TYPE", ftype="hidden",
                     value="http://jabber.org/protocol/pubsub#node_config")
    config.add_field("pubsub#access_model", value="authorize")
    await alice.plugin["xep_0060"].create_node(service, "news", config=config, timeout=10)

    result = await bob.plugin["xep_0060"].subscribe(service, "news", timeout=10)
    assert result["pubsub"]["subscription"]["subscription"] == "pending"
    request = await asyncio.wait_for(requests.get(), 10)
    values = request["form"].get_values()
    assert values["pubsub#node"] == "news"
    assert str(values["pubsub#subscriber_jid"]) == "bob@localhost"
    answer = alice.plugin["xep_0004"].make_form("submit")
    for var, value in values.items():
        answer.add_field(var, value=True if var == "pubsub#allow" else value)
    message = alice.make_message(mto=service)
    message.append(answer)
    message.send()
    assert await asyncio.wait_for(outcomes.get(), 10) == "subscribed"

    nick = alice.plugin["xep_0172"].stanza.UserNick()
    nick["nick"] = "hello"
    await alice.plugin["xep_0060"].publish(service, "news", id="first", payload=nick.xml,
                                           timeout=10)
    assert await asyncio.wait_for(heard["publish"].get(), 10) == "first"
    items = await bob.plugin["xep_0060"].get_items(service, "news", timeout=10)
    assert items.xml.findtext(f".//{{{NICK}}}nick") == "hello"
    for client in (alice, bob):
        await close(client)
