"""The process' open-files limit: every client connection holds one file descriptor.

Most systems start a process with a soft limit of 1024, so without this a
node would fail to accept at about a thousand clients; the hard limit is as
far as an unprivileged process may raise it, and the operator's to set
(systemd's LimitNOFILE=)."""

from __future__ import annotations

import resource
from dataclasses import dataclass

SANE_HARD_LIMIT = 65536
"""Below this hard limit the node logs a warning: it caps the clients of one node."""
RESERVED = 100
"""Descriptors kept for other uses (stores, log, listeners, cluster, admin API)."""


@dataclass(frozen=True, slots=True)
class OpenFiles:
    before: int  # the soft limit the process started with
    soft: int  # the soft limit now
    hard: int

    @property
    def clients(self) -> int:
        """About how many client connections the soft limit allows."""
        return max(self.soft - RESERVED, 0)


def raise_open_files_limit() -> OpenFiles:
    """Raise the soft limit to the hard one (an unlimited hard limit is left as it is
    for the soft one: the kernel refuses RLIM_INFINITY for files)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return OpenFiles(soft, soft, hard)
        return OpenFiles(soft, hard, hard)
    return OpenFiles(soft, soft, hard)
