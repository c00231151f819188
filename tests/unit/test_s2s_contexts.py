"""The TLS contexts federation makes at start and on a renewal: one per CA a peer may
need, a CA file or a pair that cannot be used refused by name, and what certificate
and key they were made from (real files, real OpenSSL)."""

from __future__ import annotations

import shutil
import ssl
from pathlib import Path

import pytest
from OpenSSL import SSL

from xmppd.s2s.config import DomainPolicy, S2SConfig
from xmppd.s2s.contexts import make_contexts, pair_digest
from xmppd.s2s.tlsaccept import TLSAcceptLayer
from xmppd.tls import TLSError, ensure_self_signed


def test_each_peer_gets_the_context_of_its_cas(tmp_path: Path) -> None:
    cert, key = ensure_self_signed(tmp_path / "ours", ["b.test"])
    shared = ensure_self_signed(tmp_path / "shared", ["ca.test"])[0]
    own = ensure_self_signed(tmp_path / "own", ["d.test"])[0]
    config = S2SConfig(
        ca_file=shared,
        domains={"d.test": DomainPolicy(ca_file=own), "e.test": DomainPolicy(port=5270)},
    )
    contexts = make_contexts(config, cert, key)
    assert set(contexts.connect) == {(shared, False), (shared, True), (own, False), (own, True)}
    assert contexts.for_peer(config, "d.test") is contexts.connect[(own, False)]
    assert contexts.for_peer(config, "d.test", alpn=True) is contexts.connect[(own, True)]
    for other in ("e.test", "f.test"):  # a policy without a ca_file, and none at all
        assert contexts.for_peer(config, other) is contexts.connect[(shared, False)]
    assert contexts.connect[(own, False)].verify_mode == ssl.CERT_REQUIRED
    assert contexts.verify.verify_mode == ssl.CERT_NONE  # db:verify: dialback trusts DNS
    # Incoming chains are verified again against the CAs of the domain claimed: one
    # store per CA file, none merged.
    assert set(contexts.trust) == {shared, own}


def test_without_a_ca_file_the_systems_cas(tmp_path: Path) -> None:
    cert, key = ensure_self_signed(tmp_path / "ours", ["b.test"])
    contexts = make_contexts(S2SConfig(), cert, key)
    assert set(contexts.connect) == {(None, False), (None, True)}
    system = ssl.create_default_context().cert_store_stats()
    assert contexts.for_peer(S2SConfig(), "d.test").cert_store_stats() == system
    assert set(contexts.trust) == {None}


def test_a_ca_file_without_certificates_is_refused_by_name(tmp_path: Path) -> None:
    cert, key = ensure_self_signed(tmp_path / "ours", ["b.test"])
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    config = S2SConfig(domains={"d.test": DomainPolicy(ca_file=bad)})
    with pytest.raises(TLSError, match=f"s2s: CA file {bad}: no usable certificate in it"):
        make_contexts(config, cert, key)


def test_they_record_the_pair_they_were_made_from(tmp_path: Path) -> None:
    """What a reload compares to tell a renewal (new contents, same file names)."""
    cert, key = ensure_self_signed(tmp_path / "ours", ["b.test"])
    contexts = make_contexts(S2SConfig(), cert, key)
    assert contexts.made_from == pair_digest(cert, key)
    renewed = ensure_self_signed(tmp_path / "renewed", ["b.test"])
    shutil.copy(renewed[0], cert)
    assert pair_digest(cert, key) != contexts.made_from  # the certificate alone renewed
    shutil.copy(renewed[1], key)
    assert make_contexts(S2SConfig(), cert, key).made_from == pair_digest(*renewed)


def test_a_pair_that_cannot_be_used_is_refused_by_name(tmp_path: Path) -> None:
    """Checked by server_tls first, the pair may still change before these are made."""
    cert, _ = ensure_self_signed(tmp_path / "ours", ["b.test"])
    _, other_key = ensure_self_signed(tmp_path / "other", ["b.test"])
    with pytest.raises(TLSError, match=f"s2s: cannot use certificate {cert} with key {other_key}"):
        make_contexts(S2SConfig(), cert, other_key)
    with pytest.raises(TLSError, match=f"s2s: cannot read {tmp_path / 'gone.pem'}"):
        make_contexts(S2SConfig(), cert, tmp_path / "gone.pem")


def _handshake(
    client: ssl.SSLContext, layer: TLSAcceptLayer, session: ssl.SSLSession | None = None
) -> ssl.SSLObject:
    """A client handshake with an incoming layer over memory BIOs, both sides pumped
    until done (and the server's TLS 1.3 tickets read)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client.wrap_bio(incoming, outgoing, server_hostname="b.test", session=session)
    for _ in range(10):
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        if data := outgoing.read():
            layer.handshake(data)
        try:
            incoming.write(layer.conn.bio_read(65536))
        except SSL.WantReadError:
            pass
        if layer.ready:
            try:
                tls.do_handshake()
                tls.read(1)  # takes the tickets a TLS 1.3 server sends after
            except ssl.SSLWantReadError:
                return tls
    raise AssertionError("the handshake did not finish")


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_peer_that_tries_to_resume_gets_a_full_handshake(
    tmp_path: Path, version: ssl.TLSVersion
) -> None:
    """A resumed session would skip the check of the peer's chain; and with no session
    id context OpenSSL failed the handshake of every peer that tried (federation lost
    with a reconnecting peer that keeps tickets)."""
    cert, key = ensure_self_signed(tmp_path / "ours", ["b.test"])
    peer_cert, peer_key = ensure_self_signed(tmp_path / "peer", ["a.test"])
    accept = make_contexts(S2SConfig(ca_file=peer_cert), cert, key).accept[False]
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    client.maximum_version = version
    client.load_cert_chain(peer_cert, peer_key)
    first = _handshake(client, TLSAcceptLayer(accept))
    layer = TLSAcceptLayer(accept)
    again = _handshake(client, layer, first.session)
    assert not again.session_reused
    assert layer.chain_valid and layer.peer_chain()  # judged afresh
