"""TLSLayer against a real client ssl.SSLObject, bytes passed by hand: every branch of receive()."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from xmppd.tls import ensure_self_signed, server_tls
from xmppd.tlslayer import TLSLayer


class Client:
    def __init__(self) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["xmpp-client"])
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")

    def records(self, data: bytes) -> bytes:
        self.tls.write(data)
        return self.outgoing.read()

    def read(self) -> bytes:
        out = b""
        while True:
            try:
                out += self.tls.read(65536)
            except ssl.SSLWantReadError:
                return out


@pytest.fixture
def pair(tmp_path: Path) -> tuple[TLSLayer, Client]:
    cert, key = ensure_self_signed(tmp_path, ["localhost"])
    server, client = TLSLayer(server_tls(cert, key).context), Client()
    while True:
        try:
            client.tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        if server.ready and client.tls.version():
            break
        server.handshake(client.outgoing.read())
        client.incoming.write(server.output())
    return server, client


def test_handshake_gives_what_the_connection_asks_once(pair: tuple[TLSLayer, Client]) -> None:
    server, client = pair
    assert server.ssl_object.version() == "TLSv1.3"
    assert server.ssl_object.selected_alpn_protocol() == "xmpp-client"  # XEP-0368


def test_receive_one_record_several_records_and_a_split_one(
    pair: tuple[TLSLayer, Client],
) -> None:
    server, client = pair
    assert server.receive(client.records(b"<a/>")) == b"<a/>"
    several = client.records(b"<b/>") + client.records(b"<c/>") + client.records(b"<d/>")
    assert server.receive(several) == b"<b/><c/><d/>"
    split = client.records(b"<e>" + b"x" * 1000 + b"</e>")
    assert server.receive(split[:7]) == b""  # not even a record header yet
    assert server.receive(split[7:500]) == b""
    assert server.receive(split[500:] + client.records(b"<f/>")[:10]) == (
        b"<e>" + b"x" * 1000 + b"</e>"
    )


def test_larger_than_the_shared_buffer(pair: tuple[TLSLayer, Client]) -> None:
    server, client = pair
    big = bytes(range(256)) * 1024  # 256 KiB: 16 records, four buffers' worth
    assert server.receive(client.records(big)) == big


def test_encrypt_reaches_the_client(pair: tuple[TLSLayer, Client]) -> None:
    server, client = pair
    client.incoming.write(server.encrypt(b"<message/>"))
    assert client.read() == b"<message/>"


def test_close_notify_both_ways(pair: tuple[TLSLayer, Client]) -> None:
    server, client = pair
    try:
        client.tls.unwrap()
    except ssl.SSLWantReadError:
        pass
    assert server.receive(client.outgoing.read()) is None
    client.incoming.write(server.shutdown())
    with pytest.raises(ssl.SSLZeroReturnError):
        client.tls.read(10)


def test_a_tampered_record_is_an_error(pair: tuple[TLSLayer, Client]) -> None:
    server, client = pair
    record = bytearray(client.records(b"<message/>"))
    record[-1] ^= 1
    with pytest.raises(ssl.SSLError):
        server.receive(bytes(record))
