"""The log an operator reads: logins, failures, bans and refused streams, each with the
id of its connection; JSON lines in a file for log shippers, reopened on SIGHUP; the
level changed at run time by `xmppctl log-level`. A real xmppd process, real clients."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.integration.clients import HEADER, close, read_until
from tests.integration.nodeproc import Node, login, register, write_yaml
from tests.integration.test_reload import base_config
from tests.integration.test_workers import xmppctl

pytestmark = pytest.mark.timeout(90)

PASSWORDS = {"alice": "alice-Pa55word", "bob": "bob-Pa55word"}
WRONG = "not-bobs-Pa55word"
BODY = "a body no log may show"


async def refused_stream(port: int) -> bytes:
    """Open a stream to a host this server does not serve: what the server answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(HEADER.replace("to='localhost'", "to='nowhere.example'").encode())
    answer = await read_until(reader, b"</stream:stream>")
    writer.close()
    return answer


async def test_logins_failures_bans_and_refusals_carry_a_connection_id(tmp_path: Path) -> None:
    config = base_config(tmp_path, log_level="debug")  # debug: nothing secret even there
    config["limits"]["auth_failures_before_ban"] = 2
    path = write_yaml(tmp_path / "xmppd.yml", config)
    await register(path, "localhost", PASSWORDS)
    node = await Node.start(path)
    port = node.ports["STARTTLS"]
    try:
        alice = await login(port, "alice@localhost/desk", PASSWORDS["alice"], mechanism="PLAIN")
        found = await node.line(
            r"INFO +xmppd.connection: login: alice@localhost from 127\.0\.0\.1 with PLAIN "
            r"conn=(\w+)"
        )
        conn = found.group(1)
        alice.send_message(mto="alice@localhost/desk", mbody=BODY)
        assert (await asyncio.wait_for(alice.messages.get(), 10))["body"] == BODY
        await close(alice)
        await node.line(
            rf"INFO +xmppd.connection: logout: alice@localhost/desk from 127\.0\.0\.1: "
            rf".* conn={conn}$"
        )

        for _ in range(2):
            bob = await login(port, "bob@localhost/r", WRONG, fail=True)
            await close(bob)
        await node.line(
            r"INFO +xmppd.connection: failed login: 'bob@localhost' from 127\.0\.0\.1 with "
            r"SCRAM-SHA-\d+: not-authorized conn=\w+"
        )
        banned = await node.line(r"banned 127\.0\.0\.1 for .* conn=(\w+)")
        # the ban names the connection whose failure it was (slixmpp may try a second
        # mechanism on the same connection, so that is either attempt's)
        failed = re.findall(r"failed login: 'bob@localhost' .* conn=(\w+)", node.text())
        assert banned.group(1) in failed
        bob = await login(port, "bob@localhost/r", PASSWORDS["bob"], fail=True)
        await close(bob)
        await node.line(r"refused a login for 'bob@localhost' from 127\.0\.0\.1: .* conn=\w+")

        assert b"<host-unknown" in await refused_stream(port)
        await node.line(r"stream from 127\.0\.0\.1 \(\?\) refused: host-unknown .*conn=\w+")

        text = node.text()
        for secret in [*PASSWORDS.values(), WRONG, BODY]:
            assert secret not in text
    finally:
        await node.stop()


def records(path: Path) -> list[dict[str, Any]]:
    """Every line of a JSON log file, each parsed (a line that is not JSON fails)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_json_lines_in_a_file_reopened_after_logrotate_moves_it(tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "xmppd.log"
    config = base_config(tmp_path, log={"file": str(log_file), "format": "json"})
    path = write_yaml(tmp_path / "xmppd.yml", config)
    await register(path, "localhost", PASSWORDS)
    node = await Node.start(path, log_file)
    try:
        alice = await login(node.ports["STARTTLS"], "alice@localhost/desk", PASSWORDS["alice"])
        await close(alice)
        await node.line('"event": "logout"')
        by_event = {r.get("event"): r for r in records(log_file)}
        login_record = by_event["login"]
        assert login_record["level"] == "INFO" and login_record["logger"] == "xmppd.connection"
        assert login_record["jid"] == "alice@localhost"
        assert login_record["address"] == "127.0.0.1"
        assert re.fullmatch(r"SCRAM-SHA-\d+(-PLUS)?", login_record["mechanism"])
        assert by_event["logout"]["conn"] == login_record["conn"]
        assert login_record["message"].endswith(f"conn={login_record['conn']}")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", login_record["time"])

        rotated = log_file.with_suffix(".log.1")
        log_file.rename(rotated)  # what logrotate does, then it sends SIGHUP
        node.hangup()
        await node.line('"message": "reloaded: nothing changed"')
        assert [r["message"] for r in records(log_file)] == ["reloaded: nothing changed"]
        assert "reloaded" not in rotated.read_text()
        assert PASSWORDS["alice"] not in rotated.read_text()
    finally:
        await node.stop()


async def test_xmppctl_log_level_changes_the_level_until_restart(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "xmppd.yml", base_config(tmp_path))  # log_level: info
    await register(path, "localhost", PASSWORDS)
    node = await Node.start(path)
    port = node.ports["STARTTLS"]
    try:
        code, out, err = await xmppctl(path, "log-level", "warning")
        assert code == 0, err
        assert out.endswith(
            ": log level warning (was info) until restart; the configuration file is unchanged\n"
        )
        quiet = node.mark()
        alice = await login(port, "alice@localhost/desk", PASSWORDS["alice"])
        await close(alice)
        code, out, err = await xmppctl(path, "log-level", "info")
        assert code == 0, err
        await node.line("admin: log level info \\(was warning\\)", since=quiet)
        assert "login: alice" not in "".join(node.lines[quiet:])  # it came before the line
        alice = await login(port, "alice@localhost/desk", PASSWORDS["alice"])
        await close(alice)
        await node.line("login: alice@localhost", since=quiet)

        code, _, err = await xmppctl(path, "log-level", "chatty")
        assert code == 2 and "invalid choice" in err
    finally:
        await node.stop()
