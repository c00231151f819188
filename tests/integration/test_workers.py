"""`xmppd --workers N` as an operator runs it: real processes, real Redis, real clients.

The workers are real `xmppd` processes sharing one port with SO_REUSEPORT;
the kernel decides which worker takes each connection, so the tests connect
clients until both workers hold some (each connection lands on either with
even odds: 40 connections all on one worker would be 2 ** -39). xmppctl is
run as the operator runs it, as a process, against the running workers.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import pytest
import yaml
from redis.asyncio import Redis

from tests.integration.clients import Client, close, insecure_context
from xmppd.auth.accounts import Accounts
from xmppd.cluster import schema
from xmppd.cluster.schema import Entry
from xmppd.cluster.sync import read_table
from xmppd.config import load_config
from xmppd.storage import devservices
from xmppd.storage.devservices import LocalService, free_ports
from xmppd.storage.factory import open_storage

pytestmark = pytest.mark.timeout(90)

USERS = 40



def workers_config(tmp_path: Path, redis: LocalService | None, **extra: object) -> Path:
    port = free_ports(1)[0]
    config: dict[str, object] = {
        "hosts": ["localhost"],
        "data_dir": str(tmp_path / "data"),
        "listeners": [{"type": "starttls", "address": "127.0.0.1", "port": port}],
        "limits": {"max_connections_per_ip": 0},
        "admin": {"port": 0},
        **extra,
    }
    if redis is not None:
        config["cluster"] = {"redis_url": devservices.redis_url(redis), "node_name": "w"}
    path = tmp_path / "xmppd.yml"
    path.write_text(yaml.safe_dump(config))
    return path


async def register(path: Path, count: int) -> None:
    config = load_config(path)
    storage = await open_storage(config.storage, config.data_dir)
    try:
        accounts = Accounts.of(storage, "localhost", 4096)
        for i in range(count):
            await accounts.register(f"u{i}", f"p{i}")
    finally:
        await storage.close()


class Workers:
    """The `xmppd --workers` parent process and the log lines it (and its workers) wrote."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    async def line(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        """The first log line from now on matching `pattern`."""
        assert self.proc.stderr is not None
        async with asyncio.timeout(timeout):
            while True:
                line = (await self.proc.stderr.readline()).decode()
                assert line, "xmppd exited:\n" + "".join(self.lines[-30:])
                self.lines.append(line)
                found = re.search(pattern, line)
                if found:
                    return found

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        assert self.proc.stderr is not None
        _, rest = await asyncio.wait_for(self.proc.communicate(), 40)
        self.lines.extend(rest.decode().splitlines(keepends=True) if rest else [])
        return self.proc.returncode or 0


async def start_workers(path: Path, count: int = 2) -> Workers:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "xmppd", "-c", str(path), "--workers", str(count),
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    workers = Workers(proc)
    await workers.line(rf"workers: all {count} ready")
    return workers


async def xmppctl(path: Path, *argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "xmppd.cli.ctl", "-c", str(path), *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def login(port: int, user: str, password: str) -> Client:
    client = Client(f"{user}@localhost/r", password)
    client.ssl_context = insecure_context()
    client.enable_plaintext = False
    client.connect("127.0.0.1", port)
    await asyncio.wait_for(client.started.wait(), 15)
    client.send_presence()
    return client


async def table(redis_url: str) -> dict[str, Entry]:
    async with Redis.from_url(redis_url) as redis:
        return {e.jid: e for e in await read_table(redis)}


async def entry_of(redis_url: str, jid: str) -> Entry:
    async with asyncio.timeout(5):
        while True:
            entry = (await table(redis_url)).get(jid)
            if entry is not None:
                return entry
            await asyncio.sleep(0.02)


async def spread(path: Path, redis_url: str) -> dict[str, list[Client]]:
    """Clients logged in until both workers hold at least one: node -> its clients."""
    port = load_config(path).listeners[0].port
    by_node: dict[str, list[Client]] = {}
    for i in range(USERS):
        client = await login(port, f"u{i}", f"p{i}")
        entry = await entry_of(redis_url, f"u{i}@localhost/r")
        by_node.setdefault(entry.node, []).append(client)
        if len(by_node) == 2:
            break
    return by_node


async def test_two_workers_share_the_port_and_a_message_crosses_them(
    tmp_path: Path, redis_service: LocalService
) -> None:
    path = workers_config(tmp_path, redis_service)
    await register(path, USERS)
    workers = await start_workers(path)
    redis_url = devservices.redis_url(redis_service)
    clients: list[Client] = []
    try:
        nodes = await spread(path, redis_url)
        clients = [c for group in nodes.values() for c in group]
        assert sorted(nodes) == ["w-1", "w-2"]
        sender, recipient = nodes["w-1"][0], nodes["w-2"][0]
        sender.send_message(mto=recipient.boundjid.bare, mbody="across workers", mtype="chat")
        message = await asyncio.wait_for(recipient.messages.get(), 5)
        assert str(message["body"]) == "across workers"

        # xmppctl nodes: both workers, alive, with their session counts, from Redis
        code, out, err = await xmppctl(path, "nodes")
        assert code == 0, err
        rows = [line.split("\t") for line in out.splitlines()]
        assert rows == [
            ["w-1", str(len(nodes["w-1"])), "alive"],
            ["w-2", str(len(nodes["w-2"])), "alive"],
        ]
        # xmppctl sessions: every client, on the node Redis says, from 127.0.0.1
        code, out, err = await xmppctl(path, "sessions", "localhost")
        assert code == 0, err
        listed = {row[0]: row[1:] for row in (line.split("\t") for line in out.splitlines())}
        assert set(listed) == {c.boundjid.full for c in clients}
        for node, group in nodes.items():
            for client in group:
                where, since, address = listed[client.boundjid.full]
                assert (where, address) == (node, "127.0.0.1")
                assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", since)
        # xmppctl kick: the admin API of whichever worker it reaches ends the session on
        # the other worker too, with the reason
        for target in (nodes["w-1"][0], nodes["w-2"][0]):
            jid = target.boundjid.full
            code, out, err = await xmppctl(path, "kick", jid, "maintenance")
            assert code == 0, err
            assert out.strip() in (f"ended {jid} on w-1", f"ended {jid} on w-2")
            await asyncio.wait_for(target.ended.wait(), 5)
            assert target.stream_errors == ["policy-violation"]
        code, _, err = await xmppctl(path, "kick", nodes["w-1"][0].boundjid.full)
        assert code == 1 and "has no session" in err
    finally:
        for client in clients:
            await close(client)
        assert await workers.stop() == 0
    log = "".join(workers.lines)
    assert log.count("xmppd stopped") == 2 and "workers: all stopped" in log
    async with Redis.from_url(redis_url) as redis:  # both left the table cleanly
        assert await redis.smembers(schema.NODES) == set()


async def test_a_worker_that_dies_is_started_again(
    tmp_path: Path, redis_service: LocalService
) -> None:
    workers = await start_workers(workers_config(tmp_path, redis_service))
    try:
        pids = {w: int(p) for w, p in re.findall(r"worker (\d) \(w-\d\) ready, pid (\d+)",
                                                   "".join(workers.lines))}
        os.kill(pids["2"], signal.SIGKILL)
        await workers.line(r"worker 2 \(w-2, pid \d+\) exited \(killed by SIGKILL\)")
        found = await workers.line(r"worker 2 \(w-2\) ready, pid (\d+)")
        assert int(found[1]) != pids["2"]
    finally:
        # SIGINT (a Ctrl-C) to the supervisor alone: it stops both workers cleanly
        assert await workers.stop(signal.SIGINT) == 0
    log = "".join(workers.lines)
    assert log.count("xmppd stopped") == 2 and "workers: all stopped" in log
    assert "exited (exit status 0)" not in log


async def test_workers_need_a_cluster_and_fixed_ports(tmp_path: Path) -> None:
    path = workers_config(tmp_path, None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "xmppd", "-c", str(path), "--workers", "2",
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert re.search(rf"^{path}(:\d+)?: cluster: --workers 2 needs a cluster section", err.decode())
    # a listener on port 0 would give each worker a port of its own
    config = yaml.safe_load(path.read_text())
    config["listeners"][0]["port"] = 0
    config["cluster"] = {"redis_url": "redis://127.0.0.1:1/0"}
    path.write_text(yaml.safe_dump(config))
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1)
                if text.strip() == "port: 0" and i > 3)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "xmppd", "-c", str(path), "--workers", "2",
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert f"{path}:{line}: listeners[0].port: must be a fixed port" in err.decode()
