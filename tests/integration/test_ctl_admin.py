"""xmppctl's everyday commands (xmppd.cli.ctl_admin) as an operator runs them.

xmppctl runs with the node's configuration file: as the real command for the
ban, else its main() in a thread of its own (`ctl`). With a node running (in
this process, real slixmpp clients on it) the commands go through its admin
API; without one, they work on the stores, and a node started afterwards sees
what they did. Each test runs on the embedded and the cloud storage.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import stat
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import slixmpp

from tests.integration.clients import HEADER, Client, RawClient, close, connect, insecure_context
from tests.integration.conftest import StartServer, port_of, unwritable_dir, write_config
from tests.integration.test_account_changes import xmppctl
from tests.integration.test_bad_input import plain_as
from tests.integration.test_cluster import online, seen_on, two_nodes, until
from tests.integration.test_cluster_modules import has_state
from xmppd.adminapi import read_token
from xmppd.cli.ctl import main
from xmppd.modules.roster import RosterModule
from xmppd.server import Server
from xmppd.storage.devservices import LocalService

WAIT = 10


async def ctl(where: Server | Path, *argv: str, stdin: str = "") -> tuple[int, str, str]:
    """xmppctl's main() on the node's configuration file (or `where`), in a thread
    with its own event loop as in its own process, so that the node in this loop
    keeps serving; its exit code and output. The same code as the command without
    a second or two of imports per call (the command itself: `xmppctl`, used for
    the ban)."""
    path = where.config.source.file if isinstance(where, Server) else where
    assert path is not None

    def run() -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        stdin_was, sys.stdin = sys.stdin, io.StringIO(stdin)
        try:
            with redirect_stdout(out), redirect_stderr(err):
                code = main(["-c", str(path), *argv])
        finally:
            sys.stdin = stdin_was
        return code, out.getvalue(), err.getvalue()

    return await asyncio.to_thread(run)


async def failed_login(server: Server, jid: str, password: str) -> str:
    """The SASL failure condition a login with these credentials gets."""
    client = Client(jid, password)
    conditions: list[str] = []
    client.add_event_handler("failed_auth", lambda failure: conditions.append(failure["condition"]))
    client.ssl_context = insecure_context()
    client.enable_plaintext = False
    client.connect("127.0.0.1", port_of(server, "starttls"))
    await asyncio.wait_for(client.auth_failed.wait(), WAIT)
    await close(client)
    return conditions[0]


async def test_ban_ends_the_session_refuses_the_login_and_unban_lets_it_in(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    server = await start_server()
    alice = await connect(server, "alice@localhost/desk", "alice-secret")
    bob = await connect(server, "bob@localhost/desk", "bob-secret")

    code, out, err = await xmppctl(server, "ban", "alice@localhost", "spamming")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "banned alice@localhost (spamming)"
    assert lines[1].startswith("ended 1 session(s) on the node at http://127.0.0.1:")
    await asyncio.wait_for(alice.ended.wait(), WAIT)
    assert alice.stream_errors == ["policy-violation"]
    assert not bob.ended.is_set()
    assert "admin: alice@localhost banned (spamming): ended 1 session(s)" in caplog.text

    # The right password is refused as a disabled account (RFC 6120 6.5.1), not as
    # wrong credentials; the account and its data stay.
    assert await failed_login(server, "alice@localhost", "alice-secret") == "account-disabled"
    [refused] = [r for r in caplog.records if "refused the login of alice@" in r.getMessage()]
    assert getattr(refused, "event", None) == "login-refused"
    assert refused.getMessage().endswith(f" conn={getattr(refused, 'conn', None)}")
    assert await server.accounts["localhost"].exists("alice")

    code, out, err = await ctl(server, "unban", "alice@localhost")
    assert (code, out, err) == (0, "unbanned alice@localhost\n", "")
    assert "admin: alice@localhost unbanned" in caplog.text
    code, out, err = await ctl(server, "register", "carol@localhost", stdin="carol-secret\n")
    assert (code, out, err) == (0, "registered carol@localhost\n", "")
    assert "admin: carol@localhost registered" in caplog.text
    again = await connect(server, "alice@localhost/desk", "alice-secret")
    code, _, err = await ctl(server, "unban", "alice@localhost")
    assert code == 1 and "alice@localhost is not banned" in err
    code, out, err = await xmppctl(server, "ban", "nobody@localhost")
    assert (code, out, err) == (1, "", "xmppctl: nobody@localhost does not exist\n")
    for client in (again, bob):
        await close(client)


async def proxied(server: Server, bind: bool) -> RawClient:
    """A stream authenticated with admin's credentials acting as bob (auth.proxy_auth),
    with bob's resource bound or not yet."""
    raw = await RawClient.open(server)
    await raw.send(HEADER)
    await raw.read_until(b"</stream:features>")
    await raw.send(plain_as("bob@localhost", "admin", "admin-secret"))
    await raw.read_until(b"<success")
    await raw.send(HEADER)
    await raw.read_until(b"</stream:features>")
    if bind:
        await raw.send(
            "<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>"
        )
        assert b"<jid>bob@localhost/" in await raw.read_until(b"</iq>")
    return raw


