"""`xmppctl migrate` and `import` warn when a node is running on the storage they use."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from tests.integration.conftest import StartServer


async def migrate(source: Path, target: Path) -> tuple[int, str, str]:
    return await xmppctl("migrate", "--from", str(source), "--to", str(target))


async def xmppctl(*argv: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "xmppd.cli.ctl",
        *argv,
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


async def test_import_warns_when_a_node_runs_on_the_storage(
    tmp_path: Path, start_server: StartServer
) -> None:
    await start_server()
    config = tmp_path / "xmppd.yml"
    export = tmp_path / "carol.xml"
    export.write_text(
        "<server-data xmlns='urn:xmpp:pie:0'><host jid='localhost'>"
        "<user name='carol' password='carol pw'/></host></server-data>"
    )
    code, out, err = await xmppctl("-c", str(config), "import", str(export))
    assert code == 0, err
    assert "a node is running on this storage: the import writes the stores directly" in err
    assert "accounts: 1 copied, 0 skipped, 0 failed" in out
