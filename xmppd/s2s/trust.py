"""Which CAs may vouch for which peer domain on incoming streams.

Incoming TLS cannot know the peer before the handshake, so OpenSSL checks
the peer's chain there against every CA we trust for any peer
(xmppd/s2s/contexts.py). That verdict alone would let a CA trusted for one
partner (`s2s.domains.<partner>.ca_file`) vouch for any domain: the partner
issues itself a certificate for victim.example and claims to be it. So once
the stream header names the peer's domain, its chain is verified again,
against that domain's own trust only: its `ca_file`, else `s2s.ca_file`,
else the system's CAs (`S2SConfig.ca_file_for`, the rule outgoing streams
use). The stores are loaded with the other contexts, in a thread; verifying
a chain against one costs a few signature checks, like the handshake that
already ran on the loop (the system's store, like the handshake's, may look
an issuer up in the system's certificate folder).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from OpenSSL import SSL, crypto


def trust_store(ca_file: Path | None) -> SSL.Context:
    """The CAs of `ca_file` (None: the system's), held in a context: pyOpenSSL's
    X509Store cannot load the system's default paths, a context can (with its
    fallback for cryptography's wheels), and its store lives as long as it does.
    Blocking (reads the files); raises SSL.Error or OSError for a file it cannot use."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    if ca_file is None:
        ctx.set_default_verify_paths()
    else:
        ctx.load_verify_locations(str(ca_file))
    return ctx


def chain_verifies(store: SSL.Context, chain: Sequence[crypto.X509]) -> bool:
    """True if `chain` (the peer's certificate, then the others it sent) leads to a CA
    in `store`. The purpose (clientAuth) was checked by the handshake already."""
    if not chain:
        return False
    cert_store = store.get_cert_store()
    if cert_store is None:
        return False
    try:
        crypto.X509StoreContext(cert_store, chain[0], list(chain[1:])).verify_certificate()
    except crypto.X509StoreContextError:
        return False
    return True
