"""xmppd: an XMPP server whose nodes keep no durable state."""

from importlib.metadata import PackageNotFoundError, version

__version__ = "0.1.0"


def package_version() -> str:
    """The installed distribution's version (what `--version` and the admin API report)."""
    try:
        return version("xmppd")
    except PackageNotFoundError:  # a source tree that was never installed
        return f"{__version__} (not installed)"
