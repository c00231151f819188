"""An operator moves a running deployment from the embedded default to the cloud.

Users chat on SQLite and a folder; the operator stops the node, points the
YAML file at DynamoDB + S3 + memcached, runs `xmppctl migrate`, starts the
node again: accounts, rosters, vCards and offline messages are all there.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import yaml
from slixmpp import JID

from tests.integration.clients import close, connect
from tests.integration.conftest import cloud_storage, write_config
from tests.integration.test_user_journey import has_subscription, sign_in, wait_for
from xmppd.config import load_config
from xmppd.server import Server
from xmppd.storage.devservices import LocalService

MODULES: dict[str, dict[str, object]] = {
    name: {} for name in ("disco", "roster", "presence", "offline", "vcard")
}


async def test_switch_a_deployment_to_the_cloud_with_xmppctl_migrate(
    tmp_path: Path,
    moto_service: LocalService,
    seaweedfs_service: LocalService,
    memcached_ring: list[LocalService],
) -> None:
    embedded = write_config(tmp_path, modules=MODULES)
    node = Server(load_config(embedded))
    await node.start()
    for user, password in (("alice", "alice-secret"), ("bob", "bob-secret")):
        await node.accounts["localhost"].register(user, password)
    alice = await sign_in(node, "alice@localhost/laptop", "alice-secret")
    bob = await sign_in(node, "bob@localhost/phone", "bob-secret")
    alice.send_presence()
    bob.send_presence()
    alice.send_presence(pto="bob@localhost", ptype="subscribe")  # bob's client approves
    await wait_for(lambda: has_subscription(node, "bob@localhost", "alice@localhost", "both"))
    vcard = alice.plugin["xep_0054"].make_vcard()
    vcard["FN"] = "Alice Liddell"
    await alice.plugin["xep_0054"].publish_vcard(vcard, timeout=10)
    await close(bob)
    alice.send_message(mto=JID("bob@localhost"), mbody="see you in the cloud", mtype="chat")
    await asyncio.sleep(0.5)
    await close(alice)
    await node.stop()

    # the operator's edit: same file, storage now in the cloud
    cloud = tmp_path / "cloud.yml"
    settings = yaml.safe_load(embedded.read_text())
    settings["storage"] = cloud_storage(moto_service, seaweedfs_service, memcached_ring)
    cloud.write_text(yaml.safe_dump(settings))
    # the cloud config must create its table and bucket before migrate writes to them
    first = Server(load_config(cloud))
    await first.start()
    await first.stop()
    migrated = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "xmppd.cli.ctl",
            "migrate",
            "--from",
            str(embedded),
            "--to",
            str(cloud),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )
    assert migrated.returncode == 0, migrated.stderr
    assert "migrated" in migrated.stdout and "localhost/accounts" in migrated.stdout

    node = Server(load_config(cloud))
    await node.start()
    try:
        bob = await sign_in(node, "bob@localhost/tablet", "bob-secret")
        assert bob.client_roster["alice@localhost"]["subscription"] == "both"
        bob.send_presence()
        late = await bob.message()
        assert late["body"] == "see you in the cloud"
        card = await bob.plugin["xep_0054"].get_vcard(
            JID("alice@localhost"), local=False, timeout=10
        )
        assert card["vcard_temp"]["FN"] == "Alice Liddell"
        wrong = await connect(node, "alice@localhost/x", "not-alice", expect_failure=True)
        wrong.abort()
        await close(bob)
    finally:
        await node.stop()
