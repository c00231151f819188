"""TLS over a pair of memory BIOs, driven by the protocol that owns the TCP transport.

Why not uvloop's SSL transport: for every read it calls `ssl.SSLObject`'s
Python wrappers (`pending()` twice, `read()`), the application protocol's
`get_buffer`/`buffer_updated` from its own layer, and for every write copies
the context (`contextvars`) and goes through `SSLObject.write`; a second
transport object sits between the connection and the socket, with state of
its own. Here the connection reads ciphertext from a plain TCP transport,
feeds it to the incoming BIO, decrypts everything available into one shared
buffer with the C methods of `_ssl._SSLSocket` (the object `SSLObject`
wraps), and encrypts each coalesced flush with one call. The
`ssl.SSLObject` is kept for what is asked once per connection (channel
binding, peer certificate, ALPN, version).

The layer does no I/O itself: the caller writes what encrypt() and
shutdown() return, and output() after a handshake step or a read (a TLS 1.3
key update is answered there), to its transport.
"""

from __future__ import annotations

import ssl

_PLAIN = bytearray(65536)
_PLAIN_VIEW = memoryview(_PLAIN)
"""Where every connection's records are decrypted. Each receive() copies what it
read out before returning, so one buffer serves all connections of the process."""


class TLSLayer:
    """One TLS connection's state: handshake, record decryption and encryption, close_notify."""

    __slots__ = ("ssl_object", "_sslobj", "_incoming", "outgoing", "ready")

    def __init__(
        self,
        context: ssl.SSLContext,
        server_side: bool = True,
        server_hostname: str | None = None,
    ) -> None:
        self._incoming = ssl.MemoryBIO()
        # Ciphertext for the peer; the connection reads its `pending` after each read
        # (a handshake message, a key update's answer to write) with no call of ours.
        self.outgoing = ssl.MemoryBIO()
        self.ssl_object: ssl.SSLObject = context.wrap_bio(
            self._incoming, self.outgoing, server_side=server_side,
            server_hostname=server_hostname,
        )
        # The C object behind SSLObject: its read/write/pending without a Python frame each.
        self._sslobj = self.ssl_object._sslobj  # type: ignore[attr-defined]
        self.ready = False  # the handshake is complete

    def handshake(self, data: bytes | memoryview) -> bool:
        """Feed `data` (ciphertext) and advance the handshake; True once it is complete.

        Raises ssl.SSLError (or a subclass) when the peer's handshake is refused.
        """
        self._incoming.write(data)
        try:
            self._sslobj.do_handshake()
        except ssl.SSLWantReadError:
            return False
        self.ready = True
        return True

    def receive(self, data: bytes | memoryview) -> bytes | None:
        """Feed `data` (ciphertext as read from the socket) and return all the
        application data the complete records hold (b"" if none is complete yet);
        None once the peer sent close_notify. Raises ssl.SSLError on a bad record."""
        incoming = self._incoming
        incoming.write(data)
        read = self._sslobj.read
        try:
            n = read(65536, _PLAIN_VIEW)
        except ssl.SSLWantReadError:
            return b""
        if n == 0:
            return None
        if not incoming.pending and not self._sslobj.pending():
            return _PLAIN_VIEW[:n].tobytes()  # the usual case: the read held whole records
        # More records in this read than the buffer holds, or a partial one at the end.
        chunks = [_PLAIN_VIEW[:n].tobytes()]
        while incoming.pending or self._sslobj.pending():
            try:
                n = read(65536, _PLAIN_VIEW)
            except ssl.SSLWantReadError:
                break  # the rest of a record is still on its way
            if n == 0:
                break  # close_notify after data: seen at the next receive()
            chunks.append(_PLAIN_VIEW[:n].tobytes())
        return b"".join(chunks)

    def encrypt(self, data: bytes) -> bytes:
        """`data` as TLS records, after whatever else was waiting to go out."""
        self._sslobj.write(data)
        return self.outgoing.read()

    def output(self) -> bytes:
        """Bytes the TLS layer has for the peer (handshake, tickets, alerts, close_notify)."""
        return self.outgoing.read()

    def shutdown(self) -> bytes:
        """Our close_notify (after anything still waiting), to be written before the TCP close."""
        try:
            self._sslobj.shutdown()
        except ssl.SSLError:
            pass  # want-read: the peer's close_notify is not awaited here
        return self.outgoing.read()
