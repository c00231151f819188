"""xmppctl's side of the admin channel (xmppd.cli.nodes) against a real local HTTP
server standing in for a node: only a node that does not answer is gone around."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from xmppd.adminapi import admin_dir
from xmppd.cli.nodes import NodeRefused, Outcome, ask_nodes


@pytest.fixture
async def failing_node(tmp_path: Path) -> AsyncIterator[Path]:
    """A data_dir whose one recorded node (this process) fails every request with an
    unexpected error: aiohttp answers 500 with a plain-text body, as for any bug."""

    async def fail(request: web.Request) -> web.Response:
        raise RuntimeError("a bug in a route")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fail)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    folder = admin_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / "token").write_text("a-token-" + "x" * 32 + "\n")
    record = {"url": f"http://127.0.0.1:{port}", "pid": os.getpid(), "hosts": ["localhost"]}
    (folder / "1-node.json").write_text(json.dumps(record))
    try:
        yield tmp_path
    finally:
        await runner.cleanup()


async def test_a_node_failing_with_a_non_json_answer_is_a_refusal_not_silence(
    failing_node: Path,
) -> None:
    """A node that answered is running: were its error taken for silence, xmppctl would
    write the stores behind its back (its cache then serves stale data) and tell the
    operator to delete the record of a running node."""
    outcome = Outcome()
    with pytest.raises(NodeRefused, match="HTTP 500"):
        await ask_nodes(failing_node, "PUT", "/accounts/a@localhost/roster/b@localhost",
                        outcome, {"name": "B"})
    assert outcome.warnings == []
    assert list(admin_dir(failing_node).glob("*.json"))  # the record stays
