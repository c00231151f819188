"""Stream management across nodes: a session resumed on another node, with a real Redis.

Node B runs in this process; node A either too (resume while A lives, drain)
or as a real `python -m xmppd` process, killed with SIGKILL. Clients speak
the raw protocol over TLS (tests/integration/test_stream_management.py).
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from lxml import etree
from redis.asyncio import Redis

from tests.integration.clients import HEADER, RawClient, insecure_context
from tests.integration.conftest import USERS, StartServer
from tests.integration.test_account_changes import xmppctl
from tests.integration.test_cluster import until
from tests.integration.test_stream_management import (
    SASL,
    SM,
    C,
    Stream,
    detached,
    message,
    messages,
    modules,
    roundtrip,
    session_closed,
    sm_module,
)
from tests.storage.services import service_factory  # noqa: F401  (fixture)
from xmppd.cluster import smstore
from xmppd.cluster.smstore import PREFIX, QUEUE_PREFIX
from xmppd.server import Server
from xmppd.storage import devservices
from xmppd.storage.devservices import LocalService

pytestmark = pytest.mark.timeout(60)

RESUME_WITHIN = 5.0
"""Seconds from a node's death to its client resumed on another (issue 14)."""


def cluster(redis: LocalService, node: str) -> dict[str, Any]:
    return {"redis_url": devservices.redis_url(redis), "node_name": node}


async def resume_at(server: Server, user: str, previd: str, h: int) -> Stream:
    stream = await Stream.auth(server, user)
    await stream.send(f"<resume xmlns='{SM}' previd='{previd}' h='{h}'/>")
    return stream


async def flushed_then_refused(a: Server, b: Server, user: str, previd: str) -> etree._Element:
    """Once node `a` wrote what it has to Redis, `user`'s <resume/> of `previd` at node
    `b`: its <failed/>."""
    store = sm_module(a).store
    assert store is not None
    await store.flush()
    again = await resume_at(b, user, previd, 0)
    answer = await again.next(SM)
    assert etree.QName(answer).localname == "failed", etree.tostring(answer)
    await again.close()
    return answer


async def resume_cut_before_the_bind(
    b: Server, redis_service: LocalService, previd: str
) -> None:
    """alice's <resume/> of `previd` at node `b`, whose stream ends while the claim waits
    for Redis (paused meanwhile): `b` claims the session and finds no stream to bind."""
    again = await Stream.auth(b, "alice")
    redis_service.pause()
    try:
        await again.send(f"<resume xmlns='{SM}' previd='{previd}' h='0'/>")
        again.drop()
        await until(lambda: not b.connections)
    finally:
        redis_service.resume()


async def drop_and_wait(server: Server, stream: Stream) -> None:
    """Lose `stream`'s connection; back once `server` keeps its session for resumption."""
    waiting = detached(server)
    stream.drop()
    await asyncio.wait_for(waiting.get(), 10)


async def drop_and_store(server: Server, stream: Stream) -> None:
    """As `drop_and_wait`, and back once Redis has the session's state."""
    await drop_and_wait(server, stream)
    store = sm_module(server).store
    assert store is not None
    await store.flush()


async def available_with_directed_presence(alice: Stream, bob: Stream) -> None:
    """alice available, and a directed presence from her to bob (not her contact)."""
    await alice.send("<presence/>")
    await alice.send("<presence to='bob@localhost/phone'/>")
    assert (await bob.next("alice@localhost/phone")).get("type") is None


async def test_resume_on_another_node_while_the_first_lives(
    redis_service: LocalService, start_server: StartServer  # noqa: F811
) -> None:
    a = await start_server(cluster=cluster(redis_service, "node-a"))
    b = await start_server(users={}, cluster=cluster(redis_service, "node-b"))
    alice = await Stream.login(a, "alice")
    bob = await Stream.login(b, "bob")
    previd = (await alice.enable()).get("id", "")
    await alice.send("<presence/>")
    await alice.next("<presence")
    await until(lambda: b.router.directory.get("alice@localhost", "phone") is not None)
    for n in range(3):
        await bob.send(message("alice@localhost/phone", f"before {n}"))
    assert await messages(alice, 3) == ["before 0", "before 1", "before 2"]
    await alice.send(f"<a xmlns='{SM}' h='2'/>")  # the presence echo and the first
    await alice.ack_count()
    await drop_and_wait(a, alice)
    await bob.send(message("alice@localhost/phone", "while away"))
    store = sm_module(a).store
    assert store is not None
    await until(lambda: len(sm_module(a).resumable[previd].queue) == 3)
    await store.flush()
    again = await resume_at(b, "alice", previd, 2)
    resumed = await again.next("resumed")
    assert resumed.get("h") == "1"  # alice's presence
    assert await messages(again, 3) == ["before 1", "before 2", "while away"]
    # B has the session now; A ended its own without storing the queue offline.
    await until(lambda: a.router.directory.count() == 0)
    assert a.router.ledger.offline == 0 and b.router.ledger.offline == 0
    session = b.router.directory.get("alice@localhost", "phone")
    assert session is not None
    await until(lambda: session.available)  # its presence came along (after its filters)
    await bob.send(message("alice@localhost", "to the bare JID, on B now"))
    assert await messages(again, 1) == ["to the bare JID, on B now"]
    await again.send(message("bob@localhost/phone", "from B"))
    await bob.next("from B")
    assert await again.ack_count() == 2
    assert sm_module(b).stats.resumed_elsewhere == 1
    await again.close()
    await bob.close()


