"""The cluster's own Redis connection (xmppd.cluster.channel) against a real redis-server,
on the event loop the server runs (uvloop, whose transports are not asyncio's classes)
and on asyncio's: it takes cluster.redis_url's database and password, a wrong password
fails the connection instead of leaving it half set up, and a Redis that goes away
fails the round trip waiting on it at once (the caller retries) instead of leaving it
waiting; the next round trip connects again, once for all the round trips that come
meanwhile. A connect given up while a credential provider makes it wait closes the
connection it opened."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.credentials import CredentialProvider
from redis.exceptions import AuthenticationError, RedisError

from xmppd.cluster import channel as channel_module
from xmppd.cluster.channel import Channel, Link, connect
from xmppd.storage import devservices
from xmppd.storage.devservices import LocalService

pytestmark = pytest.mark.timeout(60)

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.new_event_loop,
}



def run(loop: str, coroutine: Coroutine[Any, Any, Any]) -> Any:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(coroutine)


@pytest.mark.parametrize("loop", LOOPS)
def test_round_trips_go_to_the_url_s_database(redis_service: LocalService, loop: str) -> None:
    async def main() -> list[Any]:
        channel = Channel(Redis.from_url(devservices.redis_url(redis_service, db=3)))
        try:
            return await channel.call([("SET", "k", "v"), ("GET", "k"), ("XREAD", "STREAMS",
                                       "none", "0-0")])
        finally:
            await channel.release()

    assert run(loop, main()) == [b"OK", b"v", None]
    with SyncRedis.from_url(devservices.redis_url(redis_service, db=3)) as check:
        assert check.get("k") == b"v"
    with SyncRedis.from_url(devservices.redis_url(redis_service, db=0)) as check:
        assert check.get("k") is None


@pytest.mark.parametrize("loop", LOOPS)
def test_the_url_s_password_is_sent_and_a_wrong_one_fails(
    redis_service: LocalService, loop: str
) -> None:
    with SyncRedis.from_url(devservices.redis_url(redis_service)) as admin:
        admin.config_set("requirepass", "s3cret")
    base = devservices.redis_url(redis_service).removeprefix("redis://")

    async def main() -> None:
        good = Channel(Redis.from_url(f"redis://:s3cret@{base}"))
        assert await good.call([("PING",)]) == [b"PONG"]
        await good.release()
        bad = Channel(Redis.from_url(f"redis://:wrong@{base}"))
        with pytest.raises(AuthenticationError):
            await bad.call([("PING",)])
        with pytest.raises(AuthenticationError):  # not a half set up connection kept
            await bad.call([("PING",)])

    run(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_a_redis_that_goes_away_fails_the_waiting_round_trip_and_the_next_reconnects(
    redis_service: LocalService, loop: str
) -> None:
    async def main() -> None:
        channel = Channel(Redis.from_url(devservices.redis_url(redis_service)))
        await channel.link()  # connected: the call below writes its XREAD at once
        blocked = asyncio.create_task(
            channel.call([("XREAD", "BLOCK", 30000, "STREAMS", "s", "$")])
        )
        await asyncio.sleep(0)  # the task's first step: the XREAD is written
        await asyncio.to_thread(redis_service.stop)
        with pytest.raises(RedisError):
            await asyncio.wait_for(blocked, 10)
        await asyncio.to_thread(redis_service.start)
        assert await channel.call([("PING",)]) == [b"PONG"]
        await channel.release()

    run(loop, main())


class WaitingProvider(CredentialProvider):
    """Credentials from a service that does not answer (a token endpoint that hangs)."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()

    def get_credentials(self) -> tuple[str]:
        raise AssertionError("the asyncio connection asks get_credentials_async")

    async def get_credentials_async(self) -> tuple[str]:
        self.asked.set()
        await asyncio.Event().wait()
        raise AssertionError("never answered")


class SeenLink(Link):
    """A Link that the test can wait on to be closed."""

    made: list[SeenLink] = []

    def __init__(self) -> None:
        super().__init__()
        self.lost = asyncio.Event()
        SeenLink.made.append(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.lost.set()


@pytest.mark.parametrize("loop", LOOPS)
def test_a_connect_given_up_while_the_credentials_wait_closes_its_connection(
    redis_service: LocalService, loop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(channel_module, "Link", SeenLink)
    SeenLink.made = []

    async def main() -> None:
        provider = WaitingProvider()
        redis = Redis.from_url(devservices.redis_url(redis_service), credential_provider=provider)
        connecting = asyncio.create_task(connect(redis))
        await provider.asked.wait()  # connected, the handshake waits for credentials
        connecting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await connecting
        [made] = SeenLink.made
        await asyncio.wait_for(made.lost.wait(), 5)
        assert made.closed

    run(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_round_trips_that_come_while_it_connects_share_one_connection(
    redis_service: LocalService, loop: str
) -> None:
    async def main() -> list[Any]:
        channel = Channel(Redis.from_url(devservices.redis_url(redis_service)))
        try:
            return await asyncio.gather(*(channel.call([("CLIENT", "ID")]) for _ in range(3)))
        finally:
            await channel.release()

    [[first], [second], [third]] = run(loop, main())
    assert first == second == third