async def test_ban_of_a_proxy_account_ends_the_streams_its_credentials_opened(
    start_server: StartServer,
) -> None:
    """A stream that authenticated as admin and acts as bob is admin's doing: banning
    admin must end it, as banning bob would, or the banned credentials go on acting."""
    server = await start_server(
        users={"admin": "admin-secret", "bob": "bob-secret"},
        auth={"proxy_auth": ["admin@localhost"]},
    )
    streams = [await proxied(server, bind=True), await proxied(server, bind=False)]
    bob = await connect(server, "bob@localhost/own", "bob-secret")  # bob's own login
    code, out, err = await xmppctl(server, "ban", "admin@localhost", "leaked")
    assert (code, err) == (0, "")
    assert "ended 2 session(s)" in out
    for raw in streams:
        assert b"<policy-violation" in await raw.read_to_close()
        raw.writer.close()
    assert not bob.ended.is_set()
    await close(bob)


async def test_announce_reaches_every_online_session_of_the_host(
    start_server: StartServer,
) -> None:
    server = await start_server()
    clients = [
        await connect(server, "alice@localhost/desk", "alice-secret"),
        await connect(server, "bob@localhost/desk", "bob-secret"),
        await connect(server, "bob@localhost/phone", "bob-secret", direct_tls=True),
    ]
    code, out, err = await ctl(
        server, "announce", "localhost", "down at 10:00 for an upgrade", "--subject", "Upgrade"
    )
    assert (code, err) == (0, "")
    assert re.fullmatch(r"sent to 3 session\(s\) through the node at http://[\d.:]+\n", out)
    for client in clients:
        message: slixmpp.Message = await asyncio.wait_for(client.messages.get(), WAIT)
        assert message["from"] == "localhost"
        assert message["to"] == client.boundjid
        assert message["type"] == "headline"
        assert (message["subject"], message["body"]) == ("Upgrade", "down at 10:00 for an upgrade")
    code, _, err = await ctl(server, "announce", "elsewhere.example", "hi")
    assert code == 1 and "elsewhere.example is not a host of this server" in err
    for client in clients:
        await close(client)


async def test_announce_refuses_text_xml_cannot_carry_before_sending_any(
    start_server: StartServer,
) -> None:
    server = await start_server()
    alice = await connect(server, "alice@localhost/desk", "alice-secret")
    for argv in (["bell\x07"], ["hi", "--subject", "\x1b[31mred"]):
        code, out, err = await ctl(server, "announce", "localhost", *argv)
        assert (code, out) == (1, ""), argv
        assert "characters XML cannot carry" in err, err
    code, out, err = await ctl(server, "announce", "localhost", "still here")
    assert code == 0, err
    message: slixmpp.Message = await asyncio.wait_for(alice.messages.get(), WAIT)
    assert message["body"] == "still here"  # the first one that went out
    await close(alice)