async def test_a_session_resumed_elsewhere_keeps_what_its_client_set_up(
    redis_service: LocalService, start_server: StartServer  # noqa: F811
) -> None:
    """Carbons on and roster pushes asked for go with the session to the node that resumes
    it: a client sets them up once per session, not again after <resumed/>."""
    a = await start_server(cluster=cluster(redis_service, "node-a"))
    b = await start_server(users={}, cluster=cluster(redis_service, "node-b"))
    alice = await Stream.login(a, "alice")
    previd = (await alice.enable()).get("id", "")
    await alice.send("<iq type='set' id='carbons'><enable xmlns='urn:xmpp:carbons:2'/></iq>")
    await alice.next('id="carbons"')
    await roundtrip(alice)  # a roster get: roster pushes wanted
    await alice.send("<presence/>")
    await alice.next("<presence")
    on_a = a.router.directory.get("alice@localhost", "phone")
    assert on_a is not None
    set_up = a.modules.shared_state(on_a)
    assert set_up.get("carbons") is True and "roster/interested" in set_up
    await drop_and_store(a, alice)
    again = await resume_at(b, "alice", previd, 0)
    await again.next("resumed")
    on_b = b.router.directory.get("alice@localhost", "phone")
    assert on_b is not None
    assert b.modules.shared_state(on_b) == set_up
    # What it is for: a message alice sends from another resource reaches the resumed
    # one as a carbon, though that client never enabled carbons on node B.
    bob = await Stream.login(b, "bob")
    desktop = await Stream.login(b, "alice", "desktop")
    await desktop.send(message("bob@localhost/phone", "from the desktop"))
    await bob.next("from the desktop")
    carbon = await again.next("urn:xmpp:carbons:2")
    assert carbon.find("{urn:xmpp:carbons:2}sent") is not None
    for stream in (again, bob, desktop):
        await stream.close()


async def test_who_got_directed_presence_hears_a_session_resumed_elsewhere_leave(
    redis_service: LocalService, start_server: StartServer  # noqa: F811
) -> None:
    """Alice sends bob (not her contact) a directed presence from node A, and resumes her
    session on node B: when she goes offline there, bob gets her unavailable (RFC 6121
    4.6.3), as he would have from A."""
    a = await start_server(cluster=cluster(redis_service, "node-a"))
    b = await start_server(users={}, cluster=cluster(redis_service, "node-b"))
    bob = await Stream.login(b, "bob")
    alice = await Stream.login(a, "alice")
    previd = (await alice.enable()).get("id", "")
    await available_with_directed_presence(alice, bob)
    await drop_and_store(a, alice)
    again = await resume_at(b, "alice", previd, 0)
    await again.next("resumed")
    on_b = b.router.directory.get("alice@localhost", "phone")
    assert on_b is not None
    await until(lambda: "bob@localhost/phone" in on_b.state.get("presence/directed", ()))
    await again.send("<presence type='unavailable'/>")
    gone = await bob.next("alice@localhost/phone")
    assert gone.get("type") == "unavailable"
    await again.close()
    await bob.close()


async def test_drain_hands_sessions_over(
    redis_service: LocalService, start_server: StartServer  # noqa: F811
) -> None:
    """`xmppctl drain node-a`: the node stops as on SIGTERM, writes its SM sessions to
    Redis and cuts their connections; the clients resume on another node, nothing lost."""
    a = await start_server(cluster=cluster(redis_service, "node-a"))
    b = await start_server(users={}, cluster=cluster(redis_service, "node-b"))
    alice = await Stream.login(a, "alice")
    bob = await Stream.login(b, "bob")
    previd = (await alice.enable()).get("id", "")
    await alice.send("<presence/>")
    await alice.next("<presence")
    await until(lambda: b.router.directory.get("alice@localhost", "phone") is not None)
    for n in range(2):
        await bob.send(message("alice@localhost/phone", f"unacked {n}"))
    assert await messages(alice, 2) == ["unacked 0", "unacked 1"]
    code, out, err = await xmppctl(a, "drain", "node-a")
    assert code == 0, err
    assert "draining node node-a" in out
    await asyncio.wait_for(a.stop_requested.wait(), 10)
    assert not b.stop_requested.is_set()
    await a.stop()  # what xmppd.server.serve does once stop_requested is set
    with pytest.raises(EOFError):
        await alice.next("stream:error")  # cut, no <system-shutdown/>: resume elsewhere
    again = await resume_at(b, "alice", previd, 1)
    await again.next("resumed")
    assert await messages(again, 2) == ["unacked 0", "unacked 1"]
    assert a.router.ledger.offline == 0 and b.router.ledger.offline == 0
    assert sm_module(a).stats.handed_over == 1
    await bob.send(message("alice@localhost", "after the drain"))
    assert await messages(again, 1) == ["after the drain"]
    await again.close()
    await bob.close()


