"""The `xmppd` command as an operator runs it: startup lines, SIGTERM, bad config."""

from __future__ import annotations

import asyncio
import ctypes.util
import os
import re
import resource
import shutil
import signal
import stat
import sys
from importlib.metadata import version
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.integration.clients import HEADER, insecure_context, read_until
from tests.integration.conftest import unwritable_dir, write_config
from tests.storage.services import unavailable
from xmppd.configfile import SYSTEM_CONFIG
from xmppd.tls import ensure_self_signed


async def start_xmppd(config: Path) -> tuple[asyncio.subprocess.Process, list[str]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "xmppd", "-c", str(config),
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    assert proc.stderr is not None
    async with asyncio.timeout(30):
        while not lines or "xmppd ready" not in lines[-1]:
            line = (await proc.stderr.readline()).decode()
            assert line, "xmppd exited during startup:\n" + "".join(lines)
            lines.append(line)
    return proc, lines


async def test_startup_lines_and_sigterm_closes_streams_with_system_shutdown(
    tmp_path: Path,
) -> None:
    proc, lines = await start_xmppd(write_config(tmp_path))
    log = "".join(lines)
    assert "SELF-SIGNED" in log
    assert "storage: items: sqlite" in log and "storage: blobs: files" in log
    ports = dict(re.findall(r"listening: c2s (STARTTLS|direct TLS).* port (\d+)", log))
    assert set(ports) == {"STARTTLS", "direct TLS"}

    reader, writer = await asyncio.open_connection(
        "127.0.0.1", int(ports["direct TLS"]), ssl=insecure_context(), server_hostname="localhost"
    )
    writer.write(HEADER.encode())
    await read_until(reader, b"</stream:features>")

    proc.send_signal(signal.SIGTERM)
    rest = b""
    async with asyncio.timeout(15):
        while chunk := await reader.read(65536):
            rest += chunk
    assert b"<system-shutdown" in rest and rest.rstrip().endswith(b"</stream:stream>")
    assert await asyncio.wait_for(proc.wait(), 15) == 0
    assert proc.stderr is not None
    assert b"xmppd stopped" in await proc.stderr.read()


async def test_bad_config_names_file_line_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("hosts: [localhost]\nlisteners:\n  - type: starttls\n    address: 127.0.0.1\n"
                   "    port: 52x22\nlimtis: {}\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "xmppd", "-c", str(bad), stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    text = err.decode()
    assert proc.returncode == 1
    assert f"{bad}:5: listeners[0].port:" in text
    assert f"{bad}:6: " in text and "limtis" in text and "limits" in text  # suggestion
    assert "Traceback" not in text


async def test_bad_module_option_stops_before_anything_starts(tmp_path: Path) -> None:
    data = tmp_path / "data"
    bad = tmp_path / "c2.yml"
    bad.write_text(f"data_dir: {data}\nlimts: {{}}\nmodules:\n  roster: {{versionning: true}}\n")
    code, _, err = await run_xmppd("-c", str(bad), cwd=tmp_path)
    assert code == 1
    assert err.splitlines() == [
        f'{bad}:2: limts: unknown key "limts" (did you mean "limits"?)',
        f'{bad}:4: modules.roster.versionning: unknown key "versionning"',
        "xmppd: the configuration has errors; not starting",
    ]
    assert not data.exists()  # no store opened, no certificate made


async def test_data_dir_and_stores_are_private_whatever_the_umask(tmp_path: Path) -> None:
    """The item store holds every account's SCRAM keys, blobs/ the offline messages."""
    before = os.umask(0o022)  # the distribution default; xmppd inherits it
    try:
        proc, _ = await start_xmppd(write_config(tmp_path))
    finally:
        os.umask(before)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 15) == 0
    data = tmp_path / "data"
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "blobs").stat().st_mode) == 0o700
    made = [p for p in data.rglob("*") if p.is_file()]
    assert any(p.name == "items.sqlite3" for p in made)
    assert [p for p in made if p.stat().st_mode & 0o007] == []


async def test_a_second_node_without_a_cluster_on_one_data_dir_is_refused(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path)  # every port 0: the second node could bind its own
    first, _ = await start_xmppd(config)
    try:
        code, _, err = await run_xmppd("-c", str(config), cwd=tmp_path)
        assert code == 1
        last = err.splitlines()[-1]
        assert last.startswith(
            f"xmppd: another node runs on data_dir {tmp_path / 'data'} (pid {first.pid}, "
            "admin API http://127.0.0.1:"
        )
        assert "Traceback" not in err
        assert first.returncode is None  # the first one serves on
    finally:
        first.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(first.wait(), 15) == 0


