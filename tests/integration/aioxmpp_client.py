"""aioxmpp as a real client in the integration tests, run in its own virtualenv.

aioxmpp 0.13.3 needs lxml<5 and xmppd locks lxml 6, so aioxmpp cannot be imported
here: each client is a subprocess, tests/clients/aioxmpp_agent.py, run by the Python
of the aioxmpp virtualenv (`$XMPPD_AIOXMPP_PYTHON`, else .venv-aioxmpp/bin/python,
which tests/run.sh builds from requirements/aioxmpp.txt). Without it the tests skip
locally and fail in CI. This module speaks the agent's line protocol: `request`
sends an operation and waits for its answer, `expect` waits for a notification.
Every wait has a timeout; the agent's stderr is kept and shown when one fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import port_of
from tests.storage.services import unavailable
from xmppd.server import Server
from xmppd.tls import self_signed_paths

ROOT = Path(__file__).resolve().parents[2]
AGENT = ROOT / "tests" / "clients" / "aioxmpp_agent.py"
TIMEOUT = 15.0


class AgentError(Exception):
    """An operation the agent reported as failed (its exception's type and text)."""


def aioxmpp_python() -> Path:
    """The aioxmpp virtualenv's interpreter; skip (fail in CI) when it is missing."""
    configured = os.environ.get("XMPPD_AIOXMPP_PYTHON")
    python = Path(configured) if configured else ROOT / ".venv-aioxmpp" / "bin" / "python"
    if not python.exists():
        unavailable(f"no aioxmpp virtualenv at {python} (bash tests/run.sh builds it)")
    return python


def certificate_of(server: Server) -> Path:
    """The certificate the server presents, which the agent is told to trust."""
    tls = server.config.tls
    return tls.cert if tls.cert is not None else self_signed_paths(server.config.data_dir)[0]


class Aioxmpp:
    """One aioxmpp client in its subprocess."""

    def __init__(self, process: asyncio.subprocess.Process, name: str) -> None:
        self.process = process
        self.name = name
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.skipped: list[dict[str, Any]] = []  # events `expect` passed over
        # "online" or "failed" apart from the other events: what the server pushes
        # during the login (a PEP last item, say) may come before the agent says it
        # is online, and must stay queued for `expect`.
        self.started: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.stderr = bytearray()
        self._answers: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._numbers = itertools.count(1)
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._drain())]

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            message = json.loads(line)
            if message.get("event") in ("online", "failed") and not self.started.done():
                self.started.set_result(message)
            elif "event" in message:
                self.events.put_nowait(message)
            else:
                future = self._answers.pop(message["id"])
                if not future.done():
                    future.set_result(message)
        for future in [self.started, *self._answers.values()]:
            if not future.done():
                future.set_exception(EOFError(f"{self.name}: the agent exited\n{self.log()}"))

    async def _drain(self) -> None:
        assert self.process.stderr is not None
        while chunk := await self.process.stderr.read(65536):
            self.stderr += chunk

    def log(self) -> str:
        return self.stderr.decode(errors="replace")[-4000:]

    async def request(self, op: str, timeout: float = TIMEOUT, **arguments: Any) -> Any:
        """Run one operation in the client; its result, or AgentError."""
        assert self.process.stdin is not None
        number = next(self._numbers)
        answer = self._answers[number] = asyncio.get_running_loop().create_future()
        line = json.dumps({"id": number, "op": op, **arguments}) + "\n"
        self.process.stdin.write(line.encode())
        await self.process.stdin.drain()
        try:
            reply = await asyncio.wait_for(answer, timeout)
        except TimeoutError:
            raise TimeoutError(f"{self.name}: no answer to {op}\n{self.log()}") from None
        if "error" in reply:
            raise AgentError(reply["error"])
        return reply["ok"]

    async def expect(self, kind: str, **fields: Any) -> dict[str, Any]:
        """The next event of `kind` whose fields include `fields`; others are kept
        in `skipped`."""
        while True:
            try:
                event = await asyncio.wait_for(self.events.get(), TIMEOUT)
            except TimeoutError:
                raise TimeoutError(
                    f"{self.name}: no {kind} event with {fields}; skipped: {self.skipped}"
                ) from None
            if event["event"] == kind and all(event.get(k) == v for k, v in fields.items()):
                return event
            self.skipped.append(event)

    async def close(self) -> None:
        """Ask the agent to quit (it leaves and closes the stream); kill it if it hangs."""
        if self.process.returncode is None:
            assert self.process.stdin is not None
            with contextlib.suppress(ConnectionError):
                self.process.stdin.write(b'{"op": "quit"}\n')
                await self.process.stdin.drain()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        await asyncio.gather(*self._tasks)


Connect = Callable[..., Awaitable[Aioxmpp]]


async def start_agent(
    server: Server,
    jid: str,
    password: str,
    *,
    direct_tls: bool = False,
    notify: tuple[str, ...] = (),
    avatars: bool = False,
    cafile: Path | None = None,
) -> Aioxmpp:
    """Log `jid` in with aioxmpp; return once its stream is up (AgentError if it fails)."""
    listener = "direct_tls" if direct_tls else "starttls"
    arguments = [
        str(AGENT),
        "--jid",
        jid,
        "--password",
        password,
        "--port",
        str(port_of(server, listener)),
        "--cafile",
        str(cafile or certificate_of(server)),
    ]
    arguments += ["--direct-tls"] if direct_tls else []
    arguments += ["--avatars"] if avatars else []
    for node in notify:
        arguments += ["--notify", node]
    process = await asyncio.create_subprocess_exec(
        str(aioxmpp_python()),
        *arguments,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    client = Aioxmpp(process, jid)
    try:
        first = await asyncio.wait_for(asyncio.shield(client.started), TIMEOUT)
    except TimeoutError:
        client.started.cancel()
        await client.close()
        raise TimeoutError(f"{jid}: aioxmpp did not come online\n{client.log()}") from None
    if first["event"] != "online":
        await client.close()
        raise AgentError(first.get("error", first))
    return client


@pytest.fixture
async def aioxmpp() -> AsyncIterator[Connect]:
    """`await aioxmpp(server, jid, password, ...)`: a logged-in aioxmpp client, closed
    at teardown."""
    clients: list[Aioxmpp] = []

    async def connect(server: Server, jid: str, password: str, **options: Any) -> Aioxmpp:
        client = await start_agent(server, jid, password, **options)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        await client.close()
        if client.process.returncode not in (0, None):
            print(
                f"{client.name} exited {client.process.returncode}:\n{client.log()}",
                file=sys.stderr,
            )