async def test_what_a_client_sends_while_its_session_is_handed_over_is_sent_once(
    redis_service: LocalService, start_server: StartServer  # noqa: F811
) -> None:
    """alice sends a message while her node drains and its state is on its way to
    Redis: it must be either in the `h` the next node answers or not handled at all,
    never handled but left out of that count (her client would send it again, and bob
    would get it twice). The node stops reading her before it takes her state."""
    a = await start_server(cluster=cluster(redis_service, "node-a"))
    b = await start_server(users={}, cluster=cluster(redis_service, "node-b"))
    alice = await Stream.login(a, "alice")
    bob = await Stream.login(b, "bob")
    previd = (await alice.enable()).get("id", "")
    await until(lambda: a.router.directory.get("bob@localhost", "phone") is not None)
    store = sm_module(a).store
    assert store is not None
    real_flush = store.flush
    said = message("bob@localhost/phone", "during the hand-over")

    async def flush_while_alice_speaks() -> None:
        await alice.send(said)
        await asyncio.sleep(0.5)  # time for node A to read and route it, if it still reads
        await real_flush()

    store.flush = flush_while_alice_speaks  # type: ignore[method-assign]
    await asyncio.wait_for(a.stop(), 20)
    again = await resume_at(b, "alice", previd, 0)
    h = int((await again.next("resumed")).get("h", "-1"))
    if h == 0:
        await again.send(said)  # not handled: her client sends it again, as XEP-0198 says
    await bob.next("during the hand-over")
    await roundtrip(bob)
    assert not [el for el in bob.pending if b"during the hand-over" in etree.tostring(el)]
    await again.close()
    await bob.close()


async def test_a_resume_that_a_drain_overtakes_is_handed_over_too(
    redis_service: LocalService, start_server: StartServer  # noqa: F811
) -> None:
    """alice resumes on node B just as B begins to drain (after B handed its sessions
    over): her resumed session is handed over as well, not ended with the node, so she
    resumes again on A. (Seen behind HAProxy under load: <failed/> after a scale-down.)"""
    a = await start_server(cluster=cluster(redis_service, "node-a"))
    b = await start_server(users={}, cluster=cluster(redis_service, "node-b"))
    alice = await Stream.login(a, "alice")
    previd = (await alice.enable()).get("id", "")
    await drop_and_wait(a, alice)
    bob = await Stream.login(b, "bob")
    await bob.enable()  # B has a session of its own to hand over when it drains
    await until(lambda: a.router.directory.get("bob@localhost", "phone") is not None)
    await bob.send(message("alice@localhost/phone", "while away"))
    await until(lambda: len(sm_module(a).resumable[previd].queue) == 1)
    store_a, sm_b = sm_module(a).store, sm_module(b)
    assert store_a is not None and sm_b.store is not None
    await store_a.flush()
    # B's claim completes and waits until B's drain is handing its sessions over (bob's);
    # that hand-over's write to Redis waits until alice's resume is through: the order
    # a busy machine produced by chance, made certain here.
    real_claim, real_flush = sm_b.store.claim, sm_b.store.flush
    claimed, draining = asyncio.Event(), asyncio.Event()

    async def claim_then_wait(sm_id: str, bare: str) -> Any:
        result = await real_claim(sm_id, bare)
        claimed.set()
        await draining.wait()
        return result

    async def flush_after_the_resume() -> None:
        draining.set()
        await until(lambda: b.router.directory.get("alice@localhost", "phone") is not None)
        await real_flush()

    sm_b.store.claim = claim_then_wait  # type: ignore[method-assign]
    sm_b.store.flush = flush_after_the_resume  # type: ignore[method-assign]
    on_b = await resume_at(b, "alice", previd, 0)
    await asyncio.wait_for(claimed.wait(), 10)
    await asyncio.wait_for(b.stop(), 20)
    await on_b.next("resumed")
    with pytest.raises(EOFError):
        await on_b.next("stream:error")  # cut, no <system-shutdown/>: resume elsewhere
    again = await resume_at(a, "alice", previd, 0)
    await again.next("resumed")
    assert "while away" in await messages(again, 1)
    assert a.router.ledger.offline == 0
    await again.close()


