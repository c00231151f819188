"""Failed-login accounting: lock an account or an address after repeated failures.

Password guessing is cheap for an attacker and costly for us (every attempt
is a PBKDF2 run), so failures are counted per IP address and per account
over a window; past the limit, attempts are refused without checking the
password until the lockout expires. State is per node and in memory: a lock
is a brake, not a record worth persisting.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

MAX_TRACKED = 100_000  # keys kept before expired entries are swept


@dataclass(slots=True)
class _Counter:
    started: float
    failures: int = 0
    locked_until: float = 0.0


class AuthThrottle:
    def __init__(
        self,
        max_per_ip: int,
        max_per_account: int,
        window: float,
        lockout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_per_ip = max_per_ip
        self.max_per_account = max_per_account
        self.window = window
        self.lockout = lockout
        self.clock = clock
        self._counters: dict[str, _Counter] = {}

    def locked(self, ip: str, account: str | None = None) -> bool:
        now = self.clock()
        keys = [f"ip:{ip}"] + ([f"acct:{account}"] if account else [])
        return any((c := self._counters.get(k)) is not None and c.locked_until > now for k in keys)

    def failed(self, ip: str, account: str | None) -> None:
        now = self.clock()
        self._count(f"ip:{ip}", self.max_per_ip, now)
        if account:
            self._count(f"acct:{account}", self.max_per_account, now)
        if len(self._counters) > MAX_TRACKED:
            self._sweep(now)

    def succeeded(self, ip: str, account: str) -> None:
        self._counters.pop(f"acct:{account}", None)

    def _count(self, key: str, limit: int, now: float) -> None:
        counter = self._counters.get(key)
        if counter is None or now - counter.started > self.window:
            counter = self._counters[key] = _Counter(started=now)
        counter.failures += 1
        if counter.failures >= limit:
            counter.locked_until = now + self.lockout
            counter.failures = 0
            counter.started = now

    def _sweep(self, now: float) -> None:
        for key in [
            k
            for k, c in self._counters.items()
            if c.locked_until <= now and now - c.started > self.window
        ]:
            del self._counters[key]
