"""slixmpp users on both sides of a federation test (xmppd and a real peer server)."""

from __future__ import annotations

import asyncio

import slixmpp

from tests.integration.clients import Client, insecure_context
from tests.integration.conftest import port_of
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


async def xmppd_user(server: Server, jid: str, password: str) -> Peer:
    return await user_at("127.0.0.1", port_of(server, "starttls"), jid, password)


async def next_message(client: Peer, timeout: float = 20) -> slixmpp.Message:
    return await asyncio.wait_for(client.messages.get(), timeout)
