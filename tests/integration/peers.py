"""Real ejabberd 23.01 and Prosody 0.12, each in its own temporary folder, to make exports.

Both run on 127.0.0.1 on free ports with a configuration written here, and
their data goes to the temporary folder, never to /etc or /var/lib. The
data is made with the peers' own tools: `ejabberdctl register`,
`add_rosteritem`, `set_vcard` and `send_message` (stored offline) on a running
ejabberd; `prosodyctl register` and Prosody's own storage library (the
roster and a vCard4 PEP item, as Prosody's mod_vcard_legacy keeps a vCard)
for Prosody. Then `ejabberdctl export_piefxis` and `prosody-migrator` write
the XEP-0227 files the tests import.

The Debian packages run their servers as their own users (ejabberdctl
switches to "ejabberd" when started as root; Prosody refuses to run as
root): the folders are handed to those users. prosody-migrator writes its
xep227 files into its compiled-in data folder (/var/lib/prosody) whatever
its configuration says, so it runs in a private mount namespace where a
temporary folder is mounted over that path.

A missing peer or a machine where they cannot run skips the test locally
and fails it in CI (tests/storage/services.py: `unavailable`).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.storage.services import unavailable

EJABBERDCTL = "/usr/sbin/ejabberdctl"
PROSODY = "/usr/bin/prosody"
PROSODYCTL = "/usr/bin/prosodyctl"
MIGRATOR = "/usr/bin/prosody-migrator"
LUA = "lua5.4"
PROSODY_SOURCE = "/usr/lib/prosody"  # where Debian's prosodyctl finds Prosody's libraries
STEP_TIMEOUT = 30.0

PASSWORDS = {"alice": "wonder land", "bob": "bob-pass-1"}
"""The accounts made on each peer; alice's password has a space, as real ones do."""


def _need(*paths: str) -> None:
    for path in paths:
        if shutil.which(path) is None:
            unavailable(f"{path} is not installed")
    if os.geteuid() != 0:
        unavailable("the peers' packaged tools must start as root (they switch users)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, process: subprocess.Popen[bytes] | None, log: Path) -> None:
    deadline = time.monotonic() + STEP_TIMEOUT
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            break
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)  # polling a port another process opens: there is no event
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise AssertionError(f"the peer did not open 127.0.0.1:{port}\n{tail}")


def _run(*command: str, cwd: Path | None = None) -> str:
    done = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=STEP_TIMEOUT, check=False
    )
    if done.returncode != 0:
        output = done.stderr + done.stdout
        raise AssertionError(f"{command[:3]} failed ({done.returncode}): {output}")
    return done.stdout


def _folder_for(user: str) -> Path:
    """A temporary folder the peer's user may write (pytest's tmp_path is root's only)."""
    folder = Path(tempfile.mkdtemp(prefix=f"xmppd-{user}-"))
    entry = pwd.getpwnam(user)
    os.chown(folder, entry.pw_uid, entry.pw_gid)
    folder.chmod(0o755)
    return folder


def _chown_tree(folder: Path, user: str) -> None:
    entry = pwd.getpwnam(user)
    for path in [folder, *folder.rglob("*")]:
        os.chown(path, entry.pw_uid, entry.pw_gid)


# --------------------------------------------------------------------------- ejabberd

EJABBERD_CONFIG = """\
loglevel: warning
hosts:
  - "{host}"
listen:
  -
    port: {port}
    ip: "127.0.0.1"
    module: ejabberd_c2s
auth_method: internal
auth_password_format: scram
default_db: mnesia
s2s_access: none
acme:
  auto: false
acl:
  local:
    user_regexp: ""
access_rules:
  local:
    allow: local
  c2s:
    allow: all
api_permissions:
  "console commands":
    from:
      - ejabberd_ctl
    who: all
    what: "*"
modules:
  mod_admin_extra: {{}}
  mod_offline: {{}}
  mod_private: {{}}
  mod_roster: {{}}
  mod_vcard:
    search: false
"""


