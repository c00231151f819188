"""Summarize a py-spy profile (`py-spy record --format raw`, folded stacks) as text.

usage: python bench/profile_summary.py PROFILE.folded [TOP]

Prints where the sampled CPU went: the functions with the most samples on
top of the stack ("self") and, for the project's own code and a few
libraries of interest, the share of samples that pass through them
("inclusive"). For native profiles (`py-spy record --native`, which also
samples idle threads) it first drops the samples of idle threads (the
key-derivation pool waiting for work, the loop waiting in epoll) and adds a
breakdown by component of the event loop thread. Folded stacks are the
format flame graph tools read, so the same file can also be rendered with
any of them.
"""

from __future__ import annotations

import re
import sys
from collections import Counter

# Samples of threads waiting for work, not using the CPU (native profiles).
_IDLE = ("PyThread_acquire_lock_timed", "epoll_wait")
# Component of a sample: the deepest frame matching one of these (first match in order).
_COMPONENTS = (
    ("TLS record crypto and handshakes (libssl/libcrypto)", ("libssl", "libcrypto")),
    ("PBKDF2 (password check)", ("pbkdf2", "_salted_password")),
    ("socket syscalls", ("write (libc", "read (libc", "writev (libc", "recv", "send (libc")),
    ("XML serialization (lxml tostring)", ("tostring",)),
    ("XML parsing (libxml2 + SAX target)", ("xmlParse", "parser.py")),
    ("modules (privacy, carbons, ...)", ("modules/",)),
    ("router", ("xmppd/router.py",)),
    ("stream core (c2s)", ("xmppd/stream/",)),
    ("connection (Protocol, flush)", ("xmppd/connection.py",)),
    ("storage", ("storage/",)),
    ("uvloop (loop, sslproto)", ("loop.c", "sslproto", "uvloop")),
)
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> str:
    """'route (/work/main/xmppd/router.py:97)' -> 'xmppd/router.py:route'."""
    match = _FRAME.match(frame)
    if not match:
        return frame
    path = match["file"]
    for marker in ("/site-packages/", "/lib/python3.", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/lib/python3.":
                path = "stdlib/" + path.split("/", 1)[1]
            break
    return f"{path}:{match['func']}"


def _component(raw_frames: list[str]) -> str:
    for raw in reversed(raw_frames):
        for name, markers in _COMPONENTS:
            if any(m in raw for m in markers):
                return name
    return "other (interpreter, libc)"


def summarize(path: str, top: int = 25) -> str:
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    components: Counter[str] = Counter()
    total = idle = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            raw_frames = [fr for fr in stack.split(";") if fr]
            if any(marker in raw_frames[-1] for marker in _IDLE) or any(
                marker in fr for fr in raw_frames[-3:] for marker in _IDLE
            ):
                idle += count
                continue
            frames = [_short(fr) for fr in raw_frames]
            if not frames:
                continue
            if not any("futures/thread.py" in fr for fr in raw_frames):
                components[_component(raw_frames)] += count
            total += count
            self_counts[frames[-1]] += count
            for frame in set(frames):
                inclusive[frame] += count
    if not total:
        return f"{path}: no samples\n"
    out = [f"{path}: {total} busy samples ({idle} idle samples dropped)", ""]
    loop_total = sum(components.values())
    if loop_total:
        out.append(f"event loop thread by component ({loop_total} samples):")
        for name, count in components.most_common():
            out.append(f"  {100 * count / loop_total:5.1f}%  {name}")
        out.append("")
    out.append("self (top of stack):")
    for frame, count in self_counts.most_common(top):
        out.append(f"  {100 * count / total:5.1f}%  {frame}")
    out += ["", "inclusive (project code and TLS/XML/storage entry points):"]
    interesting = (
        "xmppd/",
        "modules/",
        "storage/",
        "ssl.py",
        "lxml",
        "sqlite",
        "hashlib",
        "pbkdf2",
    )
    chosen = [(f, c) for f, c in inclusive.most_common() if any(k in f for k in interesting)]
    for frame, count in chosen[:top]:
        out.append(f"  {100 * count / total:5.1f}%  {frame}")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    sys.stdout.write(summarize(argv[1], int(argv[2]) if len(argv) > 2 else 25))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
