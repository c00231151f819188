"""The bytes of a link between cluster nodes (xmppd.cluster.wire): framing, data frames
and the handshake, without sockets."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

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
    counted as an authentication failure): a refusal, as a wrong MAC or, for a lone
    surrogate, as text UTF-8 cannot encode."""
    acceptor = wire.Acceptor(SECRET, "node-b")
    (hello,) = wire.FrameReader().feed(wire.Dialer(SECRET, "node-a", "node-b", "i").hello())
    assert acceptor.answer(*hello) is not None
    with pytest.raises(wire.WireError, match="secret|mac is not UTF-8"):
        acceptor.answer(wire.PROOF, f'{{"mac": {given}}}'.encode())
    dialer = wire.Dialer(SECRET, "node-a", "node-b", "i")
    challenge = wire.FrameReader().feed(
        wire.frame(
            wire.CHALLENGE,
            f'{{"node": "node-b", "nonce": "n", "key": "00", "mac": {given}}}'.encode(),
        )
    )
    with pytest.raises(wire.WireError, match="secret|mac is not UTF-8"):
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
                           incarnation="i", key=dialer._key.public, mode=wire.SEALED)
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


def one_frame(data: bytes, limit: int = wire.MAX_FRAME) -> tuple[bytes, bytes]:
    (frame,) = wire.FrameReader(limit).feed(data)
    return frame


def linked(last: int = 0) -> tuple[wire.Dialer, wire.Acceptor]:
    dialer = wire.Dialer(SECRET, "node-a", "node-b", "inc-1")
    acceptor = wire.Acceptor(SECRET, "node-b")
    handshake(dialer, acceptor, last)
    return dialer, acceptor


STANZA = b"<message to='bob@localhost/phone'><body>a secret of bob's</body></message>"
FIELDS = [b"to", b"bob@localhost/phone", b"stanza", STANZA, b"hops", b"1"]


def test_after_the_handshake_frames_are_sealed_both_ways() -> None:
    """Data one way, acks the other: each opens on the other end, as it was, and what
    crosses holds nothing of it in clear."""
    dialer, acceptor = linked(last=3)
    assert dialer.last == 3  # the welcome, sealed, opened
    for seq in (4, 5, 6):
        sealed = dialer.send.seal(wire.data(seq, 7, FIELDS, redis=2))
        assert b"secret" not in sealed and b"bob@localhost" not in sealed
        kind, body = one_frame(sealed)
        assert kind == wire.DATA
        assert wire.parse_data(acceptor.receive.open(kind, body)) == (seq, 7, 2, FIELDS)
    kind, body = one_frame(acceptor.send.seal(wire.ack(wire.ACK, 6)))
    assert kind == wire.ACK and wire.parse_seq(dialer.receive.open(kind, body)) == 6
    # Every frame read whole before it is opened: the limits are on the sealed frames.
    sealed = dialer.send.seal(wire.data(7, 0, FIELDS))
    assert len(sealed) == len(wire.data(7, 0, FIELDS)) + 16
    with pytest.raises(wire.WireError):
        wire.FrameReader(len(sealed) - 5).feed(sealed)


@pytest.mark.parametrize("at", [4, 5, 20, -1])
def test_a_sealed_frame_with_a_bit_flipped_is_refused(at: int) -> None:
    """In the kind (authenticated with the body), the body or the tag."""
    dialer, acceptor = linked()
    altered = bytearray(dialer.send.seal(wire.data(1, 0, FIELDS)))
    altered[at] ^= 0x01
    kind, body = one_frame(bytes(altered))
    with pytest.raises(wire.WireError, match="authenticate"):
        acceptor.receive.open(kind, body)


def test_a_sealed_frame_replayed_or_out_of_order_is_refused() -> None:
    dialer, acceptor = linked()
    first = one_frame(dialer.send.seal(wire.data(1, 0, FIELDS)))
    assert wire.parse_data(acceptor.receive.open(*first))[0] == 1
    with pytest.raises(wire.WireError, match="authenticate"):
        acceptor.receive.open(*first)  # replayed
    dialer, acceptor = linked()
    dialer.send.seal(wire.data(1, 0, FIELDS))  # dropped on the way, or held back
    second = one_frame(dialer.send.seal(wire.data(2, 0, FIELDS)))
    with pytest.raises(wire.WireError, match="authenticate"):
        acceptor.receive.open(*second)


def test_a_frame_sealed_for_another_connection_or_reflected_is_refused() -> None:
    """Keys fresh per connection (same secret, nodes, incarnation), one per direction."""
    dialer, acceptor = linked()
    other_dialer, _ = linked()
    kind, body = one_frame(other_dialer.send.seal(wire.data(1, 0, FIELDS)))
    with pytest.raises(wire.WireError, match="authenticate"):
        acceptor.receive.open(kind, body)
    # This side's own frame, back at it, where the number of the frame would fit (the
    # dialer opened one frame, the welcome; this is its second).
    dialer.send.seal(wire.data(1, 0, FIELDS))
    kind, body = one_frame(dialer.send.seal(wire.data(2, 0, FIELDS)))
    with pytest.raises(wire.WireError, match="authenticate"):
        dialer.receive.open(kind, body)


