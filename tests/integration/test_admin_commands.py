"""Service administration from a client (XEP-0133 over XEP-0050), with slixmpp's
xep_0050 plugin as a real admin's client would drive it, on a real node.

boss@localhost is the config's admin; alice and bob are users. What each
command does is checked where it matters: a user added logs in, a changed
password ends the user's other sessions and only the new one works, ended
sessions end on the client, a deleted user leaves nothing in the stores, the
online list and count match who is connected, an announcement reaches them.
Users are refused and see no commands; an admin of one host administers only
that host; a cancelled command and a made-up session id get XEP-0050's errors.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from slixmpp import JID, Iq
from slixmpp.exceptions import IqError

from tests.integration.clients import Client, close, connect, insecure_context
from tests.integration.conftest import StartServer, port_of
from tests.integration.test_account_removal import (
    assert_zed_starts_empty,
    fill_every_store,
    person,
)
from tests.integration.test_cluster import until
from tests.integration.test_user_journey import MODULES as JOURNEY_MODULES
from xmppd.server import Server
from xmppd.storage import devservices
from xmppd.storage.devservices import LocalService

pytestmark = pytest.mark.timeout(60)

ADMIN = "http://jabber.org/protocol/admin"
COMMANDS = "http://jabber.org/protocol/commands"
NODES = {
    f"{ADMIN}#{name}"
    for name in (
        "add-user",
        "delete-user",
        "end-user-session",
        "change-user-password",
        "get-online-users-num",
        "get-online-users-list",
        "announce",
    )
}
USERS = {"alice": "alice-secret", "bob": "bob-secret", "boss": "boss-secret"}
MODULES: dict[str, Any] = {**JOURNEY_MODULES, "adhoc": {}, "admin_commands": {}}


class Admin(Client):
    """A client with ad-hoc commands (xep_0050) and data forms (xep_0004)."""

    def __init__(self, jid: str, password: str) -> None:
        super().__init__(jid, password)
        for plugin in ("xep_0030", "xep_0004", "xep_0050"):
            self.register_plugin(plugin)

    async def execute(self, node: str, to: str = "localhost", **kwargs: Any) -> Iq:
        """Send one stage of the command `node` (a short name: "add-user"); `action`,
        `sessionid` and `payload` as xep_0050 takes them (none: the first stage)."""
        return await self.plugin["xep_0050"].send_command(
            JID(to), f"{ADMIN}#{node}", timeout=10, **kwargs
        )

    async def submit(
        self, node: str, fields: dict[str, str | list[str]], to: str = "localhost"
    ) -> Iq:
        """Run `node` the way a client's admin menu does: get its form, fill it in and
        complete it in the same command session."""
        first = await self.execute(node, to)
        assert first["command"]["status"] == "executing", first
        assert first["command"]["actions"] == {"complete"}, first
        return await self.execute(
            node,
            to,
            action="complete",
            sessionid=first["command"]["sessionid"],
            payload=self.form(fields),
        )

    def form(self, fields: dict[str, str | list[str]]) -> Any:
        form = self.plugin["xep_0004"].make_form(ftype="submit")
        form.add_field(var="FORM_TYPE", ftype="hidden", value=ADMIN)
        for var, value in fields.items():
            form.add_field(
                var=var, ftype="jid-multi" if isinstance(value, list) else None, value=value
            )
        return form


async def login(server: Server, jid: str, password: str) -> Admin:
    """An Admin client (any account may try the commands) logged in over STARTTLS."""
    client = Admin(jid, password)
    client.ssl_context = insecure_context()
    client.enable_direct_tls = False
    client.enable_plaintext = False
    client.connect("127.0.0.1", port_of(server, "starttls"))
    await asyncio.wait_for(client.started.wait(), 15)
    return client


def notes(iq: Iq) -> list[tuple[str, str]]:
    return [(note.get("type"), note.text or "") for note in iq.xml.iter(f"{{{COMMANDS}}}note")]


def result_values(iq: Iq, var: str) -> list[str]:
    form = iq["command"]["form"]
    assert form["type"] == "result", iq
    value = form.get_fields()[var]["value"]
    return value if isinstance(value, list) else [value]


def app_condition(error: IqError) -> str | None:
    """XEP-0050's specific condition of an error answer (bad-sessionid, ...)."""
    element = error.iq.xml.find("{jabber:client}error")
    assert element is not None
    for child in element:
        if child.tag.startswith(f"{{{COMMANDS}}}"):
            return str(child.tag.split("}", 1)[1])
    return None


