"""Server-side TLS for incoming s2s streams that takes any client certificate.

Why not the stdlib: Python's `ssl` cannot ask for a client certificate
without verifying it in the handshake (CERT_OPTIONAL fails the handshake for
a certificate that does not chain to a trusted CA), so a peer whose
certificate we do not trust could never fall back to dialback (XEP-0220).
pyOpenSSL's `set_verify` takes a callback: it records what OpenSSL thought
of the chain and lets the handshake go on; the stream then offers SASL
EXTERNAL only when the chain validated (and the name matches, RFC 9525),
dialback otherwise when the policy allows it.

Shaped like xmppd/tlslayer.py: the TLS state works over memory BIOs and does
no I/O; `TLSAcceptProtocol` sits on the plain TCP transport (the owner
installs it with `set_protocol`), feeds it ciphertext and hands the
application protocol the plain text, and `TLSAcceptTransport` is the
transport that protocol writes to (encrypting each write).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL, crypto

_READ = 65536


def _record(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
    """OpenSSL's verdict on each certificate of the peer's chain: kept, never fatal."""
    if not ok:
        layer = conn.get_app_data()
        if isinstance(layer, TLSAcceptLayer):
            layer.chain_valid = False
    return True


def server_context(
    cert: Path, key: Path, ca_files: set[Path], system_cas: bool, alpn: bytes | None = None
) -> SSL.Context:
    """Our certificate; the peer's asked for and checked against `ca_files` (and the
    system's trust store if `system_cas`), the verdict recorded, not enforced.
    `alpn`: selected when the peer offers it (direct TLS, XEP-0368)."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.use_certificate_chain_file(str(cert))
    ctx.use_privatekey_file(str(key))
    ctx.check_privatekey()
    for path in ca_files:
        ctx.load_verify_locations(str(path))
    if system_cas:
        ctx.set_default_verify_paths()
    ctx.set_verify(SSL.VERIFY_PEER, _record)
    # No resumption: a resumed session skips the verify callback, and the verdict on
    # the peer's chain (`chain_valid`) is made there. (With VERIFY_PEER and no session
    # id context, OpenSSL failed every resumption attempt outright, both TLS 1.2 and
    # 1.3: a peer reconnecting with a ticket could not federate.)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.set_options(SSL.OP_NO_TICKET)
    if alpn is not None:
        wanted = alpn

        def select(conn: SSL.Connection, offered: list[bytes]) -> bytes | Any:
            return wanted if wanted in offered else SSL.NO_OVERLAPPING_PROTOCOLS

        ctx.set_alpn_select_callback(select)
    return ctx


class TLSAcceptLayer:
    """One incoming TLS connection's state over memory BIOs (server side)."""

    def __init__(self, context: SSL.Context) -> None:
        self.conn = SSL.Connection(context, None)
        self.conn.set_accept_state()
        self.conn.set_app_data(self)
        self.chain_valid = True  # until OpenSSL reports a certificate it did not take
        self.ready = False

    def handshake(self, data: bytes) -> bool:
        """Feed ciphertext, advance the handshake; True once complete. Raises SSL.Error."""
        self.conn.bio_write(data)
        try:
            self.conn.do_handshake()
        except SSL.WantReadError:
            return False
        self.ready = True
        return True

    def receive(self, data: bytes) -> bytes | None:
        """Feed ciphertext; the plain text of the complete records (b"" if none), None
        once the peer sent close_notify. Raises SSL.Error on a bad record."""
        if data:
            self.conn.bio_write(data)
        chunks = []
        while True:
            try:
                chunks.append(self.conn.recv(_READ))
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                if chunks:
                    break
                return None
        return b"".join(chunks)

    def encrypt(self, data: bytes) -> bytes:
        view = memoryview(data)
        while view:
            sent = self.conn.send(view)
            view = view[sent:]
        return self.output()

    def output(self) -> bytes:
        chunks = []
        while True:
            try:
                chunks.append(self.conn.bio_read(_READ))
            except SSL.WantReadError:
                break
        return b"".join(chunks)

    def shutdown(self) -> bytes:
        try:
            self.conn.shutdown()
        except SSL.Error:
            pass  # the peer's close_notify is not awaited
        return self.output()

    def peer_certificate(self) -> bytes | None:
        """The peer's certificate (DER) if it sent one and its chain validated."""
        cert = self.conn.get_peer_certificate(as_cryptography=True)
        if cert is None or not self.chain_valid:
            return None
        return cert.public_bytes(Encoding.DER)

    def peer_chain(self) -> list[crypto.X509]:
        """The peer's certificate, then the others it sent (a server is not given its
        peer's certificate in that list); empty if it sent none or its chain did not
        validate here. For verifying it again against one domain's CAs."""
        cert = self.conn.get_peer_certificate()
        if cert is None or not self.chain_valid:
            return []
        return [cert, *(self.conn.get_peer_cert_chain() or ())]

    def alpn(self) -> bytes | None:
        return self.conn.get_alpn_proto_negotiated() or None


class TLSAcceptTransport(asyncio.Transport):
    """What the application protocol writes to: encrypts onto the TCP transport."""

    def __init__(self, raw: asyncio.Transport, layer: TLSAcceptLayer) -> None:
        super().__init__()
        self.raw = raw
        self.layer = layer
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._closing:
            self.raw.write(self.layer.encrypt(bytes(data)))

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            if not self.raw.is_closing():
                self.raw.write(self.layer.shutdown())
                self.raw.close()

    def abort(self) -> None:
        self._closing = True
        self.raw.abort()

    def is_closing(self) -> bool:
        return self._closing or self.raw.is_closing()

    def pause_reading(self) -> None:
        self.raw.pause_reading()

    def resume_reading(self) -> None:
        self.raw.resume_reading()

    def is_reading(self) -> bool:
        return self.raw.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self.raw.get_write_buffer_size()

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.raw.get_extra_info(name, default)


class TLSAcceptProtocol(asyncio.Protocol):
    """Installed on the TCP transport: runs the handshake, then decrypts for `app`."""

    def __init__(
        self,
        raw: asyncio.Transport,
        layer: TLSAcceptLayer,
        app: asyncio.Protocol,
        on_done: Callable[[TLSAcceptTransport | None, Exception | None], None],
    ) -> None:
        self.raw = raw
        self.layer = layer
        self.app = app
        self.transport = TLSAcceptTransport(raw, layer)
        self._on_done: Callable[[TLSAcceptTransport | None, Exception | None], None] | None = (
            on_done
        )

    def data_received(self, data: bytes) -> None:
        layer = self.layer
        try:
            if not layer.ready:
                done = layer.handshake(data)
                out = layer.output()
                if out:
                    self.raw.write(out)
                if not done:
                    return
                self._done(self.transport, None)
                data = b""  # the rest of what came is already inside the TLS state
            plain = layer.receive(data)
        except SSL.Error as exc:
            self._done(None, exc)
            self.raw.abort()
            return
        out = layer.output()  # a TLS 1.3 key update's answer
        if out and not self.transport.is_closing():
            self.raw.write(out)
        if plain is None:
            self.transport.close()
        elif plain:
            self.app.data_received(plain)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._done(None, exc or ConnectionResetError("closed during the TLS handshake"))
        self.app.connection_lost(exc)

    def pause_writing(self) -> None:
        self.app.pause_writing()

    def resume_writing(self) -> None:
        self.app.resume_writing()

    def _done(self, transport: TLSAcceptTransport | None, exc: Exception | None) -> None:
        on_done, self._on_done = self._on_done, None
        if on_done is not None:
            on_done(transport, exc)
