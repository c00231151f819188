"""Password guessing over real TLS sockets: the guessing address is slowed and banned, never
the account, so its owner logs in from elsewhere at once (issue 10)."""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time

import pytest

from tests.integration.clients import HEADER, RawClient, close, connect
from tests.integration.conftest import StartServer
from xmppd.auth.throttle import AuthStats
from xmppd.server import Server

SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
OWNER = "127.0.0.1"
STRANGER = "127.0.0.2"
WRONG = "guess-1234"  # must never reach a log line


def plain(user: str, password: str) -> str:
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return f"<auth xmlns='{SASL}' mechanism='PLAIN'>{token}</auth>"


def failures(reply: bytes) -> list[str]:
    """The SASL failure conditions in a reply, in order."""
    return [m.decode() for m in re.findall(rb"<failure[^>]*><([a-z-]+)/>", reply)]


async def outcome(raw: RawClient) -> bytes:
    """What the server sent until the login's outcome (a success or a failure)."""
    reply = b""
    async with asyncio.timeout(10):
        while b"<success" not in reply and b"</failure>" not in reply:
            chunk = await raw.reader.read(65536)
            assert chunk, reply  # the server must answer before it closes
            reply += chunk
    return reply


class Guesser:
    """PLAIN attempts from one address, reconnecting when the server ends a stream
    after its per-stream limit of failures (RFC 6120 6.4.5)."""

    def __init__(self, server: Server, source: str) -> None:
        self.server = server
        self.source = source
        self.raw: RawClient | None = None
        self.failures_on_stream = 0
        self.last_reply = b""

    async def open_stream(self) -> RawClient:
        """The current stream, opened (TLS, header, features) if there is none."""
        if self.raw is None:
            self.raw = await RawClient.open(self.server, source=self.source)
            await self.raw.send(HEADER)
            await self.raw.read_until(b"</stream:features>")
            self.failures_on_stream = 0
        return self.raw

    async def attempt(self, password: str) -> str:
        """The outcome of one login as alice: "success" or the SASL failure condition."""
        raw = await self.open_stream()
        await raw.send(plain("alice", password))
        reply = await outcome(raw)
        if b"<success" in reply:
            await self.close()
            return "success"
        match = re.search(rb"<failure[^>]*><([a-z-]+)/>", reply)
        assert match is not None, reply
        self.last_reply = reply
        self.failures_on_stream += 1
        if self.failures_on_stream == 5:  # the server closes this stream now
            await self.close()
        return match.group(1).decode()

    async def close(self) -> None:
        if self.raw is not None:
            await self.raw.close()
            self.raw = None


async def test_guessing_bans_the_address_not_the_account(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="xmppd.auth.throttle")
    delay = 0.04
    server = await start_server(
        limits={"auth_failure_delay": delay, "auth_failures_before_ban": 10, "auth_ban_seconds": 60}
    )
    stranger = Guesser(server, STRANGER)
    outcomes = []
    for n in range(1, 13):
        started = time.monotonic()
        outcomes.append(await stranger.attempt(WRONG))
        if n <= 10:  # the n-th failure from the address waits n delays
            assert time.monotonic() - started >= n * delay
    assert outcomes == ["not-authorized"] * 10 + ["temporary-auth-failure"] * 2
    assert b"too many failed logins from your address" in stranger.last_reply

    # The owner, from an address that has not been failing, gets in at once.
    owner = Guesser(server, OWNER)
    await owner.open_stream()
    started = time.monotonic()
    assert await owner.attempt("alice-secret") == "success"
    assert time.monotonic() - started < 10 * delay  # less than the stranger's next wait
    client = await connect(server, "alice@localhost/phone", "alice-secret")  # SCRAM, slixmpp
    await close(client)

    # The banned address is refused even with the right password, unchecked.
    assert await stranger.attempt("alice-secret") == "temporary-auth-failure"
    await stranger.close()

    assert server.throttle.stats == AuthStats(failures=10, bans=1, refusals=3)
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    bans = [m for m in infos if m.startswith(f"banned {STRANGER} ")]
    assert len(bans) == 1 and "'alice@localhost'" in bans[0]
    refusals = [m for m in infos if m.startswith("refused a login")]
    assert len(refusals) == 3 and all(STRANGER in m for m in refusals)
    assert WRONG not in caplog.text and "alice-secret" not in caplog.text


async def test_banned_address_logs_in_once_the_ban_expires(start_server: StartServer) -> None:
    ban = 1.0
    server = await start_server(
        limits={"auth_failure_delay": 0.01, "auth_failures_before_ban": 3, "auth_ban_seconds": ban}
    )
    stranger = Guesser(server, STRANGER)
    for _ in range(3):
        assert await stranger.attempt(WRONG) == "not-authorized"
    last_failure_answered = time.monotonic()  # the failure was counted before this
    assert await stranger.attempt("alice-secret") == "temporary-auth-failure"
    await stranger.close()

    # Wait out the ban: it ends `ban` seconds after the failure was counted (plus the
    # timer's rounding); nothing else signals its end.
    await asyncio.sleep(last_failure_answered + ban + 0.05 - time.monotonic())
    assert await stranger.attempt("alice-secret") == "success"
    assert server.throttle.stats == AuthStats(failures=3, bans=1, refusals=1)


