"""Failed-login accounting: slow, then ban, the addresses that guess passwords.

Password guessing is cheap for an attacker and costly for us (every attempt
is a PBKDF2 run). Failures are counted per source address and per (account,
address) pair, never per account alone: counting per account would let
anyone who knows a JID lock its owner out (issue 10). Instead, as ejabberd's
mod_fail2ban does, the address that fails is slowed (the n-th failure from it
is answered after n x `auth_failure_delay`) and, once it has failed
`auth_failures_before_ban` times, refused without checking the password until
`auth_ban_seconds` have passed since its last failure. An account under
attack from some addresses stays open from every other one. Checks under
way count with the failures (`reserve`), so that guesses sent in parallel
get no more checks than the ban allows.

The counts, and the checks under way, live behind `FailureCounter` so that
a store shared by the nodes of a cluster (Redis) can replace the in-process
one: on a cluster the checks under way must be counted where the failures
are, or each node would let an address run its failures left at once, N
nodes N times as many. Each call is one address key, so the hot path of a
clean login is one lookup per step.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

MAX_TRACKED = 100_000
"""Keys the in-process counter keeps. Past this the oldest are forgotten: many
addresses (an IPv6 attacker) may cost a ban, never unbounded memory."""


@dataclass(frozen=True, slots=True)
class Check:
    """A password check `FailureCounter.take_check` let start, to give back with
    `end_check`. `member` names it in a shared store; None: counted in this process."""

    key: str
    member: str | None = None


class FailureCounter(Protocol):
    """Failure counts per key that expire a fixed time after the key's last failure,
    and the password checks under way per key.

    The only state the throttle keeps; an implementation on a shared store lets
    a client that moves between nodes keep its count, and counts the checks of
    every node against the same failures left.
    """

    recheck_after: float | None
    """Seconds after which an attempt waiting for a check to end judges again; None
    when every check is ended in this process (which wakes the waiting attempts)."""

    async def record_failure(self, key: str, *more: str) -> int:
        """Count one failure for `key` and for each of `more`, restart their expiry,
        return `key`'s new count. One call for all (on a shared store one round trip:
        a failed login counts its address and its address and account together)."""
        ...

    async def failures(self, key: str) -> int:
        """The current count for `key`; 0 when it never failed or has expired."""
        ...

    async def clear(self, key: str) -> None:
        """Forget `key`'s failures."""
        ...

    def set_lifetime(self, lifetime: float) -> None:
        """Failures counted from now on expire `lifetime` seconds after the key's last."""
        ...

    async def take_check(self, key: str, limit: int) -> tuple[int, Check | None]:
        """`key`'s failures, and a check taken for it when its failures plus its checks
        under way stay below `limit`; None when they do not (or it failed `limit`
        times). The test and the taking are one step: two callers cannot both take
        the last check."""
        ...

    async def end_check(self, check: Check) -> None:
        """A check `take_check` gave is over (its failure, if any, counted)."""
        ...


