"""SCRAM-*-PLUS bound to tls-server-end-point on TLS 1.3, with scramp as an independent client."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import re
import ssl
from pathlib import Path

import pytest
import scramp

from tests.integration.clients import HEADER, RawClient, insecure_context
from tests.integration.conftest import StartServer, port_of
from tests.integration.renewal import RenewablePair
from tests.integration.test_cli_server import der_of
from xmppd.server import Server

SASL = "urn:ietf:params:xml:ns:xmpp-sasl"


def element_text(data: bytes, name: str) -> str:
    match = re.search(rb"<%s[^>]*>([^<]*)</%s>" % (name.encode(), name.encode()), data)
    assert match, data
    return match.group(1).decode()


async def scram_login(raw: RawClient | HandDriven, mechanism: str, cb_data: bytes) -> bytes:
    """Run the exchange; return the server's last answer, <success/> or <failure/>."""
    client = scramp.ScramClient(
        [mechanism], "alice", "alice-secret", channel_binding=("tls-server-end-point", cb_data)
    )
    first = base64.b64encode(client.get_client_first().encode()).decode()
    await raw.send(f"<auth xmlns='{SASL}' mechanism='{mechanism}'>{first}</auth>")
    challenge = await raw.read_until(b"</challenge>")
    client.set_server_first(base64.b64decode(element_text(challenge, "challenge")).decode())
    final = base64.b64encode(client.get_client_final().encode()).decode()
    await raw.send(f"<response xmlns='{SASL}'>{final}</response>")
    answer = b""
    while b"</success>" not in answer and b"</failure>" not in answer:
        answer += await raw.read_until(b">")
    return answer


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
    answer = await scram_login(raw, "SCRAM-SHA-256-PLUS", b"\0" * 32)
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



class HandDriven:
    """A direct TLS client over memory BIOs, driven step by step: a test can act
    while the server's TLS layer exists but its handshake is not complete."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = insecure_context().wrap_bio(self._in, self._out, server_hostname="localhost")

    @classmethod
    async def hello(cls, server: Server) -> HandDriven:
        """Connect and send the ClientHello; return once the server answered it."""
        client = cls(*await asyncio.open_connection("127.0.0.1", port_of(server, "direct_tls")))
        with contextlib.suppress(ssl.SSLWantReadError):
            client.tls.do_handshake()
        await client._write()
        await client._read()
        return client

    async def finish(self) -> None:
        """Complete the handshake (the client's Finished ends the server's)."""
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._write()
                await self._read()
        await self._write()

    async def send(self, data: str) -> None:
        self.tls.write(data.encode())
        await self._write()

    async def read_until(self, marker: bytes, timeout: float = 10) -> bytes:
        buf = b""
        async with asyncio.timeout(timeout):
            while marker not in buf:
                try:
                    buf += self.tls.read(65536)
                except ssl.SSLWantReadError:
                    await self._read()
        return buf

    def ssl_object(self) -> ssl.SSLObject:
        return self.tls

    async def close(self) -> None:
        self.writer.close()

    async def _write(self) -> None:
        self.writer.write(self._out.read())
        await self.writer.drain()

    async def _read(self) -> None:
        data = await self.reader.read(65536)
        if not data:
            raise EOFError
        self._in.write(data)


async def tls_begun(server: Server, direct_tls: bool) -> RawClient | HandDriven:
    """A client whose TLS the server has set up (its TLS layer made, the certificate
    to present chosen) but not finished: no login can have begun."""
    if direct_tls:
        return await HandDriven.hello(server)
    raw = await RawClient.open(server, direct_tls=False)
    await raw.send(HEADER)
    await raw.read_until(b"</stream:features>")
    await raw.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    await raw.read_until(b"<proceed")
    return raw


async def tls_finished(raw: RawClient | HandDriven) -> None:
    """Finish the TLS `tls_begun` began; read the stream features after it."""
    if isinstance(raw, HandDriven):
        await raw.finish()
    else:
        await raw.writer.start_tls(insecure_context(), server_hostname="localhost")
    await raw.send(HEADER)
    await raw.read_until(b"</stream:features>")


@pytest.mark.parametrize("direct_tls", [True, False], ids=["direct-tls", "starttls"])
async def test_plus_binds_to_the_certificate_of_the_handshake_across_a_renewal(
    tmp_path: Path, start_server: StartServer, direct_tls: bool
) -> None:
    """A renewal (reload) while a client's handshake is under way: the server binds to
    the certificate that client is shown, not to the new one; a client that connects
    after the reload is shown the new one and binds to it."""
    pair = RenewablePair(tmp_path)
    server = await start_server(tls=pair.tls_section())
    before = await tls_begun(server, direct_tls)

    pair.renew()  # certbot's renewal, then the operator's reload
    result = await server.reload()
    assert result.reloaded, result.problems
    assert f"certificate {pair.cert} (renewed)" in result.changed
    await tls_finished(before)
    after = await tls_begun(server, direct_tls)
    await tls_finished(after)

    for raw, shown in ((before, pair.first[0]), (after, pair.second[0])):
        # The client computes its binding data from the certificate it was shown.
        peer = raw.ssl_object().getpeercert(binary_form=True)
        assert peer == der_of(shown)
        answer = await scram_login(raw, "SCRAM-SHA-256-PLUS", hashlib.sha256(peer).digest())
        assert b"</success>" in answer, answer
        await raw.close()
