"""Every message under load is delivered exactly once, stored offline, or bounced.

A load generator in its own process (tests/integration/loadgen.py) logs in
many clients over TLS and sends numbered messages as fast as the server
takes them, so that the server, with its own core, falls behind and queues.
The check is per message, not a count: each id must reach its recipient
exactly once (live, or later from offline storage for clients that left
midway), or come back to its sender as an error when its recipient does not
exist. The server's own ledger (xmppd.ledger) must agree.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import StartServer, port_of
from xmppd.adminapi import read_token
from xmppd.server import Server

USERS = {f"load{n:02d}": f"secret-{n}" for n in range(40)}
MESSAGES_PER_USER = 150
LEAVERS = ["load00", "load01", "load02", "load03"]
GHOST = "nobody"
GHOST_EVERY = 50


async def run_loadgen(port: int) -> dict[str, Any]:
    plan = {
        "port": port,
        "host": "localhost",
        "users": USERS,
        "messages_per_user": MESSAGES_PER_USER,
        "leavers": LEAVERS,
        "ghost": GHOST,
        "ghost_every": GHOST_EVERY,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.integration.loadgen",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(json.dumps(plan).encode()), 90)
    assert proc.returncode == 0, err.decode()[-3000:]
    result: dict[str, Any] = json.loads(out)
    return result


async def scrape(server: Server) -> dict[str, float]:
    """The node's /metrics, as an operator's Prometheus reads them: sample -> value."""
    headers = {"Authorization": f"Bearer {read_token(server.config.data_dir)}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(f"{server.admin.url}/metrics") as response:
            assert response.status == 200
            text = await response.text()
    return {
        sample.name + "".join(f"{{{v}}}" for v in sample.labels.values()): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.mark.timeout(150)
async def test_every_message_is_delivered_once_stored_offline_or_bounced(
    start_server: StartServer,
) -> None:
    server = await start_server(users=USERS)
    result = await run_loadgen(port_of(server, "direct_tls"))
    await server.router.drain()

    sent = {
        id_: (sender, to) for sender, seen in result.items() for id_, to in seen["sent"].items()
    }
    # The leavers send the first half of their messages only.
    assert len(sent) == len(USERS) * MESSAGES_PER_USER - len(LEAVERS) * (MESSAGES_PER_USER // 2)
    arrivals: Counter[tuple[str, str]] = Counter()  # (id, how) -> times
    for name, seen in result.items():
        for how in ("live", "delayed", "errors"):
            for id_ in seen[how]:
                assert id_ in sent, f"{name} got {id_} ({how}), which nobody sent"
                sender, to = sent[id_]
                owner = sender if how == "errors" else to
                assert name == owner, f"{id_} for {to} from {sender} reached {name} ({how})"
                arrivals[(id_, how)] += 1

    ledger = server.router.ledger.snapshot()
    lost, duplicated, wrong = [], [], []
    for id_, (_sender, to) in sent.items():
        ways = {how: arrivals[(id_, how)] for how in ("live", "delayed", "errors")}
        total = sum(ways.values())
        if total == 0:
            lost.append(id_)
        elif total > 1:
            duplicated.append((id_, ways))
        elif (to == GHOST) != (ways["errors"] == 1):
            wrong.append((id_, ways))
    assert not lost, (
        f"{len(lost)} of {len(sent)} messages lost, e.g. {lost[:5]}; "
        f"to {Counter(sent[i][1] for i in lost).most_common(5)}; {ledger}"
    )
    assert not duplicated, f"{len(duplicated)} duplicated, e.g. {duplicated[:5]}"
    assert not wrong, f"{len(wrong)} answered the wrong way, e.g. {wrong[:5]}"

    delayed = sum(n for (_, how), n in arrivals.items() if how == "delayed")
    bounced = sum(n for (_, how), n in arrivals.items() if how == "errors")
    assert delayed > 0, "no client left while messages were on their way: the plan is too small"
    assert bounced == sum(1 for _, to in sent.values() if to == GHOST)

    assert ledger["received"] == len(sent), ledger
    assert ledger["offline"] == delayed == ledger["replayed"], ledger
    assert ledger["bounced"] == bounced, ledger
    assert ledger["lost"] == 0, ledger
    assert ledger["copies"] == 0, ledger
    assert ledger["delivered"] - ledger["replayed"] + ledger["offline"] + ledger["bounced"] == len(
        sent
    ), ledger
    assert ledger["written"] == ledger["delivered"], ledger

    metrics = await scrape(server)
    assert metrics["xmppd_messages_received_total"] == len(sent)
    assert metrics["xmppd_messages_offline_stored_total"] == delayed
    assert metrics["xmppd_messages_bounced_total"] == bounced
    assert metrics["xmppd_messages_delivered_total"] == ledger["delivered"]
    assert not [name for name in metrics if name.startswith("xmppd_messages_dropped")]
    assert metrics["xmppd_event_loop_lag_seconds_count"] > 0  # the pause monitor runs
