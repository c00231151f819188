"""Entity capabilities of the server (XEP-0115), without sockets."""

from __future__ import annotations

from lxml import etree

from xmppd.modules.caps import Identity, verification_string
from xmppd.testing import ModuleHarness

CAPS = "http://jabber.org/protocol/caps"
DISCO_INFO = "http://jabber.org/protocol/disco#info"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
XEP_FEATURES = [
    "http://jabber.org/protocol/caps",
    "http://jabber.org/protocol/disco#info",
    "http://jabber.org/protocol/disco#items",
    "http://jabber.org/protocol/muc",
]

SOFTWARE_INFO = """
<x xmlns='jabber:x:data' type='result'>
  <field var='FORM_TYPE' type='hidden'><value>urn:xmpp:dataforms:softwareinfo</value></field>
  <field var='ip_version'><value>ipv4</value><value>ipv6</value></field>
  <field var='os'><value>Mac</value></field>
  <field var='os_version'><value>10.5.1</value></field>
  <field var='software'><value>Psi</value></field>
  <field var='software_version'><value>0.11</value></field>
</x>
"""


def condition(reply: etree._Element) -> str:
    assert reply.get("type") == "error", etree.tostring(reply)
    err = reply.find("{jabber:client}error")
    assert err is not None
    return next(etree.QName(c).localname for c in err if etree.QName(c).namespace == STANZAS)


def test_simple_generation_example() -> None:
    """XEP-0115 section 5.2."""
    ver = verification_string([Identity("client", "pc", "Exodus 0.9.1")], XEP_FEATURES)
    assert ver == "QgayPKawpkPSDYmwT/WM94uAlu0="
    # order and duplicates of the input do not matter
    assert (
        verification_string([Identity("client", "pc", "Exodus 0.9.1")], XEP_FEATURES[::-1] * 2)
        == ver
    )


def test_complex_generation_example() -> None:
    """XEP-0115 section 5.3: two languages and an XEP-0128 form (fields given out of order)."""
    form = etree.fromstring(SOFTWARE_INFO)
    form.append(form[1])  # move ip_version to the end: the algorithm sorts fields by var
    identities = [
        Identity("client", "pc", "Psi 0.11", "en"),
        Identity("client", "pc", "\u03a8 0.11", "el"),
    ]
    assert verification_string(identities, XEP_FEATURES, [form]) == "q07IKJEyjvHSyhy//CH0CxmKi8w="
    # a form without a hidden FORM_TYPE is left out
    untyped = etree.fromstring(
        "<x xmlns='jabber:x:data'><field var='a'><value>b</value></field></x>"
    )
    assert verification_string(identities, XEP_FEATURES, [form, untyped]) == (
        "q07IKJEyjvHSyhy//CH0CxmKi8w="
    )


async def test_stream_feature_and_disco_node() -> None:
    harness = await ModuleHarness({"disco": {}, "ping": {}, "caps": {}}).start()
    (make,) = harness.host.stream_features["bound"]
    c = make()
    assert c.tag == f"{{{CAPS}}}c" and c.get("hash") == "sha-1"
    assert c.get("node") == "https://xmppd.example/caps"
    ver = c.get("ver")
    expected = verification_string(
        [Identity("server", "im", "xmppd")],
        [DISCO_INFO, "http://jabber.org/protocol/disco#items", "urn:xmpp:ping", CAPS],
    )
    assert ver == expected

    alice = harness.session("alice@localhost/a")
    node = f"https://xmppd.example/caps#{ver}"
    reply = await harness.iq(
        alice, "get", f"<query xmlns='{DISCO_INFO}' node='{node}'/>", to="localhost"
    )
    assert reply.get("type") == "result"
    assert reply.get("from") == "localhost" and reply.get("to") == "alice@localhost/a"
    (query,) = reply
    assert query.get("node") == node
    # what a client does with the answer: recompute the hash and compare
    identities = [
        Identity(i.get("category"), i.get("type"), i.get("name"))
        for i in query.iter(f"{{{DISCO_INFO}}}identity")
    ]
    features = [f.get("var") for f in query.iter(f"{{{DISCO_INFO}}}feature")]
    assert verification_string(identities, features) == ver  # type: ignore[arg-type]

    # plain disco#info is disco's, and lists the caps feature
    reply = await harness.iq(alice, "get", f"<query xmlns='{DISCO_INFO}'/>", to="localhost")
    assert CAPS in {f.get("var") for f in reply.iter(f"{{{DISCO_INFO}}}feature")}
    # another node (or a stale ver) is still disco's item-not-found
    for other in ("https://xmppd.example/caps#stale=", "something-else"):
        reply = await harness.iq(
            alice, "get", f"<query xmlns='{DISCO_INFO}' node='{other}'/>", to="localhost"
        )
        assert condition(reply) == "item-not-found"


async def test_node_option_and_ver_depends_on_enabled_modules() -> None:
    one = await ModuleHarness({"disco": {}, "caps": {"node": "https://chat.example"}}).start()
    two = await ModuleHarness({"disco": {}, "ping": {}, "caps": {}}).start()
    c1 = one.host.stream_features["bound"][0]()
    c2 = two.host.stream_features["bound"][0]()
    assert c1.get("node") == "https://chat.example"
    assert c1.get("ver") != c2.get("ver")
