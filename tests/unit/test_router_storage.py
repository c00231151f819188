"""The router when the account store cannot answer: a message for an account with no
session here is answered, never dropped unseen.

The router asks the real account store (`Accounts.exists`) over an item backend
that fails as one does in an outage (StorageError on every read).
"""

from __future__ import annotations

from typing import Any

import pytest
from lxml import etree

from xmppd.auth.accounts import Accounts
from xmppd.router import Router
from xmppd.storage.backends.memory import MemoryBlobBackend, MemoryItemBackend
from xmppd.storage.base import StorageError
from xmppd.storage.cache import NullCache
from xmppd.storage.factory import Storage
from xmppd.testing import TestSession, parse_stanza

STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
HOST = "localhost"


class DownItems(MemoryItemBackend):
    """The account store is down: every read fails."""

    async def get(self, namespace: str, name: str) -> Any:
        raise StorageError("test", "get", "connection refused")


def router_over_down_store() -> Router:
    accounts = Accounts.of(Storage(DownItems(), MemoryBlobBackend(), NullCache()), HOST)

    async def user_exists(domain: str, user: str) -> bool:
        return await accounts.exists(user)

    return Router([HOST], user_exists)


@pytest.mark.parametrize(
    "xml",
    [
        "<message to='alice@localhost' type='chat' id='x'><body>hi</body></message>",
        "<message to='alice@localhost' id='x'><body>hi</body></message>",
        "<message to='alice@localhost' type='headline' id='x'><body>hi</body></message>",
        "<message to='alice@localhost/phone' type='chat' id='x'><body>hi</body></message>",
    ],
    ids=["chat", "normal", "headline", "chat-to-full"],
)
async def test_lookup_failure_answers_internal_server_error_wait(xml: str) -> None:
    router = router_over_down_store()
    bob = TestSession("bob@localhost/desk")
    router.bind(bob)
    stanza = parse_stanza(xml)
    stanza.set("from", bob.jid)
    router.route(stanza, bob)
    await router.drain()
    [reply] = bob.take()
    assert reply.tag == stanza.tag and reply.get("type") == "error"
    assert reply.get("id") == "x" and reply.get("to") == bob.jid
    error = reply.find("{jabber:client}error")
    assert error is not None and error.get("type") == "wait"  # try again later
    assert error.find(f"{{{STANZAS}}}internal-server-error") is not None
    assert router.ledger.bounced == 1


@pytest.mark.parametrize(
    "xml",
    [
        "<presence to='alice@localhost' type='subscribe'/>",
        "<presence to='alice@localhost'/>",
        "<message to='alice@localhost' type='error' id='x'><error type='cancel'>"
        f"<item-not-found xmlns='{STANZAS}'/></error></message>",
    ],
    ids=["subscribe", "presence", "error-message"],
)
async def test_lookup_failure_never_answers_what_is_not_answered(
    xml: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Presence and errors get no error back (RFC 6120 8.3.1): the failure is logged
    as one, not as a routing bug."""
    router = router_over_down_store()
    bob = TestSession("bob@localhost/desk")
    router.bind(bob)
    stanza = parse_stanza(xml)
    stanza.set("from", bob.jid)
    router.route(stanza, bob)
    await router.drain()
    assert [etree.tostring(s) for s in bob.take()] == []
    assert "storage failed" in caplog.text
