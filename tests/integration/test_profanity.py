"""Profanity in tmux in a multi-user chat room, with a slixmpp occupant beside it:
what each sees of the other, on the server's side (slixmpp's stanzas) and on
profanity's screen."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from slixmpp import JID

import tests.integration.profanity as profanity_module
from tests.integration.clients import close
from tests.integration.conftest import StartServer, port_of
from tests.integration.profanity import Profanity, log_in, start_profanity
from tests.integration.test_muc import MODULES, USERS, chatter, create_room
from tests.integration.test_muc import ROOM as LOBBY  # the room create_room makes
from tests.storage.services import unavailable
from xmppd.server import Server
from xmppd.tls import self_signed_paths

pytestmark = pytest.mark.timeout(90)

ROOM = JID("tui@conference.localhost")


async def trusted_folder(server: Server, folder: Path) -> Path:
    """An OpenSSL hashed folder holding the server's certificate, for `/tls certpath`."""
    openssl = shutil.which("openssl")
    if openssl is None:
        unavailable("openssl is not installed")
    certificate = self_signed_paths(server.config.data_dir)[0]
    await asyncio.to_thread(folder.mkdir)
    await asyncio.to_thread(shutil.copy, certificate, folder / "xmppd.pem")
    rehash = await asyncio.create_subprocess_exec(openssl, "rehash", str(folder))
    assert await asyncio.wait_for(rehash.wait(), 10) == 0
    return folder


@pytest.fixture
async def profanity(tmp_path: Path) -> AsyncIterator[Callable[[], Awaitable[Profanity]]]:
    clients: list[Profanity] = []

    async def start() -> Profanity:
        client = await start_profanity(tmp_path / f"profanity-{len(clients)}")
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.close()


async def test_profanity_joins_talks_and_sets_the_subject(
    start_server: StartServer, profanity: Callable[[], Awaitable[Profanity]], tmp_path: Path
) -> None:
    server = await start_server(users=USERS, modules=MODULES)
    alice = await profanity()
    await log_in(
        alice,
        "alice@localhost",
        USERS["alice"],
        port_of(server, "starttls"),
        await trusted_folder(server, tmp_path / "ca"),
    )

    await alice.type("/presence room online")  # show who joins and leaves (off by default)
    await alice.shows("Only join/leave presence updates will appear in chat room windows.")
    # A new room: profanity shows it locked; accepting the defaults makes it instant.
    await alice.type(f"/join {ROOM} nick Alice")
    await alice.shows("You have joined the room as Alice, role: moderator, affiliation: owner")
    await alice.shows("Room locked, requires configuration.")
    await alice.type("/room accept")
    await alice.shows("Room unlocked.")

    bob = await chatter(server, "bob@localhost/phone")  # slixmpp
    _own, _subject, occupants, _history = await bob.muc.join_muc_wait(ROOM, "Bob", timeout=10)
    assert sorted(p["from"].resource for p in occupants) == ["Alice", "Bob"]
    await alice.shows("Bob has joined the room")

    bob.send_message(mto=ROOM, mbody="hi from slixmpp", mtype="groupchat")
    assert (await bob.said())["body"] == "hi from slixmpp"  # the room's reflection
    await alice.shows("Bob: hi from slixmpp")

    await alice.type("hello from profanity")
    heard = await bob.said()
    assert (heard["from"], heard["body"]) == (JID(f"{ROOM}/Alice"), "hello from profanity")
    await alice.shows("Alice: hello from profanity")  # the room's reflection

    assert not (await asyncio.wait_for(bob.subjects.get(), 10))["subject"]  # his join's
    await alice.type("/subject set Terminal talk")
    subject = await asyncio.wait_for(bob.subjects.get(), 10)
    assert (subject["from"], subject["subject"]) == (JID(f"{ROOM}/Alice"), "Terminal talk")
    await alice.shows("Alice has set the room subject: Terminal talk")
    await close(bob)
    await alice.shows("Bob has left the room")


async def test_profanity_joins_a_room_with_history_and_changes_nick(
    start_server: StartServer, profanity: Callable[[], Awaitable[Profanity]], tmp_path: Path
) -> None:
    """The other way round: a slixmpp owner's room with a subject and history, which
    profanity shows on joining as a participant; its nick change reaches slixmpp
    (status 303), and its subject change is refused as the room's default says."""
    server = await start_server(users=USERS, modules=MODULES)
    bob = await chatter(server, "bob@localhost/phone")  # slixmpp
    await create_room(bob, "Bob", roomname="Plans")
    assert not (await asyncio.wait_for(bob.subjects.get(), 10))["subject"]  # his join's
    bob.muc.set_subject(LOBBY, "Weekend plans")
    assert (await asyncio.wait_for(bob.subjects.get(), 10))["subject"] == "Weekend plans"
    for line in ("first idea", "second idea"):
        bob.send_message(mto=LOBBY, mbody=line, mtype="groupchat")
        await bob.said()

    alice = await profanity()
    await log_in(
        alice,
        "alice@localhost",
        USERS["alice"],
        port_of(server, "starttls"),
        await trusted_folder(server, tmp_path / "ca"),
    )
    await alice.type(f"/join {LOBBY} nick Alice")
    await alice.shows("You have joined the room as Alice, role: participant, affiliation: none")
    await alice.shows("Bob has set the room subject: Weekend plans")  # at the join
    screen = await alice.shows("Bob: second idea")
    assert screen.index("Bob: first idea") < screen.index("Bob: second idea")
    await bob.presence_of("Alice")

    await alice.type("/nick Ally")
    gone = await bob.presence_of("Alice", "unavailable")
    assert 303 in gone["muc"]["status_codes"] and gone["muc"]["item_nick"] == "Ally"
    await bob.presence_of("Ally")
    await alice.shows("Ally")  # in its occupants list (it prints no line for its own change)
    await alice.type("still me")
    heard = await bob.said()
    assert (heard["from"], heard["body"]) == (JID(f"{LOBBY}/Ally"), "still me")

    await alice.type("/subject set Mine now")
    await alice.shows(f"Error from {LOBBY}")  # profanity prints the error's text
    bob.send_message(mto=LOBBY, mbody="subject unchanged?", mtype="groupchat")
    await bob.said()  # anything sent before it has arrived: no subject change came
    assert bob.subjects.empty()
    await close(bob)


async def test_a_profanity_that_never_starts_leaves_no_tmux_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """start_profanity timing out (a profanity that shows no banner) closes its tmux
    server: the caller never got the client, so nothing else would."""
    if shutil.which("tmux") is None:
        unavailable("tmux is not installed (bash .ci/services.sh installs it)")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "profanity").write_text("#!/bin/sh\nexec sleep 60\n")
    (fake / "profanity").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    monkeypatch.setattr(profanity_module, "TIMEOUT", 0.5)
    folder = tmp_path / "p"
    with pytest.raises(TimeoutError):
        await start_profanity(folder)
    tmux = await asyncio.create_subprocess_exec(
        "tmux", "-S", str(folder / "tmux.sock"), "list-sessions",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    assert await asyncio.wait_for(tmux.wait(), 10) != 0  # no server on that socket