async def test_user_data_through_a_running_node_reaches_the_online_client(
    start_server: StartServer,
) -> None:
    server = await start_server()
    alice = await connect(server, "alice@localhost/desk", "alice-secret")
    pushes: asyncio.Queue[slixmpp.Iq] = asyncio.Queue()
    alice.add_event_handler(
        "roster_update", lambda iq: pushes.put_nowait(iq) if iq["type"] == "set" else None
    )
    await alice.get_roster(timeout=WAIT)

    code, out, err = await ctl(
        server, "roster-set", "alice@localhost", "carol@example.org", "--name", "Carol",
        "--group", "Work", "--group", "Friends", "--subscription", "to",
    )
    assert (code, out, err) == (0, "carol@example.org\tto\tCarol\tWork,Friends\t-\n", "")
    push = await asyncio.wait_for(pushes.get(), WAIT)
    item = push["roster"]["items"]["carol@example.org"]
    assert (item["name"], item["subscription"], set(item["groups"])) == (
        "Carol", "to", {"Work", "Friends"}
    )
    code, out, err = await ctl(server, "roster", "alice@localhost")
    assert (code, out, err) == (0, "carol@example.org\tto\tCarol\tWork,Friends\t-\n", "")

    code, out, err = await ctl(server, "roster-remove", "alice@localhost", "carol@example.org")
    assert (code, err) == (0, "")
    assert out == "removed carol@example.org from the roster of alice@localhost\n"
    push = await asyncio.wait_for(pushes.get(), WAIT)
    assert push["roster"]["items"]["carol@example.org"]["subscription"] == "remove"
    code, _, err = await ctl(server, "roster-remove", "alice@localhost", "carol@example.org")
    assert code == 1 and "item-not-found" in err

    # vCard: what xmppctl stores is what the client reads
    vcard = server.config.data_dir.parent / "alice.vcf"
    vcard.write_text("<vCard xmlns='vcard-temp'><FN>Alice Liddell</FN></vCard>")
    code, out, err = await ctl(server, "vcard-set", "alice@localhost", str(vcard))
    assert (code, out, err) == (0, "stored the vCard of alice@localhost\n", "")
    alice.register_plugin("xep_0054")
    got = await alice.plugin["xep_0054"].get_vcard("alice@localhost", cached=False, timeout=WAIT)
    assert got["vcard_temp"]["FN"] == "Alice Liddell"
    code, out, _ = await ctl(server, "vcard", "alice@localhost")
    assert code == 0 and "<FN>Alice Liddell</FN>" in out
    vcard.write_text("<vCard xmlns='vcard-temp'>stray text</vCard>")
    code, _, err = await ctl(server, "vcard-set", "alice@localhost", str(vcard))
    assert code == 1 and "bad-request" in err

    # offline messages wait for bob, who is not online
    alice.send_message(mto="bob@localhost", mbody="are you there?", mtype="chat")
    alice.send_message(mto="bob@localhost", mbody="call me", mtype="chat")
    # answered after the node took the messages (a session's stanzas are handled in
    # order); then the work they started (storing them) is awaited
    await alice.plugin["xep_0054"].get_vcard("alice@localhost", cached=False, timeout=WAIT)
    while pending := server.router.pending():
        await asyncio.wait(pending)
    code, out, err = await ctl(server, "offline-count", "bob@localhost")
    assert (code, out, err) == (0, "2\n", "")
    await close(alice)


async def test_roster_set_refuses_a_name_or_group_xml_cannot_carry(
    start_server: StartServer,
) -> None:
    """A control character (or an undecodable byte of the command line) stored in a roster
    item would make every later roster answer to the account fail."""
    server = await start_server()
    for option in (["--name", "a\x01b"], ["--group", "g\x1b"], ["--name", "\udcff"]):
        code, out, err = await ctl(server, "roster-set", "alice@localhost", "bob@localhost",
                                   *option)
        assert (code, out) == (1, ""), option
        assert "characters XML cannot carry" in err, err
        assert "did not answer" not in err
    alice = await connect(server, "alice@localhost/desk", "alice-secret")
    await alice.get_roster(timeout=WAIT)
    assert list(alice.client_roster.keys()) == []
    await close(alice)


