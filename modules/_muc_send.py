"""A room's output, sent a slice at a time and in the room's one order.

A join into a room of 1,000 occupants is some 2,000 presences (the newcomer
gets every occupant's, every occupant gets the newcomer's); a message, a
leave, a nick change or a configuration change is 1,000 or more. Routed in
one go they hold the event loop for 100 ms or more each, and a burst of
joins for seconds: every other stream on the node waits, and so did the
cluster heartbeat, until the node was taken for dead (docs/bench.md, "One
room, 1,000 occupants"). So a room's output is routed `SLICE` stanzas at a
time, the loop let run between slices (`asyncio.sleep(0)`), as the pubsub
fan-out does (modules/_pubsub_fanout.py, FAN_OUT_BATCH).

The order must hold: each occupant gets a room's stanzas in the order the
room produced them, and every occupant the same order of messages. So each
room has one outbox: while a transition's output is still being sent, the
output of the next one waits behind it, whole, and is sent after. Output
that fits in one slice and finds the outbox empty is routed at once, as
before (no task, no delay), which is every transition of a small room.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from xmppd.modulehost import ModuleHost
from xmppd.modules._muc_room import Out, materialize
from xmppd.xml import ns

log = logging.getLogger(__name__)

SLICE = 256
"""Stanzas routed between two turns of the event loop (pubsub's FAN_OUT_BATCH)."""
MAX_BACKLOG = 100_000
"""Stanzas a room may have waiting before it refuses what would add a fan-out
(`Outbox.busy`): occupants' rate limits are each their own, and a thousand of them
at their bursts would queue millions of copies."""


class Outbox:
    """Per room JID: the outputs waiting to be routed, oldest first."""

    def __init__(self, host: ModuleHost) -> None:
        self.host = host
        self._waiting: dict[str, deque[Out]] = {}
        self._senders: dict[str, asyncio.Future[None]] = {}
        self._backlog: dict[str, int] = {}  # room JID -> stanzas in its waiting outputs
        self.slices = 0  # slices routed after a turn of the loop (tests and bench count them)

    def send(self, room_jid: str, out: Out) -> None:
        """Route `out` after everything the room sent before it."""
        if not out:
            return
        waiting = self._waiting.get(room_jid)
        if waiting is not None:
            waiting.append(out)
            self._backlog[room_jid] += len(out)
            return
        self._route(out[:SLICE])
        if len(out) <= SLICE:
            return
        waiting = deque([out[SLICE:]])
        self._waiting[room_jid] = waiting
        self._backlog[room_jid] = len(out) - SLICE
        # Nobody's work: it routes what every occupant sends after this.
        self._senders[room_jid] = self.host.spawn_shared(self._drain(room_jid, waiting))

    def busy(self, room_jid: str) -> bool:
        """Has the room more waiting than MAX_BACKLOG? (Then it takes nothing that
        fans out until its outbox drains: backpressure, not a growing queue.)"""
        return self._backlog.get(room_jid, 0) > MAX_BACKLOG

    async def sent(self, room_jid: str) -> None:
        """Return once what the room has sent so far is routed (a hand-over waits for it:
        the room's next owner must not overtake it)."""
        while (sender := self._senders.get(room_jid)) is not None:
            await asyncio.gather(sender, return_exceptions=True)

    async def all_sent(self) -> None:
        while self._senders:
            await asyncio.gather(*self._senders.values(), return_exceptions=True)

    async def _drain(self, room_jid: str, waiting: deque[Out]) -> None:
        try:
            while waiting:
                out = waiting[0]
                for start in range(0, len(out), SLICE):
                    await asyncio.sleep(0)
                    self.slices += 1
                    chunk = out[start:start + SLICE]
                    self._route(chunk)
                    self._backlog[room_jid] -= len(chunk)
                waiting.popleft()
        finally:
            del self._waiting[room_jid]
            del self._senders[room_jid]
            del self._backlog[room_jid]

    def _route(self, out: Out) -> None:
        ledger = self.host.ledger
        for sent in out:
            try:
                stanza = materialize(sent)
                if stanza.tag == ns.C_MESSAGE and stanza.get("type") != "error":
                    ledger.from_service += 1  # made here: fan-out, subject, relayed PM
                self.host.route(stanza)
            except Exception:  # one stanza's bug must not stop the room's outbox
                log.exception("muc: routing a stanza failed")
