"""`xmppd -c FILE`: run one node in the foreground; with `--workers N`, N of them."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import uvloop

from xmppd import package_version
from xmppd.cli import allocator, workers
from xmppd.config import (
    CONFIG_ENV,
    SYSTEM_CONFIG,
    Config,
    ConfigError,
    find_config,
    load_config,
)
from xmppd.logs import LogOutput
from xmppd.server import StartupError, serve
from xmppd.storage.base import StorageError
from xmppd.tls import TLSError

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
log = logging.getLogger("xmppd")


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


def _worker_loader(path: Path, index: int, node: str) -> Callable[[], Config]:
    """How a worker reads the file again on reload: as its own config (node name, port)."""
    return lambda: workers.worker_config(load_config(path), index, node)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xmppd", description="Run an xmppd node.")
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        help=f"YAML config file (default: ${CONFIG_ENV}, else {SYSTEM_CONFIG})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        default=None,
        help="run N processes sharing the listening ports, each a node of the cluster "
        "(needs a cluster section; docs/cluster.md)",
    )
    # How the --workers parent starts each worker (xmppd.cli.workers); not for operators.
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--node-name", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    args = parser.parse_args(argv)
    path = args.config
    if path is None:
        try:
            path, why = find_config()
        except ConfigError as exc:
            print(f"xmppd: {exc}", file=sys.stderr)
            return 1
        if not os.environ.get(allocator.REEXEC_MARK):  # said once, not again after the re-exec
            print(f"xmppd: {why}", file=sys.stderr)
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        print("xmppd: the configuration has errors; not starting", file=sys.stderr)
        return 1
    if args.workers is not None:
        problems = workers.worker_problems(config, args.workers)
        if problems:
            print("\n".join(problems), file=sys.stderr)
            print("xmppd: the configuration has errors; not starting", file=sys.stderr)
            return 1
    malloc = "jemalloc" if allocator.preloaded() else "the C library's malloc"
    if argv is None:
        # Run as the program. A caller passing its own arguments (a wrapper, a test)
        # keeps the process it started.
        try:
            malloc = allocator.choose(config.allocator, config.source.where(("allocator",)))
        except allocator.AllocatorError as exc:
            print(f"xmppd: {exc}", file=sys.stderr)
            return 1
    node = None
    load = None
    if args.worker is not None and args.node_name is not None and config.cluster is not None:
        workers.die_with_parent()
        node = args.node_name
        config = workers.worker_config(config, args.worker, node)
        load = _worker_loader(path, args.worker, node)

    try:
        log_output = LogOutput(config, node)
    except OSError as exc:
        print(f"xmppd: cannot open the log file {config.log.file}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    log.info("memory allocator: %s", malloc)
    if args.workers is not None:
        try:
            return asyncio.run(workers.Supervisor(path, config, args.workers, log_output).run())
        except KeyboardInterrupt:
            return 0
    _tune_malloc()
    is_worker = args.worker is not None
    try:
        # uvloop: its TLS transport keeps a small buffer per connection (see docs/architecture.md).
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(
                serve(
                    config,
                    reuse_port=is_worker,
                    on_ready=workers.announce_ready if is_worker else None,
                    load=load,
                    log_output=log_output,
                )
            )
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
