"""A token bucket for bytes read from a peer: how long to stop reading after a read.

Sans-IO (the caller passes the clock), for a connection that pauses its
transport's reading for the returned delay: the peer's TCP window fills
and it slows down, instead of this server buffering what it sends. What was
already read is always processed; the bucket may go into debt, and the
pause lasts until the debt is paid back at the rate. So a stanza larger
than the burst is never refused by the rate, only followed by a longer
pause (the same shaping as ejabberd's shapers).
"""

from __future__ import annotations


class TokenBucket:
    def __init__(self, rate: float, burst: float) -> None:
        """`rate` bytes per second, up to `burst` bytes at once after a quiet spell."""
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self._last: float | None = None

    def take(self, amount: int, now: float) -> float:
        """Count `amount` bytes read at `now` (seconds, monotonic); the seconds to stop
        reading for, 0.0 when within the rate."""
        if self._last is not None:
            self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate)
        self._last = now
        self.tokens -= amount
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate
