"""Switching to xmppd: real ejabberd and Prosody exports imported with `xmppctl import`,
then real slixmpp clients log in with their old passwords and find their contacts.

The exports are made once per test module on real peers (tests/integration/peers.py);
each test imports them into a fresh xmppd on the embedded and the cloud storage.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from slixmpp import JID

from tests.integration import peers
from tests.integration.clients import Client, close, connect, insecure_context
from tests.integration.conftest import StartServer, port_of, write_config
from xmppd.sasl.scram import derive_keys
from xmppd.server import Server

EJ = "ej.test"
PR = "pr.test"


@pytest.fixture(scope="module")
def ejabberd_main_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The main file of ejabberd's export; it includes the host's file beside it."""
    folder = peers.ejabberd_export(EJ, tmp_path_factory.mktemp("ejabberd") / "export")
    return next(f for f in folder.glob("*.xml") if "_" not in f.name)


@pytest.fixture(scope="module")
def prosody_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return peers.prosody_export(PR, tmp_path_factory.mktemp("prosody") / "export")


async def xmppctl(*argv: str) -> tuple[int, str, str]:
    """The real command, in its own process (it runs its own event loop)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "xmppd.cli.ctl",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def import_then_start(
    tmp_path: Path,
    start_server: StartServer,
    storage_section: dict[str, Any] | None,
    host: str,
    *files: Path,
) -> tuple[Server, str]:
    """Import into a new deployment with no node running (as an operator switching does),
    then start it; the import's stdout."""
    sections: dict[str, Any] = {"hosts": [host]}  # the default modules
    if storage_section is not None:
        sections["storage"] = storage_section
    config = write_config(tmp_path, **sections)
    code, out, err = await xmppctl("-c", str(config), "import", *map(str, files))
    assert code == 0, err
    return await start_server(users={}, **sections), out


async def roster_of(client: Client) -> dict[str, dict[str, Any]]:
    await client.get_roster(timeout=10)
    roster = client.client_roster
    return {
        jid: {
            "name": roster[jid]["name"],
            "subscription": roster[jid]["subscription"],
            "groups": sorted(roster[jid]["groups"]),
        }
        for jid in roster
    }


@pytest.mark.timeout(90)
async def test_ejabberd_users_log_in_with_their_old_passwords_and_find_their_data(
    tmp_path: Path,
    start_server: StartServer,
    storage_section: dict[str, Any] | None,
    ejabberd_main_file: Path,
) -> None:
    """ejabberd 23.01's export (base64 twice, a main file including the host file)."""
    server, out = await import_then_start(
        tmp_path, start_server, storage_section, EJ, ejabberd_main_file
    )
    assert "accounts: 2 copied, 0 skipped, 0 failed" in out
    assert "offline: 1 copied, 0 skipped, 0 failed" in out
    alice = await connect(server, f"alice@{EJ}/laptop", peers.PASSWORDS["alice"])
    bob = await connect(server, f"bob@{EJ}/phone", peers.PASSWORDS["bob"])
    try:
        assert await roster_of(alice) == {
            f"bob@{EJ}": {"name": "Bobby", "subscription": "both", "groups": ["Friends"]}
        }
        assert await roster_of(bob) == {
            f"alice@{EJ}": {"name": "Alice", "subscription": "both", "groups": []}
        }
        alice.register_plugin("xep_0054")
        vcard = await alice.plugin["xep_0054"].get_vcard(JID(f"alice@{EJ}"), local=False)
        assert vcard["vcard_temp"]["FN"] == "Alice Liddell"
        alice.send_presence()  # the message ejabberd kept offline comes now
        message = await asyncio.wait_for(alice.messages.get(), 10)
        assert (message["from"].bare, message["body"]) == (f"bob@{EJ}", "hello there")
    finally:
        await close(alice)
        await close(bob)


@pytest.mark.timeout(90)
async def test_an_export_of_imported_users_imports_into_an_empty_xmppd_and_they_log_in(
    tmp_path: Path,
    start_server: StartServer,
    storage_section: dict[str, Any] | None,
    ejabberd_main_file: Path,
) -> None:
    """The round trip: ejabberd -> deployment A -> `xmppctl export` -> empty deployment B,
    where alice logs in with her ejabberd password and finds her contact."""
    folder_a = tmp_path / "a"
    folder_a.mkdir()
    sections: dict[str, Any] = {"hosts": [EJ]}
    if storage_section is not None:  # A gets its own table and bucket
        sections["storage"] = {
            **storage_section,
            "items": {**storage_section["items"], "table": storage_section["items"]["table"] + "a"},
            "blobs": {
                **storage_section["blobs"],
                "bucket": storage_section["blobs"]["bucket"] + "a",
            },
        }
    config_a = write_config(folder_a, **sections)
    code, _, err = await xmppctl("-c", str(config_a), "import", str(ejabberd_main_file))
    assert code == 0, err
    exported = tmp_path / "a.xml"
    code, out, err = await xmppctl("-c", str(config_a), "export", str(exported))
    assert code == 0, err
    assert "accounts: 2 copied" in out and "roster: 2 copied" in out
    server, out = await import_then_start(tmp_path, start_server, storage_section, EJ, exported)
    assert "accounts: 2 copied, 0 skipped, 0 failed" in out
    assert "offline: 1 copied, 0 skipped, 0 failed" in out
    alice = await connect(server, f"alice@{EJ}/laptop", peers.PASSWORDS["alice"])
    try:
        assert await roster_of(alice) == {
            f"bob@{EJ}": {"name": "Bobby", "subscription": "both", "groups": ["Friends"]}
        }
    finally:
        await close(alice)


