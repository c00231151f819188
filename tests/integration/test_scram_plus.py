"""SCRAM-*-PLUS bound to tls-server-end-point on TLS 1.3, with scramp as an independent client."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
import scramp

from tests.integration.clients import HEADER, RawClient
from xmppd.server import Server

SASL = "urn:ietf:params:xml:ns:xmpp-sasl"


def element_text(data: bytes, name: str) -> str:
    match = re.search(rb"<%s[^>]*>([^<]*)</%s>" % (name.encode(), name.encode()), data)
    assert match, data
    return match.group(1).decode()


async def scram_login(raw: RawClient, mechanism: str, cb_data: bytes) -> bytes:
    """Run the exchange; return the server's <success/>."""
    client = scramp.ScramClient(
        [mechanism], "alice", "alice-secret", channel_binding=("tls-server-end-point", cb_data)
    )
    first = base64.b64encode(client.get_client_first().encode()).decode()
    await raw.send(f"<auth xmlns='{SASL}' mechanism='{mechanism}'>{first}</auth>")
    challenge = await raw.read_until(b"</challenge>")
    client.set_server_first(base64.b64decode(element_text(challenge, "challenge")).decode())
    final = base64.b64encode(client.get_client_final().encode()).decode()
    await raw.send(f"<response xmlns='{SASL}'>{final}</response>")
    return await raw.read_until(b"</success>")


@pytest.mark.parametrize(
    "mechanism", ["SCRAM-SHA-1-PLUS", "SCRAM-SHA-256-PLUS", "SCRAM-SHA-512-PLUS"]
)
async def test_plus_with_tls_server_end_point(server: Server, mechanism: str) -> None:
    raw = await RawClient.open(server)
    assert raw.ssl_object().version() == "TLSv1.3"
    await raw.send(HEADER)
    features = await raw.read_until(b"</stream:features>")
    assert f"<mechanism>{mechanism}</mechanism>".encode() in features
    assert b'<channel-binding type="tls-server-end-point"/>' in features
    assert b"tls-unique" not in features  # undefined on TLS 1.3 (RFC 9266)
    # Computed here from the certificate we were shown (RFC 5929 4.1; the cert is ECDSA-SHA256).
    cert = raw.ssl_object().getpeercert(binary_form=True)
    assert cert is not None
    answer = await scram_login(raw, mechanism, hashlib.sha256(cert).digest())
    server_final = base64.b64decode(element_text(answer, "success")).decode()
    assert server_final.startswith("v=")
    await raw.close()


async def test_plus_with_wrong_binding_data_fails(server: Server) -> None:
    raw = await RawClient.open(server)
    await raw.send(HEADER)
    await raw.read_until(b"</stream:features>")
    client = scramp.ScramClient(
        ["SCRAM-SHA-256-PLUS"],
        "alice",
        "alice-secret",
        channel_binding=("tls-server-end-point", b"\0" * 32),
    )
    first = base64.b64encode(client.get_client_first().encode()).decode()
    await raw.send(f"<auth xmlns='{SASL}' mechanism='SCRAM-SHA-256-PLUS'>{first}</auth>")
    challenge = await raw.read_until(b"</challenge>")
    client.set_server_first(base64.b64decode(element_text(challenge, "challenge")).decode())
    final = base64.b64encode(client.get_client_final().encode()).decode()
    await raw.send(f"<response xmlns='{SASL}'>{final}</response>")
    answer = await raw.read_until(b"</failure>")
    assert b"<not-authorized/>" in answer
    assert not server.router.directory.has("alice@localhost")
    await raw.close()


async def test_tls12_offers_tls_unique_too(server: Server) -> None:
    raw = await RawClient.open(server, tls12=True)
    assert raw.ssl_object().version() == "TLSv1.2"
    await raw.send(HEADER)
    features = await raw.read_until(b"</stream:features>")
    assert b'<channel-binding type="tls-unique"/>' in features
    assert b'<channel-binding type="tls-server-end-point"/>' in features
    await raw.close()
