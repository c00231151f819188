"""ModuleHost.remove_account: every module's data of the user goes; a storage failure
part way is reported, and running the removal again finishes it."""

from __future__ import annotations

from typing import Any

import pytest

from xmppd.modulehost import AccountDataRemains
from xmppd.storage.base import Query, StorageError
from xmppd.testing import ModuleHarness, parse_stanza
from xmppd.xml import ns

MODULES: dict[str, dict[str, Any] | None] = {
    name: {}
    for name in (
        "roster",
        "presence",
        "offline",
        "last",
        "vcard",
        "private",
        "privacy",
        "blocking",
        "register",
    )
}
PRIVACY = "jabber:iq:privacy"


async def entries(harness: ModuleHarness, user: str) -> set[str]:
    """'<namespace> <name>' for every item and blob named for `user`."""
    found: set[str] = set()
    items, blobs = harness.storage.items, harness.storage.blobs
    for namespace in await items.namespaces():  # type: ignore[attr-defined]
        page = await items.query(namespace, Query(limit=1000))
        found |= {f"{namespace} {i.name}" for i in page.items if _owned(i.name, user)}
    for namespace in await blobs.namespaces():  # type: ignore[attr-defined]
        listing = await blobs.list(namespace)
        found |= {f"{namespace} {key}" for key in listing.keys if _owned(key, user)}
    return found


def _owned(name: str, user: str) -> bool:
    return name == user or name.startswith((f"{user}/", f"{user}@"))


async def filled() -> ModuleHarness:
    """zed (and alice, to check nothing of hers goes) with data in every module."""
    harness = await ModuleHarness(MODULES).start()
    for user in ("zed", "alice"):
        await harness.host.accounts["localhost"].register(user, f"{user}-secret-1")
        session = await harness.login(f"{user}@localhost/r")
        for payload in (
            "<query xmlns='jabber:iq:roster'><item jid='bob@localhost'/></query>",
            "<vCard xmlns='vcard-temp'><FN>Someone</FN></vCard>",
            "<query xmlns='jabber:iq:private'><p xmlns='urn:test:prefs'/></query>",
            f"<query xmlns='{PRIVACY}'><list name='l'><item action='deny' order='1'/></list>"
            "</query>",
            "<block xmlns='urn:xmpp:blocking'><item jid='eve@localhost'/></block>",
        ):
            reply = await harness.iq(session, "set", payload)
            assert reply.get("type") == "result", payload
        await harness.end_session(session)  # last activity
    bob = harness.session("bob@localhost/b")
    for user in ("zed", "alice"):
        for n in range(3):
            await harness.send(bob, f"<message to='{user}@localhost'><body>{n}</body></message>")
    return harness


async def test_a_failure_part_way_is_reported_and_a_second_run_finishes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    harness = await filled()
    alices = await entries(harness, "alice")
    stores = {entry.split()[0] for entry in await entries(harness, "zed")}
    assert stores == {
        "localhost/accounts",
        "localhost/roster",
        "localhost/vcard",
        "localhost/private",
        "localhost/privacy",
        "localhost/offline",  # items and blobs
        "localhost/last",
    }

    blobs = harness.storage.blobs
    delete = blobs.delete
    failures = iter([True])  # the first offline blob cannot be deleted

    async def failing_delete(namespace: str, key: str, **kwargs: Any) -> bool:
        if namespace == "localhost/offline" and next(failures, False):
            raise StorageError("memory", "delete", "the disk is on fire")
        return await delete(namespace, key, **kwargs)

    monkeypatch.setattr(blobs, "delete", failing_delete)
    with pytest.raises(AccountDataRemains) as failed:
        await harness.host.remove_account("localhost", "zed")
    assert list(failed.value.failed) == ["offline"]
    assert "the disk is on fire" in str(failed.value)
    left = await entries(harness, "zed")
    assert left and {entry.split()[0] for entry in left} == {"localhost/offline"}
    assert not await harness.host.accounts["localhost"].exists("zed")

    # the name as an operator may type it: the stores use the normalized one
    assert await harness.host.remove_account("localhost", "Zed") == "leftovers"
    assert await entries(harness, "zed") == set()
    assert await harness.host.remove_account("localhost", "zed") == "nothing"
    assert await harness.host.remove_account("localhost", "no@such name") == "nothing"
    assert await entries(harness, "alice") == alices  # the neighbour keeps everything


PIPELINED = (
    "<vCard xmlns='vcard-temp'><FN>Written after the removal</FN></vCard>",
    "<query xmlns='jabber:iq:roster'><item jid='carol@localhost'/></query>",
    "<query xmlns='jabber:iq:private'><q xmlns='urn:test:late'/></query>",
)


async def test_writes_pipelined_after_an_in_band_removal_leave_nothing() -> None:
    """A client sends <remove/> and, before the answer, a vCard, a roster item and
    private XML: they were read before the removal, so they are done before the data
    goes, never after it."""
    harness = await ModuleHarness(MODULES).start()
    await harness.host.accounts["localhost"].register("zed", "zed-secret-1")
    zed = await harness.login("zed@localhost/r")
    for n, xml in enumerate(
        ("<query xmlns='jabber:iq:register'><remove/></query>", *PIPELINED)
    ):
        stanza = parse_stanza(f"<iq type='set' id='p{n}'>{xml}</iq>")
        stanza.set("from", zed.jid)
        zed.receive(stanza)  # one read: every stanza is routed before the removal runs
    await harness.router.drain()
    answers = {s.get("id"): s.get("type") for s in zed.take() if s.tag == ns.C_IQ}
    assert answers["p0"] == "result"
    assert await entries(harness, "zed") == set()
    assert zed.input_holds > 0  # nothing more is read from the removed account
    assert zed.terminated is not None
    assert not await harness.host.accounts["localhost"].exists("zed")


async def test_an_administrators_removal_waits_for_the_sessions_writes() -> None:
    """Removed by an administrator (xmppctl, the admin API) while two of its sessions
    write: what they sent before is done first, and deleted with the rest."""
    harness = await ModuleHarness(MODULES).start()
    await harness.host.accounts["localhost"].register("zed", "zed-secret-1")
    sessions = [await harness.login(f"zed@localhost/{r}") for r in ("a", "b")]
    for session in sessions:
        for n, xml in enumerate(PIPELINED):
            stanza = parse_stanza(f"<iq type='set' id='w{n}'>{xml}</iq>")
            stanza.set("from", session.jid)
            session.receive(stanza)
    assert await harness.host.remove_account("localhost", "zed") == "account"
    await harness.router.drain()
    assert await entries(harness, "zed") == set()
    assert all(session.input_holds > 0 for session in sessions)
