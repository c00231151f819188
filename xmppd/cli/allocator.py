"""The C allocator of the server process: jemalloc when it is installed.

Why: besides Python's own small-object allocator, a routed message
allocates through the C library (libxml2's nodes and strings as the stanza
is parsed, copied and serialised, OpenSSL's record buffers, every bytes
object over 512 bytes), and glibc's malloc and free are about a tenth of a
message's CPU (docs/bench.md, "Profile"). jemalloc does that work for less
CPU and keeps less memory per connection (docs/bench.md, "jemalloc as the
process's malloc"). Synapse's launcher preloads it the same way.

A process's malloc is fixed when the dynamic linker starts it, so the
server starts itself again, once, with the library in LD_PRELOAD: the same
process (exec keeps the pid, what a service manager watches), the same
command line. The workers of `--workers` inherit the environment.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

import yaml

JEMALLOC = "jemalloc"
REEXEC_MARK = "XMPPD_ALLOCATOR_REEXEC"
"""In the environment of the second start: a preload that did not take (a
set-user-id binary, a library that fails to load) must not loop."""
MISSING = "libjemalloc is not installed (Debian: apt install libjemalloc2)"


class AllocatorError(Exception):
    """`allocator: jemalloc` asked for what this process cannot have."""


def preloaded(name: str = JEMALLOC) -> bool:
    """True if a library whose file name starts with lib`name` is mapped in this process."""
    prefix = f"lib{name}."
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return any(
        line.rsplit("/", 1)[-1].startswith(prefix) for line in maps.splitlines() if "/" in line
    )


def installed() -> str | None:
    """The name the dynamic linker knows jemalloc by (libjemalloc.so.2), if installed
    on a system where LD_PRELOAD can load it (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.util.find_library(JEMALLOC)


def configured(path: Path) -> tuple[str, str]:
    """The `allocator` of the file at `path` and where it is written (FILE:LINE), read
    before the configuration is loaded (xmppd.cli.server says why): "auto" if the
    file has none, or cannot be read (loading it then reports why)."""
    try:
        root = yaml.compose(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return "auto", str(path)
    if isinstance(root, yaml.MappingNode):
        for key, value in root.value:
            if key.value == "allocator" and isinstance(value, yaml.ScalarNode):
                return str(value.value), f"{path}:{key.start_mark.line + 1}"
    return "auto", str(path)


def choose(setting: str, where: str) -> str:
    """Make the process run on the allocator `setting` asks for ("auto", "jemalloc",
    "system"; another value is left to the configuration's check, as "auto"),
    starting it again with jemalloc preloaded when that is needed (then this does
    not return). Returns the line for the log: which allocator runs, and why.

    `where` names the setting in the file (FILE:LINE), for the errors.
    """
    if preloaded():
        return "jemalloc" if setting != "system" else "jemalloc (preloaded by LD_PRELOAD)"
    if setting == "system":
        return "the C library's malloc (allocator: system)"
    if os.environ.get(REEXEC_MARK):
        if setting == "jemalloc":
            raise AllocatorError(f"{where}: allocator: jemalloc: preloaded, but it did not load")
        return "the C library's malloc (jemalloc was preloaded but did not load)"
    library = installed()
    if library is None:
        if setting == "jemalloc":
            raise AllocatorError(f"{where}: allocator: jemalloc, but {MISSING} or not on Linux")
        return f"the C library's malloc ({MISSING}: it costs less CPU per message)"
    others = os.environ.get("LD_PRELOAD", "").strip()
    if others and setting != "jemalloc":
        # Someone preloads on purpose (another malloc, a sanitizer that must come first).
        return f"the C library's malloc or what LD_PRELOAD={others} provides (left as set)"
    environment = dict(os.environ)
    environment[REEXEC_MARK] = "1"
    environment["LD_PRELOAD"] = " ".join(filter(None, [library, others]))
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:  # closed by whoever started us (`xmppd ... >&-`)
            stream.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, environment)
    except OSError as exc:
        why = f"cannot start again with jemalloc: {exc}"
        if setting == "jemalloc":
            raise AllocatorError(f"{where}: allocator: jemalloc: {why}") from exc
        return f"the C library's malloc ({why})"