async def test_vcard_set_refuses_a_doctype_which_would_leave_the_vcard_unreadable(
    start_server: StartServer,
) -> None:
    """Entities are not expanded: the stored vCard would keep a reference to an entity
    its own copy no longer declares, and every later read of it would fail."""
    server = await start_server()
    vcard = server.config.data_dir.parent / "alice.vcf"
    vcard.write_text(
        '<!DOCTYPE vCard [<!ENTITY name "Alice">]>'
        "<vCard xmlns='vcard-temp'><FN>&name;</FN></vCard>"
    )
    code, out, err = await ctl(server, "vcard-set", "alice@localhost", str(vcard))
    assert (code, out) == (1, "")
    assert "DOCTYPE" in err, err
    code, _, err = await ctl(server, "vcard", "alice@localhost")
    assert code == 1 and "alice@localhost has no vCard" in err


async def test_status_and_stats_of_a_running_node(start_server: StartServer) -> None:
    server = await start_server()
    alice = await connect(server, "alice@localhost/desk", "alice-secret")
    bob = await connect(server, "bob@localhost/desk", "bob-secret")
    code, out, err = await ctl(server, "status")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert re.fullmatch(r"node http://127\.0\.0\.1:\d+ \(pid \d+\)", lines[0])
    assert re.fullmatch(r"  version   \d+\.\d+.*", lines[1])
    assert re.fullmatch(r"  uptime    \d\d:\d\d:\d\d", lines[2])
    assert lines[3] == "  hosts     localhost"
    assert lines[4].startswith("  storage   items: ") and "blobs: " in lines[4]
    assert lines[5] == "  sessions  2 (2 connections)"

    stats = asyncio.ensure_future(ctl(server, "stats", "--window", "1"))
    while not stats.done():  # traffic while stats measures
        alice.send_message(mto="bob@localhost/desk", mbody="tick", mtype="chat")
        await asyncio.sleep(0.02)
    code, out, err = stats.result()
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[1] == "  sessions  2 (2 connections)"
    rates = re.fullmatch(
        r"  stanzas   ([\d.]+)/s routed, ([\d.]+)/s messages from clients "
        r"\(over the last [\d.]+ s\)",
        lines[2],
    )
    assert rates is not None and float(rates[2]) > 0 and float(rates[1]) >= float(rates[2])
    assert [line.split()[0] for line in lines[3:6]] == ["items", "blobs", "cache"]
    assert all("since start" in line for line in lines[3:6])
    for client in (alice, bob):
        await close(client)