# --- a node killed with SIGKILL: a real process -------------------------------------------


class NodeProcess:
    """`python -m xmppd` on a config file; its direct TLS port read from its log."""

    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.port = port

    @classmethod
    async def start(cls, tmp_path: Path, **sections: Any) -> NodeProcess:
        config: dict[str, Any] = {
            "hosts": ["localhost"],
            "data_dir": str(tmp_path / "data"),
            "log_level": "info",
            "listeners": [{"type": "direct_tls", "address": "127.0.0.1", "port": 0}],
            "admin": {"port": 0},
            **sections,
        }
        path = tmp_path / "node-a.yml"
        path.write_text(yaml.safe_dump(config))
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "xmppd", "-c", str(path),
            stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert process.stderr is not None
        port = 0
        async with asyncio.timeout(30):
            while True:
                line = (await process.stderr.readline()).decode()
                if not line:
                    raise RuntimeError("node-a exited before it was ready")
                if found := re.search(r"direct TLS \(XEP-0368\) on \S+ port (\d+)", line):
                    port = int(found.group(1))
                if "xmppd ready" in line:
                    break
        return cls(process, port)

    async def raw(self) -> RawClient:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", self.port, ssl=insecure_context(), server_hostname="localhost"
        )
        return RawClient(reader, writer)

    async def login(self, user: str) -> Stream:
        """A raw stream logged in as `user` on resource "phone"."""
        stream = Stream(await self.raw(), b"")
        await stream.raw.send(HEADER)
        await stream.raw.read_until(b"</stream:features>")
        token = base64.b64encode(f"\0{user}\0{USERS[user]}".encode()).decode()
        await stream.raw.send(f"<auth xmlns='{SASL}' mechanism='PLAIN'>{token}</auth>")
        await stream.raw.read_until(b"<success")
        await stream.raw.send(HEADER)
        await stream.raw.read_until(b"</stream:features>")
        await stream.send(
            "<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
            "<resource>phone</resource></bind></iq>"
        )
        await stream.next("bind")
        return stream

    async def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()


@pytest.fixture
async def node_process() -> AsyncIterator[Callable[..., Any]]:
    started: list[NodeProcess] = []

    async def start(tmp_path: Path, **sections: Any) -> NodeProcess:
        node = await NodeProcess.start(tmp_path, **sections)
        started.append(node)
        return node

    yield start
    for node in started:
        if node.process.returncode is None:
            await node.kill()


async def test_resume_on_another_node_after_sigkill(
    redis_service: LocalService,
    start_server: StartServer,
    node_process: Callable[..., Any],
    tmp_path: Path,
    storage_section: dict[str, Any] | None,
) -> None:
    b = await start_server(cluster=cluster(redis_service, "node-b"))
    sections: dict[str, Any] = {"cluster": cluster(redis_service, "node-a")}
    if storage_section is not None:
        sections["storage"] = storage_section
    a: NodeProcess = await node_process(tmp_path, **sections)
    alice = await a.login("alice")
    previd = (await alice.enable()).get("id", "")
    bob = await Stream.login(b, "bob")
    await until(lambda: b.router.directory.get("alice@localhost", "phone") is not None)
    for n in range(3):
        await bob.send(message("alice@localhost/phone", f"m{n}"))
    assert await messages(alice, 3) == ["m0", "m1", "m2"]
    await alice.send(f"<a xmlns='{SM}' h='1'/>")
    await alice.ack_count()
    redis = Redis.from_url(devservices.redis_url(redis_service))
    # What node A wrote in its last batch before it dies: 3 sent, 1 acked.
    record = PREFIX + previd

    async def stored() -> list[Any]:
        return list(await redis.hmget(record, ["sent"])) + [
            await redis.llen(record.replace("sm:", "smq:"))
        ]

    deadline = time.monotonic() + 5
    while await stored() != [b"3", 2]:
        assert time.monotonic() < deadline, await stored()
        await asyncio.sleep(0.01)
    await a.kill()
    killed = time.monotonic()
    with pytest.raises(EOFError):
        await alice.next("never")
    again = await resume_at(b, "alice", previd, 1)
    await again.next("resumed")
    assert time.monotonic() - killed < RESUME_WITHIN
    assert await messages(again, 2) == ["m1", "m2"]
    await bob.send(message("alice@localhost/phone", "on B"))
    assert await messages(again, 1) == ["on B"]
    await roundtrip(again)
    await redis.aclose()
    await again.close()
    await bob.close()


