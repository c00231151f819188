"""What the DynamoDB and S3 backends share: client setup, the AWS I/O loop, retries,
error mapping.

botocore's own retries are switched off (one attempt per call) and replaced by
`AwsCaller.call`, so that one policy covers both backends, can be tested
without a failing server, and can also retry the transaction conflicts that
botocore treats as final. The policy: retry throttling, 5xx and connection
failures (including timeouts) up to `max_attempts` times, sleeping a "full
jitter" delay (uniform in [0, min(cap, base * 2**attempt)]) so that many nodes
hit by the same outage do not come back in lockstep.

A write retried after a timeout may already have been applied by the first
attempt. For a conditional write this surfaces as ConditionFailed, which
callers already answer by re-reading; an unconditional item put may bump the
version twice. Neither loses data.

The AWS I/O loop: botocore spends 2-3 ms of CPU per request (building and
signing it, parsing the answer), and a loop that runs botocore cannot run its
other callbacks until every answer that arrived together has been parsed. So
every aiobotocore client lives on one process-wide event loop in a daemon
thread ("xmppd-aws-io"), reached through `AwsClient`, which runs each call
there: the serving loop only hands the call over and waits for a future. The
two threads share the GIL, which the interpreter passes between them (by force
once one has waited a switch interval, 5 ms). The thread belongs to no
caller's loop, so backends can be opened and closed from any loop (tests make
one per test); what a backend opens there it closes there.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import os
import random
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import aioboto3
import uvloop
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from ..base import StorageError
from ..config import DynamoDBItemsConfig, S3BlobsConfig
from ..turns import Turns

T = TypeVar("T")

THROTTLING_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "LimitExceededException",
        "RequestThrottled",
        "SlowDown",
        "PriorRequestNotComplete",
        "TransactionInProgressException",
        "TransactionConflictException",
        "InternalError",
        "InternalServerError",
        "ServiceUnavailable",
    }
)


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """Connection settings common to both AWS backends."""

    region: str
    endpoint_url: str | None
    access_key_id: str | None
    secret_access_key: str | None
    max_pool_connections: int
    connect_timeout: float
    read_timeout: float
    max_attempts: int

    @classmethod
    def from_config(cls, cfg: DynamoDBItemsConfig | S3BlobsConfig) -> ClientSettings:
        return cls(
            region=cfg.region,
            endpoint_url=cfg.endpoint_url,
            access_key_id=cfg.access_key_id,
            secret_access_key=cfg.secret_access_key,
            max_pool_connections=cfg.max_connections,
            connect_timeout=cfg.timeout,
            read_timeout=cfg.timeout,
            max_attempts=cfg.retries + 1,
        )


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def http_status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return f"{err.get('Code', 'error')} (HTTP {http_status(exc)}): {err.get('Message', '')}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, ClientError):
        status = http_status(exc)
        return status >= 500 or status == 429 or error_code(exc) in THROTTLING_CODES
    return isinstance(exc, BotoCoreError | OSError)


class AwsCaller:
    """Runs one AWS call with the retry policy and turns failures into StorageError.

    `classify` lets a backend claim errors that mean something in the contract
    (ConditionFailed, TooLarge, "not found") before they become StorageError:
    it returns an exception to raise, or None to fall through."""

    def __init__(
        self,
        backend: str,
        where: str,
        max_attempts: int,
        *,
        base_delay: float = 0.05,
        max_delay: float = 2.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.backend = backend
        self.where = where
        self.max_attempts = max(1, max_attempts)
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._sleep = sleep

    def backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))

    async def call(
        self,
        operation: str,
        fn: Callable[[], Awaitable[T]],
        classify: Callable[[ClientError], BaseException | None] | None = None,
        retry_if: Callable[[BaseException], bool] = is_retryable,
    ) -> T:
        attempt = 0
        while True:
            try:
                return await fn()
            except (ClientError, BotoCoreError, OSError) as exc:  # TimeoutError is an OSError
                if isinstance(exc, ClientError) and classify is not None:
                    mapped = classify(exc)
                    if mapped is not None:
                        raise mapped from exc
                attempt += 1
                if attempt >= self.max_attempts or not retry_if(exc):
                    cause = describe_error(exc)
                    if attempt > 1:
                        cause += f" (after {attempt} attempts)"
                    raise StorageError(self.backend, operation, f"{cause} [{self.where}]") from exc
                await self._sleep(self.backoff(attempt))


def botocore_config(settings: ClientSettings, **extra: Any) -> Config:
    return Config(
        region_name=settings.region,
        max_pool_connections=settings.max_pool_connections,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        retries={"total_max_attempts": 1},  # AwsCaller retries, with one policy for all
        tcp_keepalive=True,
        **extra,
    )


IO_THREAD_NAME = "xmppd-aws-io"

_io_lock = threading.Lock()
_io: asyncio.AbstractEventLoop | None = None


def io_loop() -> asyncio.AbstractEventLoop:
    """The AWS I/O loop, started on first use. It runs until the process exits: it
    holds nothing between calls but the clients of open backends. uvloop, like the
    serving loop: asyncio's socket transport left a reference cycle behind for
    every connection closed (moto closes one per request)."""
    global _io
    with _io_lock:
        if _io is None:
            loop = uvloop.new_event_loop()
            threading.Thread(target=loop.run_forever, name=IO_THREAD_NAME, daemon=True).start()
            _io = loop
        return _io


def _forget_io_loop() -> None:
    """A forked child has no I/O thread: its first call starts its own."""
    global _io
    _io = None


os.register_at_fork(after_in_child=_forget_io_loop)


class _Handover:
    """A coroutine handed from a caller's loop to the I/O loop, and its outcome handed
    back. Written out rather than run_coroutine_threadsafe + wrap_future, which keep a
    concurrent Future (with its Condition and lock) and three closures per call: with
    1,000 calls in flight, every object a call keeps is one more for each collection
    to walk, and a collection in either thread stops both."""

    __slots__ = ("coro", "caller", "future", "task")

    def __init__(self, coro: Coroutine[Any, Any, Any], caller: asyncio.AbstractEventLoop) -> None:
        self.coro = coro
        self.caller = caller
        self.future: asyncio.Future[Any] = caller.create_future()
        self.task: asyncio.Task[Any] | None = None

    def start(self) -> None:
        """On the I/O loop."""
        self.task = asyncio.get_running_loop().create_task(self.coro)
        self.task.add_done_callback(self.finished)

    def cancel(self) -> None:
        """On the I/O loop, always after `start` (call_soon_threadsafe keeps order)."""
        if self.task is not None:
            self.task.cancel()

    def finished(self, task: asyncio.Task[Any]) -> None:
        """On the I/O loop."""
        try:
            self.caller.call_soon_threadsafe(self.deliver)
        except RuntimeError:  # the caller's loop is closed: nobody is waiting
            if not task.cancelled():
                task.exception()  # retrieved, so that it is not logged as lost

    def deliver(self) -> None:
        """On the caller's loop; the task is done, so reading it from here is safe."""
        task = self.task
        assert task is not None
        if task.cancelled():
            self.future.cancel()
            return
        exc = task.exception()
        if self.future.done():  # the caller gave up meanwhile
            return
        if exc is None:
            self.future.set_result(task.result())
        else:
            self.future.set_exception(exc)


