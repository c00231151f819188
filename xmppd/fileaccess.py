"""Who may read and write what the server keeps on disk.

The item store holds every account's SCRAM keys, the blob store offline
messages and vCards: readable by other local users, they would leak both. And
a file root makes in a folder the service user owns is one the server then
cannot write, which fails later, far from the cause."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

PRIVATE_UMASK = 0o027
"""No write for the group, nothing for others: what the entry points set, so every
file and folder made after it (stores, WAL files, blobs, logs) is private."""


def restrict_umask() -> None:
    """Set PRIVATE_UMASK for this process (and the workers it starts), keeping a
    stricter one the operator set."""
    os.umask(os.umask(PRIVATE_UMASK) | PRIVATE_UMASK)


def root_on_foreign_dir(data_dir: Path) -> str | None:
    """Why root must not work in `data_dir` (it belongs to another user), or None.

    None too when data_dir does not exist yet: the server makes it at first start."""
    if os.geteuid() != 0:
        return None
    try:
        owner = data_dir.stat().st_uid
    except FileNotFoundError:
        return None
    if owner == 0:
        return None
    try:
        name = pwd.getpwuid(owner).pw_name
    except KeyError:
        name = str(owner)
    return (
        f"data_dir {data_dir} belongs to {name}, and this runs as root: files made here "
        f"would belong to root and the server could not write them; "
        f"run it as that user (sudo -u {name} xmppctl ...)"
    )


def open_to_others(data_dir: Path) -> bool:
    """Can users other than the owner's group read data_dir (made by an older version,
    or by hand)?"""
    try:
        return bool(data_dir.stat().st_mode & 0o007)
    except FileNotFoundError:
        return False
