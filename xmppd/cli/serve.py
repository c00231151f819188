"""What `xmppd` runs once its process has its malloc (xmppd.cli.server): the
configuration loaded and checked, then one node in the foreground, or with
`--workers N` the supervisor of N of them."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from xmppd.batchloop import BatchingLoop
from xmppd.cli import workers
from xmppd.config import Config, ConfigError, find_config, load_config
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


def run(args: argparse.Namespace, malloc: str) -> int:
    """Load the configuration `args` name and serve; `malloc` says which malloc this
    process runs on, for the log."""
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
    if args.workers is not None:
        problems = workers.worker_problems(config, args.workers)
        if problems:
            print("\n".join(problems), file=sys.stderr)
            print("xmppd: the configuration has errors; not starting", file=sys.stderr)
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
        # uvloop (see docs/architecture.md), with a batch window (xmppd.batchloop).
        window = config.batch_window_ms / 1000
        log.info("event loop: uvloop, batch window %g ms", config.batch_window_ms)
        with asyncio.Runner(loop_factory=lambda: BatchingLoop(window)) as runner:
            runner.run(
                serve(
                    config,
                    reuse_port=is_worker,
                    on_ready=workers.announce_ready if is_worker else None,
                    load=load,
                    log_output=log_output,
                )
            )
    except ConfigError as exc:  # load_config checked the file; a config made otherwise
        log_output.close()
        print(exc, file=sys.stderr)
        print("xmppd: the configuration has errors; not starting", file=sys.stderr)
        return 1
    except (StartupError, TLSError, StorageError, OSError) as exc:
        log_output.close()  # the log lines before it come first: this is the last word
        print(f"xmppd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0
