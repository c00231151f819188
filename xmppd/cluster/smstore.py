"""Stream management state in Redis, so that any node can resume a session (XEP-0198).

Per resumable session (its SM id):
  xmppd:sm:<id>   hash: node (the owner), bare, jid, sid (the session's id on its
                  node, Entry.sid), handled, sent, max, presence, state (the
                  session's shared state, JSON: carbons on, active privacy list...)
  xmppd:smq:<id>  list: the unacknowledged stanzas to the client, oldest first
  xmppd:smgone:<id>  string, for GONE_TTL once the session ended for good: a digest
                  of its account and its h, so that any node answers a late
                  <resume/> with h (the digest: no JID stays behind a removal)

Writes are batched, as the cluster writer batches its own (xmppd.cluster.writer):
a session whose state changed is marked dirty and returns at once; one task
sends every dirty session's change as one pipeline, and what changes while
that round trip is on its way goes in the next. So steady chat costs one
round trip per burst, not per stanza, and the window in which Redis lags the
node is one pipeline round trip plus what waits for it (docs/cluster.md,
"Stream management": what that window can lose or repeat, and its measure).

Only the owner writes: the SAVE script refuses a node that is not the owner
any more (another node resumed the session), and CLAIM, which hands the
record to the node that resumes it, is atomic with reading it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from xmppd.cluster import schema
from xmppd.cluster.tasks import cancel_for_sure

log = logging.getLogger(__name__)

PREFIX = "xmppd:sm:"
QUEUE_PREFIX = "xmppd:smq:"
TTL_SLACK = 60.0
"""Seconds a record outlives its resume timeout past its last write, unless the store is
given more: the owner's module gives enough for its refresh period, a dead owner's reap
and two orphan sweeps, so that the sweep, not the TTL, ends a dead node's session."""
RETRY_DELAY = 0.5
RETRY_MAX = 5.0
"""The longest wait between two tries while Redis fails: each failure doubles the wait
from RETRY_DELAY, since every try rebuilds the batch of every session written whole."""
SWEEP_PAGE = 500
"""Records looked at per SCAN page and per pipeline by an orphan sweep."""
REDIS_WAIT = 5.0
"""Seconds a claim, a batch of writes or a step of a sweep waits for Redis: a hung Redis
(no error, no answer) fails them then, as an unreachable one does."""
GONE_PREFIX = "xmppd:smgone:"
GONE_TTL = 3600
"""Seconds a session that ended for good is remembered with its h: a client that comes
back later with <resume/>, on any node, learns what the server had of its stanzas."""
FENCE_PREFIX = "xmppd:smfence:"
FENCE_TTL = 3600
"""Seconds a claim's fence outlives it: longer than Redis takes to run what it had queued
once it answers again."""

SAVE = """
-- KEYS hash, list; ARGV node, bare, jid, handled, sent, max, presence, ttl, reset, trim,
-- sid, the 'sent' the record must hold for an incremental write, state, stanzas to
-- append...
local owner = redis.call('HGET', KEYS[1], 'node')
if owner and owner ~= ARGV[1] then return 0 end
if ARGV[9] ~= '1' and redis.call('HGET', KEYS[1], 'sent') ~= ARGV[12] then return 2 end
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'bare', ARGV[2], 'jid', ARGV[3],
           'handled', ARGV[4], 'sent', ARGV[5], 'max', ARGV[6], 'presence', ARGV[7],
           'sid', ARGV[11], 'state', ARGV[13])
if ARGV[9] == '1' then redis.call('DEL', KEYS[2]) end
local trim = tonumber(ARGV[10])
if trim > 0 then redis.call('LTRIM', KEYS[2], trim, -1) end
for i = 14, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
redis.call('EXPIRE', KEYS[1], ARGV[8])
redis.call('EXPIRE', KEYS[2], ARGV[8])
return 1
"""
"""Write a session's change, unless another node owns it now (0: this node lost it). An
incremental change (trim, append) applies only to the record it was computed against:
if Redis lost it (restarted empty, failed over to a replica that lagged) or holds
another count, 2, and the node writes the session whole instead of rebuilding a queue
that misses what was unacknowledged before."""

