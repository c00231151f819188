"""The TLS contexts federation makes at start: one per CA a peer may need, and a
CA file that cannot be used refused by name (real files, real OpenSSL)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from xmppd.s2s.config import DomainPolicy, S2SConfig
from xmppd.s2s.contexts import make_contexts
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


def test_without_a_ca_file_the_systems_cas(tmp_path: Path) -> None:
    cert, key = ensure_self_signed(tmp_path / "ours", ["b.test"])
    contexts = make_contexts(S2SConfig(), cert, key)
    assert set(contexts.connect) == {(None, False), (None, True)}
    system = ssl.create_default_context().cert_store_stats()
    assert contexts.for_peer(S2SConfig(), "d.test").cert_store_stats() == system


def test_a_ca_file_without_certificates_is_refused_by_name(tmp_path: Path) -> None:
    cert, key = ensure_self_signed(tmp_path / "ours", ["b.test"])
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    config = S2SConfig(domains={"d.test": DomainPolicy(ca_file=bad)})
    with pytest.raises(TLSError, match=f"s2s: CA file {bad}: no usable certificate in it"):
        make_contexts(config, cert, key)
