"""xmppctl check opens every store on its own and says which answer and which do not.

Real stores: SQLite and files (embedded), DynamoDB on moto, S3 on SeaweedFS and
a memcached ring (cloud, CI=true), and a real Redis for the cluster section.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import cloud_storage, write_config
from tests.storage.services import service_factory  # noqa: F401  (fixture)
from tests.unit.test_ctl import Stdin
from xmppd.cli.ctl import main
from xmppd.storage import devservices
from xmppd.storage.devservices import LocalService

pytestmark = pytest.mark.timeout(60)


def check(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, list[str], str]:
    monkeypatch.setattr(sys, "stdin", Stdin(""))
    code = main(["-c", str(config), "check"])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def test_every_store_and_redis_answer(
    tmp_path: Path,
    storage_section: dict[str, Any] | None,
    service_factory: Callable[[Callable[[], LocalService]], LocalService],  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    redis = service_factory(devservices.redis_server)
    sections: dict[str, Any] = {"cluster": {"redis_url": devservices.redis_url(redis)}}
    if storage_section is not None:
        sections["storage"] = storage_section
    config = write_config(tmp_path, **sections)
    code, lines, err = check(config, capsys, monkeypatch)
    assert (code, err) == (0, "")
    where = (
        (tmp_path / "data" / "items.sqlite3", tmp_path / "data" / "blobs")
        if storage_section is None
        else (f"table {storage_section['items']['table']}",
              f"bucket {storage_section['blobs']['bucket']}")
    )
    # Before a first start: nothing there yet, and check makes nothing.
    assert [line for line in lines if line.startswith(("items", "blobs"))] == [
        f"{part}: warning: no store at {store} yet (the server creates it at first start)"
        for part, store in zip(("items", "blobs"), where, strict=True)
    ]
    assert lines[-1] == f"{config}: OK (3 warnings)"
    monkeypatch.setattr(sys, "stdin", Stdin("pw\n"))
    assert main(["-c", str(config), "register", "a@localhost"]) == 0  # makes the stores
    capsys.readouterr()

    code, lines, err = check(config, capsys, monkeypatch)
    assert (code, err) == (0, "")
    stores = [line for line in lines if not line.startswith(("certificate", "allocator"))]
    expected = (
        [
            f"items: ok: sqlite {tmp_path / 'data' / 'items.sqlite3'}",
            f"blobs: ok: files {tmp_path / 'data' / 'blobs'}",
            "cache: ok: in-process LRU",
        ]
        if storage_section is None
        else [
            f"items: ok: dynamodb table {storage_section['items']['table']} at ",
            f"blobs: ok: s3 bucket {storage_section['blobs']['bucket']} at ",
            *(
                f"cache memcached {server}: ok: memcached 1."
                for server in storage_section["cache"]["servers"]
            ),
        ]
    )
    expected += [f"cluster redis redis://127.0.0.1:{redis.port}/0: ok: redis "]
    assert len(stores) == len(expected) + 1
    for line, start in zip(stores, expected, strict=False):
        assert line.startswith(start), (line, start)
        assert " answered in " in line
    assert stores[-1] == f"{config}: OK (1 warning)"  # the certificate is not made yet


@pytest.mark.usefixtures("memcached_ring")
def test_each_store_that_does_not_answer_is_an_error(
    tmp_path: Path,
    moto_service: LocalService,
    seaweedfs_service: LocalService,
    memcached_ring: list[LocalService],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage = cloud_storage(moto_service, seaweedfs_service, memcached_ring)
    storage["blobs"]["create_bucket"] = False  # and it does not exist
    dead_memcached, dead_redis = devservices.free_ports(2)
    live = storage["cache"]["servers"][0]
    storage["cache"]["servers"] = [live, f"127.0.0.1:{dead_memcached}"]
    config = write_config(
        tmp_path,
        storage=storage,
        cluster={"redis_url": f"redis://:hunter2@127.0.0.1:{dead_redis}/0"},
    )
    code, lines, err = check(config, capsys, monkeypatch)
    stores = [line for line in lines if not line.startswith(("certificate", "allocator"))]
    table = storage["items"]["table"]  # create_table: the server would make it
    assert stores[0] == (
        f"items: warning: no store at table {table} yet (the server creates it at first start)"
    )
    bucket = storage["blobs"]["bucket"]
    assert stores[1].startswith("blobs: error: ") and bucket in stores[1], stores[1]
    assert stores[2].startswith(f"cache memcached {live}: ok: memcached 1.")
    assert stores[3].startswith(f"cache memcached 127.0.0.1:{dead_memcached}: error: ")
    assert stores[4].startswith(f"cluster redis redis://***@127.0.0.1:{dead_redis}/0: error: ")
    assert "hunter2" not in "\n".join(lines)
    assert len(stores) == 5
    assert (code, err) == (1, f"xmppctl: {config}: 3 errors\n")