def _low_open_files() -> None:
    """In the child: the soft limit most systems start a process with, a low hard one."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 4096))


async def test_the_version_and_the_open_files_limit_raised_at_start(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "xmppd", "-c", str(write_config(tmp_path)),
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=_low_open_files,
    )
    lines: list[str] = []
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(30):
            while not lines or "xmppd ready" not in lines[-1]:
                line = (await proc.stderr.readline()).decode()
                assert line, "xmppd exited during startup:\n" + "".join(lines)
                lines.append(line)
        limits = await asyncio.to_thread(Path(f"/proc/{proc.pid}/limits").read_text)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 15)
    log = "".join(lines)
    assert f"xmppd {version('xmppd')} starting: config " in log
    assert "open files: raised from 1024 to 4096 (hard limit 4096): about 3996 client " in log
    assert re.search(r"WARNING .*open files: the hard limit 4096 allows about 3996 client", log)
    assert re.search(r"Max open files\s+4096\s+4096", limits)


def _mapped(pid: int, library: str) -> bool:
    """True if process `pid` has lib`library` mapped (its malloc, when preloaded)."""
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return any(f"/lib{library}." in line for line in maps)


async def test_jemalloc_when_installed_in_the_same_process_or_the_system_malloc(
    tmp_path: Path,
) -> None:
    assert ctypes.util.find_library("jemalloc"), "libjemalloc2 missing: .ci/services.sh installs it"
    for setting, expected in (("auto", True), ("system", False)):
        folder = tmp_path / setting
        folder.mkdir()
        # allow_unencrypted: loading the file logs a warning, which must come once:
        # the file is loaded only after the malloc is chosen (and the process started again).
        config = write_config(folder, allocator=setting, auth={"allow_unencrypted": True})
        proc, lines = await start_xmppd(config)
        try:
            # The pid the caller started (a service manager watches it) runs the server.
            assert _mapped(proc.pid, "jemalloc") is expected
            said = [line for line in lines if "memory allocator:" in line]
            assert len(said) == 1
            assert ("memory allocator: jemalloc" in said[0]) is expected
            assert len([line for line in lines if "clients may authenticate before" in line]) == 1
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 15) == 0


async def run_xmppd(*argv: str, cwd: Path, **env: str) -> tuple[int, str, str]:
    environ = {k: v for k, v in os.environ.items() if k != "XMPPD_CONFIG"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "xmppd", *argv, cwd=cwd, env={**environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:  # e.g. it started serving: never leave it running
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_version(tmp_path: Path) -> None:
    assert await run_xmppd("--version", cwd=tmp_path) == (0, f"xmppd {version('xmppd')}\n", "")


async def test_without_c_the_file_is_xmppd_config_or_a_clear_error(tmp_path: Path) -> None:
    if SYSTEM_CONFIG.exists():  # it would be found: a machine with xmppd installed
        unavailable(f"{SYSTEM_CONFIG} exists on this machine")
    code, out, err = await run_xmppd(cwd=tmp_path)
    assert (code, out) == (1, "")
    assert err == (
        f"xmppd: no configuration file: give -c FILE, set $XMPPD_CONFIG, or create "
        f"{SYSTEM_CONFIG}\n"
    )
    assert os.listdir(tmp_path) == []  # no data_dir made under the cwd
    bad = tmp_path / "bad.yml"
    bad.write_text("hostz: []\n")
    code, _, err = await run_xmppd(cwd=tmp_path, XMPPD_CONFIG=str(bad))
    assert code == 1
    assert err.startswith(f"xmppd: using the configuration {bad} (from $XMPPD_CONFIG)\n{bad}:1: ")


async def peer_certificate(port: int) -> bytes:
    """The certificate a new direct-TLS connection is shown (DER)."""
    _, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=insecure_context(), server_hostname="localhost"
    )
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return bytes(der)


async def log_line(proc: asyncio.subprocess.Process, text: str) -> str:
    """The next stderr line containing `text` (AssertionError if xmppd exits first)."""
    assert proc.stderr is not None
    async with asyncio.timeout(15):
        while line := (await proc.stderr.readline()).decode():
            if text in line:
                return line
    raise AssertionError(f"xmppd exited (code {await proc.wait()}) before logging {text!r}")


def der_of(pem_file: Path) -> bytes:
    return x509.load_pem_x509_certificate(pem_file.read_bytes()).public_bytes(Encoding.DER)


async def test_sighup_reloads_the_certificate_and_keeps_it_on_a_bad_one(tmp_path: Path) -> None:
    first = ensure_self_signed(tmp_path / "first", ["localhost"])
    second = ensure_self_signed(tmp_path / "second", ["localhost"])
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    shutil.copy(first[0], cert)
    shutil.copy(first[1], key)
    config = write_config(tmp_path, tls={"cert": str(cert), "key": str(key)})
    proc, lines = await start_xmppd(config)
    port = int(re.findall(r"listening: c2s direct TLS.* port (\d+)", "".join(lines))[0])
    assert await peer_certificate(port) == der_of(first[0])

    shutil.copy(second[0], cert)  # a renewed certificate
    shutil.copy(second[1], key)
    proc.send_signal(signal.SIGHUP)
    line = await log_line(proc, "reloaded: ")
    assert "INFO" in line and f"changed certificate {cert} (renewed)" in line
    assert await peer_certificate(port) == der_of(second[0])

    shutil.copy(second[1], cert)  # a broken renewal: the key where the certificate goes
    proc.send_signal(signal.SIGHUP)
    line = await log_line(proc, "reload refused, nothing changed: ")
    assert "ERROR" in line and f"tls.cert: certificate {cert}:" in line
    assert await peer_certificate(port) == der_of(second[0])

    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 15) == 0


async def test_bad_certificate_or_data_dir_at_startup_is_one_line(tmp_path: Path) -> None:
    cert, key = ensure_self_signed(tmp_path / "pair", ["localhost"])
    swapped = write_config(tmp_path, tls={"cert": str(key), "key": str(cert)})
    code, _, err = await run_xmppd("-c", str(swapped), cwd=tmp_path)
    assert code == 1
    assert err.splitlines()[-1] == (
        f"xmppd: certificate {key}: no PEM certificate in the file "
        "(are tls.cert and tls.key swapped?)"
    )
    assert "Traceback" not in err and "PEM lib" not in err

    read_only = unwritable_dir(tmp_path)
    tls = {"cert": str(cert), "key": str(key)}
    config = write_config(tmp_path, data_dir=str(read_only), tls=tls)
    code, _, err = await run_xmppd("-c", str(config), cwd=tmp_path)
    assert code == 1
    assert err.splitlines()[-1].startswith(f"xmppd: data_dir {read_only} is not writable: ")
    assert "Traceback" not in err