@contextmanager
def ejabberd(host: str) -> Iterator[tuple[Path, list[str]]]:
    """A running ejabberd for `host`: (its folder, the ejabberdctl command line for it)."""
    _need(EJABBERDCTL, "erl")
    folder = _folder_for("ejabberd")
    port = _free_port()
    for sub in ("db", "log", "export"):
        (folder / sub).mkdir()
    (folder / "ejabberd.yml").write_text(EJABBERD_CONFIG.format(host=host, port=port))
    (folder / "ejabberdctl.cfg").write_text("")
    (folder / "inetrc").write_text("")
    _chown_tree(folder, "ejabberd")
    node = f"xmppdtest{uuid.uuid4().hex[:8]}@localhost"
    ctl = [
        EJABBERDCTL,
        *("--node", node),
        *("--config-dir", str(folder)),
        *("--config", str(folder / "ejabberd.yml")),
        *("--ctl-config", str(folder / "ejabberdctl.cfg")),
        *("--logs", str(folder / "log")),
        *("--spool", str(folder / "db")),
    ]
    try:
        _run(*ctl, "start")
        _run(*ctl, "started")
        _wait_port(port, None, folder / "log" / "ejabberd.log")
        yield folder, ctl
    finally:
        subprocess.run([*ctl, "stop"], capture_output=True, timeout=STEP_TIMEOUT, check=False)
        subprocess.run([*ctl, "stopped"], capture_output=True, timeout=STEP_TIMEOUT, check=False)
        shutil.rmtree(folder, ignore_errors=True)


def ejabberd_export(host: str, into: Path) -> Path:
    """Accounts, a mutual roster, alice's vCard and an offline message for alice, made on
    a real ejabberd and exported with `ejabberdctl export_piefxis`; the folder of files."""
    with ejabberd(host) as (folder, ctl):
        for user, password in PASSWORDS.items():
            _run(*ctl, "register", user, host, password)
        _run(*ctl, "add_rosteritem", "alice", host, "bob", host, "Bobby", "Friends", "both")
        _run(*ctl, "add_rosteritem", "bob", host, "alice", host, "Alice", "", "both")
        _run(*ctl, "set_vcard", "alice", host, "FN", "Alice Liddell")
        _run(*ctl, "send_message", "chat", f"bob@{host}", f"alice@{host}", "", "hello there")
        _run(*ctl, "export_piefxis", str(folder / "export"))
        shutil.copytree(folder / "export", into)
    return into


# --------------------------------------------------------------------------- Prosody

PROSODY_CONFIG = """\
pidfile = "{folder}/prosody.pid"
data_path = "{folder}/data"
interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {port} }}
s2s_ports = {{ }}
c2s_direct_tls_ports = {{ }}
modules_enabled = {{ "roster"; "saslauth"; "disco"; "pep"; "private"; "vcard4"; "vcard_legacy" }}
modules_disabled = {{ "s2s"; "tls" }}
c2s_require_encryption = false
authentication = "internal_hashed"
storage = "internal"
log = {{ warn = "{folder}/prosody.log" }}
VirtualHost "{host}"
"""

MIGRATOR_CONFIG = """\
input {{ hosts = {{ ["{host}"] = {{ "accounts", "roster", "vcard", "private", "pep-pubsub" }} }};
        type = "internal"; path = "{folder}/data" }}
output {{ type = "xep0227" }}
"""

SEED = Path(__file__).with_name("prosody_seed.lua")


def prosody_export(host: str, into: Path) -> Path:
    """Accounts, a mutual roster and alice's vCard (a vCard4 PEP item) on a real Prosody,
    exported with `prosody-migrator` to its xep227 store; the folder of files."""
    _need(PROSODY, PROSODYCTL, MIGRATOR, LUA, "unshare", "runuser")
    folder = _folder_for("prosody")
    port = _free_port()
    config = folder / "prosody.cfg.lua"
    config.write_text(PROSODY_CONFIG.format(folder=folder, host=host, port=port))
    (folder / "migrator.cfg.lua").write_text(MIGRATOR_CONFIG.format(folder=folder, host=host))
    (folder / "data").mkdir()
    (folder / "out").mkdir()
    _chown_tree(folder, "prosody")
    server = subprocess.Popen(
        ["runuser", "-u", "prosody", "--", PROSODY, "--config", str(config), "-F"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a group of its own: runuser and Prosody killed together
    )
    try:
        _wait_port(port, server, folder / "prosody.log")
        for user, password in PASSWORDS.items():
            _run(PROSODYCTL, "--config", str(config), "register", user, host, password)
        _run("runuser", "-u", "prosody", "--", LUA, str(SEED), PROSODY_SOURCE, str(config), host)
        mount = (
            f"mount --bind {folder / 'out'} /var/lib/prosody && "
            f"exec {MIGRATOR} --config {folder / 'migrator.cfg.lua'} input output"
        )
        _run("unshare", "--mount", "--propagation", "private", "sh", "-c", mount)
        shutil.copytree(folder / "out", into)
    finally:
        _stop(server)
        shutil.rmtree(folder, ignore_errors=True)
    return into


def _stop(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM (runuser passes it on to Prosody), then SIGKILL to its whole group if it
    has not exited within STEP_TIMEOUT: a Prosody that hangs is not left running."""
    server.terminate()
    try:
        server.wait(STEP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)  # runuser would not pass SIGKILL on
        server.wait()
