"""The cloud item store: one DynamoDB table (or any DynamoDB-compatible service).

Layout: every namespace shares one table. Partition key `ns` = namespace, sort
key `name` = item name, so a namespace is one partition: prefix queries and
paging by name are DynamoDB Queries (never Scans) and come back in name order.
Next to the key each row holds
  * `version` (N): bumped by every write with `ADD`, so conditions compare it;
  * `attrs` (M): the user attributes as a map of S / N / B values (str, int and
    bytes stay distinct);
  * `expires_at` (N, optional): see "Expiry" below.
User attributes live *inside* the `attrs` map rather than beside the internal
ones: no user attribute name can collide with `version`, and a put replaces
the whole map, bumps the version and checks its condition in one UpdateItem —
with top-level attributes, replacing an item would need the old attribute
names first (a read, and a race).

Reads are strongly consistent (a read after a conditional write must see it).

Queries: by name (the default) in either direction natively; `where` is a
FilterExpression on `attrs.<name>`. Ordering by an attribute cannot use an
index (the attributes are in a map and differ per store), so it reads every
matching item of the namespace and sorts in memory: up to SORT_CAP items, over
that a StorageError says so rather than returning a wrong order. Stores that
order big collections by an attribute should key their item names by that
attribute instead.

batch_put runs concurrent UpdateItems, not BatchWriteItem: BatchWriteItem
cannot bump a version atomically, and two writers computing "old + 1" would
issue the same version twice and break conditional writes. batch_get is
BatchGetItem (100 keys per call) with unprocessed keys retried after a jittered
backoff. transact is TransactWriteItems (up to 100 writes, any namespaces).

Expiry: an item whose attributes include an int `expires_at` (Unix seconds)
gets it copied to the top-level `expires_at`, the table's TTL attribute, so
DynamoDB deletes the item some time after that (typically within days). It is
a reclamation hint, not a read filter: until DynamoDB deletes the item it is
read like any other, exactly as on the SQLite backend, and readers that care
compare `expires_at` with the clock themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from decimal import Decimal
from functools import partial
from typing import Any

from botocore.exceptions import ClientError

from ..base import (
    Attrs,
    AttrValue,
    ConditionFailed,
    Delete,
    Item,
    ItemBackend,
    NoStoreYet,
    Page,
    Put,
    Query,
    StorageError,
    TooLarge,
    Write,
    check_condition,
    check_item,
    check_key,
    check_query,
    check_writes,
)
from ..codec import decode_token, encode_token
from ..config import DynamoDBItemsConfig
from ._aws import (
    AwsCaller,
    AwsClient,
    ClientSettings,
    admitted,
    error_code,
    is_retryable,
    open_client,
)

NS, NAME, VERSION, ATTRS, EXPIRES = "ns", "name", "version", "attrs", "expires_at"
SORT_CAP = 10_000  # items read and sorted in memory for order_by an attribute
BATCH_GET_KEYS = 100  # BatchGetItem's limit
TRANSACT_WRITES = 100  # TransactWriteItems' limit
BATCH_PUT_CONCURRENCY = 16

_TYPE_RANK = {int: 0, str: 1, bytes: 2}  # the contract's cross-type order


def encode_value(value: AttrValue) -> dict[str, Any]:
    if isinstance(value, int):
        return {"N": str(value)}
    if isinstance(value, str):
        return {"S": value}
    return {"B": bytes(value)}


def decode_value(raw: Mapping[str, Any]) -> AttrValue:
    if "S" in raw:
        return str(raw["S"])
    if "N" in raw:
        return int(Decimal(raw["N"]))
    if "B" in raw:
        return bytes(raw["B"])
    raise ValueError(f"unexpected DynamoDB value {raw!r}")


def decode_item(row: Mapping[str, Any]) -> Item:
    attrs = {key: decode_value(value) for key, value in row.get(ATTRS, {}).get("M", {}).items()}
    return Item(row[NAME]["S"], attrs, int(row[VERSION]["N"]))


def _sort_key(value: AttrValue, name: str) -> tuple[int, AttrValue, str]:
    return (_TYPE_RANK[type(value)], value, name)


class DynamoDBItemBackend(ItemBackend):
    name = "dynamodb"

    def __init__(
        self,
        client: AwsClient,
        table: str,
        caller: AwsCaller,
    ) -> None:
        """`client` runs its calls on the AWS I/O loop (see _aws)."""
        self._client = client
        self.table = table
        self._caller = caller

    @classmethod
    async def from_config(
        cls, cfg: DynamoDBItemsConfig, *, read_only: bool = False
    ) -> DynamoDBItemBackend:
        """Connect, then create the table (cfg.create_table, unless `read_only`) or check
        that it exists, so a wrong table name fails at startup rather than at the first
        login."""
        settings = ClientSettings.from_config(cfg)
        client = await open_client("dynamodb", settings)
        where = f"table {cfg.table} at {cfg.endpoint_url or 'AWS ' + cfg.region}"
        backend = cls(client, cfg.table, AwsCaller(cls.name, where, cfg.retries + 1))
        try:
            if cfg.create_table and not read_only:
                await backend.create_table()
            else:
                await backend._describe_table(made_at_start=cfg.create_table)
        except BaseException:
            await client.close()
            raise
        return backend

    def describe(self) -> str:
        return f"dynamodb {self._caller.where}"

    # -- table management ------------------------------------------------------

    async def _describe_table(self, made_at_start: bool = False) -> dict[str, Any]:
        """The table's description; a missing one is NoStoreYet when the server would
        create it (`made_at_start`, for xmppctl check), else an error saying so."""

        def classify(exc: ClientError) -> BaseException | None:
            if error_code(exc) == "ResourceNotFoundException":
                if made_at_start:
                    return NoStoreYet(self.name, f"table {self.table}")
                return StorageError(
                    self.name, "open", f"table {self.table} does not exist (set create_table)"
                )
            return None

        response = await self._call(
            "open", lambda: self._client.describe_table(TableName=self.table), classify
        )
        return dict(response["Table"])

    async def create_table(self) -> None:
        """Create the table (on-demand billing) if missing, wait for it, and enable TTL on
        `expires_at`. Safe to run from several nodes at once."""

        def exists(exc: ClientError) -> BaseException | None:
            return _AlreadyThere() if error_code(exc) == "ResourceInUseException" else None

        with contextlib.suppress(_AlreadyThere):
            await self._call(
                "create_table",
                lambda: self._client.create_table(
                    TableName=self.table,
                    KeySchema=[
                        {"AttributeName": NS, "KeyType": "HASH"},
                        {"AttributeName": NAME, "KeyType": "RANGE"},
                    ],
                    AttributeDefinitions=[
                        {"AttributeName": NS, "AttributeType": "S"},
                        {"AttributeName": NAME, "AttributeType": "S"},
                    ],
                    BillingMode="PAY_PER_REQUEST",
                ),
                exists,
            )
        for _ in range(600):
            if (await self._describe_table()).get("TableStatus") == "ACTIVE":
                break
            await asyncio.sleep(0.1)
        else:
            raise StorageError(self.name, "create_table", f"table {self.table} never became ACTIVE")
        ttl = await self._call(
            "create_table", lambda: self._client.describe_time_to_live(TableName=self.table)
        )
        if ttl.get("TimeToLiveDescription", {}).get("TimeToLiveStatus") in ("ENABLED", "ENABLING"):
            return
        with contextlib.suppress(_AlreadyThere):
            await self._call(
                "create_table",
                lambda: self._client.update_time_to_live(
                    TableName=self.table,
                    TimeToLiveSpecification={"Enabled": True, "AttributeName": EXPIRES},
                ),
                lambda exc: _AlreadyThere() if error_code(exc) == "ValidationException" else None,
            )

    # -- plumbing --------------------------------------------------------------

    async def _call(
        self,
        operation: str,
        fn: Callable[[], Awaitable[Any]],
        classify: Callable[[ClientError], BaseException | None] | None = None,
    ) -> Any:
        try:
            return await self._caller.call(operation, fn, classify)
        except StorageError as exc:  # DynamoDB says "too large" only in a message
            cause = exc.__cause__
            if isinstance(cause, ClientError) and error_code(cause) == "ValidationException":
                message = str(cause.response.get("Error", {}).get("Message", ""))
                if "size" in message.lower() and "exceed" in message.lower():
                    raise TooLarge(f"dynamodb: {operation}: {message}") from cause
            raise

    def _key(self, namespace: str, name: str) -> dict[str, Any]:
        return {NS: {"S": namespace}, NAME: {"S": name}}

    def _update(
        self, namespace: str, name: str, attrs: Attrs, if_absent: bool, if_version: int | None
    ) -> dict[str, Any]:
        """The UpdateItem arguments for a whole-item put (also a TransactWriteItems Update)."""
        names = {"#a": ATTRS, "#v": VERSION, "#t": EXPIRES}
        values: dict[str, Any] = {
            ":a": {"M": {key: encode_value(value) for key, value in attrs.items()}},
            ":one": {"N": "1"},
        }
        expires = attrs.get(EXPIRES)
        if isinstance(expires, int):
            expression = "SET #a = :a, #t = :t ADD #v :one"
            values[":t"] = {"N": str(expires)}
        else:
            expression = "SET #a = :a REMOVE #t ADD #v :one"
        args: dict[str, Any] = {
            "TableName": self.table,
            "Key": self._key(namespace, name),
            "UpdateExpression": expression,
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": values,
        }
        if if_absent:
            args["ConditionExpression"] = "attribute_not_exists(#v)"
        elif if_version is not None:
            args["ConditionExpression"] = "#v = :expected"
            values[":expected"] = {"N": str(if_version)}
        return args

    @staticmethod
    def _condition_failed(where: str) -> Callable[[ClientError], BaseException | None]:
        def classify(exc: ClientError) -> BaseException | None:
            if error_code(exc) == "ConditionalCheckFailedException":
                return ConditionFailed(f"{where}: condition failed")
            return None

        return classify

    # -- ItemBackend -----------------------------------------------------------

    @admitted
    async def get(self, namespace: str, name: str) -> Item | None:
        check_key(name)
        response = await self._call(
            "get",
            partial(
                self._client.get_item,
                TableName=self.table,
                Key=self._key(namespace, name),
                ConsistentRead=True,
            ),
        )
        row = response.get("Item")
        return decode_item(row) if row else None

    @admitted
    async def put(
        self,
        namespace: str,
        name: str,
        attrs: Attrs,
        *,
        if_absent: bool = False,
        if_version: int | None = None,
    ) -> Item:
        check_item(name, attrs)
        check_condition(if_absent, if_version)
        attrs = dict(attrs)
        args = self._update(namespace, name, attrs, if_absent, if_version)
        response = await self._call(
            "put",
            partial(self._client.update_item, **args, ReturnValues="UPDATED_NEW"),
            self._condition_failed(f"{namespace}/{name}"),
        )
        return Item(name, attrs, int(response["Attributes"][VERSION]["N"]))

    @admitted
    async def delete(self, namespace: str, name: str, *, if_version: int | None = None) -> bool:
        check_key(name)
        args: dict[str, Any] = {
            "TableName": self.table,
            "Key": self._key(namespace, name),
            "ReturnValues": "ALL_OLD",
        }
        if if_version is not None:
            args["ConditionExpression"] = "#v = :expected"
            args["ExpressionAttributeNames"] = {"#v": VERSION}
            args["ExpressionAttributeValues"] = {":expected": {"N": str(if_version)}}
        response = await self._call(
            "delete",
            partial(self._client.delete_item, **args),
            self._condition_failed(f"{namespace}/{name}"),
        )
        return bool(response.get("Attributes"))

    @admitted
    async def query(self, namespace: str, query: Query) -> Page:
        check_query(query)
        if query.order_by in (None, "name"):
            return await self._query_by_name(namespace, query)
        return await self._query_by_attr(namespace, query, query.order_by)

    def _query_args(self, namespace: str, query: Query, require: str | None) -> dict[str, Any]:
        names = {"#ns": NS}
        values: dict[str, Any] = {":ns": {"S": namespace}}
        key_condition = "#ns = :ns"
        if query.prefix:
            key_condition += " AND begins_with(#n, :prefix)"
            names["#n"] = NAME
            values[":prefix"] = {"S": query.prefix}
        filters = []
        for n, (key, value) in enumerate(query.where.items()):
            names[f"#w{n}"] = key
            values[f":w{n}"] = encode_value(value)
            filters.append(f"#a.#w{n} = :w{n}")
        if require is not None:
            names["#o"] = require
            filters.append("attribute_exists(#a.#o)")
        args: dict[str, Any] = {
            "TableName": self.table,
            "KeyConditionExpression": key_condition,
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": values,
            "ConsistentRead": True,
        }
        if filters:
            names["#a"] = ATTRS
            args["FilterExpression"] = " AND ".join(filters)
        return args

    async def _query_by_name(self, namespace: str, query: Query) -> Page:
        args = self._query_args(namespace, query, None)
        args["ScanIndexForward"] = not query.descending
        start: dict[str, Any] | None = None
        if query.page_token is not None:
            (last,) = decode_token(query.page_token, 1)
            if not isinstance(last, str):
                raise ValueError("bad page token")
            start = self._key(namespace, last)
        filtered = "FilterExpression" in args
        items: list[Item] = []
        while True:
            wanted = query.limit + 1 - len(items)
            # A filter drops rows after Limit is applied: read more per call then.
            args["Limit"] = max(wanted, 100) if filtered else wanted
            if start is not None:
                args["ExclusiveStartKey"] = start
            response = await self._call("query", partial(self._client.query, **args))
            items.extend(decode_item(row) for row in response.get("Items", []))
            start = response.get("LastEvaluatedKey")
            if len(items) > query.limit or start is None:
                break
        if len(items) > query.limit:
            items = items[: query.limit]
            return Page(items, encode_token([items[-1].name]))
        return Page(items, None)

    async def _query_by_attr(self, namespace: str, query: Query, attr: str) -> Page:
        args = self._query_args(namespace, query, attr)
        rows: list[Item] = []
        start: dict[str, Any] | None = None
        while True:
            if start is not None:
                args["ExclusiveStartKey"] = start
            response = await self._call("query", partial(self._client.query, **args))
            rows.extend(decode_item(row) for row in response.get("Items", []))
            if len(rows) > SORT_CAP:
                raise StorageError(
                    self.name,
                    "query",
                    f"order_by {attr!r} in {namespace} matches over {SORT_CAP} items, the"
                    " in-memory sort cap; key item names by that attribute instead",
                )
            start = response.get("LastEvaluatedKey")
            if start is None:
                break
        keyed = sorted(
            ((_sort_key(item.attrs[attr], item.name), item) for item in rows),
            key=lambda pair: pair[0],
            reverse=query.descending,
        )
        if query.page_token is not None:
            value, last = decode_token(query.page_token, 2)
            if not isinstance(last, str):
                raise ValueError("bad page token")
            after = _sort_key(value, last)
            keyed = [
                pair for pair in keyed if (pair[0] < after if query.descending else pair[0] > after)
            ]
        page = [item for _, item in keyed[: query.limit]]
        token = None
        if len(keyed) > query.limit:
            token = encode_token([page[-1].attrs[attr], page[-1].name])
        return Page(page, token)

    @admitted
    async def batch_get(self, namespace: str, names: Sequence[str]) -> dict[str, Item]:
        wanted = list(dict.fromkeys(names))
        for name in wanted:
            check_key(name)
        chunks = [wanted[i : i + BATCH_GET_KEYS] for i in range(0, len(wanted), BATCH_GET_KEYS)]
        found: dict[str, Item] = {}
        for rows in await asyncio.gather(*(self._batch_get_chunk(namespace, c) for c in chunks)):
            for row in rows:
                item = decode_item(row)
                found[item.name] = item
        return found

    async def _batch_get_chunk(self, namespace: str, names: list[str]) -> list[dict[str, Any]]:
        request: dict[str, Any] = {
            self.table: {
                "Keys": [self._key(namespace, name) for name in names],
                "ConsistentRead": True,
            }
        }
        rows: list[dict[str, Any]] = []
        for attempt in range(self._caller.max_attempts + 3):
            response = await self._call(
                "batch_get", partial(self._client.batch_get_item, RequestItems=request)
            )
            rows.extend(response.get("Responses", {}).get(self.table, []))
            request = response.get("UnprocessedKeys") or {}
            if not request:
                return rows
            await asyncio.sleep(self._caller.backoff(attempt + 1))
        raise StorageError(
            self.name, "batch_get", f"keys still unprocessed after retries [{self._caller.where}]"
        )

    async def batch_put(self, namespace: str, items: Mapping[str, Attrs]) -> None:
        """Not atomic: each item is its own write (see the module docstring); all are
        attempted, then the first failure, if any, is raised."""
        for name, attrs in items.items():
            check_item(name, attrs)
        gate = asyncio.Semaphore(BATCH_PUT_CONCURRENCY)

        async def one(name: str, attrs: Attrs) -> None:
            async with gate:
                await self.put(namespace, name, attrs)

        results = await asyncio.gather(
            *(one(name, attrs) for name, attrs in items.items()), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    @admitted
    async def transact(self, writes: Sequence[Write]) -> None:
        check_writes(writes)
        if not writes:
            return
        if len(writes) > TRANSACT_WRITES:
            raise ValueError(f"a transaction holds at most {TRANSACT_WRITES} writes")
        actions: list[dict[str, Any]] = []
        for write in writes:
            if isinstance(write, Put):
                update = self._update(
                    write.namespace, write.name, write.attrs, write.if_absent, write.if_version
                )
                actions.append({"Update": update})
            elif isinstance(write, Delete):
                delete: dict[str, Any] = {
                    "TableName": self.table,
                    "Key": self._key(write.namespace, write.name),
                }
                if write.if_version is not None:
                    delete["ConditionExpression"] = "#v = :expected"
                    delete["ExpressionAttributeNames"] = {"#v": VERSION}
                    delete["ExpressionAttributeValues"] = {
                        ":expected": {"N": str(write.if_version)}
                    }
                actions.append({"Delete": delete})

        def classify(exc: ClientError) -> BaseException | None:
            reasons = [r.get("Code") for r in exc.response.get("CancellationReasons", [])]
            if "ConditionalCheckFailed" in reasons:
                return ConditionFailed(f"transaction: condition failed ({reasons})")
            return None

        def retry_if(exc: BaseException) -> bool:
            if isinstance(exc, ClientError) and error_code(exc) == "TransactionCanceledException":
                reasons = {r.get("Code") for r in exc.response.get("CancellationReasons", [])}
                return reasons <= {"None", None, "TransactionConflict", "ThrottlingError"}
            return is_retryable(exc)

        await self._caller.call(
            "transact",
            lambda: self._client.transact_write_items(TransactItems=actions),
            classify,
            retry_if,
        )

    @admitted
    async def namespaces(self) -> list[str]:
        """Every namespace holding an item. A Scan of the key attribute: it reads the whole
        table, which is fine for migration and admin tools, never for serving."""
        found: set[str] = set()
        args: dict[str, Any] = {
            "TableName": self.table,
            "ProjectionExpression": "#ns",
            "ExpressionAttributeNames": {"#ns": NS},
            "ConsistentRead": True,
        }
        while True:
            response = await self._call("namespaces", partial(self._client.scan, **args))
            found.update(row[NS]["S"] for row in response.get("Items", []))
            start = response.get("LastEvaluatedKey")
            if start is None:
                return sorted(found)
            args["ExclusiveStartKey"] = start

    async def close(self) -> None:
        await self._client.close()


class _AlreadyThere(Exception):
    """Internal: create_table found the table (or its TTL setting) already in place."""
