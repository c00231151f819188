"""bench/chatload.py's count, without a server: the scanner and the merge of workers.

The scanner does not parse XML, so it is fed what a server writes in awkward
pieces: a message cut inside its tag, an error bounce, one of ours from an
earlier run, one that is not ours, a duplicate, the server's stream end. The
merge must reconcile a message sent by one worker and received by another,
and name what nobody received.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

NONCE = "ab12cd34"


@pytest.fixture(scope="module")
def chatload() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "bench" / "chatload.py"
    spec = importlib.util.spec_from_file_location("chatload", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["chatload"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def ours(id_: str, stamp: int, quote: str = "'") -> bytes:
    return (
        f"<message from={quote}user2@bench.local/chatload{quote} type={quote}chat{quote} "
        f"to={quote}user1@bench.local/chatload{quote} id={quote}{id_}{quote}>"
        f"<body>chatload:{id_}:{stamp} xxxx</body></message>"
    ).encode()


async def test_the_scanner_counts_whole_messages_once_in_any_pieces(chatload: Any) -> None:
    tally = chatload.Tally(NONCE.encode())
    client = chatload.Client(1, tally)
    stream = b"".join([
        ours(f"{NONCE}.0.0", 1000),
        b"<presence from='user1@bench.local/chatload'/>",
        ours(f"{NONCE}.1.7", 2000, quote='"'),
        b"<message type='error' id='" + f"{NONCE}.0.3".encode() + b"' to='user1@bench.local'>"
        b"<body>chatload:x:1 </body><error type='cancel'/></message>",
        ours("ffffffff.0.0", 3000),  # an earlier run's, stored offline then
        b"<message type='headline'><body>hello</body></message>",
        ours(f"{NONCE}.0.0", 1000),  # again
        b"</stream:stream>",
    ])
    for size in (1, 7, 8, 9, 64):  # every way of cutting it, one client each time
        tally.__init__(NONCE.encode())
        client.buf.clear()
        client.server_closed = False
        for at in range(0, len(stream), size):
            client.scan(stream[at : at + size])
        assert set(tally.got) == {f"{NONCE}.0.0", f"{NONCE}.1.7"}, size
        assert tally.dups == {f"{NONCE}.0.0": 1}
        assert tally.bounced == [f"{NONCE}.0.3"]
        assert (tally.stale, tally.foreign) == (1, 1)
        assert client.server_closed


def worker(n: int, sent: int, got: dict[str, int], **more: Any) -> dict[str, Any]:
    result = {
        "worker": n, "sent_ns": [10_000_000 * (i + 1) for i in range(sent)], "got": got,
        "dups": {}, "bounced": [], "stale": 0, "foreign": 0, "unsendable": 0,
        "lag_ms": None, "write_backlog_max_bytes": 0, "cpu_send_s": 0.0, "cpu_s": 0.0,
        "login_errors": {}, "streams": {}, "sm_acks": 0,
    }
    result.update(more)
    return result


def test_the_merge_reconciles_across_workers_and_names_the_missing(chatload: Any) -> None:
    results = [
        worker(0, 3, {f"{NONCE}.1.1": 2_000_000, f"{NONCE}.0.1": 1_000_000},
               dups={f"{NONCE}.0.1": 1}),
        worker(1, 2, {f"{NONCE}.0.0": 3_000_000}, bounced=[f"{NONCE}.1.0"]),
    ]
    summary = chatload.account(NONCE, results, 0.0, 1.0)
    assert summary["sent"] == 5
    assert summary["received_once"] == 2  # 0.0 (by the other worker) and 1.1
    assert summary["duplicates"] == 1  # 0.1
    assert summary["bounced"] == 1  # 1.0
    assert summary["missing"] == 1
    assert summary["missing_first"] == [f"{NONCE}.0.2"]
    assert summary["exact"] is False
    assert summary["latency_ms"]["max"] == 3.0

    everything = [worker(0, 2, {f"{NONCE}.1.0": 1, f"{NONCE}.0.1": 1}),
                  worker(1, 1, {f"{NONCE}.0.0": 1})]
    summary = chatload.account(NONCE, everything, 0.0, 1.0)
    assert (summary["received_once"], summary["missing"], summary["exact"]) == (3, 0, True)
