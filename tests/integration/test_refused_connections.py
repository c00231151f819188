"""A connection refused by the per-address limit leaves a line a log shipper can pick
out (its `event`) and that names the connection, like every refusal."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tests.integration.conftest import StartServer, port_of


async def test_the_per_address_refusal_has_its_event_and_conn(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    server = await start_server(limits={"max_connections_per_ip": 1})
    port = port_of(server, "starttls")
    _, first = await asyncio.open_connection("127.0.0.1", port)
    reader, second = await asyncio.open_connection("127.0.0.1", port)
    try:
        async with asyncio.timeout(10):
            assert b"policy-violation" in await reader.read()  # refused, then closed
        [refused] = [r for r in caplog.records if "refused a connection" in r.getMessage()]
        assert getattr(refused, "event", None) == "connection-refused"
        assert getattr(refused, "address", None) == "127.0.0.1"
        assert refused.getMessage().endswith(f" conn={getattr(refused, 'conn', None)}")
    finally:
        for writer in (first, second):
            writer.close()