async def test_redis_writes_are_batched_and_the_window_is_measured(
    redis_service: LocalService, start_server: StartServer  # noqa: F811
) -> None:
    """Steady chat does not cost a Redis round trip per stanza; the time a change waits
    for Redis (the window SIGKILL can lose, docs/cluster.md) is measured."""
    a = await start_server(cluster=cluster(redis_service, "node-a"))
    alice = await Stream.login(a, "alice")
    bob = await Stream.login(a, "bob")
    await alice.enable()
    count = 500
    for n in range(count):
        await bob.send(message("alice@localhost/phone", f"m{n}"))
    await messages(alice, count)
    await alice.send(f"<a xmlns='{SM}' h='{count}'/>")
    await alice.ack_count()
    store = sm_module(a).store
    assert store is not None
    await store.flush()
    burst = store.batches
    print(f"\nburst of {count}: {burst} batches, longest wait {store.max_lag * 1000:.1f} ms")
    assert burst < count / 2  # one round trip per burst, not per stanza
    store.max_lag = 0.0
    for n in range(100):  # one at a time: each is written on its own
        await bob.send(message("alice@localhost/phone", f"p{n}"))
        await alice.next(f"<body>p{n}<")
    await store.flush()
    print(f"100 one by one: {store.batches - burst} batches, "
          f"longest wait {store.max_lag * 1000:.1f} ms")
    assert store.max_lag < 0.5
    await alice.close()
    await bob.close()


async def test_takeover_when_redis_lags_the_old_node(
    redis_service: LocalService, start_server: StartServer  # noqa: F811
) -> None:
    """The old node got further than its last write to Redis: the client acknowledges
    stanzas Redis never saw (taken as delivered, not an error), and what the old node
    queued after its last write is routed again from there, to the new node."""
    a = await start_server(cluster=cluster(redis_service, "node-a"))
    b = await start_server(users={}, cluster=cluster(redis_service, "node-b"))
    alice = await Stream.login(a, "alice")
    bob = await Stream.login(b, "bob")
    previd = (await alice.enable()).get("id", "")
    await alice.send("<presence/>")
    await alice.next("<presence")
    await until(lambda: b.router.directory.get("alice@localhost", "phone") is not None)
    await bob.send(message("alice@localhost/phone", "stored"))
    assert await messages(alice, 1) == ["stored"]
    store = sm_module(a).store
    assert store is not None
    await store.flush()
    await store.stop()  # node A's writes stop here: Redis lags it from now on
    await bob.send(message("alice@localhost/phone", "seen 1"))
    await bob.send(message("alice@localhost/phone", "seen 2"))
    assert await messages(alice, 2) == ["seen 1", "seen 2"]
    await drop_and_wait(a, alice)
    await bob.send(message("alice@localhost/phone", "queued, never stored"))
    await until(lambda: len(sm_module(a).resumable[previd].queue) == 5)
    # Redis says 2 were sent (the echo, "stored"); the client has 4: two over.
    again = await resume_at(b, "alice", previd, 4)
    await again.next("resumed")
    # Node A cannot know the client had the first two: duplicates, as XEP-0198 allows.
    assert await messages(again, 3) == ["seen 1", "seen 2", "queued, never stored"]
    await again.send(message("bob@localhost/phone", "still counting"))
    await bob.next("still counting")
    assert await again.ack_count() == 2  # its presence (on A), this message (on B)
    await again.close()
    await bob.close()


async def test_a_dead_node_s_waiting_session_times_out_on_another_node(
    redis_service: LocalService,
    start_server: StartServer,
    node_process: Callable[..., Any],
    tmp_path: Path,
    storage_section: dict[str, Any] | None,
) -> None:
    """Its node killed while the session waited for its client, and the client never
    comes back: a surviving node ends it after the resume timeout, and its queued
    message is in offline storage."""
    sm_options = {"orphan_sweep": 0.2}
    b = await start_server(
        cluster=cluster(redis_service, "node-b"), modules=modules(**sm_options)
    )
    sections: dict[str, Any] = {"cluster": cluster(redis_service, "node-a")}
    if storage_section is not None:
        sections["storage"] = storage_section
    a: NodeProcess = await node_process(tmp_path, **sections)
    alice = await a.login("alice")
    previd = (await alice.enable("resume='true' max='1'")).get("id", "")
    bob = await Stream.login(b, "bob")
    await until(lambda: b.router.directory.get("alice@localhost", "phone") is not None)
    alice.drop()
    await bob.send(message("alice@localhost/phone", "for the offline store"))
    redis = Redis.from_url(devservices.redis_url(redis_service))
    queue = (PREFIX + previd).replace("sm:", "smq:")
    deadline = time.monotonic() + 5
    while await redis.llen(queue) != 1:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    await a.kill()
    module = sm_module(b)
    await until(lambda: module.stats.timed_out == 1, timeout=30)
    assert module.store is not None
    await module.store.flush()  # the sweep made the record B's, then dropped it
    assert await redis.exists(PREFIX + previd) == 0
    again = await Stream.login(b, "alice")
    await again.send("<presence/>")
    assert await messages(again, 1) == ["for the offline store"]
    await redis.aclose()
    await again.close()
    await bob.close()


