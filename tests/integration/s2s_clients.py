"""slixmpp users on both sides of a federation test (xmppd and a real peer server)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest
import slixmpp

from tests.integration.clients import Client, close, insecure_context
from tests.integration.conftest import port_of
from tests.integration.s2s_peers import Prosody
from xmppd.server import Server


class Peer(Client):
    """A slixmpp client that also records presences, subscription requests included."""

    def __init__(self, jid: str, password: str) -> None:
        super().__init__(jid, password)
        self.register_plugin("xep_0054")  # vCard queries across servers
        self.available: asyncio.Queue[slixmpp.Presence] = asyncio.Queue()
        self.add_event_handler("presence_available", self.available.put_nowait)
        self.errors: asyncio.Queue[slixmpp.Message] = asyncio.Queue()
        self.add_event_handler("message_error", self.errors.put_nowait)
        # The subscription states the server pushed (RFC 6121 2.1.6), latest last.
        self.pushed: dict[str, str] = {}
        self.pushes = asyncio.Event()
        self.add_event_handler("roster_update", self._on_push)

    def _on_push(self, iq: slixmpp.Iq) -> None:
        for jid, item in iq["roster"]["items"].items():
            self.pushed[str(jid)] = item["subscription"]
        self.pushes.set()

    async def subscription_both(self, contact: str) -> None:
        """Wait until the server pushed the roster item of `contact` as 'both'."""
        while self.pushed.get(contact) != "both":
            self.pushes.clear()
            await self.pushes.wait()

    async def presence_from(self, bare: str) -> None:
        """Wait for an available presence from `bare` (those from others go)."""
        while (await self.available.get())["from"].bare != bare:
            pass


async def subscribed(asker: Peer, asked: Peer, timeout: float = 20) -> None:
    """`asker` asks `asked` for a presence subscription, which slixmpp approves and asks
    back (auto_authorize, auto_subscribe): wait until each server pushed the other's
    roster item as 'both'."""
    mine, theirs = asker.boundjid.bare, asked.boundjid.bare
    asker.send_presence(pto=theirs, ptype="subscribe")
    try:
        await asyncio.wait_for(asker.subscription_both(theirs), timeout)
        await asyncio.wait_for(asked.subscription_both(mine), timeout)
    except TimeoutError:
        raise TimeoutError(f"no subscription: {asker.pushed}, {asked.pushed}") from None


async def user_at(address: str, port: int, jid: str, password: str) -> Peer:
    """A user logged in (STARTTLS) at `address`:`port`, roster fetched, available."""
    client = Peer(jid, password)
    client.ssl_context = insecure_context()
    client.enable_direct_tls = False
    client.enable_plaintext = False
    client.connect(address, port)
    await asyncio.wait_for(client.started.wait(), 15)
    await client.get_roster()  # an interested resource: it gets roster pushes
    client.send_presence()
    return client


async def xmppd_user(
    server: Server, jid: str = "bob@b.test/desk", password: str = "bob-secret"
) -> Peer:
    """A user of `server`, by default bob (whom the federation tests register)."""
    return await user_at("127.0.0.1", port_of(server, "starttls"), jid, password)


async def prosody_user(
    prosody: Prosody, jid: str = "anna@a.test/home", password: str = "anna-secret"
) -> Peer:
    """A user of `prosody`, by default anna (whom the tests' Prosody has)."""
    return await user_at(prosody.address, prosody.c2s_port, jid, password)


@asynccontextmanager
async def signed_in(
    *logins: Coroutine[Any, Any, Peer], diagnose: Callable[[], str] | None = None
) -> AsyncIterator[tuple[Peer, ...]]:
    """The users `logins` log in, one after the other; all are logged out after the
    block, in that order, also when it or a later login fails. With `diagnose`, a
    timeout in the block fails the test with what it returns (a peer server's log)."""
    clients: list[Peer] = []
    try:
        for login in logins:
            clients.append(await login)
        yield tuple(clients)
    except TimeoutError:
        if diagnose is None:
            raise
        pytest.fail("timed out\n" + diagnose())
    finally:
        for login in logins[len(clients) :]:
            login.close()  # never awaited (an earlier login failed): no warning for it
        for client in clients:
            await close(client)


async def next_message(client: Peer, timeout: float = 20) -> slixmpp.Message:
    return await asyncio.wait_for(client.messages.get(), timeout)


async def message_across(sender: Peer, receiver: Peer, to: str, body: str) -> None:
    """`sender` writes `body` to `to` (a JID of `receiver`'s): it is `receiver`'s next
    message, from `sender`'s full JID."""
    sender.send_message(mto=slixmpp.JID(to), mbody=body, mtype="chat")
    got = await next_message(receiver)
    assert (got["body"], str(got["from"])) == (body, str(sender.boundjid))
