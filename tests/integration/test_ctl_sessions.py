"""xmppctl nodes, sessions and kick on a single node (no cluster): through its admin API.

The node runs in this process; xmppctl runs as a process with the node's
configuration file, as an operator runs it. (With a cluster, the same
commands against real workers: tests/integration/test_workers.py.)
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from tests.integration.clients import close, connect
from tests.integration.conftest import StartServer
from tests.integration.test_workers import xmppctl


async def test_sessions_nodes_and_kick_on_a_single_node(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = await start_server()
    path = tmp_path / "xmppd.yml"
    alice = await connect(server, "alice@localhost/desk", "alice-secret")
    phone = await connect(server, "bob@localhost/phone", "bob-secret")
    desk = await connect(server, "bob@localhost/desk", "bob-secret")
    try:
        code, out, err = await xmppctl(path, "nodes")
        assert code == 0, err
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+\t3\talive\n", out)

        code, out, err = await xmppctl(path, "sessions")
        assert code == 0, err
        rows = [line.split("\t") for line in out.splitlines()]
        assert [(r[0], r[1], r[3]) for r in rows] == [
            ("alice@localhost/desk", "-", "127.0.0.1"),
            ("bob@localhost/desk", "-", "127.0.0.1"),
            ("bob@localhost/phone", "-", "127.0.0.1"),
        ]
        assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", r[2]) for r in rows)

        # a bare JID ends all of the account's sessions, and only those
        code, out, err = await xmppctl(path, "kick", "bob@localhost", "go home")
        assert code == 0, err
        assert sorted(out.splitlines()) == [
            "ended bob@localhost/desk on this node",
            "ended bob@localhost/phone on this node",
        ]
        for client in (phone, desk):
            await asyncio.wait_for(client.ended.wait(), 5)
            assert client.stream_errors == ["policy-violation"]
        assert not alice.ended.is_set()
        code, out, err = await xmppctl(path, "kick", "bob@localhost")
        assert (code, out) == (1, "") and "bob@localhost has no session" in err
        code, _, err = await xmppctl(path, "kick", "bob@elsewhere.example")
        assert code == 1 and "elsewhere.example" in err
    finally:
        for client in (alice, phone, desk):
            await close(client)


async def test_without_a_running_node_the_views_say_so(tmp_path: Path) -> None:
    path = tmp_path / "xmppd.yml"
    path.write_text(f"hosts: [localhost]\ndata_dir: {tmp_path / 'data'}\n")
    code, out, err = await xmppctl(path, "sessions")
    assert (code, out) == (0, "") and "no node is running on this machine" in err
    code, out, err = await xmppctl(path, "kick", "bob@localhost")
    assert code == 1 and "no running node answered" in err