async def start(start_server: StartServer, **sections: Any) -> Server:
    return await start_server(users=USERS, modules=MODULES, admins=["boss@localhost"], **sections)


# --- who may ------------------------------------------------------------------------


async def test_admins_see_and_run_the_commands_and_users_are_refused(
    start_server: StartServer,
) -> None:
    server = await start(start_server)
    boss = await login(server, "boss@localhost/console", "boss-secret")
    alice = await login(server, "alice@localhost/pc", "alice-secret")

    info = await boss.plugin["xep_0030"].get_info(jid="localhost", timeout=10)
    assert COMMANDS in info["disco_info"]["features"]
    listed = await boss.plugin["xep_0050"].get_commands(JID("localhost"), timeout=10)
    items = listed["disco_items"]["items"]
    assert {node for _, node, _ in items} == NODES
    assert {jid for jid, _, _ in items} == {JID("localhost")}
    count = await boss.execute("get-online-users-num")
    assert count["command"]["status"] == "completed"
    assert result_values(count, "onlineusersnum") == ["2"]

    listed = await alice.plugin["xep_0050"].get_commands(JID("localhost"), timeout=10)
    assert listed["disco_items"]["items"] == set()
    for node in ("get-online-users-num", "add-user"):
        with pytest.raises(IqError) as refused:
            await alice.execute(node)
        assert refused.value.condition == "forbidden"
    with pytest.raises(IqError) as refused:
        await alice.submit("add-user", {"accountjid": "x@localhost", "password": "p" * 8})
    assert refused.value.condition == "forbidden"
    assert not await server.accounts["localhost"].exists("x")
    await close(alice)
    await close(boss)


async def test_an_admin_administers_the_host_of_their_jid_only(start_server: StartServer) -> None:
    server = await start_server(
        users=USERS,
        modules=MODULES,
        hosts=["localhost", "example.net"],
        admins=["boss@localhost", "chief@example.net"],
    )
    await server.accounts["example.net"].register("chief", "chief-secret")
    await server.accounts["example.net"].register("dora", "dora-secret")
    boss = await login(server, "boss@localhost/console", "boss-secret")
    chief = await login(server, "chief@example.net/console", "chief-secret")

    # Each sees the commands of their own host and none of the other's.
    for client, own, other in (
        (boss, "localhost", "example.net"),
        (chief, "example.net", "localhost"),
    ):
        mine = await client.plugin["xep_0050"].get_commands(JID(own), timeout=10)
        assert {node for _, node, _ in mine["disco_items"]["items"]} == NODES
        theirs = await client.plugin["xep_0050"].get_commands(JID(other), timeout=10)
        assert theirs["disco_items"]["items"] == set()
        with pytest.raises(IqError) as refused:
            await client.execute("get-online-users-list", to=other)
        assert refused.value.condition == "forbidden"
    # ... and cannot reach the other host's accounts through their own.
    with pytest.raises(IqError) as refused:
        await boss.submit(
            "change-user-password", {"accountjid": "dora@example.net", "password": "x" * 12}
        )
    assert (refused.value.condition, app_condition(refused.value)) == ("bad-request", "bad-payload")
    assert await server.accounts["example.net"].verify_plain("dora", "dora-secret")
    online = await chief.submit("get-online-users-list", {"max_items": "none"}, to="example.net")
    assert result_values(online, "onlineuserjids") == ["chief@example.net"]
    await close(boss)
    await close(chief)


# --- accounts -----------------------------------------------------------------------


