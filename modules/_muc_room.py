"""One multi-user chat room (XEP-0045) as plain state: stanzas in, stanzas out.

A `Room` holds the occupants with their roles, the affiliations, the
configuration, the subject and the discussion history, and turns each
stanza an entity sends it into the stanzas to route (`Out`), or raises
`StanzaError`. It does no I/O, reads no clock (callers pass `now`) and
never routes anything itself, so that:

- module tests drive every XEP-0045 use case in microseconds;
- the module (modules/muc.py) decides where a room lives and when its
  state is written: the node that serves the room, on a cluster the
  room's owner node, which rebuilds it after a handover from `snapshot()`
  (what is stored) or `live_state()` and the occupants' records (what
  the previous owner kept in Redis).

`persistent_changed` tells the host that something stored changed
(configuration, affiliations, subject, pending invitations); `history_changed`
that history did.
"""

from __future__ import annotations

import base64
import copy
import functools
import hashlib
import hmac
import json
import secrets
import unicodedata
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from lxml import etree

from xmppd.jid import JID, parse_jid
from xmppd.modules._dataforms import Field, Submitted, form
from xmppd.storage.base import MAX_ITEM_BYTES
from xmppd.stream.errors import StanzaError
from xmppd.xml import ns

MUC = "http://jabber.org/protocol/muc"
MUC_USER = f"{MUC}#user"
MUC_ADMIN = f"{MUC}#admin"
MUC_OWNER = f"{MUC}#owner"
ROOMCONFIG = f"{MUC}#roomconfig"
ROOMINFO = f"{MUC}#roominfo"
OCCUPANT_ID = "urn:xmpp:occupant-id:0"
DELAY = "urn:xmpp:delay"
PING = "urn:xmpp:ping"
REGISTER = "jabber:iq:register"
MUC_REGISTER = f"{MUC}#register"
MUC_REQUEST = f"{MUC}#request"

SID = "urn:xmpp:sid:0"
RELAY_TAG = 12  # characters of the tag before a relayed IQ's own id (`Room._relay_tag`)
SEEN = 200  # message ids a room remembers to drop a message handled twice
INVITES = 100  # invitations a room remembers, for their declines

ROLES = ("none", "visitor", "participant", "moderator")
AFFILIATIONS = ("outcast", "none", "member", "admin", "owner")
_RANK = {name: rank for rank, name in enumerate(AFFILIATIONS)}

Copy = tuple[etree._Element, str]
"""A copy of the stanza addressed to the JID, made by the host when it routes it: a
big room's fan-out is one build and a copy per recipient, the copies made a slice
at a time (modules/_muc_send.py). The stanza is not changed once returned."""
Out = list[etree._Element | Copy]
# Error conditions that say an occupant's client cannot be reached any more.
# (Not service-unavailable: a client refusing one private message answers with it.)
_GONE = frozenset({"gone", "recipient-unavailable", "redirect", "remote-server-not-found",
                   "remote-server-timeout"})


def occupant_id(secret: str, bare: str) -> str:
    """XEP-0421's id of `bare` in the room whose secret is `secret`."""
    digest = hmac.new(secret.encode(), bare.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest[:18]).decode()


def _new_occupant_id() -> str:
    """An id no account has: what a removed account's messages carry from then on (one
    per room and removal, so that they still read as one occupant's)."""
    return base64.b64encode(secrets.token_bytes(18)).decode()


def _with_occupant_id(xml: str, old: str, new: str) -> str | None:
    """The history message `xml` with its occupant id `new` in place of `old`; None if
    it had not `old` (most messages: a substring test spares parsing them)."""
    if f'id="{old}"' not in xml and f"id='{old}'" not in xml:
        return None
    message = etree.fromstring(xml)
    changed = False
    for element in message.iter(f"{{{OCCUPANT_ID}}}occupant-id"):
        if element.get("id") == old:
            element.set("id", new)
            changed = True
    return etree.tostring(message, encoding="unicode") if changed else None


@functools.lru_cache(maxsize=4096)
def nick_key(nick: str) -> str:
    """What a nick is compared by, for XEP-0045's nick in use (7.2.9) and reserved
    nick (7.10), as RFC 8266's nickname profile compares nicknames:
    compatibility forms and width (NFKC), case (Unicode toLowerCase, RFC 8266
    section 2.2, not case folding: "Straße" and "Strasse" stay two nicks) and
    spaces (any kind, leading, trailing or repeated) folded. Two nicks with one key
    read as one in a client: a newcomer may not take "alice", "\uff41lice" or
    " Alice" beside "Alice" and pass for her. The nick itself is kept as written.
    Memoised: every join compares against every registered nick's."""
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", nick).lower())
    return " ".join(folded.split())


