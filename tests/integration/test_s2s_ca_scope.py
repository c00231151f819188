"""A CA trusted for one peer domain vouches for that domain only, between real servers.

b.test (127.0.18.3) trusts a general CA for every peer and, for partner.test
only, the partner's own CA (`s2s.domains."partner.test".ca_file`); it lets
victim.test use dialback when its certificate does not do. The other servers,
each an xmppd in this process on a loopback address of its own, with its own
data folder (so its own dialback secret) and the general CA trusted for b.test:

- partner.test (127.0.18.6), its certificate from the partner CA;
- victim.test (127.0.18.8), the real one, its certificate from the general CA;
- an impostor (127.0.18.7) that also serves victim.test, with a certificate the
  partner CA issued for victim.test: whoever holds the partner's CA can make one.

In the TLS handshake b.test takes a chain to any CA it trusts (the peer is
named only after it), so the certificate must then be verified again against
the CAs trusted for the domain the stream names, or the partner's CA speaks
for every domain.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import pytest
import slixmpp

from tests.integration.conftest import StartServer
from tests.integration.s2s_clients import Peer, message_across, signed_in, xmppd_user
from tests.integration.s2s_peers import CA, XMPPD_ADDRESS, free_port, make_ca, xmppd_s2s, xmppd_tls
from tests.integration.test_s2s_xmppd import streams
from xmppd.server import Server

PARTNER_ADDRESS = "127.0.18.6"
IMPOSTOR_ADDRESS = "127.0.18.7"
VICTIM_ADDRESS = "127.0.18.8"


@pytest.fixture
def storage_section() -> None:
    """The embedded storage only, each server its own: servers sharing a cloud table
    would share the dialback secret (`_cluster/secrets`), and the real victim.test
    would vouch for the impostor's key. What is checked here does not touch storage."""
    return None


class Federation:
    """The CAs and the servers' s2s ports; starts the servers a test needs."""

    def __init__(self, tmp_path: Path, start_server: StartServer) -> None:
        self.tmp_path = tmp_path
        self.start_server = start_server
        self.general = make_ca(tmp_path, "general CA")
        self.partner_ca = make_ca(tmp_path, "partner CA")
        self.ports = {
            address: free_port(address)
            for address in (XMPPD_ADDRESS, PARTNER_ADDRESS, IMPOSTOR_ADDRESS, VICTIM_ADDRESS)
        }

    async def b(self) -> Server:
        """b.test, with bob."""
        domains = {
            "partner.test": {
                "host": PARTNER_ADDRESS,
                "port": self.ports[PARTNER_ADDRESS],
                "ca_file": str(self.partner_ca.path),
            },
            # Where b.test asks about a victim.test dialback key: the real server.
            "victim.test": {
                "host": VICTIM_ADDRESS,
                "port": self.ports[VICTIM_ADDRESS],
                "accept_dialback": True,
            },
        }
        server = await self._serve("b.test", XMPPD_ADDRESS, "b.test", self.general, domains)
        await server.accounts["b.test"].register("bob", "bob-secret")
        return server

    async def peer(self, domain: str, address: str, cert_ca: CA, user: str) -> Server:
        """A server of `domain` at `address` with a certificate from `cert_ca`, reaching
        b.test; `user` registered (password "secret")."""
        to_b = {"b.test": {"host": XMPPD_ADDRESS, "port": self.ports[XMPPD_ADDRESS]}}
        folder = address  # two servers serve victim.test: named by address
        server = await self._serve(domain, address, folder, cert_ca, to_b)
        await server.accounts[domain].register(user, "secret")
        return server

    async def _serve(
        self, domain: str, address: str, folder: str, cert_ca: CA, domains: object
    ) -> Server:
        where = self.tmp_path / folder
        listeners = [{"address": address, "port": self.ports[address]}]
        return await self.start_server(
            users={},
            hosts=[domain],
            data_dir=str(where / "data"),
            tls=xmppd_tls(where, cert_ca, domain),
            s2s=xmppd_s2s(self.general, listeners, domains=domains),
        )


async def first_of(bob: Peer, sender: Peer) -> slixmpp.Message:
    """What happened first to the message `sender` just sent bob: bob got it, or
    `sender` got its bounce (the test's timeout bounds the wait)."""
    got = asyncio.ensure_future(bob.messages.get())
    bounced = asyncio.ensure_future(sender.errors.get())
    done, pending = await asyncio.wait({got, bounced}, return_when=asyncio.FIRST_COMPLETED)
    for future in pending:
        future.cancel()
    return done.pop().result()


async def test_a_certificate_from_a_partners_ca_does_not_authenticate_another_domain(
    tmp_path: Path, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The impostor's stream claims victim.test with a certificate that names it and
    chains to the partner CA: b.test does not offer EXTERNAL for it, but dialback
    (victim.test's policy), and asks the real victim.test about the impostor's key,
    which it did not make: refused, and the impostor's message bounces there."""
    caplog.set_level(logging.INFO, logger="xmppd.s2s")
    federation = Federation(tmp_path, start_server)
    b = await federation.b()
    await federation.peer("victim.test", VICTIM_ADDRESS, federation.general, "vera")
    impostor = await federation.peer(
        "victim.test", IMPOSTOR_ADDRESS, federation.partner_ca, "mallory"
    )
    logins = (xmppd_user(b), xmppd_user(impostor, "mallory@victim.test/x", "secret"))
    async with signed_in(*logins) as (bob, mallory):
        mallory.send_message(mto="bob@b.test/desk", mbody="from victim.test, truly", mtype="chat")
        outcome = await first_of(bob, mallory)
        assert outcome["type"] == "error", f"delivered: {outcome}"
        assert outcome["error"]["condition"] == "remote-server-not-found"
        assert not [s for s in streams(b) if s[1] == "victim.test" and s[2]], streams(b)
    said = [r.getMessage() for r in caplog.records]
    # Not taken for its certificate: b.test asked victim.test's server (its `host`, the
    # real one) about the key, and it did not make it.
    assert any(re.search(r"dialback key of victim.test \(.+\): invalid", m) for m in said), said
    assert not any("victim.test" in m and "authenticated with" in m for m in said), said


async def test_each_ca_still_vouches_for_its_own_domains(
    tmp_path: Path, start_server: StartServer
) -> None:
    """partner.test's certificate from the partner CA, and victim.test's from the
    general CA, authenticate them to b.test with SASL EXTERNAL."""
    federation = Federation(tmp_path, start_server)
    b = await federation.b()
    partner = await federation.peer(
        "partner.test", PARTNER_ADDRESS, federation.partner_ca, "pat"
    )
    victim = await federation.peer("victim.test", VICTIM_ADDRESS, federation.general, "vera")
    logins = (
        xmppd_user(b),
        xmppd_user(partner, "pat@partner.test/x", "secret"),
        xmppd_user(victim, "vera@victim.test/x", "secret"),
    )
    async with signed_in(*logins) as (bob, pat, vera):
        await message_across(pat, bob, "bob@b.test/desk", "from the partner")
        await message_across(vera, bob, "bob@b.test/desk", "from the victim")
        incoming = {(s[1], s[2]) for s in streams(b) if s[0] == "in"}
        assert incoming == {("partner.test", "EXTERNAL"), ("victim.test", "EXTERNAL")}
