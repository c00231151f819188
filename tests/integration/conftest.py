"""A real xmppd node in the test's event loop, on free loopback ports, embedded storage."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from xmppd.config import load_config
from xmppd.server import Server

StartServer = Callable[..., Awaitable[Server]]

USERS = {"alice": "alice-secret", "bob": "bob-secret"}


def write_config(tmp_path: Path, **sections: Any) -> Path:
    """A config file like an operator's: ports 0 pick free ports."""
    config: dict[str, Any] = {
        "hosts": ["localhost"],
        "data_dir": str(tmp_path / "data"),
        "log_level": "debug",
        "listeners": [
            {"type": "starttls", "address": "127.0.0.1", "port": 0},
            {"type": "direct_tls", "address": "127.0.0.1", "port": 0},
        ],
        "limits": {"auth_failure_delay": 0.05},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    path = tmp_path / "xmppd.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
async def start_server(tmp_path: Path) -> AsyncIterator[StartServer]:
    servers: list[Server] = []

    async def start(users: dict[str, str] | None = None, **sections: Any) -> Server:
        server = Server(load_config(write_config(tmp_path, **sections)))
        await server.start()
        servers.append(server)
        for name, password in (USERS if users is None else users).items():
            await server.accounts["localhost"].register(name, password)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def server(start_server: StartServer) -> Server:
    return await start_server()


def port_of(server: Server, listener_type: str) -> int:
    return next(lst.port for lst in server.listening if lst.type == listener_type)
