"""Reload as an operator does it: edit the file, then SIGHUP or `xmppctl reload`.

A real xmppd process, real slixmpp clients: new connections see the change
while a session that was already up stays up (with the settings it started
with); what a running node cannot change is refused by key, file and line,
and then nothing changes at all.
"""

from __future__ import annotations

import asyncio
import copy
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml
from slixmpp.exceptions import IqError

from tests.integration.clients import HEADER, Client, close, insecure_context, read_until
from tests.integration.nodeproc import Node, login, register, write_yaml
from tests.integration.renewal import RenewablePair
from tests.integration.test_cli_server import der_of, peer_certificate
from tests.integration.test_workers import start_workers, workers_config, xmppctl
from xmppd.config import DEFAULT_MODULES
from xmppd.modules.caps import Identity, verification_string
from xmppd.storage.devservices import LocalService

pytestmark = pytest.mark.timeout(90)

BIG = "x" * 4000
"""A message body over the reloaded max_stanza_bytes (2048), well under the default."""


def base_config(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "hosts": ["localhost"],
        "data_dir": str(tmp_path / "data"),
        "log_level": "info",
        "listeners": [
            {"type": "starttls", "address": "127.0.0.1", "port": 0},
            {"type": "direct_tls", "address": "127.0.0.1", "port": 0},
        ],
        "limits": {"auth_failure_delay": 0.05},
        "admin": {"port": 0},
    }
    config.update(sections)
    return config


async def echo(client: Client, body: str) -> str:
    """Send a message to the client's own JID; the body that comes back."""
    client.send_message(mto=client.boundjid.full, mbody=body)
    message = await asyncio.wait_for(client.messages.get(), 10)
    return str(message["body"])


async def refused_for_size(port: int, jid: str, password: str) -> list[str]:
    """Log in anew and send a big message: the stream errors the new client got."""
    client = await login(port, jid, password)
    client.send_message(mto=client.boundjid.full, mbody=BIG)
    await asyncio.wait_for(client.ended.wait(), 10)
    return client.stream_errors


async def test_sighup_applies_a_limit_and_a_certificate_to_new_connections_only(
    tmp_path: Path,
) -> None:
    pair = RenewablePair(tmp_path)
    config = base_config(tmp_path, tls=pair.tls_section())
    path = write_yaml(tmp_path / "xmppd.yml", config)
    await register(path, "localhost", {"alice": "alice-secret", "bob": "bob-secret"})
    node = await Node.start(path)
    alice: Client | None = None
    try:  # from here on the node is stopped whatever fails
        alice = await login(node.ports["STARTTLS"], "alice@localhost/desk", "alice-secret")
        assert await peer_certificate(node.ports["direct TLS"]) == der_of(pair.first[0])

        pair.renew()  # a renewed certificate, and a smaller limit
        config["limits"].update(max_stanza_bytes=2048, max_stanza_bytes_unauthenticated=1024)
        write_yaml(path, config)
        line = await node.line("reload", since=node.hangup())
        assert line.string.split(" ")[2] == "INFO"
        assert (
            "reloaded: changed limits.max_stanza_bytes, limits.max_stanza_bytes_unauthenticated, "
            f"certificate {pair.cert} (renewed)" in line.string
        )

        assert await peer_certificate(node.ports["direct TLS"]) == der_of(pair.second[0])
        port = node.ports["STARTTLS"]
        assert await refused_for_size(port, "bob@localhost/r", "bob-secret") == [
            "policy-violation"
        ]
        # the session that was up before the reload stays up, with its own limits
        assert not alice.ended.is_set()
        assert await echo(alice, BIG) == BIG
    finally:
        if alice is not None:
            await close(alice)
        await node.stop()


async def test_xmppctl_reload_adds_a_host_and_prints_each_nodes_answer(tmp_path: Path) -> None:
    config = base_config(tmp_path)
    path = write_yaml(tmp_path / "xmppd.yml", config)
    await register(path, "localhost", {"alice": "alice-secret"})
    node = await Node.start(path)
    port = node.ports["STARTTLS"]
    alice: Client | None = None
    try:  # from here on the node is stopped whatever fails
        alice = await login(port, "alice@localhost/desk", "alice-secret")
        config["hosts"] = ["localhost", "example.net"]
        config["limits"].update(max_stanza_bytes=2048, max_stanza_bytes_unauthenticated=1024)
        write_yaml(path, config)
        code, out, err = await xmppctl(path, "reload")
        assert code == 0, err
        assert out.startswith(f"- (pid {node.proc.pid}) at http://127.0.0.1:")
        assert out.endswith(
            ": reloaded: changed hosts (+example.net), limits.max_stanza_bytes, "
            "limits.max_stanza_bytes_unauthenticated\n"
        )
        assert "reloaded: changed hosts (+example.net)" in node.text()

        password = tmp_path / "password"
        password.write_text("carol-secret\n")
        code, _, err = await xmppctl(
            path, "register", "carol@example.net", "--password-file", str(password)
        )
        assert code == 0, err
        carol = await login(port, "carol@example.net/phone", "carol-secret")
        assert carol.boundjid.full == "carol@example.net/phone"
        await close(carol)
        assert await refused_for_size(port, "alice@localhost/new", "alice-secret") == [
            "policy-violation"
        ]
        assert not alice.ended.is_set() and await echo(alice, BIG) == BIG
    finally:
        if alice is not None:
            await close(alice)
        await node.stop()


