"""The bytes of a link between cluster nodes (xmppd.cluster.wire): framing, data frames
and the handshake, without sockets."""

from __future__ import annotations

import pytest

from xmppd.cluster import wire

SECRET = b"k" * 32


def test_frames_cut_from_a_stream_in_any_pieces() -> None:
    stream = wire.frame(b"X", b"one") + wire.ack(wire.ACK, 7) + wire.frame(b"Y", b"")
    reader = wire.FrameReader()
    frames = []
    for n in range(len(stream)):
        frames += reader.feed(stream[n : n + 1])
    assert frames == [(b"X", b"one"), (wire.ACK, (7).to_bytes(8, "big")), (b"Y", b"")]
    assert wire.parse_seq(frames[1][1]) == 7


def test_a_frame_past_the_limit_is_refused_before_it_is_read() -> None:
    reader = wire.FrameReader(wire.MAX_HELLO)
    with pytest.raises(wire.WireError):
        reader.feed((wire.MAX_HELLO + 1).to_bytes(4, "big"))
    reader = wire.FrameReader(wire.MAX_HELLO)
    reader.limit = wire.MAX_FRAME  # raised once the peer is authenticated
    assert reader.feed(wire.frame(b"D", b"x" * wire.MAX_HELLO)) == [(b"D", b"x" * wire.MAX_HELLO)]


def test_a_data_frame_carries_seq_change_and_fields() -> None:
    fields = [b"to", b"bob@localhost/phone", b"stanza", b"<message/>", b"hops", b"1"]
    (kind, body), = wire.FrameReader(wire.MAX_FRAME).feed(wire.data(5, 1234, fields))
    assert kind == wire.DATA
    assert wire.parse_data(body) == (5, 1234, 0, fields)
    after = wire.data(6, 0, fields, redis=99)[5:]
    assert wire.parse_data(after) == (6, 0, 99, fields)


@pytest.mark.parametrize("cut", [20, 25, 30])
def test_a_truncated_data_frame_is_an_error(cut: int) -> None:
    body = wire.data(1, 0, [b"to", b"bob@localhost/phone"])[5:]
    with pytest.raises(wire.WireError):
        wire.parse_data(body[:cut])


def handshake(
    dialer: wire.Dialer, acceptor: wire.Acceptor, last: int = 0
) -> None:
    """Run the four steps, frame by frame."""
    def one(data: bytes) -> tuple[bytes, bytes]:
        (frame,) = wire.FrameReader().feed(data)
        return frame

    challenge = acceptor.answer(*one(dialer.hello()))
    assert challenge is not None
    proof = dialer.answer(*one(challenge))
    assert proof is not None
    assert acceptor.answer(*one(proof)) is None
    assert dialer.answer(*one(acceptor.welcome(last))) is None


def test_a_handshake_with_the_same_secret_names_both_ends() -> None:
    dialer = wire.Dialer(SECRET, "node-a", "node-b", "inc-1")
    acceptor = wire.Acceptor(SECRET, "node-b")
    handshake(dialer, acceptor, last=41)
    assert acceptor.peer == "node-a" and acceptor.incarnation == "inc-1"
    assert dialer.last == 41


def test_an_acceptor_without_the_secret_is_found_out_by_the_dialer() -> None:
    dialer = wire.Dialer(SECRET, "node-a", "node-b", "inc-1")
    acceptor = wire.Acceptor(b"other" * 8, "node-b")
    with pytest.raises(wire.WireError, match="secret"):
        handshake(dialer, acceptor)


def test_a_dialer_without_the_secret_is_refused() -> None:
    acceptor = wire.Acceptor(SECRET, "node-b")
    (hello,) = wire.FrameReader().feed(
        wire.Dialer(b"other" * 8, "node-a", "node-b", "inc-1").hello()
    )
    assert acceptor.answer(*hello) is not None
    forged = wire.mac(b"other" * 8, "dial", "node-a", "node-b", "n", acceptor.nonce, "inc-1")
    with pytest.raises(wire.WireError, match="secret"):
        acceptor.answer(wire.PROOF, f'{{"mac": "{forged}"}}'.encode())
    assert acceptor.peer is None


