"""Ad-hoc commands (XEP-0050) and the admin commands on them (XEP-0133), without sockets.

A three-stage command registered by the test drives the engine: the state a
command keeps between stages, "execute" meaning the stage's default action,
prev/next, and the sessions that end (completed, cancelled, timed out, the
client gone, too many open). Disco shows a command node's identity to those
who may run it and refuses the others.
"""

from __future__ import annotations

from typing import Any

from lxml import etree

from xmppd.config import Config
from xmppd.modules._dataforms import Field, Submitted, form
from xmppd.modules.adhoc import COMMANDS, AdHoc, Command, Stage, Step
from xmppd.testing import ModuleHarness, TestSession

STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
ADMIN = "http://jabber.org/protocol/admin"
WIZARD = "urn:test:wizard"
C = f"{{{COMMANDS}}}"


def errors(reply: etree._Element) -> tuple[str, str | None]:
    """The general and XEP-0050 specific conditions of an error reply."""
    assert reply.get("type") == "error", etree.tostring(reply)
    error = reply.find("{jabber:client}error")
    assert error is not None
    general = next(etree.QName(c).localname for c in error if etree.QName(c).namespace == STANZAS)
    specific = [etree.QName(c).localname for c in error if etree.QName(c).namespace == COMMANDS]
    return general, specific[0] if specific else None


async def wizard(step: Step) -> Stage:
    """Three stages: a name, then a colour (prev goes back), then a result that
    names both, from the state kept between the stages."""
    submitted = Submitted.find(step.command, WIZARD)
    stage = step.state.get("stage", 0)
    if step.action == "prev":
        stage -= 2
    elif submitted is not None and stage == 1:
        step.state["name"] = submitted.one("name")
    elif submitted is not None and stage == 2:
        step.state["colour"] = submitted.one("colour")
    if stage <= 0 or (stage == 1 and submitted is None):
        step.state["stage"] = 1
        return Stage(form("form", WIZARD, [Field("name")]), actions=("next",), default="next")
    if stage == 1:
        step.state["stage"] = 2
        return Stage(
            form("form", WIZARD, [Field("colour")]),
            actions=("prev", "complete"),
            default="complete",
        )
    summary = Field("summary", values=(f"{step.state['name']} likes {step.state['colour']}",))
    return Stage(form("result", WIZARD, [summary]), notes=[("info", "done")])


async def start(**adhoc: Any) -> tuple[ModuleHarness, AdHoc]:
    harness = ModuleHarness({"disco": {}, "adhoc": adhoc, "admin_commands": {}})
    harness.config = Config.model_validate(
        {"hosts": ["localhost"], "admins": ["boss@localhost"], "modules": harness.config.modules}
    )
    await harness.start()
    adhoc_module = harness.host.module(AdHoc)
    adhoc_module.add_command(Command(WIZARD, "Wizard", lambda sender, host: True, wizard))
    return harness, adhoc_module


async def command(
    harness: ModuleHarness,
    session: TestSession,
    node: str,
    action: str | None = None,
    sessionid: str | None = None,
    fields: dict[str, str] | None = None,
) -> etree._Element:
    attrs = f" node='{node}'"
    if action is not None:
        attrs += f" action='{action}'"
    if sessionid is not None:
        attrs += f" sessionid='{sessionid}'"
    inner = ""
    if fields is not None:
        values = "".join(f"<field var='{k}'><value>{v}</value></field>" for k, v in fields.items())
        inner = f"<x xmlns='jabber:x:data' type='submit'>{values}</x>"
    return await harness.iq(
        session, "set", f"<command xmlns='{COMMANDS}'{attrs}>{inner}</command>", to="localhost"
    )


def answer(reply: etree._Element) -> etree._Element:
    assert reply.get("type") == "result", etree.tostring(reply)
    found = reply.find(f"{C}command")
    assert found is not None
    return found


def actions(element: etree._Element) -> tuple[str | None, list[str]]:
    found = element.find(f"{C}actions")
    if found is None:
        return None, []
    return found.get("execute"), [etree.QName(c).localname for c in found]


async def test_a_multi_stage_command_keeps_its_state_and_goes_back_and_forth() -> None:
    harness, _ = await start()
    me = harness.session("user@localhost/pc")

    first = answer(await command(harness, me, WIZARD))
    sessionid = first.get("sessionid")
    assert (first.get("status"), first.get("node")) == ("executing", WIZARD)
    assert sessionid and actions(first) == ("next", ["next"])
    # "execute" (no action) means the stage's default: next
    second = answer(await command(harness, me, WIZARD, None, sessionid, {"name": "ann"}))
    assert actions(second) == ("complete", ["prev", "complete"])
    back = answer(await command(harness, me, WIZARD, "prev", sessionid))
    assert back.find("{jabber:x:data}x/{jabber:x:data}field[@var='name']") is not None
    answer(await command(harness, me, WIZARD, "next", sessionid, {"name": "bob"}))
    done = answer(await command(harness, me, WIZARD, "complete", sessionid, {"colour": "red"}))
    assert (done.get("status"), done.get("sessionid")) == ("completed", sessionid)
    summary = "{jabber:x:data}x/{jabber:x:data}field[@var='summary']/{jabber:x:data}value"
    assert done.findtext(summary) == "bob likes red"
    assert [(n.get("type"), n.text) for n in done.iter(f"{C}note")] == [("info", "done")]
    # a completed session is over
    assert errors(await command(harness, me, WIZARD, "next", sessionid)) == (
        "not-allowed",
        "session-expired",
    )