@pytest.mark.timeout(90)
async def test_prosody_users_log_in_with_their_old_passwords_and_find_their_data(
    tmp_path: Path,
    start_server: StartServer,
    storage_section: dict[str, Any] | None,
    prosody_files: Path,
) -> None:
    """Prosody 0.12's migrator output (a file per user, base64 once, vCard4 in PEP)."""
    server, out = await import_then_start(
        tmp_path, start_server, storage_section, PR, prosody_files
    )
    assert "accounts: 2 copied, 0 skipped, 0 failed" in out
    assert "vcard: 1 copied, 0 skipped, 0 failed" in out
    alice = await connect(server, f"alice@{PR}/laptop", peers.PASSWORDS["alice"])
    bob = await connect(server, f"bob@{PR}/phone", peers.PASSWORDS["bob"])
    try:
        assert await roster_of(alice) == {
            f"bob@{PR}": {"name": "Bobby", "subscription": "both", "groups": ["Friends"]}
        }
        assert await roster_of(bob) == {
            f"alice@{PR}": {"name": "", "subscription": "both", "groups": []}
        }
        alice.register_plugin("xep_0054")
        vcard = await alice.plugin["xep_0054"].get_vcard(JID(f"alice@{PR}"), local=False)
        assert vcard["vcard_temp"]["FN"] == "Alice Liddell"
        assert vcard["vcard_temp"]["NICKNAME"] == ["ally"]
    finally:
        await close(alice)
        await close(bob)


def sha1_only_export(path: Path, host: str, password: str, twice: bool) -> Path:
    """An export as ejabberd (twice) or Prosody (once) writes a SHA-1-only account."""
    keys = derive_keys("sha1", password, iterations=4096)

    def b64(data: bytes) -> str:
        once = base64.b64encode(data)
        return (base64.b64encode(once) if twice else once).decode()

    path.write_text(
        "<server-data xmlns='urn:xmpp:pie:0'>"
        f"<host jid='{host}'><user name='carol'>"
        "<scram-credentials xmlns='urn:xmpp:pie:0#scram' mechanism='SCRAM-SHA-1'>"
        f"<iter-count>4096</iter-count><salt>{b64(keys.salt)}</salt>"
        f"<server-key>{b64(keys.server_key)}</server-key>"
        f"<stored-key>{b64(keys.stored_key)}</stored-key>"
        "</scram-credentials></user></host></server-data>"
    )
    return path


class FailureClient(Client):
    """Records each SASL failure's condition and text."""

    def __init__(self, jid: str, password: str, **kwargs: Any) -> None:
        super().__init__(jid, password, **kwargs)
        self.failures: list[tuple[str, str]] = []
        self.add_event_handler(
            "failed_auth", lambda f: self.failures.append((f["condition"], f["text"]))
        )


async def test_an_imported_sha1_account_refuses_sha512_cleanly_then_gains_it_at_a_plain_login(
    tmp_path: Path,
    start_server: StartServer,
    storage_section: dict[str, Any] | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SCRAM-SHA-512 first: <invalid-mechanism/> naming what works (no 'wrong password'),
    logged as a failed login; a PLAIN login (over TLS) then adds the SHA-256 and SHA-512
    keys, and SHA-512 works."""
    caplog.set_level(logging.INFO, logger="xmppd.connection")
    export = sha1_only_export(tmp_path / "carol.xml", "localhost", "old pass", twice=True)
    server, _ = await import_then_start(
        tmp_path, start_server, storage_section, "localhost", export
    )
    client = FailureClient("carol@localhost/x", "old pass", sasl_mech="SCRAM-SHA-512")
    client.ssl_context = insecure_context()
    client.enable_plaintext = False
    client.connect("127.0.0.1", port_of(server, "starttls"))
    await asyncio.wait_for(client.auth_failed.wait(), 15)
    condition, text = client.failures[0]
    assert condition == "invalid-mechanism"
    assert "no SCRAM-SHA-512 credentials yet" in text and "SCRAM-SHA-1" in text
    assert re.search(
        r"failed login: 'carol@localhost' from 127\.0\.0\.1 with SCRAM-SHA-512: "
        r"invalid-mechanism conn=", caplog.text
    ), caplog.text
    await close(client)
    assert await server.accounts["localhost"].scram_keys("carol", "sha512") is None

    sha1 = await connect(server, "carol@localhost/a", "old pass", mechanism="SCRAM-SHA-1")
    await close(sha1)
    plain = await connect(server, "carol@localhost/b", "old pass", mechanism="PLAIN")
    await close(plain)
    assert await server.accounts["localhost"].scram_keys("carol", "sha512") is not None
    sha512 = await connect(server, "carol@localhost/c", "old pass", mechanism="SCRAM-SHA-512")
    await close(sha512)


async def test_a_prosody_style_export_base64_once_logs_in_too(
    tmp_path: Path, start_server: StartServer, storage_section: dict[str, Any] | None
) -> None:
    export = sha1_only_export(tmp_path / "carol.xml", "localhost", "old pass", twice=False)
    server, out = await import_then_start(
        tmp_path, start_server, storage_section, "localhost", export
    )
    assert "accounts: 1 copied" in out
    client = await connect(server, "carol@localhost/a", "old pass")
    await close(client)
