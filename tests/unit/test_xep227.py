"""xmppctl import and export against the embedded default: hostile input, both peers'
key encodings, vCard4, the round trip, and summaries that say what was written."""

from __future__ import annotations

import asyncio
import base64
import fcntl
import hashlib
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from lxml import etree

from xmppd.auth.accounts import Accounts
from xmppd.cli.ctl import main
from xmppd.config import load_config
from xmppd.sasl.scram import derive_keys, verify_password
from xmppd.storage.factory import open_storage
from xmppd.xep227.credentials import BadCredentials, parse_scram
from xmppd.xep227.vcard4 import convert

PIE = "urn:xmpp:pie:0"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "xmppd.yml"
    path.write_text("hosts: [localhost, example.org]\ndata_dir: data\n")
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def accounts_of(config: Path, host: str = "localhost") -> list[str]:
    cfg = load_config(config)

    async def names() -> list[str]:
        storage = await open_storage(cfg.storage, cfg.data_dir)
        try:
            return (await Accounts.of(storage, host).list())[0]
        finally:
            await storage.close()

    return asyncio.run(names())


def scram(password: str, twice: bool = False, hash_name: str = "sha1") -> str:
    keys = derive_keys(hash_name, password, iterations=4096)

    def b64(data: bytes) -> str:
        once = base64.b64encode(data)
        return (base64.b64encode(once) if twice else once).decode()

    mechanism = {"sha1": "SHA-1", "sha256": "SHA-256", "sha512": "SHA-512"}[hash_name]
    return (
        f"<scram-credentials xmlns='urn:xmpp:pie:0#scram' mechanism='SCRAM-{mechanism}'>"
        f"<iter-count>4096</iter-count><salt>{b64(keys.salt)}</salt>"
        f"<server-key>{b64(keys.server_key)}</server-key>"
        f"<stored-key>{b64(keys.stored_key)}</stored-key></scram-credentials>"
    )


def export_file(path: Path, users: str, host: str = "localhost") -> Path:
    path.write_text(f"<server-data xmlns='{PIE}'><host jid='{host}'>{users}</host></server-data>")
    return path


GOOD_USER = f"<user name='ok'>{scram('pw-ok')}</user>"

# --------------------------------------------------------------------------- hostile input


def test_an_entity_bomb_is_refused_before_anything_is_read(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bomb = tmp_path / "bomb.xml"
    entities = "".join(
        f'<!ENTITY e{i} "{"".join(f"&e{i - 1};" for _ in range(10))}">' for i in range(1, 10)
    )
    bomb.write_text(
        f'<?xml version="1.0"?><!DOCTYPE server-data [<!ENTITY e0 "lol">{entities}]>'
        f"<server-data xmlns='{PIE}'><host jid='localhost'>{GOOD_USER}"
        "<user name='x'>&e9;</user></host></server-data>"
    )
    code, out, err = run(capsys, "-c", str(config), "import", str(bomb))
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        "xmppctl: nothing was imported:",
        f"xmppctl: {bomb}: has a DOCTYPE; XEP-0227 files have none "
        "(entity declarations are refused)",
    ]
    assert accounts_of(config) == []