async def test_a_session_belongs_to_the_client_and_the_command_that_started_it() -> None:
    harness, _ = await start()
    me = harness.session("user@localhost/pc")
    other = harness.session("user@localhost/phone")
    sessionid = answer(await command(harness, me, WIZARD)).get("sessionid")

    assert errors(await command(harness, other, WIZARD, "next", sessionid, {"name": "x"})) == (
        "bad-request",
        "bad-sessionid",
    )
    admin_node = f"{ADMIN}#get-online-users-list"
    boss = harness.session("boss@localhost/console")
    boss_session = answer(await command(harness, boss, admin_node)).get("sessionid")
    assert errors(await command(harness, boss, WIZARD, "next", boss_session)) == (
        "bad-request",
        "bad-sessionid",
    )
    # the first stage offers "next" only
    assert errors(await command(harness, me, WIZARD, "complete", sessionid, {"name": "x"})) == (
        "bad-request",
        "bad-action",
    )
    # ... and the session is still there for the owner
    answer(await command(harness, me, WIZARD, "next", sessionid, {"name": "x"}))


async def test_sessions_end_after_the_timeout_with_the_client_and_beyond_the_limit() -> None:
    harness, adhoc = await start(session_timeout=60.0, max_sessions=2)
    now = [1000.0]
    adhoc.clock = lambda: now[0]
    me = harness.session("user@localhost/pc")

    old = answer(await command(harness, me, WIZARD)).get("sessionid")
    now[0] += 61
    assert errors(await command(harness, me, WIZARD, "next", old, {"name": "x"})) == (
        "not-allowed",
        "session-expired",
    )
    first, second, third = [
        answer(await command(harness, me, WIZARD)).get("sessionid") for _ in range(3)
    ]
    assert errors(await command(harness, me, WIZARD, "next", first, {"name": "x"})) == (
        "not-allowed",
        "session-expired",
    )  # the oldest of three went when the third opened
    answer(await command(harness, me, WIZARD, "next", second, {"name": "x"}))
    await harness.end_session(me)
    again = harness.session("user@localhost/pc")
    assert errors(await command(harness, again, WIZARD, "next", third, {"name": "x"})) == (
        "not-allowed",
        "session-expired",
    )


async def test_disco_shows_a_command_node_to_those_who_may_run_it() -> None:
    harness, _ = await start()
    boss = harness.session("boss@localhost/console")
    user = harness.session("user@localhost/pc")
    node = f"{ADMIN}#announce"
    info = "<query xmlns='http://jabber.org/protocol/disco#info' node='{}'/>"

    reply = await harness.iq(boss, "get", info.format(node), to="localhost")
    identity = reply.find(".//{http://jabber.org/protocol/disco#info}identity")
    assert identity is not None
    assert (identity.get("category"), identity.get("type")) == ("automation", "command-node")
    features = {f.get("var") for f in reply.iter("{http://jabber.org/protocol/disco#info}feature")}
    assert features == {COMMANDS, "jabber:x:data"}
    assert errors(await harness.iq(user, "get", info.format(node), to="localhost")) == (
        "forbidden",
        None,
    )
    assert errors(await harness.iq(user, "get", info.format("nope"), to="localhost")) == (
        "item-not-found",
        None,
    )
    items = "<query xmlns='http://jabber.org/protocol/disco#items' node='{}'/>"
    listed = await harness.iq(user, "get", items.format(COMMANDS), to="localhost")
    assert [i.get("node") for i in listed.iter("{*}item")] == [WIZARD]


async def test_a_form_of_another_type_or_a_bad_account_is_a_bad_payload() -> None:
    harness, _ = await start()
    boss = harness.session("boss@localhost/console")
    node = f"{ADMIN}#change-user-password"
    for jid in ("nobody", "a@elsewhere.org", "a@localhost/res", "a b@localhost"):
        reply = await command(
            harness, boss, node, "complete", None, {"accountjid": jid, "password": "12345678"}
        )
        assert errors(reply) == ("bad-request", "bad-payload"), jid
    other_form = (
        f"<command xmlns='{COMMANDS}' node='{node}'><x xmlns='jabber:x:data' type='submit'>"
        "<field var='FORM_TYPE'><value>urn:other</value></field></x></command>"
    )
    assert errors(await harness.iq(boss, "set", other_form, to="localhost")) == (
        "bad-request",
        None,
    )
