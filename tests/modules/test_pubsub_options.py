"""Subscription options (XEP-0060 6.3): pubsub#deliver and pubsub#include_body, on the
pubsub.<host> service and on PEP, without sockets."""

from __future__ import annotations

import pytest
from lxml import etree

from tests.modules.test_pep import PS, error_of, events
from tests.modules.test_pubsub import SERVICE, ask, create, publish
from xmppd.testing import ModuleHarness

DATA = "jabber:x:data"
OPTIONS = f"{PS}#subscribe_options"


@pytest.fixture
async def harness() -> ModuleHarness:
    harness = ModuleHarness({"roster": {}, "presence": {}, "disco": {}, "pubsub": {},
                             "pep": {}})
    harness.users.update({"hamlet@localhost", "francisco@localhost", "horatio@localhost"})
    return await harness.start()


def options_get(jid: str, subid: str = "") -> str:
    sub = f" subid='{subid}'" if subid else ""
    return (f"<pubsub xmlns='{PS}'><options node='princely_musings' jid='{jid}'{sub}/>"
            "</pubsub>")


def options_set(jid: str, fields: dict[str, str], form_type: str = OPTIONS) -> str:
    values = "".join(f"<field var='{k}'><value>{v}</value></field>" for k, v in fields.items())
    return (f"<pubsub xmlns='{PS}'><options node='princely_musings' jid='{jid}'>"
            f"<x xmlns='{DATA}' type='submit'><field var='FORM_TYPE' type='hidden'>"
            f"<value>{form_type}</value></field>{values}</x></options></pubsub>")


def values(reply: etree._Element) -> dict[str | None, str | None]:
    return {f.get("var"): f.findtext(f"{{{DATA}}}value")
            for f in reply.iter(f"{{{DATA}}}field")}


def bodies(stanzas: list[etree._Element]) -> list[str | None]:
    return [m.findtext("{jabber:client}body") for m in stanzas
            if m.tag == "{jabber:client}message"]


async def test_options_form_and_their_effect(harness: ModuleHarness) -> None:
    hamlet = harness.session("hamlet@localhost/elsinore")
    francisco = harness.session("francisco@localhost/barracks")
    jid = "francisco@localhost/barracks"
    await create(harness, hamlet, "princely_musings")
    sub = await ask(harness, francisco, "set",
                    f"<pubsub xmlns='{PS}'><subscribe node='princely_musings' jid='{jid}'/>"
                    "</pubsub>")
    subscription = sub.find(f".//{{{PS}}}subscription")
    assert subscription is not None
    subid = subscription.get("subid") or ""
    # 6.3.2: the form with the defaults.
    form = values(await ask(harness, francisco, "get", options_get(jid, subid)))
    assert form == {"FORM_TYPE": OPTIONS, "pubsub#deliver": "1", "pubsub#include_body": "0"}
    # 6.3.5: include_body: the notification carries a body with the item's text.
    assert (await ask(harness, francisco, "set", options_set(
        jid, {"pubsub#include_body": "true"}))).get("type") == "result"
    francisco.take()
    await ask(harness, hamlet, "set", publish("princely_musings", "i1"))
    got = francisco.take()
    assert [what for _, _, what in events(got)] == ["item i1 Soliloquy"]
    assert bodies(got) == ["Soliloquy"]
    # deliver false: none at all, the form says so, the other option kept.
    await ask(harness, francisco, "set", options_set(jid, {"pubsub#deliver": "0"}))
    await ask(harness, hamlet, "set", publish("princely_musings", "i2"))
    assert events(francisco.take()) == []
    form = values(await ask(harness, francisco, "get", options_get(jid)))
    assert (form["pubsub#deliver"], form["pubsub#include_body"]) == ("0", "1")
    # Back to the defaults: notifications without a body.
    await ask(harness, francisco, "set", options_set(
        jid, {"pubsub#deliver": "1", "pubsub#include_body": "0"}))
    await ask(harness, hamlet, "set", publish("princely_musings", "i3"))
    got = francisco.take()
    assert [what for _, _, what in events(got)] == ["item i3 Soliloquy"]
    assert bodies(got) == [None]


