"""The admin API's HTTPS listener: what serves it on a non-loopback address (admin.tls).

Every admin request carries the deployment's bearer token, so off loopback the
API must never be read in clear. aiohttp's own TLS site would do the TLS, but
silently: a client speaking plain HTTP, or one whose handshake fails, leaves
no log line and gets no answer it can read, and its context is fixed when it
binds, so a renewed certificate would not reach it before a restart. This
listener accepts the connections itself instead:

- it peeks at the first byte: anything but a TLS handshake record gets a
  plain `400` naming https (which a mistaken `curl http://` shows), and a log
  line; nothing it sent is read as a request;
- a TLS connection is handed to the aiohttp app with the context current at
  that moment (`use` swaps in the one a reload made, in its thread), so each
  connection keeps the certificate its handshake began with;
- a failed handshake is a log line naming the address and OpenSSL's reason.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable

log = logging.getLogger(__name__)

HANDSHAKE_SECONDS = 10.0
"""How long a connection may take to send its first byte, then to finish its handshake."""

TLS_HANDSHAKE = 0x16
"""The content type of a TLS record carrying a handshake (RFC 8446 5.1): a ClientHello
starts with it, and no HTTP method does."""

_REFUSAL_TEXT = b"this admin API is served over HTTPS only: use https://\n"
PLAIN_REFUSAL = (
    b"HTTP/1.1 400 Bad Request\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_REFUSAL_TEXT), _REFUSAL_TEXT)
)
"""What a plain-HTTP client is answered."""


class HTTPSListener:
    """One bound socket; connections are served by `protocol_factory` once TLS is up."""

    def __init__(
        self, protocol_factory: Callable[[], asyncio.BaseProtocol], context: ssl.SSLContext
    ) -> None:
        self._protocol_factory = protocol_factory
        self._context = context
        self._socket: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()  # connections before their handshake

    async def start(self, address: str, port: int) -> tuple[str, int]:
        """Bind and accept; the bound address and port. Binding resolves `address`
        ("localhost" reads /etc/hosts): done in a thread."""
        sock = await asyncio.to_thread(_bind, address, port)
        sock.setblocking(False)
        self._socket = sock
        self._accepting = asyncio.get_running_loop().create_task(self._accept(sock))
        bound = sock.getsockname()
        return bound[0], bound[1]

    def use(self, context: ssl.SSLContext) -> None:
        """New connections handshake with `context` (a renewed certificate)."""
        self._context = context

    async def stop(self) -> None:
        """Stop accepting and drop the connections not yet handed over (those that
        were are the app runner's to close)."""
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
            self._accepting = None
        for task in list(self._pending):
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(sock)
            except OSError as exc:  # EMFILE and the like: the next one may succeed
                log.warning("admin: accepting a connection failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            task = loop.create_task(self._serve(conn, f"{peer[0]} port {peer[1]}"))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _serve(self, conn: socket.socket, peer: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            first = await _first_byte(loop, conn)
        except TimeoutError:
            log.warning(
                "admin: refused %s: nothing sent in %.0f s", peer, HANDSHAKE_SECONDS,
                extra={"event": "admin-refused", "reason": "timeout"},
            )
            conn.close()
            return
        except OSError:
            conn.close()  # reset before it sent anything
            return
        except asyncio.CancelledError:
            conn.close()
            raise
        if not first:
            conn.close()  # connected and closed: nothing asked, nothing refused
            return
        if first[0] != TLS_HANDSHAKE:
            log.warning(
                "admin: refused plain HTTP from %s: the API serves HTTPS only", peer,
                extra={"event": "admin-refused", "reason": "plain-http"},
            )
            _refuse_plain(conn)
            return
        try:
            await loop.connect_accepted_socket(
                self._protocol_factory,
                conn,
                ssl=self._context,
                ssl_handshake_timeout=HANDSHAKE_SECONDS,
            )
        except (OSError, TimeoutError) as exc:
            log.warning(
                "admin: refused %s: TLS handshake failed (%s)", peer, _why(exc),
                extra={"event": "admin-refused", "reason": "tls-handshake"},
            )
            conn.close()


def _why(exc: BaseException) -> str:
    """A failed handshake's reason, for the log line."""
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)  # e.g. UNSUPPORTED_PROTOCOL for a TLS 1.1 client
    if isinstance(exc, TimeoutError):
        return f"not done in {HANDSHAKE_SECONDS:.0f} s"
    if isinstance(exc, ConnectionError) and not str(exc):
        # What a client that refused our certificate leaves (its alert ends the stream)
        return "the client closed the connection: does it trust the certificate?"
    return str(exc) or type(exc).__name__  # asyncio's handshake timeout says so itself


def _bind(address: str, port: int) -> socket.socket:
    """A listening socket on the first address `address` resolves to (IPv4 or IPv6)."""
    family, _, _, _, sockaddr = socket.getaddrinfo(
        address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    return socket.create_server(sockaddr[:2], family=family, backlog=100)


async def _first_byte(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> bytes:
    """The first byte `conn` sent, left unread for the TLS layer; b"" if it closed.
    TimeoutError after HANDSHAKE_SECONDS."""
    readable: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not readable.done():
            readable.set_result(None)

    fd = conn.fileno()
    loop.add_reader(fd, ready)
    try:
        async with asyncio.timeout(HANDSHAKE_SECONDS):
            await readable
    finally:
        loop.remove_reader(fd)
    return conn.recv(1, socket.MSG_PEEK)


def _refuse_plain(conn: socket.socket) -> None:
    """Answer a plain-HTTP client with PLAIN_REFUSAL and close. What it sent is read
    first: closing a socket with unread data resets the connection, and the client
    would see the reset instead of the answer."""
    try:
        conn.recv(65536)  # a request's head, at most; no loop a sender could keep going
    except BlockingIOError:
        pass
    except OSError:
        conn.close()
        return
    try:
        conn.send(PLAIN_REFUSAL)
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the client went away: it has no use for the answer
    conn.close()