async def test_a_session_ended_for_too_many_unacked_cannot_be_resumed_elsewhere(
    redis_service: LocalService, start_server: StartServer  # noqa: F811
) -> None:
    """Its unacked messages went to offline storage when it ended: its record must go
    from Redis too, or another node resumes it and delivers them a second time."""
    a = await start_server(
        modules=modules(max_unacked=3, ack_every=100), cluster=cluster(redis_service, "node-a")
    )
    b = await start_server(users={}, cluster=cluster(redis_service, "node-b"))
    alice = await Stream.login(a, "alice")
    bob = await Stream.login(a, "bob")
    previd = (await alice.enable()).get("id", "")
    closed = await session_closed(a)
    for n in range(4):
        await bob.send(message("alice@localhost/phone", f"m{n}"))
    assert await alice.error() == "resource-constraint"
    await asyncio.wait_for(closed.wait(), 10)
    await until(lambda: a.router.ledger.offline == 4)
    await flushed_then_refused(a, b, "alice", previd)
    assert previd not in sm_module(a).resumable  # nor kept on A, ended
    await bob.close()


async def test_a_resume_whose_stream_ends_while_redis_answers_loses_nothing(
    redis_service: LocalService, start_server: StartServer  # noqa: F811
) -> None:
    """The new node claims the session (its old node lets it go, queue and all), then
    finds the resuming stream gone: the claimed queue is routed (offline storage), not
    left in a record no node would ever end."""
    a = await start_server(cluster=cluster(redis_service, "node-a"))
    b = await start_server(users={}, cluster=cluster(redis_service, "node-b"))
    alice = await Stream.login(a, "alice")
    bob = await Stream.login(a, "bob")
    previd = (await alice.enable()).get("id", "")
    for n in range(3):
        await bob.send(message("alice@localhost/phone", f"unacked {n}"))
    assert len(await messages(alice, 3)) == 3
    await drop_and_store(a, alice)
    await resume_cut_before_the_bind(b, redis_service, previd)
    await until(lambda: b.router.ledger.offline + a.router.ledger.offline == 3, timeout=10)
    await bob.close()


async def test_a_resume_whose_stream_ends_tells_who_saw_the_session_available(
    redis_service: LocalService, start_server: StartServer  # noqa: F811
) -> None:
    """As above, with alice available and a directed presence sent to bob from node A: her
    old node let the session go silently, so node B, which ends it, sends bob her
    unavailable (else he would see her online for good)."""
    a = await start_server(cluster=cluster(redis_service, "node-a"))
    b = await start_server(users={}, cluster=cluster(redis_service, "node-b"))
    alice = await Stream.login(a, "alice")
    bob = await Stream.login(a, "bob")
    previd = (await alice.enable()).get("id", "")
    await available_with_directed_presence(alice, bob)
    await drop_and_store(a, alice)
    await resume_cut_before_the_bind(b, redis_service, previd)
    gone = await bob.next("alice@localhost/phone")
    assert gone.get("type") == "unavailable"
    await bob.close()


