"""Debian's haproxy in front of nodes: the real load balancer the cluster tests need."""

from __future__ import annotations

import asyncio
import shutil
import socket
from pathlib import Path

from tests.storage.services import unavailable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Balancers:
    """haproxy processes in TCP mode, each on a free port of 127.0.0.1 in front of the
    backend it is given; `stop` kills every one started."""

    def __init__(self, folder: Path) -> None:
        if shutil.which("haproxy") is None:
            unavailable("haproxy is not installed (.ci/services.sh installs it)")
        self.folder = folder
        self.started: list[asyncio.subprocess.Process] = []

    async def start(self, backend: str, defaults: str = "") -> int:
        """A balancer whose backend section is `backend` (its 'server' lines, indented),
        with `defaults` added to its defaults; its port once it accepts connections."""
        port = free_port()
        config = self.folder / f"haproxy-{port}.cfg"
        config.write_text(
            "defaults\n    mode tcp\n    timeout connect 1s\n    timeout client 60s\n"
            f"    timeout server 60s\n{defaults}"
            f"frontend xmpp\n    bind 127.0.0.1:{port}\n    default_backend nodes\n"
            f"backend nodes\n{backend}\n"
        )
        process = await asyncio.create_subprocess_exec(
            "haproxy", "-db", "-f", str(config),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        self.started.append(process)
        async with asyncio.timeout(10):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                writer.close()
                return port

    async def stop(self) -> None:
        for process in self.started:
            process.kill()
            await process.wait()
