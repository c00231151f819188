"""A cluster failing as it does in production: nodes as real processes, a real redis-server.

Each node is `python -m xmppd -c FILE` (as an operator runs it) on one
shared embedded storage; clients are the load generator's raw TLS
connections (tests/integration/loadgen.py), which account for every
numbered message: received live, from offline storage (a <delay/>), or as
an error. A node is killed with SIGKILL under load; Redis is stopped and
started again (empty) mid-test. Nothing may be lost; duplicates are allowed
(at least once) and reported.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import write_config
from tests.integration.loadgen import Account, Connection, Plan, settled
from xmppd.auth.accounts import Accounts
from xmppd.config import load_config
from xmppd.storage import devservices
from xmppd.storage.devservices import LocalService
from xmppd.storage.factory import open_storage

pytestmark = pytest.mark.timeout(120)

HOST = "localhost"



class Node:
    """One xmppd process; its log (stderr) is read all along, so it never blocks."""

    def __init__(self, name: str, config: Path) -> None:
        self.name = name
        self.config = config
        self.lines: list[str] = []
        self.port = 0
        self._more = asyncio.Event()
        self.proc: asyncio.subprocess.Process | None = None
        self._reading: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "xmppd", "-c", str(self.config),
            stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._reading = asyncio.create_task(self._read())
        await self.logged("xmppd ready", timeout=30)
        found = re.search(r"listening: c2s direct TLS.* port (\d+)", "".join(self.lines))
        assert found is not None
        self.port = int(found.group(1))

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.lines.append(line.decode())
            self._more.set()
        self._more.set()

    async def logged(self, text: str, timeout: float) -> str:
        """The first log line containing `text`, once it is written."""
        async with asyncio.timeout(timeout):
            while True:
                for line in self.lines:
                    if text in line:
                        return line
                assert self.proc is not None
                if self.proc.returncode is not None:
                    raise AssertionError(f"{self.name} exited:\n" + "".join(self.lines[-30:]))
                self._more.clear()
                await self._more.wait()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._reading is not None:
            await self._reading


@pytest.fixture
async def cluster(
    tmp_path: Path, redis_service: LocalService
) -> AsyncIterator[Callable[..., Any]]:
    """Start nodes (names given) on one storage and one Redis, with `users` registered."""
    nodes: list[Node] = []

    async def start(names: list[str], users: dict[str, str], **options: Any) -> list[Node]:
        started = []
        for name in names:
            folder = tmp_path / name
            folder.mkdir()
            config = write_config(
                folder,
                data_dir=str(tmp_path / "data"),
                log_level="info",
                storage={"cache": {"backend": "none"}},
                # Room for every message the test sends: a full queue would bounce them.
                modules={"offline": {"max_messages": 10_000, "max_bytes": 1 << 24}},
                cluster={
                    "redis_url": devservices.redis_url(redis_service),
                    "node_name": name,
                    **options,
                },
            )
            node = Node(name, config)
            nodes.append(node)
            started.append(node)
        await register(load_config(started[0].config), users)
        for node in started:
            await node.start()
        return started

    yield start
    for node in nodes:
        await node.close()
        (tmp_path / f"{node.name}.log").write_text("".join(node.lines))


async def register(config: Any, users: dict[str, str]) -> None:
    storage = await open_storage(config.storage, config.data_dir)
    try:
        accounts = Accounts.of(storage, HOST, config.auth.scram_iterations)
        for name, password in users.items():
            await accounts.register(name, password)
    finally:
        await storage.close()


def plan(node: Node, users: dict[str, str]) -> Plan:
    return Plan(
        port=node.port, host=HOST, users=users, messages_per_user=0, leavers=[],
        ghost="nobody", ghost_every=0,
    )


async def online(node: Node, users: dict[str, str], name: str, account: Account) -> Connection:
    connection = Connection(plan(node, users), name, account)
    await connection.open()
    return connection


async def reaches(sender: Connection, to: str, account: Account, tag: str) -> None:
    """Until a message from `sender` to `to` arrives live (its node knows where `to`
    is): one probe every half second; probes that go offline are not counted."""
    async with asyncio.timeout(20):
        for n in range(1000):
            id_ = f"{tag}-{n}"
            await sender.send_messages([(id_, to)])
            sender.account.sent.pop(id_)
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline:
                if id_ in account.live:
                    return
                await asyncio.sleep(0.02)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll what the clients saw (their reader tasks append to lists; no event)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def tally(
    accounts: dict[str, Account], prefix: str = ""
) -> tuple[dict[str, str], list[str], int, Counter[str]]:
    """(what was sent: id -> recipient, the ids lost, duplicates, how each id arrived)."""
    sent = {
        id_: to
        for account in accounts.values()
        for id_, to in account.sent.items()
        if id_.startswith(prefix)
    }
    seen: Counter[str] = Counter()
    how: Counter[str] = Counter()
    for name, account in accounts.items():
        for kind, ids in (("live", account.live), ("offline", account.delayed)):
            for id_ in ids:
                if sent.get(id_) == name:
                    seen[id_] += 1
                    how[kind] += 1
        for id_ in account.errors:
            if id_ in sent:
                seen[id_] += 1
                how["error"] += 1
    lost = sorted(id_ for id_ in sent if not seen[id_])
    duplicates = sum(count - 1 for count in seen.values())
    return sent, lost, duplicates, how


async def test_a_node_killed_under_load_loses_no_message(
    cluster: Callable[..., Any],
) -> None:
    """Senders on node A send numbered messages to recipients on node B; B is killed
    with SIGKILL mid-stream and A goes on sending through the reap and after. Every
    message is then live at its recipient, or in offline storage (collected when the
    recipients log in again on A); what B's inbox held unhandled is routed again by
    A when it reaps B, and what A forwards after that is refused and stored."""
    senders = [f"s{n}" for n in range(4)]
    recipients = [f"r{n}" for n in range(4)]
    users = {name: f"{name}-secret" for name in senders + recipients}
    a, b = await cluster(["node-a", "node-b"], users)
    accounts = {name: Account() for name in users}
    on_b = [await online(b, users, name, accounts[name]) for name in recipients]
    on_a = [await online(a, users, name, accounts[name]) for name in senders]
    for name in recipients:
        await reaches(on_a[0], name, accounts[name], f"probe-{name}")
    # The load goes over the direct link (xmppd.cluster.link), as it does by default.
    await a.logged("linked to node node-b", timeout=10)

    sending = True

    async def send(connection: Connection) -> None:
        n = 0
        while sending:
            batch = [(f"{connection.name}-{n + k}", recipients[(n + k) % 4]) for k in range(5)]
            n += 5
            await connection.send_messages(batch)
            await asyncio.sleep(0.05)  # a steady load (~400 messages/s), not a flood

    load = [asyncio.create_task(send(c)) for c in on_a]
    await asyncio.sleep(1.0)
    killed = time.monotonic()
    b.kill()
    await a.logged("node node-b missed its heartbeats", timeout=20)
    reaped = time.monotonic()
    await asyncio.sleep(1.0)  # and on after the reap: refused, or routed to storage
    sending = False
    await asyncio.gather(*load)

    back = [await online(a, users, name, accounts[name]) for name in recipients]
    await settled(accounts, "nobody", timeout=20)
    for connection in on_a + back:
        await connection.close()
    for connection in on_b:
        connection.writer.close()

    took_over = [line for line in a.lines if "stanzas node node-b had not handled" in line]
    sent, lost, duplicates, how = tally(accounts, prefix="s")
    print(
        f"\nSIGKILL under load: {len(sent)} messages sent, {how['live']} live, "
        f"{how['offline']} from offline storage, {how['error']} errors, {len(lost)} lost, "
        f"{duplicates} duplicates; reaped {reaped - killed:.1f} s after the kill; "
        f"{took_over[0].strip() if took_over else 'nothing taken over'}"
    )
    assert how["offline"] > 0  # the kill really cut messages off from their sessions
    assert how["error"] == 0  # every recipient exists and has room offline
    assert lost == [], f"{len(lost)} of {len(sent)} messages lost, e.g. {lost[:5]}"


async def test_redis_stopped_and_started_again_loses_no_message(
    cluster: Callable[..., Any], redis_service: LocalService
) -> None:
    """While Redis is down, delivery on one node goes on; a message for a session on
    the other node waits cluster.forward_wait seconds, then goes to offline storage
    (not into a queue for ever). When Redis is back (empty), the nodes find each
    other again without a restart and cross-node delivery is live again."""
    users = {name: f"{name}-secret" for name in ("sender", "local", "far")}
    a, b = await cluster(["node-a", "node-b"], users, forward_wait=2.0)
    accounts = {name: Account() for name in users}
    sender = await online(a, users, "sender", accounts["sender"])
    local = await online(a, users, "local", accounts["local"])
    far = await online(b, users, "far", accounts["far"])
    await reaches(sender, "far", accounts["far"], "probe")

    redis_service.stop()
    outage = time.monotonic()
    await sender.send_messages([(f"cross-{n}", "far") for n in range(5)])
    for n in range(5):
        await sender.send_messages([(f"local-{n}", "local")])
    await until(lambda: len(accounts["local"].live) == 5)
    line = await a.logged("Redis unreachable: 5 stanzas for other nodes waited", timeout=10)
    # From now on, until Redis answers, cross-node stanzas go offline at once.
    await sender.send_messages([("cut-0", "far")])
    waited = time.monotonic() - outage
    assert not any(id_.startswith("cross") for id_ in accounts["far"].live)

    redis_service.start()  # empty: nothing was saved
    back = time.monotonic()
    await reaches(sender, "far", accounts["far"], "again")
    recovered = time.monotonic() - back
    await sender.send_messages([(f"after-{n}", "far") for n in range(20)])
    await until(lambda: sum(id_.startswith("after") for id_ in accounts["far"].live) == 20)

    # The messages routed to offline storage during the outage are there.
    await far.close()
    far = await online(b, users, "far", accounts["far"])
    await settled(accounts, "nobody", timeout=10)
    for connection in (sender, local, far):
        await connection.close()
    sent, lost, duplicates, how = tally(accounts)
    print(
        f"\nRedis outage: cross-node messages routed again after {waited:.1f} s "
        f"({line.strip()}); live cross-node delivery {recovered:.1f} s after Redis was "
        f"back; {len(sent)} sent, {how['live']} live, {how['offline']} offline, "
        f"{len(lost)} lost, {duplicates} duplicates"
    )
    assert {*(f"cross-{n}" for n in range(5)), "cut-0"} <= set(accounts["far"].delayed)
    assert lost == []
    assert duplicates == 0