CLAIM = """
-- KEYS hash, list, fence; ARGV node, bare, fence ttl
if redis.call('EXISTS', KEYS[3]) == 1 then return false end
local previous = redis.call('HGET', KEYS[1], 'node')
redis.call('SET', KEYS[3], 'ran:' .. (previous or ''), 'EX', ARGV[3])
local bare = redis.call('HGET', KEYS[1], 'bare')
if bare ~= ARGV[2] then return false end
redis.call('HSET', KEYS[1], 'node', ARGV[1])
return {previous, redis.call('HGETALL', KEYS[1]), redis.call('LRANGE', KEYS[2], 0, -1)}
"""
"""Take a session over for a node resuming it, if it is the account's; its state.
Nothing if the claim's fence says SETTLE ran first (the node gave up waiting for it)."""

SETTLE = """
-- KEYS fence, hash, list; ARGV node, fence ttl
local fence = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], 'settled', 'EX', ARGV[2])
if not fence or fence == 'settled' then return false end
if redis.call('HGET', KEYS[2], 'node') ~= ARGV[1] then return false end
return {fence, redis.call('HGETALL', KEYS[2]), redis.call('LRANGE', KEYS[3], 0, -1)}
"""
"""After a claim that timed out: make sure it never runs from now on, and if it ran and
the record is still this node's, its state and the fence ('ran:' and the node a claim
took it from, 'gone:' and the dead node a sweep took it from), for the node to end it: it
holds nothing of it. Only reads the record: run again, it answers the same."""

DROP = """
-- KEYS hash, list, gone; ARGV node, h ('': the record's), gone ttl
if redis.call('HGET', KEYS[1], 'node') == ARGV[1] then
  local h = ARGV[2]
  if h == '' then h = redis.call('HGET', KEYS[1], 'handled') or '' end
  local bare = redis.call('HGET', KEYS[1], 'bare') or ''
  redis.call('DEL', KEYS[1], KEYS[2])
  if h ~= '' and bare ~= '' then
    redis.call('SET', KEYS[3], redis.sha1hex(bare) .. ' ' .. h, 'EX', ARGV[3])
  end
end
return false
"""
"""Forget a session that ended for good, unless another node owns it now, and remember
its account and h for a late <resume/> (GONE_TTL)."""


ORPHAN = """
-- KEYS hash, list, fence; ARGV now, the nodes set, node, fence ttl, slack
local owner = redis.call('HGET', KEYS[1], 'node')
if not owner then return false end
if redis.call('SISMEMBER', ARGV[2], owner) == 1 then
  redis.call('HDEL', KEYS[1], 'orphaned')
  return false
end
local since = redis.call('HGET', KEYS[1], 'orphaned')
local max = tonumber(redis.call('HGET', KEYS[1], 'max') or '0')
if not since then
  redis.call('HSET', KEYS[1], 'orphaned', ARGV[1])
  local ttl = math.ceil(max + tonumber(ARGV[5]))
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
  return false
end
if tonumber(ARGV[1]) - tonumber(since) < max then return false end
if redis.call('EXISTS', KEYS[3]) == 1 then return false end
redis.call('SET', KEYS[3], 'gone:' .. owner, 'EX', ARGV[4])
local queue = redis.call('LRANGE', KEYS[2], 0, -1)
local jid = redis.call('HGET', KEYS[1], 'jid')
local presence = redis.call('HGET', KEYS[1], 'presence') or ''
redis.call('HSET', KEYS[1], 'node', ARGV[3])
redis.call('HDEL', KEYS[1], 'orphaned')
return {jid, queue, presence, owner}
"""
"""A session whose node is gone (stopped, or reaped after its heartbeat stopped: no
longer in the nodes set, so no replica routes to it any more) and that nobody resumed
in its resume timeout, counted from when a sweep first saw it so (which gives the
record that long and the slack again to live: nobody refreshes it now): taken (made the
sweeping node's, which drops it) for that node to route its queue and announce it gone
if it was available (its last presence; its owner); nil while its node is a member or
time is left, or if the fence says SETTLE ran first (the sweep gave up waiting)."""


@dataclass(slots=True)
class Change:
    """What one session's SAVE writes (made by the module when the batch leaves)."""

    bare: str
    jid: str
    sid: str  # the session's id on this node (Entry.sid): a takeover ends that one only
    handled: int
    sent: int
    max: float
    presence: bytes
    state: bytes  # the shared session state (ModuleHost.shared_state), JSON
    reset: bool
    trim: int
    append: list[bytes]
    expect: int  # not `reset`: the `sent` of the write this one follows


