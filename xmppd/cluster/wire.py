"""The bytes of a link between two cluster nodes (xmppd.cluster.link), without any I/O.

Every frame is a 4-byte big-endian length, then one byte of kind, then its
body. Before a link is authenticated a frame may be at most MAX_HELLO bytes;
after, MAX_FRAME (a data frame holds what one node queued for the other in
one turn of its event loop, split below that). Both limits apply to the
frames as they cross, sealed.

The handshake (both node names, fresh nonces and ephemeral X25519 keys of
both sides, and the mode in every MAC, a different label each way, so that
no answer can be replayed on another link or reflected back to the node that
made it, and no key or mode swapped by someone in the middle):

1. dialer -> acceptor, HELLO: {node, peer, nonce, incarnation, key, mode}
2. acceptor -> dialer, CHALLENGE: {node, nonce, key, mac: HMAC(secret, "accept", dialer,
   acceptor, dialer's nonce, acceptor's nonce, dialer's key, acceptor's key, mode)}
3. dialer -> acceptor, PROOF: {mac: HMAC(secret, "dial", ..., incarnation, dialer's key,
   acceptor's key, mode)}
4. acceptor -> dialer, WELCOME (sealed): {last}: the last data frame the acceptor
   handled from this dialer's `incarnation` (0 if none): the dialer sends again only
   those after it.

Then the dialer sends DATA frames (its sequence number, its last table change
before them, the number of its last item to the acceptor through Redis
before them, the items as an inbox entry has them) and the acceptor answers
ACK (every frame up to this number is handled) or NACK (handled up to this
number, the rest refused: this node is no longer live).

From the WELCOME on, every frame is sealed (`mode` "sealed", `Sealed`): its
body is encrypted and authenticated with AES-256-GCM, its kind byte
authenticated with it, under a key per direction and a nonce that counts the
frames of that direction. The keys are fresh per connection: HKDF-SHA256
over the X25519 shared secret of the two ephemeral keys (forward secrecy: a
recording is not readable later with the cluster secret), salted with the
cluster secret and both nonces, both node names and the direction in `info`.
A frame altered, cut, replayed, reordered, reflected or taken from another
connection does not open: WireError, the link is closed. Why not TLS: the
nodes share a secret, not certificates, and the handshake already proves it
both ways; this adds what TLS would add (secrecy, integrity per frame) for
one AEAD call per frame and direction, on frames that already gather a whole
turn of the sender's loop.

Mode "clear" (`Clear`) is for an abstract Unix socket only: the two nodes
share a kernel and there is no network path to read or alter; the handshake
still authenticates the peer. The dialer says which it dialed, the MACs
cover it, and an acceptor refuses "clear" on anything but a Unix socket
(no downgrade of a TCP link).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import struct
from collections.abc import Sequence
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

HELLO, CHALLENGE, PROOF, WELCOME = b"H", b"C", b"P", b"W"
DATA, ACK, NACK = b"D", b"A", b"N"

MAX_HELLO = 1024
"""Bytes a frame may have before the peer proved it knows the secret."""
MAX_FRAME = 16 * 1024 * 1024
"""Bytes a frame may have on an authenticated link (a stanza may be large)."""
SPLIT_AT = 1024 * 1024
"""A sender closes a data frame once it holds this many bytes of items."""

_LENGTH = struct.Struct("!I")
_DATA = struct.Struct("!QQQ")
_SEQ = struct.Struct("!Q")
_NONCE = struct.Struct("!4xQ")  # 96 bits: 32 zero, then the frame's number

SEALED, CLEAR = "sealed", "clear"


class WireError(Exception):
    """The peer sent what a link does not carry: the link is closed."""


def frame(kind: bytes, body: bytes) -> bytes:
    return _LENGTH.pack(len(body) + 1) + kind + body


class FrameReader:
    """Cuts a byte stream into (kind, body) frames; `limit` may be raised once the
    peer is authenticated."""

    def __init__(self, limit: int = MAX_HELLO) -> None:
        self.limit = limit
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """The frames `data` completes, in order; WireError on a frame past `limit`."""
        buffer = self._buffer
        buffer += data
        frames: list[tuple[bytes, bytes]] = []
        start = 0
        while len(buffer) - start >= 4:
            (length,) = _LENGTH.unpack_from(buffer, start)
            if length == 0 or length > self.limit:
                raise WireError(f"a frame of {length} bytes (at most {self.limit})")
            end = start + 4 + length
            if end > len(buffer):
                break
            frames.append((bytes(buffer[start + 4 : start + 5]), bytes(buffer[start + 5 : end])))
            start = end
        del buffer[:start]
        return frames


def data(seq: int, change: int, fields: Sequence[bytes], redis: int = 0) -> bytes:
    """A DATA frame: link sequence number `seq`, the sender's last table change `change`
    (0: none to wait for), the number of the last item the sender sent the receiver
    through Redis before these (`redis`, 0: none; the receiver handles that one first),
    the items' fields (name, value, name, value, ...)."""
    parts = [_DATA.pack(seq, change, redis)]
    for value in fields:
        parts.append(_LENGTH.pack(len(value)))
        parts.append(value)
    return frame(DATA, b"".join(parts))