async def test_an_added_user_logs_in(start_server: StartServer) -> None:
    server = await start(start_server)
    boss = await login(server, "boss@localhost/console", "boss-secret")
    form = await boss.execute("add-user")
    fields = form["command"]["form"].get_fields()
    assert [fields[v]["type"] for v in ("accountjid", "password", "password-verify")] == [
        "jid-single",
        "text-private",
        "text-private",
    ]
    with pytest.raises(IqError) as refused:
        await boss.submit(
            "add-user",
            {"accountjid": "carol@localhost", "password": "carol pass 1", "password-verify": "x"},
        )
    assert (refused.value.condition, app_condition(refused.value)) == ("bad-request", "bad-payload")

    done = await boss.submit(
        "add-user",
        {
            "accountjid": "carol@localhost",
            "password": "carol pass 1",
            "password-verify": "carol pass 1",
        },
    )
    assert done["command"]["status"] == "completed"
    assert notes(done) == [("info", "carol@localhost was added")]
    carol = await connect(server, "carol@localhost/phone", "carol pass 1")
    await close(carol)
    with pytest.raises(IqError) as refused:
        await boss.submit(
            "add-user",
            {
                "accountjid": "carol@localhost",
                "password": "other1234",
                "password-verify": "other1234",
            },
        )
    assert refused.value.condition == "conflict"
    await close(boss)


async def test_a_changed_password_ends_the_sessions_and_only_the_new_one_works(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="xmppd")
    server = await start(start_server)
    boss = await login(server, "boss@localhost/console", "boss-secret")
    bob = await connect(server, "bob@localhost/desk", "bob-secret")

    done = await boss.submit(
        "change-user-password", {"accountjid": "bob@localhost", "password": "new bob secret"}
    )
    assert done["command"]["status"] == "completed"
    await asyncio.wait_for(bob.ended.wait(), 10)
    assert bob.stream_errors == ["not-authorized"]
    failed = await connect(server, "bob@localhost/desk", "bob-secret", expect_failure=True)
    await close(failed)
    bob = await connect(server, "bob@localhost/desk", "new bob secret")
    await close(bob)
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("xmppd")]
    assert "admin boss@localhost changed the password of bob@localhost" in logged
    assert not [line for line in logged if "new bob secret" in line]
    await close(boss)


async def test_ending_sessions_ends_one_resource_or_all(start_server: StartServer) -> None:
    server = await start(start_server)
    boss = await login(server, "boss@localhost/console", "boss-secret")
    desk = await connect(server, "bob@localhost/desk", "bob-secret")
    phone = await connect(server, "bob@localhost/phone", "bob-secret")

    done = await boss.submit("end-user-session", {"accountjids": ["bob@localhost/desk"]})
    assert notes(done) == [("info", "bob@localhost/desk: 1 session(s) ended")]
    await asyncio.wait_for(desk.ended.wait(), 10)
    assert desk.stream_errors == ["policy-violation"]
    assert not phone.ended.is_set()
    boss.send_message(mto=JID("bob@localhost/phone"), mbody="still there?", mtype="chat")
    assert (await asyncio.wait_for(phone.messages.get(), 10))["body"] == "still there?"

    await boss.submit("end-user-session", {"accountjids": ["bob@localhost"]})
    await asyncio.wait_for(phone.ended.wait(), 10)
    assert phone.stream_errors == ["policy-violation"]
    await close(boss)


async def test_a_deleted_user_leaves_nothing_behind(start_server: StartServer) -> None:
    server = await start(start_server)
    alice = await fill_every_store(server)
    zed = await person(server, "zed@localhost/laptop", "zed-secret-1")
    boss = await login(server, "boss@localhost/console", "boss-secret")

    done = await boss.submit("delete-user", {"accountjids": ["zed@localhost", "nobody@localhost"]})
    assert notes(done) == [
        ("info", "zed@localhost was deleted"),
        ("warn", "nobody@localhost does not exist"),
    ]
    await asyncio.wait_for(zed.ended.wait(), 10)
    assert zed.stream_errors == ["not-authorized"]
    await server.router.drain()
    await assert_zed_starts_empty(server, alice)
    with pytest.raises(IqError) as refused:  # an admin removes their own account in-band
        await boss.submit("delete-user", {"accountjids": ["boss@localhost"]})
    assert refused.value.condition == "not-allowed"
    assert await server.accounts["localhost"].exists("boss")
    await close(alice)
    await close(boss)


