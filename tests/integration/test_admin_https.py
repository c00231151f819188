"""The admin API over HTTPS (admin.tls, xmppd.adminhttps) with a real node and the real
xmppctl command.

Off loopback the API serves HTTPS only, so that its bearer token never crosses
a network in clear. Every address of 127.0.0.0/8 is loopback, where the
default is plain HTTP: these tests turn HTTPS on there with `admin.tls: true`,
which takes the very path a non-loopback address takes by default (the
default itself is tests/unit/test_config.py's).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import warnings
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from tests.integration.conftest import StartServer, write_config
from tests.integration.nodeproc import Node
from tests.integration.renewal import RenewablePair
from tests.integration.s2s_peers import issue, make_ca
from tests.integration.test_account_changes import xmppctl
from tests.integration.test_cli_server import der_of
from tests.integration.test_cluster import until
from tests.integration.test_workers import xmppctl as process_xmppctl
from xmppd.adminapi import read_token
from xmppd.server import Server

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def storage_section() -> None:
    """The embedded storage only: this is the admin listener's transport, not a backend."""
    return None


def admin_port(server: Server) -> int:
    port = urlsplit(server.admin.url).port
    assert port is not None
    return port


async def plain_http(port: int, data_dir: Path) -> bytes:
    """All a plain-HTTP client (with the right token) reads back from the admin port."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    token = read_token(data_dir)
    writer.write(
        f"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n"
        .encode()
    )
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


async def served_certificate(port: int) -> bytes:
    """The DER certificate the admin port shows (not verified: that is xmppctl's part)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return bytes(der)


async def test_https_admin_api_refuses_plain_http_and_serves_xmppctl_verified(
    tmp_path: Path, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    ca = make_ca(tmp_path)
    cert, key = issue(ca, tmp_path, "localhost")
    server = await start_server(
        tls={"cert": str(cert), "key": str(key)},
        admin={"tls": True, "ca_file": str(ca.path)},
    )
    assert server.admin.url.startswith("https://127.0.0.1:")

    answer = await plain_http(admin_port(server), server.config.data_dir)
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert answer.endswith(b"this admin API is served over HTTPS only: use https://\n")
    assert b'"version"' not in answer
    assert "admin: refused plain HTTP from 127.0.0.1 port" in caplog.text
    assert admin_refusals(caplog) == ["plain-http"]

    code, out, err = await xmppctl(server, "status")
    assert (code, err) == (0, "")
    assert f"node {server.admin.url} (pid" in out
    assert "sessions  0" in out


    # Over HTTPS, a wrong token is still refused, and said so in the log.
    context = ssl.create_default_context(cafile=ca.path)
    headers = {"Authorization": "Bearer not-the-token"}
    async with aiohttp.ClientSession(headers=headers) as http:
        url = f"{server.admin.url}/status"
        async with http.get(url, ssl=context, server_hostname="localhost") as response:
            assert response.status == 401
    assert "admin: refused GET /status from 127.0.0.1: no valid bearer token" in caplog.text
    assert admin_refusals(caplog) == ["plain-http", "token"]


def admin_refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The reasons of the admin API's refusals logged so far, as a log shipper picks
    them out (their `event`)."""
    return [
        getattr(r, "reason", "")
        for r in caplog.records
        if getattr(r, "event", None) == "admin-refused"
    ]


async def test_https_admin_api_refuses_tls_before_1_2(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server(admin={"tls": True})
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # else this OpenSSL would not offer 1.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSVersion.TLSv1_1 is
        context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", admin_port(server), ssl=context)
    await until(lambda: "TLS handshake failed (UNSUPPORTED_PROTOCOL)" in caplog.text, 10)
    assert "admin: refused 127.0.0.1 port" in caplog.text
    assert admin_refusals(caplog) == ["tls-handshake"]


async def test_xmppctl_refuses_an_admin_certificate_its_ca_file_does_not_vouch_for(
    tmp_path: Path, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    (tmp_path / "stranger").mkdir()
    ca, stranger = make_ca(tmp_path), make_ca(tmp_path / "stranger", "another CA")
    cert, key = issue(stranger, tmp_path, "localhost")
    server = await start_server(
        tls={"cert": str(cert), "key": str(key)},
        admin={"tls": True, "ca_file": str(ca.path)},
    )

    code, out, err = await xmppctl(server, "status")
    assert f"node {server.admin.url}" not in out
    assert f"the node at {server.admin.url} was not trusted" in err
    assert "certificate verify failed" in err
    assert "the token was not sent" in err
    # The node saw a handshake fail, never a request.
    assert "admin: refused 127.0.0.1 port" in caplog.text
    assert "TLS handshake failed" in caplog.text


async def test_xmppctl_trusts_the_embedded_self_signed_certificate_only_by_its_record(
    tmp_path: Path, start_server: StartServer
) -> None:
    """With no tls.cert, the node's self-signed certificate is its own CA: the record
    names it, and xmppctl verifies the node against it (and its first host)."""
    server = await start_server(admin={"tls": True})
    code, out, err = await xmppctl(server, "status")
    assert (code, err) == (0, "")
    assert f"node {server.admin.url} (pid" in out


async def test_a_reload_brings_a_renewed_certificate_to_the_admin_api(
    tmp_path: Path, start_server: StartServer
) -> None:
    pair = RenewablePair(tmp_path)
    server = await start_server(tls=pair.tls_section(), admin={"tls": True})
    assert await served_certificate(admin_port(server)) == der_of(pair.first[0])
    pair.renew()
    result = await server.reload()
    assert f"certificate {pair.cert} (renewed)" in result.changed
    assert await served_certificate(admin_port(server)) == der_of(pair.second[0])


async def test_an_xmppd_process_serves_https_only_and_renews_on_sighup(tmp_path: Path) -> None:
    """The same on the node's own event loop (uvloop's, xmppd.batchloop), not the
    tests' asyncio one; the certificate renewed by SIGHUP, as certbot's hook does it."""
    pair = RenewablePair(tmp_path)
    # The self-signed certificate is its own CA: the file xmppctl trusts is renewed too.
    admin = {"tls": True, "ca_file": str(pair.cert)}
    path = write_config(tmp_path, tls=pair.tls_section(), admin=admin)
    node = await Node.start(path)
    try:
        url = (await node.line(r"admin: API on (https://127\.0\.0\.1:\d+) ")).group(1)
        port = urlsplit(url).port
        assert port is not None
        answer = await plain_http(port, tmp_path / "data")
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        await node.line(r"admin: refused plain HTTP from 127\.0\.0\.1 port \d+")
        assert await served_certificate(port) == der_of(pair.first[0])
        code, out, err = await process_xmppctl(path, "status")
        assert (code, err) == (0, "")
        assert f"node {url} (pid {node.proc.pid})" in out

        pair.renew()
        await node.line("reloaded: changed certificate", since=node.hangup())
        assert await served_certificate(port) == der_of(pair.second[0])
        code, out, err = await process_xmppctl(path, "status")
        assert (code, err) == (0, "")
        assert f"node {url} (pid {node.proc.pid})" in out
    finally:
        await node.stop()
