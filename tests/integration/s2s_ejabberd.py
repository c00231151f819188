"""A real ejabberd (Debian's 23.01) as a federation peer, and the DNS server it asks.

ejabberd serves c.test on 127.0.18.4, started unprivileged in the way the
benchmark runs it (bench/harness/peers/ejabberd.sh): `erl -s ejabberd` with
EJABBERD_CONFIG_PATH pointing at a config written here, its mnesia database
and log in the test's folder, no Erlang distribution (so no epmd and no
cookie). Its users are made by an `-eval` that runs once ejabberd started,
and which then prints a line the fixture waits for.

ejabberd has no static host override for s2s; it finds peers through DNS:
`_xmpps-server._tcp` and `_xmpp-server._tcp` SRV records with Erlang's own
resolver, which asks the name servers in the file ERL_INETRC names (here
only `ThreadedDNS`, a DNS server on 127.0.18.1 answering from a table),
then the SRV target's address with the C library's getaddrinfo, which reads
/etc/hosts. So ejabberd runs in a private mount namespace (`unshare
--mount`, as root) where a hosts file of the test's is mounted over
/etc/hosts; nothing outside the test's folder changes. The DNS server runs
in a thread, not on a test's event loop, because ejabberd outlives each
test (starting it costs about two seconds, so the fixture that starts it
is module-scoped).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

from tests.integration.s2s_peers import CA, DNS_ADDRESS, answer, free_port, issue, require

ERL = "erl"
EJABBERD_LIBS = "/usr/lib/x86_64-linux-gnu"  # ERL_LIBS of Debian's ejabberdctl
EJABBERD_ADDRESS = "127.0.18.4"
READY = "xmppd-test: ejabberd ready"


def ejabberd_installed() -> bool:
    return shutil.which(ERL) is not None and any(Path(EJABBERD_LIBS).glob("ejabberd-*"))


def can_run_ejabberd() -> str | None:
    """Why ejabberd cannot run here (its /etc/hosts needs a mount namespace), or None."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    if os.geteuid() != 0:
        return "a private /etc/hosts for ejabberd needs root (unshare --mount)"
    return None


def require_ejabberd() -> None:
    """Skip the calling test module when ejabberd cannot run here; fail it in CI."""
    require(
        ejabberd_installed(),
        "ejabberd is not installed",
        "CI needs ejabberd (apt-get install ejabberd) for the s2s tests",
    )
    why = can_run_ejabberd()
    require(why is None, str(why), f"CI cannot run ejabberd for the s2s tests: {why}")


class ThreadedDNS:
    """Answers UDP DNS queries from `records` ((name, type) -> [rdata text]) in a thread."""

    def __init__(self, records: dict[tuple[str, str], list[str]]) -> None:
        self.records = records
        self.queries: list[tuple[str, str]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((DNS_ADDRESS, 0))
        self.port = int(self.sock.getsockname()[1])
        self._thread = threading.Thread(target=self._serve, name="test-dns", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(4096)
            except OSError:  # closed
                return
            self.sock.sendto(answer(self.records, data, self.queries), addr)

    def close(self) -> None:
        self.sock.close()
        self._thread.join(5)


@dataclass
class Ejabberd:
    domain: str
    address: str
    c2s_port: int
    s2s_port: int
    folder: Path
    process: subprocess.Popen[bytes]
    _drain: threading.Thread | None = field(default=None, repr=False)

    @property
    def log(self) -> str:
        path = self.folder / "log" / "ejabberd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # the VM stops cleanly on SIGTERM
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._drain is not None:
            self._drain.join(5)


def write_ejabberd_config(
    folder: Path, ca: CA, domain: str, address: str, c2s_port: int, s2s_port: int
) -> Path:
    cert, key = issue(ca, folder, domain)
    pem = folder / f"{domain}.pem"  # ejabberd wants the key and certificate in one file
    pem.write_text(cert.read_text() + key.read_text())
    pem.chmod(0o600)
    config = {
        "loglevel": "info",
        "log_rotate_count": 0,
        "hosts": [domain],
        "certfiles": [str(pem)],
        "ca_file": str(ca.path),
        "acme": {"auto": False},
        "listen": [
            {
                "port": c2s_port,
                "ip": address,
                "module": "ejabberd_c2s",
                "starttls": True,
                "starttls_required": True,
            },
            {"port": s2s_port, "ip": address, "module": "ejabberd_s2s_in"},
        ],
        # TLS on every server stream; a certificate that validates gives SASL EXTERNAL,
        # one that does not leaves dialback (mod_s2s_dialback) as the only way.
        "s2s_use_starttls": "required",
        "s2s_access": "s2s",
        "outgoing_s2s_families": ["ipv4"],
        "s2s_dns_timeout": 5,
        "s2s_dns_retries": 1,
        "auth_method": "internal",
        "auth_password_format": "plain",
        "default_db": "mnesia",
        "acl": {"local": {"user_regexp": ""}},
        "access_rules": {
            "local": {"allow": "local"},
            "c2s": {"allow": "all"},
            "s2s": {"allow": "all"},
        },
        "modules": {
            "mod_caps": {},
            "mod_disco": {},
            "mod_offline": {},
            "mod_ping": {},
            "mod_roster": {},
            "mod_s2s_dialback": {},
            "mod_vcard": {"search": False},
        },
    }
    path = folder / "ejabberd.yml"
    # JSON is YAML: every string quoted keeps paths and domains literal.
    path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in config.items()) + "\n")
    return path