class MemoryFailureCounter:
    """A `FailureCounter` in this process's memory (one node, or per node).

    Every key has the same lifetime, so the dict's order (a key moves to the end
    when it fails) is also the order of expiry: expired keys are dropped from
    the front, a few at a time, without ever scanning the live ones. Checks
    under way are counted per key until ended; they need no expiry, since this
    process ends each one it started.
    """

    recheck_after: float | None = None

    def __init__(
        self,
        lifetime: float,
        clock: Callable[[], float] = time.monotonic,
        max_tracked: int = MAX_TRACKED,
    ) -> None:
        self.lifetime = lifetime
        self.clock = clock
        self.max_tracked = max_tracked
        self._entries: dict[str, tuple[int, float]] = {}  # key -> (count, expires at)
        self._checks: dict[str, int] = {}  # key -> checks under way

    async def record_failure(self, key: str, *more: str) -> int:
        now = self.clock()
        counts = [self._count(each, now) for each in (key, *more)]
        self._drop_expired(now)
        return counts[0]

    def _count(self, key: str, now: float) -> int:
        entry = self._entries.pop(key, None)
        count = entry[0] + 1 if entry is not None and entry[1] > now else 1
        self._entries[key] = (count, now + self.lifetime)
        return count

    async def failures(self, key: str) -> int:
        return self._failures(key)

    def _failures(self, key: str) -> int:
        entry = self._entries.get(key)
        if entry is None:
            return 0
        if entry[1] <= self.clock():
            del self._entries[key]
            return 0
        return entry[0]

    async def clear(self, key: str) -> None:
        self._entries.pop(key, None)

    async def take_check(self, key: str, limit: int) -> tuple[int, Check | None]:
        failures = self._failures(key)
        checking = self._checks.get(key, 0)
        if failures + checking >= limit:
            return failures, None
        self._checks[key] = checking + 1
        return failures, Check(key)

    async def end_check(self, check: Check) -> None:
        left = self._checks[check.key] - 1
        if left:
            self._checks[check.key] = left
        else:
            del self._checks[check.key]

    def set_lifetime(self, lifetime: float) -> None:
        # A shorter lifetime breaks "dict order is expiry order" for a while: a key
        # behind an older one may expire first. Counts stay right (each entry carries
        # its own expiry); only its removal waits until the keys before it expire.
        self.lifetime = lifetime

    def __len__(self) -> int:
        return len(self._entries)

    def _drop_expired(self, now: float) -> None:
        entries = self._entries
        while entries:
            oldest = next(iter(entries))
            if entries[oldest][1] > now and len(entries) <= self.max_tracked:
                return
            del entries[oldest]


@dataclass(slots=True)
class AuthStats:
    """Counters since start, for operators and a metrics endpoint (`Server.throttle.stats`)."""

    failures: int = 0  # wrong credentials
    bans: int = 0  # times an address reached the limit and was banned
    refusals: int = 0  # attempts refused, unchecked, because their address was banned


