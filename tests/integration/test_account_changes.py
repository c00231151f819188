"""`xmppctl passwd` and `xmppctl unregister` against a running node take effect at once.

xmppctl is a real process that writes the stores and tells the node through
its admin API (xmppd.adminapi); the node ends the account's sessions. Runs on
the embedded and the cloud storage (where the cache is memcached, and on the
embedded one an in-process cache the xmppctl process cannot reach).
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import aiohttp
import pytest
import slixmpp

from tests.integration.clients import Client, close, connect
from tests.integration.conftest import StartServer, write_config
from xmppd.adminapi import read_token
from xmppd.cli import ctl, nodes
from xmppd.config import load_config
from xmppd.server import Server, StartupError

USERS = {"alice": "alice-secret", "carol": "carol-secret", "dave": "dave-secret"}
MODULES = {"roster": {}, "presence": {}, "offline": {}}


async def xmppctl(server: Server, *argv: str, stdin: str = "") -> tuple[int, str, str]:
    """Run the installed xmppctl on the node's own config, without blocking the node's loop."""
    exe = shutil.which("xmppctl")
    command = [exe] if exe else [sys.executable, "-m", "xmppd.cli.ctl"]
    config = server.config.source.file
    assert config is not None
    proc = await asyncio.create_subprocess_exec(
        *command, "-c", str(config), *argv,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def start_with_users(start_server: StartServer, *users: str) -> Server:
    """A node whose accounts xmppctl made, as an operator would: the node's own cache
    has then seen no write of them (a write it made itself would leave a tombstone)."""
    server = await start_server({}, modules=MODULES)
    for user in users:
        done = await xmppctl(server, "register", f"{user}@localhost", stdin=USERS[user])
        assert done[0] == 0, done
    return server


async def ended(client: Client) -> list[str]:
    """The stream errors the client got before the server closed its stream."""
    await asyncio.wait_for(client.ended.wait(), 10)
    return client.stream_errors


async def test_passwd_ends_sessions_and_the_new_password_works_at_once(
    start_server: StartServer,
) -> None:
    server = await start_with_users(start_server, "dave")
    dave = await connect(server, "dave@localhost/laptop", "dave-secret")
    phone = await connect(server, "dave@localhost/phone", "dave-secret", direct_tls=True)
    # The login above read the account: an in-process cache would now hold it.
    code, out, err = await xmppctl(server, "passwd", "dave@localhost", stdin="dave-new\n")
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == "password changed for dave@localhost"
    assert out.splitlines()[1].startswith("ended 2 session(s) on the node at http://127.0.0.1:")
    assert await ended(dave) == ["not-authorized"]
    assert await ended(phone) == ["not-authorized"]
    assert not server.router.directory.resources("dave@localhost")

    refused = await connect(server, "dave@localhost", "dave-secret", expect_failure=True)
    await close(refused)
    for mechanism in ("SCRAM-SHA-256", "PLAIN"):
        again = await connect(server, "dave@localhost", "dave-new", mechanism=mechanism)
        await close(again)


async def test_unregister_ends_the_session_and_the_account_at_once(
    start_server: StartServer,
) -> None:
    server = await start_with_users(start_server, "alice", "carol")
    alice = await connect(server, "alice@localhost/desk", "alice-secret")
    carol = await connect(server, "carol@localhost/desk", "carol-secret")
    presences: asyncio.Queue[slixmpp.Presence] = asyncio.Queue()
    alice.add_event_handler("presence", presences.put_nowait)
    carol.send_presence()
    alice.send_presence()
    alice.send_presence(pto="carol@localhost", ptype="subscribe")  # carol's client approves

    async def presence_from_carol(type_: str) -> None:
        async with asyncio.timeout(10):
            while True:
                presence = await presences.get()
                if presence["from"] == "carol@localhost/desk" and presence["type"] == type_:
                    return

    await presence_from_carol("available")

    code, out, err = await xmppctl(server, "unregister", "carol@localhost")
    assert (code, err) == (0, "")
    assert "ended 1 session(s) on the node at http://" in out
    assert out.endswith("unregistered carol@localhost\n")
    assert await ended(carol) == ["not-authorized"]
    await presence_from_carol("unavailable")  # the goodbye went out as for any ended session

    refused = await connect(server, "carol@localhost", "carol-secret", expect_failure=True)
    await close(refused)
    await close(alice)


async def test_unregister_waiting_for_a_slow_node_says_so_and_never_removes_twice(
    start_server: StartServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The node's removal outlasts what xmppctl waits (cut to 1 s here; the real
    REMOVAL_TIMEOUT outlasts every wait the node bounds): xmppctl says which node it
    waits for, then fails saying the node may still be removing the account. It does
    not remove it from the stores itself beside the node, nor ask another node."""
    server = await start_with_users(start_server, "carol")
    hold, entered, finished = asyncio.Event(), asyncio.Event(), asyncio.Event()
    remove_user_data = server.modules.remove_user_data

    async def slow_remove_user_data(vhost: str, username: str) -> bool:
        entered.set()
        await hold.wait()
        try:
            return await remove_user_data(vhost, username)
        finally:
            finished.set()

    monkeypatch.setattr(server.modules, "remove_user_data", slow_remove_user_data)
    monkeypatch.setattr(nodes, "REMOVAL_TIMEOUT", 1.0)
    monkeypatch.setattr(nodes, "WAIT_NOTICE_AFTER", 0.0)
    argv = ["-c", str(server.config.source.file), "unregister", "carol@localhost"]
    url = server.admin.url
    try:
        code = await asyncio.to_thread(ctl.main, argv)  # its own loop: the node's runs on
        out, err = capsys.readouterr()
        assert (code, out) == (1, ""), err
        assert err.splitlines() == [
            f"xmppctl: waiting for the node at {url} to remove carol@localhost (up to 1 s)",
            f"xmppctl: the node at {url} was asked to remove carol@localhost but did not "
            "answer within 1 s; it may still be removing it: run unregister again to finish",
        ]
        assert entered.is_set() and not finished.is_set()  # the node's removal goes on
    finally:
        hold.set()
    await asyncio.wait_for(finished.wait(), 10)
    assert not await server.accounts["localhost"].exists("carol")
    assert await asyncio.to_thread(ctl.main, argv) == 1
    assert capsys.readouterr().err.endswith("\nxmppctl: carol@localhost does not exist\n")


