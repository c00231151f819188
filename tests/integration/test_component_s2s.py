"""A component of xmppd talks to a user of a real Prosody over s2s, both ways.

xmppd serves b.test and, for a slixmpp ComponentXMPP, gateway.b.test; Prosody
serves a.test (the peers' setup: tests/integration/s2s_peers.py, docs/s2s.md).
xmppd's certificate names both of its domains, so each direction's stream is
authenticated with SASL EXTERNAL for the component's domain: the outgoing
one from gateway.b.test, and the one Prosody opens to gateway.b.test, which
xmppd accepts because it serves that domain for the component.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from slixmpp import JID

from tests.integration.clients import close
from tests.integration.conftest import StartServer
from tests.integration.s2s_clients import prosody_user
from tests.integration.s2s_peers import (
    PROSODY_ADDRESS,
    XMPPD_ADDRESS,
    free_port,
    make_ca,
    require_prosody,
    start_prosody,
    xmppd_s2s,
    xmppd_tls,
)
from tests.integration.test_components import SECRET, gateway, next_message, stop

require_prosody()

pytestmark = pytest.mark.timeout(90)

GATEWAY = "gateway.b.test"


async def test_component_and_a_remote_user_exchange_messages_and_iq(
    tmp_path: Path, start_server: StartServer
) -> None:
    ca = make_ca(tmp_path)
    names = ["b.test", GATEWAY]
    s2s_port = free_port(XMPPD_ADDRESS)
    prosody = await start_prosody(
        tmp_path / "prosody",
        ca,
        peers={domain: (XMPPD_ADDRESS, s2s_port) for domain in names},
    )
    try:
        server = await start_server(
            users={},
            hosts=["b.test"],
            tls=xmppd_tls(tmp_path / "xmppd-cert", ca, dns_names=names, xmpp_addrs=names),
            s2s=xmppd_s2s(
                ca,
                [{"address": XMPPD_ADDRESS, "port": s2s_port}],
                domains={"a.test": {"host": PROSODY_ADDRESS, "port": prosody.s2s_port}},
            ),
            components={
                "listeners": [{"address": "127.0.0.1", "port": 0}],
                "domains": {GATEWAY: {"secret": SECRET}},
            },
        )
        component = await gateway(server, GATEWAY)
        anna = await prosody_user(prosody, "anna@a.test/phone", "anna-secret")
        anna.register_plugin("xep_0030")
        try:
            component.send_message(
                mto="anna@a.test/phone", mfrom=f"bot@{GATEWAY}", mbody="from the gateway"
            )
            got = await asyncio.wait_for(anna.messages.get(), 20)
            assert (got["from"], got["body"]) == (JID(f"bot@{GATEWAY}"), "from the gateway")

            anna.send_message(mto=f"bot@{GATEWAY}", mbody="to the gateway", mtype="chat")
            got = await next_message(component)
            assert (got["from"], got["body"]) == (JID("anna@a.test/phone"), "to the gateway")
            info = await anna.plugin["xep_0030"].get_info(jid=GATEWAY, timeout=20)
            assert ("gateway", "irc", None, "Test gateway") in info["disco_info"]["identities"]

            assert server.s2s is not None
            streams = sorted(
                ("out" if c.outgoing else "in", c.stream.local, c.stream.mechanism)
                for c in server.s2s.connections
            )
            assert ("out", GATEWAY, "EXTERNAL") in streams
            assert ("in", GATEWAY, "EXTERNAL") in streams
        finally:
            await close(anna)
            await stop(component)
    finally:
        await prosody.stop()
