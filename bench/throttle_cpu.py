"""CPU per login of the login throttle counted in Redis (xmppd.cluster.throttle).

Runs `AuthThrottle` on a `RedisFailureCounter` against a real redis-server on
127.0.0.1 (started here, its CPU not counted) and reports this process's CPU
time per login: a clean login is `refused` then `admit` (what every login
pays), a failed one `refused` then `failed`. `--parallel` logins are in flight
at once, as on a node where many clients log in together.

    .venv/bin/python bench/throttle_cpu.py --logins 5000 --parallel 1 50 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop
from redis.asyncio import Redis

from xmppd.auth.throttle import AuthThrottle, MemoryFailureCounter
from xmppd.cluster.throttle import RedisFailureCounter
from xmppd.storage import devservices

Login = Callable[[AuthThrottle, int], Awaitable[object]]


async def clean(throttle: AuthThrottle, n: int) -> None:
    ip = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
    await throttle.refused(ip, "user@localhost")
    await throttle.admit(ip, "user@localhost")


async def failed(throttle: AuthThrottle, n: int) -> None:
    ip = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
    await throttle.refused(ip, "user@localhost")
    await throttle.failed(ip, "user@localhost")


async def measure(
    counter_class: Callable[..., Any], url: str, login: Login, logins: int, parallel: int
) -> float:
    """Microseconds of this process's CPU per login, after a warm-up."""
    redis = Redis.from_url(url)
    counter = counter_class(redis, 60.0, MemoryFailureCounter(60.0))
    throttle = AuthThrottle(counter, 10**9, 60.0, 0.0)
    await redis.flushdb()
    base = 0

    async def run(count: int) -> None:
        nonlocal base
        first, base = base, base + count

        async def worker(k: int) -> None:
            for n in range(first + k, first + count, parallel):
                await login(throttle, n)

        await asyncio.gather(*(worker(k) for k in range(parallel)))

    try:
        await run(min(logins, 500))
        start = time.process_time()
        await run(logins)
        used = time.process_time() - start
        assert counter._down_until is None, "Redis failed during the run"
    finally:
        close = getattr(counter, "close", None)
        if close is not None:
            await close()
        await redis.aclose()
    return used / logins * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logins", type=int, default=5000)
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 50])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    redis = devservices.redis_server().start()
    try:
        url = devservices.redis_url(redis)
        for parallel in args.parallel:
            for name, login in (("clean", clean), ("failed", failed)):
                runs = [
                    uvloop.run(measure(RedisFailureCounter, url, login, args.logins, parallel))
                    for _ in range(args.runs)
                ]
                print(f"{name} logins, {parallel} in flight: "
                      + " ".join(f"{us:.0f}" for us in runs) + " us CPU/login")
    finally:
        redis.stop()


if __name__ == "__main__":
    main()