async def test_options_errors(harness: ModuleHarness) -> None:
    """XEP-0060 6.3.4 and 6.3.5.2."""
    hamlet = harness.session("hamlet@localhost/elsinore")
    francisco = harness.session("francisco@localhost/barracks")
    horatio = harness.session("horatio@localhost/h")
    jid = "francisco@localhost/barracks"
    await create(harness, hamlet, "princely_musings")
    # Not subscribed.
    assert error_of(await ask(harness, francisco, "get", options_get(jid))) == (
        "cancel", "unexpected-request", "not-subscribed")
    await ask(harness, francisco, "set",
              f"<pubsub xmlns='{PS}'><subscribe node='princely_musings' jid='{jid}'/></pubsub>")
    # Someone else's subscription; no jid; a wrong subid; no such node.
    assert error_of(await ask(harness, horatio, "get", options_get(jid)))[1] == "forbidden"
    assert error_of(await ask(
        harness, francisco, "get",
        f"<pubsub xmlns='{PS}'><options node='princely_musings'/></pubsub>"))[1:] == (
        "bad-request", "jid-required")
    assert error_of(await ask(harness, francisco, "get", options_get(jid, "nope")))[1:] == (
        "not-acceptable", "invalid-subid")
    assert error_of(await ask(harness, francisco, "get", options_get(jid).replace(
        "princely_musings", "nowhere")))[1] == "item-not-found"
    # Options this service does not have, a value that is no boolean, a wrong form type.
    for bad in (options_set(jid, {"pubsub#digest": "1"}),
                options_set(jid, {"pubsub#deliver": "maybe"}),
                options_set(jid, {"pubsub#deliver": "0"}, f"{PS}#node_config")):
        assert error_of(await ask(harness, francisco, "set", bad))[1:] == (
            "bad-request", "invalid-options")
    # Nothing changed.
    form = values(await ask(harness, francisco, "get", options_get(jid)))
    assert form["pubsub#deliver"] == "1"
    # The owner may read them too; after unsubscribing they are gone.
    assert (await ask(harness, hamlet, "get", options_get(jid))).get("type") == "result"
    await ask(harness, francisco, "set",
              f"<pubsub xmlns='{PS}'><unsubscribe node='princely_musings' jid='{jid}'/></pubsub>")
    assert error_of(await ask(harness, francisco, "get", options_get(jid)))[2] == "not-subscribed"


async def test_pep_subscriber_with_deliver_off(harness: ModuleHarness) -> None:
    """An explicit subscriber to a PEP node (open access) turns delivery off."""
    hamlet = harness.session("hamlet@localhost/elsinore")
    horatio = harness.session("horatio@localhost/h")
    node = "urn:example:open"
    publish_open = (
        f"<pubsub xmlns='{PS}'><publish node='{node}'><item id='a'><a xmlns='x'>one</a></item>"
        "</publish><publish-options><x xmlns='jabber:x:data' type='submit'>"
        f"<field var='FORM_TYPE' type='hidden'><value>{PS}#publish-options</value></field>"
        "<field var='pubsub#access_model'><value>open</value></field></x></publish-options>"
        "</pubsub>")
    assert (await harness.iq(hamlet, "set", publish_open)).get("type") == "result"
    sub = (f"<pubsub xmlns='{PS}'><subscribe node='{node}' jid='horatio@localhost/h'/>"
           "</pubsub>")
    assert (await harness.iq(horatio, "set", sub, "hamlet@localhost")).get("type") == "result"
    off = options_set("horatio@localhost/h", {"pubsub#deliver": "false"}).replace(
        "princely_musings", node)
    assert (await harness.iq(horatio, "set", off, "hamlet@localhost")).get("type") == "result"
    horatio.take()
    assert (await harness.iq(hamlet, "set", publish_open.replace("'a'", "'b'"))).get(
        "type") == "result"
    assert events(horatio.take()) == []


async def test_options_are_advertised(harness: ModuleHarness) -> None:
    hamlet = harness.session("hamlet@localhost/elsinore")
    info = "http://jabber.org/protocol/disco#info"
    reply = await ask(harness, hamlet, "get", f"<query xmlns='{info}'/>")
    assert f"{PS}#subscription-options" in {
        f.get("var") for f in reply.iter(f"{{{info}}}feature")}
    assert SERVICE
