"""A real `xmppd` process for tests that signal it or read its log: its stderr is read
all along (a full pipe would stall the node), and tests wait for the lines they expect,
there or in the node's log file."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.integration.clients import Client, insecure_context
from xmppd.auth.accounts import Accounts
from xmppd.config import load_config
from xmppd.storage.factory import open_storage

FILE_POLL = 0.02
"""Seconds between looks at a log file for a line not there yet (a file has no event)."""

STOP_TIMEOUT = 15
"""Seconds a node gets to exit after SIGTERM, then to close its stderr; past that it is
killed: a teardown after a test timed out has no bound of its own (pytest-timeout)."""


class Node:
    """One running xmppd; `lines` is every stderr line so far. With `log_file`, `line`
    and `text` read that file instead (the node logs there)."""

    def __init__(self, proc: asyncio.subprocess.Process, log_file: Path | None) -> None:
        self.proc = proc
        self.log_file = log_file
        self.lines: list[str] = []
        self._new = asyncio.Condition()
        self._reader = asyncio.ensure_future(self._read())
        self.ports: dict[str, int] = {}

    @classmethod
    async def start(cls, config: Path, log_file: Path | None = None) -> Node:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "xmppd", "-c", str(config),
            stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        node = cls(proc, log_file)
        try:
            await node.line("xmppd ready", timeout=30)
        except BaseException:
            await node.kill()  # not left running (with its ports) after the test
            raise
        found = re.findall(r"listening: c2s (STARTTLS|direct TLS).* port (\d+)", node.text())
        node.ports = {kind: int(port) for kind, port in found}
        return node

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            async with self._new:
                self.lines.append(line.decode())
                self._new.notify_all()
        async with self._new:
            self._new.notify_all()

    def text(self) -> str:
        return "".join(self._log())

    def _log(self) -> list[str]:
        if self.log_file is None:
            return self.lines
        try:
            return self.log_file.read_text().splitlines(keepends=True)
        except FileNotFoundError:
            return []

    def mark(self) -> int:
        """The position from which `line` looks (the lines written from now on)."""
        return len(self._log())

    async def line(self, pattern: str, since: int = 0, timeout: float = 15) -> re.Match[str]:
        """The first line from `since` on matching `pattern` (a regex), waiting for it."""
        if self.log_file is not None:
            return await self._file_line(pattern, since, timeout)
        async with asyncio.timeout(timeout), self._new:
            seen = since
            while True:
                for line in self.lines[seen:]:
                    found = re.search(pattern, line)
                    if found is not None:
                        return found
                seen = len(self.lines)
                if self._reader.done():
                    raise AssertionError(
                        f"xmppd exited before logging {pattern!r}:\n{self.text()[-3000:]}"
                    )
                await self._new.wait()

    async def _file_line(self, pattern: str, since: int, timeout: float) -> re.Match[str]:
        async with asyncio.timeout(timeout):
            while True:
                for line in self._log()[since:]:
                    found = re.search(pattern, line)
                    if found is not None:
                        return found
                if self.proc.returncode is not None:
                    raise AssertionError(f"xmppd exited before logging {pattern!r}")
                await asyncio.sleep(FILE_POLL)

    def hangup(self) -> int:
        """Send SIGHUP; the position of the lines it causes."""
        mark = self.mark()
        self.proc.send_signal(signal.SIGHUP)
        return mark

    async def stop(self) -> None:
        """SIGTERM, then the node must exit with 0 within STOP_TIMEOUT; killed if not."""
        try:
            if self.proc.returncode is None:
                self.proc.send_signal(signal.SIGTERM)
                async with asyncio.timeout(STOP_TIMEOUT):
                    code = await self.proc.wait()
                assert code == 0, f"xmppd exited with {code}:\n{self.text()[-3000:]}"
            async with asyncio.timeout(STOP_TIMEOUT):
                await self._reader
        finally:
            await self.kill()

    async def kill(self) -> None:
        """SIGKILL unless it has exited, and stop reading its stderr."""
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self._reader.cancel()


def write_yaml(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


async def register(config: Path, host: str, users: dict[str, str]) -> None:
    """Create accounts in the configuration's stores (before the node starts)."""
    cfg = load_config(config)
    storage = await open_storage(cfg.storage, cfg.data_dir)
    try:
        accounts = Accounts.of(storage, host, cfg.auth.scram_iterations)
        for user, password in users.items():
            await accounts.register(user, password)
    finally:
        await storage.close()


async def login(
    port: int, jid: str, password: str, *, fail: bool = False, mechanism: str | None = None
) -> Client:
    """A slixmpp client logged in over STARTTLS (or, with `fail`, refused)."""
    client = Client(jid, password, sasl_mech=mechanism)
    client.ssl_context = insecure_context()
    client.enable_plaintext = False
    client.connect("127.0.0.1", port)
    await asyncio.wait_for((client.auth_failed if fail else client.started).wait(), 15)
    return client
