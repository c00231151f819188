"""The cloud blob store: one S3 bucket (AWS S3 or an S3-compatible server).

Object key = escaped namespace parts joined by "/", then "/", then the escaped
blob key. The escaping (`escape_part`) leaves no bare "/" inside a part, so
S3-compatible servers that store objects as files (SeaweedFS keeps them in a
filer tree) never see "a" and "a/b" as a file that must also be a directory,
nor "", "." or ".." path segments, nor a backslash (which SeaweedFS turns into
"/"). SeaweedFS also caps each path segment at 255 bytes, so an escaped part
longer than SEGMENT_BYTES is cut into segments joined by "!!/" (a sequence the
escaping never produces otherwise).

The escaping preserves order and prefixes, so listing by prefix is one S3
prefix listing and comes back in the contract's key order (code points): the
only escapes are "!XX" for bytes 0x00-0x21 (controls, space, "!"), ".-" / ".~"
for "." / "/", and "]-" / "]~" for backslash / "]"; every other character is
kept, and where a long part is cut depends only on what precedes the cut.
A key with its namespace must fit S3's 1024-byte key limit once escaped:
otherwise TooLarge. `namespaces()` is a delimiter walk, one listing per
namespace level.

Conditional writes use If-None-Match: * and If-Match on PutObject,
CompleteMultipartUpload and DeleteObject; SeaweedFS (4.48) and moto (5.2)
honour them on PutObject and DeleteObject. moto ignores If-Match on
CompleteMultipartUpload, so a multipart put with `if_match` is also checked
with a HeadObject first (that only narrows the race on such servers; AWS and
SeaweedFS check it atomically). Bodies over MULTIPART_THRESHOLD go up in
MULTIPART_PART_SIZE parts, MULTIPART_CONCURRENCY at a time, and a failed
upload is aborted so no parts are left behind.

Etags are S3's, without quotes (an MD5 hex, or "<md5>-<parts>" after a
multipart upload). delete() reports whether the key existed from a HeadObject
just before the DeleteObject (S3 answers 204 either way; "If-Match: *" would
say it in one call, but moto reads "*" as an etag).

botocore's "Expect: 100-continue" on uploads is switched off: aiohttp waits
for the "100 Continue" without any timeout, so a hung server hung every put.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
from functools import partial
from typing import Any, Literal

from botocore.exceptions import ClientError
from botocore.handlers import add_expect_header

from ..base import (
    Blob,
    BlobBackend,
    BlobPage,
    ConditionFailed,
    NoStoreYet,
    StorageError,
    TooLarge,
    check_blob_size,
    check_key,
)
from ..codec import decode_token, encode_token
from ..config import S3BlobsConfig
from ._aws import (
    AwsCaller,
    AwsClient,
    ClientSettings,
    admitted,
    error_code,
    http_status,
    is_retryable,
    open_client,
)

MAX_OBJECT_KEY_BYTES = 1024
MAX_LIST_KEYS = 1000  # S3's page size cap
MULTIPART_THRESHOLD = 8 * 1024 * 1024
MULTIPART_PART_SIZE = 8 * 1024 * 1024  # S3 wants >= 5 MiB for all parts but the last
MULTIPART_CONCURRENCY = 4

_ESCAPES = {".": ".-", "/": ".~", "\\": "]-", "]": "]~"}
_UNESCAPES = {token: char for char, token in _ESCAPES.items()}
SEGMENT_BYTES = 192  # a segment closes once this full; < SeaweedFS's 255-byte file names
CONTINUED = "!!/"  # ends a segment that the next one continues; "!!" is never an escape


def _token(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    if ord(char) <= 0x21:
        return f"!{ord(char):02X}"
    return char


def escape_part(text: str) -> str:
    """Escape one namespace part or key (see the module docstring), cut into segments
    of at most SEGMENT_BYTES + 6 bytes joined by CONTINUED. Where a cut goes depends
    only on the text before it, so order and prefixes survive the cuts too."""
    out: list[str] = []
    size = 0
    for char in text:
        if size >= SEGMENT_BYTES:
            out.append(CONTINUED)
            size = 0
        token = _token(char)
        out.append(token)
        size += len(token.encode("utf-8"))
    return "".join(out)


def unescape_part(text: str) -> str:
    """Inverse of escape_part; ValueError for names we did not write (including a
    bare "/", which marks a nested namespace)."""
    return "".join(_unescape_segment(segment) for segment in text.split(CONTINUED))


def _unescape_segment(text: str) -> str:
    out = []
    i = 0
    while i < len(text):
        char = text[i]
        if char in ".]":
            token = text[i : i + 2]
            if token not in _UNESCAPES:
                raise ValueError(f"bad escape {token!r} in {text!r}")
            out.append(_UNESCAPES[token])
            i += 2
        elif char == "!":
            digits = text[i + 1 : i + 3]
            if len(digits) != 2 or digits.upper() != digits or int(digits, 16) > 0x21:
                raise ValueError(f"bad escape in {text!r}")
            out.append(chr(int(digits, 16)))
            i += 3
        elif ord(char) <= 0x21 or char in "/\\":
            raise ValueError(f"unescaped {char!r} in {text!r}")
        else:
            out.append(char)
            i += 1
    return "".join(out)


def namespace_prefix(namespace: str) -> str:
    """The object-key prefix of a namespace, ending in "/"."""
    return "".join(escape_part(part) + "/" for part in namespace.split("/"))


def _etag(raw: str) -> str:
    return raw.strip('"')


def _quoted(etag: str) -> str:
    return f'"{etag}"'


class S3BlobBackend(BlobBackend):
    name = "s3"

    def __init__(
        self,
        client: AwsClient,
        bucket: str,
        caller: AwsCaller,
        max_blob_bytes: int,
    ) -> None:
        """`client` runs its calls on the AWS I/O loop (see _aws)."""
        self._client = client
        self.bucket = bucket
        self._caller = caller
        self.max_blob_bytes = max_blob_bytes

    @classmethod
    async def from_config(cls, cfg: S3BlobsConfig, *, read_only: bool = False) -> S3BlobBackend:
        """Connect, then create the bucket (cfg.create_bucket, unless `read_only`) or check
        that it exists."""
        settings = ClientSettings.from_config(cfg)
        # S3-compatible servers on an IP or a single host name need path-style URLs.
        style = "path" if cfg.endpoint_url else "auto"
        client = await open_client(
            "s3",
            settings,
            setup=_without_expect_header,
            s3={"addressing_style": style},
            signature_version="s3v4",
        )
        where = f"bucket {cfg.bucket} at {cfg.endpoint_url or 'AWS ' + cfg.region}"
        backend = cls(
            client, cfg.bucket, AwsCaller(cls.name, where, cfg.retries + 1), cfg.max_blob_bytes
        )
        try:
            if cfg.create_bucket and not read_only:
                await backend.create_bucket(cfg.region)
            else:
                # Read-only, a bucket the server would create is only not there yet.
                missing = (
                    NoStoreYet(cls.name, f"bucket {cfg.bucket}") if cfg.create_bucket else None
                )
                head = partial(client.head_bucket, Bucket=cfg.bucket)
                await backend._call("open", head, missing=missing)
        except BaseException:
            await client.close()
            raise
        return backend

    def describe(self) -> str:
        return f"s3 {self._caller.where}"

    async def create_bucket(self, region: str) -> None:
        """Create the bucket if missing; safe to run from several nodes at once."""
        args: dict[str, Any] = {"Bucket": self.bucket}
        if region != "us-east-1":
            args["CreateBucketConfiguration"] = {"LocationConstraint": region}

        def exists(exc: ClientError) -> BaseException | None:
            if error_code(exc) in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return _AlreadyThere()
            return None

        with contextlib.suppress(_AlreadyThere):
            await self._call("create_bucket", partial(self._client.create_bucket, **args), exists)

    # -- plumbing --------------------------------------------------------------

    async def _call(
        self, operation: str, fn: Any, classify: Any = None, *, missing: Any = None
    ) -> Any:
        """Run one S3 call; 412 becomes ConditionFailed, and 404 becomes `missing`
        when given (an exception to raise, or a sentinel returned). Mapped after the
        fact, from the StorageError's cause: none of these answers is retried, and a
        closure built per call for it was one more object per call in flight."""
        try:
            return await self._caller.call(operation, fn, classify, _retryable)
        except StorageError as exc:
            cause = exc.__cause__
            if not isinstance(cause, ClientError):
                raise
            status, code = http_status(cause), error_code(cause)
            if status == 412 or code == "PreconditionFailed":
                raise ConditionFailed(f"s3: {operation}: precondition failed") from cause
            if missing is not None and (status == 404 or code in ("NoSuchKey", "NotFound")):
                if isinstance(missing, BaseException):
                    raise missing from cause
                return missing
            if code in ("KeyTooLongError", "EntityTooLarge"):
                raise TooLarge(f"s3: {operation}: {code}") from cause
            raise

    def _object_key(self, namespace: str, key: str) -> str:
        check_key(key)
        object_key = namespace_prefix(namespace) + escape_part(key)
        if len(object_key.encode("utf-8")) > MAX_OBJECT_KEY_BYTES:
            raise TooLarge(f"s3 object key for {key[:40]!r} is over {MAX_OBJECT_KEY_BYTES} bytes")
        return object_key

    # -- BlobBackend -----------------------------------------------------------

    @admitted
    async def get(self, namespace: str, key: str) -> Blob | None:
        object_key = self._object_key(namespace, key)

        async def fetch(client: Any) -> tuple[bytes, str]:
            """On the I/O loop, with the bare client: the body streams from there."""
            response = await client.get_object(Bucket=self.bucket, Key=object_key)
            async with response["Body"] as body:
                return await body.read(), _etag(response["ETag"])

        found = await self._call("get", partial(self._client.run, fetch), missing=_NOT_FOUND)
        if found is _NOT_FOUND:
            return None
        data, etag = found
        return Blob(key, data, etag)

    @admitted
    async def put(
        self,
        namespace: str,
        key: str,
        data: bytes,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        object_key = self._object_key(namespace, key)
        if if_none_match and if_match is not None:
            raise ValueError("if_none_match and if_match exclude each other")
        check_blob_size(key, data, self.max_blob_bytes)
        conditions: dict[str, str] = {}
        if if_none_match:
            conditions["IfNoneMatch"] = "*"
        elif if_match is not None:
            conditions["IfMatch"] = _quoted(if_match)
        # A conditional PUT on an absent key answers 404 on some servers: same meaning.
        absent = ConditionFailed(f"{namespace}/{key}: absent") if if_match is not None else None
        if len(data) > MULTIPART_THRESHOLD:
            return await self._put_multipart(object_key, bytes(data), conditions, absent)
        response = await self._call(
            "put",
            partial(
                self._client.put_object,
                Bucket=self.bucket,
                Key=object_key,
                Body=bytes(data),
                **conditions,
            ),
            missing=absent,
        )
        return _etag(response["ETag"])

    async def _put_multipart(
        self,
        object_key: str,
        data: bytes,
        conditions: dict[str, str],
        absent: ConditionFailed | None,
    ) -> str:
        if "IfMatch" in conditions:  # see the module docstring: moto ignores it on Complete
            head = await self._head(object_key)
            if head is None or _quoted(head) != conditions["IfMatch"]:
                raise ConditionFailed(f"{object_key}: etag differs")
        created = await self._call(
            "put",
            partial(self._client.create_multipart_upload, Bucket=self.bucket, Key=object_key),
        )
        upload_id = created["UploadId"]
        try:
            gate = asyncio.Semaphore(MULTIPART_CONCURRENCY)

            async def upload(number: int, start: int) -> dict[str, Any]:
                async with gate:
                    part = await self._call(
                        "put",
                        partial(
                            self._client.upload_part,
                            Bucket=self.bucket,
                            Key=object_key,
                            UploadId=upload_id,
                            PartNumber=number,
                            Body=data[start : start + MULTIPART_PART_SIZE],
                        ),
                    )
                return {"PartNumber": number, "ETag": part["ETag"]}

            parts = await asyncio.gather(
                *(
                    upload(n, start)
                    for n, start in enumerate(range(0, len(data), MULTIPART_PART_SIZE), 1)
                )
            )
            response = await self._call(
                "put",
                partial(
                    self._client.complete_multipart_upload,
                    Bucket=self.bucket,
                    Key=object_key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": list(parts)},
                    **conditions,
                ),
                missing=absent,
            )
        except BaseException:
            with contextlib.suppress(StorageError):
                await self._call(
                    "put",
                    partial(
                        self._client.abort_multipart_upload,
                        Bucket=self.bucket,
                        Key=object_key,
                        UploadId=upload_id,
                    ),
                )
            raise
        return _etag(response["ETag"])

    async def _head(self, object_key: str) -> str | None:
        response = await self._call(
            "head",
            partial(self._client.head_object, Bucket=self.bucket, Key=object_key),
            missing=_NOT_FOUND,
        )
        return None if response is _NOT_FOUND else _etag(response["ETag"])

    @admitted
    async def delete(self, namespace: str, key: str, *, if_match: str | None = None) -> bool:
        object_key = self._object_key(namespace, key)
        if if_match is None:
            if await self._head(object_key) is None:
                return False
            await self._call(
                "delete", partial(self._client.delete_object, Bucket=self.bucket, Key=object_key)
            )
            return True
        await self._call(
            "delete",
            partial(
                self._client.delete_object,
                Bucket=self.bucket,
                Key=object_key,
                IfMatch=_quoted(if_match),
            ),
            missing=ConditionFailed(f"{namespace}/{key}: absent"),
        )
        return True

    @admitted
    async def list(
        self, namespace: str, prefix: str = "", *, limit: int = 1000, page_token: str | None = None
    ) -> BlobPage:
        if limit < 1:
            raise ValueError("list limit must be at least 1")
        base = namespace_prefix(namespace)
        # No delimiter: long keys span several "directories". Objects of nested
        # namespaces ("<ns>/x" lives under "<ns>/x/") fail to unescape and are skipped.
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": base + escape_part(prefix)}
        if page_token is not None:
            (after,) = decode_token(page_token, 1)
            if not isinstance(after, str):
                raise ValueError("bad page token")
            args["StartAfter"] = base + escape_part(after)
        keys: list[str] = []
        while True:
            args["MaxKeys"] = min(MAX_LIST_KEYS, limit + 1 - len(keys))
            response = await self._call("list", partial(self._client.list_objects_v2, **args))
            for obj in response.get("Contents", []):
                name = obj["Key"][len(base) :]
                with contextlib.suppress(ValueError):  # not an object we wrote
                    keys.append(unescape_part(name))
            token = response.get("NextContinuationToken")
            if len(keys) > limit or not response.get("IsTruncated") or not token:
                break
            args.pop("StartAfter", None)
            args["ContinuationToken"] = token
        if len(keys) > limit:
            keys = keys[:limit]
            return BlobPage(keys, encode_token([keys[-1]]))
        return BlobPage(keys, None)

    @admitted
    async def presign(
        self, namespace: str, key: str, method: Literal["GET", "PUT"], expires: int = 300
    ) -> str | None:
        client_method = {"GET": "get_object", "PUT": "put_object"}[method]
        url = await self._client.generate_presigned_url(
            client_method,
            Params={"Bucket": self.bucket, "Key": self._object_key(namespace, key)},
            ExpiresIn=expires,
        )
        return str(url)

    @admitted
    async def namespaces(self) -> builtins.list[str]:
        """Every namespace holding a blob: a delimiter walk, one listing per level."""
        found: list[str] = []

        async def walk(prefix: str, parts: list[str], pending: str) -> None:
            """`parts`: namespace parts decoded so far; `pending`: the escaped start of a
            part cut over CONTINUED segments (or of a long key: objects tell)."""
            args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "Delimiter": "/"}
            has_objects = False
            children: list[str] = []
            while True:
                response = await self._call(
                    "namespaces", partial(self._client.list_objects_v2, **args)
                )
                has_objects = has_objects or bool(response.get("Contents"))
                children += [p["Prefix"] for p in response.get("CommonPrefixes", [])]
                token = response.get("NextContinuationToken")
                if not response.get("IsTruncated") or not token:
                    break
                args["ContinuationToken"] = token
            if has_objects and parts and "/".join(parts) not in found:
                found.append("/".join(parts))
            for child in children:
                segment = child[len(prefix) : -1]
                if segment.endswith("!!"):
                    await walk(child, parts, pending + segment + "/")
                    continue
                with contextlib.suppress(ValueError):
                    await walk(child, [*parts, unescape_part(pending + segment)], "")

        await walk("", [], "")
        return sorted(found)

    async def close(self) -> None:
        await self._client.close()


def _without_expect_header(client: Any) -> None:
    client.meta.events.unregister("before-call.s3", add_expect_header)  # see the docstring


def _retryable(exc: BaseException) -> bool:
    # AWS answers 409 ConditionalRequestConflict when two conditional writes race: retry.
    if isinstance(exc, ClientError) and error_code(exc) == "ConditionalRequestConflict":
        return True
    return is_retryable(exc)


class _AlreadyThere(Exception):
    """Internal: create_bucket found the bucket in place."""


_NOT_FOUND: Any = object()
