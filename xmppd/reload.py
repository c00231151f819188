"""What a reload may change: the comparison of the running config with the file's.

A reload (SIGHUP, `xmppctl reload`) reads the configuration file again and
applies it all or not at all (`Server.reload`). What a node set up once at
start cannot change under it: the keys of `FIXED` are refused, each by its
file, line and dotted name like any config error, and then nothing changes.
Everything else is read where it is used (limits, auth, module options), or
is swapped by `Server.reload` (hosts, certificate, log output).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from xmppd.config import Config, Loc, format_loc

FIXED: dict[str, str] = {
    "data_dir": "the stores and the admin token live there",
    "allocator": "the process's malloc is chosen when it starts",
    "listeners": "the client sockets are bound at start",
    "admin": "the admin API is bound at start",
    "storage": "the stores are opened at start",
    "cluster": "the node joins its cluster at start",
    "s2s": "the federation listeners and links are set up at start",
    "components": "the component listeners and domains are set up at start",
}
"""Top-level keys a reload refuses to change, with why."""


@dataclass(slots=True)
class ReloadResult:
    """What a reload did: `changed` names what it applied, `problems` why it applied nothing."""

    reloaded: bool
    changed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """The one log line (and xmppctl answer) of the reload."""
        if not self.reloaded:
            return "reload refused, nothing changed: " + "; ".join(self.problems)
        if not self.changed:
            return "reloaded: nothing changed"
        return "reloaded: changed " + ", ".join(self.changed)


def changed_locs(old: Any, new: Any, loc: Loc = ()) -> list[Loc]:
    """Where two dumped configs differ: the deepest keys or list items (a list whose
    length changed is one place)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[Loc] = []
        for key in list(old) + [k for k in new if k not in old]:
            out.extend(changed_locs(old.get(key), new.get(key), (*loc, key)))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        pairs = enumerate(zip(old, new, strict=True))
        return [d for i, (a, b) in pairs for d in changed_locs(a, b, (*loc, i))]
    return [] if old == new else [loc]


def refused_changes(old: Config, new: Config) -> list[str]:
    """One config-style line per changed key that a running node cannot take."""
    before, after = old.model_dump(), new.model_dump()
    return [
        new.source.problem(loc, f"cannot be changed by a reload ({why}); restart the node")
        for key, why in FIXED.items()
        for loc in changed_locs(before[key], after[key], (key,))
    ]


def describe_changes(old: Config, new: Config) -> list[str]:
    """What changed, for the reload's log line: dotted keys, hosts added and removed."""
    out: list[str] = []
    added = [h for h in new.hosts if h not in old.hosts]
    removed = [h for h in old.hosts if h not in new.hosts]
    if added or removed:
        out.append(f"hosts ({' '.join([f'+{h}' for h in added] + [f'-{h}' for h in removed])})")
    before, after = old.model_dump(), new.model_dump()
    for loc in changed_locs(before, after):
        if loc[0] != "hosts":
            out.append(format_loc(loc))
    return out
