"""batch_window_ms in a real `xmppd`: a busy node lets a client's next stanza wait for
the window's end, handles the first one after idle at once, and takes a new window
from a reload; what comes over a cluster link gathers the same way. Timed with a
long window (300 ms) so that a busy machine cannot blur it; the CPU it saves is
measured in bench/ (docs/bench.md, "A batch window")."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.integration.clients import Client, close, insecure_context
from tests.integration.conftest import write_config
from tests.integration.nodeproc import Node, register
from xmppd.storage import devservices
from xmppd.storage.devservices import LocalService

pytestmark = pytest.mark.timeout(90)

WINDOW_MS = 300


async def login(node: Node, jid: str) -> Client:
    client = Client(jid, "secret")
    client.ssl_context = insecure_context()
    client.enable_plaintext = False
    client.connect("127.0.0.1", node.ports["STARTTLS"])
    await asyncio.wait_for(client.started.wait(), 15)
    return client


async def gap(alice: Client, bob: Client) -> tuple[float, float]:
    """Alice sends two messages 50 ms apart to an idle node; how long after the first
    the node handled each, as bob sees them arrive."""
    await asyncio.sleep(2 * WINDOW_MS / 1000 + 0.5)  # the node's loop is idle again
    while not bob.messages.empty():  # what came before (the cluster test's probes)
        bob.messages.get_nowait()
    start = time.monotonic()
    alice.send_message(mto="bob@localhost", mbody="one", mtype="chat")
    await asyncio.sleep(0.05)
    alice.send_message(mto="bob@localhost", mbody="two", mtype="chat")
    arrived = []
    for body in ("one", "two"):
        message = await asyncio.wait_for(bob.messages.get(), 10)
        assert message["body"] == body
        arrived.append(time.monotonic() - start)
    return arrived[0], arrived[1]


async def test_a_busy_node_gathers_input_for_its_window_and_a_reload_changes_it(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, batch_window_ms=WINDOW_MS)
    await register(config, "localhost", {"alice": "secret", "bob": "secret"})
    node = await Node.start(config)
    assert f"event loop: uvloop, batch window {WINDOW_MS} ms" in node.text()
    alice = bob = None
    try:
        alice = await login(node, "alice@localhost")
        bob = await login(node, "bob@localhost")
        alice.send_presence()
        bob.send_presence()

        first, second = await gap(alice, bob)
        assert first < 0.2  # the first input after idle is handled at once
        assert second >= 0.25  # the next one, 50 ms later, waited for the window's end

        write_config(tmp_path, batch_window_ms=0)
        mark = node.hangup()
        await node.line(r"reloaded: changed .*batch_window_ms", since=mark)
        first, second = await gap(alice, bob)
        assert first < 0.2 and second < 0.2  # handled as it comes
    finally:
        for client in (alice, bob):
            if client is not None:
                await close(client)
        await node.stop()


async def test_stanzas_from_another_node_gather_for_the_receiving_nodes_window(
    tmp_path: Path, redis_service: LocalService
) -> None:
    """Node A handles input as it comes and forwards both messages at once; node B,
    whose only input is its link from A, gathers them for its window."""
    nodes: list[Node] = []
    clients: list[Client] = []
    try:
        for name, window in (("node-a", 0), ("node-b", WINDOW_MS)):
            folder = tmp_path / name
            folder.mkdir()
            config = write_config(
                folder,
                data_dir=str(tmp_path / "data"),
                storage={"cache": {"backend": "none"}},
                batch_window_ms=window,
                cluster={"redis_url": devservices.redis_url(redis_service), "node_name": name},
            )
            if not nodes:
                await register(config, "localhost", {"alice": "secret", "bob": "secret"})
            nodes.append(await Node.start(config))
        alice = await login(nodes[0], "alice@localhost")
        clients.append(alice)
        bob = await login(nodes[1], "bob@localhost")
        clients.append(bob)
        bob.send_presence()
        async with asyncio.timeout(15):  # until node A routes to bob's session on B
            while True:
                alice.send_message(mto="bob@localhost", mbody="ping", mtype="chat")
                try:
                    await asyncio.wait_for(bob.messages.get(), 0.5)
                    break
                except TimeoutError:
                    continue

        first, second = await gap(alice, bob)
        assert first < 0.2
        assert second >= 0.25
    finally:
        for client in clients:
            await close(client)
        for node in nodes:
            await node.stop()