def parse_data(body: bytes) -> tuple[int, int, int, list[bytes]]:
    """(seq, change, redis, fields) of a DATA frame's body."""
    if len(body) < _DATA.size:
        raise WireError("a data frame too short")
    seq, change, redis = _DATA.unpack_from(body)
    fields: list[bytes] = []
    at, end = _DATA.size, len(body)
    while at < end:
        if at + 4 > end:
            raise WireError("a data frame cut in a field length")
        (length,) = _LENGTH.unpack_from(body, at)
        at += 4
        if at + length > end:
            raise WireError("a data frame cut in a field")
        fields.append(body[at : at + length])
        at += length
    if len(fields) % 2:
        raise WireError("a data frame with a name without its value")
    return seq, change, redis, fields


def ack(kind: bytes, seq: int) -> bytes:
    """An ACK or NACK frame for everything up to `seq`."""
    return frame(kind, _SEQ.pack(seq))


def parse_seq(body: bytes) -> int:
    if len(body) != _SEQ.size:
        raise WireError("an ack of the wrong size")
    (seq,) = _SEQ.unpack(body)
    return int(seq)


def nonce() -> str:
    return secrets.token_hex(16)


def mac(secret: bytes, label: str, *parts: str) -> str:
    """HMAC-SHA256 over `label` and `parts`, each length-prefixed (no two lists of parts
    give the same bytes)."""
    return hmac.new(secret, _prefixed(label, *parts), hashlib.sha256).hexdigest()


def _prefixed(*parts: str | bytes) -> bytes:
    """`parts` joined, each after its length: no two lists of parts give the same bytes.
    A str from the peer is UTF-8 by then (`parse_message` refused any other)."""
    encoded = (part.encode() if isinstance(part, str) else part for part in parts)
    return b"".join(_LENGTH.pack(len(p)) + p for p in encoded)


def same_mac(expected: str, given: str) -> bool:
    """Whether the peer's `given` MAC (a str from its JSON) is `expected`, in constant
    time: `hmac.compare_digest` raises TypeError on a str that is not ASCII, which would
    escape as a crash of the connection instead of a refused handshake."""
    return hmac.compare_digest(expected.encode(), given.encode())


def message(kind: bytes, **fields: Any) -> bytes:
    """A handshake frame (JSON body)."""
    return frame(kind, json.dumps(fields).encode())


def parse_message(expected: bytes, kind: bytes, body: bytes, *keys: str) -> dict[str, Any]:
    """A handshake frame's fields; WireError unless it is `expected` with string `keys`
    UTF-8 can encode: JSON carries a lone surrogate ("\\ud800") that no peer's name or
    MAC holds, and that would otherwise pass as a name (a peer that is no node) or
    escape as a UnicodeEncodeError instead of a refused handshake."""
    if kind != expected:
        raise WireError(f"expected a {expected!r} frame, got {kind!r}")
    try:
        fields = json.loads(body)
    except ValueError:
        raise WireError("a handshake frame that is not JSON") from None
    if not isinstance(fields, dict) or not all(isinstance(fields.get(k), str) for k in keys):
        raise WireError(f"a handshake frame without {', '.join(keys)}")
    try:
        for key in keys:
            fields[key].encode()
    except UnicodeEncodeError:
        raise WireError(f"a handshake frame whose {key} is not UTF-8") from None
    return fields


