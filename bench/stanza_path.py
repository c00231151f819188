"""Micro-benchmark of the stanza path (parse, route, serialize), no peers, no sockets.

usage: python bench/stanza_path.py [--seconds S] [--modules disco,roster,... | none]
                                   [--body-bytes N] [--out DIR]

Two real client streams (`C2SStream`, driven through STARTTLS-less SASL and
bind to the BOUND phase) and a real router and module host over in-memory
stores (`xmppd.testing.ModuleHarness`, the bench's module set by default).
Each stage is timed on its own, then the whole path: the bytes of a
one-to-one chat message from alice's stream to the bytes bob's stream
would write. TLS and the event loop are left out on purpose: they are
measured by the tsung comparison (bench/run.sh), this isolates the Python
work per stanza. Prints a table; writes it as JSON and Markdown to
--out (default bench/results/).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lxml import etree

from xmppd.session import ClientSession
from xmppd.stream import c2s
from xmppd.stream.errors import StreamError
from xmppd.testing import ModuleHarness
from xmppd.xml.parser import StreamParser

DOMAIN = "bench.local"
HEADER = (
    f"<?xml version='1.0'?><stream:stream xmlns='jabber:client' to='{DOMAIN}' "
    "xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
).encode()
DEFAULT_MODULES = "disco,ping,roster,presence,carbons,blocking,privacy,private,vcard,offline,last"


class StreamTransport:
    """A bound C2SStream as the Transport of a session, as C2SConnection is, with no socket."""

    def __init__(self, stream: c2s.C2SStream) -> None:
        self.stream = stream

    def send(self, stanza: etree._Element) -> bool:
        self.stream.send(stanza)
        return True

    def send_serialized(self, data: bytes) -> None:
        """Nothing here comes from another node."""

    def close(self, error: StreamError) -> None:
        self.stream.fail(error)

    def pause_input(self) -> None:
        """No transport to pause here: the bench feeds the stream itself."""

    def resume_input(self) -> None:
        """See pause_input."""

    def drop(self) -> None:
        """No connection to cut here either."""


def stream_session(user: str) -> tuple[ClientSession, c2s.C2SStream]:
    stream = bound_stream(user)
    assert stream.jid is not None
    session = ClientSession(stream.jid, StreamTransport(stream))
    session.available = True
    return session, stream


def bound_stream(user: str) -> c2s.C2SStream:
    """A C2SStream taken to BOUND the way a client does it (TLS only pretended)."""
    settings = c2s.StreamSettings(
        hosts={DOMAIN},
        max_stanza_bytes=262144,
        max_stanza_bytes_unauthenticated=10240,
        max_depth=48,
        mechanisms=["PLAIN"],
    )
    stream = c2s.C2SStream(settings)
    stream.receive(HEADER)
    events = stream.receive(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    assert any(isinstance(e, c2s.TLSRequested) for e in events), events
    stream.tls_started({})
    stream.receive(HEADER)
    token = base64.b64encode(f"\0{user}\0secret".encode()).decode()
    events = stream.receive(
        f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{token}</auth>".encode()
    )
    assert any(isinstance(e, c2s.AuthRequested) for e in events), events
    stream.sasl_success(user)
    stream.receive(HEADER)
    events = stream.receive(
        b"<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
        b"<resource>r</resource></bind></iq>"
    )
    bind = next(e for e in events if isinstance(e, c2s.BindRequested))
    stream.bound(bind.iq, f"{user}@{DOMAIN}/r")
    stream.output()
    return stream


def timed(fn: Callable[[], object], seconds: float) -> tuple[float, int]:
    """Microseconds per call of fn, over at least `seconds` (after a warm-up)."""
    for _ in range(200):
        fn()
    calls, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(200):
            fn()
        calls += 200
        now = time.perf_counter()
        if now >= deadline:
            return (now - start) * 1e6 / calls, calls


async def run(seconds: float, modules: list[str], body_bytes: int) -> list[dict[str, Any]]:
    harness = await ModuleHarness(
        {name: None for name in modules}, hosts=[DOMAIN], users={f"alice@{DOMAIN}", f"bob@{DOMAIN}"}
    ).start()
    router = harness.router
    alice, alice_stream = stream_session("alice")
    bob, bob_stream = stream_session("bob")
    for session in (alice, bob):
        router.bind(session)

    body = "x" * body_bytes
    message = (
        f"<message to='bob@{DOMAIN}/r' type='chat' id='m1'><body>{body}</body></message>".encode()
    )
    parser = StreamParser(262144, 48)
    parser.feed(HEADER)
    stanza = parser.feed(message)[0]
    assert isinstance(stanza, etree._Element)
    stanza.set("from", alice.jid)

    def parse() -> None:
        parser.feed(message)

    def parse_batch() -> None:  # ten stanzas in one read, as under load
        parser.feed(message * 10)

    def stream_in() -> None:  # parse + stream rules ('from' stamping, phase checks)
        alice_stream.receive(message)

    def route() -> None:  # router + module filters + deliver (queues serialized bytes)
        router.route(stanza, alice)
        bob_stream.output()

    def serialize() -> None:
        etree.tostring(stanza)

    def end_to_end() -> None:  # bytes from alice's socket -> bytes for bob's socket
        for event in alice_stream.receive(message):
            if isinstance(event, c2s.StanzaReceived):
                router.route(event.stanza, alice)
        out = bob_stream.output()
        assert out

    # Warm-up: privacy and blocking load the users' lists from storage on first
    # use (a task); from then on the path is synchronous, as on a busy server.
    for event in alice_stream.receive(message):
        if isinstance(event, c2s.StanzaReceived):
            router.route(event.stanza, alice)
    await router.drain()
    bob_stream.output()
    end_to_end()
    delivered = bob_stream.output()
    rows = []
    for name, fn, per_call in (
        ("parse (StreamParser.feed, 1 stanza)", parse, 1),
        ("parse (StreamParser.feed, 10 stanzas per read)", parse_batch, 10),
        ("stream in (C2SStream.receive: parse + stanza rules)", stream_in, 1),
        ("route + deliver (Router.route -> bob's stream.send)", route, 1),
        ("serialize (etree.tostring)", serialize, 1),
        ("end to end (alice bytes -> bob bytes)", end_to_end, 1),
    ):
        us, calls = timed(fn, seconds)
        rows.append(
            {
                "stage": name,
                "us_per_stanza": round(us / per_call, 2),
                "stanzas_per_s": round(1e6 * per_call / us),
                "calls": calls,
            }
        )
    await router.drain()
    assert not delivered, "a stray delivery (bounce?) was queued for bob"
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per stage (default 1)")
    parser.add_argument(
        "--modules", default=DEFAULT_MODULES, help="modules loaded, comma separated, or none"
    )
    parser.add_argument("--body-bytes", type=int, default=64, help="message body size")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    wanted = [] if args.modules == "none" else [m for m in args.modules.split(",") if m]
    here = Path(__file__).resolve().parent.parent / "modules"
    modules = [m for m in wanted if (here / f"{m}.py").exists()]
    rows = asyncio.run(run(args.seconds, modules, args.body_bytes))
    header = (
        f"stanza path, {platform.python_implementation()} {platform.python_version()}, "
        f"lxml {'.'.join(map(str, etree.LXML_VERSION[:3]))}, body {args.body_bytes} B, "
        f"modules: {', '.join(modules) or 'none'}"
    )
    lines = [header, "", "| stage | us/stanza | stanzas/s (one core) |", "|---|---|---|"]
    lines += [f"| {r['stage']} | {r['us_per_stanza']} | {r['stanzas_per_s']:,} |" for r in rows]
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"stanza_path-{stamp}.md").write_text(text)
    (args.out / f"stanza_path-{stamp}.json").write_text(
        json.dumps({"header": header, "modules": modules, "rows": rows}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