def test_an_external_entity_is_refused(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    evil = tmp_path / "evil.xml"
    evil.write_text(
        f'<!DOCTYPE x [<!ENTITY s SYSTEM "file://{secret}">]>'
        f"<server-data xmlns='{PIE}'><host jid='localhost'>"
        f"<user name='ok'>{scram('pw')}<vCard xmlns='vcard-temp'><FN>&s;</FN></vCard></user>"
        "</host></server-data>"
    )
    code, _, err = run(capsys, "-c", str(config), "import", str(evil))
    assert code == 1 and "DOCTYPE" in err and "s3cret" not in err
    assert accounts_of(config) == []


def test_input_over_the_size_limit_is_refused_with_the_limit_named(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    big = export_file(tmp_path / "big.xml", GOOD_USER * 20)
    code, out, err = run(capsys, "-c", str(config), "import", "--max-bytes", "1000", str(big))
    assert (code, out) == (1, "")
    assert f"{big}: the input is over the limit of 1000 bytes" in err
    assert "--max-bytes" in err
    assert accounts_of(config) == []


def test_bad_jids_are_all_listed_and_nothing_is_imported(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = export_file(
        tmp_path / "bad.xml",
        GOOD_USER
        + f"<user name='a b'>{scram('pw')}</user>"
        + f"<user name='bob'>{scram('pw')}<query xmlns='jabber:iq:roster'>"
        "<item jid='x@@y' subscription='both'/></query></user>" + "<user name='nokeys'/>",
    )
    other = export_file(tmp_path / "other.xml", GOOD_USER, host="elsewhere.example")
    code, out, err = run(capsys, "-c", str(config), "import", str(bad), str(other))
    assert (code, out) == (1, "")
    lines = err.splitlines()
    assert lines[0] == "xmppctl: nothing was imported:"
    assert any("'a b'@localhost: bad user name" in line for line in lines)
    assert any("bob@localhost: <query/>" in line for line in lines)  # its roster item
    assert any("nokeys@localhost: no credentials" in line for line in lines)
    assert any("host elsewhere.example is not served" in line for line in lines)
    assert len(lines) == 5
    assert accounts_of(config) == []


def test_an_include_outside_the_files_folder_is_refused(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "sub").mkdir()
    export_file(tmp_path / "host.xml", GOOD_USER)
    main_file = tmp_path / "sub" / "main.xml"
    main_file.write_text(
        f"<server-data xmlns='{PIE}' xmlns:xi='http://www.w3.org/2001/XInclude'>"
        "<xi:include href='../host.xml'/></server-data>"
    )
    code, _, err = run(capsys, "-c", str(config), "import", str(main_file))
    assert code == 1 and "refused <xi:include href='../host.xml'/>" in err
    assert accounts_of(config) == []


def test_a_file_that_is_only_an_include_is_refused_with_a_clear_error(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An <xi:include/> as the root has no parent to be replaced in."""
    export_file(tmp_path / "host.xml", GOOD_USER)
    main_file = tmp_path / "main.xml"
    main_file.write_text(
        "<xi:include xmlns:xi='http://www.w3.org/2001/XInclude' href='host.xml'/>"
    )
    code, _, err = run(capsys, "-c", str(config), "import", str(main_file))
    assert code == 1 and "nothing was imported" in err
    assert "<xi:include href='host.xml'/> as the root" in err
    assert accounts_of(config) == []


def test_a_plaintext_password_in_the_file_makes_keys_for_every_hash(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """XEP-0227 allows password='...' (servers that kept plaintext): all hashes at once."""
    source = export_file(tmp_path / "plain.xml", "<user name='old' password='old secret'/>")
    assert run(capsys, "-c", str(config), "import", str(source))[0] == 0
    cfg = load_config(config)

    async def hashes() -> list[str]:
        storage = await open_storage(cfg.storage, cfg.data_dir)
        try:
            return sorted(await Accounts.of(storage, "localhost").credentials("old") or {})
        finally:
            await storage.close()

    assert asyncio.run(hashes()) == ["sha1", "sha256", "sha512"]
    assert check_password(config, "old", "old secret")


def test_a_folder_with_a_main_file_imports_each_included_file_once(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As ejabberd writes it: the main file includes the host file beside it."""
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "1_localhost.xml").write_text(
        f"<host xmlns='{PIE}' jid='localhost'>{GOOD_USER}</host>"
    )
    (folder / "1.xml").write_text(
        f"<server-data xmlns='{PIE}' xmlns:xi='http://www.w3.org/2001/XInclude'>"
        "<xi:include href='1_localhost.xml'/></server-data>"
    )
    code, out, err = run(capsys, "-c", str(config), "import", str(folder))
    assert (code, err) == (0, "")
    assert "accounts: 1 copied, 0 skipped, 0 failed" in out
    assert accounts_of(config) == ["ok"]


# --------------------------------------------------------------------------- the peers' keys


@pytest.mark.parametrize("hash_name", ["sha1", "sha256", "sha512"])
@pytest.mark.parametrize("twice", [False, True], ids=["prosody-once", "ejabberd-twice"])
def test_scram_keys_encoded_once_or_twice_give_the_same_keys(hash_name: str, twice: bool) -> None:
    element = etree.fromstring(scram("pass word", twice, hash_name))
    keys = parse_scram(element)
    assert keys.hash_name == hash_name
    assert len(keys.stored_key) == hashlib.new(hash_name).digest_size
    assert verify_password(keys, "pass word") and not verify_password(keys, "other")


def test_keys_of_the_wrong_size_are_refused_without_showing_them() -> None:
    text = scram("pw").replace("<stored-key>", "<stored-key>AAAA")
    with pytest.raises(BadCredentials, match="stored-key is not a 20-byte key") as caught:
        parse_scram(etree.fromstring(text))
    assert "AAAA" not in str(caught.value)


def test_a_vcard4_becomes_vcard_temp() -> None:
    card = etree.fromstring(
        "<vcard xmlns='urn:ietf:params:xml:ns:vcard-4.0'>"
        "<fn><text>Alice Liddell</text></fn>"
        "<n><surname>Liddell</surname><given>Alice</given></n>"
        "<nickname><text>ally</text></nickname>"
        "<bday><date>1852-05-04</date></bday>"
        "<email><parameters><type><text>home</text></type></parameters>"
        "<text>alice@example.org</text></email>"
        "<tel><uri>tel:+44-1865-000</uri></tel>"
        "<impp><uri>xmpp:alice@example.org</uri></impp>"
        "<photo><uri>data:image/png;base64,iVBORw0KGgo=</uri></photo>"
        "<gender><sex>F</sex></gender>"
        "</vcard>"
    )
    vcard, dropped = convert(card)
    assert etree.tostring(vcard).decode() == (
        '<vCard xmlns="vcard-temp"><FN>Alice Liddell</FN>'
        "<N><FAMILY>Liddell</FAMILY><GIVEN>Alice</GIVEN></N><NICKNAME>ally</NICKNAME>"
        "<BDAY>1852-05-04</BDAY><EMAIL><HOME/><USERID>alice@example.org</USERID></EMAIL>"
        "<TEL><NUMBER>+44-1865-000</NUMBER></TEL><JABBERID>alice@example.org</JABBERID>"
        "<PHOTO><TYPE>image/png</TYPE><BINVAL>iVBORw0KGgo=</BINVAL></PHOTO></vCard>"
    )
    assert dropped == ["gender"]


# --------------------------------------------------------------------------- round trip

RICH = (
    f"<user name='alice'>{scram('alice pw', twice=True)}"
    "<query xmlns='jabber:iq:roster'>"
    "<item jid='bob@localhost' name='Bob' subscription='both'><group>Friends</group></item>"
    "<item jid='carol@example.org' subscription='none' ask='subscribe'/>"
    "</query>"
    "<presence xmlns='jabber:client' from='dave@example.org' to='alice@localhost'"
    " type='subscribe'/>"
    "<vCard xmlns='vcard-temp'><FN>Alice</FN></vCard>"
    "<query xmlns='jabber:iq:private'><storage xmlns='storage:bookmarks'>"
    "<conference jid='room@conference.localhost' autojoin='true'/></storage>"
    "<prefs xmlns='urn:example:prefs'><x>1</x></prefs></query>"
    "<query xmlns='jabber:iq:privacy'><default name='quiet'/>"
    "<list name='quiet'><item type='jid' value='eve@example.org' action='deny' order='1'/>"
    "</list></query>"
    "<blocklist xmlns='urn:xmpp:blocking'><item jid='mallory@example.org'/></blocklist>"
    "<offline-messages xmlns='urn:xmpp:pie:0'>"
    "<message xmlns='jabber:client' from='bob@localhost/x' to='alice@localhost' type='chat'>"
    "<body>while you were away</body>"
    "<delay xmlns='urn:xmpp:delay' from='localhost' stamp='2026-01-02T03:04:05Z'/></message>"
    "</offline-messages></user>"
    f"<user name='bob'>{scram('bob pw')}{scram('bob pw', hash_name='sha256')}"
    "<query xmlns='jabber:iq:roster'>"
    "<item jid='alice@localhost' name='Alice' subscription='both'/></query></user>"
)


def test_export_then_import_into_an_empty_server_gives_the_same_data(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = export_file(tmp_path / "rich.xml", RICH)
    code, out, err = run(capsys, "-c", str(config), "import", str(source))
    assert (code, err) == (0, "")
    assert out.splitlines()[:7] == [
        "accounts: 2 copied, 0 skipped, 0 failed",
        "roster: 4 copied, 0 skipped, 0 failed",
        "vcard: 1 copied, 0 skipped, 0 failed",
        "private: 2 copied, 0 skipped, 0 failed",
        "privacy: 1 copied, 0 skipped, 0 failed",
        "blocking: 1 copied, 0 skipped, 0 failed",
        "offline: 1 copied, 0 skipped, 0 failed",
    ]
    first = tmp_path / "first.xml"
    assert run(capsys, "-c", str(config), "export", "--host", "localhost", str(first))[0] == 0
    assert first.stat().st_mode & 0o777 == 0o600  # everyone's keys are in it

    empty = tmp_path / "empty.yml"
    empty.write_text("hosts: [localhost]\ndata_dir: empty-data\n")
    assert run(capsys, "-c", str(empty), "import", str(first))[0] == 0
    second = tmp_path / "second.xml"
    assert run(capsys, "-c", str(empty), "export", str(second))[0] == 0
    assert second.read_bytes() == first.read_bytes()
    exported = etree.parse(str(first)).getroot()
    assert exported.findtext(f".//{{{PIE}}}offline-messages/*/{{jabber:client}}body") == (
        "while you were away"
    )
    assert len(exported.findall(f".//{{{PIE}}}user")) == 2
    assert check_password(empty, "alice", "alice pw") and check_password(empty, "bob", "bob pw")

    # Importing again changes nothing and says so.
    code, out, _ = run(capsys, "-c", str(empty), "import", str(first))
    assert code == 0
    assert "accounts: 0 copied, 2 skipped, 0 failed" in out
    assert "skipped: alice@localhost exists already: left as it is" in out


def ban_of(config: Path, user: str) -> tuple[int, str] | None:
    cfg = load_config(config)

    async def read() -> tuple[int, str] | None:
        storage = await open_storage(cfg.storage, cfg.data_dir)
        try:
            ban = await Accounts.of(storage, "localhost").ban_of(user)
        finally:
            await storage.close()
        return None if ban is None else (ban.since, ban.reason)

    return asyncio.run(read())


def test_a_banned_account_stays_banned_through_export_and_import(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An export that dropped the ban would lift it on the server it is imported into:
    the banned user would log in there with their old password."""
    source = export_file(tmp_path / "rich.xml", RICH)
    assert run(capsys, "-c", str(config), "import", str(source))[0] == 0
    assert run(capsys, "-c", str(config), "ban", "alice@localhost", "spam")[0] == 0
    banned = ban_of(config, "alice")
    assert banned is not None and banned[1] == "spam"
    first = tmp_path / "first.xml"
    assert run(capsys, "-c", str(config), "export", "--host", "localhost", str(first))[0] == 0

    empty = tmp_path / "empty.yml"
    empty.write_text("hosts: [localhost]\ndata_dir: empty-data\n")
    code, out, err = run(capsys, "-c", str(empty), "import", str(first))
    assert (code, err) == (0, ""), out
    assert "not imported" not in out
    assert ban_of(empty, "alice") == banned  # reason and time
    assert ban_of(empty, "bob") is None
    second = tmp_path / "second.xml"
    assert run(capsys, "-c", str(empty), "export", str(second))[0] == 0
    assert second.read_bytes() == first.read_bytes()


def test_the_export_is_private_even_over_a_file_left_at_its_temporary_name(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Opening an existing file keeps its mode and owner: a world-readable file (or one
    another user made, or a link) at the temporary name would have received every
    account's keys."""
    source = export_file(tmp_path / "rich.xml", RICH)
    assert run(capsys, "-c", str(config), "import", str(source))[0] == 0
    target = tmp_path / "out.xml"
    left = tmp_path / ".out.xml.partial"
    left.write_text("left over")
    left.chmod(0o644)
    elsewhere = tmp_path / "elsewhere.xml"
    for planted in ("file", "link"):
        if planted == "link":
            left.unlink(missing_ok=True)
            left.symlink_to(elsewhere)
        assert run(capsys, "-c", str(config), "export", str(target))[0] == 0
        assert target.stat().st_mode & 0o777 == 0o600, planted
        assert not target.is_symlink()
    assert not elsewhere.exists()


def test_data_of_a_disabled_module_is_skipped_and_said(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "novcard.yml"
    config.write_text(
        "hosts: [localhost]\ndata_dir: data\n"
        "modules: {roster: {}, presence: {}, private: {}, privacy: {}, blocking: {},"
        " offline: {}}\n"
    )
    source = export_file(tmp_path / "rich.xml", RICH)
    code, out, _ = run(capsys, "-c", str(config), "import", str(source))
    assert code == 0
    assert "vcard: 0 copied, 1 skipped, 0 failed" in out
    assert "skipped: alice@localhost: vcard: module not enabled (1 skipped)" in out
    assert "roster: 4 copied, 0 skipped, 0 failed" in out


def check_password(config: Path, user: str, password: str) -> bool:
    cfg = load_config(config)

    async def verify() -> bool:
        storage = await open_storage(cfg.storage, cfg.data_dir)
        try:
            return await Accounts.of(storage, "localhost").verify_plain(user, password)
        finally:
            await storage.close()

    return asyncio.run(verify())


def test_what_fails_while_writing_is_named_and_the_rest_is_written(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Private XML in a reserved namespace is refused by the private module as it would be
    from a client: that entry fails, is named, and everything else is written."""
    source = export_file(
        tmp_path / "mixed.xml",
        f"<user name='alice'>{scram('pw')}<query xmlns='jabber:iq:private'>"
        "<query xmlns='jabber:iq:roster'/><prefs xmlns='urn:example:prefs'/></query></user>"
        + GOOD_USER,
    )
    code, out, err = run(capsys, "-c", str(config), "import", str(source))
    assert code == 1
    assert "accounts: 2 copied, 0 skipped, 0 failed" in out
    assert "private: 1 copied, 0 skipped, 1 failed" in out
    assert err.splitlines() == [
        "xmppctl: failed: alice@localhost: private: not-acceptable: "
        "jabber:iq:roster is a reserved namespace",
        "xmppctl: 1 entries failed (listed above); everything else was written",
    ]
    assert accounts_of(config) == ["alice", "ok"]


def test_roster_items_get_the_roster_modules_limits_on_names_and_groups(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As the docs promise: imported data gets the limits a client's own request gets."""
    source = export_file(
        tmp_path / "roster.xml",
        f"<user name='alice'>{scram('pw')}<query xmlns='jabber:iq:roster'>"
        f"<item jid='long@localhost' name='{'n' * 300}' subscription='both'/>"
        "<item jid='blank@localhost' subscription='both'><group>  </group></item>"
        "<item jid='twice@localhost' subscription='both'><group>A</group><group>A</group></item>"
        "<item jid='fine@localhost' name='Fine' subscription='both'><group>A</group></item>"
        "</query></user>",
    )
    code, out, err = run(capsys, "-c", str(config), "import", str(source))
    assert code == 1
    assert "roster: 1 copied, 0 skipped, 3 failed" in out
    failures = [line for line in err.splitlines() if "roster:" in line]
    assert failures == [
        "xmppctl: failed: alice@localhost: roster: long@localhost: not-acceptable: "
        "the name is too long",
        "xmppctl: failed: alice@localhost: roster: blank@localhost: not-acceptable: "
        "empty group name",
        "xmppctl: failed: alice@localhost: roster: twice@localhost: bad-request: "
        "group 'A' appears twice",
    ]


def test_a_pre_approved_contact_stays_pre_approved_through_export_and_import(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """RFC 6121 3.4 pre-approval is the roster item's approved='true': a round trip that
    dropped it would make the contact's next request wait for an answer again."""
    source = export_file(
        tmp_path / "approved.xml",
        f"<user name='alice'>{scram('pw')}<query xmlns='jabber:iq:roster'>"
        "<item jid='bob@localhost' subscription='none' approved='true'/>"
        "<item jid='carol@localhost' subscription='none'/></query></user>",
    )
    assert run(capsys, "-c", str(config), "import", str(source))[0] == 0
    exported = tmp_path / "out.xml"
    assert run(capsys, "-c", str(config), "export", "--host", "localhost", str(exported))[0] == 0
    items = {
        item.get("jid"): item.get("approved")
        for item in etree.parse(str(exported)).iter("{jabber:iq:roster}item")
    }
    assert items == {"bob@localhost": "true", "carol@localhost": None}


def test_a_default_privacy_list_that_cannot_be_set_is_a_failure_not_silence(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A <default/> naming a list the file does not hold was dropped without a word
    when the user had no list at all."""
    source = export_file(
        tmp_path / "default.xml",
        f"<user name='alice'>{scram('pw')}"
        "<query xmlns='jabber:iq:privacy'><default name='gone'/></query></user>",
    )
    code, out, err = run(capsys, "-c", str(config), "import", str(source))
    assert code == 1
    assert "privacy: 0 copied, 0 skipped, 1 failed" in out
    assert "xmppctl: failed: alice@localhost: privacy: the default list was not set" in err


# --------------------------------------------------------------------------- progress


def xmppctl_on_a_terminal(argv: list[str], stdout_tty: bool) -> tuple[str, str]:
    """Run xmppctl with stderr on a pseudo-terminal (and stdout too, or piped)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "xmppd.cli.ctl", *argv],
            stdout=follower if stdout_tty else subprocess.PIPE,
            stderr=follower,
            timeout=60,
            check=False,
        )
        os.close(follower)
        follower = -1
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal has no writer left
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert done.returncode == 0
        return b"".join(chunks).decode(errors="replace"), (done.stdout or b"").decode()
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)


def test_progress_shows_on_a_terminal_only(config: Path, tmp_path: Path) -> None:
    source = export_file(tmp_path / "two.xml", GOOD_USER + f"<user name='b'>{scram('p')}</user>")
    terminal, _ = xmppctl_on_a_terminal(["-c", str(config), "import", str(source)], True)
    assert "import: 100%" in terminal and "2/2" in terminal
    assert "accounts: 2 copied" in terminal  # the summary too
    other = tmp_path / "other.yml"
    other.write_text("hosts: [localhost]\ndata_dir: other-data\n")
    terminal, piped = xmppctl_on_a_terminal(["-c", str(other), "import", str(source)], False)
    assert "100%" not in terminal and "accounts: 2 copied" in piped
