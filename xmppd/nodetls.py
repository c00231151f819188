"""The node's certificate and the server contexts made from it, all in one blocking call.

Making a context reads the certificate and key files and parses the key (a few
ms for RSA-4096), and the embedded default's self-signed pair may first have
to be generated: the node calls `node_tls` in a thread (asyncio.to_thread),
at start as at each reload, so that no client of a serving node waits for
the disk or the key, and the start's own log lines are not held back either.
The result is then swapped in at once, in one turn of the loop.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from xmppd.config import Config
from xmppd.tls import ServerTLS, ensure_self_signed, server_tls


@dataclass(frozen=True, slots=True)
class NodeTLS:
    """What one reading of the certificate gave: the pair's paths, the client context,
    and the admin API's when it serves HTTPS (admin.tls)."""

    cert: Path
    key: Path
    self_signed: bool  # the embedded default's pair (no tls.cert): no CA vouches for it
    client: ServerTLS
    admin: ssl.SSLContext | None


def node_tls(config: Config) -> NodeTLS:
    """Blocking (files, key parsing, maybe key generation): call it in a thread.
    TLSError or OSError when the pair cannot be used."""
    if config.tls.cert is not None and config.tls.key is not None:
        cert, key, self_signed = config.tls.cert, config.tls.key, False
    else:
        cert, key = ensure_self_signed(config.data_dir, list(config.hosts))
        self_signed = True
    client = server_tls(cert, key, config.tls.min_version)
    admin = (
        server_tls(cert, key, config.tls.min_version, alpn="http/1.1").context
        if config.admin.https
        else None
    )
    return NodeTLS(cert, key, self_signed, client, admin)