async def test_admin_api_needs_the_token(server: Server, tmp_path: Path) -> None:
    url = server.admin.url
    token = read_token(server.config.data_dir)
    assert (server.config.data_dir / "admin" / "token").stat().st_mode & 0o777 == 0o600
    records = list((server.config.data_dir / "admin").glob("*.json"))
    assert len(records) == 1 and records[0].stat().st_mode & 0o777 == 0o600
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
            async with http.get(f"{url}/status", headers=headers) as response:
                assert response.status == 401
            async with http.post(
                f"{url}/accounts/alice@localhost/removed", headers=headers
            ) as response:
                assert response.status == 401
        good = {"Authorization": f"Bearer {token}"}
        async with http.get(f"{url}/status", headers=good) as response:
            assert response.status == 200
            status = await response.json()
        assert status["hosts"] == ["localhost"] and status["sessions"] == 0
        async with http.post(f"{url}/accounts/nobody@elsewhere/removed", headers=good) as r:
            assert r.status == 404
    await server.stop()
    assert not list((server.config.data_dir / "admin").glob("*.json"))  # removed at clean stop


async def test_a_token_file_too_short_to_be_a_secret_stops_the_start(tmp_path: Path) -> None:
    """An operator's empty (or short) token file would let `Authorization: Bearer` with
    nothing through: the node refuses to start and names the file."""
    path = write_config(tmp_path)
    admin = tmp_path / "data" / "admin"
    admin.mkdir(parents=True, mode=0o700)
    (admin / "token").write_text("\n")
    (admin / "token").chmod(0o600)
    server = Server(load_config(path))
    with pytest.raises(StartupError, match=f"{admin / 'token'} holds 0 characters"):
        await server.start()
    for listener in server.listening:  # the start was undone: nothing accepts clients
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", listener.port)


async def test_reasons_xml_cannot_carry_are_refused_before_anything_changes(
    server: Server,
) -> None:
    """A kick or ban reason goes into the stream error that ends each session (and a
    ban's into every later refused login): one with a control character is refused
    with 400, and the session goes on, rather than a 500 halfway through."""
    bob = await connect(server, "bob@localhost/desk", "bob-secret")
    good = {"Authorization": f"Bearer {read_token(server.config.data_dir)}"}
    async with aiohttp.ClientSession(headers=good) as http:
        async with http.post(
            f"{server.admin.url}/kick", json={"jid": "bob@localhost", "reason": "bye\x07"}
        ) as response:
            assert response.status == 400
            assert "XML cannot carry" in (await response.json())["error"]
        async with http.post(
            f"{server.admin.url}/accounts/bob@localhost/ban", json={"reason": "\x00"}
        ) as response:
            assert response.status == 400
    with pytest.raises(ValueError, match="XML cannot carry"):
        await server.accounts["localhost"].ban("bob", "spam\x1b")
    assert await server.accounts["localhost"].ban_of("bob") is None
    assert not bob.ended.is_set()
    await close(bob)