async def test_every_command_without_a_running_node(
    start_server: StartServer, storage_section: dict[str, Any] | None, tmp_path: Path
) -> None:
    path = write_config(tmp_path, **({"storage": storage_section} if storage_section else {}))

    async def run(*argv: str, stdin: str = "") -> tuple[int, str, str]:
        return await ctl(path, *argv, stdin=stdin)

    for user in ("alice", "bob"):
        done = await run("register", f"{user}@localhost", stdin=f"{user}-secret\n")
        assert done[0] == 0, done

    code, out, err = await run("status")
    assert code == 0, err
    assert "no node is running on this machine" in out
    assert "  localhost\t2 account(s)" in out.splitlines()
    code, _, err = await run("stats")
    assert code == 1 and "no node is running" in err
    code, out, err = await run("announce", "localhost", "hello")
    assert (code, err) == (0, "") and "nobody is online, nothing was sent" in out

    code, out, err = await run(
        "roster-set", "alice@localhost", "bob@localhost", "--name", "Bob", "--group", "Family"
    )
    assert (code, out, err) == (0, "bob@localhost\tnone\tBob\tFamily\t-\n", "")
    code, out, err = await run("roster-set", "alice@localhost", "dave@localhost")
    assert (code, out) == (0, "dave@localhost\tnone\t-\t-\t-\n"), err
    code, out, err = await run("roster-remove", "alice@localhost", "dave@localhost")
    assert code == 0, err
    code, out, err = await run("roster", "alice@localhost")
    assert (code, out) == (0, "bob@localhost\tnone\tBob\tFamily\t-\n"), err
    vcard = tmp_path / "bob.vcf"
    vcard.write_text("<vCard xmlns='vcard-temp'><NICKNAME>bobby</NICKNAME></vCard>")
    code, _, err = await run("vcard-set", "bob@localhost", str(vcard))
    assert code == 0, err
    code, out, err = await run("vcard", "bob@localhost")
    assert code == 0 and "<NICKNAME>bobby</NICKNAME>" in out, err
    code, _, err = await run("vcard", "alice@localhost")
    assert code == 1 and "alice@localhost has no vCard" in err
    code, out, err = await run("offline-count", "bob@localhost")
    assert (code, out) == (0, "0\n"), err
    code, _, err = await run("roster", "nobody@localhost")
    assert code == 1 and "nobody@localhost does not exist" in err
    code, out, err = await run("ban", "bob@localhost", "on holiday")
    assert (code, out, err) == (0, "banned bob@localhost (on holiday)\n", "")

    # A node started now serves what xmppctl stored: the roster, the vCard, the ban.
    server = await start_server({})
    roster = server.modules.module(RosterModule)
    assert [i.name for i in (await roster.get("alice@localhost")).items.values()] == ["Bob"]
    assert await failed_login(server, "bob@localhost", "bob-secret") == "account-disabled"
    alice = await connect(server, "alice@localhost/desk", "alice-secret")
    await close(alice)


async def test_status_fails_only_when_the_stores_cannot_be_opened(tmp_path: Path) -> None:
    path = write_config(tmp_path, data_dir=str(unwritable_dir(tmp_path) / "data"))
    code, out, err = await ctl(path, "status")
    assert (code, out) == (1, "")
    assert "no node is running on this machine" in err
    assert "and the stores cannot be opened: " in err


async def test_the_new_routes_need_the_token_and_the_api_is_on_loopback(server: Server) -> None:
    assert server.config.admin.address == "127.0.0.1"  # the default: never a public address
    assert server.admin.url.startswith("http://127.0.0.1:")
    token = read_token(server.config.data_dir)
    account = f"{server.admin.url}/accounts/alice@localhost"
    requests: list[tuple[str, str, dict[str, Any] | None]] = [
        ("GET", f"{server.admin.url}/stats", None),
        ("POST", f"{server.admin.url}/announce", {"host": "localhost", "body": "hi"}),
        ("POST", f"{account}/ban", {"reason": "test"}),
        ("GET", f"{account}/roster", None),
        ("PUT", f"{account}/roster/bob@localhost", {"name": "Bob"}),
        ("DELETE", f"{account}/roster/bob@localhost", None),
        ("GET", f"{account}/vcard", None),
        ("PUT", f"{account}/vcard", {"vcard": "<vCard xmlns='vcard-temp'><FN>A</FN></vCard>"}),
        ("GET", f"{account}/offline", None),
    ]
    async with aiohttp.ClientSession() as http:
        for method, url, body in requests:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
                async with http.request(method, url, json=body, headers=headers) as response:
                    assert response.status == 401, (method, url, headers)
            good = {"Authorization": f"Bearer {token}"}
            async with http.request(method, url, json=body, headers=good) as response:
                assert response.status == 200, (method, url, await response.text())
        good = {"Authorization": f"Bearer {token}"}
        nobody = f"{server.admin.url}/accounts/nobody@localhost/roster"
        async with http.get(nobody, headers=good) as response:
            assert response.status == 400
            assert (await response.json())["error"] == "nobody@localhost does not exist"
    # /ban only ends the sessions: the ban itself is xmppctl's write to the account store
    assert await server.accounts["localhost"].ban_of("alice") is None