async def test_a_resume_while_redis_hangs_is_answered_in_time_and_loses_nothing(
    redis_service: LocalService, start_server: StartServer,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis stopped (SIGSTOP: no error, no answer) while a client resumes on the other
    node: it gets <failed/> within the bound, not silence. Redis then runs the claim it
    had queued, leaving the record node B's while B holds nothing of it: B ends the
    session once Redis answers, its unacked messages to offline storage, none lost."""
    monkeypatch.setattr(smstore, "REDIS_WAIT", 1.0, raising=False)
    a = await start_server(cluster=cluster(redis_service, "node-a"))
    b = await start_server(users={}, cluster=cluster(redis_service, "node-b"))
    alice = await Stream.login(a, "alice")
    bob = await Stream.login(a, "bob")
    previd = (await alice.enable()).get("id", "")
    for n in range(3):
        await bob.send(message("alice@localhost/phone", f"unacked {n}"))
    assert len(await messages(alice, 3)) == 3
    await drop_and_wait(a, alice)
    await sm_module(a).store.flush()  # type: ignore[union-attr]
    # B's store on a client of its own with a connection open and CLAIM loaded, as on a
    # node that has claimed before: the claim reaches Redis at once and waits there, to
    # run when Redis goes on (on the shared client it may wait for a connection instead).
    module = sm_module(b)
    await module.store.stop()  # type: ignore[union-attr]
    own = Redis.from_url(devservices.redis_url(redis_service))
    await own.script_load(smstore.CLAIM)
    store = smstore.SMStore(own, "node-b")
    store.start(module.lost)
    module.store = store
    settle_later = getattr(module, "_settle_later", lambda: None)
    monkeypatch.setattr(module, "_settle_later", lambda: None, raising=False)  # till it ran
    redis_service.pause()
    try:
        started = time.monotonic()
        again = await resume_at(b, "alice", previd, 0)
        answer = await again.next(SM, timeout=3)
        assert time.monotonic() - started < 3
        assert etree.QName(answer).localname == "failed", etree.tostring(answer)
        assert answer[0].tag == "{urn:ietf:params:xml:ns:xmpp-stanzas}internal-server-error"
        assert store.uncertain
    finally:
        redis_service.resume()
    check = Redis.from_url(devservices.redis_url(redis_service))
    for _ in range(100):  # Redis has no event for it: look until it ran (at most 5 s)
        if await check.hget(PREFIX + previd, "node") == b"node-b":
            break
        await asyncio.sleep(0.05)
    assert await check.hget(PREFIX + previd, "node") == b"node-b"  # the claim ran late
    settle_later()
    await until(lambda: not store.uncertain, timeout=10)
    await until(lambda: a.router.ledger.offline + b.router.ledger.offline == 3, timeout=10)
    await store.flush()
    assert not await check.exists(PREFIX + previd)
    await store.stop()
    await own.aclose()
    await check.aclose()
    await again.close()
    await bob.close()


class HeldLink:
    """A TCP forwarder to Redis for one node's store, whose traffic towards Redis can be
    held: that node's writes then wait on the wire while other nodes' go through."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.open = asyncio.Event()
        self.open.set()
        self.sent = 0  # bytes from the node that reached the wire, held or not
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        for task in (self._pipe(reader, up_writer, held=True),
                     self._pipe(up_reader, writer, held=False)):
            running = asyncio.create_task(task)
            self._tasks.add(running)
            running.add_done_callback(self._tasks.discard)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    held: bool) -> None:
        try:
            while data := await reader.read(65536):
                if held:
                    self.sent += len(data)
                    await self.open.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            self._server.close()


async def test_a_takeover_during_a_write_of_the_old_node_loses_nothing(
    redis_service: LocalService, start_server: StartServer  # noqa: F811
) -> None:
    """Node A has written a message to its waiting session's record but Redis has not
    run the write when node B's claim does: the write is refused, so the new node never
    gets that message from Redis, and node A must route it again (to B's new session,
    else offline storage), not count it as stored."""
    a = await start_server(cluster=cluster(redis_service, "node-a"))
    b = await start_server(users={}, cluster=cluster(redis_service, "node-b"))
    alice = await Stream.login(a, "alice")
    bob = await Stream.login(b, "bob")
    previd = (await alice.enable()).get("id", "")
    await until(lambda: b.router.directory.get("alice@localhost", "phone") is not None)
    module = sm_module(a)
    assert module.store is not None
    await module.store.stop()
    link = HeldLink(("127.0.0.1", redis_service.port))
    own = Redis.from_url(await link.start())
    await own.script_load(smstore.SAVE)
    store = smstore.SMStore(own, "node-a")
    store.start(module.lost, module.written)
    module.store = store
    await drop_and_wait(a, alice)
    await store.flush()
    sm = module.resumable[previd]
    link.open.clear()
    before = link.sent
    await bob.send(message("alice@localhost/phone", "in a write Redis runs too late"))
    await until(lambda: link.sent > before and sm.stored_sent == sm.sent == 1)
    again = await resume_at(b, "alice", previd, 0)
    await again.next("resumed")
    await until(lambda: sm.handed)  # B's claim ran; A let the session go
    link.open.set()
    await store.flush()
    delivered = await messages(again, 1) if not a.router.ledger.offline else []
    assert delivered == ["in a write Redis runs too late"] or a.router.ledger.offline == 1
    await store.stop()
    await own.aclose()
    await link.close()
    await again.close()
    await bob.close()


async def stored_bodies(redis: Redis, queue: str) -> list[str]:
    """The bodies of the messages in a session's queue in Redis."""
    return [etree.fromstring(data).findtext(f"{C}body") or ""
            for data in await redis.lrange(queue, 0, -1)]


