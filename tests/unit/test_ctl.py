"""xmppctl against the embedded default (SQLite in a temporary data_dir)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import unwritable_dir
from xmppd import configfile
from xmppd.auth.accounts import Accounts
from xmppd.cli import ctl
from xmppd.cli.ctl import main
from xmppd.config import load_config
from xmppd.storage.base import BlobStore, ItemStore
from xmppd.storage.factory import open_storage
from xmppd.tls import ensure_self_signed


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "xmppd.yml"
    path.write_text("hosts: [localhost, example.org]\ndata_dir: data\n")
    return path


class Stdin(io.StringIO):
    """Standard input that is (or is not) a terminal."""

    def __init__(self, text: str = "", tty: bool = False) -> None:
        super().__init__(text)
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def run(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    *argv: str,
    stdin: str = "",
) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", Stdin(stdin))
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def check_password(config: Path, host: str, user: str, password: str) -> bool:
    cfg = load_config(config)

    async def verify() -> bool:
        storage = await open_storage(cfg.storage, cfg.data_dir)
        try:
            accounts = Accounts(ItemStore(storage.items, host, "accounts"))
            return await accounts.verify_plain(user, password)
        finally:
            await storage.close()

    return asyncio.run(verify())


# --------------------------------------------------------------------------- accounts


def test_register_list_passwd_unregister_round_trip(
    config: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    c = str(config)
    assert run(capsys, monkeypatch, "-c", c, "register", "Alice@localhost", stdin="s3cret\n") == (
        0,
        "registered alice@localhost\n",
        "",
    )
    pw = tmp_path / "pw"
    pw.write_text("other pass\nignored second line\n")
    assert (
        run(capsys, monkeypatch, "-c", c, "register", "bob@localhost", "--password-file", str(pw))[
            0
        ]
        == 0
    )
    assert run(capsys, monkeypatch, "-c", c, "register", "carol@example.org", stdin="x\n")[0] == 0
    assert (tmp_path / "data" / "items.sqlite3").is_file()

    assert run(capsys, monkeypatch, "-c", c, "list", "localhost") == (
        0,
        "alice@localhost\nbob@localhost\n",
        "",
    )
    assert run(capsys, monkeypatch, "-c", c, "list", "Example.org")[1] == "carol@example.org\n"
    assert check_password(config, "localhost", "alice", "s3cret")
    assert check_password(config, "localhost", "bob", "other pass")

    assert run(capsys, monkeypatch, "-c", c, "passwd", "alice@localhost", stdin="n3w\n") == (
        0,
        "password changed for alice@localhost\n",
        "",
    )
    assert check_password(config, "localhost", "alice", "n3w")
    assert not check_password(config, "localhost", "alice", "s3cret")

    assert run(capsys, monkeypatch, "-c", c, "unregister", "alice@localhost") == (
        0,
        "unregistered alice@localhost\n",
        "",
    )
    assert run(capsys, monkeypatch, "-c", c, "list", "localhost")[1] == "bob@localhost\n"


def test_account_errors_are_one_line(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    c = str(config)
    assert run(capsys, monkeypatch, "-c", c, "register", "alice@localhost", stdin="pw\n")[0] == 0
    not_served = (
        f"xmppctl: other.org is not a host of this server ({c} serves localhost, example.org)\n"
    )
    cases = [
        (("register", "alice@localhost"), "pw\n", "xmppctl: alice@localhost already exists\n"),
        (("passwd", "zoe@localhost"), "pw\n", "xmppctl: zoe@localhost does not exist\n"),
        (("unregister", "zoe@localhost"), "", "xmppctl: zoe@localhost does not exist\n"),
        (
            ("register", "alice@other.org"),
            "pw\n",
            not_served,
        ),
        (
            ("list", "other.org"),
            "",
            not_served,
        ),
        (
            ("register", "localhost"),
            "pw\n",
            "xmppctl: expected an account as USER@HOST, got 'localhost'\n",
        ),
        (("register", "bob@localhost"), "\n", "xmppctl: the password is empty\n"),
        (("register", "bob@localhost"), "", "xmppctl: the password is empty\n"),
    ]
    for argv, stdin, err in cases:
        assert run(capsys, monkeypatch, "-c", c, *argv, stdin=stdin) == (1, "", err), argv
    code, _, err = run(
        capsys, monkeypatch, "-c", c, "register", "bob@localhost", "--password-file", "/nonexistent"
    )
    assert (code, err) == (1, "xmppctl: cannot read /nonexistent: No such file or directory\n")


def test_password_typed_twice_at_a_terminal(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = iter(["typed pw", "typed pw", "one", "two"])
    monkeypatch.setattr(ctl.getpass, "getpass", lambda prompt: next(answers))
    monkeypatch.setattr(sys, "stdin", Stdin(tty=True))
    assert main(["-c", str(config), "register", "dave@localhost"]) == 0
    assert main(["-c", str(config), "passwd", "dave@localhost"]) == 1
    assert capsys.readouterr().err == "xmppctl: the passwords do not match\n"
    assert check_password(config, "localhost", "dave", "typed pw")


def test_list_reads_every_page(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (
        run(capsys, monkeypatch, "-c", str(config), "register-bulk", "localhost", "--count", "12")[
            0
        ]
        == 0
    )
    monkeypatch.setattr(ctl, "LIST_PAGE", 5)
    code, out, _ = run(capsys, monkeypatch, "-c", str(config), "list", "localhost")
    assert code == 0
    assert sorted(out.splitlines()) == sorted(f"user{n}@localhost" for n in range(1, 13))


# --------------------------------------------------------------------------- configuration


def test_check(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = config.parent / "data"
    code, out, err = run(capsys, monkeypatch, "-c", str(config), "check")
    assert (code, err) == (0, "")
    assert out.startswith(
        "certificate: warning: tls.cert and tls.key are not set: the server will make a "
        f"self-signed certificate in {data / 'tls'} at first start, which clients will not trust\n"
        f"items: warning: no store at {data / 'items.sqlite3'} yet "
        "(the server creates it at first start)\n"
        f"blobs: warning: no store at {data / 'blobs'} yet (the server creates it at first start)\n"
    )
    assert out.endswith(f"\n{config}: OK (3 warnings)\n")
    assert not data.exists()  # a mistyped data_dir stays visible: nothing is made

    assert run(capsys, monkeypatch, "-c", str(config), "register", "a@localhost",
               stdin="pw\n")[0] == 0
    made = {p: p.stat().st_mtime_ns for p in data.rglob("*")}
    code, out, err = run(capsys, monkeypatch, "-c", str(config), "check")
    assert (code, err) == (0, "")
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*")} == made  # nothing written
    assert out.startswith(
        "certificate: warning: tls.cert and tls.key are not set: the server will make a "
        f"self-signed certificate in {data / 'tls'} at first start, which clients will not trust\n"
        f"items: ok: sqlite {data / 'items.sqlite3'}, answered in "
    )
    assert f"\nblobs: ok: files {data / 'blobs'}, answered in " in out
    assert "\ncache: ok: in-process LRU (100000 items), answered in " in out
    assert out.endswith(f"\n{config}: OK (1 warning)\n")


def test_check_warns_of_admins_and_proxies_with_no_account(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "xmppd.yml"
    path.write_text(
        "data_dir: data\n"
        "admins: [boss@localhost]\n"
        "auth:\n"
        "  proxy_auth: [proxy@localhost]\n"
    )

    def account_lines() -> list[str]:
        code, out, err = run(capsys, monkeypatch, "-c", str(path), "check")
        assert (code, err) == (0, "")
        return [line for line in out.splitlines() if line.startswith("accounts:")]

    boss = (
        f"accounts: warning: {path}:2: admins[0]: boss@localhost has no account: "
        "create it with `xmppctl register boss@localhost`"
    )
    proxy = (
        f"accounts: warning: {path}:4: auth.proxy_auth[0]: proxy@localhost has no account: "
        "create it with `xmppctl register proxy@localhost`"
    )
    assert account_lines() == [proxy, boss]  # before a first start: no store, no account
    assert run(capsys, monkeypatch, "-c", str(path), "register", "boss@localhost",
               stdin="pw\n")[0] == 0
    assert account_lines() == [proxy]
    assert run(capsys, monkeypatch, "-c", str(path), "register", "proxy@localhost",
               stdin="pw\n")[0] == 0
    assert account_lines() == []


def test_check_loads_the_certificate_and_opens_the_stores(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = ensure_self_signed(tmp_path / "pair", ["localhost"])
    path = tmp_path / "tls.yml"
    path.write_text(f"data_dir: data\ntls: {{cert: {cert}, key: {key}}}\n")
    code, out, err = run(capsys, monkeypatch, "-c", str(path), "check")
    assert (code, err) == (0, "")
    assert f"certificate {cert}: localhost: ok: covered by DNS:localhost\n" in out
    assert out.endswith(f"\n{path}: OK (3 warnings)\n")  # self-signed, no stores yet

    path.write_text(f"data_dir: data\ntls: {{cert: {key}, key: {cert}}}\n")
    code, out, err = run(capsys, monkeypatch, "-c", str(path), "check")
    assert out.startswith(
        f"tls: error: certificate {key}: no PEM certificate in the file "
        "(are tls.cert and tls.key swapped?)\n"
    )
    assert (code, err) == (1, f"xmppctl: {path}: 1 error\n")
    other_cert, other_key = ensure_self_signed(tmp_path / "other", ["localhost"])
    path.write_text(f"data_dir: data\ntls: {{cert: {cert}, key: {other_key}}}\n")
    code, out, err = run(capsys, monkeypatch, "-c", str(path), "check")
    mismatch = f"key {other_key} does not belong to the certificate {cert}"
    assert out.startswith(f"tls: error: {mismatch}\n")
    assert (code, err) == (1, f"xmppctl: {path}: 1 error\n")

    read_only = unwritable_dir(tmp_path)
    path.write_text(f"data_dir: {read_only}\n")
    code, out, err = run(capsys, monkeypatch, "-c", str(path), "check")
    assert (code, out) == (1, "")
    assert err.startswith(f"xmppctl: data_dir {read_only} is not writable: ")
    assert err.count("\n") == 1


def test_without_c_the_file_is_xmppd_config_then_etc_and_is_named(
    config: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("XMPPD_CONFIG", str(config))
    code, out, err = run(capsys, monkeypatch, "check")
    assert (code, err) == (0, f"xmppctl: using the configuration {config} (from $XMPPD_CONFIG)\n")
    assert out.endswith(f"\n{config}: OK (3 warnings)\n")  # self-signed, no stores yet
    monkeypatch.delenv("XMPPD_CONFIG")
    system = tmp_path / "etc-xmppd.yml"
    monkeypatch.setattr(configfile, "SYSTEM_CONFIG", system)
    # Neither: a clear error, never built-in defaults with a data_dir under the cwd.
    assert run(capsys, monkeypatch, "list", "localhost") == (
        1,
        "",
        f"xmppctl: no configuration file: give -c FILE, set $XMPPD_CONFIG, or create {system}\n",
    )
    assert list(elsewhere.iterdir()) == []
    system.write_text(config.read_text())
    code, out, err = run(capsys, monkeypatch, "check")
    assert (code, err) == (0, f"xmppctl: using the configuration {system}\n")
    assert out.endswith(f"\n{system}: OK (3 warnings)\n")


def test_bad_config_exits_1_with_the_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "hosts: [localhost]\n"
        "listeners:\n"
        "  - {type: starttls, address: 127.0.0.1, port: 52x22}\n"
        "hostz: 1\n"
    )
    expected = (
        f'xmppctl: {bad}:3: listeners[0].port: expected an integer, got "52x22"\n'
        f'xmppctl: {bad}:4: hostz: unknown key "hostz" (did you mean "hosts"?)\n'
    )
    assert run(capsys, monkeypatch, "-c", str(bad), "check") == (1, "", expected)
    assert run(capsys, monkeypatch, "-c", str(bad), "register", "a@localhost", stdin="pw\n") == (
        1,
        "",
        expected,
    )
    missing = tmp_path / "missing.yml"
    assert run(capsys, monkeypatch, "-c", str(missing), "check") == (
        1,
        "",
        f"xmppctl: {missing}: cannot read the file: No such file or directory\n",
    )


def test_check_validates_module_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.yml"
    path.write_text("modules:\n  ping: {}\n  no_such_module: {}\n")
    code, out, err = run(capsys, monkeypatch, "-c", str(path), "check")
    assert (code, out) == (1, "")
    assert err == f"xmppctl: {path}:3: modules.no_such_module: no such module\n"


def test_stores_made_by_xmppctl_are_private(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even under a lax umask: the item store holds every account's SCRAM keys."""
    before = os.umask(0o022)
    try:
        assert run(capsys, monkeypatch, "-c", str(config), "register", "a@localhost",
                   stdin="pw\n")[0] == 0
    finally:
        os.umask(before)
    data = config.parent / "data"
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "blobs").stat().st_mode) == 0o700
    for store in data.glob("items.sqlite3*"):
        assert stat.S_IMODE(store.stat().st_mode) & 0o007 == 0, store


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_root_is_refused_on_a_data_dir_of_another_user(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = config.parent / "data"
    data.mkdir()
    os.chown(data, 65534, 65534)
    code, out, err = run(capsys, monkeypatch, "-c", str(config), "register", "a@localhost",
                         stdin="pw\n")
    assert (code, out) == (1, "")
    assert err.startswith(f"xmppctl: data_dir {data} belongs to ")
    assert "sudo -u" in err
    assert list(data.iterdir()) == []  # nothing made as root


# --------------------------------------------------------------------------- register-bulk


def test_register_bulk_counts_and_skips_existing(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    c = str(config)
    assert run(capsys, monkeypatch, "-c", c, "register", "user3@localhost", stdin="mine\n")[0] == 0
    assert run(capsys, monkeypatch, "-c", c, "register-bulk", "localhost", "--count", "200") == (
        0,
        "localhost: 199 created, 1 already existed, 0 failed\n",
        "",
    )
    argv = ["register-bulk", "localhost", "--count", "10", "--start", "196", "--concurrency", "3"]
    assert run(capsys, monkeypatch, "-c", c, *argv, "--user-pattern", "user{n}")[1] == (
        "localhost: 5 created, 5 already existed, 0 failed\n"
    )
    code, out, _ = run(capsys, monkeypatch, "-c", c, "list", "localhost")
    assert len(out.splitlines()) == 205
    assert check_password(config, "localhost", "user77", "pass77")
    assert check_password(config, "localhost", "user3", "mine")  # skipped, not overwritten


def test_register_bulk_patterns(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    c = str(config)
    argv = ["-c", c, "register-bulk", "example.org", "--count", "3", "--start", "0"]
    extra = ["--user-pattern", "bot-{n:03d}", "--password-pattern", "pw-{n}-x"]
    assert run(capsys, monkeypatch, *argv, *extra)[0] == 0
    assert run(capsys, monkeypatch, "-c", c, "list", "example.org")[1] == (
        "bot-000@example.org\nbot-001@example.org\nbot-002@example.org\n"
    )
    assert check_password(config, "example.org", "bot-002", "pw-2-x")
    assert run(capsys, monkeypatch, *argv, "--user-pattern", "bot") == (
        1,
        "",
        "xmppctl: --user-pattern 'bot' gives one name for every account: add {n}\n",
    )
    code, _, err = run(capsys, monkeypatch, *argv, "--user-pattern", "bot{m}")
    assert code == 1 and err.startswith("xmppctl: bad pattern: KeyError('m')")


def test_register_bulk_from_a_file(
    config: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    c = str(config)
    users = tmp_path / "users.txt"
    users.write_text("# user password\nann pw one\n\n  ben   secret\n")
    assert run(
        capsys, monkeypatch, "-c", c, "register-bulk", "localhost", "--file", str(users)
    ) == (
        0,
        "localhost: 2 created, 0 already existed, 0 failed\n",
        "",
    )
    assert check_password(config, "localhost", "ann", "pw one")
    assert check_password(config, "localhost", "ben", "secret")

    assert run(
        capsys, monkeypatch, "-c", c, "register-bulk", "localhost", "--file", "-", stdin="cy x\n"
    )[1] == ("localhost: 1 created, 0 already existed, 0 failed\n")

    users.write_text("dan pw\nlonely\n")
    assert run(
        capsys, monkeypatch, "-c", c, "register-bulk", "localhost", "--file", str(users)
    ) == (
        1,
        "",
        f'xmppctl: {users}:2: expected "user password"\n',
    )
    assert (
        run(capsys, monkeypatch, "-c", c, "list", "localhost")[1]
        == "ann@localhost\nben@localhost\ncy@localhost\n"
    )

    users.write_text("ed pw\nbad@name pw\n")
    code, out, err = run(
        capsys, monkeypatch, "-c", c, "register-bulk", "localhost", "--file", str(users)
    )
    assert (code, out) == (1, "localhost: 1 created, 0 already existed, 1 failed\n")
    assert err.startswith("xmppctl: 1 accounts could not be created (first: 'bad@name': ")
    assert err.count("\n") == 1


# --------------------------------------------------------------------------- a real process


def xmppctl(*argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    exe = shutil.which("xmppctl")
    command = [exe] if exe else [sys.executable, "-m", "xmppd.cli.ctl"]
    return subprocess.run(
        [*command, *argv], input=stdin, capture_output=True, text=True, timeout=120, check=False
    )


def test_the_installed_command(config: Path, tmp_path: Path) -> None:
    assert shutil.which("xmppctl"), "pip install -e . declares the xmppctl entry point"
    done = xmppctl("-c", str(config), "register", "eve@localhost", stdin="piped secret\n")
    assert (done.returncode, done.stdout, done.stderr) == (0, "registered eve@localhost\n", "")
    assert check_password(config, "localhost", "eve", "piped secret")
    done = xmppctl("-c", str(config), "list", "localhost")
    assert (done.returncode, done.stdout) == (0, "eve@localhost\n")

    done = xmppctl("-c", str(config), "register", "eve@localhost", stdin="again\n")
    assert (done.returncode, done.stdout, done.stderr) == (
        1,
        "",
        "xmppctl: eve@localhost already exists\n",
    )

    bad = tmp_path / "bad.yml"
    bad.write_text(
        textwrap.dedent("""\
        hosts: [localhost]
        limits:
          max_xml_depth: 500
        """)
    )
    done = xmppctl("-c", str(bad), "check")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == f"xmppctl: {bad}:3: limits.max_xml_depth: must be at most 200, got 500\n"


def test_version_is_the_installed_package_version() -> None:
    done = xmppctl("--version")
    assert (done.returncode, done.stdout) == (0, f"xmppctl {version('xmppd')}\n")


def test_storage_failure_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "data").write_text("a file where the data folder should be")
    path = tmp_path / "x.yml"
    path.write_text("data_dir: data\n")
    code, out, err = run(capsys, monkeypatch, "-c", str(path), "list", "localhost")
    assert (code, out) == (1, "")
    assert err.startswith("xmppctl: ") and err.count("\n") == 1 and "Traceback" not in err


def gone_pid() -> int:
    """The pid of a process that has exited."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True, timeout=30)
    return int(done.stdout)


def test_the_record_of_a_node_that_is_gone_is_deleted_with_a_warning(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record left by a node that died: the store is changed all the same."""
    c = str(config)
    assert run(capsys, monkeypatch, "-c", c, "register", "eve@localhost", stdin="old pw\n")[0] == 0
    admin = config.parent / "data" / "admin"
    admin.mkdir(parents=True)
    (admin / "token").write_text("secret\n")
    pid = gone_pid()
    record = admin / f"{pid}-dead.json"
    record.write_text(json.dumps({"url": "http://127.0.0.1:9", "pid": pid}))
    code, out, err = run(capsys, monkeypatch, "-c", c, "passwd", "eve@localhost", stdin="new pw\n")
    assert (code, out) == (0, "password changed for eve@localhost\n")
    assert err == f"xmppctl: warning: deleted {record}: its node (pid {pid}) is gone\n"
    assert not record.exists()
    assert check_password(config, "localhost", "eve", "new pw")
    code, out, err = run(capsys, monkeypatch, "-c", c, "unregister", "eve@localhost")
    assert (code, out, err) == (0, "unregistered eve@localhost\n", "")


def test_the_token_never_goes_to_a_port_its_node_does_not_hold(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another local user listening on a recorded port (its node died and a live
    process reused the pid, say) would collect the admin token: it is not contacted."""
    c = str(config)
    assert run(capsys, monkeypatch, "-c", c, "register", "eve@localhost", stdin="old pw\n")[0] == 0
    admin = config.parent / "data" / "admin"
    admin.mkdir(parents=True)
    (admin / "token").write_text("secret\n")
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        squatter.setblocking(False)
        url = f"http://127.0.0.1:{squatter.getsockname()[1]}"
        record = admin / f"{bystander.pid}-node.json"
        record.write_text(json.dumps({"url": url, "pid": bystander.pid}))
        try:
            code, out, err = run(
                capsys, monkeypatch, "-c", c, "passwd", "eve@localhost", stdin="new pw\n"
            )
        finally:
            bystander.kill()
            bystander.wait()
        assert (code, out) == (0, "password changed for eve@localhost\n")
        assert err == (
            f"xmppctl: warning: {url} is not served by the node of {record} "
            f"(pid {bystander.pid}): not contacted\n"
        )
        with pytest.raises(BlockingIOError):
            squatter.accept()  # nobody connected, so nobody sent the token


# --------------------------------------------------------------------------- migrate


def test_migrate_between_embedded_stores(
    config: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    c = str(config)
    assert run(capsys, monkeypatch, "-c", c, "register-bulk", "localhost", "--count", "3")[0] == 0
    cfg = load_config(config)

    async def put_blob() -> None:
        storage = await open_storage(cfg.storage, cfg.data_dir)
        try:
            await BlobStore(storage.blobs, "localhost", "vcard").put("user1", b"<vCard/>")
        finally:
            await storage.close()

    asyncio.run(put_blob())
    target = tmp_path / "target.yml"
    target.write_text("hosts: [localhost, example.org]\ndata_dir: elsewhere\n")

    assert run(capsys, monkeypatch, "migrate", "--from", c, "--to", str(target)) == (
        0,
        "blobs:localhost/vcard: 1 copied, 0 already there, 0 failed\n"
        "items:localhost/accounts: 3 copied, 0 already there, 0 failed\n"
        "migrated 4 entries in 2 stores\n",
        "",
    )
    assert (tmp_path / "elsewhere" / "items.sqlite3").is_file()
    assert run(capsys, monkeypatch, "-c", str(target), "list", "localhost")[1] == (
        "user1@localhost\nuser2@localhost\nuser3@localhost\n"
    )
    assert check_password(target, "localhost", "user2", "pass2")
    # Run again: everything is found equal, nothing is copied twice, and it says so.
    assert run(capsys, monkeypatch, "migrate", "--from", c, "--to", str(target))[:2] == (
        0,
        "blobs:localhost/vcard: 0 copied, 1 already there, 0 failed\n"
        "items:localhost/accounts: 0 copied, 3 already there, 0 failed\n"
        "migrated 4 entries in 2 stores\n",
    )

    assert run(capsys, monkeypatch, "migrate", "--from", c, "--to", c) == (
        1,
        "",
        f"xmppctl: {c} and {c} name the same storage\n",
    )


def test_unregister_removes_the_accounts_data_too(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like in-band removal: modules drop the user's vCard and roster, contacts are updated."""
    c = str(config)
    for user in ("alice", "bob"):
        assert (
            run(capsys, monkeypatch, "-c", c, "register", f"{user}@localhost", stdin="pw\n")[0] == 0
        )
    cfg = load_config(config)

    async def seed() -> None:
        storage = await open_storage(cfg.storage, cfg.data_dir)
        try:
            await BlobStore(storage.blobs, "localhost", "vcard").put("alice", b"<vCard/>")
        finally:
            await storage.close()

    async def left() -> tuple[bool, bool]:
        storage = await open_storage(cfg.storage, cfg.data_dir)
        try:
            vcard = await BlobStore(storage.blobs, "localhost", "vcard").get("alice")
            bob_vcard = await BlobStore(storage.blobs, "localhost", "vcard").get("bob")
            return vcard is not None, bob_vcard is not None
        finally:
            await storage.close()

    asyncio.run(seed())
    assert asyncio.run(left()) == (True, False)
    assert run(capsys, monkeypatch, "-c", c, "unregister", "alice@localhost")[0] == 0
    assert asyncio.run(left()) == (False, False)


def test_unregister_that_fails_part_way_says_so_and_a_second_run_finishes(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A storage failure in one module's removal is an error, not a silent half-removal;
    unregister run again (the account is gone by then) deletes what is left."""
    from xmppd.storage.backends.files import FileBlobBackend
    from xmppd.storage.base import StorageError

    c = str(config)
    assert run(capsys, monkeypatch, "-c", c, "register", "zed@localhost", stdin="pw\n")[0] == 0
    cfg = load_config(config)

    async def blobs(action: str) -> list[str]:
        storage = await open_storage(cfg.storage, cfg.data_dir)
        try:
            store = BlobStore(storage.blobs, "localhost", "offline")
            if action == "seed":
                await store.put("zed/0123", b"<message/>")
            return (await store.list("zed/")).keys
        finally:
            await storage.close()

    assert asyncio.run(blobs("seed")) == ["zed/0123"]
    delete = FileBlobBackend.delete

    async def broken(self: FileBlobBackend, namespace: str, key: str, **kw: Any) -> bool:
        if namespace == "localhost/offline":
            raise StorageError("files", "delete", f"{key!r}: Input/output error")
        return await delete(self, namespace, key, **kw)

    monkeypatch.setattr(FileBlobBackend, "delete", broken)
    code, out, err = run(capsys, monkeypatch, "-c", c, "unregister", "zed@localhost")
    assert (code, out) == (1, "")
    assert err == (
        "xmppctl: data of zed@localhost could not all be deleted (offline: files: delete "
        "failed: 'zed/0123': Input/output error): run unregister again to finish\n"
    )
    assert asyncio.run(blobs("list")) == ["zed/0123"]

    monkeypatch.setattr(FileBlobBackend, "delete", delete)
    assert run(capsys, monkeypatch, "-c", c, "unregister", "zed@localhost") == (
        0,
        "zed@localhost did not exist: deleted the data an earlier removal left\n",
        "",
    )
    assert asyncio.run(blobs("list")) == []
    assert run(capsys, monkeypatch, "-c", c, "unregister", "zed@localhost") == (
        1,
        "",
        "xmppctl: zed@localhost does not exist\n",
    )


def test_a_reader_that_leaves_early_is_no_error(config: Path) -> None:
    """`xmppctl status | head -3`: the reader closes the pipe before xmppctl is done
    writing; that ends xmppctl quietly, as it ends any Unix tool, not with a
    "Broken pipe" error under the lines the operator asked for."""
    assert shutil.which("xmppctl")
    command = subprocess.Popen(
        ["xmppctl", "-c", str(config), "status"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert command.stdout is not None
    command.stdout.close()  # before xmppctl writes its first line
    _, errors = command.communicate(timeout=60)
    assert errors == ""
    assert command.returncode == 141  # 128 + SIGPIPE, as a shell reports a tool it ended
