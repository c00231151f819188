"""Where the bound resources of each account are: the router's only view of sessions.

The router asks a `SessionDirectory` "what are the resources of this bare
JID, with their priority and availability"; it never holds a sessions map
of its own, and no module does. `LocalDirectory` answers for one node. A
cluster puts a directory behind the same interface that also knows the
sessions of other nodes, without changing the router or any module.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from xmppd.session import ClientSession


class SessionDirectory(Protocol):
    def get(self, bare: str, resource: str) -> ClientSession | None:
        """The session bound to bare/resource, or None."""

    def resources(self, bare: str) -> list[ClientSession]:
        """Every bound session of `bare`, available or not."""

    def available(self, bare: str) -> list[ClientSession]:
        """The sessions of `bare` that sent initial presence (RFC 6121 8.5)."""

    def has(self, bare: str) -> bool:
        """True if `bare` has at least one bound session."""

    def add(self, session: ClientSession) -> ClientSession | None:
        """Bind `session`; returns the session it replaced on that resource, if any."""

    def remove(self, session: ClientSession) -> bool:
        """Unbind `session` if it is the one bound on its resource; True if it was."""

    def presence_changed(self, session: ClientSession) -> None:
        """The router changed a bound session's availability or priority (a cluster
        directory tells the other nodes; a node alone has nothing to do)."""

    def state_changed(self, session: ClientSession, key: str) -> None:
        """A module changed `key` of a bound session's state, a key it declared shared
        (`Module.shared_state`): a cluster directory tells the other nodes, whose
        replica of the session gets it; a node alone has nothing to do."""

    def count(self) -> int:
        """How many sessions are bound on this node."""

    def accounts(self) -> Iterator[str]:
        """The bare JIDs with at least one session."""


class LocalDirectory:
    """The sessions bound on this node: bare JID -> resource -> session."""

    __slots__ = ("_by_bare", "_count")

    def __init__(self) -> None:
        self._by_bare: dict[str, dict[str, ClientSession]] = {}
        self._count = 0

    def get(self, bare: str, resource: str) -> ClientSession | None:
        resources = self._by_bare.get(bare)
        return resources.get(resource) if resources is not None else None

    def resources(self, bare: str) -> list[ClientSession]:
        resources = self._by_bare.get(bare)
        return list(resources.values()) if resources is not None else []

    def available(self, bare: str) -> list[ClientSession]:
        resources = self._by_bare.get(bare)
        if resources is None:
            return []
        return [s for s in resources.values() if s.available]

    def has(self, bare: str) -> bool:
        return bare in self._by_bare

    def add(self, session: ClientSession) -> ClientSession | None:
        resources = self._by_bare.setdefault(session.bare, {})
        old = resources.get(session.resource)
        resources[session.resource] = session
        if old is None:
            self._count += 1
        return old if old is not session else None

    def remove(self, session: ClientSession) -> bool:
        resources = self._by_bare.get(session.bare)
        if resources is None or resources.get(session.resource) is not session:
            return False
        del resources[session.resource]
        self._count -= 1
        if not resources:
            del self._by_bare[session.bare]
        return True

    def presence_changed(self, session: ClientSession) -> None:
        pass

    def state_changed(self, session: ClientSession, key: str) -> None:
        pass

    def count(self) -> int:
        return self._count

    def accounts(self) -> Iterator[str]:
        return iter(list(self._by_bare))
