"""The connection's own TLS (xmppd/tlslayer.py) seen from a client doing TLS by hand.

The client runs ssl.SSLObject over memory BIOs on a plain TCP stream, so a
test can cut records where it likes, tamper with one, and see whether the
server's close is a TLS close (close_notify) or a bare TCP close.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import time

from tests.integration.clients import HEADER, connect, insecure_context
from tests.integration.conftest import StartServer, port_of
from xmppd.server import Server

SASL = "urn:ietf:params:xml:ns:xmpp-sasl"


class HandTLS:
    """A TLS client whose records the test writes to the socket itself."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        ctx = insecure_context()
        ctx.set_alpn_protocols(["xmpp-client"])
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self.text = b""
        self.closed_by_notify = False  # the server's close_notify came before its TCP close
        self.alert = ""  # the TLS alert the server sent, if it sent one

    @classmethod
    async def open(cls, server: Server, direct_tls: bool = True) -> HandTLS:
        port = port_of(server, "direct_tls" if direct_tls else "starttls")
        client = cls(*await asyncio.open_connection("127.0.0.1", port))
        if not direct_tls:
            client.writer.write(HEADER.encode())
            await client.plain_until(b"</stream:features>")
            client.writer.write(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
            await client.plain_until(b"<proceed")
        await client.handshake()
        return client

    async def plain_until(self, marker: bytes) -> None:
        data = b""
        while marker not in data:
            chunk = await asyncio.wait_for(self.reader.read(65536), 10)
            assert chunk, "closed"
            data += chunk

    async def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                assert await self.pump(), "closed during the handshake"
        self.writer.write(self.outgoing.read())

    async def pump(self) -> bool:
        """Send what TLS has, read once from the server; False at the server's TCP close
        or its alert. Its close_notify is answered with ours, as a TLS client does."""
        self.writer.write(self.outgoing.read())
        chunk = await asyncio.wait_for(self.reader.read(65536), 10)
        if not chunk:
            return False
        self.incoming.write(chunk)
        while True:
            try:
                data = self.tls.read(65536)
            except ssl.SSLWantReadError:
                return True
            except ssl.SSLZeroReturnError:
                data = b""
            except ssl.SSLError as exc:
                self.alert = str(exc)
                return False
            if not data:  # close_notify (read() says so once, then returns b"")
                if not self.closed_by_notify:
                    self.closed_by_notify = True
                    try:
                        self.tls.unwrap()
                    except ssl.SSLError:
                        pass
                    self.writer.write(self.outgoing.read())
                return True
            self.text += data

    def records(self, data: bytes) -> bytes:
        self.tls.write(data)
        return self.outgoing.read()

    async def send(self, data: bytes) -> None:
        self.writer.write(self.records(data))
        await self.writer.drain()

    async def until(self, marker: bytes) -> bytes:
        while marker not in self.text:
            assert await self.pump(), f"closed before {marker!r}"
        text, self.text = self.text, b""
        return text

    async def to_close(self) -> None:
        while await self.pump():
            pass

    async def login(self, user: str, password: str) -> None:
        await self.send(HEADER.encode())
        await self.until(b"</stream:features>")
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        await self.send(f"<auth xmlns='{SASL}' mechanism='PLAIN'>{token}</auth>".encode())
        await self.until(b"<success")
        await self.send(HEADER.encode())
        await self.until(b"</stream:features>")
        await self.send(
            b"<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
            b"<resource>hand</resource></bind></iq>"
        )
        await self.until(b"</iq>")


async def connections_gone(server: Server) -> None:
    """The server's side of the close (connection_lost) follows its TCP close on its own
    loop turn; nothing signals it to a test."""
    async with asyncio.timeout(5):
        while server.connections:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_records_split_and_coalesced_arrive_whole(server: Server) -> None:
    """A stanza whose record comes in pieces, and several records in one TCP write."""
    bob = await connect(server, "bob@localhost/b", "bob-secret")
    alice = await HandTLS.open(server)
    await alice.login("alice", "alice-secret")
    record = alice.records(
        b"<message to='bob@localhost/b' type='chat'><body>" + b"x" * 3000 + b"</body></message>"
    )
    for i in range(0, len(record), 700):  # five pieces, each read on its own
        alice.writer.write(record[i : i + 700])
        await alice.writer.drain()
        await asyncio.sleep(0.01)
    alice.writer.write(b"".join(
        alice.records(f"<message to='bob@localhost/b' type='chat'><body>{n}</body></message>"
                      .encode())
        for n in range(3)
    ))
    bodies = [str((await asyncio.wait_for(bob.messages.get(), 10))["body"]) for _ in range(4)]
    assert bodies == ["x" * 3000, "0", "1", "2"]
    bob.disconnect()
    alice.writer.close()


async def test_direct_tls_offers_alpn_and_channel_binding(server: Server) -> None:
    alice = await HandTLS.open(server)
    assert alice.tls.selected_alpn_protocol() == "xmpp-client"
    await alice.send(HEADER.encode())
    features = await alice.until(b"</stream:features>")
    assert b"SCRAM-SHA-256-PLUS" in features and b"sasl-channel-binding" in features
    alice.writer.close()


async def test_the_servers_close_is_a_tls_close(server: Server) -> None:
    """</stream:stream> from the client: the server answers, sends close_notify, closes."""
    for direct in (True, False):
        alice = await HandTLS.open(server, direct_tls=direct)
        await alice.login("alice", "alice-secret")
        await alice.send(b"</stream:stream>")
        await alice.to_close()
        assert b"</stream:stream>" in alice.text
        assert alice.closed_by_notify


async def test_the_clients_close_notify_ends_the_connection(server: Server) -> None:
    alice = await HandTLS.open(server)
    await alice.login("alice", "alice-secret")
    assert len(server.connections) == 1
    try:
        alice.tls.unwrap()
    except ssl.SSLWantReadError:
        pass
    await alice.to_close()  # the server answers with its own close_notify and closes
    assert alice.closed_by_notify
    await connections_gone(server)


async def test_a_tampered_record_cuts_the_connection(server: Server) -> None:
    alice = await HandTLS.open(server)
    await alice.login("alice", "alice-secret")
    record = bytearray(alice.records(b"<presence/>"))
    record[-3] ^= 0x40
    alice.writer.write(bytes(record))
    await alice.to_close()
    assert "BAD_RECORD_MAC" in alice.alert  # the alert that says why, then the cut
    assert not alice.closed_by_notify
    await connections_gone(server)


async def test_handshake_time_counts_against_auth_timeout(start_server: StartServer) -> None:
    """auth_timeout runs from TCP accept (docs/config.md), the handshake included: a
    client that takes most of it to begin TLS does not get a fresh period after."""
    server = await start_server(limits={"auth_timeout": 2.0})
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server, "direct_tls"))
    await asyncio.sleep(1.5)  # the slow client: this delay is the scenario, not a wait
    await writer.start_tls(insecure_context(), server_hostname="localhost")
    async with asyncio.timeout(10):
        while await reader.read(65536):
            pass
    assert time.monotonic() - started < 3.0  # not 1.5 + 2.0
    writer.close()
