"""Typed storage settings: which item store, blob store and cache to use.

Each backend has its own model with a `backend` literal, so a YAML file picks
one by name and an unknown or misspelt key is an error, not a silent default.
Relative paths are relative to the server's data directory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

MiB = 1024 * 1024


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SQLiteItemsConfig(_Model):
    backend: Literal["sqlite"] = "sqlite"
    path: str = "items.sqlite3"


class DynamoDBItemsConfig(_Model):
    backend: Literal["dynamodb"]
    table: str = "xmppd"
    region: str = "us-east-1"
    endpoint_url: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    max_connections: int = Field(default=32, gt=0)
    timeout: float = Field(default=5.0, gt=0)
    retries: int = Field(default=5, ge=0)
    create_table: bool = False


class FilesBlobsConfig(_Model):
    backend: Literal["files"] = "files"
    path: str = "blobs"
    max_blob_bytes: int = Field(default=16 * MiB, gt=0)


class S3BlobsConfig(_Model):
    backend: Literal["s3"]
    bucket: str = Field(min_length=1)
    region: str = "us-east-1"
    endpoint_url: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    max_connections: int = Field(default=32, gt=0)
    timeout: float = Field(default=10.0, gt=0)
    retries: int = Field(default=5, ge=0)
    max_blob_bytes: int = Field(default=64 * MiB, gt=0)
    create_bucket: bool = False


class MemoryCacheConfig(_Model):
    backend: Literal["memory"] = "memory"
    max_items: int = Field(default=100_000, gt=0)
    max_value_bytes: int = Field(default=65536, gt=0)
    ttl: int = Field(default=300, ge=0)  # seconds; 0 = until evicted


class MemcachedCacheConfig(_Model):
    backend: Literal["memcached"]
    servers: list[str] = Field(min_length=1)
    max_value_bytes: int = Field(default=65536, gt=0, le=MiB)  # memcached's default item size cap
    ttl: int = Field(default=300, ge=0)
    timeout: float = Field(default=0.25, gt=0)
    down_for: float = Field(default=30.0, ge=0)  # seconds a failed server is skipped
    pool_size: int = Field(default=4, gt=0)

    @field_validator("servers")
    @classmethod
    def _host_port(cls, servers: list[str]) -> list[str]:
        for server in servers:
            host, sep, port = server.rpartition(":")
            host = host.removeprefix("[").removesuffix("]")  # [::1]:11211
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{server!r}: expected host:port, e.g. 127.0.0.1:11211")
        return servers


class NoCacheConfig(_Model):
    backend: Literal["none"]


def _backend_or(default: str) -> Callable[[Any], str | None]:
    """Pick the model by `backend`, defaulting to the embedded one when the key
    is left out (so `items: {path: x.db}` means SQLite, not an error)."""

    def tag(value: Any) -> str | None:
        if isinstance(value, dict):
            return value.get("backend", default)
        return getattr(value, "backend", None)

    return tag


ItemsConfig = Annotated[
    Annotated[SQLiteItemsConfig, Tag("sqlite")] | Annotated[DynamoDBItemsConfig, Tag("dynamodb")],
    Discriminator(_backend_or("sqlite")),
]
BlobsConfig = Annotated[
    Annotated[FilesBlobsConfig, Tag("files")] | Annotated[S3BlobsConfig, Tag("s3")],
    Discriminator(_backend_or("files")),
]
CacheConfig = Annotated[
    Annotated[MemoryCacheConfig, Tag("memory")]
    | Annotated[MemcachedCacheConfig, Tag("memcached")]
    | Annotated[NoCacheConfig, Tag("none")],
    Discriminator(_backend_or("memory")),
]


class StorageConfig(_Model):
    items: ItemsConfig = Field(default_factory=lambda: SQLiteItemsConfig())
    blobs: BlobsConfig = Field(default_factory=lambda: FilesBlobsConfig())
    cache: CacheConfig = Field(default_factory=lambda: MemoryCacheConfig())
