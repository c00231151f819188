"""Which SASL mechanisms a stream may offer, in the server's order of preference."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Literal, get_args

from xmppd.sasl.scram import SCRAM_HASHES

Mechanism = Literal[
    "SCRAM-SHA-512-PLUS",
    "SCRAM-SHA-256-PLUS",
    "SCRAM-SHA-1-PLUS",
    "SCRAM-SHA-512",
    "SCRAM-SHA-256",
    "SCRAM-SHA-1",
    "PLAIN",
]
ALL_MECHANISMS: list[str] = list(get_args(Mechanism))


def offered_mechanisms(
    configured: Sequence[str],
    *,
    tls: bool,
    channel_bindings: Collection[str],
    allow_unencrypted: bool,
) -> list[str]:
    """The configured mechanisms this stream may offer now, best first.

    Before TLS: nothing, unless `allow_unencrypted`, and even then never
    PLAIN (it would put the password on the wire). -PLUS only when the
    connection has at least one channel binding type we can verify.
    Raises ValueError for a configured name we do not implement, so a typo
    in the config is an error instead of a silently missing mechanism.
    """
    unknown = [m for m in configured if m not in ALL_MECHANISMS]
    if unknown:
        raise ValueError(f"unknown SASL mechanisms: {', '.join(unknown)}")
    if not tls and not allow_unencrypted:
        return []
    offered = []
    for mechanism in ALL_MECHANISMS:
        if mechanism not in configured:
            continue
        if mechanism == "PLAIN" and not tls:
            continue
        if mechanism.endswith("-PLUS") and not (tls and channel_bindings):
            continue
        offered.append(mechanism)
    return offered


def scram_hash_of(mechanism: str) -> str:
    """The hashlib name of a SCRAM mechanism's hash ("SCRAM-SHA-256-PLUS" -> "sha256").

    This is the `hash_name` of `ScramKeys` and of `Accounts.scram_keys`.
    ValueError for a non-SCRAM mechanism.
    """
    name = mechanism.removesuffix("-PLUS")
    if not name.startswith("SCRAM-") or name[6:] not in SCRAM_HASHES:
        raise ValueError(f"not a SCRAM mechanism: {mechanism!r}")
    return SCRAM_HASHES[name[6:]]


def is_plus(mechanism: str) -> bool:
    """True for the channel-binding (-PLUS) variants."""
    return mechanism.endswith("-PLUS")