async def test_the_metrics_token_reads_metrics_and_status_and_nothing_else(
    server: Server,
) -> None:
    """What Prometheus is given: it may read counts, not end sessions or read rosters."""
    path = server.config.data_dir / "admin" / "metrics-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    metrics_token = read_token(server.config.data_dir, "metrics-token")
    assert metrics_token != read_token(server.config.data_dir)
    base, account = server.admin.url, f"{server.admin.url}/accounts/alice@localhost"
    headers = {"Authorization": f"Bearer {metrics_token}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        for url in (f"{base}/metrics", f"{base}/status"):
            async with http.get(url) as response:
                assert response.status == 200, url
        for method, url, body in [
            ("GET", f"{base}/sessions", None),
            ("GET", f"{base}/stats", None),
            ("GET", f"{account}/roster", None),
            ("POST", f"{base}/kick", {"jid": "alice@localhost"}),
            ("POST", f"{account}/removed", None),
            ("POST", f"{base}/reload", None),
            ("POST", f"{base}/metrics", None),
        ]:
            async with http.request(method, url, json=body) as response:
                assert response.status == 401, (method, url)


async def test_a_vcard_that_is_not_unicode_text_is_a_clear_refusal(server: Server) -> None:
    """JSON can carry a lone surrogate; the node answered it with a 500 and a traceback."""
    token = read_token(server.config.data_dir)
    url = f"{server.admin.url}/accounts/alice@localhost/vcard"
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        body = '{"vcard": "<vCard xmlns=\'vcard-temp\'><FN>\\udcff</FN></vCard>"}'
        async with http.put(url, data=body, headers=headers) as response:
            assert response.status == 400
            assert "not well-formed XML" in (await response.json())["error"]


async def test_ban_announce_and_roster_set_reach_sessions_on_another_cluster_node(
    redis_service: LocalService, start_server: StartServer
) -> None:
    """xmppctl reaches node A only (B's record is gone, as for a node on another
    machine); the sessions on B are ended, announced to and pushed to all the same."""
    a, b = await two_nodes(start_server, redis_service)
    for record in (b.config.data_dir / "admin").glob("*.json"):
        if b.admin.url in record.read_text():
            record.unlink()
    alice = await online(b, "alice@localhost/far", "alice-secret")
    bob = await online(b, "bob@localhost/far", "bob-secret")
    pushes: asyncio.Queue[slixmpp.Iq] = asyncio.Queue()
    bob.add_event_handler(
        "roster_update", lambda iq: pushes.put_nowait(iq) if iq["type"] == "set" else None
    )
    await bob.get_roster(timeout=WAIT)
    await until(seen_on(a, "alice@localhost/far"))
    await until(has_state(a, "bob@localhost/far", "roster/interested"))

    code, out, err = await ctl(a, "status")
    assert code == 0, err
    assert out.count("\nnode http://") + out.startswith("node http://") == 1
    assert "cluster: 2 node(s), 2 session(s)" in out

    code, out, err = await ctl(a, "announce", "localhost", "cluster-wide")
    assert (code, err) == (0, "") and out.startswith("sent to 2 session(s) through the node at")
    for client in (alice, bob):
        message = await asyncio.wait_for(client.messages.get(), WAIT)
        assert (message["from"], message["body"]) == ("localhost", "cluster-wide")

    code, out, err = await ctl(a, "roster-set", "bob@localhost", "dave@localhost", "--name", "D")
    assert (code, err) == (0, "")
    push = await asyncio.wait_for(pushes.get(), WAIT)
    assert push["roster"]["items"]["dave@localhost"]["name"] == "D"

    code, out, err = await ctl(a, "ban", "alice@localhost")
    assert (code, err) == (0, "")
    await asyncio.wait_for(alice.ended.wait(), WAIT)
    assert alice.stream_errors == ["policy-violation"]
    assert await failed_login(b, "alice@localhost", "alice-secret") == "account-disabled"
    await close(bob)