@pytest.mark.parametrize("given", [r'"\u00e9t\u00e9"', r'"\ud800"'])
def test_a_proof_whose_mac_is_not_ascii_text_is_a_refused_handshake(given: str) -> None:
    """Not a TypeError out of hmac.compare_digest (a crash of the connection, not
    counted as an authentication failure)."""
    acceptor = wire.Acceptor(SECRET, "node-b")
    (hello,) = wire.FrameReader().feed(wire.Dialer(SECRET, "node-a", "node-b", "i").hello())
    assert acceptor.answer(*hello) is not None
    with pytest.raises(wire.WireError, match="secret"):
        acceptor.answer(wire.PROOF, f'{{"mac": {given}}}'.encode())
    dialer = wire.Dialer(SECRET, "node-a", "node-b", "i")
    challenge = wire.FrameReader().feed(
        wire.frame(wire.CHALLENGE, f'{{"node": "node-b", "nonce": "n", "mac": {given}}}'.encode())
    )
    with pytest.raises(wire.WireError, match="secret"):
        dialer.answer(*challenge[0])


def test_the_acceptor_s_own_answer_reflected_back_is_no_proof() -> None:
    """The challenge's MAC, sent back as the proof: different label, refused."""
    dialer = wire.Dialer(SECRET, "node-a", "node-b", "inc-1")
    acceptor = wire.Acceptor(SECRET, "node-b")
    (hello,) = wire.FrameReader().feed(dialer.hello())
    challenge = acceptor.answer(*hello)
    assert challenge is not None
    (kind, body), = wire.FrameReader().feed(challenge)
    reflected = wire.parse_message(wire.CHALLENGE, kind, body, "mac")["mac"]
    with pytest.raises(wire.WireError):
        acceptor.answer(wire.PROOF, f'{{"mac": "{reflected}"}}'.encode())


def test_a_recorded_proof_is_refused_on_a_new_handshake() -> None:
    """Fresh nonces each side: a proof from one handshake replayed on another fails."""
    dialer = wire.Dialer(SECRET, "node-a", "node-b", "inc-1")
    first = wire.Acceptor(SECRET, "node-b")
    (hello,) = wire.FrameReader().feed(dialer.hello())
    challenge = first.answer(*hello)
    assert challenge is not None
    proof = dialer.answer(*wire.FrameReader().feed(challenge)[0])
    assert proof is not None
    second = wire.Acceptor(SECRET, "node-b")
    assert second.answer(*hello) is not None  # the hello replayed too
    with pytest.raises(wire.WireError, match="secret"):
        second.answer(*wire.FrameReader().feed(proof)[0])


def test_a_link_to_the_wrong_node_is_refused_both_ways() -> None:
    acceptor = wire.Acceptor(SECRET, "node-c")
    (hello,) = wire.FrameReader().feed(wire.Dialer(SECRET, "node-a", "node-b", "i").hello())
    with pytest.raises(wire.WireError, match="dialed"):
        acceptor.answer(*hello)
    dialer = wire.Dialer(SECRET, "node-a", "node-b", "i")
    other = wire.Acceptor(SECRET, "node-c")
    hello_c = wire.message(wire.HELLO, node="node-a", peer="node-c", nonce=dialer.nonce,
                           incarnation="i")
    challenge = other.answer(*wire.FrameReader().feed(hello_c)[0])
    assert challenge is not None
    with pytest.raises(wire.WireError, match="expected node"):
        dialer.answer(*wire.FrameReader().feed(challenge)[0])


def test_a_handshake_frame_of_the_wrong_kind_or_shape_is_an_error() -> None:
    acceptor = wire.Acceptor(SECRET, "node-b")
    with pytest.raises(wire.WireError):
        acceptor.answer(wire.DATA, b"")
    with pytest.raises(wire.WireError):
        acceptor.answer(wire.HELLO, b"not json")
    with pytest.raises(wire.WireError):
        acceptor.answer(wire.HELLO, b'{"node": 1}')
