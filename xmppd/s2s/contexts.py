"""Every TLS context federation uses, made together, in a thread: at start, and
again by a reload that renews the certificate.

Making one reads files and parses keys: our certificate and key in each, and
the CAs a peer's certificate must chain to, the system's trust store being
the slow one (18 ms for its 144 CAs, measured). Made on the event loop as a
stream first needed them, they held up every client of the node, and each
new `ca_file` did it again. The set needed is known from the config
(`s2s.ca_file` and each domain's), so `S2SService.start` makes them all at
once in a thread and streams only look them up; a CA file that cannot be
used stops the start with one line that names it (TLSError), instead of
failing one peer's stream later. Each set records what certificate and key
it was made from (`pair_digest`): a reload whose pair differs (certbot's
renewal, the self-signed pair made again for new hosts) makes a whole new
set in its checking thread, which the node swaps in with the client context;
federation peers would refuse a certificate that expired.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from OpenSSL import SSL, crypto

from xmppd.s2s.config import S2SConfig
from xmppd.s2s.tlsaccept import server_context
from xmppd.s2s.trust import chain_verifies, trust_store
from xmppd.tls import TLSError

ALPN = "xmpp-server"  # the ALPN protocol of direct TLS server streams (XEP-0368)


@dataclass(frozen=True, slots=True)
class S2SContexts:
    """`accept`: incoming, by whether the listener is direct TLS. `connect`: outgoing,
    by the CA file the peer's certificate must chain to (None: the system's) and by
    whether ALPN is offered (direct TLS). `verify`: db:verify streams. `trust`: by
    the same CA files, the stores an incoming peer's chain is verified against again
    for the domain it claims (xmppd/s2s/trust.py). `made_from`: the `pair_digest` of
    our certificate and key as they were read for them."""

    accept: dict[bool, SSL.Context]
    connect: dict[tuple[Path | None, bool], ssl.SSLContext]
    verify: ssl.SSLContext
    trust: dict[Path | None, SSL.Context]
    made_from: bytes

    def for_peer(self, config: S2SConfig, remote: str, alpn: bool = False) -> ssl.SSLContext:
        """The outgoing context for `remote`: its domain's `ca_file`, else `s2s.ca_file`,
        else the system's CAs."""
        return self.connect[(config.ca_file_for(remote), alpn)]

    def vouches_for(self, config: S2SConfig, domain: str, chain: Sequence[crypto.X509]) -> bool:
        """Incoming: True if the peer's `chain` (its certificate first) leads to a CA
        trusted for `domain` itself, by the rule of `for_peer`: a CA configured only for
        another domain does not count."""
        return chain_verifies(self.trust[config.ca_file_for(domain)], chain)


def pair_digest(cert: Path, key: Path) -> bytes:
    """What the certificate and key files hold (SHA-256 of each): contexts made from
    equal digests present the same certificate. TLSError if a file cannot be read."""
    try:
        cert_pem, key_pem = cert.read_bytes(), key.read_bytes()
    except OSError as exc:
        raise TLSError(f"s2s: cannot read {exc.filename}: {exc.strerror or exc}") from None
    return hashlib.sha256(cert_pem).digest() + hashlib.sha256(key_pem).digest()


def make_contexts(config: S2SConfig, cert: Path, key: Path) -> S2SContexts:
    """All of them, for our `cert` and `key` (blocking: call it in a thread); TLSError
    names what cannot be used."""
    # Read before the contexts are: a file replaced while they are made differs from
    # this digest, so the next reload makes them again rather than keep a stale one.
    made_from = pair_digest(cert, key)
    try:
        return _make_contexts(config, cert, key, made_from)
    except (ssl.SSLError, SSL.Error, OSError, ValueError) as exc:
        # The pair changed on disk after it was checked (server_tls), or is unusable.
        raise TLSError(f"s2s: cannot use certificate {cert} with key {key}: {exc}") from None


def _make_contexts(config: S2SConfig, cert: Path, key: Path, made_from: bytes) -> S2SContexts:
    """`make_contexts`' work. The outgoing ones first: each CA file is read there
    first, and refused by name."""
    named = {p.ca_file for p in config.domains.values() if p.ca_file is not None}
    # A domain without a ca_file of its own takes s2s.ca_file (None: the system's).
    outgoing: set[Path | None] = {*named, config.ca_file}
    connect = {
        (ca_file, alpn): _client_context(cert, key, ca_file, alpn)
        for ca_file in outgoing
        for alpn in (False, True)
    }
    # Incoming, OpenSSL judges a certificate the peer sends against every CA we trust
    # for any peer (which peer it is, we learn only from the stream header) without
    # failing the handshake (a peer we do not trust may still use dialback); its names,
    # and its chain against the claimed domain's own CAs (`trust`), are checked after.
    # The direct TLS listeners' context selects 'xmpp-server' when the peer offers it
    # (XEP-0368; a peer that offers no ALPN is served too).
    incoming = named | ({config.ca_file} if config.ca_file is not None else set())
    accept = {
        direct: server_context(
            cert,
            key,
            incoming,
            system_cas=config.ca_file is None,
            alpn=ALPN.encode() if direct else None,
        )
        for direct in (False, True)
    }
    trust = {ca_file: trust_store(ca_file) for ca_file in outgoing}
    return S2SContexts(accept, connect, _verify_context(cert, key), trust, made_from)


def _client_context(cert: Path, key: Path, ca_file: Path | None, alpn: bool) -> ssl.SSLContext:
    """Outgoing: the peer's certificate must chain to `ca_file` (None: the system's
    CAs); we present ours for SASL EXTERNAL. The name is checked by us (RFC 9525),
    not by OpenSSL. `alpn`: for direct TLS, which offers 'xmpp-server' (XEP-0368)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if alpn:
        ctx.set_alpn_protocols([ALPN])
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    if ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=str(ca_file))
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc.strerror or exc
            raise TLSError(
                f"s2s: CA file {ca_file}: no usable certificate in it ({reason})"
            ) from None
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


def _verify_context(cert: Path, key: Path) -> ssl.SSLContext:
    """TLS for db:verify streams: encrypted, the server not authenticated by its
    certificate (dialback trusts DNS for that, XEP-0220 3; a peer that needs
    dialback usually has no certificate we trust), ours presented."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(cert, key)
    return ctx
