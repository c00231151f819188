"""What the DynamoDB and S3 backends share: client setup, retries, error mapping.

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
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aioboto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from ..base import StorageError

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


@functools.cache
def _session() -> aioboto3.Session:
    """One session per process: it caches the parsed service models, which makes a
    client cost milliseconds instead of about 100 ms. A session belongs to no event
    loop; the clients made from it do."""
    return aioboto3.Session()


async def open_client(
    stack: contextlib.AsyncExitStack, service: str, settings: ClientSettings, **extra: Any
) -> Any:
    """An aiobotocore client whose lifetime is tied to `stack`."""
    return await stack.enter_async_context(
        _session().client(
            service,  # type: ignore[call-overload]
            region_name=settings.region,
            endpoint_url=settings.endpoint_url,
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=settings.secret_access_key,
            config=botocore_config(settings, **extra),
        )
    )
