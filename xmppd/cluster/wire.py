"""The bytes of a link between two cluster nodes (xmppd.cluster.link), without any I/O.

Every frame is a 4-byte big-endian length, then one byte of kind, then its
body. Before a link is authenticated a frame may be at most MAX_HELLO bytes;
after, MAX_FRAME (a data frame holds what one node queued for the other in
one turn of its event loop, split below that).

The handshake (both node names and fresh nonces of both sides in every MAC,
a different label each way, so that no answer can be replayed on another
link or reflected back to the node that made it):

1. dialer -> acceptor, HELLO: {node, peer, nonce, incarnation}
2. acceptor -> dialer, CHALLENGE: {node, nonce, mac: HMAC(secret, "accept", dialer, acceptor,
   dialer's nonce, acceptor's nonce)}
3. dialer -> acceptor, PROOF: {mac: HMAC(secret, "dial", ..., incarnation)}
4. acceptor -> dialer, WELCOME: {last}: the last data frame the acceptor handled from
   this dialer's `incarnation` (0 if none): the dialer sends again only those after it.

Then the dialer sends DATA frames (its sequence number, its last table change
before them, the number of its last item to the acceptor through Redis
before them, the items as an inbox entry has them) and the acceptor answers
ACK (every frame up to this number is handled) or NACK (handled up to this
number, the rest refused: this node is no longer live).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import struct
from collections.abc import Sequence
from typing import Any

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
    message = b"".join(
        _LENGTH.pack(len(p)) + p for p in (part.encode() for part in (label, *parts))
    )
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def same_mac(expected: str, given: str) -> bool:
    """Whether the peer's `given` MAC (a str from its JSON) is `expected`, in constant
    time: `hmac.compare_digest` raises TypeError on a str that is not ASCII, which would
    escape as a crash of the connection instead of a refused handshake."""
    return hmac.compare_digest(expected.encode(), given.encode("utf-8", "surrogatepass"))


def message(kind: bytes, **fields: Any) -> bytes:
    """A handshake frame (JSON body)."""
    return frame(kind, json.dumps(fields).encode())


def parse_message(expected: bytes, kind: bytes, body: bytes, *keys: str) -> dict[str, Any]:
    """A handshake frame's fields; WireError unless it is `expected` with string `keys`."""
    if kind != expected:
        raise WireError(f"expected a {expected!r} frame, got {kind!r}")
    try:
        fields = json.loads(body)
    except ValueError:
        raise WireError("a handshake frame that is not JSON") from None
    if not isinstance(fields, dict) or not all(isinstance(fields.get(k), str) for k in keys):
        raise WireError(f"a handshake frame without {', '.join(keys)}")
    return fields


class Dialer:
    """The dialing side's handshake: `hello()` first, then `answer` each frame until
    `last` is set (the acceptor's WELCOME). WireError on any failure."""

    def __init__(self, secret: bytes, node: str, peer: str, incarnation: str) -> None:
        self.secret = secret
        self.node = node
        self.peer = peer
        self.incarnation = incarnation
        self.nonce = nonce()
        self.last: int | None = None
        self._their_nonce: str | None = None

    def hello(self) -> bytes:
        return message(
            HELLO, node=self.node, peer=self.peer, nonce=self.nonce, incarnation=self.incarnation
        )

    def answer(self, kind: bytes, body: bytes) -> bytes | None:
        if self._their_nonce is None:
            fields = parse_message(CHALLENGE, kind, body, "node", "nonce", "mac")
            if fields["node"] != self.peer:
                raise WireError(f"expected node {self.peer}, reached {fields['node']!r}")
            their = fields["nonce"]
            expected = mac(self.secret, "accept", self.node, self.peer, self.nonce, their)
            if not same_mac(expected, fields["mac"]):
                raise WireError("the peer does not know the cluster secret")
            self._their_nonce = their
            proof = mac(
                self.secret, "dial", self.node, self.peer, self.nonce, their, self.incarnation
            )
            return message(PROOF, mac=proof)
        last = parse_message(WELCOME, kind, body).get("last")
        if not isinstance(last, int) or last < 0:
            raise WireError("a welcome without the last frame handled")
        self.last = last
        return None


class Acceptor:
    """The accepting side's handshake: `answer` each frame; once `peer` and
    `incarnation` are set, `welcome(last)` is the frame that ends it."""

    def __init__(self, secret: bytes, node: str) -> None:
        self.secret = secret
        self.node = node
        self.nonce = nonce()
        self.peer: str | None = None
        self.incarnation: str | None = None
        self._hello: dict[str, Any] | None = None

    def answer(self, kind: bytes, body: bytes) -> bytes | None:
        if self._hello is None:
            hello = parse_message(HELLO, kind, body, "node", "peer", "nonce", "incarnation")
            if hello["peer"] != self.node:
                raise WireError(f"dialed node {hello['peer']!r}, this is {self.node}")
            if hello["node"] == self.node:
                raise WireError("a link from a node of this node's own name")
            self._hello = hello
            proof = mac(self.secret, "accept", hello["node"], self.node, hello["nonce"], self.nonce)
            return message(CHALLENGE, node=self.node, nonce=self.nonce, mac=proof)
        if self.peer is not None:
            raise WireError("a handshake frame after the handshake")
        fields = parse_message(PROOF, kind, body, "mac")
        hello = self._hello
        expected = mac(
            self.secret, "dial", hello["node"], self.node, hello["nonce"], self.nonce,
            hello["incarnation"],
        )
        if not same_mac(expected, fields["mac"]):
            raise WireError(f"node {hello['node']!r} does not know the cluster secret")
        self.peer = hello["node"]
        self.incarnation = hello["incarnation"]
        return None

    def welcome(self, last: int) -> bytes:
        return message(WELCOME, last=last)
