"""Profanity, a terminal XMPP client (Debian's package, .ci/services.sh installs it),
driven in tmux as a person would: keys typed into its prompt, its screen read back.

Each client runs in a tmux server of its own (a private socket in the test's
folder) with a fresh HOME, so nothing is shared with the machine's tmux or the
user's profanity; closing kills that tmux server. Every wait for the screen has a
timeout, and a timeout shows the screen.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

from tests.storage.services import unavailable

TIMEOUT = 10.0


class Profanity:
    """One profanity process in a detached tmux session."""

    def __init__(self, tmux: str, socket: Path) -> None:
        self.tmux = tmux
        self.socket = socket

    async def _tmux(self, *arguments: str) -> str:
        process = await asyncio.create_subprocess_exec(
            self.tmux,
            "-S",
            str(self.socket),
            *arguments,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), TIMEOUT)
        if process.returncode != 0:
            raise RuntimeError(f"tmux {arguments[0]}: {err.decode(errors='replace')}")
        return out.decode(errors="replace")

    async def type(self, line: str) -> None:
        """Type `line` (literally, no key names) and press Enter."""
        await self._tmux("send-keys", "-t", "profanity", "-l", line)
        await self._tmux("send-keys", "-t", "profanity", "Enter")

    async def screen(self) -> str:
        """The current window's text, its scrollback included, wrapped lines joined."""
        return await self._tmux("capture-pane", "-p", "-J", "-S", "-", "-t", "profanity")

    async def shows(self, text: str, timeout: float = TIMEOUT) -> str:
        """Wait until `text` is on the screen; the screen then."""
        deadline = time.monotonic() + timeout
        while True:
            screen = await self.screen()
            if text in screen:
                return screen
            if time.monotonic() > deadline:
                raise TimeoutError(f"profanity never showed {text!r}; its screen:\n{screen}")
            await asyncio.sleep(0.1)  # a terminal has no event to await: poll the screen

    async def close(self) -> None:
        await self._tmux("kill-server")


async def start_profanity(folder: Path) -> Profanity:
    """Profanity in a new tmux server, with HOME (and its XDG folders) in `folder`."""
    tmux, binary = shutil.which("tmux"), shutil.which("profanity")
    if tmux is None or binary is None:
        unavailable("tmux or profanity is not installed (bash .ci/services.sh installs both)")
    home = folder / "home"
    await asyncio.to_thread(home.mkdir, parents=True)
    client = Profanity(tmux, folder / "tmux.sock")
    await client._tmux(
        "new-session",
        "-d",
        "-s",
        "profanity",
        "-x",
        "250",
        "-y",
        "50",
        "env",
        f"HOME={home}",
        f"XDG_CONFIG_HOME={home}/.config",
        f"XDG_DATA_HOME={home}/.local/share",
        "TERM=xterm-256color",
        binary,
    )
    try:
        await client.shows("Type '/help' to show complete help.")
    except BaseException:
        await client.close()  # the caller never gets the client to close: no tmux left over
        raise
    return client


async def log_in(client: Profanity, jid: str, password: str, port: int, ca_dir: Path) -> None:
    """Trust the certificates in `ca_dir` (an OpenSSL hashed folder), `/connect` over
    STARTTLS, answer the password prompt, and wait for the login."""
    await client.type(f"/tls certpath set {ca_dir}")
    await client.shows(f"Certificate path set to: {ca_dir}")
    await client.type(f"/connect {jid} server 127.0.0.1 port {port} tls force")
    await client.shows("Enter password:")
    await client.type(password)
    await client.shows("logged in successfully")
