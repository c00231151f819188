"""`xmppd -c FILE`: run one node in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import sys
from pathlib import Path

import uvloop

from xmppd import package_version
from xmppd.config import CONFIG_ENV, SYSTEM_CONFIG, ConfigError, find_config, load_config
from xmppd.server import StartupError, serve
from xmppd.storage.base import StorageError
from xmppd.tls import TLSError

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _tune_malloc() -> None:
    """Serve large allocations from their own mappings (glibc only).

    uvloop gives every TLS connection a 256 KiB receive buffer of which only a
    few pages are ever touched; from a fixed 128 KiB threshold such buffers get
    their own mapping, so only touched pages are resident (measured: 57.5 ->
    40.1 KB per idle connection, docs/bench.md). Same as MALLOC_MMAP_THRESHOLD_.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xmppd", description="Run an xmppd node.")
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        help=f"YAML config file (default: ${CONFIG_ENV}, else {SYSTEM_CONFIG})",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    args = parser.parse_args(argv)
    path = args.config
    if path is None:
        try:
            path, why = find_config()
        except ConfigError as exc:
            print(f"xmppd: {exc}", file=sys.stderr)
            return 1
        print(f"xmppd: {why}", file=sys.stderr)
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        print("xmppd: the configuration has errors; not starting", file=sys.stderr)
        return 1
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    _tune_malloc()
    try:
        # uvloop: its TLS transport keeps a small buffer per connection (see docs/architecture.md).
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(config))
    except (StartupError, TLSError, StorageError) as exc:
        print(f"xmppd: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"xmppd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