# --- who is online, and telling them ---------------------------------------------------


async def test_the_online_users_and_their_count(start_server: StartServer) -> None:
    server = await start(start_server)
    boss = await login(server, "boss@localhost/console", "boss-secret")
    alice = await connect(server, "alice@localhost/pc", "alice-secret")
    bob1 = await connect(server, "bob@localhost/desk", "bob-secret")
    bob2 = await connect(server, "bob@localhost/phone", "bob-secret")

    count = await boss.execute("get-online-users-num")
    assert result_values(count, "onlineusersnum") == ["3"]  # users, not sessions
    listed = await boss.submit("get-online-users-list", {"max_items": "none"})
    assert listed["command"]["status"] == "completed"
    assert result_values(listed, "onlineuserjids") == [
        "alice@localhost",
        "bob@localhost",
        "boss@localhost",
    ]
    first = await boss.submit("get-online-users-list", {"max_items": "25"})
    assert len(result_values(first, "onlineuserjids")) == 3

    await close(alice)
    await close(bob1)
    count = await boss.execute("get-online-users-num")
    assert result_values(count, "onlineusersnum") == ["2"]
    await close(bob2)
    await close(boss)


async def test_a_max_items_that_is_no_plain_number_is_a_bad_payload(
    start_server: StartServer,
) -> None:
    """str.isdigit() accepts "²" and digits of other scripts, and int() refuses them (and
    numbers over 4300 digits): such a value got internal-server-error and a traceback."""
    server = await start(start_server)
    boss = await login(server, "boss@localhost/console", "boss-secret")
    for value in ("\u00b2", "\u0663", "9" * 5000):
        with pytest.raises(IqError) as refused:
            await boss.submit("get-online-users-list", {"max_items": value})
        assert refused.value.condition == "bad-request", value
        assert app_condition(refused.value) == "bad-payload", value
    await close(boss)


async def test_an_announcement_reaches_every_online_session(start_server: StartServer) -> None:
    server = await start(start_server)
    boss = await login(server, "boss@localhost/console", "boss-secret")
    alice = await connect(server, "alice@localhost/pc", "alice-secret")
    bob = await connect(server, "bob@localhost/desk", "bob-secret")

    done = await boss.submit(
        "announce",
        {"subject": "Maintenance", "announcement": "Down at 22:00\nfor ten minutes"},
    )
    assert notes(done) == [("info", "the announcement went to 3 session(s)")]
    for client in (alice, bob, boss):
        message = await asyncio.wait_for(client.messages.get(), 10)
        assert (message["type"], str(message["from"])) == ("headline", "localhost")
        assert (message["subject"], message["body"]) == (
            "Maintenance",
            "Down at 22:00\nfor ten minutes",
        )
    for client in (alice, bob, boss):
        await close(client)


# --- XEP-0050's errors ----------------------------------------------------------------