async def test_a_key_a_node_cannot_change_refuses_the_whole_reload(tmp_path: Path) -> None:
    config = base_config(tmp_path)
    path = write_yaml(tmp_path / "xmppd.yml", config)
    await register(path, "localhost", {"alice": "alice-secret"})
    node = await Node.start(path)
    try:
        changed = copy.deepcopy(config)
        # would be fine alone
        changed["limits"].update(max_stanza_bytes=2048, max_stanza_bytes_unauthenticated=1024)
        changed["listeners"][0]["port"] = 5299
        changed["storage"] = {"items": {"backend": "sqlite", "path": str(tmp_path / "other.db")}}
        changed["modules"] = {name: {} for name in DEFAULT_MODULES if name != "carbons"}
        changed["modules"]["caps"] = {"node": "https://elsewhere.example/caps"}
        changed["s2s"] = {"listeners": [{"address": "127.0.0.1", "port": 0}]}
        changed["components"] = {"domains": {"gw.localhost": {"secret": "0123456789abcdef"}}}
        write_yaml(path, changed)
        code, out, err = await xmppctl(path, "reload")
        assert code == 1
        assert "1 node(s) refused the reload" in err
        lines = out.splitlines()
        assert lines[0].endswith(": reload refused, nothing changed:")
        problems = "\n".join(lines[1:])
        assert f"  {path}:" in problems
        assert "listeners[0].port: cannot be changed by a reload" in problems
        assert "storage.items.path: cannot be changed by a reload" in problems
        assert "modules: carbons: cannot be disabled by a reload" in problems
        assert "modules.caps.node: cannot be changed by a reload" in problems
        assert "s2s: cannot be changed by a reload" in problems
        assert "components: cannot be changed by a reload" in problems
        assert "0123456789abcdef" not in problems
        assert "limits" not in problems
        line = await node.line("reload refused")
        assert line.string.split(" ")[2] == "ERROR" and "listeners[0].port" in line.string

        # nothing changed: the limit the same file lowered is not applied
        alice = await login(node.ports["STARTTLS"], "alice@localhost/r", "alice-secret")
        assert await echo(alice, BIG) == BIG
        await close(alice)
    finally:
        await node.stop()


async def test_hosts_cannot_change_under_a_service_set_up_per_host(tmp_path: Path) -> None:
    """pubsub serves pubsub.<host> for the hosts of its start: a reload that adds a host
    (whose service would be missing) or renames the subdomain is refused, naming both."""
    modules = {name: {} for name in DEFAULT_MODULES} | {"pubsub": {}}
    config = base_config(tmp_path, modules=modules)
    path = write_yaml(tmp_path / "xmppd.yml", config)
    node = await Node.start(path)
    try:
        changed = copy.deepcopy(config)
        changed["hosts"] = ["localhost", "example.net"]
        changed["modules"]["pubsub"] = {"subdomain": "ps"}
        write_yaml(path, changed)
        code, out, _ = await xmppctl(path, "reload")
        assert code == 1
        problems = "\n".join(out.splitlines()[1:])
        assert "hosts: cannot change while the module pubsub is enabled" in problems
        assert "modules.pubsub.subdomain: cannot be changed by a reload" in problems
    finally:
        await node.stop()


async def test_an_invalid_file_is_refused_and_the_node_keeps_serving(tmp_path: Path) -> None:
    config = base_config(tmp_path)
    path = write_yaml(tmp_path / "xmppd.yml", config)
    await register(path, "localhost", {"alice": "alice-secret"})
    node = await Node.start(path)
    try:
        text = path.read_text()
        path.write_text(text.replace("auth_failure_delay: 0.05", "auth_failure_delay: soon"))
        line = await node.line("reload", since=node.hangup())
        assert line.string.split(" ")[2] == "ERROR"
        assert "reload refused, nothing changed:" in line.string
        assert f"{path}:" in line.string and "limits.auth_failure_delay: expected a number" in (
            line.string
        )
        code, out, err = await xmppctl(path, "reload")  # checked before any node is asked
        assert (code, out) == (1, "") and "limits.auth_failure_delay" in err

        alice = await login(node.ports["STARTTLS"], "alice@localhost/r", "alice-secret")
        assert await echo(alice, "still here") == "still here"
        await close(alice)
    finally:
        await node.stop()


