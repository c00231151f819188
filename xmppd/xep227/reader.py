"""Reading XEP-0227 files into `UserData`, all of it checked before anything is written.

Inputs are hostile until proven otherwise: a size limit over all files, no
DTD at all (entity bombs and external entities need one), lxml with entity
resolution, network access and huge trees off, and XInclude (ejabberd's
export is a main file that includes one file per host) followed by this
code only to files in the including file's own folder.

Every problem found is collected with where it is, and `read` raises
`BadExport` with all of them, so an operator fixes the file once, not once
per run; nothing is imported from a file with any problem.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lxml import etree

from xmppd.auth.accounts import Ban, InvalidUsername, normalize_username
from xmppd.jid import JID, InvalidJID
from xmppd.sasl.scram import ScramKeys
from xmppd.xep227 import vcard4
from xmppd.xep227.credentials import NS_SCRAM, BadCredentials, parse_scram

PIE = "urn:xmpp:pie:0"
XINCLUDE = "http://www.w3.org/2001/XInclude"
ROSTER = "jabber:iq:roster"
PRIVATE = "jabber:iq:private"
PRIVACY = "jabber:iq:privacy"
BLOCKING = "urn:xmpp:blocking"
CLIENT = "jabber:client"
VCARD = "vcard-temp"
PUBSUB = "http://jabber.org/protocol/pubsub"
PUBSUB_OWNER = "http://jabber.org/protocol/pubsub#owner"
VCARD4_NODE = "urn:xmpp:vcard4"
BAN = "urn:xmppd:ban:0"
"""xmppd's own <banned since='UNIX SECONDS'>REASON</banned> in a <user/> (`xmppctl ban`):
XEP-0227 has no place for a ban, and an export must not lift one."""

DEFAULT_MAX_BYTES = 1 << 30
"""All files of one import together (1 GiB); --max-bytes changes it."""
MAX_PROBLEMS = 25
"""Problems listed in full; the rest are counted."""
MAX_INCLUDE_DEPTH = 2
PROLOG_BYTES = 1 << 16
"""Searched for a DOCTYPE before the parser sees the file."""
NO_DTD = "XEP-0227 files have none (entity declarations are refused)"
MAX_MAIN_FILE = 1 << 20
"""A file of a folder this small is read first for the xi:include lines of a main file."""
SUBSCRIPTIONS = ("none", "to", "from", "both")


class BadExport(Exception):
    """The input cannot be imported; `problems` says every reason found, with where."""

    def __init__(self, problems: list[str]) -> None:
        shown = problems[:MAX_PROBLEMS]
        if len(problems) > MAX_PROBLEMS:
            shown.append(f"... and {len(problems) - MAX_PROBLEMS} more problems")
        super().__init__("\n".join(shown))
        self.problems = shown


@dataclass(slots=True)
class RosterEntry:
    jid: str
    name: str | None
    subscription: str
    ask: bool
    groups: list[str]
    approved: bool = False  # RFC 6121 3.4 pre-approval


@dataclass(slots=True)
class UserData:
    """One account of the input, checked: what `stores.import_users` writes."""

    host: str
    name: str
    where: str  # file and user, for messages
    keys: list[ScramKeys] = field(default_factory=list)
    password: str | None = field(default=None, repr=False)
    roster: list[RosterEntry] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)  # inbound subscription requests
    vcard: etree._Element | None = None
    private: list[etree._Element] = field(default_factory=list)
    privacy_default: str | None = None
    privacy_lists: list[etree._Element] = field(default_factory=list)
    blocklist: list[str] = field(default_factory=list)
    offline: list[etree._Element] = field(default_factory=list)
    ban: Ban | None = None

    @property
    def jid(self) -> str:
        return f"{self.name}@{self.host}"


@dataclass(slots=True)
class Input:
    users: list[UserData]
    notes: list[str]  # what is not imported (PEP nodes, unknown elements), counted


def _parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        huge_tree=False,
        load_dtd=False,
        dtd_validation=False,
        remove_comments=True,
        remove_pis=True,
    )


class _Budget:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0

    def take(self, path: Path) -> None:
        size = path.stat().st_size
        self.used += size
        if self.used > self.max_bytes:
            raise BadExport(
                [
                    f"{path}: the input is over the limit of {self.max_bytes} bytes "
                    "(raise it with --max-bytes if the file is genuine)"
                ]
            )


def _parse_file(path: Path, budget: _Budget, depth: int = 0) -> etree._Element:
    try:
        budget.take(path)
        with path.open("rb") as f:
            head = f.read(PROLOG_BYTES)
        if b"<!DOCTYPE" in head:  # checked again after parsing, for other encodings
            raise BadExport([f"{path}: has a DOCTYPE; {NO_DTD}"])
        tree = etree.parse(str(path), _parser())
    except OSError as e:
        raise BadExport([f"{path}: {e.strerror or e}"]) from None
    except etree.XMLSyntaxError as e:
        raise BadExport([f"{path}: not well-formed XML: {e}"]) from None
    if tree.docinfo.doctype or tree.docinfo.internalDTD is not None:
        raise BadExport([f"{path}: has a DOCTYPE; {NO_DTD}"])
    root = tree.getroot()
    for include in root.iter(f"{{{XINCLUDE}}}include"):
        _include(path, include, budget, depth)
    return root


def _include(path: Path, include: etree._Element, budget: _Budget, depth: int) -> None:
    href = include.get("href", "")
    folder = path.resolve().parent
    target = (folder / href).resolve()
    if (
        depth >= MAX_INCLUDE_DEPTH
        or not href
        or "://" in href
        or target.parent != folder
        or include.get("parse", "xml") != "xml"
    ):
        raise BadExport([f"{path}: refused <xi:include href={href!r}/> (only files beside it)"])
    parent = include.getparent()
    if parent is None:
        raise BadExport([f"{path}: refused <xi:include href={href!r}/> as the root element"])
    included = _parse_file(target, budget, depth + 1)
    parent.replace(include, included)


def _files(paths: Iterable[Path]) -> list[Path]:
    """The files to read: a folder stands for its *.xml files that no other includes."""
    found: list[Path] = []
    for path in paths:
        if not path.is_dir():
            found.append(path)
            continue
        files = sorted(path.glob("*.xml"))
        included: set[str] = set()
        for file in files:  # main files (ejabberd's) are small: their includes are skipped
            try:
                if file.stat().st_size > MAX_MAIN_FILE:
                    continue
                root = etree.parse(str(file), _parser()).getroot()
            except (OSError, etree.XMLSyntaxError):
                continue  # reported when the file is read
            included.update(i.get("href", "") for i in root.iter(f"{{{XINCLUDE}}}include"))
        found.extend(f for f in files if f.name not in included)
    return found


def read(
    paths: Iterable[Path], hosts: Collection[str], max_bytes: int = DEFAULT_MAX_BYTES
) -> Input:
    """Parse and check every file; BadExport lists all problems found."""
    budget = _Budget(max_bytes)
    problems: list[str] = []
    notes: Counter[str] = Counter()
    users: list[UserData] = []
    seen: dict[str, str] = {}
    files = _files(paths)
    if not files:
        raise BadExport(["no XEP-0227 files found"])
    for path in files:
        root = _parse_file(path, budget)
        if root.tag == f"{{{PIE}}}server-data":
            host_elements = list(root.iter(f"{{{PIE}}}host"))
        elif root.tag == f"{{{PIE}}}host":
            host_elements = [root]
        else:
            problems.append(f"{path}: the root is {root.tag}, not XEP-0227's <server-data/>")
            continue
        for host_element in host_elements:
            host = _host(path, host_element, hosts, problems)
            if host is None:
                continue
            for user_element in host_element.iterchildren(f"{{{PIE}}}user"):
                user = _user(path, host, user_element, problems, notes)
                if user is None:
                    continue
                if user.jid in seen:
                    problems.append(
                        f"{user.where}: {user.jid} appears twice (also {seen[user.jid]})"
                    )
                    continue
                seen[user.jid] = user.where
                users.append(user)
    if problems:
        raise BadExport(problems)
    return Input(users, [f"{what} ({count})" for what, count in sorted(notes.items())])


def _host(
    path: Path, element: etree._Element, hosts: Collection[str], problems: list[str]
) -> str | None:
    text = element.get("jid", "")
    try:
        jid = JID(text)
    except InvalidJID as e:
        problems.append(f"{path}: <host jid={text!r}>: not a valid domain: {e}")
        return None
    if jid.user or jid.resource:
        problems.append(f"{path}: <host jid={text!r}>: a host is a bare domain")
        return None
    if jid.domain not in hosts:
        problems.append(
            f"{path}: host {jid.domain} is not served by this configuration "
            f"(hosts: {', '.join(sorted(hosts))})"
        )
        return None
    return jid.domain


def _bare(text: str | None) -> str:
    """A bare JID in canonical form; InvalidJID for anything else."""
    jid = JID(text or "")
    if jid.resource:
        raise InvalidJID("a full JID where a bare one belongs")
    return jid.bare


def _user(
    path: Path,
    host: str,
    element: etree._Element,
    problems: list[str],
    notes: Counter[str],
) -> UserData | None:
    raw = element.get("name", "")
    where = f"{path}: {raw!r}@{host}"
    try:
        name = normalize_username(raw)
    except InvalidUsername as e:
        problems.append(f"{where}: bad user name: {e}")
        return None
    user = UserData(host, name, f"{path}: {name}@{host}")
    before = len(problems)
    for child in element:
        if not isinstance(child.tag, str):
            continue
        try:
            _child(user, child, notes)
        except (InvalidJID, BadCredentials, ValueError) as e:
            problems.append(f"{user.where}: <{etree.QName(child).localname}/>: {e}")
    if not user.keys and user.password is None:
        password = element.get("password")
        if password:
            user.password = password
        else:
            problems.append(f"{user.where}: no credentials (no SCRAM keys, no password)")
    return user if len(problems) == before else None


def _child(user: UserData, child: etree._Element, notes: Counter[str]) -> None:
    tag = child.tag
    if tag == f"{{{NS_SCRAM}}}scram-credentials":
        keys = parse_scram(child)
        if any(k.hash_name == keys.hash_name for k in user.keys):
            raise ValueError(f"two sets of {keys.hash_name} keys")
        user.keys.append(keys)
    elif tag == f"{{{ROSTER}}}query":
        for item in child.iterchildren(f"{{{ROSTER}}}item"):
            user.roster.append(_roster_item(item))
    elif tag == f"{{{CLIENT}}}presence" and child.get("type") == "subscribe":
        user.pending.append(_bare(child.get("from")))
    elif tag == f"{{{VCARD}}}vCard":
        user.vcard = copy.deepcopy(child)
    elif tag == f"{{{PUBSUB}}}pubsub":
        _pep(user, child, notes)
    elif tag == f"{{{PUBSUB_OWNER}}}pubsub":
        pass  # node configurations: nothing to configure without PEP
    elif tag == f"{{{PRIVATE}}}query":
        user.private.extend(copy.deepcopy(c) for c in child if isinstance(c.tag, str))
    elif tag == f"{{{PRIVACY}}}query":
        default = child.find(f"{{{PRIVACY}}}default")
        if default is not None and default.get("name"):
            user.privacy_default = default.get("name")
        user.privacy_lists.extend(
            copy.deepcopy(c) for c in child.iterchildren(f"{{{PRIVACY}}}list")
        )
    elif tag == f"{{{BLOCKING}}}blocklist":
        user.blocklist.extend(
            JID(i.get("jid", "")).full for i in child.iterchildren(f"{{{BLOCKING}}}item")
        )
    elif tag == f"{{{PIE}}}offline-messages":
        for message in child.iterchildren(f"{{{CLIENT}}}message"):
            user.offline.append(copy.deepcopy(message))
    elif tag == f"{{{BAN}}}banned":
        since = child.get("since", "")
        if not (since.isascii() and since.isdigit()):
            raise ValueError(f"since {since[:20]!r} is not Unix seconds")
        user.ban = Ban(int(since), child.text or "")
    else:
        qname = etree.QName(child)
        notes[f"not imported: <{qname.localname} xmlns='{qname.namespace}'/>"] += 1


def _roster_item(item: etree._Element) -> RosterEntry:
    subscription = item.get("subscription", "none")
    if subscription not in SUBSCRIPTIONS:
        raise ValueError(f"subscription {subscription!r} of {item.get('jid')!r}")
    return RosterEntry(
        jid=_bare(item.get("jid")),
        name=item.get("name") or None,
        subscription=subscription,
        ask=item.get("ask") == "subscribe",
        approved=item.get("approved") in ("true", "1"),
        groups=[g.text for g in item.iterchildren(f"{{{ROSTER}}}group") if g.text],
    )


def _pep(user: UserData, pubsub: etree._Element, notes: Counter[str]) -> None:
    """Prosody's PEP items: its vCard4 becomes the vCard (unless a vcard-temp one is there
    too); other nodes wait for xmppd to have PEP."""
    for items in pubsub.iterchildren(f"{{{PUBSUB}}}items"):
        node = items.get("node", "")
        card = items.find(f"{{{PUBSUB}}}item/{{{vcard4.VCARD4}}}vcard")
        if node == VCARD4_NODE and card is not None:
            if user.vcard is None:
                user.vcard, dropped = vcard4.convert(card)
                for name in dropped:
                    notes[f"vCard4 field without a vcard-temp counterpart: {name}"] += 1
        else:
            notes[f"not imported (xmppd has no PEP yet): PEP node {node}"] += 1