async def test_a_cancelled_command_and_an_unknown_session_get_the_xeps_errors(
    start_server: StartServer,
) -> None:
    server = await start(start_server)
    boss = await login(server, "boss@localhost/console", "boss-secret")

    first = await boss.execute("add-user")
    sessionid = first["command"]["sessionid"]
    assert first["command"]["status"] == "executing" and sessionid
    cancelled = await boss.execute("add-user", action="cancel", sessionid=sessionid)
    assert (cancelled["command"]["status"], cancelled["command"]["sessionid"]) == (
        "canceled",
        sessionid,
    )
    fields = {
        "accountjid": "eve@localhost",
        "password": "eve secret",
        "password-verify": "eve secret",
    }
    with pytest.raises(IqError) as refused:
        await boss.execute(
            "add-user", action="complete", sessionid=sessionid, payload=boss.form(fields)
        )
    assert (refused.value.condition, app_condition(refused.value)) == (
        "not-allowed",
        "session-expired",
    )
    assert not await server.accounts["localhost"].exists("eve")

    with pytest.raises(IqError) as refused:
        await boss.execute("add-user", action="complete", sessionid="made-up")
    assert (refused.value.condition, app_condition(refused.value)) == (
        "bad-request",
        "bad-sessionid",
    )
    with pytest.raises(IqError) as refused:
        await boss.execute("add-user", action="jump")
    assert (refused.value.condition, app_condition(refused.value)) == (
        "bad-request",
        "malformed-action",
    )
    second = await boss.execute("add-user")
    with pytest.raises(IqError) as refused:  # the form offers "complete" only
        await boss.execute("add-user", action="prev", sessionid=second["command"]["sessionid"])
    assert (refused.value.condition, app_condition(refused.value)) == ("bad-request", "bad-action")
    with pytest.raises(IqError) as refused:
        await boss.execute("no-such-command")
    assert refused.value.condition == "item-not-found"
    await close(boss)


# --- a cluster ------------------------------------------------------------------------



async def test_commands_reach_users_on_another_node_of_a_cluster(
    start_server: StartServer, redis_service: LocalService
) -> None:
    url = devservices.redis_url(redis_service)
    a = await start(start_server, cluster={"redis_url": url, "node_name": "node-a"})
    b = await start_server(
        users={},
        modules=MODULES,
        admins=["boss@localhost"],
        cluster={"redis_url": url, "node_name": "node-b"},
    )
    boss = await login(a, "boss@localhost/console", "boss-secret")
    bob = await connect(b, "bob@localhost/desk", "bob-secret")
    alice = await connect(b, "alice@localhost/pc", "alice-secret")

    # b's sessions reach a's replica of the session table through Redis
    await until(lambda: a.router.directory.has("bob@localhost"))
    await until(lambda: a.router.directory.has("alice@localhost"))
    listed = await boss.submit("get-online-users-list", {"max_items": "none"})
    assert result_values(listed, "onlineuserjids") == [
        "alice@localhost",
        "bob@localhost",
        "boss@localhost",
    ]
    await boss.submit("announce", {"announcement": "hello cluster"})
    message = await asyncio.wait_for(bob.messages.get(), 10)
    assert (message["type"], message["body"]) == ("headline", "hello cluster")

    await boss.submit(
        "change-user-password", {"accountjid": "bob@localhost", "password": "bob on b 2"}
    )
    await asyncio.wait_for(bob.ended.wait(), 10)
    assert bob.stream_errors == ["not-authorized"]
    await boss.submit("end-user-session", {"accountjids": ["alice@localhost"]})
    await asyncio.wait_for(alice.ended.wait(), 10)
    assert alice.stream_errors == ["policy-violation"]
    await close(boss)


async def test_delete_user_on_a_cluster_cut_off_from_redis_is_refused_with_a_note(
    start_server: StartServer, redis_service: LocalService
) -> None:
    """Redis hangs: delete-user deletes nothing and says why at once, in an error note
    naming the account and the cause (see test_account_removal for xmppctl and in-band)."""
    url = devservices.redis_url(redis_service)
    a = await start(start_server, cluster={"redis_url": url, "node_name": "node-a"})
    await start_server(
        users={}, modules=MODULES, admins=["boss@localhost"],
        cluster={"redis_url": url, "node_name": "node-b"},
    )
    await until(lambda: a.cluster is not None and a.cluster.nodes == {"node-a", "node-b"})
    boss = await login(a, "boss@localhost/console", "boss-secret")
    redis_service.pause()
    try:
        done = await boss.submit("delete-user", {"accountjids": ["alice@localhost"]})
    finally:
        redis_service.resume()
    [(kind, text)] = notes(done)
    assert kind == "error"
    assert text.startswith("alice@localhost was not removed: Redis at "), text
    assert text.endswith("try again once the cluster's Redis answers")
    assert await a.accounts["localhost"].exists("alice")
    await close(boss)
