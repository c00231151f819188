"""Where the configuration file is, found without loading it (xmppd.config loads it).

Apart from xmppd.config because `xmppd` reads the file's `allocator` before it
imports the server (xmppd.cli.server says why), and loading the configuration
needs pydantic, half a second of imports.
"""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_ENV = "XMPPD_CONFIG"
SYSTEM_CONFIG = Path("/etc/xmppd/xmppd.yml")


def locate() -> tuple[Path, str] | None:
    """The file to use without -c: $XMPPD_CONFIG, else /etc/xmppd/xmppd.yml, with a
    line saying where it came from; None when neither is there."""
    named = os.environ.get(CONFIG_ENV)
    if named:  # load_config reports it if it cannot be read
        return Path(named), f"using the configuration {named} (from ${CONFIG_ENV})"
    if SYSTEM_CONFIG.is_file():
        return SYSTEM_CONFIG, f"using the configuration {SYSTEM_CONFIG}"
    return None


def not_found() -> str:
    """What to say when `locate` finds nothing: how to name a file."""
    return f"no configuration file: give -c FILE, set ${CONFIG_ENV}, or create {SYSTEM_CONFIG}"