def _stamp(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_stamp(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _el(tag: str, attrs: dict[str, str] | None = None, text: str | None = None) -> etree._Element:
    element = etree.Element(tag, nsmap={None: tag[1 : tag.index("}")]})
    for key, value in (attrs or {}).items():
        element.set(key, value)
    if text is not None:
        element.text = text
    return element


def _stanza(tag: str, frm: str, to: str | None, type_: str | None = None) -> etree._Element:
    stanza = etree.Element(f"{{{ns.CLIENT}}}{tag}", nsmap={None: ns.CLIENT})
    stanza.set("from", frm)
    if to is not None:
        stanza.set("to", to)
    if type_:
        stanza.set("type", type_)
    return stanza


@dataclass(slots=True)
class Config:
    """The room configuration form's values (muc#roomconfig)."""

    name: str = ""
    description: str = ""
    persistent: bool = False
    public: bool = True
    members_only: bool = False
    moderated: bool = False
    password: str = ""  # empty: not password-protected
    whois: str = "moderators"  # "anyone": non-anonymous; "moderators": semi-anonymous
    max_users: int = 0  # 0: the service's limit
    change_subject: bool = False  # participants may change the subject
    allow_invites: bool = False  # participants may invite to a members-only room
    allow_private_messages: bool = True
    history_length: int = 20


@dataclass(slots=True)
class Limits:
    """What the service allows every room (module options)."""

    max_occupants: int = 200
    max_history: int = 50
    max_message_bytes: int = 16384
    messages_per_second: float = 2.0  # per occupant, groupchat and private together
    message_burst: int = 10
    max_presence_bytes: int = 4096  # an occupant's presence payload, kept for newcomers
    max_affiliations: int = 1000  # JIDs with an affiliation or a registered nick, per room
    # What the room's stored state may take (the stores' item limit, less the item's
    # other attributes and their names).
    max_state_bytes: int = MAX_ITEM_BYTES - 4096


@dataclass(slots=True)
class Occupant:
    nick: str
    jid: JID  # the real full JID (of its first session)
    role: str
    presence: list[etree._Element] = field(default_factory=list)  # show, status, ...
    show: str | None = None
    others: list[JID] = field(default_factory=list)  # more sessions of that user, same nick
    tokens: float = -1.0  # message rate bucket; -1: full, set at the first message
    refilled: float = 0.0
    seq: int = 0  # its place in `Room.occupants` (join order; a nick change moves it last)
    # Its presence as a newcomer gets it, and what that was built from (Room._shown).
    shown: tuple[tuple[Any, ...], etree._Element] | None = None


@dataclass(slots=True)
class HistoryEntry:
    when: float
    xml: str  # the message as occupants got it, 'to' left out
    chars: int


class Room:
    def __init__(self, jid: str, limits: Limits, creator: str, secret: str | None = None) -> None:
        self.jid = jid  # room@service
        self.limits = limits
        self.creator = creator  # bare JID; counts against its rooms-per-user limit
        self.secret = secret or secrets.token_hex(16)  # occupant ids: stable, unguessable
        self.config = Config()
        self.affiliations: dict[str, str] = {}  # bare JID -> affiliation other than none
        self.registered: dict[str, str] = {}  # bare JID -> its registered nick (7.10)
        self.occupants: dict[str, Occupant] = {}  # nick -> occupant
        self._keys: dict[str, Occupant] = {}  # nick_key(nick) -> occupant (`_holder`)
        self.by_jid: dict[str, Occupant] = {}  # real full JID -> occupant
        self.subject = ""
        self.subject_nick = ""
        self.history: deque[HistoryEntry] = deque(maxlen=self._history_cap())
        self.locked = False  # created, waiting for its owner's configuration (201)
        self.destroyed = False
        self.persistent_changed = False
        self.history_changed = False
        self.stored = False  # the stores hold this room (the host sets it)
        # The host's fencing of its writes (modules/_muc_store.py): the generation of
        # this copy, and the etag of the history blob it last read or wrote.
        self.gen = 0
        self.history_etag: str | None = None
        # Nicks whose occupant changed (joined, left, renamed, role, presence, sessions)
        # since the host last took them: what its live copy (Redis, on a cluster) rewrites.
        self.touched: set[str] = set()
        # The last messages' (sender, origin-id or id): a message handled again (a
        # dead node's inbox replayed by its reaper) is dropped, not delivered twice.
        self.seen: deque[str] = deque(maxlen=SEEN)
        self._seen: set[str] = set()
        self.seen_changed = False
        self._seq = 0  # the next occupant's `seq`
        self._ids: dict[str, str] = {}  # bare JID -> occupant id (an HMAC each time is dear)
        # Invitations forwarded and not declined yet, oldest first: invitee's bare JID ->
        # the inviter's full JID, where its decline goes (at most INVITES). Part of the
        # stored state, changed with `persistent_changed`: a decline finds its
        # invitation after a restart, an unloading or a move to another node.
        self.invited: dict[str, str] = {}

    # --- stored state -------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """What a persistent room keeps across restarts (history apart)."""
        return {
            "config": asdict(self.config),
            "affiliations": self.affiliations,
            "subject": self.subject,
            "subject_nick": self.subject_nick,
            "secret": self.secret,
            "creator": self.creator,
            "registered": self.registered,
            "invited": self.invited,  # a decline reaches the room wherever it runs next
        }

    @classmethod
    def restore(cls, jid: str, limits: Limits, state: dict[str, Any]) -> Room:
        room = cls(jid, limits, state["creator"], state["secret"])
        room.config = Config(**state["config"])
        room.affiliations = dict(state["affiliations"])
        room.subject = state["subject"]
        room.subject_nick = state["subject_nick"]
        room.registered = dict(state.get("registered", {}))
        room.invited = dict(state.get("invited", {}))
        room.history = deque(maxlen=room._history_cap())
        room.stored = True
        return room

    def forget(self, bare: str) -> bool:
        """The account is removed: nothing the room keeps may name it any more, so that a
        new account of that name inherits nothing (an affiliation, a registered nick,
        the `creator` mark that counts against its rooms-per-user limit) and is not
        taken for the old one: the occupant id on its messages in the history, the
        same HMAC for the same JID, is replaced by one of its own (`forget_history`).
        The last message ids it sent (their keys hold its full JID) go too, and the
        invitations it sent or got (the room keeps them for their declines).

        The history's messages themselves stay, under the nick they were sent with:
        XEP-0045's discussion history (7.2.15) is the room's record that every
        occupant of the time already got, whose replies would lose their context,
        and a nick is the room's name for a participant, not an address of the
        account (the room puts no real JID in a message). True if there was
        something."""
        found = self.affiliations.pop(bare, None) is not None
        found = self.registered.pop(bare, None) is not None or found
        if self.creator == bare:
            self.creator = ""
            found = True
        self.persistent_changed = self.persistent_changed or found
        mine = self.occupant_id(bare)
        self._ids.pop(bare, None)
        replaced = _new_occupant_id()
        for n, entry in enumerate(self.history):
            xml = _with_occupant_id(entry.xml, mine, replaced)
            if xml is not None:
                self.history[n] = HistoryEntry(entry.when, xml, len(xml))
                self.history_changed = found = True
        named = [k for k, inviter in self.invited.items() if bare in (k, inviter.split("/")[0])]
        for invitee in named:
            del self.invited[invitee]
        self.persistent_changed = self.persistent_changed or bool(named)
        found = found or bool(named)
        sent = [key for key in self.seen if key.startswith(f"{bare}/")]
        if sent:
            self.seen = deque((k for k in self.seen if k not in sent), maxlen=SEEN)
            self._seen.difference_update(sent)
            self.seen_changed = found = True
        return found

    @staticmethod
    def forget_stored(state: dict[str, Any], bare: str) -> bool:
        """`forget` on a stored snapshot (a room not live here), the history apart
        (`forget_history`)."""
        found = state["affiliations"].pop(bare, None) is not None
        found = state.get("registered", {}).pop(bare, None) is not None or found
        if state.get("creator") == bare:
            state["creator"] = ""
            found = True
        invited = state.get("invited", {})
        named = [k for k, inviter in invited.items() if bare in (k, inviter.split("/")[0])]
        for invitee in named:
            del invited[invitee]
        return found or bool(named)

    @staticmethod
    def forget_history(data: bytes, secret: str, bare: str) -> bytes | None:
        """`history_json()` of a stored room with the occupant id of `bare` replaced
        (see `forget`); None when none of its messages has it. Read for every stored
        room at each removal: the bytes are searched first, and only a history where
        the account spoke is decoded (JSON leaves the id's base64 as it is)."""
        mine, replaced = occupant_id(secret, bare), _new_occupant_id()
        if mine.encode() not in data:
            return None
        entries = json.loads(data)
        changed = False
        for entry in entries:
            xml = _with_occupant_id(entry[1], mine, replaced)
            if xml is not None:
                entry[1], changed = xml, True
        return json.dumps(entries).encode() if changed else None

    # --- live state (what another node needs to run the room on with its occupants) -----

    def live_state(self) -> dict[str, Any]:
        """`snapshot()` and what only a live room has (a temporary room is nowhere else)."""
        return {**self.snapshot(), "locked": self.locked}

    @classmethod
    def restore_live(cls, jid: str, limits: Limits, state: dict[str, Any]) -> Room:
        room = cls.restore(jid, limits, state)
        room.locked = bool(state.get("locked"))
        room.stored = room.config.persistent
        return room

    def occupant_record(self, nick: str) -> dict[str, Any] | None:
        """The occupant as another node restores it (`add_occupant`); None if gone."""
        occupant = self.occupants.get(nick)
        if occupant is None:
            return None
        return {
            "nick": nick,
            "jid": occupant.jid.full,
            "others": [other.full for other in occupant.others],
            "role": occupant.role,
            "presence": [etree.tostring(child, encoding="unicode") for child in occupant.presence],
            "show": occupant.show,
            "seq": occupant.seq,
        }

    def add_occupants(self, records: Iterable[dict[str, Any]]) -> None:
        """Occupants as `occupant_record` gave them, back in the room in their order
        (no stanza sent: the occupants know each other already)."""
        for record in sorted(records, key=lambda r: int(r["seq"])):
            self._add_occupant(record)

    def _add_occupant(self, record: dict[str, Any]) -> None:
        occupant = Occupant(
            record["nick"], parse_jid(record["jid"]), record["role"],
            [etree.fromstring(xml) for xml in record["presence"]], record["show"],
            [parse_jid(other) for other in record["others"]], seq=int(record["seq"]),
        )
        self._seq = max(self._seq, occupant.seq + 1)
        self._seat(occupant)
        for session in (occupant.jid, *occupant.others):
            self.by_jid[session.full] = occupant

    def _next(self) -> int:
        self._seq += 1
        return self._seq - 1

    def load_seen(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._remember(key)

    def _remember(self, key: str) -> None:
        if len(self.seen) == self.seen.maxlen:
            self._seen.discard(self.seen[0])
        self.seen.append(key)
        self._seen.add(key)

    def history_json(self) -> bytes:
        return json.dumps([[e.when, e.xml] for e in self.history]).encode()

    def load_history(self, data: bytes) -> None:
        for when, xml in json.loads(data):
            self.history.append(HistoryEntry(when, xml, len(xml)))

    def _history_cap(self) -> int:
        return max(0, min(self.config.history_length, self.limits.max_history))

    # --- who is who -----------------------------------------------------------------------

    def affiliation(self, bare: str) -> str:
        """`bare`'s own affiliation (its server's ban apart: `_standing`)."""
        return self.affiliations.get(bare, "none")

    def _standing(self, bare: str) -> str:
        """`affiliation`, or outcast for a user with none of its own whose server's JID
        is banned: a ban of a domain is a ban of every user of it (as in Prosody and
        ejabberd; taken and answered, it must not let them in). What admits a user or
        not (a join, a registration, an invitation's membership); the ban removes such
        users from the room (`_affected`), so the paths that show an occupant's
        affiliation stay one lookup, a join into a big room makes one per occupant."""
        found = self.affiliations.get(bare)
        if found is None:
            domain = bare.rpartition("@")[2]
            banned = domain != bare and self.affiliations.get(domain) == "outcast"
            found = "outcast" if banned else "none"
        return found

    def _affected(
        self, bare: str, affiliation: str, affiliations: dict[str, str]
    ) -> list[Occupant]:
        """The occupants that `bare`'s affiliation becoming `affiliation` (in
        `affiliations`, the room's as they will be) applies to: that user's, and for a
        ban of a domain every user of it without an affiliation of its own."""
        return [o for o in self.occupants.values() if o.jid.bare == bare or (
            affiliation == "outcast" and o.jid.domain == bare and o.jid.bare not in affiliations
        )]

    def occupant_id(self, bare: str) -> str:
        """XEP-0421: the same for every session and nick of one user, here, and
        revealing nothing of the real JID (a keyed hash with this room's secret)."""
        found = self._ids.get(bare)
        if found is None:
            if len(self._ids) > 4 * len(self.occupants) + 64:
                self._ids.clear()  # ids of users long gone
            found = self._ids[bare] = occupant_id(self.secret, bare)
        return found

    def _holder(self, nick: str) -> Occupant | None:
        """The occupant that holds `nick` or a nick that reads as it (`nick_key`)."""
        found = self.occupants.get(nick)
        return found if found is not None else self._keys.get(nick_key(nick))

    def _seat(self, occupant: Occupant) -> None:
        """`occupant` in the room under its nick: found by it, and by its `nick_key`
        (an index, so that a join into a big room looks up its nick, not every one)."""
        self.occupants[occupant.nick] = occupant
        self._keys[nick_key(occupant.nick)] = occupant

    def _unseat(self, occupant: Occupant) -> None:
        del self.occupants[occupant.nick]
        key = nick_key(occupant.nick)
        if self._keys.get(key) is occupant:  # (two of one key: restored from before)
            del self._keys[key]

    def _default_role(self, affiliation: str) -> str:
        if affiliation in ("owner", "admin"):
            return "moderator"
        if self.config.moderated and affiliation != "member":
            return "visitor"
        return "participant"

    def _sees_jids(self, viewer: Occupant) -> bool:
        return self.config.whois == "anyone" or viewer.role == "moderator"

    def occupant_of(self, jid: str) -> Occupant | None:
        return self.by_jid.get(jid)

    @property
    def empty(self) -> bool:
        return not self.occupants

    # --- presence ------------------------------------------------------------------------

    def _presence_of(
        self,
        occupant: Occupant,
        viewer: Occupant,
        *,
        unavailable: bool = False,
        codes: Iterable[str] = (),
        item_extra: dict[str, str] | None = None,
        actor: str | None = None,
        reason: str | None = None,
        destroy: etree._Element | None = None,
        to: str | None = None,
    ) -> etree._Element:
        stanza = _stanza(
            "presence",
            f"{self.jid}/{occupant.nick}",
            to or str(viewer.jid),
            "unavailable" if unavailable else None,
        )
        if not unavailable:
            for child in occupant.presence:
                stanza.append(_copy(child))
        x = etree.SubElement(stanza, f"{{{MUC_USER}}}x", nsmap={None: MUC_USER})
        item = etree.SubElement(x, f"{{{MUC_USER}}}item")
        item.set("affiliation", self.affiliation(occupant.jid.bare))
        item.set("role", "none" if unavailable else occupant.role)
        if self._sees_jids(viewer):
            item.set("jid", str(occupant.jid))
        for key, value in (item_extra or {}).items():
            item.set(key, value)
        if actor is not None:
            etree.SubElement(item, f"{{{MUC_USER}}}actor").set("nick", actor)
        if reason:
            etree.SubElement(item, f"{{{MUC_USER}}}reason").text = reason
        if destroy is not None:
            x.append(destroy)
        self_codes = list(codes)
        if viewer is occupant:
            self_codes.insert(0, "110")
        for code in self_codes:
            etree.SubElement(x, f"{{{MUC_USER}}}status").set("code", code)
        etree.SubElement(stanza, f"{{{OCCUPANT_ID}}}occupant-id", nsmap={None: OCCUPANT_ID}).set(
            "id", self.occupant_id(occupant.jid.bare)
        )
        return stanza

    def _sessions(self, occupant: Occupant, stanza: etree._Element) -> Out:
        """`stanza` (addressed to the occupant's first session) for each of its sessions."""
        out = [stanza]
        for other in occupant.others:
            copy_ = _copy(stanza)
            copy_.set("to", str(other))
            out.append(copy_)
        return out

    def _presence_to(
        self, occupant: Occupant, viewers: Iterable[Occupant], **kwargs: Any
    ) -> Out:
        """`occupant`'s presence to each of `viewers` (each of their sessions). Built
        once for those who see real JIDs and once for those who do not, and copied:
        a big room's fan-out is a copy per occupant, not a build."""
        built: dict[bool, etree._Element] = {}
        out: Out = []
        for viewer in viewers:
            if viewer is occupant:  # its own carries 110
                out += self._sessions(viewer, self._presence_of(occupant, viewer, **kwargs))
                continue
            sees = self._sees_jids(viewer)
            template = built.get(sees)
            if template is None:
                template = built[sees] = self._presence_of(occupant, viewer, **kwargs)
            out += _copies(viewer, template)
        return out

    def _shown(self, occupant: Occupant, newcomer: Occupant) -> Copy:
        """`occupant`'s presence to a `newcomer`, built again only when something it
        shows changed: a burst of joins into a big room builds each occupant's once,
        not once per join."""
        key = (
            self._sees_jids(newcomer), occupant.nick, occupant.jid.full, occupant.role,
            occupant.presence, self.affiliation(occupant.jid.bare),
        )
        if occupant.shown is None or occupant.shown[0] != key:
            occupant.shown = (key, self._presence_of(occupant, newcomer))
        return occupant.shown[1], str(newcomer.jid)

    def _broadcast_presence(self, occupant: Occupant, **kwargs: Any) -> Out:
        """`occupant`'s presence to everyone, the occupant itself last."""
        out = self._presence_to(
            occupant, (v for v in self.occupants.values() if v is not occupant), **kwargs
        )
        if occupant.jid.full in self.by_jid or kwargs.get("unavailable"):
            out += self._sessions(occupant, self._presence_of(occupant, occupant, **kwargs))
        return out

    def presence(self, stanza: etree._Element, nick: str, now: float) -> Out:
        """A presence from a user to room/nick: join, nick change, update or leave."""
        sender = parse_jid(stanza.get("from", ""))
        occupant = self.by_jid.get(sender.full)
        if stanza.get("type") == "unavailable":
            if occupant is None:
                return []
            if occupant.others:
                return self._leave_session(occupant, sender, _status_of(stanza))
            return self._leave(occupant, _status_of(stanza))
        if stanza.get("type") not in (None, "available"):
            return []
        if occupant is None:
            return self._join(stanza, sender, nick, now)
        # Each goes to every occupant, and its payload is kept for every newcomer: the
        # same size and rate limits as a message.
        self._admit(occupant, stanza, now)
        if nick != occupant.nick:
            return self._change_nick(occupant, nick)
        occupant.presence, occupant.show = self._presence_payload(stanza)
        self.touched.add(nick)
        return self._broadcast_presence(occupant)

    def _presence_payload(self, stanza: etree._Element) -> tuple[list[etree._Element], str | None]:
        """`_presence_payload`, refused over `max_presence_bytes`: the room keeps it
        for as long as the occupant stays and sends it to every newcomer."""
        kept, show = _presence_payload(stanza)
        size = sum(len(etree.tostring(child)) for child in kept)
        if size > self.limits.max_presence_bytes:
            raise StanzaError("policy-violation", "the presence is too large")
        return kept, show

    def _join(self, stanza: etree._Element, sender: JID, nick: str, now: float) -> Out:
        x = stanza.find(f"{{{MUC}}}x")
        affiliation = self._standing(sender.bare)
        if self.locked and affiliation != "owner":
            raise StanzaError("item-not-found", "the room is being created")
        if affiliation == "outcast":
            raise StanzaError("forbidden", "you are banned from this room")
        if self.config.members_only and affiliation == "none":
            raise StanzaError("registration-required", "the room is members-only")
        taken = self._holder(nick)
        # Another client of the same user joins its occupant only under the very nick:
        # under a variant (`nick_key`) its own presence would come from a nick it did
        # not ask for, and its next presence would rename the occupant for all.
        another_session = (
            taken is not None and taken.jid.bare == sender.bare and taken.nick == nick
        )
        cap = self.limits.max_occupants
        if self.config.max_users:
            cap = min(cap, self.config.max_users)
        full = len(self.occupants) >= cap and not another_session
        if full and affiliation not in ("owner", "admin"):
            raise StanzaError("service-unavailable", "the room is full")
        if self.config.password and affiliation != "owner":
            given = x.findtext(f"{{{MUC}}}password") if x is not None else None
            if given != self.config.password:
                raise StanzaError("not-authorized", "a password is required")
        if taken is not None and another_session:
            return self._join_session(taken, sender, x, now)
        if taken is not None:
            raise StanzaError("conflict", "that nickname is in use")
        self._check_nick(nick, sender.bare)
        presence, show = self._presence_payload(stanza)
        occupant = Occupant(nick, sender, self._default_role(affiliation), seq=self._next())
        occupant.presence, occupant.show = presence, show
        out: Out = [self._shown(other, occupant) for other in self.occupants.values()]
        self._seat(occupant)
        self.by_jid[sender.full] = occupant
        self.touched.add(nick)
        codes = []
        if self.config.whois == "anyone":
            codes.append("100")
        if self.locked:
            codes.append("201")
        out += self._broadcast_presence(occupant, codes=codes)
        # The subject ends every join, a new room's too: clients wait for it.
        out += self._history_for(str(occupant.jid), x, now)
        out.append(self._subject_message(str(occupant.jid)))
        return out

    def _join_session(
        self, occupant: Occupant, sender: JID, x: etree._Element | None, now: float
    ) -> Out:
        """The user is in the room under this nick from another client: this session
        joins the same occupant (one nick, several devices). It alone is told; the
        others see no change."""
        occupant.others.append(sender)
        self.by_jid[sender.full] = occupant
        self.touched.add(occupant.nick)
        to = str(sender)
        out: Out = []
        for other in self.occupants.values():
            if other is not occupant:
                out.append(self._presence_of(other, occupant, to=to))
        codes = ["100"] if self.config.whois == "anyone" else []
        out.append(self._presence_of(occupant, occupant, codes=codes, to=to))
        out += self._history_for(to, x, now)
        out.append(self._subject_message(to))
        return out

    def _leave_session(self, occupant: Occupant, session: JID, status: str | None) -> Out:
        """One of several sessions of an occupant leaves; the occupant stays."""
        del self.by_jid[session.full]
        self.touched.add(occupant.nick)
        if occupant.jid == session:
            occupant.jid = occupant.others.pop(0)
        else:
            occupant.others.remove(session)
        goodbye = self._presence_of(occupant, occupant, unavailable=True, to=str(session))
        if status:
            goodbye.insert(0, _el(f"{{{ns.CLIENT}}}status", text=status))
        return [goodbye]

    def _check_nick(self, nick: str, bare: str) -> None:
        """A nick `bare` may take: not blank (RFC 8266 trims spaces, and an empty
        nick is none: it would show as nobody) and not registered to someone else
        (7.10: a registered nick is its registrant's alone)."""
        key = nick_key(nick)
        if not key:
            raise StanzaError("jid-malformed", "a nickname needs more than spaces")
        for owner, registered in self.registered.items():
            if nick_key(registered) == key and owner != bare:
                raise StanzaError("conflict", "that nickname is registered to someone else")

    # --- nickname registration (7.10, 7.12) --------------------------------------------

    def registration_form(self, stanza: etree._Element) -> etree._Element:
        bare = parse_jid(stanza.get("from", "")).bare
        query = _el(f"{{{REGISTER}}}query")
        if bare in self.registered:
            etree.SubElement(query, f"{{{REGISTER}}}registered")
            etree.SubElement(query, f"{{{REGISTER}}}username").text = self.registered[bare]
            return query
        self._may_register(bare)
        etree.SubElement(query, f"{{{REGISTER}}}instructions").text = (
            "Choose the nickname to keep for you in this room."
        )
        query.append(form("form", MUC_REGISTER, [
            Field("muc#register_roomnick", label="Nickname", required=True),
        ], title=f"Register with {self.jid}"))
        return query

    def _may_register(self, bare: str) -> None:
        affiliation = self._standing(bare)
        if affiliation == "outcast":
            raise StanzaError("forbidden", "you are banned from this room")
        if self.config.members_only and affiliation == "none":
            raise StanzaError("registration-required", "only members register in this room")
        if self.config.moderated and affiliation == "none":
            # Registering makes a member, and a member of a moderated room has voice:
            # a visitor would give itself what only a moderator grants (8.6, 7.13).
            raise StanzaError("forbidden", "in a moderated room, only members register")

    def register(self, stanza: etree._Element, query: etree._Element) -> Out:
        """Register (or change) the sender's nick, which makes it a member; or
        <remove/> it, which ends the membership it gave."""
        bare = parse_jid(stanza.get("from", "")).bare
        if query.find(f"{{{REGISTER}}}remove") is not None:
            if self.registered.pop(bare, None) is None:
                raise StanzaError("item-not-found", "you have no nickname registered here")
            self.persistent_changed = True
            if self.affiliation(bare) == "member":
                return self._set_affiliation(bare, "none", None, None)
            return []
        self._may_register(bare)
        submitted = Submitted.find(query, MUC_REGISTER)
        if submitted is None:
            raise StanzaError("bad-request", "expected the registration form")
        nick = submitted.one("muc#register_roomnick")
        if not nick:
            raise StanzaError("not-acceptable", "a nickname is required")
        try:
            nick = parse_jid(f"{self.jid}/{nick}").resource
        except StanzaError:
            raise StanzaError("not-acceptable", "that nickname is not allowed") from None
        self._check_nick(nick, bare)
        holder = self._holder(nick)
        if holder is not None and holder.jid.bare != bare:
            raise StanzaError("conflict", "that nickname is in use")
        member = {bare: "member"} if self.affiliation(bare) == "none" else {}
        self._check_room_for({**self.affiliations, **member}, {**self.registered, bare: nick})
        self.registered[bare] = nick
        self.persistent_changed = True
        if member:
            return self._set_affiliation(bare, "member", None, None)
        return []

    def reserved_nick(self, stanza: etree._Element) -> etree._Element:
        """disco#info on node x-roomuser-item: the asker's registered nick (7.12)."""
        query = _el("{http://jabber.org/protocol/disco#info}query")
        query.set("node", "x-roomuser-item")
        nick = self.registered.get(parse_jid(stanza.get("from", "")).bare)
        if nick is not None:
            identity = etree.SubElement(query, "{http://jabber.org/protocol/disco#info}identity")
            identity.set("category", "conference")
            identity.set("type", "text")
            identity.set("name", nick)
        return query

    def _change_nick(self, occupant: Occupant, nick: str) -> Out:
        holder = self._holder(nick)
        if holder is not None and holder is not occupant:  # its own in another case is not
            raise StanzaError("conflict", "that nickname is in use")
        self._check_nick(nick, occupant.jid.bare)
        out = self._broadcast_presence(
            occupant, unavailable=True, codes=["303"], item_extra={"nick": nick}
        )
        # 'role' in the 303 item is the occupant's current role, not none.
        for stanza in _built(out):
            stanza.find(f"{{{MUC_USER}}}x/{{{MUC_USER}}}item").set("role", occupant.role)
        self._unseat(occupant)
        self.touched.update((occupant.nick, nick))
        occupant.nick = nick
        occupant.seq = self._next()
        self._seat(occupant)
        return out + self._broadcast_presence(occupant)

    def _leave(
        self,
        occupant: Occupant,
        status: str | None,
        codes: Iterable[str] = (),
        actor: str | None = None,
        reason: str | None = None,
        item_extra: dict[str, str] | None = None,
    ) -> Out:
        self._unseat(occupant)
        self.touched.add(occupant.nick)
        for session in (occupant.jid, *occupant.others):
            del self.by_jid[session.full]
        out = self._presence_to(
            occupant, [*self.occupants.values(), occupant], unavailable=True, codes=codes,
            actor=actor, reason=reason, item_extra=item_extra,
        )
        if status:
            for stanza in _built(out):
                stanza.insert(0, _el(f"{{{ns.CLIENT}}}status", text=status))
        return out

    def session_gone(self, jid: str) -> Out:
        """The user's session ended without saying goodbye to the room."""
        occupant = self.by_jid.get(jid)
        if occupant is None:
            return []
        if occupant.others:
            return self._leave_session(occupant, parse_jid(jid), None)
        return self._leave(occupant, None)

    # --- messages ------------------------------------------------------------------------

    def _history_for(self, to: str, x: etree._Element | None, now: float) -> Out:
        spec = x.find(f"{{{MUC}}}history") if x is not None else None
        entries = list(self.history)
        max_chars: int | None = None
        if spec is not None:
            since = _parse_stamp(spec.get("since", "")) if spec.get("since") else None
            if since is not None:
                entries = [e for e in entries if e.when > since]
            if (seconds := _int(spec.get("seconds"))) is not None:
                entries = [e for e in entries if e.when >= now - seconds]
            if (count := _int(spec.get("maxstanzas"))) is not None:
                entries = entries[len(entries) - count :] if count else []
            max_chars = _int(spec.get("maxchars"))
        messages = []
        for entry in entries:
            message = etree.fromstring(entry.xml)
            message.set("to", to)
            delay = etree.SubElement(message, f"{{{DELAY}}}delay", nsmap={None: DELAY})
            delay.set("from", self.jid)
            delay.set("stamp", _stamp(entry.when))
            messages.append(message)
        if max_chars is not None:
            # The newest ones that fit, counting each message's full XML.
            kept: list[etree._Element] = []
            total = 0
            for message in reversed(messages):
                total += len(etree.tostring(message, encoding="unicode"))
                if total > max_chars:
                    break
                kept.insert(0, message)
            messages = kept
        return messages

    def _subject_message(self, to: str) -> etree._Element:
        frm = f"{self.jid}/{self.subject_nick}" if self.subject_nick else self.jid
        message = _stanza("message", frm, to, "groupchat")
        etree.SubElement(message, f"{{{ns.CLIENT}}}subject").text = self.subject
        return message

    def _admit(self, sender: Occupant, stanza: etree._Element, now: float) -> None:
        """The service's message size and per-occupant rate limits: over everything an
        occupant makes the room send to all (messages, presence updates, nick changes,
        invitations)."""
        if len(etree.tostring(stanza)) > self.limits.max_message_bytes:
            raise StanzaError("policy-violation", "the message is too large")
        burst = float(self.limits.message_burst)
        if sender.tokens < 0:
            sender.tokens, sender.refilled = burst, now
        sender.tokens = min(
            burst, sender.tokens + (now - sender.refilled) * self.limits.messages_per_second
        )
        sender.refilled = now
        if sender.tokens < 1:
            raise StanzaError("resource-constraint", "too many messages, slow down")
        sender.tokens -= 1

    def _stamp_occupant_id(self, stanza: etree._Element, occupant: Occupant) -> None:
        etree.SubElement(stanza, f"{{{OCCUPANT_ID}}}occupant-id", nsmap={None: OCCUPANT_ID}).set(
            "id", self.occupant_id(occupant.jid.bare)
        )

    def bounced(self, stanza: etree._Element) -> Out:
        """An error from an occupant's address: its client is gone (the router bounced
        what the room sent it), so it leaves, with 333 (removed for a technical reason)."""
        occupant = self.by_jid.get(stanza.get("from", ""))
        error = stanza.find(f"{{{ns.CLIENT}}}error")
        if occupant is None or error is None:
            return []
        conditions = {etree.QName(c).localname for c in error}
        if not conditions & _GONE:
            return []
        if occupant.others:
            return self._leave_session(occupant, parse_jid(stanza.get("from", "")), None)
        return self._leave(occupant, None, codes=["333"])

    def groupchat(self, stanza: etree._Element, now: float) -> Out:
        sender = self.by_jid.get(stanza.get("from", ""))
        if sender is None:
            raise StanzaError("not-acceptable", "only occupants may send to the room")
        origin = stanza.find(f"{{{SID}}}origin-id")
        stanza_id = origin.get("id") if origin is not None else stanza.get("id")
        key = f"{stanza.get('from', '')}\0{stanza_id}" if stanza_id else None
        if key is not None and key in self._seen:
            return []  # handled already: delivered and kept once is enough
        self._admit(sender, stanza, now)
        if sender.role == "visitor":
            raise StanzaError("forbidden", "you have no voice in this room")
        if key is not None:
            self._remember(key)
            self.seen_changed = True
        subject = stanza.find(f"{{{ns.CLIENT}}}subject")
        body = stanza.find(f"{{{ns.CLIENT}}}body")
        if subject is not None and body is None:
            if sender.role != "moderator" and not self.config.change_subject:
                raise StanzaError("forbidden", "you may not change the subject")
            self._check_room_for(subject=subject.text or "", subject_nick=sender.nick)
            self.subject = subject.text or ""
            self.subject_nick = sender.nick
            self.persistent_changed = True
        template = _stanza("message", f"{self.jid}/{sender.nick}", None, "groupchat")
        if stanza.get("id") is not None:
            template.set("id", stanza.get("id", ""))
        for child in stanza:
            if child.tag not in _NOT_IN_GROUPCHAT:
                template.append(_copy(child))
        self._stamp_occupant_id(template, sender)
        if body is not None and self.history.maxlen:
            xml = etree.tostring(template, encoding="unicode")
            self.history.append(HistoryEntry(now, xml, len(xml)))
            self.history_changed = True
        out: Out = []
        for occupant in self.occupants.values():
            out += _copies(occupant, template)
        return out

    def private_message(self, stanza: etree._Element, nick: str, now: float) -> Out:
        sender = self.by_jid.get(stanza.get("from", ""))
        if sender is None:
            raise StanzaError("not-acceptable", "only occupants may send private messages")
        self._admit(sender, stanza, now)
        if not self.config.allow_private_messages and sender.role != "moderator":
            raise StanzaError("forbidden", "private messages are not allowed here")
        target = self.occupants.get(nick)
        if target is None:
            raise StanzaError("item-not-found", "no such occupant")
        message = _stanza("message", f"{self.jid}/{sender.nick}", str(target.jid),
                          stanza.get("type"))
        if stanza.get("id") is not None:
            message.set("id", stanza.get("id", ""))
        for child in stanza:
            if isinstance(child.tag, str) and child.tag not in _NOT_RELAYED:
                message.append(_copy(child))
        etree.SubElement(message, f"{{{MUC_USER}}}x", nsmap={None: MUC_USER})
        self._stamp_occupant_id(message, sender)
        return self._sessions(target, message)

    def message_to_room(self, stanza: etree._Element, now: float) -> Out:
        """A message to the room's bare JID that is not groupchat: invitations, declines,
        voice requests and their approvals."""
        request = Submitted.find(stanza, MUC_REQUEST) if stanza.find(
            "{jabber:x:data}x/{jabber:x:data}field[@var='FORM_TYPE']"
        ) is not None else None
        if request is not None:
            return self._voice(stanza, request, now)
        x = stanza.find(f"{{{MUC_USER}}}x")
        if x is not None:
            invite = x.find(f"{{{MUC_USER}}}invite")
            if invite is not None:
                return self._invite(stanza, invite, now)
            decline = x.find(f"{{{MUC_USER}}}decline")
            if decline is not None:
                return self._decline(stanza, decline)
        raise StanzaError("bad-request", "send groupchat messages to the room")

    def _voice(self, stanza: etree._Element, request: Submitted, now: float) -> Out:
        """A visitor asks for voice (7.13): each moderator gets the form; a moderator
        who submits it with muc#request_allow true grants it (8.6)."""
        sender = self.by_jid.get(stanza.get("from", ""))
        if sender is None:
            raise StanzaError("not-acceptable", "only occupants ask for voice")
        if "muc#request_allow" in request.values:
            if sender.role != "moderator":
                raise StanzaError("forbidden", "only moderators grant voice")
            target = self.occupants.get(request.one("muc#roomnick"))
            if not _truth(request.one("muc#request_allow")) or target is None:
                return []
            if target.role != "visitor":
                return []
            return self._set_role(target, "participant", sender.nick, None)
        if sender.role != "visitor" or request.one("muc#role") not in ("", "participant"):
            raise StanzaError("not-acceptable", "only visitors ask for voice")
        self._admit(sender, stanza, now)
        out: Out = []
        for moderator in self.occupants.values():
            if moderator.role != "moderator":
                continue
            fields = [
                Field("muc#role", "list-single", "Requested role", values=("participant",),
                      options=(("Participant", "participant"),)),
                Field("muc#roomnick", "text-single", "Nickname", values=(sender.nick,)),
                Field("muc#request_allow", "boolean", "Grant voice?", values=("false",)),
            ]
            if self._sees_jids(moderator):
                fields.insert(1, Field("muc#jid", "jid-single", "User", values=(str(sender.jid),)))
            message = _stanza("message", self.jid, str(moderator.jid))
            message.append(form("form", MUC_REQUEST, fields, title="Voice request",
                                instructions=f"Grant {sender.nick} voice in this room?"))
            out += self._sessions(moderator, message)
        return out

    def _invite(self, stanza: etree._Element, invite: etree._Element, now: float) -> Out:
        sender = self.by_jid.get(stanza.get("from", ""))
        if sender is None:
            raise StanzaError("not-acceptable", "only occupants may invite")
        invitee = parse_jid(invite.get("to", ""))
        self._admit(sender, stanza, now)  # each makes the room send a message to anyone
        if self.config.members_only:
            rank = _RANK[self.affiliation(sender.jid.bare)]
            may = rank >= _RANK["admin"] or (self.config.allow_invites and rank >= _RANK["member"])
            if not may:
                raise StanzaError("forbidden", "you may not invite to this members-only room")
        affiliations = self.affiliations
        if self.config.members_only and self._standing(invitee.bare) == "none":
            affiliations = {**self.affiliations, invitee.bare: "member"}
        invited = {k: v for k, v in self.invited.items() if k != invitee.bare}
        invited[invitee.bare] = str(sender.jid)
        while len(invited) > INVITES:
            del invited[next(iter(invited))]
        # Kept with the room's state (stored, and in Redis on a cluster) at once, so a
        # decline finds it on whichever node runs the room next.
        self._check_room_for(affiliations, invited=invited)
        self.affiliations, self.invited = affiliations, invited
        self.persistent_changed = True
        message = _stanza("message", self.jid, str(invitee))
        x = etree.SubElement(message, f"{{{MUC_USER}}}x", nsmap={None: MUC_USER})
        forwarded = etree.SubElement(x, f"{{{MUC_USER}}}invite")
        forwarded.set("from", str(sender.jid))
        if (reason := invite.findtext(f"{{{MUC_USER}}}reason")) is not None:
            etree.SubElement(forwarded, f"{{{MUC_USER}}}reason").text = reason
        if self.config.password:
            etree.SubElement(x, f"{{{MUC_USER}}}password").text = self.config.password
        return [message]

    def _decline(self, stanza: etree._Element, decline: etree._Element) -> Out:
        """An invitee declines (7.8.2): the room tells the inviter, once. Only to an
        invitation it forwarded, and only to whoever sent that: the room sends
        nothing to a JID of the decliner's choosing."""
        inviter = self.invited.pop(parse_jid(stanza.get("from", "")).bare, None)
        if inviter is None:
            raise StanzaError("not-acceptable", "you have no invitation to decline")
        self.persistent_changed = True
        message = _stanza("message", self.jid, inviter)
        x = etree.SubElement(message, f"{{{MUC_USER}}}x", nsmap={None: MUC_USER})
        forwarded = etree.SubElement(x, f"{{{MUC_USER}}}decline")
        forwarded.set("from", parse_jid(stanza.get("from", "")).bare)
        if (reason := decline.findtext(f"{{{MUC_USER}}}reason")) is not None:
            etree.SubElement(forwarded, f"{{{MUC_USER}}}reason").text = reason
        return [message]

    def iq_to_occupant(self, stanza: etree._Element, nick: str) -> Out:
        """An IQ between occupants (a vCard or a ping), relayed between their real JIDs
        under their nicks; a ping to one's own nick is answered here (XEP-0410: the
        caller answers when this returns []). Results and errors are relayed the
        same way and never answered: each to the session whose request it answers
        (an occupant may be in the room from several), found from the tag the room
        put before the request's id (`_relay_tag`); one that answers no request of
        that occupant's sessions goes nowhere."""
        request = stanza.get("type") in ("get", "set")
        sender = self.by_jid.get(stanza.get("from", ""))
        if sender is None:
            if request:
                raise StanzaError("not-acceptable", "only occupants reach occupants")
            return []
        if request and sender.nick == nick and stanza.find(f"{{{PING}}}ping") is not None:
            return []
        target = self.occupants.get(nick)
        if target is None:
            if request:
                raise StanzaError("item-not-found", "no such occupant")
            return []
        relayed = _copy(stanza)
        relayed.set("from", f"{self.jid}/{sender.nick}")
        if request:
            id_ = stanza.get("id", "")
            relayed.set("id", self._relay_tag(stanza.get("from", ""), id_) + id_)
            relayed.set("to", str(target.jid))
            return [relayed]
        tag, id_ = stanza.get("id", "")[:RELAY_TAG], stanza.get("id", "")[RELAY_TAG:]
        for session in (target.jid, *target.others):
            # As bytes: compare_digest refuses a str that is not ASCII, which an id may be.
            if hmac.compare_digest(self._relay_tag(str(session), id_).encode(), tag.encode()):
                relayed.set("id", id_)
                relayed.set("to", str(session))
                return [relayed]
        return []

    def _relay_tag(self, asker: str, id_: str) -> str:
        """The tag before the id of a request `asker` (a full JID) relays to another
        occupant: a keyed hash that only the room makes, so the answer finds the
        session that asked, and that tells the one asked nothing of the asker's JID
        (its occupant id's hash, with its own prefix, is of another input)."""
        mac = hmac.new(self.secret.encode(), f"iq\0{asker}\0{id_}".encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()[:9]).decode()

    # --- administration (muc#admin) ------------------------------------------------------

    def admin_get(self, stanza: etree._Element, query: etree._Element) -> etree._Element:
        actor = self._actor(stanza)
        answer = _el(f"{{{MUC_ADMIN}}}query")
        for item in query.iterchildren(f"{{{MUC_ADMIN}}}item"):
            if (affiliation := item.get("affiliation")) is not None:
                if affiliation not in AFFILIATIONS or affiliation == "none":
                    raise StanzaError("bad-request", "no such affiliation list")
                if _RANK[actor[1]] < _RANK["admin"]:
                    raise StanzaError("forbidden", "only admins and owners see that list")
                for bare, value in sorted(self.affiliations.items()):
                    if value == affiliation:
                        element = etree.SubElement(answer, f"{{{MUC_ADMIN}}}item")
                        element.set("affiliation", value)
                        element.set("jid", bare)
            elif (role := item.get("role")) is not None:
                if role not in ROLES or role == "none":
                    raise StanzaError("bad-request", "no such role list")
                if actor[0] is None or actor[0].role != "moderator":
                    raise StanzaError("forbidden", "only moderators see that list")
                for occupant in self.occupants.values():
                    if occupant.role == role:
                        element = etree.SubElement(answer, f"{{{MUC_ADMIN}}}item")
                        element.set("role", role)
                        element.set("nick", occupant.nick)
                        element.set("affiliation", self.affiliation(occupant.jid.bare))
                        if self._sees_jids(actor[0]):
                            element.set("jid", str(occupant.jid))
            else:
                raise StanzaError("bad-request", "an item needs a role or an affiliation")
        return answer

    def _actor(self, stanza: etree._Element) -> tuple[Occupant | None, str]:
        sender = parse_jid(stanza.get("from", ""))
        return self.by_jid.get(sender.full), self.affiliation(sender.bare)

    def admin_set(self, stanza: etree._Element, query: etree._Element) -> Out:
        """Role and affiliation changes, all or none (XEP-0045 9.x, 10.x): every item is
        resolved and checked against the room as the items before it leave it (`_Plan`),
        so that the batch as a whole is judged (a room keeps an owner after all of it)
        and nothing is applied, announced or left unstored halfway."""
        actor, actor_affiliation = self._actor(stanza)
        items = list(query.iterchildren(f"{{{MUC_ADMIN}}}item"))
        if not items:
            raise StanzaError("bad-request", "no item")
        plan = _Plan(self)
        changes: list[tuple[str, str, str, str | None]] = []  # kind, target, value, reason
        for item in items:
            reason = item.findtext(f"{{{MUC_ADMIN}}}reason")
            if item.get("affiliation") is not None:
                bare, affiliation = self._check_affiliation(item, actor_affiliation, plan)
                plan.set_affiliation(bare, affiliation)
                changes.append(("affiliation", bare, affiliation, reason))
            elif item.get("role") is not None:
                nick, role = self._check_role(item, actor, actor_affiliation, plan)
                plan.set_role(nick, role)
                changes.append(("role", nick, role, reason))
            else:
                raise StanzaError("bad-request", "an item needs a role or an affiliation")
        owners = "owner" in plan.affiliations.values()
        if not owners and "owner" in self.affiliations.values():
            # (One whose owners' accounts were removed has none; its admins still act.)
            raise StanzaError("conflict", "a room keeps at least one owner")
        self._check_room_for(plan.affiliations, self.registered)
        out: Out = []
        actor_nick = actor.nick if actor is not None else None
        for kind, target, value, reason in changes:
            if kind == "role":
                out += self._set_role(self.occupants[target], value, actor_nick, reason)
            else:
                out += self._set_affiliation(target, value, actor_nick, reason)
        return out

    def _check_role(
        self, item: etree._Element, actor: Occupant | None, actor_aff: str, plan: _Plan
    ) -> tuple[str, str]:
        role = item.get("role", "")
        if role not in ROLES:
            raise StanzaError("bad-request", "no such role")
        if actor is None or actor.role != "moderator":
            raise StanzaError("forbidden", "only moderators change roles")
        nick = item.get("nick", "")
        current = plan.roles.get(nick)
        if current is None:  # not in the room, or out by an item before this one
            raise StanzaError("item-not-found", "no such occupant")
        target_aff = plan.affiliations.get(self.occupants[nick].jid.bare, "none")
        if role == "moderator" and _RANK[actor_aff] < _RANK["admin"]:
            raise StanzaError("not-allowed", "only admins and owners grant moderation")
        if role in ("none", "visitor", "participant") and target_aff in ("admin", "owner"):
            # Nobody demotes or kicks an admin or owner through a role (9.1, 9.6).
            raise StanzaError("not-allowed", "that occupant's affiliation protects it")
        # A moderator of a lower affiliation (an admin made one of a participant) kicks
        # or silences nobody whose affiliation is above its own (8.2, 8.4). 8.4 says "at
        # or above"; equals are allowed, or a moderator with no affiliation could
        # silence nobody at all.
        if role in ("none", "visitor") and _RANK[target_aff] > _RANK[actor_aff]:
            raise StanzaError("not-allowed", "that occupant's affiliation is above yours")
        if current == "moderator" and role != "moderator" and _RANK[actor_aff] < _RANK["admin"]:
            raise StanzaError("not-allowed", "only admins and owners revoke moderation")
        return nick, role

    def _check_affiliation(
        self, item: etree._Element, actor_aff: str, plan: _Plan
    ) -> tuple[str, str]:
        affiliation = item.get("affiliation", "")
        if affiliation not in AFFILIATIONS:
            raise StanzaError("bad-request", "no such affiliation")
        target = self._affiliation_target(item)
        current = plan.affiliations.get(target, "none")
        if actor_aff == "owner":
            return target, affiliation
        if actor_aff == "admin":
            if affiliation in ("admin", "owner") or current in ("admin", "owner"):
                raise StanzaError("not-allowed", "only owners change admins and owners")
            return target, affiliation
        raise StanzaError("forbidden", "only admins and owners change affiliations")

    def _affiliation_target(self, item: etree._Element) -> str:
        """The bare JID an affiliation item names: its jid, or an occupant's nick."""
        if item.get("jid"):
            return parse_jid(item.get("jid", "")).bare
        occupant = self.occupants.get(item.get("nick", ""))
        if occupant is None:
            raise StanzaError("bad-request", "an affiliation item needs a jid or a nick")
        return occupant.jid.bare

    def _check_room_for(
        self,
        affiliations: dict[str, str] | None = None,
        registered: dict[str, str] | None = None,
        **changed: Any,
    ) -> None:
        """Refuse a change that would leave the room more JIDs to keep than the service
        allows, or a stored state over the size the stores take: everything named here
        is kept in one stored item, and one over the size would fail to store after
        the change was made and announced (resource-constraint, as XEP-0045 gives a
        full registration). A change that does not grow the room passes."""
        affiliations = self.affiliations if affiliations is None else affiliations
        registered = self.registered if registered is None else registered
        named = len(affiliations.keys() | registered.keys())
        if named > self.limits.max_affiliations and named > len(
            self.affiliations.keys() | self.registered.keys()
        ):
            raise StanzaError("resource-constraint", "this room keeps no more affiliations")
        state = {
            **self.snapshot(), "affiliations": affiliations, "registered": registered, **changed
        }
        if len(json.dumps(state).encode()) > self.limits.max_state_bytes:
            raise StanzaError("resource-constraint", "the room's state would be too large")

    def _set_role(self, target: Occupant, role: str, actor: str | None, reason: str | None) -> Out:
        if role == "none":
            return self._leave(target, None, codes=["307"], actor=actor, reason=reason)
        target.role = role
        self.touched.add(target.nick)
        return self._broadcast_presence(target, actor=actor, reason=reason)

    def _set_affiliation(
        self, bare: str, affiliation: str, actor: str | None, reason: str | None
    ) -> Out:
        if affiliation == "none":
            self.affiliations.pop(bare, None)
        else:
            self.affiliations[bare] = affiliation
        self.persistent_changed = True
        out: Out = []
        for occupant in self._affected(bare, affiliation, self.affiliations):
            if affiliation == "outcast":  # (its own, or its server's: say which it has now)
                out += self._leave(occupant, None, codes=["301"], actor=actor, reason=reason,
                                   item_extra={"affiliation": "outcast"})
            elif affiliation == "none" and self.config.members_only:
                out += self._leave(occupant, None, codes=["321"], actor=actor, reason=reason)
            else:
                occupant.role = self._default_role(affiliation)
                self.touched.add(occupant.nick)
                out += self._broadcast_presence(occupant, actor=actor, reason=reason)
        return out

    # --- ownership (muc#owner) -----------------------------------------------------------

    def require_configured(self, stanza: etree._Element) -> None:
        """XEP-0045 10.1.2: a room its owner has not configured yet is the owner's alone,
        to anyone else as if it did not exist (a join is refused so in `_join`): a
        nick registered now would make a member of a room about to be members-only,
        an invitation would call someone to a room nobody may enter."""
        if self.locked and self._actor(stanza)[1] != "owner":
            raise StanzaError("item-not-found", "the room is being created")

    def _require_owner(self, stanza: etree._Element) -> None:
        if self._actor(stanza)[1] != "owner":
            raise StanzaError("forbidden", "only owners may do that")

    def config_form(self, stanza: etree._Element) -> etree._Element:
        self._require_owner(stanza)
        c = self.config
        fields = [
            Field("muc#roomconfig_roomname", label="Name", values=(c.name,)),
            Field("muc#roomconfig_roomdesc", label="Description", values=(c.description,)),
            _bool("muc#roomconfig_persistentroom", "Persistent", c.persistent),
            _bool("muc#roomconfig_publicroom", "Listed in the directory", c.public),
            _bool("muc#roomconfig_membersonly", "Members only", c.members_only),
            _bool("muc#roomconfig_moderatedroom", "Moderated", c.moderated),
            _bool("muc#roomconfig_passwordprotectedroom", "Password protected",
                  bool(c.password)),
            Field("muc#roomconfig_roomsecret", "text-private", "Password",
                  values=(c.password,)),
            Field("muc#roomconfig_whois", "list-single", "Who may see real JIDs",
                  values=(c.whois,),
                  options=(("Moderators", "moderators"), ("Anyone", "anyone"))),
            Field("muc#roomconfig_maxusers", "text-single",
                  f"Max occupants (0: {self.limits.max_occupants})", values=(str(c.max_users),)),
            _bool("muc#roomconfig_changesubject", "Participants may change the subject",
                  c.change_subject),
            _bool("muc#roomconfig_allowinvites", "Participants may invite", c.allow_invites),
            Field("muc#roomconfig_allowpm", "list-single", "Private messages",
                  values=("anyone" if c.allow_private_messages else "moderators",),
                  options=(("Anyone", "anyone"), ("Moderators", "moderators"))),
            Field("muc#maxhistoryfetch", "text-single",
                  f"History messages kept (at most {self.limits.max_history})",
                  values=(str(c.history_length),)),
        ]
        query = _el(f"{{{MUC_OWNER}}}query")
        query.append(form("form", ROOMCONFIG, fields, title=f"Configuration of {self.jid}"))
        return query

    def configure(self, stanza: etree._Element, query: etree._Element) -> Out:
        """An owner submits the form (or an empty one: an instant room) or cancels it."""
        self._require_owner(stanza)
        x = query.find("{jabber:x:data}x")
        if x is not None and x.get("type") == "cancel":
            if self.locked:
                self.destroyed = True
                return self._destroy_all(None, None)
            return []
        submitted = Submitted.find(query, ROOMCONFIG)
        if submitted is None:
            raise StanzaError("bad-request", "expected a configuration form")
        before = Config(**asdict(self.config))
        config = _apply_form(self.config, submitted, self.limits)
        self._check_room_for(config=asdict(config))
        self.config = config
        self.history = deque(self.history, maxlen=self._history_cap())
        self.persistent_changed = True
        was_locked, self.locked = self.locked, False
        out: Out = []
        if self.config.members_only:
            for occupant in list(self.occupants.values()):
                if self.affiliation(occupant.jid.bare) == "none":
                    out += self._leave(occupant, None, codes=["322"])
        if not was_locked:
            codes = ["104"]
            if before.whois != self.config.whois:
                codes.append("172" if self.config.whois == "anyone" else "173")
            message = _stanza("message", self.jid, None, "groupchat")
            x_el = etree.SubElement(message, f"{{{MUC_USER}}}x", nsmap={None: MUC_USER})
            for code in codes:
                etree.SubElement(x_el, f"{{{MUC_USER}}}status").set("code", code)
            for occupant in self.occupants.values():
                out += _copies(occupant, message)
        return out

    def destroy(self, stanza: etree._Element, element: etree._Element) -> Out:
        self._require_owner(stanza)
        self.destroyed = True
        return self._destroy_all(element.get("jid"), element.findtext(f"{{{MUC_OWNER}}}reason"))

    def _destroy_all(self, venue: str | None, reason: str | None) -> Out:
        destroy = etree.Element(f"{{{MUC_USER}}}destroy")
        if venue:
            destroy.set("jid", venue)
        if reason:
            etree.SubElement(destroy, f"{{{MUC_USER}}}reason").text = reason
        return self._everyone_out(destroy=destroy)

    def shut_down(self) -> Out:
        """This copy of the room stops (its node lost the room's lease): each occupant
        is told it is out, as at a service shutdown (332), and nobody else about it,
        since everyone goes."""
        return self._everyone_out(codes=["332"])

    def _everyone_out(
        self, destroy: etree._Element | None = None, codes: Iterable[str] = ()
    ) -> Out:
        out: Out = []
        for occupant in list(self.occupants.values()):
            out += self._sessions(occupant, self._presence_of(
                occupant, occupant, unavailable=True, codes=codes,
                destroy=None if destroy is None else _copy(destroy),  # each its own
            ))
            self._unseat(occupant)
            self.touched.add(occupant.nick)
            for session in (occupant.jid, *occupant.others):
                del self.by_jid[session.full]
        return out

    # --- discovery -----------------------------------------------------------------------

    def disco_info(self) -> etree._Element:
        query = _el("{http://jabber.org/protocol/disco#info}query")
        identity = etree.SubElement(query, "{http://jabber.org/protocol/disco#info}identity")
        identity.set("category", "conference")
        identity.set("type", "text")
        identity.set("name", self.config.name or self.jid.split("@")[0])
        c = self.config
        features = [
            MUC, OCCUPANT_ID, PING, REGISTER,
            "muc_persistent" if c.persistent else "muc_temporary",
            "muc_public" if c.public else "muc_hidden",
            "muc_membersonly" if c.members_only else "muc_open",
            "muc_moderated" if c.moderated else "muc_unmoderated",
            "muc_nonanonymous" if c.whois == "anyone" else "muc_semianonymous",
            "muc_passwordprotected" if c.password else "muc_unsecured",
        ]
        for var in features:
            etree.SubElement(query, "{http://jabber.org/protocol/disco#info}feature").set(
                "var", var
            )
        query.append(form("result", ROOMINFO, [
            Field("muc#roominfo_description", label="Description", values=(c.description,)),
            Field("muc#roominfo_subject", label="Subject", values=(self.subject,)),
            Field("muc#roominfo_occupants", label="Occupants",
                  values=(str(len(self.occupants)),)),
        ]))
        return query

    def disco_items(self, asker: str) -> etree._Element:
        """Occupants are listed to anyone in a public room, to occupants in a hidden one."""
        query = _el("{http://jabber.org/protocol/disco#items}query")
        if self.config.public or asker in self.by_jid:
            for nick in self.occupants:
                etree.SubElement(query, "{http://jabber.org/protocol/disco#items}item").set(
                    "jid", f"{self.jid}/{nick}"
                )
        return query


class _Plan:
    """The roles and affiliations of a room as a muc#admin batch's items leave them, one
    after the other, before any of them is applied (`Room.admin_set`)."""

    def __init__(self, room: Room) -> None:
        self.room = room
        self.affiliations = dict(room.affiliations)
        self.roles = {nick: occupant.role for nick, occupant in room.occupants.items()}

    def set_affiliation(self, bare: str, affiliation: str) -> None:
        """As `Room._set_affiliation` does: an outcast's occupants leave, so do a
        non-member's in a members-only room; the others get the affiliation's role."""
        if affiliation == "none":
            self.affiliations.pop(bare, None)
        else:
            self.affiliations[bare] = affiliation
        removed = affiliation == "outcast" or (
            affiliation == "none" and self.room.config.members_only
        )
        for occupant in self.room._affected(bare, affiliation, self.affiliations):
            if occupant.nick in self.roles:
                if removed:
                    del self.roles[occupant.nick]
                else:
                    self.roles[occupant.nick] = self.room._default_role(affiliation)

    def set_role(self, nick: str, role: str) -> None:
        if role == "none":
            del self.roles[nick]
        else:
            self.roles[nick] = role


def _bool(var: str, label: str, value: bool) -> Field:
    return Field(var, "boolean", label, values=("1" if value else "0",))


def _truth(value: str) -> bool:
    return value in ("1", "true")


def _apply_form(config: Config, form_: Submitted, limits: Limits) -> Config:
    new = Config(**asdict(config))
    v = form_.values

    def has(var: str) -> bool:
        return f"muc#roomconfig_{var}" in v

    def one(var: str) -> str:
        return form_.one(f"muc#roomconfig_{var}")

    if has("roomname"):
        new.name = one("roomname")
    if has("roomdesc"):
        new.description = one("roomdesc")
    for var, attr in (("persistentroom", "persistent"), ("publicroom", "public"),
                      ("membersonly", "members_only"), ("moderatedroom", "moderated"),
                      ("changesubject", "change_subject"), ("allowinvites", "allow_invites")):
        if has(var):
            setattr(new, attr, _truth(one(var)))
    if has("roomsecret"):
        new.password = form_.one("muc#roomconfig_roomsecret", strip=False)
    if has("passwordprotectedroom") and not _truth(one("passwordprotectedroom")):
        new.password = ""
    if has("passwordprotectedroom") and _truth(one("passwordprotectedroom")) and not new.password:
        raise StanzaError("not-acceptable", "a password-protected room needs a password")
    if has("whois"):
        if one("whois") not in ("anyone", "moderators"):
            raise StanzaError("not-acceptable", "whois is 'anyone' or 'moderators'")
        new.whois = one("whois")
    if has("allowpm"):
        new.allow_private_messages = one("allowpm") != "moderators" and one("allowpm") != "none"
    if has("maxusers"):
        value = _int(one("maxusers") or "0")
        if value is None or value < 0 or value > limits.max_occupants:
            raise StanzaError("not-acceptable", f"max users is 0 to {limits.max_occupants}")
        new.max_users = value
    if "muc#maxhistoryfetch" in v:
        value = _int(form_.one("muc#maxhistoryfetch") or "0")
        if value is None or value < 0 or value > limits.max_history:
            raise StanzaError("not-acceptable", f"history length is 0 to {limits.max_history}")
        new.history_length = value
    return new


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value >= 0 else None


def _copy(element: etree._Element) -> etree._Element:
    return copy.deepcopy(element)


def _copies(occupant: Occupant, template: etree._Element) -> Out:
    """`template` to each session of `occupant`, copied when routed."""
    return [(template, str(session)) for session in (occupant.jid, *occupant.others)]


def _built(out: Out) -> list[etree._Element]:
    """The stanzas `out` routes or copies, each once (to change them all before they go)."""
    seen: dict[int, etree._Element] = {}
    for sent in out:
        element = sent if isinstance(sent, etree._Element) else sent[0]
        seen.setdefault(id(element), element)
    return list(seen.values())


def materialize(sent: etree._Element | Copy) -> etree._Element:
    """The stanza to route for one entry of `Out`."""
    if isinstance(sent, etree._Element):
        return sent
    template, to = sent
    stanza = copy.deepcopy(template)
    stanza.set("to", to)
    return stanza


def _status_of(stanza: etree._Element) -> str | None:
    return stanza.findtext(f"{{{ns.CLIENT}}}status")


# What a client's presence or private message may not carry into the room: the
# join element, and an occupant id of its own making (XEP-0421: the room's only).
_NOT_RELAYED = frozenset({f"{{{MUC}}}x", f"{{{MUC_USER}}}x", f"{{{OCCUPANT_ID}}}occupant-id"})


# What a groupchat message may not carry into the room: an occupant id of the client's
# making, and any delay (XEP-0203, legacy XEP-0091). A live message is not delayed, and
# clients show a message by its delay's stamp whoever put it there: an occupant's
# forged one (from the room, say) would pass a live message off as old history. The
# room adds its own delay to history it sends on join. Nor a muc#user <x/>: its status
# codes and items are the room's to say (a forged 104 or 170 would announce a change
# the room never made), as for presence (_NOT_RELAYED).
_NOT_IN_GROUPCHAT = frozenset({
    f"{{{OCCUPANT_ID}}}occupant-id", f"{{{DELAY}}}delay", "{jabber:x:delay}x",
    f"{{{MUC_USER}}}x",
})


def _presence_payload(stanza: etree._Element) -> tuple[list[etree._Element], str | None]:
    """What an occupant's presence carries to the others: all but the MUC join element."""
    kept = [_copy(c) for c in stanza if isinstance(c.tag, str) and c.tag not in _NOT_RELAYED]
    return kept, stanza.findtext(f"{{{ns.CLIENT}}}show")
