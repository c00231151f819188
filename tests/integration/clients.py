"""Real XMPP clients for tests: slixmpp for the normal paths, a raw TLS socket for abuse."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import slixmpp

from tests.integration.conftest import port_of
from xmppd.server import Server

HEADER = (
    "<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
    "xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>"
)


def insecure_context(max_tls12: bool = False) -> ssl.SSLContext:
    """The embedded default's certificate is self-signed: tests accept it knowingly."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if max_tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class Client(slixmpp.ClientXMPP):
    """A slixmpp client that records what it receives and how its session went."""

    def __init__(self, jid: str, password: str, **kwargs: Any) -> None:
        super().__init__(jid, password, **kwargs)
        self.messages: asyncio.Queue[slixmpp.Message] = asyncio.Queue()
        self.started = asyncio.Event()
        self.ended = asyncio.Event()
        self.auth_failed = asyncio.Event()
        self.stream_errors: list[str] = []
        self.add_event_handler("session_start", lambda _: self.started.set())
        self.add_event_handler("failed_auth", lambda _: self.auth_failed.set())
        self.add_event_handler("disconnected", lambda _: self.ended.set())
        self.add_event_handler(
            "stream_error", lambda err: self.stream_errors.append(err["condition"])
        )
        self.add_event_handler("message", self.messages.put_nowait)


async def connect(
    server: Server,
    jid: str,
    password: str,
    *,
    direct_tls: bool = False,
    mechanism: str | None = None,
    max_tls12: bool = False,
    expect_failure: bool = False,
) -> Client:
    client = Client(jid, password, sasl_mech=mechanism)
    client.ssl_context = insecure_context(max_tls12)
    client.enable_direct_tls = direct_tls
    client.enable_starttls = not direct_tls
    client.enable_plaintext = False
    port = port_of(server, "direct_tls" if direct_tls else "starttls")
    client.connect("127.0.0.1", port)
    waiting = client.auth_failed if expect_failure else client.started
    await asyncio.wait_for(waiting.wait(), 15)
    return client


async def close(client: Client) -> None:
    if not client.ended.is_set():
        client.disconnect()
        await asyncio.wait_for(client.ended.wait(), 10)


async def read_until(reader: asyncio.StreamReader, marker: bytes, timeout: float = 10) -> bytes:
    """Read until `marker` arrives; EOFError (with what came) if the peer closes first.

    `read()` returns b"" at once and forever after EOF, so a loop that only
    waits for the marker would spin at full CPU once the server hangs up.
    """
    buf = b""
    async with asyncio.timeout(timeout):
        while marker not in buf:
            chunk = await reader.read(65536)
            if not chunk:
                raise EOFError(buf)
            buf += chunk
    return buf


class RawClient:
    """A hand-driven stream over TLS, for input no well-behaved client library sends."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(
        cls,
        server: Server,
        *,
        direct_tls: bool = True,
        tls12: bool = False,
        source: str | None = None,
    ) -> RawClient:
        """Connect to the server on 127.0.0.1; `source` is the local address to
        connect from (any of 127.0.0.0/8 on Linux), to act as another client host."""
        port = port_of(server, "direct_tls" if direct_tls else "starttls")
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            port,
            ssl=insecure_context(tls12) if direct_tls else None,
            server_hostname="localhost" if direct_tls else None,
            local_addr=(source, 0) if source is not None else None,
        )
        return cls(reader, writer)

    async def send(self, data: str | bytes) -> None:
        self.writer.write(data.encode() if isinstance(data, str) else data)
        await self.writer.drain()

    async def read_until(self, marker: bytes, timeout: float = 10) -> bytes:
        return await read_until(self.reader, marker, timeout)

    async def read_to_close(self, timeout: float = 10) -> bytes:
        """Everything until the server closes the connection."""
        buf = b""
        async with asyncio.timeout(timeout):
            while chunk := await self.reader.read(65536):
                buf += chunk
        return buf

    async def starttls(self) -> None:
        await self.send(HEADER)
        await self.read_until(b"</stream:features>")
        await self.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        await self.read_until(b"<proceed")
        await self.writer.start_tls(insecure_context(), server_hostname="localhost")

    def ssl_object(self) -> ssl.SSLObject:
        return self.writer.get_extra_info("ssl_object")

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass
