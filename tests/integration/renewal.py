"""A certificate renewed in place, as certbot does it: for the reload tests."""

from __future__ import annotations

import shutil
from pathlib import Path

from xmppd.tls import ensure_self_signed


class RenewablePair:
    """`cert` and `key` at fixed paths (what tls.cert and tls.key name), holding the
    `first` pair; `renew()` copies the `second` pair for the same name over them."""

    def __init__(self, folder: Path, name: str = "localhost") -> None:
        self.first = ensure_self_signed(folder / "first", [name])
        self.second = ensure_self_signed(folder / "second", [name])
        self.cert, self.key = folder / "server.crt", folder / "server.key"
        shutil.copy(self.first[0], self.cert)
        shutil.copy(self.first[1], self.key)

    def tls_section(self) -> dict[str, str]:
        return {"cert": str(self.cert), "key": str(self.key)}

    def renew(self) -> None:
        shutil.copy(self.second[0], self.cert)
        shutil.copy(self.second[1], self.key)
