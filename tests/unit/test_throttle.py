"""The failed-login throttle's arithmetic, on an injected clock: counts, expiry, delays, bans."""

from __future__ import annotations

import asyncio

import pytest

from xmppd.auth.throttle import AuthStats, AuthThrottle, MemoryFailureCounter, address_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def throttle(clock: Clock, before_ban: int = 5, ban: float = 60.0) -> AuthThrottle:
    return AuthThrottle(MemoryFailureCounter(ban, clock), before_ban, ban, failure_delay=0.5)


async def test_counts_expire_a_lifetime_after_the_last_failure() -> None:
    clock = Clock()
    counter = MemoryFailureCounter(10.0, clock)
    assert await counter.record_failure("k") == 1
    clock.now += 9
    assert await counter.record_failure("k") == 2  # within the lifetime: counts on
    clock.now += 9.9
    assert await counter.failures("k") == 2  # 18.9 s after the first, 9.9 after the last
    clock.now += 0.1
    assert await counter.failures("k") == 0
    assert await counter.record_failure("k") == 1  # a fresh count after expiry
    await counter.clear("k")
    assert await counter.failures("k") == 0


async def test_one_failure_counts_every_key_given_and_returns_the_first() -> None:
    counter = MemoryFailureCounter(10.0, Clock())
    assert await counter.record_failure("ip", "pair-a") == 1
    assert await counter.record_failure("ip", "pair-b") == 2
    assert [await counter.failures(key) for key in ("ip", "pair-a", "pair-b")] == [2, 1, 1]


async def test_expired_keys_are_dropped_and_memory_is_bounded() -> None:
    clock = Clock()
    counter = MemoryFailureCounter(10.0, clock, max_tracked=3)
    for key in "abc":
        await counter.record_failure(key)
        clock.now += 1
    await counter.record_failure("a")  # "a" moves behind "c": "b" is now the oldest
    await counter.record_failure("d")  # over the bound: the oldest ("b") is forgotten
    assert len(counter) == 3 and await counter.failures("b") == 0
    assert [await counter.failures(k) for k in "acd"] == [2, 1, 1]
    clock.now += 9.5  # "c" expired, "a" and "d" not yet
    await counter.record_failure("e")
    assert len(counter) == 3 and await counter.failures("c") == 0


async def test_delay_grows_with_the_address_failures_then_the_address_is_banned() -> None:
    clock = Clock()
    t = throttle(clock)
    delays = [await t.failed("192.0.2.7", f"user{n}@example.org") for n in range(5)]
    assert delays == [0.5, 1.0, 1.5, 2.0, 2.5]  # spraying many accounts counts per address
    assert await t.refused("192.0.2.7", "user9@example.org")
    assert not await t.refused("192.0.2.8", "user0@example.org")  # other addresses unaffected
    assert t.stats == AuthStats(failures=5, bans=1, refusals=1)


async def test_ban_ends_ban_seconds_after_the_last_failure() -> None:
    clock = Clock()
    t = throttle(clock, before_ban=2, ban=60.0)
    await t.failed("192.0.2.7", "alice@example.org")
    clock.now += 30
    await t.failed("192.0.2.7", "alice@example.org")
    clock.now += 59.9
    assert await t.refused("192.0.2.7", "alice@example.org")
    clock.now += 0.1
    assert not await t.refused("192.0.2.7", "alice@example.org")
    assert await t.failed("192.0.2.7", "alice@example.org") == 0.5  # counting starts over


async def test_owner_success_forgets_own_mistakes_but_not_a_guessers() -> None:
    clock = Clock()
    t = throttle(clock)
    # The owner mistyped twice: a success clears the address entirely.
    await t.failed("192.0.2.1", "alice@example.org")
    await t.failed("192.0.2.1", "alice@example.org")
    assert await t.admit("192.0.2.1", "alice@example.org")
    assert await t.failed("192.0.2.1", "alice@example.org") == 0.5
    # A guesser who also logs in to their own account keeps the address's count.
    for victim in ("bob", "carol", "dave"):
        await t.failed("192.0.2.2", f"{victim}@example.org")
    assert await t.admit("192.0.2.2", "mallory@example.org")
    assert await t.failed("192.0.2.2", "erin@example.org") == 2.0  # the 4th failure


async def test_admit_refuses_once_banned_even_after_a_password_check() -> None:
    clock = Clock()
    t = throttle(clock, before_ban=2)
    assert await t.admit("192.0.2.7", "alice@example.org")  # a clean address
    await t.failed("192.0.2.7", "alice@example.org")
    await t.failed("192.0.2.7", "alice@example.org")
    assert not await t.admit("192.0.2.7", "alice@example.org")
    assert t.stats.refusals == 1


async def test_checks_under_way_count_against_the_ban_before_they_fail() -> None:
    """Attempts sent in parallel all pass `refused` before one failure is counted: the
    checks under way are counted with the failures, per address, so that no more run
    than the ban allows; one more waits for a check to end, then is judged again:
    let through if that check passed, refused once failures ban the address."""
    ip, alice = "192.0.2.7", "alice@example.org"
    t = throttle(Clock(), before_ban=3)
    await t.failed(ip, "bob@example.org")
    first = await t.reserve(ip, alice)
    second = await t.reserve(ip, alice)  # 1 failure + 2 under way: the ban's worth
    assert first is not None and second is not None
    third = asyncio.ensure_future(t.reserve(ip, alice))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not third.done()  # waits for a turn
    assert await t.reserve("192.0.2.8", alice)  # other addresses unaffected
    await t.release(first)  # a right password: no failure counted, a turn for the third
    third_check = await third
    assert third_check is not None
    fourth = asyncio.ensure_future(t.reserve(ip, alice))
    assert await t.failed(ip, alice) == 1.0
    await t.release(second)  # 2 failures + 1 under way: the fourth still waits
    for _ in range(5):
        await asyncio.sleep(0)
    assert not fourth.done()
    assert await t.failed(ip, alice) == 1.5  # the third failed too: banned
    await t.release(third_check)
    assert await fourth is None  # refused, as banned
    assert t.stats == AuthStats(failures=3, bans=1, refusals=1)


async def test_an_attempt_given_up_while_waiting_leaves_no_turn_behind() -> None:
    ip, alice = "192.0.2.7", "alice@example.org"
    t = throttle(Clock(), before_ban=1)
    check = await t.reserve(ip, alice)
    assert check is not None
    waiting = asyncio.ensure_future(t.reserve(ip, alice))
    for _ in range(5):
        await asyncio.sleep(0)
    waiting.cancel()  # its stream ended
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert not t._waiting
    await t.release(check)
    assert await t.reserve(ip, alice) is not None  # the check given back: one is free


async def test_a_failure_counted_after_the_ban_is_answered_as_a_refusal() -> None:
    """Checks that raced the ban (other nodes): a wrong password counted past it gets
    None (answered as a refusal, as `admit` answers a right one), not a delay."""
    t = throttle(Clock(), before_ban=2)
    assert await t.failed("192.0.2.7", "alice@example.org") == 0.5
    assert await t.failed("192.0.2.7", "alice@example.org") == 1.0  # this one bans
    assert await t.failed("192.0.2.7", "alice@example.org") is None
    assert not await t.admit("192.0.2.7", "alice@example.org")
    assert t.stats == AuthStats(failures=3, bans=1, refusals=2)


def test_address_key_groups_ipv6_by_64_and_unmaps_ipv4() -> None:
    assert address_key("192.0.2.7") == "192.0.2.7"
    assert address_key("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key("?") == "?"
