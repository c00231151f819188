"""`xmppd -c FILE`: run one node in the foreground; with `--workers N`, N of them.

The process's malloc is chosen first (xmppd.cli.allocator), from the file's
`allocator` alone: choosing it may start the process again, and importing
the server takes over a second, which would then be spent twice. So this
module imports nothing heavy; xmppd.cli.serve does the rest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xmppd import package_version
from xmppd.cli import allocator
from xmppd.configfile import CONFIG_ENV, SYSTEM_CONFIG, locate
from xmppd.fileaccess import restrict_umask


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
    restrict_umask()  # before any file: the stores hold every account's keys
    found = locate() if args.config is None else (args.config, "")
    if argv is None and found is not None:
        # Run as the program. A caller passing its own arguments (a wrapper, a test)
        # keeps the process it started.
        try:
            malloc = allocator.choose(*allocator.configured(found[0]))
        except allocator.AllocatorError as exc:
            print(f"xmppd: {exc}", file=sys.stderr)
            return 1
    else:
        malloc = "jemalloc" if allocator.preloaded() else "the C library's malloc"
    from xmppd.cli.serve import run  # after the malloc is chosen: see the docstring

    return run(args, malloc)


if __name__ == "__main__":
    sys.exit(main())
