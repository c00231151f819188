"""An account's removal waits for the account's work on every node, not only its own.

A removal deletes the account's data after the work its sessions set off is
done (ModuleHost._settle): a vCard write pipelined behind <remove/> would
otherwise land after the deletion, and a new account of the name would find
it. That work runs on the node of the session that sent it; so the removing
node asks every other live node, over the cluster bus, to settle the account
there too (hold its sessions' input, wait for their work), and waits for each
one's answer before the modules delete.

Why the bus, which may lose notices: a node answers or it does not, and the
asker gives up after a bound and logs which nodes did not answer (their late
writes stay until `xmppctl unregister` runs again, as for work that outlives
the local wait). A node that leaves the cluster meanwhile is not waited for.
Every answer also goes to every node; only the asker knows its request id.

Answers travel through Redis: while some are missing, the asker checks each
RECHECK that Redis still answers (`probe`), and gives up at once with
RedisSilent when it does not. A Redis that fails or hangs after the removal
began would otherwise hold it for the whole bound, waiting for answers that
cannot come (nor, maybe, the question reach the other nodes).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable

from xmppd.cluster.bus import Bus, Payload

log = logging.getLogger(__name__)

SETTLE = "account/settle"
SETTLED = "account/settled"
RECHECK = 1.0
"""Seconds between two looks at the live nodes while answers are missing (a node
that died answers never; it leaves the node set within the heartbeat TTL)."""


class RedisSilent(Exception):
    """Redis did not answer while the other nodes' answers were missing: `nodes` (those
    still live and silent) cannot be heard, and may not have been asked."""

    def __init__(self, problem: str, nodes: frozenset[str]) -> None:
        super().__init__(problem)
        self.problem = problem
        self.nodes = nodes


class AccountSettling:
    """The asking side and the answering side, on one node."""

    def __init__(
        self,
        bus: Bus,
        node: Callable[[], str | None],
        settle_here: Callable[[str], Awaitable[None]],
        spawn: Callable[[Awaitable[None]], object],
        probe: Callable[[], Awaitable[str | None]],
    ) -> None:
        self._bus = bus
        self._node = node  # this node's name, once it joined the cluster
        self._settle_here = settle_here
        self._spawn = spawn
        # None when Redis answers a PING in a short bound, else why not (naming it).
        self._probe = probe
        self._waiting: dict[str, tuple[set[str], asyncio.Event]] = {}  # request -> answers
        bus.subscribe(SETTLE, self._asked, lambda: None)
        bus.subscribe(SETTLED, self._answered, lambda: None)

    async def elsewhere(
        self, bare: str, nodes: Callable[[], frozenset[str]], timeout: float
    ) -> frozenset[str]:
        """Ask the other live nodes to settle `bare` and wait, `timeout` at most, for
        those still live to answer; the ones that did not (empty: all did).
        RedisSilent as soon as answers are late and Redis does not answer either."""
        me = self._node()
        asked = nodes() - {me}
        if me is None or not asked:
            return frozenset()
        request = secrets.token_hex(8)
        answered: set[str] = set()
        event = asyncio.Event()
        self._waiting[request] = (answered, event)
        self._bus.publish(SETTLE, {"bare": bare, "request": request, "node": me})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while missing := (asked & nodes()) - answered:
                left = deadline - loop.time()
                if left <= 0:
                    return frozenset(missing)
                event.clear()
                try:
                    await asyncio.wait_for(event.wait(), min(left, RECHECK))
                except TimeoutError:
                    problem = await self._probe()
                    if problem is not None:
                        missing = frozenset((asked & nodes()) - answered)
                        raise RedisSilent(problem, missing) from None
            return frozenset()
        finally:
            del self._waiting[request]

    def _asked(self, payload: Payload) -> None:
        bare, request = payload.get("bare"), payload.get("request")
        if isinstance(bare, str) and isinstance(request, str):
            self._spawn(self._answer(bare, request))

    async def _answer(self, bare: str, request: str) -> None:
        await self._settle_here(bare)
        self._bus.publish(SETTLED, {"request": request, "node": self._node()})

    def _answered(self, payload: Payload) -> None:
        waiting = self._waiting.get(str(payload.get("request")))
        node = payload.get("node")
        if waiting is not None and isinstance(node, str):
            waiting[0].add(node)
            waiting[1].set()
