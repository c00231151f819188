"""A node loads no certificate, key or CA file on its event loop's thread, nor makes one.

Each such load reads files and parses keys (a few ms for an RSA-4096 key, 18 ms
for the system's 144 CAs), and making the embedded default's self-signed pair
generates a key: every client of the node waits that long, and at start the
start's own log lines do. The calls that do it (Python's `ssl`, pyOpenSSL's and
cryptography's) are wrapped here so that each call made from xmppd's code on
the loop's thread is noted; the calls still do their work, and the servers are
real.
"""

from __future__ import annotations

import shutil
import ssl
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL

from tests.integration.conftest import StartServer
from tests.integration.renewal import RenewablePair
from tests.integration.s2s_clients import message_across, signed_in
from tests.integration.s2s_peers import CA, XMPPD_ADDRESS, free_port, issue, make_ca
from tests.integration.test_cli_server import der_of
from tests.integration.test_s2s_renewal import s2s_certificate
from tests.integration.test_s2s_xmppd import OTHER_ADDRESS, bob_and_dora, serve
from xmppd.server import Server

SLOW_CALLS = [
    (ssl.SSLContext, "load_cert_chain"),
    (ssl.SSLContext, "load_verify_locations"),
    (ssl.SSLContext, "load_default_certs"),
    (SSL.Context, "use_certificate_chain_file"),
    (SSL.Context, "use_privatekey_file"),
    (SSL.Context, "load_verify_locations"),
    (SSL.Context, "set_default_verify_paths"),
    (x509, "load_pem_x509_certificate"),
    (ec, "generate_private_key"),
]
"""The methods that read a certificate, key or CA file (or the system's trust store),
and the functions that read a certificate or make a key (the self-signed pair)."""


@pytest.fixture
def on_loop(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Filled with "method from module" for each SLOW_CALLS call xmppd's code makes on
    this thread, the one the test's event loop (and the servers) run on."""
    loop_thread = threading.get_ident()
    calls: list[str] = []
    for cls, name in SLOW_CALLS:
        real = getattr(cls, name)

        def noted(*args: object, _real: Any = real, _name: str = name, **kwargs: object) -> object:
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if threading.get_ident() == loop_thread and caller.startswith("xmppd."):
                calls.append(f"{_name} from {caller}")
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, name, noted)
    return calls


async def test_a_node_starts_without_making_or_loading_tls_on_its_loop(
    start_server: StartServer, on_loop: list[str]
) -> None:
    """The embedded default's self-signed pair made and the client context loaded from
    it, then on a second start the pair read again: all in a thread."""
    server = await start_server()
    assert server.tls.cert_path.name == "selfsigned.crt"
    await server.stop()
    await start_server(users={})  # the accounts are there already
    assert on_loop == []


async def test_an_https_admin_api_gets_its_context_in_a_thread(
    tmp_path: Path, start_server: StartServer, on_loop: list[str]
) -> None:
    """At start and at a reload that renews the certificate (admin.tls)."""
    pair = RenewablePair(tmp_path)
    on_loop.clear()  # the test's own making of the pairs
    server = await start_server(tls=pair.tls_section(), admin={"tls": True})
    pair.renew()
    result = await server.reload()
    assert f"certificate {pair.cert} (renewed)" in result.changed
    assert on_loop == []


async def test_a_reload_makes_the_new_tls_context_in_a_thread(
    tmp_path: Path, start_server: StartServer, on_loop: list[str]
) -> None:
    pair = RenewablePair(tmp_path)
    server = await start_server(tls=pair.tls_section())
    pair.renew()
    on_loop.clear()  # what start did before it served (the client context) is not asked
    result = await server.reload()
    assert f"certificate {pair.cert} (renewed)" in result.changed
    assert on_loop == []


async def test_federation_makes_its_tls_contexts_in_a_thread(
    tmp_path: Path, start_server: StartServer, on_loop: list[str]
) -> None:
    """s2s starts while the node already serves its clients, and a first stream to a
    peer needs the contexts for that peer's CAs: none is made on the loop."""
    ca = make_ca(tmp_path)
    ports = {address: free_port(address) for address in (XMPPD_ADDRESS, OTHER_ADDRESS)}

    async def start(domain: str, address: str, other: str, other_address: str) -> Server:
        listeners: list[dict[str, object]] = [
            {"address": address, "port": ports[address], "direct_tls": True}
        ]
        target = {"host": other_address, "port": ports[other_address], "direct_tls": True}
        return await serve(start_server, tmp_path / domain, domain, ca, listeners, {other: target})

    b = await start("b.test", XMPPD_ADDRESS, "d.test", OTHER_ADDRESS)
    d = await start("d.test", OTHER_ADDRESS, "b.test", XMPPD_ADDRESS)
    async with signed_in(*await bob_and_dora(b, d)) as (bob, dora):
        await message_across(bob, dora, "dora@d.test", "hello d.test")
    assert b.s2s is not None
    assert [c.stream.mechanism for c in b.s2s.connections] == ["EXTERNAL"]
    assert on_loop == []


async def test_a_renewal_makes_the_new_s2s_contexts_in_a_thread(
    tmp_path: Path, start_server: StartServer, on_loop: list[str]
) -> None:
    """A reload that renews the certificate makes every s2s context again (the
    system's trust store among them, no s2s.ca_file here) in its checking thread;
    new s2s streams are then shown the new certificate."""
    ca = make_ca(tmp_path)
    port = free_port(XMPPD_ADDRESS)
    folder = tmp_path / "b.test"
    cert, key = issue_into(ca, folder)
    server = await start_server(
        users={},
        hosts=["b.test"],
        tls={"cert": str(cert), "key": str(key)},
        s2s={"listeners": [{"address": XMPPD_ADDRESS, "port": port, "direct_tls": True}]},
    )
    renewed = issue_into(ca, tmp_path / "renewal")
    shutil.copy(renewed[0], cert)
    shutil.copy(renewed[1], key)
    on_loop.clear()
    result = await server.reload()
    assert f"certificate {cert} (renewed)" in result.changed
    assert on_loop == []
    assert await s2s_certificate(ca, port, direct_tls=True) == der_of(cert)


def issue_into(ca: CA, folder: Path) -> tuple[Path, Path]:
    """A certificate and key for b.test from `ca`, written in `folder`."""
    folder.mkdir(parents=True)
    return issue(ca, folder, "b.test")