async def stream_features(port: int) -> bytes:
    """The features a new direct-TLS stream is offered before it authenticates."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=insecure_context(), server_hostname="localhost"
    )
    writer.write(HEADER.encode())
    features = await read_until(reader, b"</stream:features>")
    writer.close()
    return features


async def test_module_options_change_on_reload(tmp_path: Path) -> None:
    config = base_config(tmp_path)
    config["modules"] = {name: {} for name in DEFAULT_MODULES}
    path = write_yaml(tmp_path / "xmppd.yml", config)
    node = await Node.start(path)
    try:
        register_feature = b"http://jabber.org/features/iq-register"
        assert register_feature not in await stream_features(node.ports["direct TLS"])
        config["modules"]["register"] = {"allow_registration": True}
        write_yaml(path, config)
        line = await node.line("reload", since=node.hangup())
        assert "reloaded: changed modules.register.allow_registration" in line.string
        assert register_feature in await stream_features(node.ports["direct TLS"])
    finally:
        await node.stop()


async def test_every_worker_reloads_as_itself(
    tmp_path: Path, redis_service: LocalService  # noqa: F811
) -> None:
    """`xmppd --workers 2`: each worker reads the file again as its own config (node
    name, admin port: not a refused change), and xmppctl prints both answers."""
    path = workers_config(tmp_path, redis_service)
    workers = await start_workers(path)
    try:
        config = yaml.safe_load(path.read_text())
        config["limits"].update(max_stanza_bytes=4096, max_stanza_bytes_unauthenticated=1024)
        write_yaml(path, config)
        code, out, err = await xmppctl(path, "reload")
        assert code == 0, err
        answers = [
            re.fullmatch(
                r"(w-\d) \(pid \d+\) at http://127\.0\.0\.1:\d+: reloaded: changed "
                r"limits\.max_stanza_bytes, limits\.max_stanza_bytes_unauthenticated",
                line,
            )
            for line in out.splitlines()
        ]
        assert sorted(a.group(1) for a in answers if a) == ["w-1", "w-2"], out

        workers.proc.send_signal(signal.SIGHUP)  # the parent passes it on
        reloaded = {
            (await workers.line(r"\[(w-\d)\] xmppd: reloaded: nothing changed")).group(1)
            for _ in range(2)
        }
        assert reloaded == {"w-1", "w-2"}
    finally:
        assert await workers.stop() == 0


PING, VERSION = "urn:xmpp:ping", "jabber:iq:version"
DISCO_INFO = "http://jabber.org/protocol/disco#info"


async def answered(client: Client, namespace: str) -> str:
    """"result", or the error condition, of an IQ get to the server in `namespace`."""
    iq = client.make_iq_get(queryxmlns=namespace, ito="localhost")
    try:
        await iq.send(timeout=10)
    except IqError as e:
        return str(e.iq["error"]["condition"])
    return "result"


async def test_a_reload_enables_and_disables_the_modules_that_allow_it(tmp_path: Path) -> None:
    config = base_config(tmp_path)
    config["modules"] = {name: {} for name in DEFAULT_MODULES if name != "ping"}
    path = write_yaml(tmp_path / "xmppd.yml", config)
    await register(path, "localhost", {"alice": "alice-secret"})
    node = await Node.start(path)
    alice: Client | None = None
    try:  # from here on the node is stopped whatever fails
        alice = await login(node.ports["STARTTLS"], "alice@localhost/desk", "alice-secret")
        assert await answered(alice, PING) == "service-unavailable"
        assert await answered(alice, VERSION) == "result"

        config["modules"]["ping"] = {}
        del config["modules"]["version"]
        write_yaml(path, config)
        line = await node.line("reload", since=node.hangup())
        assert "reloaded: changed modules.version, modules.ping" in line.string

        # the session that was up sees the node's modules as they are now
        assert await answered(alice, PING) == "result"
        assert await answered(alice, VERSION) == "service-unavailable"
        info = await alice.make_iq_get(queryxmlns=DISCO_INFO, ito="localhost").send(timeout=10)
        features = {f.get("var") for f in info.xml.iter(f"{{{DISCO_INFO}}}feature")}
        assert PING in features and VERSION not in features
        # the server's entity capabilities (XEP-0115) follow its features
        ver = verification_string(
            [Identity(i.get("category", ""), i.get("type", ""), i.get("name"))
             for i in info.xml.iter(f"{{{DISCO_INFO}}}identity")],
            features,
        )
        node_info = alice.make_iq_get(queryxmlns=DISCO_INFO, ito="localhost")
        node_info.xml.find(f"{{{DISCO_INFO}}}query").set(
            "node", f"https://xmppd.example/caps#{ver}"
        )
        await node_info.send(timeout=10)  # IqError (item-not-found) for a stale hash
    finally:
        if alice is not None:
            await close(alice)
        await node.stop()
