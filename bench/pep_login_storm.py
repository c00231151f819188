"""A PEP login storm: 1,000 users with 50 contacts each, all with a nickname and
avatar metadata published, log in at once. Store reads per login, logins/s, CPU.

In-process and without sockets: the real roster, presence, caps and pep
modules and the router over the embedded item store (SQLite, in a temporary
directory), read through the in-process shared cache (`--cache on`, the
default) or straight (`--cache off`). Each login is a bound session sending
initial presence with entity capabilities asking for the nickname and the
avatar metadata ("+notify"); the caps hash is known already (as it is after
the first client of that version), so no disco#info goes out. Each login
gets the last item of both nodes of each of its 50 contacts and its own:
102 notifications, all checked.

The store reads counted are those that reach SQLite (behind the cache):
round trips (get, batch_get, query calls) and records, split by store.
The cache starts empty at the storm, as after a restart. `--wave N` logs
in N users at once, then the next N once those are done (the cache then
serves the later waves; all at once, the reads under way are shared).

    .venv/bin/python bench/pep_login_storm.py [--users 1000] [--contacts 50]
        [--cache on|off] [--wave N]

Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from lxml import etree

from xmppd.modules._pep_caps import CapsStore
from xmppd.modules.caps import CAPS, DISCO_INFO, Identity, verification_string
from xmppd.modules.pep import Pep
from xmppd.modules.roster import RosterItem, _encode
from xmppd.storage.backends.sqlite import SQLiteItemBackend
from xmppd.storage.base import Attrs, Item, ItemBackend, Page, Query, Write
from xmppd.storage.cache import CachedItemBackend, MemoryCache
from xmppd.testing import ModuleHarness, TestSession, parse_stanza

NICK = "http://jabber.org/protocol/nick"
AVATAR = "urn:xmpp:avatar:metadata"
PS = "http://jabber.org/protocol/pubsub"
EVENT = "{http://jabber.org/protocol/pubsub#event}event"


class Counting(ItemBackend):
    """The store as the server uses it, counting what is read from it per store."""

    def __init__(self, backend: ItemBackend) -> None:
        self.backend = backend
        self.trips: Counter[str] = Counter()
        self.records: Counter[str] = Counter()

    def _count(self, namespace: str, records: int) -> None:
        store = namespace.rsplit("/", 1)[-1]
        self.trips[store] += 1
        self.records[store] += records

    async def get(self, namespace: str, name: str) -> Item | None:
        self._count(namespace, 1)
        return await self.backend.get(namespace, name)

    async def batch_get(self, namespace: str, names: Sequence[str]) -> dict[str, Item]:
        self._count(namespace, len(names))
        return await self.backend.batch_get(namespace, names)

    async def query(self, namespace: str, query: Query) -> Page:
        page = await self.backend.query(namespace, query)
        self._count(namespace, len(page.items))
        return page

    async def put(self, namespace: str, name: str, attrs: Attrs, *, if_absent: bool = False,
                  if_version: int | None = None) -> Item:
        return await self.backend.put(namespace, name, attrs, if_absent=if_absent,
                                      if_version=if_version)

    async def delete(self, namespace: str, name: str, *, if_version: int | None = None) -> bool:
        return await self.backend.delete(namespace, name, if_version=if_version)

    async def batch_put(self, namespace: str, items: Mapping[str, Attrs]) -> None:
        await self.backend.batch_put(namespace, items)

    async def transact(self, writes: Sequence[Write]) -> None:
        await self.backend.transact(writes)

    async def close(self) -> None:
        await self.backend.close()


async def run(
    users: int, contacts: int, cached: bool, wave: int, data_dir: Path
) -> dict[str, Any]:
    sqlite = await SQLiteItemBackend.open(data_dir / "items.db")
    harness = ModuleHarness({"roster": {}, "presence": {}, "caps": {}, "disco": {}, "pep": {}})
    harness.storage.items = sqlite
    await harness.start()
    names = [f"u{i}@localhost" for i in range(users)]
    harness.users.update(names)
    roster = harness.host.items("localhost", "roster")
    half = contacts // 2  # a ring: each user's contacts are the `contacts` nearest
    for start in range(0, users, 100):
        await roster.batch_put({
            name.split("@")[0]: _encode("bench", 1, {
                c: RosterItem(c, subscription="both")
                for k in range(1, half + 1)
                for c in (names[(i + k) % users], names[(i - k) % users])
            })
            for i, name in enumerate(names[start:start + 100], start)
        })
    pep = harness.host.modules["pep"]
    assert isinstance(pep, Pep)
    for name in names:
        service = pep.service(name)
        for node in (NICK, AVATAR):
            item = etree.fromstring(
                f"<item xmlns='{PS}' id='1'><x xmlns='{node}'>{name}</x></item>"
            )
            await service.publish(name, node, item, {}, auto_create=True)
    features = [DISCO_INFO, f"{NICK}+notify", f"{AVATAR}+notify"]
    ver = verification_string([Identity("client", "pc", "bench")], features)
    await CapsStore().store(
        harness.host.items("localhost", "caps"), "bench@localhost",
        f"sha-1/{quote(ver, safe='')}", features,
    )
    counting = Counting(sqlite)
    harness.storage.items = (
        CachedItemBackend(counting, MemoryCache(max_items=1_000_000)) if cached else counting
    )
    pep._caps.clear()  # as after a restart: the caps too are read from the store once

    sessions: list[TestSession] = [harness.session(f"{n}/r", available=False) for n in names]
    cpu, started = time.process_time(), time.perf_counter()
    wave = wave or users
    for start in range(0, users, wave):
        for session in sessions[start:start + wave]:
            presence = parse_stanza(
                f"<presence><c xmlns='{CAPS}' hash='sha-1' node='https://bench' ver='{ver}'/>"
                "</presence>"
            )
            presence.set("from", session.jid)
            session.receive(presence)
        for _ in range(10):
            await harness.router.drain()
            await asyncio.sleep(0)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    got = [sum(1 for s in session.received if s.find(EVENT) is not None) for session in sessions]
    expected = 2 * (contacts + 1)
    assert all(n >= expected for n in got), (min(got), expected)
    await sqlite.close()
    return {
        "users": users,
        "contacts": contacts,
        "cache": "on" if cached else "off",
        "wave": wave,
        "seconds": round(elapsed, 2),
        "logins_per_s": round(users / elapsed, 1),
        "cpu_s": round(cpu, 2),
        "cpu_ms_per_login": round(cpu * 1000 / users, 2),
        "last_items_sent": sum(got),
        "store_round_trips_per_login": {
            k: round(v / users, 2) for k, v in sorted(counting.trips.items())
        },
        "store_records_per_login": {
            k: round(v / users, 2) for k, v in sorted(counting.records.items())
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--contacts", type=int, default=50)
    parser.add_argument("--cache", choices=("on", "off"), default="on")
    parser.add_argument("--wave", type=int, default=0,
                        help="log in this many at once, then the next (0: all at once)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(
            run(args.users, args.contacts, args.cache == "on", args.wave, Path(tmp))
        )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