def swap_key(data: bytes, key: str) -> tuple[bytes, bytes]:
    """A handshake frame with its `key` replaced, as someone in the middle would."""
    kind, body = one_frame(data, wire.MAX_HELLO)
    fields = json.loads(body)
    fields["key"] = key
    return kind, json.dumps(fields).encode()


def test_an_ephemeral_key_swapped_in_the_handshake_is_refused() -> None:
    """Someone in the middle with keys of their own (and without the secret) would read
    everything: the MACs cover both keys, so either swap fails the handshake."""
    mallory = X25519PrivateKey.generate().public_key().public_bytes_raw().hex()
    dialer = wire.Dialer(SECRET, "node-a", "node-b", "inc-1")
    acceptor = wire.Acceptor(SECRET, "node-b")
    challenge = acceptor.answer(*swap_key(dialer.hello(), mallory))  # the dialer's key
    assert challenge is not None
    with pytest.raises(wire.WireError, match="secret"):
        dialer.answer(*one_frame(challenge))
    dialer = wire.Dialer(SECRET, "node-a", "node-b", "inc-1")
    acceptor = wire.Acceptor(SECRET, "node-b")
    challenge = acceptor.answer(*one_frame(dialer.hello()))
    assert challenge is not None
    with pytest.raises(wire.WireError, match="secret"):
        dialer.answer(*swap_key(challenge, mallory))  # the acceptor's key
    # And the dialer's proof, if it had answered a swapped challenge, does not verify.
    dialer = wire.Dialer(SECRET, "node-a", "node-b", "inc-1")
    acceptor = wire.Acceptor(SECRET, "node-b")
    hello = dialer.hello()
    challenge = acceptor.answer(*one_frame(hello))
    assert challenge is not None
    proof = dialer.answer(*one_frame(challenge))
    assert proof is not None
    relayed = wire.Acceptor(SECRET, "node-b")
    relayed.nonce = acceptor.nonce
    assert relayed.answer(*one_frame(hello)) is not None  # same nonces, another key
    with pytest.raises(wire.WireError, match="secret"):
        relayed.answer(*one_frame(proof))


def test_a_link_in_clear_only_on_a_unix_socket() -> None:
    """The acceptor on TCP refuses a dialer asking for clear (a downgrade), and someone
    in the middle who turns a sealed hello into a clear one fails the MACs."""
    dialer = wire.Dialer(SECRET, "node-a", "node-b", "inc-1")
    with pytest.raises(wire.WireError, match="clear"):
        wire.Acceptor(SECRET, "node-b").answer(*one_frame(dialer.hello(sealed=False)))

    dialer = wire.Dialer(SECRET, "node-a", "node-b", "inc-1")
    acceptor = wire.Acceptor(SECRET, "node-b", clear=True)
    kind, body = one_frame(dialer.hello())
    downgraded = body.replace(b'"mode": "sealed"', b'"mode": "clear"')
    assert downgraded != body
    challenge = acceptor.answer(kind, downgraded)
    assert challenge is not None
    with pytest.raises(wire.WireError, match="secret"):
        dialer.answer(*one_frame(challenge))

    # On a Unix socket, asked for: frames as they are, the peer still authenticated.
    dialer = wire.Dialer(SECRET, "node-a", "node-b", "inc-1")
    acceptor = wire.Acceptor(SECRET, "node-b", clear=True)
    challenge = acceptor.answer(*one_frame(dialer.hello(sealed=False)))
    assert challenge is not None
    proof = dialer.answer(*one_frame(challenge))
    assert proof is not None and acceptor.answer(*one_frame(proof)) is None
    assert dialer.answer(*one_frame(acceptor.welcome(9))) is None and dialer.last == 9
    frame = wire.data(10, 0, FIELDS)
    assert dialer.send.seal(frame) == frame
    assert acceptor.receive.open(*one_frame(frame)) == frame[5:]
    # A sealed link on a Unix socket is fine too (the dialer's choice).
    dialer, acceptor = wire.Dialer(SECRET, "a", "b", "i"), wire.Acceptor(SECRET, "b", clear=True)
    handshake(dialer, acceptor)
    assert isinstance(acceptor.receive, wire.Sealed)


def test_a_node_name_utf8_cannot_encode_is_refused() -> None:
    """A string JSON can carry but UTF-8 cannot (a lone surrogate) names no node: the
    handshake refuses it as any other wrong answer (a WireError, logged and counted),
    on either side, before a link to a peer of that name could open."""
    acceptor = wire.Acceptor(SECRET, "node-b")
    dialer = wire.Dialer(SECRET, "node-\ud800", "node-b", "incarnation")
    with pytest.raises(wire.WireError, match="node is not UTF-8"):
        acceptor.answer(*one_frame(dialer.hello(True)))
    assert acceptor.peer is None

    # The dialer checks the name the acceptor answers with in the same way.
    dialer = wire.Dialer(SECRET, "node-a", "node-\ud800", "incarnation")
    dialer.hello(True)
    challenge = wire.message(
        wire.CHALLENGE, node="node-\ud800", nonce=wire.nonce(), key="k", mac="m"
    )
    with pytest.raises(wire.WireError, match="node is not UTF-8"):
        dialer.answer(*one_frame(challenge))
