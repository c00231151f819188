"""What the DynamoDB and S3 backends do beyond the shared contract: retries,
key escaping, presigned URLs over real HTTP, multipart uploads, credentials,
namespace listing, the in-memory sort cap, the expiry attribute."""

from __future__ import annotations

import contextlib
import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from xmppd.storage.backends import dynamodb as dynamodb_module
from xmppd.storage.backends._aws import AwsCaller
from xmppd.storage.backends.dynamodb import DynamoDBItemBackend
from xmppd.storage.backends.s3 import (
    MULTIPART_THRESHOLD,
    S3BlobBackend,
    escape_part,
    namespace_prefix,
    unescape_part,
)
from xmppd.storage.base import ConditionFailed, Query, StorageError
from xmppd.storage.devservices import LocalService
from xmppd.storage.turns import Turns

from .services import dynamodb, s3_config

# -- the retry policy (no server needed) ----------------------------------------------


def client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "Op",
    )


class Flaky:
    """Fails with the given errors, then answers "ok"."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def caller(sleeps: list[float]) -> AwsCaller:
    async def sleep(delay: float) -> None:
        sleeps.append(delay)

    return AwsCaller("dynamodb", "table t", max_attempts=4, sleep=sleep)


@pytest.mark.parametrize(
    "error",
    [
        client_error("ThrottlingException", 400),
        client_error("ProvisionedThroughputExceededException", 400),
        client_error("SlowDown", 503),
        client_error("InternalError", 500),
        client_error("Whatever", 502),
        EndpointConnectionError(endpoint_url="http://x"),
        TimeoutError(),
    ],
    ids=["throttling", "throughput", "slowdown", "internal", "5xx", "connection", "timeout"],
)
async def test_transient_errors_are_retried(
    caller: AwsCaller, sleeps: list[float], error: BaseException
) -> None:
    call = Flaky(error, error)
    assert await caller.call("get", call) == "ok"
    assert call.calls == 3
    assert len(sleeps) == 2


async def test_backoff_is_jittered_and_capped(caller: AwsCaller) -> None:
    random.seed(7)
    delays = [[caller.backoff(attempt) for _ in range(200)] for attempt in (1, 3, 10)]
    for attempt, samples in zip((1, 3, 10), delays, strict=True):
        ceiling = min(caller.max_delay, caller.base_delay * 2**attempt)
        assert all(0 <= d <= ceiling for d in samples)
        assert max(samples) - min(samples) > ceiling / 2  # spread, not one fixed delay


async def test_permanent_errors_fail_at_once_with_a_clear_message(
    caller: AwsCaller, sleeps: list[float]
) -> None:
    call = Flaky(client_error("ValidationException", 400))
    with pytest.raises(StorageError) as caught:
        await caller.call("put", call)
    assert call.calls == 1 and sleeps == []
    assert str(caught.value) == (
        "dynamodb: put failed: ValidationException (HTTP 400): m [table t]"
    )


async def test_retries_run_out(caller: AwsCaller, sleeps: list[float]) -> None:
    call = Flaky(*[client_error("ServiceUnavailable", 503)] * 10)
    with pytest.raises(StorageError, match=r"after 4 attempts"):
        await caller.call("query", call)
    assert call.calls == 4 and len(sleeps) == 3


async def test_classified_errors_are_not_retried(caller: AwsCaller) -> None:
    call = Flaky(client_error("ConditionalCheckFailedException", 400))
    with pytest.raises(ConditionFailed):
        await caller.call("put", call, lambda exc: ConditionFailed("lost"))
    assert call.calls == 1


async def test_unprocessed_batch_keys_are_retried(caller: AwsCaller) -> None:
    """BatchGetItem may answer part of a request under load; the rest is asked again."""
    key = {"ns": {"S": "n/s"}, "name": {"S": "b"}}
    row = {"ns": {"S": "n/s"}, "name": {"S": "a"}, "version": {"N": "1"}, "attrs": {"M": {}}}
    answers = [
        {"Responses": {"t": [row]}, "UnprocessedKeys": {"t": {"Keys": [key]}}},
        {"Responses": {"t": [{**row, "name": {"S": "b"}}]}, "UnprocessedKeys": {}},
    ]
    asked: list[Any] = []

    class Client:
        admission = Turns(4)  # what AwsClient offers the backends' admitted methods

        async def batch_get_item(self, RequestItems: Any) -> Any:  # noqa: N803 - boto's name
            asked.append(RequestItems)
            return answers.pop(0)

    backend = DynamoDBItemBackend(Client(), "t", caller)
    found = await backend.batch_get("n/s", ["a", "b"])
    assert sorted(found) == ["a", "b"]
    assert asked[1] == {"t": {"Keys": [key]}}


# -- S3 key escaping ----------------------------------------------------------------------


def test_escaping_keeps_order_and_prefixes() -> None:
    rnd = random.Random(3)
    alphabet = ["a", "z", ".", "/", "\\", "]", "[", "!", " ", "\x01", "-", "~", "ü", "😀"]
    words = {"".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 300))) for _ in range(600)}
    words |= {w[: len(w) // 2] for w in list(words)[:200] if len(w) > 1}
    escaped = {w: escape_part(w) for w in words}
    assert all(unescape_part(e) == w for w, e in escaped.items())
    assert sorted(words) == sorted(words, key=lambda w: escaped[w].encode("utf-8"))
    sample = sorted(words)[:150]
    for a in sample:
        for b in sample:
            assert b.startswith(a) == escaped[b].startswith(escaped[a])
    for e in escaped.values():
        segments = e.split("/")
        assert all(0 < len(s.encode("utf-8")) <= 255 for s in segments)
        assert all(s not in (".", "..") for s in segments)
        assert "\\" not in e
    assert namespace_prefix("example.org/vcard") == "example.-org/vcard/"
    assert escape_part("alice@example.org") == "alice@example.-org"
    with pytest.raises(ValueError):
        unescape_part("x/y")  # a nested namespace, not a key


# -- against the servers -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def s3(service: LocalService, **overrides: Any) -> AsyncIterator[S3BlobBackend]:
    backend = await S3BlobBackend.from_config(s3_config(service, **overrides))
    try:
        yield backend
    finally:
        await backend.close()


@pytest.fixture(params=["seaweedfs_service", "moto_service"], ids=["seaweedfs", "moto"])
def s3_service(request: pytest.FixtureRequest) -> LocalService:
    service: LocalService = request.getfixturevalue(request.param)
    return service


async def test_presigned_urls_work_over_plain_http(s3_service: LocalService) -> None:
    ns = f"p{uuid.uuid4().hex[:8]}.example/files"
    async with s3(s3_service) as blobs, aiohttp.ClientSession() as http:
        put_url = await blobs.presign(ns, "upload/ü x.bin", "PUT", expires=60)
        assert put_url is not None
        headers = {"Content-Type": "application/octet-stream"}
        async with http.put(put_url, data=b"from a client", headers=headers) as response:
            assert response.status == 200, await response.text()
        blob = await blobs.get(ns, "upload/ü x.bin")
        assert blob is not None and blob.data == b"from a client"

        get_url = await blobs.presign(ns, "upload/ü x.bin", "GET", expires=60)
        assert get_url is not None
        async with http.get(get_url) as response:
            assert response.status == 200
            assert await response.read() == b"from a client"
        if s3_service.name == "seaweedfs":  # moto checks no signatures at all
            async with http.get(get_url + "x") as response:  # a tampered signature
                assert response.status == 403


async def test_wrong_credentials_are_refused(seaweedfs_service: LocalService) -> None:
    with pytest.raises(StorageError, match="s3: open failed"):
        await S3BlobBackend.from_config(s3_config(seaweedfs_service, secret_access_key="wrong"))


async def test_multipart_upload_and_conditions(s3_service: LocalService) -> None:
    ns = f"m{uuid.uuid4().hex[:8]}.example/files"
    big = bytes(range(256)) * (MULTIPART_THRESHOLD // 256 + 4096)  # 2 parts
    async with s3(s3_service, max_blob_bytes=64 * 1024 * 1024) as blobs:
        etag = await blobs.put(ns, "big", big, if_none_match=True)
        assert etag.endswith("-2")
        blob = await blobs.get(ns, "big")
        assert blob is not None and blob.data == big and blob.etag == etag
        with pytest.raises(ConditionFailed):
            await blobs.put(ns, "big", big, if_none_match=True)
        with pytest.raises(ConditionFailed):
            await blobs.put(ns, "big", big[::-1], if_match="0" * 32)
        assert (await blobs.get(ns, "big")).data == big  # type: ignore[union-attr]
        etag2 = await blobs.put(ns, "big", big[::-1], if_match=etag)
        assert (await blobs.get(ns, "big")).etag == etag2  # type: ignore[union-attr]
        uploads = await blobs._client.list_multipart_uploads(Bucket=blobs.bucket)
        assert not uploads.get("Uploads")  # failed uploads were aborted


async def test_s3_namespaces(s3_service: LocalService) -> None:
    vhost = f"n{uuid.uuid4().hex[:8]}." + "long-label." * 30 + "example"  # a part over 255 bytes
    async with s3(s3_service) as blobs:
        await blobs.put(f"{vhost}/vcard", "alice", b"1")
        await blobs.put(f"{vhost}/files", "x" * 600, b"2")  # only a long (cut) key
        await blobs.put(f"{vhost}/files/nested", "k", b"3")
        found = [ns for ns in await blobs.namespaces() if ns.startswith(vhost)]
        assert found == [f"{vhost}/files", f"{vhost}/files/nested", f"{vhost}/vcard"]
        assert (await blobs.list(f"{vhost}/files")).keys == ["x" * 600]


async def test_order_by_attribute_has_a_cap(
    moto_service: LocalService, monkeypatch: pytest.MonkeyPatch
) -> None:
    ns = f"c{uuid.uuid4().hex[:8]}.example/store"
    monkeypatch.setattr(dynamodb_module, "SORT_CAP", 5)
    async with dynamodb(moto_service) as items:
        await items.batch_put(ns, {f"k{i}": {"rank": i} for i in range(6)})
        with pytest.raises(StorageError, match="in-memory sort cap"):
            await items.query(ns, Query(order_by="rank"))
        page = await items.query(ns, Query(order_by="rank", where={"rank": 3}))
        assert [item.name for item in page.items] == ["k3"]
        assert len((await items.query(ns, Query(limit=10))).items) == 6  # by name: no cap


async def test_expires_at_feeds_the_ttl_attribute(moto_service: LocalService) -> None:
    ns = f"e{uuid.uuid4().hex[:8]}.example/store"
    async with dynamodb(moto_service) as items:
        await items.put(ns, "temp", {"expires_at": 1_900_000_000, "v": "x"})
        await items.put(ns, "kept", {"expires_at": "not a number"})
        client = items._client
        key = {"ns": {"S": ns}, "name": {"S": "temp"}}
        row = (await client.get_item(TableName=items.table, Key=key))["Item"]
        assert row["expires_at"] == {"N": "1900000000"}
        await items.put(ns, "temp", {"v": "y"})  # no longer expiring: the TTL goes
        row = (await client.get_item(TableName=items.table, Key=key))["Item"]
        assert "expires_at" not in row
        key = {"ns": {"S": ns}, "name": {"S": "kept"}}
        assert "expires_at" not in (await client.get_item(TableName=items.table, Key=key))["Item"]
        ttl = await client.describe_time_to_live(TableName=items.table)
        assert ttl["TimeToLiveDescription"]["AttributeName"] == "expires_at"


async def test_dynamodb_namespaces(moto_service: LocalService) -> None:
    tag = uuid.uuid4().hex[:8]
    async with dynamodb(moto_service) as items:
        await items.put(f"{tag}.example/roster", "a", {})
        await items.put(f"{tag}.example/last", "a", {})
        found = [ns for ns in await items.namespaces() if ns.startswith(tag)]
        assert found == [f"{tag}.example/last", f"{tag}.example/roster"]
