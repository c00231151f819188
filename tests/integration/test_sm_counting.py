"""XEP-0198's h counts every stanza the client sent after <enable/>, over a real TLS
stream: those the stream answers itself (a <bad-request/>, the legacy session IQ, a
second bind) as well as those the router takes. One left out puts the client's count
and the server's apart for good, and the client resends its newest stanza at every
resume. The other way round, the answers the stream gives are stanzas the server
sent: counted and kept until acknowledged, as the client counts them."""

from __future__ import annotations

import asyncio
import base64
import hashlib

import pytest

from tests.integration.conftest import StartServer
from tests.integration.test_stream_management import SM, Stream, detached, modules, sm_module

pytestmark = pytest.mark.timeout(60)


async def test_h_counts_the_stanzas_the_stream_answers_itself(
    start_server: StartServer,
) -> None:
    server = await start_server(modules=modules(ack_every=100, ack_delay=30))
    stream = await Stream.login(server, "alice")
    await stream.enable()
    answered = [
        ("<iq type='bogus' id='bad'><ping xmlns='urn:xmpp:ping'/></iq>", "bad-request"),
        ("<presence type='bogus' id='badp'/>", "bad-request"),
        ("<iq type='set' id='sess'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>",
         'id="sess"'),
        ("<iq type='set' id='bind2'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
         "<resource>other</resource></bind></iq>", "not-allowed"),
    ]
    for sent, answer in answered:
        await stream.send(sent)
        await stream.next(answer)
    assert await stream.ack_count() == len(answered)
    # A routed stanza after them counts on from there: the two counts stay together.
    await stream.send("<iq type='get' id='roster'><query xmlns='jabber:iq:roster'/></iq>")
    await stream.next('id="roster"')
    assert await stream.ack_count() == len(answered) + 1
    await stream.close()


ANSWERED = [
    ("<iq type='bogus' id='bad'><ping xmlns='urn:xmpp:ping'/></iq>", "bad-request"),
    ("<presence type='bogus' id='badp'/>", "bad-request"),
    ("<iq type='set' id='sess'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>",
     'id="sess"'),
    ("<iq type='set' id='bind2'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
     "<resource>other</resource></bind></iq>", "not-allowed"),
]
"""Stanzas the stream answers itself, each with a part of its answer."""


async def test_the_answers_the_stream_gives_count_as_sent(start_server: StartServer) -> None:
    """The client acknowledges the answers it received: before, the server had not
    counted them, took the ack as one for stanzas it never sent and ended the stream
    with <undefined-condition/>."""
    server = await start_server(modules=modules(ack_every=100, ack_delay=30))
    stream = await Stream.login(server, "alice")
    await stream.enable()
    for sent, answer in ANSWERED:
        await stream.send(sent)
        await stream.next(answer)
    (sm,) = sm_module(server).active
    assert sm.sent == len(ANSWERED) and len(sm.queue) == len(ANSWERED)
    await stream.send(f"<a xmlns='{SM}' h='{len(ANSWERED)}'/>")
    assert await stream.ack_count() == len(ANSWERED)  # a round trip: the stream goes on
    assert not sm.queue and not stream.closed
    await stream.close()


async def test_an_answer_not_acknowledged_is_sent_again_after_a_resume(
    start_server: StartServer,
) -> None:
    server = await start_server(modules=modules(ack_every=100, ack_delay=30))
    stream = await Stream.login(server, "alice")
    enabled = await stream.enable()
    await stream.send(
        "<iq type='set' id='sess'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>"
    )
    await stream.next('id="sess"')
    waiting = detached(server)
    stream.drop()  # as if the answer was lost with the connection
    await asyncio.wait_for(waiting.get(), 10)
    again = await Stream.auth(server, "alice")
    await again.send(f"<resume xmlns='{SM}' previd='{enabled.get('id')}' h='0'/>")
    assert (await again.next("resumed")).get("h") == "1"
    result = await again.next('id="sess"')
    assert result.get("type") == "result"
    await again.close()


async def test_a_resume_after_an_answered_stanza_reports_it_handled(
    start_server: StartServer,
) -> None:
    """The symptom: <resumed h=''/> one short, and the client sends its last stanza
    again, a duplicate."""
    server = await start_server(modules=modules(ack_every=100, ack_delay=30))
    stream = await Stream.login(server, "alice")
    enabled = await stream.enable()
    await stream.send("<iq type='get' id='roster'><query xmlns='jabber:iq:roster'/></iq>")
    await stream.next('id="roster"')
    await stream.send(
        "<iq type='set' id='sess'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>"
    )
    await stream.next('id="sess"')
    waiting = detached(server)
    stream.drop()
    await asyncio.wait_for(waiting.get(), 10)
    again = await Stream.auth(server, "alice")
    await again.send(f"<resume xmlns='{SM}' previd='{enabled.get('id')}' h='0'/>")
    resumed = await again.next("resumed")
    assert resumed.get("h") == "2"  # the roster get and the session IQ
    await again.close()


async def test_a_presence_the_server_sends_again_for_the_client_is_not_counted(
    start_server: StartServer,
) -> None:
    """A new XEP-0084 avatar makes the server send the client's presence again (its
    vCard hash, to contacts at once). The client did not send that one: counted, h runs
    one ahead of the client's count, which a client takes as acks for stanzas it never
    sent."""
    server = await start_server(modules=modules(ack_every=100, ack_delay=30))
    stream = await Stream.login(server, "alice")
    await stream.enable()
    await stream.send("<presence/>")
    await stream.next("<presence")
    data = "urn:xmpp:avatar:data"
    image = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(range(64))).decode()
    avatar_id = hashlib.sha1(base64.b64decode(image)).hexdigest()
    for id_, node, payload in (
        ("data", data, f"<data xmlns='{data}'>{image}</data>"),
        ("meta", "urn:xmpp:avatar:metadata",
         "<metadata xmlns='urn:xmpp:avatar:metadata'>"
         f"<info bytes='72' id='{avatar_id}' type='image/png'/></metadata>"),
    ):
        await stream.send(
            f"<iq type='set' id='{id_}'><pubsub xmlns='http://jabber.org/protocol/pubsub'>"
            f"<publish node='{node}'><item id='{avatar_id}'>{payload}</item></publish>"
            "</pubsub></iq>"
        )
        await stream.next(f'id="{id_}"')
    await stream.next("vcard-temp:x:update")  # its presence, sent again with the hash
    assert await stream.ack_count() == 3  # the presence and the two publishes
    await stream.close()
