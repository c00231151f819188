"""The XEP-0060 service at pubsub.<host>, without sockets: the use cases of XEP-0060
sections 5-8 with their examples' stanzas, errors included."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import Callable
from dataclasses import replace

import pytest
from lxml import etree
from pydantic import BaseModel, ValidationError

from tests.modules.test_pep import (
    ERRORS,
    IQ,
    OWNER,
    PS,
    InterleavingItems,
    error_of,
    events,
    settle,
)
from xmppd.modules._pubsub_engine import (
    PubSubService,
    Subscription,
    encode_subscription,
)
from xmppd.modules.pep import PepOptions
from xmppd.modules.pubsub import PubSub, PubSubOptions
from xmppd.storage.backends.memory import MemoryItemBackend
from xmppd.storage.base import Page, Query
from xmppd.stream.errors import StanzaError
from xmppd.testing import ModuleHarness, TestSession, parse_stanza

SERVICE = "pubsub.localhost"
INFO = "http://jabber.org/protocol/disco#info"
ITEMS = "http://jabber.org/protocol/disco#items"
RSM = "http://jabber.org/protocol/rsm"
ENTRY = "<entry xmlns='http://www.w3.org/2005/Atom'><title>Soliloquy</title></entry>"


@pytest.fixture
async def harness() -> ModuleHarness:
    harness = ModuleHarness({"roster": {}, "disco": {}, "pubsub": {"max_nodes": 3}})
    harness.users.update({"hamlet@localhost", "bernardo@localhost", "horatio@localhost"})
    return await harness.start()


async def ask(
    harness: ModuleHarness, session: TestSession, type_: str, payload: str
) -> etree._Element:
    """An IQ to the service; its answer. Notifications stay in `session.received`."""
    got = await harness.send(session, f"<iq type='{type_}' id='t1' to='{SERVICE}'>{payload}</iq>")
    await settle(harness)
    got += session.take()
    answers = [r for r in got if r.tag == IQ and r.get("id") == "t1"]
    assert len(answers) == 1, [etree.tostring(r) for r in got]
    session.received.extend(r for r in got if r is not answers[0])
    return answers[0]


def publish(node: str, item_id: str, body: str = ENTRY) -> str:
    return (
        f"<pubsub xmlns='{PS}'><publish node='{node}'><item id='{item_id}'>{body}</item>"
        "</publish></pubsub>"
    )


def configure(node: str, fields: dict[str, str], tag: str = "configure") -> str:
    values = "".join(f"<field var='{k}'><value>{v}</value></field>" for k, v in fields.items())
    return (
        f"<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'>"
        f"<value>{PS}#node_config</value></field>{values}</x>"
    )


async def create(harness: ModuleHarness, owner: TestSession, node: str, **fields: str) -> None:
    form = f"<configure>{configure(node, fields)}</configure>" if fields else "<configure/>"
    reply = await ask(
        harness, owner, "set", f"<pubsub xmlns='{PS}'><create node='{node}'/>{form}</pubsub>"
    )
    assert reply.get("type") == "result", etree.tostring(reply)


def ids(reply: etree._Element) -> list[str | None]:
    return [i.get("id") for i in reply.iter(f"{{{PS}}}item")]


async def test_create_publish_subscribe_and_notify(harness: ModuleHarness) -> None:
    """XEP-0060 8.1.1 (create), 6.1 (subscribe), 7.1 (publish with notification)."""
    hamlet = harness.session("hamlet@localhost/elsinore")
    bernardo = harness.session("bernardo@localhost/pda")
    await create(harness, hamlet, "princely_musings")
    # 8.1.3.5 (exists): conflict.
    reply = await ask(
        harness, hamlet, "set", f"<pubsub xmlns='{PS}'><create node='princely_musings'/></pubsub>"
    )
    assert error_of(reply)[1] == "conflict"
    sub = (
        f"<pubsub xmlns='{PS}'><subscribe node='princely_musings'"
        " jid='bernardo@localhost/pda'/></pubsub>"
    )
    reply = await ask(harness, bernardo, "set", sub)
    subscription = reply.find(f"{{{PS}}}pubsub/{{{PS}}}subscription")
    assert subscription is not None and subscription.get("subscription") == "subscribed"
    assert events(bernardo.take()) == []  # nothing published yet
    reply = await ask(
        harness, hamlet, "set", publish("princely_musings", "ae890ac52d0df67ed7cfdf51b644e901")
    )
    assert ids(reply) == ["ae890ac52d0df67ed7cfdf51b644e901"]
    assert events(bernardo.take()) == [
        (SERVICE, "bernardo@localhost/pda", "item ae890ac52d0df67ed7cfdf51b644e901 Soliloquy")
    ]
    # 7.1.3.1: a non-publisher may not publish.
    reply = await ask(harness, bernardo, "set", publish("princely_musings", "x"))
    assert error_of(reply)[1] == "forbidden"
    # 7.1.3.3: no such node (the service does not auto-create).
    reply = await ask(harness, hamlet, "set", publish("no_such_node", "x"))
    assert error_of(reply)[1] == "item-not-found"


async def test_instant_node_and_last_item_on_subscribe(harness: ModuleHarness) -> None:
    hamlet = harness.session("hamlet@localhost/elsinore")
    reply = await ask(harness, hamlet, "set", f"<pubsub xmlns='{PS}'><create/></pubsub>")
    name = reply.find(f"{{{PS}}}pubsub/{{{PS}}}create").get("node")
    assert name
    await ask(harness, hamlet, "set", publish(name, "1"))
    horatio = harness.session("horatio@localhost/h")
    sub = f"<pubsub xmlns='{PS}'><subscribe node='{name}' jid='horatio@localhost'/></pubsub>"
    await ask(harness, horatio, "set", sub)
    assert events(horatio.take()) == [(SERVICE, "horatio@localhost", "item 1 Soliloquy")]


async def test_items_retract_purge_delete(harness: ModuleHarness) -> None:
    """6.5 (items, max_items, by id), 7.2 (retract), 8.5 (purge), 8.4 (delete)."""
    hamlet = harness.session("hamlet@localhost/elsinore")
    bernardo = harness.session("bernardo@localhost/pda")
    await create(harness, hamlet, "n")
    await ask(
        harness,
        bernardo,
        "set",
        f"<pubsub xmlns='{PS}'><subscribe node='n' jid='bernardo@localhost/pda'/></pubsub>",
    )
    for i in ("a", "b", "c"):
        await ask(harness, hamlet, "set", publish("n", i))
    bernardo.take()
    items = f"<pubsub xmlns='{PS}'><items node='n'/></pubsub>"
    assert ids(await ask(harness, bernardo, "get", items)) == ["a", "b", "c"]
    assert ids(await ask(harness, bernardo, "get", items.replace("/>", " max_items='2'/>"))) == [
        "b",
        "c",
    ]
    by_id = f"<pubsub xmlns='{PS}'><items node='n'><item id='a'/></items></pubsub>"
    assert ids(await ask(harness, bernardo, "get", by_id)) == ["a"]
    retract = f"<pubsub xmlns='{PS}'><retract node='n'><item id='b'/></retract></pubsub>"
    assert (await ask(harness, bernardo, "set", retract)).get("type") == "error"
    assert (await ask(harness, hamlet, "set", retract)).get("type") == "result"
    assert events(bernardo.take()) == [(SERVICE, "bernardo@localhost/pda", "retract b")]
    purge = f"<pubsub xmlns='{OWNER}'><purge node='n'/></pubsub>"
    assert error_of(await ask(harness, bernardo, "set", purge))[1] == "forbidden"
    assert (await ask(harness, hamlet, "set", purge)).get("type") == "result"
    assert events(bernardo.take()) == [(SERVICE, "bernardo@localhost/pda", "purge")]
    assert ids(await ask(harness, bernardo, "get", items)) == []
    delete = f"<pubsub xmlns='{OWNER}'><delete node='n'/></pubsub>"
    assert (await ask(harness, hamlet, "set", delete)).get("type") == "result"
    assert events(bernardo.take()) == [(SERVICE, "bernardo@localhost/pda", "delete")]
    assert error_of(await ask(harness, bernardo, "get", items))[1] == "item-not-found"
    page = await harness.host.items(SERVICE, "pubsub").query(Query(prefix="n/"))
    assert page.items == []


async def test_configure_and_notify_config(harness: ModuleHarness) -> None:
    """8.2 (configure form, submit, bad values), 8.3 (default options)."""
    hamlet = harness.session("hamlet@localhost/elsinore")
    await create(harness, hamlet, "n", **{"pubsub#max_items": "2", "pubsub#title": "Musings"})
    reply = await ask(
        harness, hamlet, "get", f"<pubsub xmlns='{OWNER}'><configure node='n'/></pubsub>"
    )
    values = {
        f.get("var"): f.findtext("{jabber:x:data}value") for f in reply.iter("{jabber:x:data}field")
    }
    assert values["pubsub#max_items"] == "2" and values["pubsub#title"] == "Musings"
    assert values["pubsub#access_model"] == "open"
    reply = await ask(harness, hamlet, "get", f"<pubsub xmlns='{OWNER}'><default/></pubsub>")
    values = {
        f.get("var"): f.findtext("{jabber:x:data}value") for f in reply.iter("{jabber:x:data}field")
    }
    assert values["pubsub#max_items"] == "10"
    form = configure("n", {"pubsub#access_model": "bogus"})
    bad = f"<pubsub xmlns='{OWNER}'><configure node='n'>{form}</configure></pubsub>"
    assert error_of(await ask(harness, hamlet, "set", bad))[1] == "not-acceptable"
    bernardo = harness.session("bernardo@localhost/pda")
    bad_owner = bad.replace("bogus", "whitelist")
    assert error_of(await ask(harness, bernardo, "set", bad_owner))[1] == "forbidden"
    assert (await ask(harness, hamlet, "set", bad_owner)).get("type") == "result"
    sub = f"<pubsub xmlns='{PS}'><subscribe node='n' jid='bernardo@localhost/pda'/></pubsub>"
    assert error_of(await ask(harness, bernardo, "set", sub)) == (
        "cancel",
        "not-allowed",
        "closed-node",
    )


async def test_affiliations_let_others_publish(harness: ModuleHarness) -> None:
    """8.9 (manage affiliations): a publisher publishes, a member reads a whitelist node."""
    hamlet = harness.session("hamlet@localhost/elsinore")
    bernardo = harness.session("bernardo@localhost/pda")
    await create(harness, hamlet, "n", **{"pubsub#access_model": "whitelist"})
    affiliations = (
        f"<pubsub xmlns='{OWNER}'><affiliations node='n'>"
        "<affiliation jid='bernardo@localhost' affiliation='publisher'/>"
        "</affiliations></pubsub>"
    )
    assert error_of(await ask(harness, bernardo, "set", affiliations))[1] == "forbidden"
    assert (await ask(harness, hamlet, "set", affiliations)).get("type") == "result"
    assert (await ask(harness, bernardo, "set", publish("n", "1"))).get("type") == "result"
    reply = await ask(
        harness, hamlet, "get", f"<pubsub xmlns='{OWNER}'><affiliations node='n'/></pubsub>"
    )
    listed = {(a.get("jid"), a.get("affiliation")) for a in reply.iter(f"{{{OWNER}}}affiliation")}
    assert listed == {("hamlet@localhost", "owner"), ("bernardo@localhost", "publisher")}
    # The last owner cannot go.
    demote = affiliations.replace("bernardo@localhost", "hamlet@localhost").replace(
        "publisher", "none"
    )
    assert error_of(await ask(harness, hamlet, "set", demote))[1] == "not-acceptable"


async def test_a_publisher_cannot_forge_what_readers_see_of_an_item(
    harness: ModuleHarness,
) -> None:
    """XEP-0060 7.1.2, 6.5: an <item/> carries an id and, set by the service alone, a
    publisher. One that bernardo, a publisher of hamlet's node, sends with
    publisher='hamlet@localhost' (or any other attribute) is stored without them, so
    horatio, reading the node, is not told hamlet published it."""
    hamlet = harness.session("hamlet@localhost/elsinore")
    bernardo = harness.session("bernardo@localhost/pda")
    horatio = harness.session("horatio@localhost/h")
    await create(harness, hamlet, "n")
    affiliations = (
        f"<pubsub xmlns='{OWNER}'><affiliations node='n'>"
        "<affiliation jid='bernardo@localhost' affiliation='publisher'/>"
        "</affiliations></pubsub>"
    )
    assert (await ask(harness, hamlet, "set", affiliations)).get("type") == "result"
    forged = (
        f"<pubsub xmlns='{PS}'><publish node='n'><item id='f' publisher='hamlet@localhost'"
        f" xmlns:e='urn:e' e:origin='hamlet'>{ENTRY}</item></publish></pubsub>"
    )
    assert (await ask(harness, bernardo, "set", forged)).get("type") == "result"
    reply = await ask(harness, horatio, "get", f"<pubsub xmlns='{PS}'><items node='n'/></pubsub>")
    (item,) = reply.iter(f"{{{PS}}}item")
    assert dict(item.attrib) == {"id": "f"}
    assert "".join(item.itertext()) == "Soliloquy"  # the payload itself is kept


async def test_the_jids_an_owner_names_are_normalised_or_refused(
    harness: ModuleHarness,
) -> None:
    """8.9.2, 8.8.2: the JIDs of an owner's affiliation and subscription changes are
    prepared as the server prepares a requester's (RFC 7622), so that hamlet's ban
    of 'Bernardo@LOCALHOST' bans bernardo; one that is no JID is jid-malformed and
    the request changes nothing."""
    hamlet = harness.session("hamlet@localhost/elsinore")
    bernardo = harness.session("bernardo@localhost/pda")
    await create(harness, hamlet, "n")
    ban = (
        f"<pubsub xmlns='{OWNER}'><affiliations node='n'>"
        "<affiliation jid='Bernardo@LOCALHOST' affiliation='outcast'/>"
        "</affiliations></pubsub>"
    )
    assert (await ask(harness, hamlet, "set", ban)).get("type") == "result"
    sub = f"<pubsub xmlns='{PS}'><subscribe node='n' jid='bernardo@localhost'/></pubsub>"
    assert error_of(await ask(harness, bernardo, "set", sub))[:2] == ("auth", "forbidden")
    listing = f"<pubsub xmlns='{OWNER}'><affiliations node='n'/></pubsub>"
    reply = await ask(harness, hamlet, "get", listing)
    listed = {(a.get("jid"), a.get("affiliation")) for a in reply.iter(f"{{{OWNER}}}affiliation")}
    assert listed == {("hamlet@localhost", "owner"), ("bernardo@localhost", "outcast")}
    for bad in (
        ban.replace("Bernardo@LOCALHOST", "horatio@localhost' affiliation='member'/>"
                    "<affiliation jid='not a jid@@"),
        f"<pubsub xmlns='{OWNER}'><subscriptions node='n'>"
        "<subscription jid='horatio@localhost' subscription='subscribed'/>"
        "<subscription jid='@@' subscription='subscribed'/></subscriptions></pubsub>",
    ):
        assert error_of(await ask(harness, hamlet, "set", bad))[:2] == ("modify", "jid-malformed")
    assert {(a.get("jid"), a.get("affiliation"))
            for a in (await ask(harness, hamlet, "get", listing)).iter(
                f"{{{OWNER}}}affiliation")} == listed
    subs = f"<pubsub xmlns='{OWNER}'><subscriptions node='n'/></pubsub>"
    assert list((await ask(harness, hamlet, "get", subs)).iter(f"{{{OWNER}}}subscription")) == []
    # A subscriber's own JID, as its client wrote it, is its JID.
    horatio = harness.session("horatio@localhost/h")
    sub = f"<pubsub xmlns='{PS}'><subscribe node='n' jid='Horatio@LocalHost/h'/></pubsub>"
    reply = await ask(harness, horatio, "set", sub)
    assert reply.find(f"{{{PS}}}pubsub/{{{PS}}}subscription").get("jid") == "horatio@localhost/h"


async def test_a_publish_only_entity_retracts_its_own_items_alone(
    harness: ModuleHarness,
) -> None:
    """4.1 (the affiliations' rights), 7.2: bernardo, publish-only on hamlet's node,
    may delete the items he published, not hamlet's; horatio, a publisher, any item
    (the MAY of 4.1's note)."""
    hamlet = harness.session("hamlet@localhost/elsinore")
    bernardo = harness.session("bernardo@localhost/pda")
    horatio = harness.session("horatio@localhost/h")
    await create(harness, hamlet, "n", **{"pubsub#max_items": "10"})
    affiliations = (
        f"<pubsub xmlns='{OWNER}'><affiliations node='n'>"
        "<affiliation jid='bernardo@localhost' affiliation='publish-only'/>"
        "<affiliation jid='horatio@localhost' affiliation='publisher'/>"
        "</affiliations></pubsub>"
    )
    assert (await ask(harness, hamlet, "set", affiliations)).get("type") == "result"
    for who, item_id in ((hamlet, "o1"), (bernardo, "b1"), (horatio, "h1"), (hamlet, "o2")):
        assert (await ask(harness, who, "set", publish("n", item_id))).get("type") == "result"

    def retract(item_id: str) -> str:
        return f"<pubsub xmlns='{PS}'><retract node='n'><item id='{item_id}'/></retract></pubsub>"

    assert error_of(await ask(harness, bernardo, "set", retract("o1")))[:2] == (
        "auth", "forbidden")
    assert error_of(await ask(harness, bernardo, "set", retract("h1")))[:2] == (
        "auth", "forbidden")
    assert (await ask(harness, bernardo, "set", retract("b1"))).get("type") == "result"
    assert (await ask(harness, horatio, "set", retract("o2"))).get("type") == "result"
    items = f"<pubsub xmlns='{PS}'><items node='n'/></pubsub>"
    assert ids(await ask(harness, hamlet, "get", items)) == ["o1", "h1"]


async def test_an_outcast_loses_its_subscriptions(harness: ModuleHarness) -> None:
    """4.1: an outcast may not be subscribed. bernardo subscribed with his bare and
    his full JID before hamlet banned him: the ban ends both (his list and hamlet's
    no longer show them, nor do they count), so not even the purge of the node
    reaches him; horatio's subscription stays."""
    hamlet = harness.session("hamlet@localhost/elsinore")
    bernardo = harness.session("bernardo@localhost/pda")
    horatio = harness.session("horatio@localhost/h")
    await create(harness, hamlet, "n")
    for who, jid in ((bernardo, "bernardo@localhost"), (bernardo, "bernardo@localhost/pda"),
                     (horatio, "horatio@localhost")):
        sub = f"<pubsub xmlns='{PS}'><subscribe node='n' jid='{jid}'/></pubsub>"
        assert (await ask(harness, who, "set", sub)).get("type") == "result"
    ban = (
        f"<pubsub xmlns='{OWNER}'><affiliations node='n'>"
        "<affiliation jid='bernardo@localhost' affiliation='outcast'/>"
        "</affiliations></pubsub>"
    )
    assert (await ask(harness, hamlet, "set", ban)).get("type") == "result"
    mine = await ask(harness, bernardo, "get", f"<pubsub xmlns='{PS}'><subscriptions/></pubsub>")
    assert list(mine.iter(f"{{{PS}}}subscription")) == []
    listing = await ask(
        harness, hamlet, "get", f"<pubsub xmlns='{OWNER}'><subscriptions node='n'/></pubsub>"
    )
    assert [s.get("jid") for s in listing.iter(f"{{{OWNER}}}subscription")] == [
        "horatio@localhost"]
    assert listing.findtext(f".//{{{RSM}}}count") == "1"
    bernardo.take()
    assert (await ask(harness, hamlet, "set", f"<pubsub xmlns='{OWNER}'><purge node='n'/></pubsub>"
                      )).get("type") == "result"
    assert events(bernardo.take()) == []
    assert events(horatio.take()) == [(SERVICE, "horatio@localhost", "purge")]


async def test_disco_lists_nodes_and_items(harness: ModuleHarness) -> None:
    """5.1 (service info), 5.2 (nodes), 5.3 (node info), 5.5 (items)."""
    hamlet = harness.session("hamlet@localhost/elsinore")
    reply = await ask(harness, hamlet, "get", f"<query xmlns='{INFO}'/>")
    identity = reply.find(f"{{{INFO}}}query/{{{INFO}}}identity")
    assert (identity.get("category"), identity.get("type")) == ("pubsub", "service")
    await create(harness, hamlet, "a")
    await create(harness, hamlet, "b")
    await ask(harness, hamlet, "set", publish("a", "368866411b877c30064a5f62b917cffe"))
    reply = await ask(harness, hamlet, "get", f"<query xmlns='{ITEMS}'/>")
    assert [i.get("node") for i in reply.iter(f"{{{ITEMS}}}item")] == ["a", "b"]
    reply = await ask(harness, hamlet, "get", f"<query xmlns='{ITEMS}' node='a'/>")
    assert [i.get("name") for i in reply.iter(f"{{{ITEMS}}}item")] == [
        "368866411b877c30064a5f62b917cffe"
    ]
    reply = await ask(harness, hamlet, "get", f"<query xmlns='{INFO}' node='a'/>")
    identity = reply.find(f"{{{INFO}}}query/{{{INFO}}}identity")
    assert identity.get("type") == "leaf"
    assert (
        error_of(await ask(harness, hamlet, "get", f"<query xmlns='{INFO}' node='zz'/>"))[1]
        == "item-not-found"
    )
    # The server's own disco#items lists the service.
    reply = await harness.iq(hamlet, "get", f"<query xmlns='{ITEMS}'/>", to="localhost")
    assert SERVICE in [i.get("jid") for i in reply.iter(f"{{{ITEMS}}}item")]


async def test_disco_lists_no_node_the_access_model_closes_to_the_asker(
    harness: ModuleHarness,
) -> None:
    """5.2: a whitelist node is listed to its owner and the JIDs it lets in, not to
    others (its name is what its owner keeps private: a roster, a project); a node
    that banned the asker (outcast) is not listed to it either. Open nodes are, and
    so are those of the authorize model (one discovers them to ask). The listing
    reads a node's affiliations only when they name the asker, as stored."""
    hamlet = harness.session("hamlet@localhost/elsinore")
    await create(harness, hamlet, "open")
    await create(harness, hamlet, "secret", **{"pubsub#access_model": "whitelist"})
    await create(harness, hamlet, "vetted", **{"pubsub#access_model": "authorize"})
    affiliations = (
        f"<pubsub xmlns='{OWNER}'><affiliations node='{{}}'>"
        "<affiliation jid='{}' affiliation='{}'/></affiliations></pubsub>"
    )
    for node, jid, affiliation in (
        ("secret", "horatio@localhost", "member"), ("open", "bernardo@localhost", "outcast"),
        ("secret", "jürgen@localhost", "member"), ("vetted", "jürgen@localhost", "outcast"),
    ):
        reply = await ask(harness, hamlet, "set", affiliations.format(node, jid, affiliation))
        assert reply.get("type") == "result"
    listing = f"<query xmlns='{ITEMS}'/>"
    for who, listed in (
        ("hamlet@localhost/elsinore", ["open", "secret", "vetted"]),
        ("horatio@localhost/h", ["open", "secret", "vetted"]),
        ("bernardo@localhost/pda", ["vetted"]),
        ("jürgen@localhost/j", ["open", "secret"]),  # a JID its record's JSON escapes
    ):
        reply = await ask(harness, harness.session(who), "get", listing)
        assert [i.get("node") for i in reply.iter(f"{{{ITEMS}}}item")] == listed, who


async def test_limits_and_unsupported(harness: ModuleHarness) -> None:
    hamlet = harness.session("hamlet@localhost/elsinore")
    for name in ("a", "b", "c"):
        await create(harness, hamlet, name)
    reply = await ask(harness, hamlet, "set", f"<pubsub xmlns='{PS}'><create node='d'/></pubsub>")
    assert error_of(reply) == ("cancel", "not-allowed", "max-nodes-exceeded")
    # 6.4 (default subscription options) is not built.
    default = f"<pubsub xmlns='{PS}'><default node='a'/></pubsub>"
    reply = await ask(harness, hamlet, "get", default)
    assert error_of(reply) == ("cancel", "feature-not-implemented", "unsupported")
    error = reply.find("{jabber:client}error")
    assert error.find(f"{{{ERRORS}}}unsupported").get("feature") == "retrieve-default-sub"


async def test_account_removal(harness: ModuleHarness) -> None:
    hamlet = harness.session("hamlet@localhost/elsinore")
    bernardo = harness.session("bernardo@localhost/pda")
    await create(harness, hamlet, "mine")
    await create(harness, bernardo, "theirs")
    await ask(harness, hamlet, "set", publish("mine", "1"))
    await ask(
        harness,
        hamlet,
        "set",
        f"<pubsub xmlns='{PS}'><subscribe node='theirs' jid='hamlet@localhost'/></pubsub>",
    )
    module = harness.host.modules["pubsub"]
    assert await module.remove_user("localhost", "hamlet") is True
    page = await harness.host.items(SERVICE, "pubsub").query(Query())
    names = [item.name for item in page.items]
    assert names == ["n/theirs", "nodes"]
    assert page.items[1].attrs == {"n": 1}  # the service's node count, one down
    node = page.items[0]
    assert "hamlet" not in str(node.attrs)  # neither affiliation nor subscription
    assert await module.remove_user("localhost", "hamlet") is False


async def test_items_in_pages(harness: ModuleHarness) -> None:
    """6.5.4: RSM paging (XEP-0059) of a node's items, oldest first."""
    hamlet = harness.session("hamlet@localhost/elsinore")
    await create(harness, hamlet, "n", **{"pubsub#max_items": "10"})
    for item_id in "abcde":
        await ask(harness, hamlet, "set", publish("n", item_id))
    rsm = "http://jabber.org/protocol/rsm"

    async def page(query: str) -> tuple[list[str | None], str | None, str | None]:
        payload = f"<pubsub xmlns='{PS}'><items node='n'/><set xmlns='{rsm}'>{query}</set></pubsub>"
        reply = await ask(harness, hamlet, "get", payload)
        first = reply.find(f".//{{{rsm}}}first")
        index = None if first is None else first.get("index")
        return ids(reply), index, reply.findtext(f".//{{{rsm}}}count")

    assert await page("<max>2</max>") == (["a", "b"], "0", "5")
    assert await page("<max>2</max><after>b</after>") == (["c", "d"], "2", "5")
    assert await page("<max>2</max><before/>") == (["d", "e"], "3", "5")
    assert await page("<max>2</max><before>d</before>") == (["b", "c"], "1", "5")
    assert await page("<max>2</max><after>e</after>") == ([], None, "5")
    payload = (
        f"<pubsub xmlns='{PS}'><items node='n'/><set xmlns='{rsm}'><after>zz</after></set></pubsub>"
    )
    assert error_of(await ask(harness, hamlet, "get", payload))[1] == "item-not-found"


async def test_owner_manages_subscriptions(harness: ModuleHarness) -> None:
    """8.8: the owner lists, adds and removes subscriptions."""
    hamlet = harness.session("hamlet@localhost/elsinore")
    bernardo = harness.session("bernardo@localhost/pda")
    await create(harness, hamlet, "n")

    def change(state: str) -> str:
        return (
            f"<pubsub xmlns='{OWNER}'><subscriptions node='n'>"
            f"<subscription jid='bernardo@localhost/pda' subscription='{state}'/>"
            "</subscriptions></pubsub>"
        )

    assert error_of(await ask(harness, bernardo, "set", change("subscribed")))[1] == "forbidden"
    assert (await ask(harness, hamlet, "set", change("subscribed"))).get("type") == "result"
    listing = f"<pubsub xmlns='{OWNER}'><subscriptions node='n'/></pubsub>"
    reply = await ask(harness, hamlet, "get", listing)
    assert [s.get("jid") for s in reply.iter(f"{{{OWNER}}}subscription")] == [
        "bernardo@localhost/pda"
    ]
    await ask(harness, hamlet, "set", publish("n", "1"))
    assert events(bernardo.take()) == [(SERVICE, "bernardo@localhost/pda", "item 1 Soliloquy")]
    assert (await ask(harness, hamlet, "set", change("none"))).get("type") == "result"
    await ask(harness, hamlet, "set", publish("n", "2"))
    assert events(bernardo.take()) == []
    # bernardo's own view agrees: no subscription left.
    mine = f"<pubsub xmlns='{PS}'><subscriptions/></pubsub>"
    reply = await ask(harness, bernardo, "get", mine)
    assert list(reply.iter(f"{{{PS}}}subscription")) == []
    assert error_of(await ask(harness, hamlet, "set", change("pending")))[1] == "bad-request"


async def subscribe_in_bulk(service: PubSubService, name: str, jids: list[str]) -> None:
    """Store subscriptions as the engine does, without a request each (and the count)."""
    node = await service.existing(name)
    await service.items.batch_put({
        service.subscription_key(node, jid): encode_subscription(Subscription(jid, f"sub{i}"))
        for i, jid in enumerate(jids)
    })
    count = await service.subscription_count(node)
    await service.items.put(service.counter_key(node), {"n": count + len(jids)})


async def test_fan_out_to_five_thousand_subscribers_lets_the_loop_run(
    harness: ModuleHarness,
) -> None:
    """A publish to a node with 5,000 subscribers (more than a node record could
    list) reaches each exactly once, in batches between which the event loop runs
    other work: never held for long at a stretch."""
    harness.host.modules["pubsub"].limits = replace(  # type: ignore[attr-defined]
        harness.host.modules["pubsub"].limits, max_subscribers=5000  # type: ignore[attr-defined]
    )
    hamlet = harness.session("hamlet@localhost/elsinore")
    await create(harness, hamlet, "big")
    service = harness.host.modules["pubsub"].service(SERVICE)  # type: ignore[attr-defined]
    subscribers = [harness.session(f"u{i}@localhost/r") for i in range(5000)]
    await subscribe_in_bulk(service, "big", [s.jid for s in subscribers])
    turns = 0
    longest = 0.0
    seen_at: dict[str, list[int]] = {}

    async def ticker() -> None:
        # The loop thread's CPU time between two turns: the work done without letting
        # other tasks run (the machine's other processes do not count).
        nonlocal turns, longest
        last = time.thread_time()
        while True:
            turns += 1
            await asyncio.sleep(0)
            now = time.thread_time()
            longest, last = max(longest, now - last), now

    def recorder(jid: str) -> Callable[[etree._Element], bool]:
        return lambda stanza: seen_at.setdefault(jid, []).append(turns) or True

    for session in subscribers:
        session.recorder.send = recorder(session.jid)  # type: ignore[method-assign]
    gc.collect()
    gc.freeze()  # as the server does once started: the collector's passes are not ours
    ticking = asyncio.ensure_future(ticker())
    try:
        await ask(harness, hamlet, "set", publish("big", "1"))
    finally:
        ticking.cancel()
        gc.unfreeze()
    assert sorted(seen_at) == sorted(s.jid for s in subscribers)
    assert all(len(turns_seen) == 1 for turns_seen in seen_at.values())  # exactly once
    all_turns = [t for turns_seen in seen_at.values() for t in turns_seen]
    assert len(set(all_turns)) >= 5000 // 256  # the loop ran between the batches
    assert longest < 0.05, f"the loop was held {longest * 1000:.0f} ms"
    # One more subscriber than the node may have: refused, nothing stored.
    one_more = "<pubsub xmlns='{0}'><subscribe node='big' jid='hamlet@localhost'/></pubsub>"
    reply = await ask(harness, hamlet, "set", one_more.format(PS))
    assert error_of(reply)[1] == "not-allowed"
    assert await service.subscription_count(await service.existing("big")) == 5000


async def test_a_record_of_the_earlier_format_is_read_and_migrated(
    harness: ModuleHarness,
) -> None:
    """A node record that still lists its subscriptions inline (before they had
    items of their own): its subscribers are notified, and the first subscription
    change moves them all into items, options and pending ones included."""
    hamlet = harness.session("hamlet@localhost/elsinore")
    bernardo = harness.session("bernardo@localhost/pda")
    await create(harness, hamlet, "old")
    service = harness.host.modules["pubsub"].service(SERVICE)  # type: ignore[attr-defined]
    record = await service.items.get(service.node_key("old"))
    attrs = {k: v for k, v in record.attrs.items() if k not in ("g", "n")}
    many = {f"u{i}@localhost/r": f"old{i}" for i in range(200)}
    attrs["s"] = json.dumps({"bernardo@localhost/pda": "b1", **many})
    attrs["p"] = json.dumps({"horatio@localhost": "h1"})
    attrs["o"] = json.dumps({"bernardo@localhost/pda": {"pubsub#include_body": True}})
    await service.items.put(service.node_key("old"), attrs)
    await ask(harness, hamlet, "set", publish("old", "1"))
    got = bernardo.take()
    assert events(got) == [(SERVICE, "bernardo@localhost/pda", "item 1 Soliloquy")]
    assert got[0].findtext("{jabber:client}body") == "Soliloquy"  # its options kept
    # A new subscription: the inline ones move out first, in batches.
    sub = f"<pubsub xmlns='{PS}'><subscribe node='old' jid='hamlet@localhost'/></pubsub>"
    assert (await ask(harness, hamlet, "set", sub)).get("type") == "result"
    node = await service.existing("old")
    assert node.legacy == {} and await service.subscription_count(node) == 203
    assert "s" not in (await service.items.get(service.node_key("old"))).attrs
    stored = {s.jid: s for s in await service.subscribers(node)}
    assert len(stored) == 203
    assert stored["bernardo@localhost/pda"].subid == "b1"
    assert stored["bernardo@localhost/pda"].option("pubsub#include_body")
    assert stored["horatio@localhost"].state == "pending"
    unsub = (
        f"<pubsub xmlns='{PS}'><unsubscribe node='old' jid='bernardo@localhost/pda' "
        "subid='b1'/></pubsub>"
    )
    assert (await ask(harness, bernardo, "set", unsub)).get("type") == "result"
    assert await service.subscription_count(await service.existing("old")) == 202


async def test_a_fan_out_forward_is_taken_only_from_another_node() -> None:
    """The forward another node sends (FanOut) is copied to its recipients when it
    comes from no session and from the service's own address; the same stanza
    from a client (to the pubsub service or to the host, for PEP's) is not."""
    modules = {"roster": {}, "presence": {}, "disco": {}, "pubsub": {}, "pep": {}}
    harness = await ModuleHarness(modules).start()
    victim = harness.session("bernardo@localhost/pda")
    hamlet = harness.session("hamlet@localhost/elsinore")
    fanout = (
        "<fanout xmlns='urn:xmppd:pubsub:fanout'>"
        "<message xmlns='jabber:client' from='{0}' type='headline'><body>forged</body></message>"
        "<to jid='bernardo@localhost/pda'/></fanout>"
    )
    for to in (SERVICE, "localhost"):
        stanza = f"<message to='{to}' from='{to}'>{fanout.format(to)}</message>"
        await harness.send(hamlet, stanza)  # a client's: its 'from' is stamped
        await settle(harness)
        assert victim.take() == []
    for to in (SERVICE, "localhost"):
        envelope = parse_stanza(f"<message to='{to}' from='{to}'>{fanout.format(to)}</message>")
        harness.router.route(envelope)  # as the cluster's inbox routes a forward
        await settle(harness)
        got = victim.take()
        assert [(m.get("from"), m.findtext("{jabber:client}body")) for m in got] == [
            (to, "forged")
        ]


async def test_a_record_of_the_earlier_format_pages_and_clears_its_inline_subscribers(
    harness: ModuleHarness,
) -> None:
    """A node whose subscriptions are still inline: the owner's paged list moves
    them out first (it reads them by key), and deleting a node that still holds
    some inline clears their subscribers' index entries too (the tombstone names
    them)."""
    hamlet = harness.session("hamlet@localhost/elsinore")
    service = harness.host.modules["pubsub"].service(SERVICE)  # type: ignore[attr-defined]
    for name in ("paged", "gone"):
        await create(harness, hamlet, name)
        record = await service.items.get(service.node_key(name))
        attrs = dict(record.attrs)
        attrs["s"] = json.dumps({f"u{i}@localhost": f"s{i}" for i in range(3)})
        await service.items.put(service.node_key(name), attrs)
    for i in range(3):  # the index entries inline subscriptions had
        entries = [["", name, f"u{i}@localhost"] for name in ("paged", "gone")]
        await service.items.put(service.index_key(f"u{i}@localhost"), {"s": json.dumps(entries)})
    owner = f"{PS}#owner"
    page = (
        f"<pubsub xmlns='{owner}'><subscriptions node='paged'/>"
        "<set xmlns='http://jabber.org/protocol/rsm'><max>2</max></set></pubsub>"
    )
    reply = await ask(harness, hamlet, "get", page)
    listed = [s.get("jid") for s in reply.iter(f"{{{owner}}}subscription")]
    assert listed == ["u0@localhost", "u1@localhost"]
    assert reply.findtext(".//{http://jabber.org/protocol/rsm}count") == "3"
    assert (await service.existing("paged")).legacy == {}

    delete = f"<pubsub xmlns='{owner}'><delete node='gone'/></pubsub>"
    assert (await ask(harness, hamlet, "set", delete)).get("type") == "result"
    await settle(harness)  # the clearing the delete spawned
    for i in range(3):
        index = await service.items.get(service.index_key(f"u{i}@localhost"))
        assert json.loads(str(index.attrs["s"])) == [["", "paged", f"u{i}@localhost"]]
    assert (await service.items.query(Query(prefix="/d/"))).items == []


async def test_an_entry_of_a_vanished_node_does_not_count_against_the_limit() -> None:
    """A subscriber at its limit of one subscription, whose node was deleted with no
    clearing after it (the node that deleted it died): subscribing to another node
    drops the stale entry and succeeds."""
    harness = ModuleHarness({"roster": {}, "disco": {}, "pubsub": {"max_subscriptions": 1}})
    harness.users.update({"hamlet@localhost", "bernardo@localhost"})
    await harness.start()
    hamlet = harness.session("hamlet@localhost/elsinore")
    bernardo = harness.session("bernardo@localhost/pda")
    for name in ("old", "new"):
        await create(harness, hamlet, name)
    sub = "<pubsub xmlns='{0}'><subscribe node='{1}' jid='bernardo@localhost'/></pubsub>"
    assert (await ask(harness, bernardo, "set", sub.format(PS, "old"))).get("type") == "result"
    service = harness.host.modules["pubsub"].service(SERVICE)  # type: ignore[attr-defined]
    await service.delete("hamlet@localhost", "old")  # the deletion alone, no clearing
    assert (await ask(harness, bernardo, "set", sub.format(PS, "new"))).get("type") == "result"
    index = await service.items.get(service.index_key("bernardo@localhost"))
    assert json.loads(str(index.attrs["s"])) == [["", "new", "bernardo@localhost"]]


async def test_a_large_node_is_answered_a_page_at_a_time() -> None:
    """6.5.4: items beyond what one answer holds (256 KiB of them) are not read at
    once: the answer has the first ones and a XEP-0059 <set/> to page on; max_items
    gives the newest that fit; RSM pages are filled the same way."""
    harness = ModuleHarness({"roster": {}, "disco": {}, "pubsub": {}})
    harness.users.update({"hamlet@localhost"})
    await harness.start()
    hamlet = harness.session("hamlet@localhost/elsinore")
    await create(harness, hamlet, "big", **{"pubsub#max_items": "20"})
    body = f"<blob xmlns='urn:b'>{'x' * 60_000}</blob>"  # each in the blob store
    for i in range(10):
        await ask(harness, hamlet, "set", publish("big", f"i{i}", body))
    rsm = "http://jabber.org/protocol/rsm"

    async def get(request: str) -> tuple[list[str | None], dict[str, str | None]]:
        reply = await ask(harness, hamlet, "get", f"<pubsub xmlns='{PS}'>{request}</pubsub>")
        assert reply.get("type") == "result", etree.tostring(reply)
        found = reply.find(f".//{{{rsm}}}set")
        assert found is not None, etree.tostring(reply)[:300]
        first = found.find(f"{{{rsm}}}first")
        return ids(reply), {
            "index": None if first is None else first.get("index"),
            "last": found.findtext(f"{{{rsm}}}last"),
            "count": found.findtext(f"{{{rsm}}}count"),
        }

    got, page = await get("<items node='big'/>")
    assert got == ["i0", "i1", "i2", "i3"]
    assert page == {"index": "0", "last": "i3", "count": "10"}
    got, page = await get(f"<items node='big'/><set xmlns='{rsm}'><after>i3</after></set>")
    assert (got, page["index"]) == (["i4", "i5", "i6", "i7"], "4")
    got, page = await get(f"<items node='big'/><set xmlns='{rsm}'><max>100000</max>"
                          "<before/></set>")
    assert (got, page["index"]) == (["i6", "i7", "i8", "i9"], "6")
    got, page = await get("<items node='big' max_items='6'/>")
    assert (got, page) == (["i6", "i7", "i8", "i9"], {"index": "2", "last": "i9", "count": "6"})
    # By id: as many as fit, without a <set/> (the ids are the client's own list).
    wanted = "".join(f"<item id='i{i}'/>" for i in range(10))
    reply = await ask(harness, hamlet, "get",
                      f"<pubsub xmlns='{PS}'><items node='big'>{wanted}</items></pubsub>")
    assert ids(reply) == ["i0", "i1", "i2", "i3"]
    # What fits in one answer comes whole, without a <set/>, as before.
    reply = await ask(harness, hamlet, "get",
                      f"<pubsub xmlns='{PS}'><items node='big' max_items='2'/></pubsub>")
    assert ids(reply) == ["i8", "i9"] and reply.find(f".//{{{rsm}}}set") is None


async def test_a_node_of_long_item_ids_keeps_what_its_record_holds() -> None:
    """The node record lists every item id and blob key: with ids of hundreds of bytes,
    max_items of them would outgrow a stored item (256 KiB) and every publish would
    fail; the oldest go instead, and the node keeps fewer items than max_items."""
    modules = {"roster": {}, "disco": {}, "pubsub": {"inline_item_bytes": 256}}
    harness = ModuleHarness(modules)
    harness.users.update({"hamlet@localhost"})
    await harness.start()
    hamlet = harness.session("hamlet@localhost/elsinore")
    node = "n" * 250
    await create(harness, hamlet, node, **{"pubsub#max_items": "1000"})
    body = f"<blob xmlns='urn:b'>{'x' * 300}</blob>"  # each in the blob store
    for i in range(400):
        reply = await ask(harness, hamlet, "set", publish(node, f"{i:04}" + "i" * 246, body))
        assert reply.get("type") == "result", etree.tostring(reply)
    rsm = "http://jabber.org/protocol/rsm"
    reply = await ask(harness, hamlet, "get", f"<pubsub xmlns='{PS}'><items node='{node}'/>"
                      f"<set xmlns='{rsm}'><max>1</max><before/></set></pubsub>")
    kept = int(reply.findtext(f".//{{{rsm}}}count") or 0)
    assert 250 < kept < 400
    assert ids(reply) == ["0399" + "i" * 246]
    # The oldest are gone, blobs included.
    stored = await harness.host.blobs("pubsub.localhost", "pubsub").list(prefix="")
    assert len(stored.keys) == kept


@pytest.mark.parametrize("options", [PepOptions, PubSubOptions])
def test_max_items_beyond_what_a_node_record_holds_is_a_config_error(
    options: type[BaseModel],
) -> None:
    with pytest.raises(ValidationError, match="less than or equal to 1000"):
        options(max_items=1001)
    assert options(max_items=1000)


async def test_affiliations_past_the_first_thousand_nodes_are_listed_in_pages() -> None:
    """5.7: a user's affiliations on a service of more than 1,000 nodes: each one is
    listed, a XEP-0059 page at a time (100 without <set/>), keyed by node name."""
    harness = ModuleHarness({"roster": {}, "disco": {}, "pubsub": {}})
    harness.users.update({"hamlet@localhost", "bernardo@localhost"})
    await harness.start()
    module = harness.host.modules["pubsub"]
    assert isinstance(module, PubSub)
    service = module.service(SERVICE)
    for i in range(1100):
        await service.create("hamlet@localhost", f"n{i:04}", None)
    await service.set_affiliations("hamlet@localhost", "n1090", {"bernardo@localhost": "member"})
    rsm = "http://jabber.org/protocol/rsm"

    async def affiliations(session: TestSession, page: str | None) -> tuple[
        list[tuple[str | None, str | None]], str | None
    ]:
        request = f"<pubsub xmlns='{PS}'><affiliations/>"
        if page is not None:
            request += f"<set xmlns='{rsm}'>{page}</set>"
        reply = await ask(harness, session, "get", request + "</pubsub>")
        assert reply.get("type") == "result", etree.tostring(reply)
        found = [(a.get("node"), a.get("affiliation"))
                 for a in reply.iter(f"{{{PS}}}affiliation")]
        return found, reply.findtext(f".//{{{rsm}}}last")

    bernardo = harness.session("bernardo@localhost/b")
    assert await affiliations(bernardo, None) == ([("n1090", "member")], None)
    hamlet = harness.session("hamlet@localhost/elsinore")
    first, last = await affiliations(hamlet, None)
    assert len(first) == 100 and last == "n0099"
    listed = list(first)
    while last is not None:
        page, last = await affiliations(hamlet, f"<max>400</max><after>{last}</after>")
        listed += page
    assert listed == [(f"n{i:04}", "owner") for i in range(1100)]
    assert await affiliations(hamlet, "<max>2</max><before/>") == (
        [("n1098", "owner"), ("n1099", "owner")], "n1099")


def affiliations_set(node: str, changes: dict[str, str]) -> str:
    entries = "".join(
        f"<affiliation jid='{jid}' affiliation='{value}'/>" for jid, value in changes.items()
    )
    return f"<pubsub xmlns='{OWNER}'><affiliations node='{node}'>{entries}</affiliations></pubsub>"


async def test_affiliations_per_node_are_capped_all_or_none() -> None:
    """8.9.2: a node keeps at most `max_affiliations` (its owner counted); a request
    that would leave more is refused with <not-acceptable/> and changes nothing, even
    the changes of it that would fit; one that does not grow the node passes."""
    harness = ModuleHarness({"roster": {}, "disco": {}, "pubsub": {"max_affiliations": 3}})
    harness.users.update({"hamlet@localhost", "bernardo@localhost"})
    await harness.start()
    hamlet = harness.session("hamlet@localhost/elsinore")
    await create(harness, hamlet, "n")
    service = harness.host.modules["pubsub"].service(SERVICE)  # type: ignore[attr-defined]
    first = affiliations_set("n", {"a@localhost": "member"})
    assert (await ask(harness, hamlet, "set", first)).get("type") == "result"
    two_more = affiliations_set("n", {"b@localhost": "member", "c@localhost": "publisher"})
    reply = await ask(harness, hamlet, "set", two_more)
    assert error_of(reply)[:2] == ("modify", "not-acceptable")
    assert (await service.existing("n")).affiliations == {
        "hamlet@localhost": "owner", "a@localhost": "member"
    }
    # A swap keeps the count; then the one that fits.
    swap = affiliations_set("n", {"a@localhost": "none", "b@localhost": "member"})
    assert (await ask(harness, hamlet, "set", swap)).get("type") == "result"
    third = affiliations_set("n", {"c@localhost": "publisher"})
    assert (await ask(harness, hamlet, "set", third)).get("type") == "result"
    assert error_of(await ask(harness, hamlet, "set", first))[1] == "not-acceptable"
    assert sorted((await service.existing("n")).affiliations) == [
        "b@localhost", "c@localhost", "hamlet@localhost"
    ]


@pytest.mark.parametrize("options", [PepOptions, PubSubOptions])
def test_max_affiliations_is_validated(options: type[BaseModel]) -> None:
    for wrong in (0, 2001, "10"):
        with pytest.raises(ValidationError, match="max_affiliations"):
            options(max_affiliations=wrong)
    assert options(max_affiliations=2000)


class NodeScans(MemoryItemBackend):
    """Counts the node records that queries of the pubsub store hand back."""

    records = 0

    async def query(self, namespace: str, query: Query) -> Page:
        page = await super().query(namespace, query)
        if namespace.endswith("/pubsub"):
            self.records += sum(item.name.startswith("n/") for item in page.items)
        return page


async def test_creating_a_node_reads_a_count_not_the_node_records() -> None:
    """8.1: the service's nodes are counted in one item written with each creation
    and deletion; a creation reads it, not `max_nodes` node records. A service whose
    nodes predate the count counts them once, at its next creation."""
    harness = ModuleHarness({"roster": {}, "disco": {}, "pubsub": {"max_nodes": 5}})
    harness.storage.items = store = NodeScans()
    await harness.start()
    service = harness.host.modules["pubsub"].service(SERVICE)  # type: ignore[attr-defined]
    for i in range(4):
        await service.create("hamlet@localhost", f"n{i}", None)
    store.records = 0
    await service.create("hamlet@localhost", "n4", None)
    with pytest.raises(StanzaError, match="max-nodes|at most 5 nodes"):
        await service.create("hamlet@localhost", "n5", None)
    assert store.records == 0
    await service.delete("hamlet@localhost", "n0")
    await service.create("hamlet@localhost", "n5", None)
    assert (await service.items.get(service.node_count_key())).attrs == {"n": 5}
    # Nodes stored before the count: counted once, then the count is kept.
    await service.items.delete(service.node_count_key())
    with pytest.raises(StanzaError, match="at most 5 nodes"):
        await service.create("hamlet@localhost", "n6", None)
    assert store.records == 5  # counted once, and the count kept: the next reads it
    with pytest.raises(StanzaError, match="at most 5 nodes"):
        await service.create("hamlet@localhost", "n6", None)
    assert store.records == 5
    await service.items.delete(service.node_count_key())
    await service.delete("hamlet@localhost", "n1")  # no count: a mark
    assert (await service.items.get(service.node_count_key())).attrs == {"u": 1}
    await service.create("hamlet@localhost", "n6", None)
    assert store.records == 9  # the creation counted the 4 left
    assert (await service.items.get(service.node_count_key())).attrs == {"n": 5}
    for name in await service.node_names():
        await service.delete("hamlet@localhost", name)
    assert await service.items.get(service.node_count_key()) is None


async def test_two_cluster_nodes_creating_at_once_keep_the_node_limit() -> None:
    """Two nodes of a cluster (two modules on one item store whose reads yield, as a
    networked store's do) create eight nodes at once on a service of `max_nodes` 3:
    the count's conditional write makes every loser read again, so three are made
    and the other five are refused with max-nodes-exceeded."""
    store = InterleavingItems()
    services = []
    for _ in range(2):
        harness = ModuleHarness({"roster": {}, "disco": {}, "pubsub": {"max_nodes": 3}})
        harness.storage.items = store
        await harness.start()
        services.append(harness.host.modules["pubsub"].service(SERVICE))  # type: ignore[attr-defined]
    results = await asyncio.gather(
        *(services[i % 2].create("hamlet@localhost", f"n{i}", None) for i in range(8)),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, StanzaError)]
    assert len(refused) == 5, results
    assert all(r.app is not None and r.app.tag == f"{{{ERRORS}}}max-nodes-exceeded"
               for r in refused)
    assert len(await services[0].node_names()) == 3
    assert (await services[1].items.get(services[1].node_count_key())).attrs == {"n": 3}
    assert store.lost > 0  # they did collide


class HeldScan(MemoryItemBackend):
    """Holds the queries of the pubsub store's node records while `hold` is clear."""

    def __init__(self) -> None:
        super().__init__()
        self.hold = asyncio.Event()
        self.hold.set()
        self.scanning = asyncio.Event()

    async def query(self, namespace: str, query: Query) -> Page:
        page = await super().query(namespace, query)
        if namespace.endswith("/pubsub") and query.prefix == "n/" and not self.hold.is_set():
            self.scanning.set()
            await self.hold.wait()
        return page


async def test_a_deletion_while_the_nodes_are_counted_makes_the_creation_count_again() -> None:
    """A service whose nodes predate the count: a creation counts the records, and
    another cluster node deletes one of them before that creation writes. The
    deletion's mark fails the creation's write, which counts again: the count is the
    nodes there are, not one more."""
    harness = ModuleHarness({"roster": {}, "disco": {}, "pubsub": {"max_nodes": 5}})
    harness.storage.items = store = HeldScan()
    await harness.start()
    service = harness.host.modules["pubsub"].service(SERVICE)  # type: ignore[attr-defined]
    for i in range(3):
        await service.create("hamlet@localhost", f"n{i}", None)
    await service.items.delete(service.node_count_key())  # as stored before the count
    store.hold.clear()
    creation = asyncio.create_task(service.create("hamlet@localhost", "new", None))
    await store.scanning.wait()  # it has read the three records
    await service.delete("hamlet@localhost", "n0")
    store.hold.set()
    await creation
    assert sorted(await service.node_names()) == ["n1", "n2", "new"]
    assert (await service.items.get(service.node_count_key())).attrs == {"n": 3}


async def test_affiliations_of_long_jids_cannot_crowd_out_the_items() -> None:
    """Under `max_affiliations`, JIDs of 1,000 bytes would fill the node's record
    (and make every publish drop items to fit): past 128 KiB of them, a request that
    adds more is refused, and nothing of it is kept."""
    harness = ModuleHarness({"roster": {}, "disco": {}, "pubsub": {"max_affiliations": 2000}})
    await harness.start()
    service = harness.host.modules["pubsub"].service(SERVICE)  # type: ignore[attr-defined]
    await service.create("hamlet@localhost", "n", None)

    def jids(start: int, stop: int) -> dict[str, str]:
        return {f"{i:04}{'x' * 1000}@localhost": "member" for i in range(start, stop)}

    await service.set_affiliations("hamlet@localhost", "n", jids(0, 100))
    with pytest.raises(StanzaError, match="at most 131072 bytes"):
        await service.set_affiliations("hamlet@localhost", "n", jids(100, 140))
    assert len((await service.existing("n")).affiliations) == 101
    await service.set_affiliations("hamlet@localhost", "n", jids(100, 110))
    assert len((await service.existing("n")).affiliations) == 111
