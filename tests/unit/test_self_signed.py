"""The embedded default's self-signed certificate, made by several processes at once.

`xmppd --workers N` starts N processes on one data_dir at the same moment: each
must end with a key that belongs to the certificate (CI once saw a worker refuse
to start with "key ... does not belong to the certificate").
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from xmppd.tls import ensure_self_signed, server_tls

pytestmark = pytest.mark.timeout(60)

WORKERS = 8


def _make(data_dir: str, start: multiprocessing.synchronize.Barrier) -> None:
    start.wait()
    cert, key = ensure_self_signed(Path(data_dir), ["localhost"])
    server_tls(cert, key)  # raises in this process if its pair is torn


def test_workers_starting_at_once_share_one_whole_pair(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    for attempt in range(3):  # a race: give it more than one chance to show
        data_dir = tmp_path / f"data-{attempt}"
        start = context.Barrier(WORKERS)
        workers = [
            context.Process(target=_make, args=(str(data_dir), start)) for _ in range(WORKERS)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(30)
        assert [w.exitcode for w in workers] == [0] * WORKERS
        cert, key = ensure_self_signed(data_dir, ["localhost"])
        server_tls(cert, key)
        assert sorted(p.name for p in cert.parent.iterdir()) == [
            ".selfsigned.lock",
            "selfsigned.crt",
            "selfsigned.key",
        ]