@functools.lru_cache(maxsize=4096)
def address_key(ip: str) -> str:
    """The unit that is counted and banned for a client address.

    An IPv4 address is one key; IPv6 is counted per /64, the smallest network
    a single customer is usually given, since one host can use any address in
    it. IPv4-mapped IPv6 addresses count as the IPv4 address they carry.
    """
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip  # not an IP address (a Unix socket, tests): counted as given
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class AuthThrottle:
    """Decides, per login attempt, whether to check it, and how long a failure waits."""

    def __init__(
        self,
        counter: FailureCounter,
        failures_before_ban: int,
        ban_seconds: float,
        failure_delay: float,
    ) -> None:
        self.counter = counter
        self.failures_before_ban = failures_before_ban
        self.ban_seconds = ban_seconds
        self.failure_delay = failure_delay
        self.stats = AuthStats()
        # The attempts waiting for a check of their address key to end: see `reserve`.
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}

    def reconfigure(
        self, failures_before_ban: int, ban_seconds: float, failure_delay: float
    ) -> None:
        """A reload changed the limits: counts already made keep their expiry, new
        failures expire after the new `ban_seconds`."""
        self.failures_before_ban = failures_before_ban
        self.ban_seconds = ban_seconds
        self.failure_delay = failure_delay
        self.counter.set_lifetime(ban_seconds)

    async def refused(self, ip: str, account: str, conn: str = "-") -> bool:
        """True when `ip` is banned: the attempt must be refused without checking it.
        `conn` (the connection id) only goes into the log line."""
        address = address_key(ip)
        if await self.counter.failures(f"ip:{address}") < self.failures_before_ban:
            return False
        self._refusal(address, account, conn)
        return True

    async def reserve(self, ip: str, account: str, conn: str = "-") -> Check | None:
        """May a password check from `ip` start? None (the refusal logged) when the
        address is banned. While as many of its checks are under way as it has
        failures left before its ban, waits for one of them to end, then judges
        again. A `Check`: pass it to `release` once the check's failure, if it
        failed, is counted.

        `refused` alone is read before any check in flight has counted its
        failure, so attempts sent in parallel (many streams, one write each)
        would all pass it and each cost a key derivation, or each get a guess:
        counted this way no more checks run from an address than its ban
        allows. On a cluster the counter counts the checks of every node
        (xmppd.cluster.throttle); an attempt waiting for another node's check
        learns of its end by judging again after `counter.recheck_after`.
        Waiting rather than refusing: users behind one address (a NAT) who log
        in at the same moment are served a few milliseconds later, not turned
        away; a guesser's waiting attempts are refused once its failures ban it
        (its streams are bounded by the connections per address and the time to
        authenticate). The counter tests and takes in one step: two attempts
        cannot both take the last check.
        """
        address = address_key(ip)
        key = f"ip:{address}"
        while True:
            failures, check = await self.counter.take_check(key, self.failures_before_ban)
            if check is not None:
                return check
            if failures >= self.failures_before_ban:
                self._refusal(address, account, conn)
                return None
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiting = self._waiting.setdefault(key, [])
            waiting.append(turn)
            try:
                # wait_for cancels the turn when the time is up or the attempt is given up
                await asyncio.wait_for(turn, self.counter.recheck_after)
            except TimeoutError:
                pass  # a check on another node may have ended: judge again
            finally:
                if turn.cancelled() and turn in waiting:
                    waiting.remove(turn)
                    if not waiting and self._waiting.get(key) is waiting:
                        del self._waiting[key]

    async def release(self, check: Check) -> None:
        """A check `reserve` let start is over (and its failure counted): the attempts
        of this node waiting for one judge again."""
        try:
            await self.counter.end_check(check)
        finally:
            for turn in self._waiting.pop(check.key, ()):
                if not turn.done():
                    turn.set_result(None)

    async def failed(self, ip: str, account: str, conn: str = "-") -> float | None:
        """Count a wrong credential; return how long to wait before saying so, or
        None when the address was banned before this failure: the attempt is then
        answered as a refusal (and logged as one), at once, exactly as a right
        password is that `admit` refuses, so that neither the answer nor its time
        tells a guesser whose checks raced the ban which password was right.

        The wait grows with the address's failures, so one mistyped password
        costs its owner a moment while a guesser slows down with every try.
        """
        address = address_key(ip)
        count = await self.counter.record_failure(f"ip:{address}", f"pair:{address}:{account}")
        self.stats.failures += 1
        if count > self.failures_before_ban:
            self._refusal(address, account, conn)
            return None
        if count == self.failures_before_ban:
            self.stats.bans += 1
            log.info(
                "banned %s for %g s after %d failed logins (the last for %r) conn=%s",
                address,
                self.ban_seconds,
                count,
                account,
                conn,
                extra={"event": "ban", "address": address, "account": account, "conn": conn},
            )
        return self.failure_delay * min(count, self.failures_before_ban)

    async def admit(self, ip: str, account: str, conn: str = "-") -> bool:
        """Authentication passed: may it succeed? False when `ip` got banned meanwhile.

        Checking again here, after the password check, and answering a refusal
        here as `failed` answers a wrong guess made after the ban, means that
        attempts whose checks raced the ban (a cluster's nodes taking checks on
        their own counters while Redis fails, a check whose reservation expired
        while it ran) cannot tell a right guess
        from a wrong one. On success, the pair's failures
        are forgotten, and the address's too when they were all this account's
        (its owner mistyped): an address that also failed for other accounts
        keeps its count, so that logging in to one's own account cannot reset
        an allowance for guessing others' (ejabberd forgets the address on any
        success).
        """
        address = address_key(ip)
        ip_failures = await self.counter.failures(f"ip:{address}")
        if not ip_failures:
            return True  # the hot path: an address that has not been failing
        if ip_failures >= self.failures_before_ban:
            self._refusal(address, account, conn)
            return False
        pair = f"pair:{address}:{account}"
        if await self.counter.failures(pair) >= ip_failures:
            await self.counter.clear(f"ip:{address}")
        await self.counter.clear(pair)
        return True

    def _refusal(self, address: str, account: str, conn: str) -> None:
        self.stats.refusals += 1
        log.info(
            "refused a login for %r from %s: the address is banned conn=%s",
            account,
            address,
            conn,
            extra={"event": "login-refused", "address": address, "account": account, "conn": conn},
        )
