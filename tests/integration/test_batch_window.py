"""batch_window_ms in a real `xmppd`: a node busy with several clients lets the next
stanza wait for the window's end, handles the first one after idle at once, never
holds one client's input alone, and takes a new window from a reload; what comes
over a cluster link gathers the same way. Timed with a
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


async def delays(alice: Client, bob: Client, carol: Client | None) -> tuple[float, float]:
    """Alice sends two messages 60 ms apart to bob on an idle node, carol (when given)
    one just after alice's first: how long each of alice's two took to reach bob."""
    await asyncio.sleep(2 * WINDOW_MS / 1000 + 0.5)  # the node's loop is idle again
    while not bob.messages.empty():  # what came before (the cluster test's probes)
        bob.messages.get_nowait()
    sent = {"one": time.monotonic()}
    alice.send_message(mto="bob@localhost", mbody="one", mtype="chat")
    if carol is not None:
        await asyncio.sleep(0.01)
        carol.send_message(mto="bob@localhost", mbody="x", mtype="chat")
    await asyncio.sleep(0.05)
    sent["two"] = time.monotonic()
    alice.send_message(mto="bob@localhost", mbody="two", mtype="chat")
    took = {}
    async with asyncio.timeout(10):
        while len(took) < 2:
            message = await bob.messages.get()
            if message["body"] in sent:
                took[message["body"]] = time.monotonic() - sent[message["body"]]
    assert list(took) == ["one", "two"]
    return took["one"], took["two"]


async def test_a_busy_node_gathers_input_for_its_window_and_a_reload_changes_it(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, batch_window_ms=WINDOW_MS)
    users = {"alice": "secret", "bob": "secret", "carol": "secret"}
    await register(config, "localhost", users)
    node = await Node.start(config)
    clients: list[Client] = []
    try:  # from here on the node is stopped whatever fails
        assert f"event loop: uvloop, batch window {WINDOW_MS} ms" in node.text()
        for user in users:
            clients.append(await login(node, f"{user}@localhost"))
        alice, bob, carol = clients
        for client in clients:
            client.send_presence()
        for sender in (alice, carol):  # what a first message loads (privacy lists, ...)
            sender.send_message(mto="bob@localhost", mbody="warm", mtype="chat")  # is read
            await asyncio.wait_for(bob.messages.get(), 10)  # from the stores in threads,
        # whose results would end a window early

        one, two = await delays(alice, bob, carol)
        assert one < 0.15  # the first input after idle is handled at once
        assert two >= 0.2  # two clients sent: the next, 60 ms later, waited for the window

        one, two = await delays(alice, bob, None)
        assert one < 0.15 and two < 0.15  # one client's input alone is never held

        write_config(tmp_path, batch_window_ms=0)
        mark = node.hangup()
        await node.line(r"reloaded: changed .*batch_window_ms", since=mark)
        one, two = await delays(alice, bob, carol)
        assert one < 0.15 and two < 0.15  # handled as it comes
    finally:
        for client in clients:
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

        await nodes[0].line(r"cluster: linked to node node-b")  # not through Redis
        # Node B's only input is its link: the first stanza over it arms B's window
        # (it may itself wait for one, if B must first hear a directory change from
        # Redis, which is input too), and the second waits for the window's end.
        _, two = await delays(alice, bob, None)
        assert two >= 0.2
    finally:
        for client in clients:
            await close(client)
        for node in nodes:
            await node.stop()