def start_ejabberd(
    folder: Path,
    ca: CA,
    *,
    dns_port: int,
    hosts: dict[str, str],
    users: dict[str, str],
    domain: str = "c.test",
    address: str = EJABBERD_ADDRESS,
    timeout: float = 60,
) -> Ejabberd:
    """ejabberd serving `domain` on `address`, trusting `ca`, asking the DNS server on
        127.0.18.1:`dns_port` for its peers' SRV records and reading `hosts` (name -> address)
    as its /etc/hosts; `users` registered. Returns once it is ready."""
    folder.mkdir(parents=True, exist_ok=True)
    for sub in ("db", "log"):
        (folder / sub).mkdir(exist_ok=True)
    c2s_port, s2s_port = free_port(address), free_port(address)
    config = write_ejabberd_config(folder, ca, domain, address, c2s_port, s2s_port)
    ip = ",".join(DNS_ADDRESS.split("."))
    inetrc = folder / "inetrc"
    # Only the test's DNS server: no /etc/resolv.conf, no /etc/hosts.
    inetrc.write_text(
        f'{{resolv_conf, ""}}.\n{{hosts_file, ""}}.\n'
        f"{{nameserver, {{{ip}}}, {dns_port}}}.\n{{lookup, [dns]}}.\n"
    )
    hosts_file = folder / "hosts"
    hosts_file.write_text(
        "127.0.0.1 localhost\n" + "".join(f"{ip} {name}\n" for name, ip in hosts.items())
    )
    registrations = ", ".join(
        f'ok = ejabberd_auth:try_register(<<"{user}">>, <<"{domain}">>, <<"{password}">>)'
        for user, password in users.items()
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(folder),
        "ERL_LIBS": EJABBERD_LIBS,
        "ERL_INETRC": str(inetrc),
        "ERL_CRASH_DUMP": str(folder / "log" / "erl_crash.dump"),
        "EJABBERD_CONFIG_PATH": str(config),
        "EJABBERD_LOG_PATH": str(folder / "log" / "ejabberd.log"),
    }
    process = subprocess.Popen(
        [
            *("unshare", "--mount", "--propagation", "private"),
            *("sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts_file)),
            ERL,
            "-noinput",
            *("-mnesia", "dir", f'"{folder / "db"}"'),
            *("-s", "ejabberd"),
            *("-eval", f'{registrations}, io:format("~s~n", ["{READY}"])'),
        ],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    peer = Ejabberd(domain, address, c2s_port, s2s_port, folder, process)
    # Killed if it does not get ready in time, so the read below ends.
    watchdog = threading.Timer(timeout, process.kill)
    watchdog.start()
    output: list[bytes] = []
    try:
        for line in process.stdout:
            output.append(line)
            if line.decode(errors="replace").strip() == READY:
                break
        else:
            raise RuntimeError(
                "ejabberd did not start:\n" + b"".join(output).decode(errors="replace")
            )
    finally:
        watchdog.cancel()

    def drain() -> None:
        # Its console output, kept in the folder so the pipe never fills.
        assert process.stdout is not None
        with (folder / "log" / "stdout.log").open("ab") as out:
            for line in process.stdout:
                out.write(line)

    peer._drain = threading.Thread(target=drain, name="ejabberd-stdout", daemon=True)
    peer._drain.start()
    return peer
