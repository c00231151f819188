"""The embedded blob store: one file per blob under a root folder.

Keys become paths that cannot leave the root and keep every key distinct:

* the namespace is one directory; inside it each '/'-separated part of the key
  is a directory (so listing "alice@example.com/" reads only that directory);
* every byte outside [A-Za-z0-9_.@-] is written %XX, and so is a '.' that
  starts a path segment, so no segment is "." or ".." or hidden;
* a directory standing for a key part ends in "~"; parts longer than
  200 characters are split into directories ending in "+", keeping every
  name under the 255-byte file-name limit; files carry no suffix.

Files whose names start with "." are ours (temporary files, the lock file)
and never keys. A blob is written to a temporary file and renamed over the
old one, so readers see the old or the new content, never a mix. Writes and
deletes in one namespace take a lock file (flock), which makes the etag check
of a conditional write and the write itself one step even across processes;
inside this process a per-key asyncio lock queues writers before they take a
thread. The etag is the SHA-256 of the content, in hex.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import hashlib
import os
import secrets
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..base import (
    PRIVATE_DIR,
    Blob,
    BlobBackend,
    BlobPage,
    ConditionFailed,
    NoStoreYet,
    StorageError,
    check_blob_size,
    check_key,
)
from ..config import FilesBlobsConfig

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.@-")
_DOT = ord(".")
_CHUNK = 200
_PART_DIR = "~"
_MORE_DIR = "+"
_EMPTY = "%"  # an empty key part; a real escape always has two hex digits
_LOCK = ".lock"


def _encode_part(part: str) -> list[str]:
    """The path-safe chunks of one key part (joined, they decode back to it)."""
    if not part:
        return [_EMPTY]
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for byte in part.encode("utf-8"):
        token = chr(byte) if byte in _SAFE and not (byte == _DOT and size == 0) else f"%{byte:02X}"
        if size + len(token) > _CHUNK:
            chunks.append("".join(current))
            current, size = [], 0
            if byte == _DOT:
                token = "%2E"
        current.append(token)
        size += len(token)
    chunks.append("".join(current))
    return chunks


def _decode_part(text: str) -> str:
    """Inverse of _encode_part on the joined chunks; ValueError for foreign names."""
    if text == _EMPTY:
        return ""
    out = bytearray()
    i = 0
    while i < len(text):
        char = text[i]
        if char == "%":
            hex_digits = text[i + 1 : i + 3]
            if len(hex_digits) != 2 or hex_digits.upper() != hex_digits:
                raise ValueError(f"bad escape in {text!r}")
            out.append(int(hex_digits, 16))
            i += 3
        elif ord(char) < 128 and ord(char) in _SAFE:
            out.append(ord(char))
            i += 1
        else:
            raise ValueError(f"unexpected {char!r} in {text!r}")
    return out.decode("utf-8")


def _segments(part: str, last_suffix: str) -> list[str]:
    chunks = _encode_part(part)
    return [chunk + _MORE_DIR for chunk in chunks[:-1]] + [chunks[-1] + last_suffix]


def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FileBlobBackend(BlobBackend):
    name = "files"

    def __init__(self, root: Path, *, max_blob_bytes: int = 16 * 1024 * 1024) -> None:
        self.root = Path(root)
        self.max_blob_bytes = max_blob_bytes
        self._locks: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    @classmethod
    async def open(
        cls, root: Path, *, max_blob_bytes: int = 16 * 1024 * 1024, read_only: bool = False
    ) -> FileBlobBackend:
        """Create the folder now, so a bad path fails at startup; `read_only`: only
        open a folder that exists (NoStoreYet if none)."""
        backend = cls(root, max_blob_bytes=max_blob_bytes)
        if read_only:
            if not await asyncio.to_thread(backend.root.is_dir):
                raise NoStoreYet(cls.name, str(root))
            return backend
        try:
            await asyncio.to_thread(
                backend.root.mkdir, mode=PRIVATE_DIR, parents=True, exist_ok=True
            )
        except OSError as exc:
            raise StorageError(cls.name, "open", f"{root}: {exc}") from exc
        return backend

    @classmethod
    async def from_config(
        cls, cfg: FilesBlobsConfig, data_dir: Path, *, read_only: bool = False
    ) -> FileBlobBackend:
        return await cls.open(
            data_dir / cfg.path, max_blob_bytes=cfg.max_blob_bytes, read_only=read_only
        )

    def describe(self) -> str:
        return f"files {self.root}"

    # -- paths -----------------------------------------------------------------

    def _namespace_dir(self, namespace: str) -> Path:
        return self.root.joinpath(*_segments(namespace, _PART_DIR))

    def _path(self, namespace: str, key: str) -> Path:
        parts = key.split("/")
        segments: list[str] = []
        for part in parts[:-1]:
            segments += _segments(part, _PART_DIR)
        segments += _segments(parts[-1], "")
        return self._namespace_dir(namespace).joinpath(*segments)

    def _lock(self, namespace: str, key: str) -> asyncio.Lock:
        lock = self._locks.get((namespace, key))
        if lock is None:
            lock = self._locks[(namespace, key)] = asyncio.Lock()
        return lock

    # -- blocking helpers (run in a thread) --------------------------------------

    @staticmethod
    @contextmanager
    def _namespace_lock(ns_dir: Path) -> Iterator[None]:
        ns_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(ns_dir / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # also releases the flock

    @staticmethod
    def _read(path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    @classmethod
    def _get_sync(cls, path: Path) -> tuple[bytes, str] | None:
        data = cls._read(path)
        return None if data is None else (data, _etag(data))

    @classmethod
    def _check(cls, path: Path, if_none_match: bool, if_match: str | None) -> None:
        if not if_none_match and if_match is None:
            return
        data = cls._read(path)
        if if_none_match and data is not None:
            raise ConditionFailed(f"{path.name}: exists")
        if if_match is not None and (data is None or _etag(data) != if_match):
            raise ConditionFailed(f"{path.name}: etag differs from {if_match}")

    def _put_sync(
        self, ns_dir: Path, path: Path, data: bytes, if_none_match: bool, if_match: str | None
    ) -> str:
        etag = _etag(data)  # hashing megabytes belongs off the event loop too
        with self._namespace_lock(ns_dir):
            self._check(path, if_none_match, if_match)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f".tmp-{secrets.token_hex(8)}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        return etag

    def _delete_sync(self, ns_dir: Path, path: Path, if_match: str | None) -> bool:
        if not ns_dir.is_dir():
            if if_match is not None:
                raise ConditionFailed(f"{path.name}: absent")
            return False
        with self._namespace_lock(ns_dir):
            self._check(path, False, if_match)
            try:
                path.unlink()
            except (FileNotFoundError, NotADirectoryError):
                return False
            for parent in path.parents:  # drop directories the key no longer needs
                if parent == ns_dir:
                    break
                try:
                    parent.rmdir()
                except OSError:
                    break
            return True

    def _walk(self, directory: Path, done: list[str], pending: str, first: str) -> Iterator[str]:
        """Keys under `directory`. `done` are decoded parts above it, `pending`
        the encoded start of a part split over "+" directories; entries whose
        name cannot start `first` (the encoded prefix part) are skipped."""
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            stem = name[:-1] if name[-1] in (_PART_DIR, _MORE_DIR) else name
            text = pending + stem
            if first and not (text.startswith(first) or first.startswith(text)):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    if name.endswith(_PART_DIR):
                        yield from self._walk(Path(entry.path), [*done, _decode_part(text)], "", "")
                    elif name.endswith(_MORE_DIR):
                        yield from self._walk(Path(entry.path), done, text, first)
                elif entry.is_file(follow_symlinks=False) and name == stem:
                    yield "/".join([*done, _decode_part(text)])
            except ValueError:
                continue  # not a name we wrote

    def _list_sync(self, namespace: str, prefix: str) -> list[str]:
        directory = self._namespace_dir(namespace)
        parts = prefix.split("/")
        for part in parts[:-1]:
            directory = directory.joinpath(*_segments(part, _PART_DIR))
        first = "".join(_encode_part(parts[-1])) if parts[-1] else ""
        return sorted(
            key for key in self._walk(directory, parts[:-1], "", first) if key.startswith(prefix)
        )

    def _namespaces_sync(self) -> list[str]:
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            if not entry.name.endswith(_PART_DIR) or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                namespace = _decode_part(entry.name[: -len(_PART_DIR)])
            except ValueError:
                continue
            if next(self._walk(Path(entry.path), [], "", ""), None) is not None:
                found.append(namespace)
        return sorted(found)

    # -- BlobBackend -----------------------------------------------------------

    async def get(self, namespace: str, key: str) -> Blob | None:
        check_key(key)
        try:
            found = await asyncio.to_thread(self._get_sync, self._path(namespace, key))
        except OSError as exc:
            raise StorageError(self.name, "get", f"{key!r}: {exc}") from exc
        return None if found is None else Blob(key, *found)

    async def put(
        self,
        namespace: str,
        key: str,
        data: bytes,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        check_key(key)
        check_blob_size(key, data, self.max_blob_bytes)
        data = bytes(data)
        async with self._lock(namespace, key):
            try:
                return await asyncio.to_thread(
                    self._put_sync,
                    self._namespace_dir(namespace),
                    self._path(namespace, key),
                    data,
                    if_none_match,
                    if_match,
                )
            except OSError as exc:
                raise StorageError(self.name, "put", f"{key!r}: {exc}") from exc

    async def delete(self, namespace: str, key: str, *, if_match: str | None = None) -> bool:
        check_key(key)
        async with self._lock(namespace, key):
            try:
                return await asyncio.to_thread(
                    self._delete_sync,
                    self._namespace_dir(namespace),
                    self._path(namespace, key),
                    if_match,
                )
            except OSError as exc:
                raise StorageError(self.name, "delete", f"{key!r}: {exc}") from exc

    async def namespaces(self) -> list[str]:
        """Every namespace holding at least one blob, sorted (for migration)."""
        try:
            return await asyncio.to_thread(self._namespaces_sync)
        except OSError as exc:
            raise StorageError(self.name, "namespaces", str(exc)) from exc

    async def list(
        self, namespace: str, prefix: str = "", *, limit: int = 1000, page_token: str | None = None
    ) -> BlobPage:
        if limit < 1:
            raise ValueError("list limit must be at least 1")
        after = decode_list_token(page_token) if page_token else None
        try:
            keys = await asyncio.to_thread(self._list_sync, namespace, prefix)
        except OSError as exc:
            raise StorageError(self.name, "list", f"{prefix!r}: {exc}") from exc
        if after is not None:
            keys = [key for key in keys if key > after]
        page = keys[:limit]
        more = len(keys) > limit
        return BlobPage(page, encode_list_token(page[-1]) if more else None)


def encode_list_token(last_key: str) -> str:
    """A listing token: the last key returned (so it survives inserts between pages)."""
    return base64.urlsafe_b64encode(last_key.encode("utf-8")).decode("ascii")


def decode_list_token(token: str) -> str:
    try:
        return base64.urlsafe_b64decode(token.encode("ascii")).decode("utf-8")
    except (ValueError, UnicodeError) as exc:
        raise ValueError(f"bad page token: {exc}") from None
