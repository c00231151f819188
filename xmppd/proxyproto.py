"""The PROXY protocol (HAProxy's, versions 1 and 2): who the client is, behind a load balancer.

A load balancer in front of a cluster connects to the nodes itself, so
without this every client has the balancer's address: the login throttle
would ban everybody for one stranger's wrong passwords, the per-address
connection limit would count all clients as one, and logs would name the
balancer (an s2s listener's peer servers likewise: its per-address limit
and logs; xmppd/proxyoptions.py has the options both kinds of listener
share). With `proxy_protocol: true` on a listener the balancer (haproxy
`send-proxy` or `send-proxy-v2`, nginx `proxy_protocol on`) sends one
header before the client's bytes naming the client's address, and the node
uses that address for everything.

Only connections from `trusted_proxies` may send it: the header is a claim
anyone could make, so a connection from anywhere else is refused, as is one
whose first bytes are not a header (within HEADER_TIMEOUT). A LOCAL (v2) or
UNKNOWN (v1) header, a balancer's own health check, keeps the connection's
own address.

`ProxyHeaderReader` is the listener's protocol until the header is read;
then it hands the transport, and whatever followed the header in the same
read, to the real connection (or to the TLS layer an s2s connection put in
front of itself), so the stanza path pays nothing for it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import struct
from collections.abc import Callable, Sequence
from typing import Protocol

log = logging.getLogger(__name__)

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # bytes of a version 1 line, CRLF included (the specification's bound)
V2_MAX_ADDRESSES = 4096  # bytes of addresses and TLVs accepted after a v2 header
HEADER_TIMEOUT = 10.0
"""Seconds a connection may take to send its header: a balancer sends it at once."""
_ADDRESSES = {0x11: 12, 0x21: 36}
"""Bytes of a v2 header's addresses for TCP over IPv4 and over IPv6: source, destination
and their ports."""

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ProxyHeaderError(ValueError):
    """The bytes are not a PROXY protocol header."""


def parse(data: bytes) -> tuple[str | None, int] | None:
    """The client's address in the header that `data` starts with (None: the proxy's
    own connection, LOCAL or UNKNOWN) and the header's length; None while `data` is
    too short to tell. Raises ProxyHeaderError if it is not a header."""
    if data.startswith(V2_SIGNATURE[: len(data)]) and len(data) < len(V2_SIGNATURE):
        return None  # could still be either version's start
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    if data.startswith(b"PROXY "[: len(data)]):
        return _parse_v1(data)
    raise ProxyHeaderError("no PROXY protocol header")


def _parse_v1(data: bytes) -> tuple[str | None, int] | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError("PROXY line too long")
        return None
    fields = data[:end].split(b" ")
    if fields[1:2] == [b"UNKNOWN"]:
        return None, end + 2
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("malformed PROXY line")
    try:
        source = ipaddress.ip_address(fields[2].decode("ascii"))
        int(fields[4])
    except ValueError:
        raise ProxyHeaderError("malformed address in the PROXY line") from None
    if (source.version == 4) != (fields[1] == b"TCP4"):
        raise ProxyHeaderError("address family does not match the PROXY line")
    return str(source), end + 2


def _parse_v2(data: bytes) -> tuple[str | None, int] | None:
    if len(data) < 16:
        return None
    version_command, family, length = struct.unpack_from("!BBH", data, 12)
    if version_command >> 4 != 2:
        raise ProxyHeaderError(f"PROXY protocol version {version_command >> 4}")
    if length > V2_MAX_ADDRESSES:
        raise ProxyHeaderError("PROXY header too long")
    total = 16 + length
    if len(data) < total:
        return None
    command = version_command & 0x0F
    if command == 0:  # LOCAL: the balancer's own connection (a health check)
        return None, total
    if command != 1:
        raise ProxyHeaderError(f"PROXY command {command}")
    if family == 0x00:  # UNSPEC: no address to take
        return None, total
    size = _ADDRESSES.get(family)
    if size is None:
        raise ProxyHeaderError(f"PROXY address family {family:#04x} is not TCP")
    if length < size:
        raise ProxyHeaderError("PROXY addresses cut short")
    source = data[16 : 16 + (size - 4) // 2]
    return str(ipaddress.ip_address(source)), total



class Connection(Protocol):
    """What the header is read for: a client connection that may be told its address."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None: ...
    def data_received(self, data: bytes) -> None: ...


class ProxyHeaderReader(asyncio.Protocol):
    """The protocol of a connection to a `proxy_protocol` listener until its header is
    read: then `make(client address or None)` builds the real connection, which gets
    the transport and the bytes that followed the header."""

    def __init__(
        self, trusted: Sequence[Network], make: Callable[[str | None], Connection]
    ) -> None:
        self.trusted = trusted
        self.make = make
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.buffer = b""
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else "?"
        if not _trusted(self.peer, self.trusted):
            self._refuse("the address is not in trusted_proxies")
            return
        self.timer = asyncio.get_running_loop().call_later(
            HEADER_TIMEOUT, self._refuse, "no PROXY header in time"
        )

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            found = parse(self.buffer)
        except ProxyHeaderError as exc:
            self._refuse(str(exc))
            return
        if found is None:
            return
        client, length = found
        if self.timer is not None:
            self.timer.cancel()
        assert self.transport is not None
        connection = self.make(client)
        self.transport.set_protocol(connection)  # type: ignore[arg-type]
        connection.connection_made(self.transport)
        rest, self.buffer = self.buffer[length:], b""
        if rest and not self.transport.is_closing():
            # To whatever reads the transport now: connection_made may have put a layer
            # of its own in front of the connection (an s2s direct TLS listener's).
            self.transport.get_protocol().data_received(rest)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def _refuse(self, why: str) -> None:
        # No conn=: no client connection exists yet (it is made from the header).
        log.warning(
            "refused a connection from %s on a PROXY protocol listener: %s", self.peer, why,
            extra={"event": "connection-refused", "address": self.peer, "reason": why},
        )
        if self.transport is not None:
            self.transport.abort()


def _trusted(address: str, trusted: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)
