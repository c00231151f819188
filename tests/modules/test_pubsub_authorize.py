"""The authorize access model (XEP-0060 6.1.6, 8.6) of the pubsub.<host> service, and
its absence from PEP, without sockets."""

from __future__ import annotations

import pytest
from lxml import etree

from tests.modules.test_pep import PS, error_of, events, settle
from tests.modules.test_pubsub import SERVICE, ask, create, ids, publish
from xmppd.testing import ModuleHarness, TestSession

DATA = "jabber:x:data"
EVENT = f"{PS}#event"
OWNER = f"{PS}#owner"
AUTHORIZATION = f"{PS}#subscribe_authorization"


@pytest.fixture
async def harness() -> ModuleHarness:
    harness = ModuleHarness({"roster": {}, "presence": {}, "disco": {}, "pubsub": {},
                             "pep": {}})
    harness.users.update({"hamlet@localhost", "bernardo@localhost", "horatio@localhost"})
    return await harness.start()


def subscribe(jid: str) -> str:
    return f"<pubsub xmlns='{PS}'><subscribe node='princely_musings' jid='{jid}'/></pubsub>"


def state_of(reply: etree._Element) -> str | None:
    subscription = reply.find(f"{{{PS}}}pubsub/{{{PS}}}subscription")
    assert subscription is not None, etree.tostring(reply)
    return subscription.get("subscription")


def forms(stanzas: list[etree._Element]) -> list[dict[str, str | None]]:
    """The fields of each authorization form in `stanzas` (XEP-0060 example 179)."""
    found = []
    for stanza in stanzas:
        x = stanza.find(f"{{{DATA}}}x")
        if stanza.tag == "{jabber:client}message" and x is not None:
            found.append({f.get("var") or "": f.findtext(f"{{{DATA}}}value")
                          for f in x.iter(f"{{{DATA}}}field")})
    return found


def answer(form: dict[str, str | None], allow: bool) -> str:
    """XEP-0060 example 180 (approve) or 181 (deny)."""
    fields = {**form, "pubsub#allow": "true" if allow else "false"}
    values = "".join(f"<field var='{k}'><value>{v}</value></field>" for k, v in fields.items())
    return (f"<message to='{SERVICE}' id='approve1'><x xmlns='{DATA}' type='submit'>"
            f"{values}</x></message>")


def subscription_events(stanzas: list[etree._Element]) -> list[tuple[str | None, str | None]]:
    """(jid, subscription) of each subscription state notification (example 182)."""
    return [(s.get("jid"), s.get("subscription"))
            for m in stanzas for s in m.iterfind(f"{{{EVENT}}}event/{{{EVENT}}}subscription")]


async def owner_form(harness: ModuleHarness, hamlet: TestSession) -> dict[str, str | None]:
    await settle(harness)
    found = forms(hamlet.take())
    assert len(found) == 1
    return found[0]


async def test_subscription_waits_for_the_owners_approval(harness: ModuleHarness) -> None:
    hamlet = harness.session("hamlet@localhost/elsinore")
    bernardo = harness.session("bernardo@localhost/pda")
    await create(harness, hamlet, "princely_musings", **{"pubsub#access_model": "authorize"})
    assert (await ask(harness, hamlet, "set", publish("princely_musings", "i1"))).get(
        "type") == "result"
    # 6.1.6: pending; the owner gets the form.
    assert state_of(await ask(harness, bernardo, "set", subscribe("bernardo@localhost/pda"))
                    ) == "pending"
    form = await owner_form(harness, hamlet)
    assert form["FORM_TYPE"] == AUTHORIZATION
    assert form["pubsub#node"] == "princely_musings"
    assert form["pubsub#subscriber_jid"] == "bernardo@localhost/pda"
    assert form["pubsub#allow"] == "false"
    # Asking again is still pending, and asks no one again.
    assert state_of(await ask(harness, bernardo, "set", subscribe("bernardo@localhost/pda"))
                    ) == "pending"
    # Pending: no items (6.5.9 pending-subscription), in one's and the owner's lists.
    items = f"<pubsub xmlns='{PS}'><items node='princely_musings'/></pubsub>"
    assert error_of(await ask(harness, bernardo, "get", items)) == (
        "auth", "not-authorized", "pending-subscription")
    mine = await ask(harness, bernardo, "get", f"<pubsub xmlns='{PS}'><subscriptions/></pubsub>")
    assert [s.get("subscription") for s in mine.iter(f"{{{PS}}}subscription")] == ["pending"]
    listing = await ask(harness, hamlet, "get",
                        f"<pubsub xmlns='{OWNER}'><subscriptions node='princely_musings'/>"
                        "</pubsub>")
    assert [(s.get("jid"), s.get("subscription"))
            for s in listing.iter(f"{{{OWNER}}}subscription")] == [
        ("bernardo@localhost/pda", "pending")]
    # Someone else's answer is refused; the owner's approval subscribes and tells him.
    horatio = harness.session("horatio@localhost/h")
    refused = await harness.send(horatio, answer(form, True))
    assert [m.get("type") for m in refused] == ["error"]
    await harness.send(hamlet, answer(form, True))
    await settle(harness)
    got = bernardo.take()
    assert subscription_events(got) == [("bernardo@localhost/pda", "subscribed")]
    assert ids(await ask(harness, bernardo, "get", items)) == ["i1"]
    await ask(harness, hamlet, "set", publish("princely_musings", "i2"))
    assert [what for _, _, what in events(bernardo.take())] == ["item i2 Soliloquy"]
    # A non-subscriber is not-subscribed (6.5.7.x).
    assert error_of(await ask(harness, horatio, "get", items)) == (
        "auth", "not-authorized", "not-subscribed")