class Clear:
    """One direction of a link in mode "clear" (an abstract Unix socket): frames as they
    are. The same calls as `Sealed`, so that the link does not ask which it has."""

    __slots__ = ()

    def seal(self, frame: bytes) -> bytes:
        return frame

    def open(self, kind: bytes, body: bytes) -> bytes:
        return body


class Sealed:
    """One direction of a link in mode "sealed": AES-256-GCM under this direction's key,
    the nonce the number of the frame in this direction (from 0). Each end keeps one for
    what it sends and one for what it reads; the nonces follow the frames, so a frame
    that is not the next one sent on this connection in this direction does not open.

    Why AES-GCM: one call per frame, a few hundred ns plus under a ns per byte where the
    CPU has AES instructions (x86-64, ARMv8), which the nodes of a cluster have."""

    __slots__ = ("_aead", "_count")

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._count = 0

    def _nonce(self) -> bytes:
        count = self._count
        self._count = count + 1  # 2**64 frames: never reached, and never reused
        return _NONCE.pack(count)

    def seal(self, frame: bytes) -> bytes:
        """`frame` (a whole frame: length, kind, body) as it crosses: the kind, then the
        body encrypted with the 16-byte tag that authenticates it and the kind."""
        view = memoryview(frame)
        kind = frame[4:5]
        sealed = self._aead.encrypt(self._nonce(), view[5:], kind)
        return _LENGTH.pack(len(sealed) + 1) + kind + sealed

    def open(self, kind: bytes, body: bytes) -> bytes:
        """The body of the frame (`kind`, `body`) that came; WireError if it does not
        authenticate as the next frame of this direction."""
        try:
            return self._aead.decrypt(self._nonce(), body, kind)
        except InvalidTag:
            raise WireError(
                "a frame that does not authenticate (altered, replayed, out of order, or "
                "sealed for another connection)"
            ) from None


Direction = Clear | Sealed


class _Ephemeral:
    """This end's X25519 key for one handshake: the public half for the peer, the shared
    secret once the peer's half is known (then the private half is dropped)."""

    def __init__(self) -> None:
        self._private: X25519PrivateKey | None = X25519PrivateKey.generate()
        self.public = self._private.public_key().public_bytes_raw().hex()

    def directions(
        self, mode: str, theirs: str, secret: bytes, dialer: str, acceptor: str,
        dialer_nonce: str, acceptor_nonce: str,
    ) -> tuple[Direction, Direction]:
        """(dialer to acceptor, acceptor to dialer) for `mode`; only after the peer's
        key is authenticated (its MAC verified)."""
        private, self._private = self._private, None
        if mode == CLEAR:
            return Clear(), Clear()
        assert private is not None, "one handshake, one key exchange"
        try:
            shared = private.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(theirs)))
        except ValueError:  # not hex, not 32 bytes, or a low-order point
            raise WireError("an ephemeral key that is not an X25519 public key") from None
        salt = _prefixed(secret, dialer_nonce, acceptor_nonce)

        def key(label: str) -> Sealed:
            info = _prefixed(label, dialer, acceptor)
            return Sealed(HKDF(hashes.SHA256(), 32, salt, info).derive(shared))

        return key("xmppd link: dialer to acceptor"), key("xmppd link: acceptor to dialer")


