"""The start-up warning about an `admins` or `auth.proxy_auth` JID with no account:
whoever makes that account gets its rights, so the operator should make it first."""

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


def no_account_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("xmppd") and r.levelno == logging.WARNING
        and "has no account" in r.getMessage()
    ]


async def test_a_listed_admin_or_proxy_without_an_account_is_warned_about_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="xmppd")
    config = write_config(
        tmp_path, admins=["boss@localhost"], auth={"proxy_auth": ["proxy@localhost"]}
    )
    source = load_config(config).source
    await start_and_stop(config)
    assert no_account_warnings(caplog) == [
        f"{source.where(('auth', 'proxy_auth', 0))}: auth.proxy_auth[0]: proxy@localhost has "
        "no account: create it with `xmppctl register proxy@localhost`",
        f"{source.where(('admins', 0))}: admins[0]: boss@localhost has no account: create it "
        "with `xmppctl register boss@localhost`",
    ]
    assert f"{config}:" in no_account_warnings(caplog)[0]  # the file and its line

    server = Server(load_config(config))
    await server.start()
    try:
        await server.accounts["localhost"].register("boss", "long-enough")
        await server.accounts["localhost"].register("proxy", "long-enough")
    finally:
        async with asyncio.timeout(STOP_TIMEOUT):
            await server.stop()
    caplog.clear()
    await start_and_stop(config)
    assert " starting: config " in caplog.text  # it did start again, logging
    assert no_account_warnings(caplog) == []
