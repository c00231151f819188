"""The start-up warning about a data_dir other local users can read: it holds every
account's SCRAM keys, and one made by an older version (or by hand) may be open."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from tests.integration.conftest import STOP_TIMEOUT, write_config
from xmppd.config import load_config
from xmppd.server import Server


async def start_and_stop(config: Path) -> None:
    server = Server(load_config(config))
    try:
        await server.start()
    finally:
        async with asyncio.timeout(STOP_TIMEOUT):
            await server.stop()


def warnings_about(data_dir: Path, caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("xmppd") and r.levelno == logging.WARNING
        and f"data_dir {data_dir}" in r.getMessage()
    ]


async def test_a_data_dir_others_can_read_is_warned_about_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="xmppd")
    config = write_config(tmp_path)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data_dir.chmod(0o755)  # what an old version or a hand-made folder may have
    await start_and_stop(config)
    assert warnings_about(data_dir, caplog) == [
        f"data_dir {data_dir} can be read by every local user (it holds the accounts' keys):"
        f" chmod -R o-rwx {data_dir}"
    ]
    # Closed to others (the group may read it): started again, no warning.
    caplog.clear()
    data_dir.chmod(0o750)
    await start_and_stop(config)
    assert " starting: config " in caplog.text  # it did start again, logging
    assert warnings_about(data_dir, caplog) == []