async def on_io_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on the AWS I/O loop and wait for it from the current one.
    Cancelling the waiting task cancels the task on the I/O loop too."""
    handover = _Handover(coro, asyncio.get_running_loop())
    io = io_loop()
    io.call_soon_threadsafe(handover.start)
    try:
        return cast(T, await handover.future)
    except asyncio.CancelledError:
        io.call_soon_threadsafe(handover.cancel)
        raise
    finally:  # an exception's traceback holds this frame, which holds the exception
        del handover


async def _finish(coro: Coroutine[Any, Any, T]) -> T:
    return await asyncio.shield(coro)


async def _invoke(raw: Any, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return await getattr(raw, method)(*args, **kwargs)


class AwsClient:
    """An aiobotocore client that lives on the AWS I/O loop. Its API methods, called
    through this from any loop, run there: `await client.get_item(...)`. Their answers
    are plain data, except S3's streaming bodies, which belong to the I/O loop: work
    that reads one goes through `run`, which hands it the bare client there. `close`
    closes it on the I/O loop, where it was opened.

    At most `limit` calls (the connection pool's size) are under way at once; the
    rest wait for a turn on the caller's loop (see storage/turns.py), before
    anything is handed over or built: a request built only to wait for a
    connection keeps dozens of objects alive, and with 1,000 calls queued behind
    32 connections the collector ran 2.5 times as often per operation, and a full
    collection stopped both threads for 70 ms."""

    __slots__ = ("raw", "_stack", "_turns", "admission")

    def __init__(self, raw: Any, stack: contextlib.AsyncExitStack, limit: int) -> None:
        self.raw = raw
        self._stack = stack  # what open_client entered on the I/O loop
        self._turns = Turns(limit)
        self.admission = Turns(limit)  # see `admitted`

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        return functools.partial(self.call, name)

    async def call(self, method: str, /, *args: Any, **kwargs: Any) -> Any:
        """`client.call("get_item", ...)` is `client.get_item(...)`."""
        async with self._turns():
            return await on_io_loop(_invoke(self.raw, method, args, kwargs))

    async def run(self, fn: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
        async with self._turns():
            return await on_io_loop(fn(self.raw))

    async def close(self) -> None:
        """Runs to its end even if the waiting task is cancelled, so a cancelled
        shutdown leaves no client (and no open connections) behind on the I/O loop."""
        await on_io_loop(_finish(self._stack.aclose()))


Method = TypeVar("Method", bound=Callable[..., Coroutine[Any, Any, Any]])


def admitted(method: Method) -> Method:
    """For a backend's public methods: wait for the client's admission before the
    method builds anything. A call waiting for a turn inside AwsClient already holds
    its request's arguments and the coroutines of every layer above; waiting here, it
    holds its own arguments only. Admission is separate from the per-call turns, so
    a method that makes several calls never waits for a turn its own admission holds;
    an admitted method must not call another (batch_put, which calls put, is not)."""

    @functools.wraps(method)
    async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        async with self._client.admission():
            return await method(self, *args, **kwargs)

    return cast(Method, wrapper)


@functools.cache
def _session() -> aioboto3.Session:
    """One session per process: it caches the parsed service models, which makes a
    client cost milliseconds instead of about 100 ms. A session belongs to no event
    loop; the clients made from it do (all of them to the AWS I/O loop).

    botocore builds a parser for every response, and by default that parser keeps
    a bound method of itself (its blob parser, base64 decoding): a reference cycle
    per request, which only the collector can free. The same function given as the
    factory's default leaves nothing for it to do."""
    session = aioboto3.Session()
    parsers = session._session.get_component("response_parser_factory")
    parsers.set_parser_defaults(blob_parser=base64.b64decode)
    return session


async def open_client(
    service: str,
    settings: ClientSettings,
    *,
    setup: Callable[[Any], None] | None = None,
    **extra: Any,
) -> AwsClient:
    """A client on the AWS I/O loop; `close()` it when done. `setup` gets the bare
    client there before any call."""
    stack = contextlib.AsyncExitStack()

    async def enter() -> Any:
        raw = await stack.enter_async_context(
            _session().client(
                service,  # type: ignore[call-overload]
                region_name=settings.region,
                endpoint_url=settings.endpoint_url,
                aws_access_key_id=settings.access_key_id,
                aws_secret_access_key=settings.secret_access_key,
                config=botocore_config(settings, **extra),
            )
        )
        if setup is not None:
            setup(raw)
        return raw

    try:
        raw = await on_io_loop(enter())
    except BaseException:
        await on_io_loop(_finish(stack.aclose()))
        raise
    return AwsClient(raw, stack, settings.max_pool_connections)
