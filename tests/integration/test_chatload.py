"""bench/chatload.py's count is exact, and says so only when it is.

The bench's exact-count load generator runs against a real node, as its own
process (two workers, so that a message sent by one and received by the
other is reconciled too), at a low rate for a few seconds: every id it sent
must come back exactly once. Then the same run with one user's session
ended by the server midway: messages to that user do not reach it, and the
count must say so, so that the first check cannot pass on an empty or blind
account.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import StartServer, port_of
from xmppd.modules.stream_management import StreamManagement
from xmppd.server import Server
from xmppd.stream.errors import StreamError

CHATLOAD = Path(__file__).resolve().parents[2] / "bench" / "chatload.py"
USERS = {f"cl{n}": f"pw{n}" for n in range(1, 9)}
VICTIM = "cl3@localhost"


@pytest.fixture
def storage_section() -> None:
    """The embedded storage only: this checks the load tool's count, not a backend."""
    return None


async def chatload(server: Server, during: Any = None, *extra: str) -> dict[str, Any]:
    """Run chatload against `server` (with `extra` arguments); `during(server)` runs
    alongside it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(CHATLOAD), "--port", str(port_of(server, "starttls")),
        "--domain", "localhost", "--user-prefix", "cl", "--pass-prefix", "pw",
        "--users", str(len(USERS)), "--arrival-rate", "50", "--rate", "150",
        "--duration", "3", "--drain-timeout", "3", "--procs", "2", *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    side = asyncio.ensure_future(during(server)) if during else None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:  # timed out: its workers end when their stdin closes
            proc.kill()
            await proc.wait()
    if side is not None:
        await side
    assert out, err.decode()[-2000:]
    summary: dict[str, Any] = json.loads(out)
    assert proc.returncode == (0 if summary["exact"] else 1), err.decode()[-2000:]
    return summary


async def end_victim_midway(server: Server) -> None:
    """Once every user is online and sending has begun, the server ends one session."""
    for _ in range(400):
        if all(server.router.directory.available(f"{user}@localhost") for user in USERS):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)
    for session in server.router.directory.resources(VICTIM):
        session.terminate(StreamError("policy-violation", "ended by the test"))


@pytest.mark.timeout(60)
async def test_every_message_is_received_exactly_once(start_server: StartServer) -> None:
    server = await start_server(users=USERS)
    summary = await chatload(server)
    assert summary["users_online"] == len(USERS)
    assert summary["sent"] > 200
    assert summary["received_once"] == summary["sent"]
    assert summary["missing"] == summary["duplicates"] == summary["bounced"] == 0
    assert summary["unexpected"] == 0
    assert summary["exact"] is True
    assert summary["latency_ms"]["n"] == summary["sent"]
    assert summary["streams"]["closed_cleanly"] == len(USERS)
    assert server.router.ledger.snapshot()["received"] == summary["sent"]


@pytest.mark.timeout(60)
async def test_with_stream_management_every_request_is_answered(
    start_server: StartServer,
) -> None:
    """--sm: the users enable XEP-0198, answer the server's <r/> and acknowledge all
    before closing, so the server ends with nothing unacknowledged to route again."""
    server = await start_server(users=USERS)
    sm = server.modules.module(StreamManagement)
    summary = await chatload(server, None, "--sm")
    assert summary["exact"] is True
    assert summary["streams"]["closed_cleanly"] == len(USERS)
    assert sm.stats.enabled == len(USERS)
    assert summary["sm_acks"] > 0
    assert sm.stats.rerouted == 0  # every stanza delivered was acknowledged
    assert server.router.ledger.snapshot()["received"] == summary["sent"]


@pytest.mark.timeout(60)
async def test_messages_that_do_not_arrive_are_named(start_server: StartServer) -> None:
    server = await start_server(users=USERS)
    summary = await chatload(server, during=end_victim_midway)
    assert summary["exact"] is False
    assert summary["streams"]["lost_before_close"] == 1
    assert summary["streams"]["stream_errors"] == 1
    not_received = summary["sent"] - summary["received_once"]
    assert not_received == summary["missing"] + summary["bounced"] > 0
    assert summary["missing_first"], "the missing ids are listed"
