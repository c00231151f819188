"""Every refused in-band registration (XEP-0077) leaves one log line with the reason,
the user name as asked (quoted: a stranger's input) and the client's address, never
the password. Real connections to an in-process server, over TLS but for the one
refused for coming before it."""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest

from tests.integration.clients import HEADER, RawClient
from tests.integration.conftest import StartServer
from xmppd.server import Server

pytestmark = pytest.mark.timeout(60)

PASSWORD = "a-Secret-never-logged"
WEAK = "Wk7#q"  # shorter than the default minimum, 8
OPEN = {"disco": {}, "register": {"allow_registration": True, "registrations_per_ip": 1}}


@pytest.fixture
def storage_section() -> None:
    """The embedded stores: what is logged does not depend on the backend."""


def form(username: str | None, password: str | None, extra: str = "") -> str:
    inner = "" if username is None else f"<username>{username}</username>"
    inner += "" if password is None else f"<password>{password}</password>"
    return (
        f"<iq type='set' id='reg1'><query xmlns='jabber:iq:register'>{inner}{extra}"
        "</query></iq>"
    )


async def register(server: Server, sent: str, *, direct_tls: bool = True) -> bytes:
    """Open a stream (over TLS unless `direct_tls` is False), send `sent`, return the
    reply IQ."""
    raw = await RawClient.open(server, direct_tls=direct_tls)
    try:
        await raw.send(HEADER)
        await raw.read_until(b"</stream:features>")
        await raw.send(sent)
        reply = b""
        while not re.search(rb"</iq>|<iq [^>]*/>", reply):  # an empty result closes itself
            reply += await raw.read_until(b">")
        return reply
    finally:
        await raw.close()


def refusals(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records
        if r.name == "xmppd.modules.register" and " refused: " in r.getMessage()
    ]


@pytest.mark.parametrize(
    ("sections", "sent", "direct_tls", "shown", "reason", "condition"),
    [
        ({"modules": {"disco": {}, "register": {}}}, form("newbie", PASSWORD), True,
         "'newbie'@localhost", "registration is disabled", b"service-unavailable"),
        ({}, form("newbie", PASSWORD), False,
         "'newbie'@localhost", "no TLS", b"policy-violation"),
        ({}, form("alice", PASSWORD), True,
         "'alice'@localhost", "user name taken", b"conflict"),
        # nodeprep refuses '@'; a newline comes escaped: it cannot start a line of its own
        ({}, form("new@bie&#10;INFO forged", PASSWORD), True,
         r"'new@bie\nINFO forged'@localhost", "invalid user name", b"not-acceptable"),
        ({}, form("newbie", WEAK), True,
         "'newbie'@localhost", "password too short", b"not-acceptable"),
        ({}, form("newbie", ""), True,
         "'newbie'@localhost", "no password", b"not-acceptable"),
        ({}, form(None, PASSWORD), True,
         "(no user name)", "no user name", b"not-acceptable"),
        ({}, form("newbie", PASSWORD + "\ue000"), True,  # SASLprep: private use
         "'newbie'@localhost", "password refused (password contains prohibited characters)",
         b"not-acceptable"),
        ({}, form("newbie", PASSWORD, "<remove/>"), True,
         "'newbie'@localhost", "<remove/> before login", b"unexpected-request"),
    ],
    ids=[
        "disabled", "no-tls", "taken", "invalid-name", "weak-password", "empty-password",
        "no-name", "prohibited-password", "remove",
    ],
)
async def test_each_refused_registration_logs_a_line(
    start_server: StartServer,
    caplog: pytest.LogCaptureFixture,
    sections: dict[str, Any],
    sent: str,
    direct_tls: bool,
    shown: str,
    reason: str,
    condition: bytes,
) -> None:
    server = await start_server(**{"modules": OPEN, **sections})
    caplog.set_level(logging.INFO, logger="xmppd.modules.register")
    reply = await register(server, sent, direct_tls=direct_tls)
    assert condition in reply, reply
    (line,) = [r.getMessage() for r in refusals(caplog)]
    assert line.startswith(
        f"in-band registration of {shown} from 127.0.0.1 refused: {reason} conn="
    ), line
    assert "\n" not in line
    assert PASSWORD not in caplog.text and WEAK not in caplog.text
    assert not await server.accounts["localhost"].exists("newbie")


async def test_over_the_address_limit_is_logged(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server(modules=OPEN)
    caplog.set_level(logging.INFO, logger="xmppd.modules.register")
    assert b'type="result"' in await register(server, form("first", PASSWORD))
    reply = await register(server, form("second", PASSWORD))
    assert b"not-acceptable" in reply
    (line,) = [r.getMessage() for r in refusals(caplog)]
    assert line.startswith(
        "in-band registration of 'second'@localhost from 127.0.0.1 refused: "
        "registration limit reached (1 per 3600 s from the address) conn="
    ), line
    assert PASSWORD not in caplog.text


async def test_a_reserved_name_is_logged_at_warning(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server(modules=OPEN, admins=["boss@localhost"])
    caplog.set_level(logging.INFO, logger="xmppd.modules.register")
    assert b"not-acceptable" in await register(server, form("boss", PASSWORD))
    (record,) = refusals(caplog)
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith(
        "in-band registration of boss@localhost from 127.0.0.1 refused: admins[0] "
    ), record.getMessage()
    assert PASSWORD not in caplog.text


async def test_the_form_asked_while_closed_is_logged(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server(modules={"disco": {}, "register": {}})
    caplog.set_level(logging.INFO, logger="xmppd.modules.register")
    sent = "<iq type='get' id='reg1'><query xmlns='jabber:iq:register'/></iq>"
    assert b"service-unavailable" in await register(server, sent)
    (line,) = [r.getMessage() for r in refusals(caplog)]
    assert line.startswith(
        "in-band registration of (no user name) from 127.0.0.1 refused: "
        "registration is disabled conn="
    ), line
