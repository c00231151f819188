"""The PROXY protocol header parser (xmppd.proxyproto.parse): both versions, a header
split across reads, a balancer's own connection, and what is not a header."""

from __future__ import annotations

import struct

import pytest

from xmppd.proxyproto import V2_SIGNATURE, ProxyHeaderError, parse


def v2(command: int, family: int, addresses: bytes) -> bytes:
    return V2_SIGNATURE + struct.pack("!BBH", 0x20 | command, family, len(addresses)) + addresses


V4 = bytes([192, 0, 2, 7]) + bytes([10, 0, 0, 1]) + struct.pack("!HH", 40000, 5223)
V6 = (bytes.fromhex("20010db8000000000000000000000007") + bytes(16)
      + struct.pack("!HH", 40000, 5223))


def test_version_1_tcp4_and_tcp6() -> None:
    line = b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 5223\r\n"
    assert parse(line + b"<?xml") == ("192.0.2.7", len(line))
    line6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 5223\r\n"
    assert parse(line6) == ("2001:db8::7", len(line6))


def test_version_2_ipv4_ipv6_and_tlvs() -> None:
    header = v2(1, 0x11, V4)
    assert parse(header + b"\x16\x03\x01") == ("192.0.2.7", len(header))
    assert parse(v2(1, 0x21, V6)) == ("2001:db8::7", 16 + len(V6))
    with_tlv = v2(1, 0x11, V4 + b"\x04\x00\x02ab")  # a TLV after the addresses: skipped
    assert parse(with_tlv) == ("192.0.2.7", len(with_tlv))


def test_the_balancers_own_connection_keeps_its_address() -> None:
    assert parse(b"PROXY UNKNOWN\r\n") == (None, 15)
    assert parse(v2(0, 0x00, b"")) == (None, 16)  # LOCAL: a health check


@pytest.mark.parametrize("header", [
    b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 5223\r\n",
    v2(1, 0x11, V4),
])
def test_a_header_split_anywhere_waits_for_the_rest(header: bytes) -> None:
    for cut in range(len(header)):
        assert parse(header[:cut]) is None, cut
    assert parse(header) == ("192.0.2.7", len(header))


@pytest.mark.parametrize("data", [
    b"<?xml version='1.0'?>",  # a client straight to the node, past the balancer
    b"\x16\x03\x01\x02\x00",  # a TLS ClientHello
    b"PROXY TCP4 192.0.2.7 10.0.0.1 40000\r\n",  # a field missing
    b"PROXY TCP4 2001:db8::7 10.0.0.1 40000 5223\r\n",  # the family says otherwise
    b"PROXY TCP4 not-an-ip 10.0.0.1 40000 5223\r\n",
    b"PROXY " + b"x" * 120,  # no end of line within the bound
    v2(1, 0x31, bytes(216)),  # AF_UNIX: no client address
    V2_SIGNATURE + b"\x11\x11\x00\x0c" + V4,  # version 1 in a version 2 header
    v2(1, 0x11, V4[:8]),  # shorter than IPv4's addresses
])
def test_what_is_not_a_header_is_refused(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(data)