async def test_pipelined_auths_on_one_stream_check_no_password_in_parallel(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    """30 PLAIN guesses in one write on one stream: the second <auth/> ends the first
    exchange and each such one is a counted failure, so the stream ends after five,
    logged, with not one password checked (each check would be a key derivation,
    and all of them would have passed the ban check before one failure counted)."""
    caplog.set_level(logging.INFO, logger="xmppd.connection")
    server = await start_server(limits={"auth_failures_before_ban": 3, "auth_ban_seconds": 60})
    raw = await RawClient.open(server, source=STRANGER)
    await raw.send(HEADER)
    await raw.read_until(b"</stream:features>")
    guesses = [WRONG] * 29 + ["alice-secret"]
    await raw.send("".join(plain("alice", guess) for guess in guesses))
    reply = await raw.read_to_close()
    await raw.close()
    assert failures(reply) == ["aborted"] * 5 and b"<success" not in reply
    assert b"<policy-violation" in reply
    assert server.throttle.stats.failures == 0  # no check ran, so none failed
    refused = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("failed login")
    ]
    assert len(refused) == 5 and all(f"from {STRANGER} " in m and ": aborted" in m for m in refused)

    # The owner's address is another one: the stranger cost it nothing.
    assert await Guesser(server, OWNER).attempt("alice-secret") == "success"


async def test_parallel_streams_past_the_ban_get_the_same_answer_right_or_wrong(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    """One guess on each of eight streams, all in one turn of the server's event loop,
    with one failure left before the ban: one password is checked, and every other
    attempt gets the banned address's answer at once, the right password's the same
    bytes as a wrong one's. The owner, from another address, logs in meanwhile."""
    caplog.set_level(logging.INFO, logger="xmppd.auth.throttle")
    server = await start_server(limits={"auth_failures_before_ban": 3, "auth_ban_seconds": 60})
    stranger = Guesser(server, STRANGER)
    for _ in range(2):  # another account's: a success for alice cannot forgive them
        raw = await stranger.open_stream()
        await raw.send(plain("bob", WRONG))
        assert failures(await raw.read_until(b"</failure>")) == ["not-authorized"]
    await stranger.close()

    passwords = [WRONG, "alice-secret"] * 4
    streams = []
    for source in [STRANGER] * len(passwords) + [OWNER]:
        raw = await RawClient.open(server, source=source)
        await raw.send(HEADER)
        await raw.read_until(b"</stream:features>")
        streams.append(raw)
    # Written without a wait between them: the node runs in this event loop, so all
    # nine are in its sockets before it reads any, and it reads them in one turn.
    for raw, password in zip(streams, [*passwords, "alice-secret"], strict=True):
        raw.writer.write(plain("alice", password).encode())
    replies = [await outcome(raw) for raw in streams]
    for raw in streams:
        await raw.close()

    owner = replies.pop()
    assert b"<success" in owner
    banned = [reply for reply in replies if failures(reply) == ["temporary-auth-failure"]]
    assert len(banned) == len(passwords) - 1, replies  # one password was checked
    assert len(set(banned)) == 1  # the same bytes, for right and wrong passwords alike
    assert {p for p, reply in zip(passwords, replies, strict=True) if reply in banned} == {
        WRONG,
        "alice-secret",
    }
    assert server.throttle.stats.failures <= 3
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert len(refusals) == len(passwords) - 1 and all(STRANGER in m for m in refusals)


async def test_users_behind_one_address_logging_in_at_once_are_all_served(
    start_server: StartServer,
) -> None:
    """Six right passwords from one address (a NAT) in one turn of the server's loop,
    with a ban after three failures: past three checks under way the others wait for a
    turn, and each is then checked; none is refused for the checks of the others."""
    server = await start_server(limits={"auth_failures_before_ban": 3, "auth_ban_seconds": 60})
    streams = []
    for _ in range(6):
        raw = await RawClient.open(server, source=STRANGER)
        await raw.send(HEADER)
        await raw.read_until(b"</stream:features>")
        streams.append(raw)
    for raw in streams:  # no wait between them: all in the node's sockets at once
        raw.writer.write(plain("alice", "alice-secret").encode())
    replies = [await outcome(raw) for raw in streams]
    for raw in streams:
        await raw.close()
    assert all(b"<success" in reply for reply in replies), replies
    assert server.throttle.stats.refusals == 0
