"""A reload whose file cannot be loaded, for whatever reason, is refused with the one
"reload refused" log line, and the node keeps its configuration (in-process nodes:
test_reload.py runs real processes for the ordinary cases)."""

from __future__ import annotations

import logging

import pytest

from tests.integration.conftest import StartServer
from xmppd.config import MAX_YAML_VALUES, Config


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records
        if r.levelno == logging.ERROR and r.getMessage().startswith("reload refused")
    ]


async def test_looping_or_multiplying_aliases_refuse_the_reload(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server(users={})
    config = server.config
    path = config.source.file
    assert path is not None
    first = path.read_text()
    lines = first.count("\n")

    path.write_text(first + "modules: &m\n  roster: *m\n")
    result = await server.reload()
    problem = f"{path}:{lines + 2}: modules.roster: an alias refers to a node that contains it"
    assert (result.reloaded, result.problems) == (False, [problem])
    assert refusals(caplog) == [f"reload refused, nothing changed: {problem}"]

    caplog.clear()
    levels = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for name, alias in zip("bcdef", "abcde", strict=True):
        levels.append(f"{name}: &{name} [{', '.join([f'*{alias}'] * 9)}]")
    path.write_text(first + "\n".join(levels) + "\n")
    result = await server.reload()
    problem = (
        f"{path}:{lines + 6}: f: the aliases expand to more than {MAX_YAML_VALUES} values; "
        "write the values out instead"
    )
    assert (result.reloaded, result.problems) == (False, [problem])
    assert refusals(caplog) == [f"reload refused, nothing changed: {problem}"]
    assert server.config is config  # nothing changed


async def test_any_failure_to_load_refuses_the_reload(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Not only ConfigError: a loader's bug must not escape the reload unlogged."""
    server = await start_server(users={})
    config = server.config

    def broken_loader() -> Config:
        raise RecursionError("maximum recursion depth exceeded")

    server.load = broken_loader  # the one function under test is the reload's handling
    result = await server.reload()
    problem = (
        f"{config.source.name}: cannot be read "
        "(RecursionError: maximum recursion depth exceeded)"
    )
    assert (result.reloaded, result.problems) == (False, [problem])
    assert refusals(caplog) == [f"reload refused, nothing changed: {problem}"]
    assert server.config is config
