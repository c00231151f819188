"""The owner's lists of a node's subscriptions (XEP-0060 8.8.1) and affiliations
(8.9.1) in XEP-0059 pages, asked by a real slixmpp client on both storage profiles."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from slixmpp import JID

from tests.integration.clients import Client
from tests.integration.conftest import StartServer
from tests.integration.test_pep import MODULES, close, online

SERVICE = JID("pubsub.localhost")
OWNER = "http://jabber.org/protocol/pubsub#owner"
RSM = "http://jabber.org/protocol/rsm"


async def owner_list(
    client: Client, kind: str, page: str | None
) -> tuple[list[str], dict[str, str]]:
    """The JIDs of one answer to <subscriptions/> or <affiliations/> of node "big",
    with `page` (the <set/>'s children) when given, and the answer's <set/> (first,
    last, count)."""
    iq = client.Iq(sto=SERVICE, stype="get")
    request = f"<pubsub xmlns='{OWNER}'><{kind} node='big'/>"
    if page is not None:
        request += f"<set xmlns='{RSM}'>{page}</set>"
    iq.xml.append(ET.fromstring(request + "</pubsub>"))
    answer = (await iq.send(timeout=10)).xml
    listing = answer.find(f"{{{OWNER}}}pubsub/{{{OWNER}}}{kind}")
    assert listing is not None
    jids = [entry.get("jid", "") for entry in listing]
    found = answer.find(f"{{{OWNER}}}pubsub/{{{RSM}}}set")
    assert found is not None, "no <set/> in the answer"
    return jids, {child.tag.split("}")[1]: child.text or "" for child in found}


async def test_the_owners_subscriptions_and_affiliations_in_pages(
    start_server: StartServer,
) -> None:
    """130 subscribers: without <set/> the first 100 and a count of 130; pages of 50
    after each last JID give all 130 once, in order; <before/> empty gives the last
    ones; <max>0</max> the count alone. 30 affiliations page the same way. The
    service advertises RSM."""
    server = await start_server(modules={**MODULES, "pubsub": {}})
    alice = await online(server, "alice@localhost/desk", "alice-secret")
    pubsub = alice.plugin["xep_0060"]
    await pubsub.create_node(SERVICE, "big", timeout=10)
    for start in range(0, 130, 40):
        chunk = range(start, min(start + 40, 130))
        fans = [(JID(f"fan{i:03}@localhost"), "subscribed") for i in chunk]
        await pubsub.modify_subscriptions(SERVICE, "big", fans, timeout=10)
    members = [(JID(f"member{i:02}@localhost"), "member") for i in range(29)]
    await pubsub.modify_affiliations(SERVICE, "big", members, timeout=10)

    first, result = await owner_list(alice, "subscriptions", None)
    assert len(first) == 100 and result["count"] == "130"
    assert (result["first"], result["last"]) == (first[0], first[-1])

    collected: list[str] = []
    after = ""
    for _ in range(4):  # 130 in pages of 50, then an empty one
        page = f"<max>50</max><after>{after}</after>" if after else "<max>50</max>"
        jids, result = await owner_list(alice, "subscriptions", page)
        if not jids:
            break
        assert len(jids) <= 50 and result["count"] == "130"
        collected += jids
        after = result["last"]
    assert collected == [f"fan{i:03}@localhost" for i in range(130)]
    assert first == collected[:100]
    last, result = await owner_list(alice, "subscriptions", "<max>30</max><before/>")
    assert last == collected[-30:]
    before, _ = await owner_list(
        alice, "subscriptions", f"<max>10</max><before>{last[0]}</before>"
    )
    assert before == collected[-40:-30]
    nothing, result = await owner_list(alice, "subscriptions", "<max>0</max>")
    assert (nothing, result) == ([], {"count": "130"})

    everyone = sorted(["alice@localhost", *(str(jid) for jid, _ in members)])
    pages: list[str] = []
    after = ""
    for _ in range(4):  # 30 in pages of 10, then an empty one
        page = f"<max>10</max><after>{after}</after>" if after else "<max>10</max>"
        jids, result = await owner_list(alice, "affiliations", page)
        if not jids:
            break
        assert result["count"] == "30"
        pages += jids
        after = result["last"]
    assert pages == everyone
    last, _ = await owner_list(alice, "affiliations", "<max>5</max><before/>")
    assert last == everyone[-5:]

    info = await alice.plugin["xep_0030"].get_info(jid=SERVICE, timeout=10)
    assert RSM in info["disco_info"]["features"]
    await close(alice)
