"""The module API beyond IQ handlers: send_iq, served subdomains, non-stanza elements,
timers, declared dependencies, routing events and failed deliveries. No sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from lxml import etree

from xmppd.config import Config, ConfigError
from xmppd.modulehost import ElementRequest, Module, ModuleHost, Routed, dependency_order
from xmppd.stream.errors import StanzaError
from xmppd.testing import ModuleHarness, TestSession, parse_stanza
from xmppd.xml import ns

DISCO_ITEMS = "http://jabber.org/protocol/disco#items"
SM = "urn:xmpp:sm:3"


def answer(session: TestSession, harness: ModuleHarness, type_: str, payload: str = "") -> None:
    """`session` answers the IQ it was last given, as its client would."""
    (request,) = [s for s in session.take() if s.tag == ns.C_IQ]
    reply = parse_stanza(
        f"<iq type='{type_}' id='{request.get('id')}' to='{request.get('from')}'>{payload}</iq>"
    )
    reply.set("from", session.jid)
    harness.router.route(reply, session)


def ping(to: str, sender: str = "localhost") -> etree._Element:
    return parse_stanza(
        f"<iq type='get' from='{sender}' to='{to}'><ping xmlns='urn:xmpp:ping'/></iq>"
    )


# --- send_iq -------------------------------------------------------------------------------


async def test_send_iq_returns_the_answer() -> None:
    harness = await ModuleHarness({}).start()
    alice = harness.session("alice@localhost/a")
    pending = asyncio.ensure_future(harness.host.send_iq(ping(alice.jid)))
    await asyncio.sleep(0)
    answer(alice, harness, "result")
    reply = await asyncio.wait_for(pending, 1)
    assert reply.get("type") == "result" and reply.get("from") == alice.jid


async def test_send_iq_raises_the_error_answer() -> None:
    harness = await ModuleHarness({}).start()
    alice = harness.session("alice@localhost/a")
    pending = asyncio.ensure_future(harness.host.send_iq(ping(alice.jid)))
    await asyncio.sleep(0)
    answer(
        alice,
        harness,
        "error",
        "<error type='cancel'><feature-not-implemented "
        "xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>",
    )
    with pytest.raises(StanzaError) as raised:
        await asyncio.wait_for(pending, 1)
    assert raised.value.condition == "feature-not-implemented"
    assert raised.value.type == "cancel"


async def test_send_iq_ignores_an_answer_from_someone_else_and_times_out() -> None:
    harness = await ModuleHarness({}).start()
    alice = harness.session("alice@localhost/a")
    mallory = harness.session("mallory@localhost/m")
    pending = asyncio.ensure_future(harness.host.send_iq(ping(alice.jid), timeout=0.2))
    await asyncio.sleep(0)
    (request,) = alice.take()
    forged = parse_stanza(f"<iq type='result' id='{request.get('id')}' to='localhost'/>")
    forged.set("from", mallory.jid)
    harness.router.route(forged, mallory)
    with pytest.raises(TimeoutError):
        await pending
    assert mallory.take() == []  # a result is never answered


async def test_send_iq_to_nobody_fails_with_the_bounce() -> None:
    harness = await ModuleHarness({}).start()
    with pytest.raises(StanzaError) as raised:
        await asyncio.wait_for(harness.host.send_iq(ping("ghost@localhost/x")), 1)
    assert raised.value.condition == "service-unavailable"


# --- served subdomains ----------------------------------------------------------------------


async def test_a_served_subdomain_gets_its_stanzas_and_disco_lists_it() -> None:
    harness = await ModuleHarness({"disco": {}}).start()
    got: list[Routed] = []
    harness.host.serve_domain("conference.localhost", got.append, name="Chatrooms")
    alice = harness.session("alice@localhost/a")
    await harness.send(
        alice, "<message to='room@conference.localhost/nick'><body>hi</body></message>"
    )
    assert [r.to.full for r in got] == ["room@conference.localhost/nick"]
    assert got[0].origin is alice
    reply = await harness.iq(alice, "get", f"<query xmlns='{DISCO_ITEMS}'/>", to="localhost")
    items = reply.findall(f"{{{DISCO_ITEMS}}}query/{{{DISCO_ITEMS}}}item")
    assert [(i.get("jid"), i.get("name")) for i in items] == [("conference.localhost", "Chatrooms")]


async def test_an_unserved_subdomain_is_a_remote_domain() -> None:
    harness = await ModuleHarness({}).start()
    alice = harness.session("alice@localhost/a")
    (error,) = await harness.send(
        alice, "<message to='room@pubsub.localhost'><body>x</body></message>"
    )
    condition = f"{{{ns.CLIENT}}}error/{{{ns.STANZA_ERRORS}}}remote-server-not-found"
    assert error.find(condition) is not None


async def test_a_domain_cannot_be_served_twice() -> None:
    harness = await ModuleHarness({}).start()
    harness.host.serve_domain("conference.localhost", lambda routed: None)
    with pytest.raises(ValueError):
        harness.host.serve_domain("conference.localhost", lambda routed: None)
    with pytest.raises(ValueError):
        harness.host.serve_domain("localhost", lambda routed: None)


# --- non-stanza elements ----------------------------------------------------------------------


async def test_elements_reach_their_module_before_bind_only_when_asked() -> None:
    harness = await ModuleHarness({}).start()
    seen: list[tuple[str, bool]] = []
    harness.host.element(f"{{{SM}}}enable", lambda r: seen.append(("enable", r.session is None)))
    harness.host.element(
        f"{{{SM}}}resume", lambda r: seen.append(("resume", r.session is None)), before_bind=True
    )
    replies: list[etree._Element] = []

    def request(tag: str, session: TestSession | None) -> ElementRequest:
        return ElementRequest(etree.Element(f"{{{SM}}}{tag}"), session, "localhost", replies.append)

    alice = harness.session("alice@localhost/a")
    assert not harness.host.handle_element(request("enable", None))
    assert harness.host.handle_element(request("enable", alice))
    assert harness.host.handle_element(request("resume", None))
    assert not harness.host.handle_element(request("csi", alice))
    assert seen == [("enable", False), ("resume", True)]
    with pytest.raises(ValueError):
        harness.host.element(f"{{{SM}}}enable", lambda r: None)


# --- timers ----------------------------------------------------------------------------------


async def test_every_repeats_survives_a_failing_tick_and_stops_with_the_host() -> None:
    harness = await ModuleHarness({}).start()
    ticks: list[int] = []
    third = asyncio.Event()

    def tick() -> None:
        ticks.append(len(ticks))
        if len(ticks) == 3:
            third.set()
        if len(ticks) == 1:
            raise RuntimeError("one bad tick")

    harness.host.every(0.01, tick)
    # waited for, not slept on: a loop stalled for the 0.2 s once slept here ran one tick
    await asyncio.wait_for(third.wait(), 10)
    await harness.host.stop()
    stopped_at = len(ticks)
    await asyncio.sleep(0.05)
    assert len(ticks) == stopped_at


# --- declared dependencies --------------------------------------------------------------------


def test_a_module_whose_dependency_is_off_is_refused_by_name() -> None:
    config = Config.model_validate({"hosts": ["localhost"], "modules": {"presence": None}})
    host = ModuleHost(ModuleHarness({}).router, ModuleHarness({}).storage, ["localhost"])
    with pytest.raises(ConfigError) as raised:
        host.load(config)
    assert any("presence" in p and "'roster'" in p for p in raised.value.problems)


async def test_dependencies_are_set_up_first_whatever_the_config_order() -> None:
    harness = await ModuleHarness({"presence": None, "disco": None, "roster": None}).start()
    assert list(harness.host.modules) == ["roster", "presence", "disco"]


def test_dependency_order_refuses_a_circle() -> None:
    class A(Module):
        name = "a"
        requires = ("b",)

    class B(Module):
        name = "b"
        requires = ("a",)

    with pytest.raises(ValueError, match="circle"):
        dependency_order({"a": A, "b": B})


# --- routing events and failed deliveries -------------------------------------------------------


async def test_a_handler_above_the_default_takes_the_stanza() -> None:
    harness = await ModuleHarness({}).start()
    taken: list[str] = []
    harness.host.on("message/full", lambda routed: taken.append(routed.to.full) or True)
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    await harness.send(alice, "<message to='bob@localhost/b' type='chat'><body>x</body></message>")
    assert taken == ["bob@localhost/b"] and bob.take() == []


async def test_message_delivered_tells_who_got_it_once() -> None:
    harness = await ModuleHarness({}).start()
    told: list[list[str]] = []
    harness.host.on(
        "message/delivered", lambda routed: told.append([s.jid for s in routed.recipients])
    )
    alice = harness.session("alice@localhost/a")
    for resource in ("one", "two"):
        harness.session(f"bob@localhost/{resource}")
    await harness.send(alice, "<message to='bob@localhost' type='chat'><body>x</body></message>")
    assert told == [["bob@localhost/one", "bob@localhost/two"]]


class ClosingSession(TestSession):
    """A session whose stream is closing: its transport takes nothing more."""

    def deliver(self, stanza: etree._Element) -> bool:
        return False


async def test_a_failed_delivery_goes_to_offline_storage_not_nowhere() -> None:
    harness = await ModuleHarness({"offline": None}).start()
    alice = harness.session("alice@localhost/a")
    closing = ClosingSession("bob@localhost/b")
    harness.users.add(closing.bare)
    harness.router.bind(closing)
    closing.available = True
    replies = await harness.send(
        alice, "<message to='bob@localhost/b' type='chat'><body>kept</body></message>"
    )
    assert replies == []
    assert harness.router.ledger.offline == 1 and harness.router.ledger.dropped == {}
    harness.router.unbind(closing)
    bob = await harness.login("bob@localhost/b2", available=False)
    got = await harness.send(bob, "<presence/>")  # offline messages come at initial presence
    bodies = [s.findtext(f"{{{ns.CLIENT}}}body") for s in got if s.tag == ns.C_MESSAGE]
    assert bodies == ["kept"]


async def test_a_failed_iq_delivery_is_answered() -> None:
    harness = await ModuleHarness({}).start()
    alice = harness.session("alice@localhost/a")
    closing = ClosingSession("bob@localhost/b")
    harness.router.bind(closing)
    (error,) = await harness.send(
        alice, "<iq type='get' id='q' to='bob@localhost/b'><q xmlns='x'/></iq>"
    )
    assert error.get("type") == "error" and error.get("id") == "q"
    assert error.find(f"{{{ns.CLIENT}}}error/{{{ns.STANZA_ERRORS}}}service-unavailable") is not None
    assert harness.router.directory.get("bob@localhost", "b") is None  # not chosen again


# --- filters that wait ------------------------------------------------------------------------


def waiting_filter(loaded: set[str], key: str) -> Callable[..., object]:
    """A filter that cannot judge until `key` is loaded: it returns the load."""

    async def load() -> None:
        await asyncio.sleep(0.01)
        loaded.add(key)

    def check(stanza: etree._Element, session: TestSession) -> object:
        return True if key in loaded else asyncio.ensure_future(load())

    return check


@pytest.mark.parametrize("chain", ["stanza/out", "stanza/in"])
async def test_each_filter_may_wait_once_and_the_stanza_goes_on(chain: str) -> None:
    harness = await ModuleHarness({}).start()
    loaded: set[str] = set()
    harness.host.filter(chain, waiting_filter(loaded, "first"), priority=2)
    harness.host.filter(chain, waiting_filter(loaded, "second"), priority=1)
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    await harness.send(alice, "<message to='bob@localhost/b' type='chat'><body>x</body></message>")
    assert loaded == {"first", "second"}
    assert [s.findtext(f"{{{ns.CLIENT}}}body") for s in bob.take()] == ["x"]
    assert alice.input_holds == 0


@pytest.mark.parametrize("chain", ["stanza/out", "stanza/in"])
async def test_a_filter_that_cannot_judge_after_its_wait_has_the_stanza_refused(
    chain: str,
) -> None:
    harness = await ModuleHarness({}).start()
    def never_judges(stanza: etree._Element, session: TestSession) -> object:
        if stanza.find(f"{{{ns.CLIENT}}}body") is None:
            return True  # the error that answers the message
        return asyncio.ensure_future(asyncio.sleep(0))

    harness.host.filter(chain, never_judges)
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    replies = await harness.send(
        alice, "<message to='bob@localhost/b' type='chat' id='m'><body>x</body></message>"
    )
    assert bob.take() == []
    (error,) = replies
    assert error.get("id") == "m" and error.get("type") == "error"
    condition = f"{{{ns.CLIENT}}}error/{{{ns.STANZA_ERRORS}}}internal-server-error"
    assert error.find(condition) is not None
    assert harness.router.ledger.bounced == 1


# --- nothing lost while the router waits ---------------------------------------------------


def slow_messages(gate: asyncio.Future[None]) -> Callable[..., object]:
    """A "stanza/in" filter that makes messages wait for `gate`, as a record load would."""

    def check(stanza: etree._Element, session: TestSession) -> object:
        if stanza.tag == ns.C_MESSAGE and not gate.done():
            return gate
        return True

    return check


async def test_a_bare_message_whose_chosen_resource_ends_during_a_wait_goes_to_the_others() -> None:
    harness = await ModuleHarness({}).start()
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    harness.host.filter("stanza/in", slow_messages(gate))
    balcony = harness.session("juliet@localhost/balcony")
    balcony.priority = 5
    garden = harness.session("juliet@localhost/garden")
    romeo = harness.session("romeo@localhost/orchard")
    stanza = parse_stanza("<message to='juliet@localhost' type='chat'><body>hi</body></message>")
    stanza.set("from", romeo.jid)
    romeo.receive(stanza)  # chosen: balcony alone (top priority); its delivery waits
    harness.router.session_ended(balcony)  # and balcony leaves meanwhile
    gate.set_result(None)
    await harness.router.drain()
    got = [s.findtext(f"{{{ns.CLIENT}}}body") for s in garden.take() if s.tag == ns.C_MESSAGE]
    assert got == ["hi"]  # besides balcony's unavailable presence
    assert romeo.take() == []


async def test_a_routing_bug_loses_none_of_the_stanzas_queued_behind() -> None:
    harness = await ModuleHarness({}).start()
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def buggy(stanza: etree._Element, session: TestSession) -> object:
        if stanza.get("id") == "m1" and not gate.done():
            return gate
        if stanza.get("id") == "m2":
            raise RuntimeError("a module's bug")
        return True

    harness.host.filter("stanza/out", buggy)
    juliet = harness.session("juliet@localhost/balcony")
    romeo = harness.session("romeo@localhost/orchard")
    for n in (1, 2, 3, 4):
        stanza = parse_stanza(f"<message to='{juliet.jid}' type='chat' id='m{n}'><body/></message>")
        stanza.set("from", romeo.jid)
        romeo.receive(stanza)
    gate.set_result(None)
    await harness.router.drain()
    assert [s.get("id") for s in juliet.take()] == ["m1", "m3", "m4"]
    assert romeo.input_holds == 0


async def test_a_filter_that_raises_for_one_recipient_spares_the_others() -> None:
    harness = await ModuleHarness({}).start()

    def broken_for_balcony(stanza: etree._Element, session: TestSession) -> bool:
        if session.resource == "balcony" and stanza.tag == ns.C_MESSAGE:
            raise RuntimeError("a module's bug")
        return True

    harness.host.filter("stanza/in", broken_for_balcony)
    balcony = harness.session("juliet@localhost/balcony")
    garden = harness.session("juliet@localhost/garden")
    romeo = harness.session("romeo@localhost/orchard")
    replies = await harness.send(
        romeo, "<message to='juliet@localhost' type='chat' id='m'><body>hi</body></message>"
    )
    assert [s.findtext(f"{{{ns.CLIENT}}}body") for s in garden.take()] == ["hi"]
    assert balcony.take() == []
    # garden took it: delivered, so no error (romeo's client would send it again)
    assert replies == []
    replies = await harness.send(
        romeo, "<message to='juliet@localhost/balcony' type='chat' id='n'><body/></message>"
    )
    assert balcony.take() == [] and garden.take() == []
    (error,) = replies  # the delivery that could not be judged is answered, not lost
    condition = f"{{{ns.CLIENT}}}error/{{{ns.STANZA_ERRORS}}}internal-server-error"
    assert error.get("id") == "n" and error.find(condition) is not None


# --- filters limited to stanza kinds -------------------------------------------------------


def recorder(seen: list[tuple[str, str]], name: str) -> Callable[..., bool]:
    """A filter that notes which stanzas it was called for (by local name) and passes them."""

    def check(stanza: etree._Element, session: TestSession) -> bool:
        seen.append((name, etree.QName(stanza).localname))
        return True

    return check


async def test_a_filter_for_some_kinds_is_called_only_for_those() -> None:
    harness = await ModuleHarness({}).start()
    seen: list[tuple[str, str]] = []
    harness.host.filter("stanza/out", recorder(seen, "out-presence"), kinds=("presence",))
    harness.host.filter("stanza/out", recorder(seen, "out-all"))
    harness.host.filter("stanza/in", recorder(seen, "in-message-iq"), kinds=("message", "iq"))
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    await harness.send(alice, "<message to='bob@localhost/b' type='chat'><body>x</body></message>")
    await harness.send(alice, "<presence to='bob@localhost/b'/>")
    await harness.send(alice, "<iq to='bob@localhost/b' type='get'><query xmlns='x:y'/></iq>")
    assert [s.tag for s in bob.take()] == [ns.C_MESSAGE, ns.C_PRESENCE, ns.C_IQ]
    assert seen == [
        ("out-all", "message"), ("in-message-iq", "message"),
        ("out-presence", "presence"), ("out-all", "presence"),
        ("out-all", "iq"), ("in-message-iq", "iq"),
    ]
    assert len(harness.host.filters_out) == 2 and len(harness.host.filters_in) == 1


@pytest.mark.parametrize("chain", ["stanza/out", "stanza/in"])
async def test_a_wait_in_a_kind_chain_goes_on_from_the_same_filter(chain: str) -> None:
    """The filter that asked to wait runs again after the wait, and the ones after it
    in the message's own chain: not a filter at the same position among all kinds."""
    harness = await ModuleHarness({}).start()
    seen: list[tuple[str, str]] = []
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiter_calls: list[str] = []

    def waits_once(stanza: etree._Element, session: TestSession) -> object:
        waiter_calls.append(stanza.get("id") or "")
        return True if gate.done() else gate

    harness.host.filter(chain, recorder(seen, "presence-only"), 20, kinds=("presence",))
    harness.host.filter(chain, waits_once, 10, kinds=("message",))
    harness.host.filter(chain, recorder(seen, "after"), 0)
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    stanza = parse_stanza("<message to='bob@localhost/b' id='m'><body>x</body></message>")
    stanza.set("from", alice.jid)
    alice.receive(stanza)
    await asyncio.sleep(0)
    assert bob.take() == []
    gate.set_result(None)
    await harness.router.drain()
    assert [s.get("id") for s in bob.take()] == ["m"]
    assert waiter_calls == ["m", "m"]
    assert seen == [("after", "message")]


async def test_a_filter_for_an_unknown_kind_is_refused_and_not_registered() -> None:
    harness = await ModuleHarness({}).start()
    with pytest.raises(ValueError):
        harness.host.filter("stanza/out", lambda stanza, session: True, kinds=("chat",))
    assert harness.host.filters_out == []
