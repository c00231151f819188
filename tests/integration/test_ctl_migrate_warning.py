"""`xmppctl migrate` warns when a node is running on the source storage."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from tests.integration.conftest import StartServer


async def migrate(source: Path, target: Path) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "xmppd.cli.ctl",
        "migrate",
        "--from",
        str(source),
        "--to",
        str(target),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_migrate_warns_when_a_node_runs_on_the_source(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = await start_server()
    source = tmp_path / "xmppd.yml"  # the file start_server wrote and the node runs on
    target = tmp_path / "target.yml"
    target.write_text(f"hosts: [localhost]\ndata_dir: {tmp_path / 'elsewhere'}\n")
    code, out, err = await migrate(source, target)
    assert code == 0, err
    assert f"xmppctl: warning: a node is running on the source storage of {source}" in err
    assert "items:localhost/accounts: 2 copied, 0 already there, 0 failed" in out

    await server.stop()
    code, out, err = await migrate(source, target)
    assert (code, err) == (0, "")
    assert "items:localhost/accounts: 0 copied, 2 already there, 0 failed" in out
