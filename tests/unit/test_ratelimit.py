"""The token bucket behind s2s.max_bytes_per_second (xmppd/ratelimit.py)."""

from __future__ import annotations

import pytest

from xmppd.ratelimit import TokenBucket


def test_within_the_burst_no_pause_then_the_debt_is_paid_at_the_rate() -> None:
    bucket = TokenBucket(rate=1000, burst=1000)
    assert bucket.take(600, now=0.0) == 0.0
    assert bucket.take(400, now=0.0) == 0.0
    # 500 bytes over: half a second at 1000 bytes per second.
    assert bucket.take(500, now=0.0) == pytest.approx(0.5)
    # After that half second the debt is gone, and the next read counts from zero.
    assert bucket.take(100, now=0.5) == pytest.approx(0.1)


def test_a_quiet_spell_refills_only_up_to_the_burst() -> None:
    bucket = TokenBucket(rate=100, burst=200)
    bucket.take(200, now=0.0)
    # An hour later: 200 bytes of credit, not 360000.
    assert bucket.take(200, now=3600.0) == 0.0
    assert bucket.take(50, now=3600.0) == pytest.approx(0.5)


def test_a_read_larger_than_the_burst_is_a_longer_pause_not_a_refusal() -> None:
    bucket = TokenBucket(rate=1000, burst=1000)
    assert bucket.take(5000, now=0.0) == pytest.approx(4.0)


def test_rate_and_burst_must_be_positive() -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1)