async def test_redis_refusing_or_losing_the_state_gets_it_written_whole(
    redis_service: LocalService, start_server: StartServer  # noqa: F811
) -> None:
    """An error reply (OOM here) is no write: the state is written once Redis takes it
    again, flush() waits for that. And a record Redis lost (a restart, a failover) is
    written whole with the next change, not rebuilt from that change alone."""
    a = await start_server(cluster=cluster(redis_service, "node-a"))
    alice = await Stream.login(a, "alice")
    bob = await Stream.login(a, "bob")
    previd = (await alice.enable()).get("id", "")
    store = sm_module(a).store
    assert store is not None
    await store.flush()
    redis = Redis.from_url(devservices.redis_url(redis_service))
    queue = QUEUE_PREFIX + previd
    await redis.config_set("maxmemory-policy", "noeviction")
    await redis.config_set("maxmemory", "1")
    try:
        await bob.send(message("alice@localhost/phone", "refused once"))
        assert await messages(alice, 1) == ["refused once"]
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.5):
                await store.flush()
    finally:
        await redis.config_set("maxmemory", "0")
    async with asyncio.timeout(15):
        await store.flush()
    assert await stored_bodies(redis, queue) == ["refused once"]
    await redis.delete(PREFIX + previd, queue)  # Redis lost the record
    await bob.send(message("alice@localhost/phone", "after the loss"))
    assert await messages(alice, 1) == ["after the loss"]
    await store.flush()
    assert await stored_bodies(redis, queue) == ["refused once", "after the loss"]
    assert await redis.hget(PREFIX + previd, "sent") == b"2"
    await redis.aclose()
    await alice.close()
    await bob.close()


async def test_a_dead_node_s_record_lives_until_the_sweep_takes_it(
    redis_service: LocalService,
) -> None:
    """Nobody refreshes the record of a dead node's session: the sweep that first finds
    it orphaned gives it its resume timeout and the slack again, so the sweep that takes
    it, not the TTL, ends it."""
    redis = Redis.from_url(devservices.redis_url(redis_service))
    dead = smstore.SMStore(redis, "node-dead", ttl_slack=5)
    change = smstore.Change(bare="alice@localhost", jid="alice@localhost/phone", sid="",
                            handled=0, sent=1, max=100, presence=b"", state=b"{}", reset=True,
                            trim=0,
                            append=[b"<message/>"], expect=-1)
    dead.dirty("orphan-id", lambda _full: change)
    dead.start(lambda _id: None)
    await dead.flush()
    await dead.stop()
    assert 0 < await redis.ttl(PREFIX + "orphan-id") <= 105
    await redis.expire(PREFIX + "orphan-id", 3)  # as if its last write were long ago
    await redis.expire(QUEUE_PREFIX + "orphan-id", 3)
    sweeper = smstore.SMStore(redis, "node-live", ttl_slack=60)
    assert await sweeper.orphans() == []  # first seen orphaned
    assert await redis.ttl(PREFIX + "orphan-id") > 150
    assert await redis.ttl(QUEUE_PREFIX + "orphan-id") > 150
    await redis.aclose()


async def test_a_session_ended_here_is_not_resumed_from_a_record_not_yet_dropped(
    redis_service: LocalService, start_server: StartServer  # noqa: F811
) -> None:
    """The session timed out on this node (its messages to offline storage) and the drop
    of its record has not reached Redis: a <resume/> must fail, not claim the record
    and deliver the messages a second time."""
    a = await start_server(cluster=cluster(redis_service, "node-a"))
    alice = await Stream.login(a, "alice")
    bob = await Stream.login(a, "bob")
    previd = (await alice.enable("resume='true' max='1'")).get("id", "")
    await bob.send(message("alice@localhost/phone", "once"))
    assert await messages(alice, 1) == ["once"]
    module = sm_module(a)
    assert module.store is not None
    await module.store.flush()
    await module.store.stop()  # its drop will not reach Redis
    await drop_and_wait(a, alice)
    await until(lambda: a.router.ledger.offline == 1, timeout=10)
    again = await resume_at(a, "alice", previd, 0)
    answer = await again.next(SM)
    assert etree.QName(answer).localname == "failed", etree.tostring(answer)
    assert answer.get("h") == "0"
    await again.close()
    await bob.close()


async def test_a_late_resume_on_another_node_is_told_h(
    redis_service: LocalService, start_server: StartServer  # noqa: F811
) -> None:
    """alice's session times out on node A after she sent it two stanzas; she comes back
    with <resume/> on node B: <failed/> carries h (XEP-0198), so her client sends again
    only what the server did not have. Someone else's <resume/> of that id learns nothing."""
    a = await start_server(cluster=cluster(redis_service, "node-a"))
    b = await start_server(users={}, cluster=cluster(redis_service, "node-b"))
    alice = await Stream.login(a, "alice")
    previd = (await alice.enable("resume='true' max='1'")).get("id", "")
    await alice.send("<presence/>")
    await alice.send(message("bob@localhost", "to bob, offline"))
    await until(lambda: a.router.ledger.offline == 1, timeout=10)  # both handled
    await drop_and_wait(a, alice)
    await until(lambda: previd not in sm_module(a).resumable, timeout=10)  # timed out
    assert sm_module(a).expired[previd] == ("alice@localhost", 2)
    assert (await flushed_then_refused(a, b, "alice", previd)).get("h") == "2"
    assert (await flushed_then_refused(a, b, "bob", previd)).get("h") is None
