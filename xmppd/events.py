"""Named events with prioritized handlers: how the router and the modules meet.

The router fires an event for each stanza it routes (`message/bare`,
`iq/full`, ...; see xmppd.router) and delivers through handlers registered
here like any module's, only at the lowest priority. A module changes how
a kind of stanza is handled by hooking the same event above that default,
without the router knowing the module, and without the module reaching into
the router. Modelled on Prosody's per-host event objects.

Three kinds of handler, kept apart because the stanza path must not pay for
what it does not use:
- `on` (sync, the result True means "handled": later handlers do not run):
  routing events, run in the router's own call so order is kept;
- `filter` (sync, False drops the stanza): the filters on the stanza path;
- `hook` (async, True means handled): events whose handlers may wait on storage.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

Handler = Callable[..., Any]
AsyncHandler = Callable[..., Awaitable[bool | None]]

HIGHEST = 1000
"""Priority of handlers that must see a stanza before every module does."""
DEFAULT = -1000
"""Priority of the router's own handlers: what happens when no module takes a stanza."""

STANZA_KINDS = ("message", "presence", "iq")
"""The kinds a stanza filter can be limited to (`kind_chain`)."""


def kind_chain(event: str, kind: str) -> str:
    """The event holding the filters of `event` ("stanza/out", "stanza/in") that see
    stanzas of `kind`: a chat message walks only the filters that look at messages.

    Every filter is also in `event` itself, the chain for a stanza of no known kind
    (and the one that lists them all)."""
    return f"{event}/{kind}"


class Events:
    def __init__(self) -> None:
        self._sync: dict[str, list[tuple[int, Handler]]] = {}
        self._async: dict[str, list[tuple[int, AsyncHandler]]] = {}

    # --- registration ------------------------------------------------------------------

    def on(self, event: str, handler: Handler, priority: int = 0) -> None:
        """Run a synchronous `handler` on `event`, higher priority first."""
        _insert(self._sync.setdefault(event, []), priority, handler)

    def hook(self, event: str, handler: AsyncHandler, priority: int = 0) -> None:
        """Run an async `handler` on `event`, higher priority first."""
        _insert(self._async.setdefault(event, []), priority, handler)

    def chain(self, event: str) -> list[tuple[int, Handler]]:
        """The live list of sync handlers of `event`, for a caller on the stanza path
        that keeps it rather than look it up for every stanza."""
        return self._sync.setdefault(event, [])

    def hooked(self, event: str) -> bool:
        """True if an async handler is registered for `event`."""
        return bool(self._async.get(event))

    def entries(self) -> dict[int, tuple[str, str, tuple[int, Any]]]:
        """Every registered handler entry by identity, with its kind ("sync", "async") and
        event: a module host compares two of these to see what one module registered."""
        out: dict[int, tuple[str, str, tuple[int, Any]]] = {}
        for kind, table in (("sync", self._sync), ("async", self._async)):
            for event, handlers in table.items():
                for entry in handlers:
                    out[id(entry)] = (kind, event, entry)
        return out

    def remove(self, kind: str, event: str, entry: tuple[int, Any]) -> None:
        """Take back one entry of `entries()`, in place (callers may hold the list)."""
        table: dict[str, list[tuple[int, Any]]] = self._sync if kind == "sync" else self._async
        handlers = table.get(event)
        if handlers is not None:
            handlers[:] = [h for h in handlers if h is not entry]

    # --- firing ------------------------------------------------------------------------

    def fire(self, event: str, *args: Any) -> bool:
        """Run the sync handlers of `event` in order until one returns True (handled)."""
        for _, handler in self._sync.get(event, ()):
            if handler(*args):
                return True
        return False

    def passes(self, event: str, *args: Any) -> bool:
        """Run the filters of `event` in order; False as soon as one drops the stanza."""
        for _, handler in self._sync.get(event, ()):
            if not handler(*args):
                return False
        return True

    def notify(self, event: str, *args: Any) -> None:
        """Run every sync handler of `event`, each on its own: results are ignored and a
        handler that raises is logged without stopping the others."""
        for _, handler in self._sync.get(event, ()):
            try:
                handler(*args)
            except Exception:
                log.exception("%s handler %r failed", event, handler)

    async def fire_async(self, event: str, *args: Any) -> bool:
        """Run the async handlers of `event` in order; True if one of them handled it.
        A handler that raises is logged and the next one runs."""
        for _, handler in self._async.get(event, ()):
            try:
                if await handler(*args):
                    return True
            except Exception:
                log.exception("hook %s failed in %r", event, handler)
        return False


def _insert(handlers: list[tuple[int, Any]], priority: int, handler: Any) -> None:
    """Keep `handlers` sorted by descending priority, registration order within one,
    in place: callers may hold the list (`Events.chain`)."""
    handlers.append((priority, handler))
    handlers.sort(key=lambda h: -h[0])