class Dialer:
    """The dialing side's handshake: `hello(sealed)` first, then `answer` each frame until
    `last` is set (the acceptor's WELCOME); then `send` seals what this side sends and
    `receive` opens what it reads. WireError on any failure."""

    def __init__(self, secret: bytes, node: str, peer: str, incarnation: str) -> None:
        self.secret = secret
        self.node = node
        self.peer = peer
        self.incarnation = incarnation
        self.nonce = nonce()
        self.mode = SEALED
        self.last: int | None = None
        self.send: Direction = Clear()
        self.receive: Direction = Clear()
        self._key = _Ephemeral()
        self._their_nonce: str | None = None

    def hello(self, sealed: bool = True) -> bytes:
        """The first frame. `sealed` False only on a Unix socket this node dialed (the
        acceptor refuses it on any other)."""
        self.mode = SEALED if sealed else CLEAR
        return message(
            HELLO, node=self.node, peer=self.peer, nonce=self.nonce,
            incarnation=self.incarnation, key=self._key.public, mode=self.mode,
        )

    def answer(self, kind: bytes, body: bytes) -> bytes | None:
        if self._their_nonce is None:
            fields = parse_message(CHALLENGE, kind, body, "node", "nonce", "key", "mac")
            if fields["node"] != self.peer:
                raise WireError(f"expected node {self.peer}, reached {fields['node']!r}")
            their, their_key = fields["nonce"], fields["key"]
            expected = mac(
                self.secret, "accept", self.node, self.peer, self.nonce, their,
                self._key.public, their_key, self.mode,
            )
            if not same_mac(expected, fields["mac"]):
                raise WireError("the peer does not know the cluster secret")
            self.send, self.receive = self._key.directions(
                self.mode, their_key, self.secret, self.node, self.peer, self.nonce, their
            )
            self._their_nonce = their
            proof = mac(
                self.secret, "dial", self.node, self.peer, self.nonce, their, self.incarnation,
                self._key.public, their_key, self.mode,
            )
            return message(PROOF, mac=proof)
        if self.last is not None:
            raise WireError("a handshake frame after the handshake")
        last = parse_message(WELCOME, kind, self.receive.open(kind, body)).get("last")
        if not isinstance(last, int) or last < 0:
            raise WireError("a welcome without the last frame handled")
        self.last = last
        return None


class Acceptor:
    """The accepting side's handshake: `answer` each frame; once `peer` and
    `incarnation` are set, `welcome(last)` is the frame that ends it, and `send` seals
    what this side sends, `receive` opens what it reads. `clear`: the connection is an
    abstract Unix socket, where the dialer may ask for mode "clear"."""

    def __init__(self, secret: bytes, node: str, clear: bool = False) -> None:
        self.secret = secret
        self.node = node
        self.clear = clear
        self.nonce = nonce()
        self.peer: str | None = None
        self.incarnation: str | None = None
        self.send: Direction = Clear()
        self.receive: Direction = Clear()
        self._key = _Ephemeral()
        self._hello: dict[str, Any] | None = None

    def answer(self, kind: bytes, body: bytes) -> bytes | None:
        if self._hello is None:
            hello = parse_message(
                HELLO, kind, body, "node", "peer", "nonce", "incarnation", "key", "mode"
            )
            if hello["peer"] != self.node:
                raise WireError(f"dialed node {hello['peer']!r}, this is {self.node}")
            if hello["node"] == self.node:
                raise WireError("a link from a node of this node's own name")
            if hello["mode"] not in (SEALED, CLEAR):
                raise WireError(f"a link in mode {hello['mode']!r}")
            if hello["mode"] == CLEAR and not self.clear:
                raise WireError("a link in clear on a connection that is not a Unix socket")
            self._hello = hello
            proof = mac(
                self.secret, "accept", hello["node"], self.node, hello["nonce"], self.nonce,
                hello["key"], self._key.public, hello["mode"],
            )
            return message(CHALLENGE, node=self.node, nonce=self.nonce, key=self._key.public,
                           mac=proof)
        if self.peer is not None:
            raise WireError("a handshake frame after the handshake")
        fields = parse_message(PROOF, kind, body, "mac")
        hello = self._hello
        expected = mac(
            self.secret, "dial", hello["node"], self.node, hello["nonce"], self.nonce,
            hello["incarnation"], hello["key"], self._key.public, hello["mode"],
        )
        if not same_mac(expected, fields["mac"]):
            raise WireError(f"node {hello['node']!r} does not know the cluster secret")
        self.receive, self.send = self._key.directions(
            hello["mode"], hello["key"], self.secret, hello["node"], self.node,
            hello["nonce"], self.nonce,
        )
        self.peer = hello["node"]
        self.incarnation = hello["incarnation"]
        return None

    def welcome(self, last: int) -> bytes:
        return self.send.seal(message(WELCOME, last=last))