async def test_denied_subscription_is_gone(harness: ModuleHarness) -> None:
    hamlet = harness.session("hamlet@localhost/elsinore")
    bernardo = harness.session("bernardo@localhost/pda")
    await create(harness, hamlet, "princely_musings", **{"pubsub#access_model": "authorize"})
    await ask(harness, bernardo, "set", subscribe("bernardo@localhost/pda"))
    form = await owner_form(harness, hamlet)
    await harness.send(hamlet, answer(form, False))
    await settle(harness)
    assert subscription_events(bernardo.take()) == [("bernardo@localhost/pda", "none")]
    mine = await ask(harness, bernardo, "get", f"<pubsub xmlns='{PS}'><subscriptions/></pubsub>")
    assert list(mine.iter(f"{{{PS}}}subscription")) == []
    # A second answer finds nothing pending.
    refused = await harness.send(hamlet, answer(form, True))
    assert [m.get("type") for m in refused] == ["error"]
    # A new request asks again; the owner may also approve with 8.8.2.
    assert state_of(await ask(harness, bernardo, "set", subscribe("bernardo@localhost/pda"))
                    ) == "pending"
    await owner_form(harness, hamlet)
    approve = (f"<pubsub xmlns='{OWNER}'><subscriptions node='princely_musings'>"
               "<subscription jid='bernardo@localhost/pda' subscription='subscribed'/>"
               "</subscriptions></pubsub>")
    assert (await ask(harness, hamlet, "set", approve)).get("type") == "result"
    mine = await ask(harness, bernardo, "get", f"<pubsub xmlns='{PS}'><subscriptions/></pubsub>")
    assert [s.get("subscription") for s in mine.iter(f"{{{PS}}}subscription")] == ["subscribed"]


async def test_an_answer_naming_the_subscriber_otherwise_cased_approves_it(
    harness: ModuleHarness,
) -> None:
    """8.6.2: the owner's client wrote the subscriber's JID as 'Bernardo@LocalHost/pda'
    (a JID is prepared before it is compared, RFC 7622): it is bernardo's pending
    subscription that is approved, and bernardo is told."""
    hamlet = harness.session("hamlet@localhost/elsinore")
    bernardo = harness.session("bernardo@localhost/pda")
    await create(harness, hamlet, "princely_musings", **{"pubsub#access_model": "authorize"})
    await ask(harness, bernardo, "set", subscribe("bernardo@localhost/pda"))
    form = await owner_form(harness, hamlet)
    form["pubsub#subscriber_jid"] = "Bernardo@LocalHost/pda"
    assert [m.get("type") for m in await harness.send(hamlet, answer(form, True))] == []
    await settle(harness)
    assert subscription_events(bernardo.take()) == [("bernardo@localhost/pda", "subscribed")]
    mine = await ask(harness, bernardo, "get", f"<pubsub xmlns='{PS}'><subscriptions/></pubsub>")
    assert [s.get("subscription") for s in mine.iter(f"{{{PS}}}subscription")] == ["subscribed"]


async def test_authorize_is_advertised_by_the_service_not_pep(harness: ModuleHarness) -> None:
    hamlet = harness.session("hamlet@localhost/elsinore")
    info = "http://jabber.org/protocol/disco#info"
    reply = await ask(harness, hamlet, "get", f"<query xmlns='{info}'/>")
    features = {f.get("var") for f in reply.iter(f"{{{info}}}feature")}
    assert f"{PS}#access-authorize" in features
    # Neither 8.7's get-pending command nor the node meta-data form is built.
    assert not {f"{PS}#get-pending", f"{PS}#meta-data"} & features
    reply = await harness.iq(
        hamlet, "set",
        f"<pubsub xmlns='{PS}'><publish node='n'><item><a xmlns='x'/></item></publish>"
        "<publish-options><x xmlns='jabber:x:data' type='submit'>"
        f"<field var='FORM_TYPE' type='hidden'><value>{PS}#publish-options</value></field>"
        "<field var='pubsub#access_model'><value>authorize</value></field>"
        "</x></publish-options></pubsub>")
    assert error_of(reply)[1:] == ("not-acceptable", "unsupported")
