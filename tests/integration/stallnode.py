"""`python -m xmppd` with the heartbeat's timings shortened and a way to block its loop.

For tests of a node whose event loop stalls (tests/integration/test_cluster_stall.py):
TTL 2 s, INTERVAL 0.5 s, WEDGED 5 s instead of 10, 3 and 30, so that "longer than
the TTL, shorter than the wedge bound" takes seconds. The file named by
$XMPPD_STALL_FILE, once it appears, holds how many seconds to block the event loop
(`time.sleep` in a callback on the loop, as a long synchronous piece of work does)
or "forever"; the node logs when it begins and when the loop runs again, and
removes the file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from pathlib import Path

from xmppd.cli.server import main
from xmppd.cluster import heartbeat

TTL, INTERVAL, WEDGED = 2, 0.5, 5.0
log = logging.getLogger("stallnode")


def _poll(path: Path) -> None:
    """A callback on the loop, again every 50 ms: the stall, once asked for."""
    loop = asyncio.get_running_loop()
    if not path.exists():
        loop.call_later(0.05, _poll, path)
        return
    what = path.read_text().strip()
    path.unlink()
    log.info("stallnode: blocking the event loop for %s s", what)
    began = time.monotonic()
    time.sleep(1e6 if what == "forever" else float(what))
    log.info("stallnode: the loop runs again after %.1f s", time.monotonic() - began)
    loop.call_later(0.05, _poll, path)


def run() -> int:
    heartbeat.TTL, heartbeat.INTERVAL, heartbeat.WEDGED = TTL, INTERVAL, WEDGED
    started = heartbeat.Heartbeat.start

    async def start(self: heartbeat.Heartbeat) -> None:
        await started(self)
        _poll(Path(os.environ["XMPPD_STALL_FILE"]))

    heartbeat.Heartbeat.start = start  # type: ignore[method-assign]
    return main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(run())
