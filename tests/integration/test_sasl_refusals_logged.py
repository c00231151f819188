"""Every refused login leaves a log line, with the client's address and never its
password: the SASL refusals the stream makes itself (no TLS yet, a mechanism not
offered, bad base64, a response out of turn) as well as the login's. Real TLS
connections to an in-process server."""

from __future__ import annotations

import base64
import logging

import pytest

from tests.integration.clients import HEADER, RawClient
from tests.integration.conftest import USERS, StartServer
from xmppd.server import Server

pytestmark = pytest.mark.timeout(60)

SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
PLAIN = base64.b64encode(f"\0alice\0{USERS['alice']}".encode()).decode()


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records
        if r.name == "xmppd.connection" and r.levelno >= logging.INFO
        and r.getMessage().startswith("failed login:")
    ]


async def refused(server: Server, sent: str, *, direct_tls: bool = True) -> None:
    """Open a stream, send `sent` in one write, wait for the <failure/>."""
    raw = await RawClient.open(server, direct_tls=direct_tls)
    try:
        await raw.send(HEADER)
        await raw.read_until(b"</stream:features>")
        await raw.send(sent)
        await raw.read_until(b"</failure>")
    finally:
        await raw.close()


@pytest.mark.parametrize(
    ("sent", "direct_tls", "line"),
    [
        (f"<auth xmlns='{SASL}' mechanism='PLAIN'>{PLAIN}</auth>", False,
         "with PLAIN: encryption-required"),
        (f"<auth xmlns='{SASL}' mechanism='X-NOT-OFFERED'>AA==</auth>", True,
         "with X-NOT-OFFERED: invalid-mechanism"),
        # A name that is no mechanism's comes quoted: it cannot start a line of its own.
        (f"<auth xmlns='{SASL}' mechanism='A&#10;INFO forged'>AA==</auth>", True,
         r"with 'A\nINFO forged': invalid-mechanism"),
        (f"<auth xmlns='{SASL}' mechanism='PLAIN'>!!!</auth>", True,
         "with PLAIN: incorrect-encoding"),
        (f"<response xmlns='{SASL}'>AA==</response>", True,
         "with (no mechanism): malformed-request"),
        # A response before the server answered the initial one: the login refuses it.
        (f"<auth xmlns='{SASL}' mechanism='PLAIN'>{PLAIN}</auth>"
         f"<response xmlns='{SASL}'>AA==</response>", True, "with PLAIN: malformed-request"),
    ],
)
async def test_each_refused_sasl_element_logs_a_line(
    start_server: StartServer,
    caplog: pytest.LogCaptureFixture,
    sent: str,
    direct_tls: bool,
    line: str,
) -> None:
    server = await start_server()
    caplog.set_level(logging.INFO, logger="xmppd.connection")
    await refused(server, sent, direct_tls=direct_tls)
    lines = refusals(caplog)
    assert len(lines) == 1, lines
    assert "from 127.0.0.1" in lines[0] and line in lines[0], lines
    assert "\n" not in lines[0]
    assert USERS["alice"] not in caplog.text and PLAIN not in caplog.text