@dataclass(slots=True)
class Claimed:
    """A session's state as read when a node took it over."""

    previous: str  # the node that owned it
    jid: str
    sid: str  # the session's id on that node ("" if it wrote none)
    handled: int
    sent: int
    max: float
    presence: bytes
    state: bytes  # JSON; empty from a node older than the field
    queue: list[bytes]


@dataclass(slots=True)
class Orphan:
    """A session of a dead node that nobody resumed in time, taken over in Redis by the
    sweeping node (which drops its record)."""

    id: str
    jid: str
    queue: list[bytes]  # the unacknowledged stanzas to the client
    presence: bytes  # its last broadcast presence; empty: it was not available
    node: str  # the node it was on


def _claimed(previous: bytes | None, flat: list[bytes], queue: list[bytes]) -> Claimed:
    """A record as CLAIM or SETTLE read it."""
    fields = {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}
    return Claimed(
        previous=previous.decode() if previous else "",
        jid=fields["jid"].decode(),
        sid=fields.get("sid", b"").decode(),
        handled=int(fields["handled"]),
        sent=int(fields["sent"]),
        max=float(fields["max"]),
        presence=fields.get("presence", b""),
        state=fields.get("state", b""),
        queue=list(queue),
    )


class SMStore:
    def __init__(self, redis: Redis, node: str, ttl_slack: float = TTL_SLACK) -> None:
        self.redis = redis
        self.node = node
        self.ttl_slack = ttl_slack
        self._save = redis.register_script(SAVE)
        self._claim = redis.register_script(CLAIM)
        self._drop = redis.register_script(DROP)
        self._orphan = redis.register_script(ORPHAN)
        self._settle = redis.register_script(SETTLE)
        # Claims that timed out, fence -> SM id: they may still run in Redis, leaving
        # the record this node's while it holds nothing of it (see `settle`).
        self.uncertain: dict[str, str] = {}
        # id -> makes the session's change when the batch leaves (True: all of it, not
        # only what changed since the last write); None: drop the record.
        self._dirty: dict[str, Callable[[bool], Change] | None] = {}
        self._full: set[str] = set()  # ids whose last batch failed: written whole next
        self._gone_h: dict[str, int] = {}  # ids to drop -> the h they ended with
        self._lost: Callable[[str], None] = lambda _id: None
        self._written: Callable[[str, int], None] = lambda _id, _sent: None
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.lag = 0.0  # seconds the last batch took, from its first change to Redis' answer
        self.max_lag = 0.0
        self._first_dirty = 0.0

    def start(
        self, lost: Callable[[str], None],
        written: Callable[[str, int], None] = lambda _id, _sent: None,
    ) -> None:
        """`lost(id)` is called when a write finds another node owns that session now;
        `written(id, sent)` when Redis has its state up to `sent` stanzas sent (a batch
        built is not a batch stored: only this says what a takeover will find)."""
        self._lost = lost
        self._written = written
        self._task = asyncio.create_task(self._run(), name="sm-store")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_for_sure(self._task)
            self._task = None

    def dirty(self, sm_id: str, change: Callable[[bool], Change]) -> None:
        """Write this session's state with the next batch (never waits)."""
        self._gone_h.pop(sm_id, None)
        if not self._dirty:
            self._first_dirty = time.monotonic()
        self._dirty[sm_id] = change
        self._idle.clear()
        self._wake.set()

    def drop(self, sm_id: str, handled: int | None = None) -> None:
        """Forget the session's record with the next batch (it ended for good here), and
        remember its h (`handled`; None: the record's) for a late <resume/>."""
        if handled is not None:
            self._gone_h[sm_id] = handled
        if not self._dirty:
            self._first_dirty = time.monotonic()
        self._dirty[sm_id] = None
        self._idle.clear()
        self._wake.set()

    async def gone(self, sm_id: str, bare: str) -> int | None:
        """The h of `bare`'s session `sm_id` if it ended for good (DROP) and Redis still
        remembers it; None for another account's. Waits REDIS_WAIT seconds at most."""
        async with asyncio.timeout(REDIS_WAIT):
            raw = await self.redis.get(GONE_PREFIX + sm_id)
        if raw is None:
            return None
        digest, _, h = (raw.decode() if isinstance(raw, bytes) else str(raw)).partition(" ")
        if digest != hashlib.sha1(bare.encode()).hexdigest() or not h.isdigit():
            return None
        return int(h)

    async def flush(self) -> None:
        """Wait until every change made so far is in Redis (drain, shutdown, tests)."""
        while not self._idle.is_set():
            await self._idle.wait()

    async def claim(self, sm_id: str, bare: str) -> Claimed | None:
        """Take the session over for this node, if it exists and is `bare`'s.
        TimeoutError after REDIS_WAIT seconds; the claim is then uncertain (`settle`)."""
        fence = FENCE_PREFIX + secrets.token_urlsafe(12)
        try:
            async with asyncio.timeout(REDIS_WAIT):
                answer = await self._claim(
                    keys=[PREFIX + sm_id, QUEUE_PREFIX + sm_id, fence],
                    args=[self.node, bare, FENCE_TTL],
                )
        except BaseException:
            # Sent, perhaps, and run or not: an error says as little as a timeout.
            self.uncertain[fence] = sm_id
            raise
        if not answer:
            return None
        return _claimed(*answer)

    async def settle(
        self, held: Callable[[str], bool], busy: Callable[[str], bool]
    ) -> list[tuple[str, Claimed, bool]]:
        """Settle the uncertain claims, but those of ids `busy` (claimed again right now:
        left for later): each either never runs from now on, or ran; of
        those that ran, the records still this node's and not `held` here are returned
        (their queue is for the node to route, their record for it to drop), each with
        True if a sweep took it from a dead node (False: a claim, `previous` may live). Raises
        (RedisError, OSError, TimeoutError) if Redis does not answer: the rest waits."""
        settled: list[tuple[str, Claimed, bool]] = []
        # Each is settled even if held: a claim run later could take the record from
        # whichever node has it then.
        for fence, sm_id in list(self.uncertain.items()):
            if busy(sm_id):
                continue
            async with asyncio.timeout(REDIS_WAIT):
                answer = await self._settle(
                    keys=[fence, PREFIX + sm_id, QUEUE_PREFIX + sm_id],
                    args=[self.node, FENCE_TTL],
                )
            del self.uncertain[fence]
            if answer and not held(sm_id):
                fence_value, flat, queue = answer
                kind, _, previous = fence_value.partition(b":")
                settled.append((sm_id, _claimed(previous, flat, queue), kind == b"gone"))
        return settled

    async def orphans(self) -> list[Orphan]:
        """The sessions of dead nodes whose time is up, made this node's in Redis, for
        it to end and drop (a SCAN of every record: one sweep). TimeoutError if a step
        waits REDIS_WAIT seconds for Redis."""
        found: list[Orphan] = []
        now = str(int(time.time()))
        cursor: int = 0
        while True:
            async with asyncio.timeout(REDIS_WAIT):
                cursor, keys = await self.redis.scan(cursor, match=PREFIX + "*",
                                                     count=SWEEP_PAGE)
            if keys:
                found.extend(await self._orphan_page(
                    [(key if isinstance(key, str) else key.decode())[len(PREFIX):]
                     for key in keys], now
                ))
            if not cursor:
                return found

    async def _orphan_page(self, ids: list[str], now: str) -> list[Orphan]:
        """One pipeline of ORPHAN for a page of ids. TimeoutError after REDIS_WAIT
        seconds; each of the page is then uncertain, as a claim (`settle`)."""
        fence = FENCE_PREFIX + secrets.token_urlsafe(12) + ":"
        async with self.redis.pipeline(transaction=False) as pipe:
            for sm_id in ids:
                await self._orphan(
                    keys=[PREFIX + sm_id, QUEUE_PREFIX + sm_id, fence + sm_id],
                    args=[now, schema.NODES, self.node, FENCE_TTL, self.ttl_slack],
                    client=pipe,
                )
            try:
                async with asyncio.timeout(REDIS_WAIT):
                    answers: list[Any] = await pipe.execute(raise_on_error=False)
            except BaseException:
                self.uncertain.update((fence + sm_id, sm_id) for sm_id in ids)
                raise
        return [
            Orphan(sm_id, answer[0].decode(), list(answer[1]), answer[2], answer[3].decode())
            for sm_id, answer in zip(ids, answers, strict=True)
            if answer and not isinstance(answer, Exception)
        ]

    async def _run(self) -> None:
        delay = 0.0  # while Redis fails: the wait before the next try
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._dirty:
                if delay:
                    await asyncio.sleep(delay)
                    if not await self._answers():
                        delay = min(delay * 2, RETRY_MAX)
                        continue
                started = self._first_dirty
                batch, self._dirty = self._dirty, {}
                try:
                    results = await self._send(batch)
                except (RedisError, OSError) as exc:
                    if not delay:
                        log.error("sm: writing to Redis failed (%s); retrying", exc)
                    self._again(batch)
                    delay = min(delay * 2 or RETRY_DELAY, RETRY_MAX)
                    continue
                refused = self._settle_batch(batch, results)
                if refused:
                    self._again(refused)
                    delay = min(delay * 2 or RETRY_DELAY, RETRY_MAX)
                    continue
                delay = 0.0
                self.batches += 1
                self.lag = time.monotonic() - started
                self.max_lag = max(self.max_lag, self.lag)
                if self._dirty:
                    self._first_dirty = time.monotonic()
            self._idle.set()

    def _again(self, batch: dict[str, Callable[[bool], Change] | None]) -> None:
        """Put writes that did not land back in front of what changed meanwhile; a change
        made meanwhile supersedes the one retried (it is built anew), and each is written
        whole, since Redis may have any part of the last."""
        self._full.update(batch)
        self._dirty = {**batch, **self._dirty}

    def _settle_batch(
        self,
        batch: dict[str, Callable[[bool], Change] | None],
        results: list[tuple[Change | None, object]],
    ) -> dict[str, Callable[[bool], Change] | None]:
        """Act on each write's answer; the writes to try again (an error reply such as
        OOM or READONLY is no write, and a record that is not the one an incremental
        write expects, 2, is written whole)."""
        refused: dict[str, Callable[[bool], Change] | None] = {}
        for (sm_id, make), (change, result) in zip(batch.items(), results, strict=True):
            if isinstance(result, Exception):
                log.error("sm: a write to Redis was refused: %s; retrying", result)
                refused[sm_id] = make
            elif result == 2:
                log.warning("sm: %s: Redis lost the record's last state; written whole", sm_id)
                refused[sm_id] = make
            else:
                self._full.discard(sm_id)
                if make is None:
                    self._gone_h.pop(sm_id, None)
                if result == 0:
                    self._lost(sm_id)
                elif change is not None:
                    self._written(sm_id, change.sent)
        return refused

    async def _answers(self) -> bool:
        """Whether Redis answers again (a PING), before a failed batch is built anew."""
        try:
            async with asyncio.timeout(REDIS_WAIT):
                await self.redis.ping()
        except (RedisError, OSError):
            return False
        return True

    async def _send(
        self, batch: dict[str, Callable[[bool], Change] | None]
    ) -> list[tuple[Change | None, object]]:
        changes: list[Change | None] = []
        async with self.redis.pipeline(transaction=False) as pipe:
            for sm_id, make in batch.items():
                keys = [PREFIX + sm_id, QUEUE_PREFIX + sm_id]
                if make is None:
                    changes.append(None)
                    handled = self._gone_h.get(sm_id)
                    await self._drop(
                        keys=[*keys, GONE_PREFIX + sm_id],
                        args=[self.node, "" if handled is None else handled, GONE_TTL],
                        client=pipe,
                    )
                    continue
                change = make(sm_id in self._full)
                changes.append(change)
                await self._save(
                    keys=keys,
                    args=[
                        self.node, change.bare, change.jid, change.handled, change.sent,
                        change.max, change.presence, int(change.max + self.ttl_slack),
                        "1" if change.reset else "0", change.trim, change.sid,
                        change.expect, change.state, *change.append,
                    ],
                    client=pipe,
                )
            # A batch that times out is retried whole, as one that failed (`_run`).
            async with asyncio.timeout(REDIS_WAIT):
                results: list[object] = await pipe.execute(raise_on_error=False)
        return list(zip(changes, results, strict=True))
