"""The YAML configuration: typed values, every problem reported with its file and line."""

from __future__ import annotations

import logging
import os
import textwrap
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field

from xmppd.config import (
    DEFAULT_MODULES,
    MAX_YAML_VALUES,
    MECHANISMS,
    Config,
    ConfigError,
    ConfigSource,
    ListenerConfig,
    load_config,
    redact_url,
    split_advertised,
    validate_section,
)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_FILE = REPO / "config" / "xmppd.yml"


def write(tmp_path: Path, text: str, name: str = "xmppd.yml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    """The problems loading `text` reports, with the file shown as "x.yml"."""
    path = write(tmp_path, text, "x.yml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    prefix = f"{path.parent}/"
    return [p.removeprefix(prefix) for p in info.value.problems]


def load(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text))


# --------------------------------------------------------------------------- defaults


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None)
    assert cfg.hosts == ["localhost"]
    assert cfg.data_dir == tmp_path / "data"
    assert cfg.log_level == "info"
    assert [(x.type, x.address, x.port, x.backlog) for x in cfg.listeners] == [
        ("starttls", "127.0.0.1", 5222, 1024),
        ("direct_tls", "127.0.0.1", 5223, 1024),
    ]
    assert (cfg.tls.cert, cfg.tls.key, cfg.tls.min_version) == (None, None, "1.2")
    assert cfg.limits.max_stanza_bytes == 262144
    assert cfg.limits.max_stanza_bytes_unauthenticated == 10240
    assert cfg.limits.max_xml_depth == 48
    assert cfg.limits.auth_timeout == 30.0
    assert cfg.limits.max_connections_per_ip == 200
    assert cfg.limits.auth_failure_delay == 1.0
    assert cfg.limits.auth_failures_before_ban == 20
    assert cfg.limits.auth_ban_seconds == 3600.0
    assert cfg.auth.mechanisms == list(MECHANISMS)
    assert MECHANISMS[0] == "SCRAM-SHA-512-PLUS" and MECHANISMS[-1] == "PLAIN"
    assert cfg.auth.scram_iterations == 4096
    assert cfg.auth.allow_unencrypted is False
    assert cfg.auth.proxy_auth == []
    assert cfg.storage.items.backend == "sqlite"
    assert cfg.modules == {name: {} for name in DEFAULT_MODULES}
    assert {"roster", "presence", "offline", "register"} <= set(cfg.modules)
    assert cfg.source.file is None and cfg.source.name == "<built-in defaults>"


def test_shipped_file_is_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    # Relative paths resolve against the file's folder, the defaults' against the
    # current directory: from the file's folder both must be the same Config.
    monkeypatch.chdir(DEFAULT_FILE.parent)
    shipped = load_config(DEFAULT_FILE)
    assert shipped.model_dump() == load_config(None).model_dump()
    assert shipped.source.file == DEFAULT_FILE


def _leaf_paths(value: Any, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    if isinstance(value, dict) and value:
        return [p for k, v in value.items() for p in _leaf_paths(v, prefix + (k,))]
    if isinstance(value, list) and value:
        return [p for i, v in enumerate(value) for p in _leaf_paths(v, prefix + (i,))]
    return [prefix]


def test_shipped_file_shows_every_key() -> None:
    cfg = load_config(DEFAULT_FILE)
    missing = [p for p in _leaf_paths(cfg.model_dump()) if p not in cfg.source.lines]
    assert missing == []


def test_empty_file_and_comments_only_are_the_defaults(tmp_path: Path) -> None:
    defaults = Config.model_validate({}, context={"base_dir": tmp_path}).model_dump()
    assert load(tmp_path, "").model_dump() == defaults
    assert load(tmp_path, "# nothing here\n").model_dump() == defaults


def test_empty_section_means_its_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path, "limits:\n  # max_xml_depth: 10\nauth:\nmodules:\n")
    assert cfg.limits.max_xml_depth == 48
    assert cfg.auth.mechanisms == list(MECHANISMS)
    assert cfg.modules == {}


# --------------------------------------------------------------------------- file-level problems


def test_the_documented_example(tmp_path: Path) -> None:
    text = """\
        hosts: [example.org]
        listeners:
          - type: starttls
            address: 0.0.0.0
            port: 5222
          - type: direct_tls
            address: 0.0.0.0
            port: 52x22
        """
    assert problems(tmp_path, text) == [
        'x.yml:8: listeners[1].port: expected an integer, got "52x22"'
    ]


def test_error_names_the_file_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "a.yml").write_text("log_level: loud\n")
    with pytest.raises(ConfigError) as info:
        load_config(Path("conf/a.yml"))
    assert str(info.value) == (
        'conf/a.yml:1: log_level: expected "debug", "info", "warning" or "error", got "loud"'
    )


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yml")
    assert info.value.problems == [
        f"{tmp_path}/nope.yml: cannot read the file: No such file or directory"
    ]


def test_yaml_syntax_error_has_its_line(tmp_path: Path) -> None:
    text = "hosts:\n  - localhost\nlimits:\n  max_xml_depth: 10\n bad: [\n"
    (problem,) = problems(tmp_path, text)
    assert problem.startswith("x.yml:5: YAML syntax error: ")


def test_unsafe_yaml_tag_is_refused(tmp_path: Path) -> None:
    (problem,) = problems(tmp_path, "\n\nhosts: !!python/object/apply:os.system [true]\n")
    assert problem.startswith("x.yml:3: YAML error: could not determine a constructor")


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    assert problems(tmp_path, "- localhost\n") == [
        'x.yml:1: the top level must be a mapping of keys to values (like "hosts: [example.org]"), '
        "got a list"
    ]


def test_duplicate_key(tmp_path: Path) -> None:
    assert problems(tmp_path, "limits:\n  max_xml_depth: 10\n  max_xml_depth: 20\n") == [
        "x.yml:3: limits.max_xml_depth: duplicate key (first on line 2)"
    ]


def test_all_problems_at_once_in_file_order(tmp_path: Path) -> None:
    text = """\
        auth:
          scram_iterations: 100
        hostz: [example.org]
        limits:
          max_xml_depth: true
        """
    assert problems(tmp_path, text) == [
        "x.yml:2: auth.scram_iterations: must be at least 4096, got 100",
        'x.yml:3: hostz: unknown key "hostz" (did you mean "hosts"?)',
        "x.yml:5: limits.max_xml_depth: expected an integer, got true",
    ]
    err = ConfigError(["a", "b"])
    assert str(err) == "a\nb" and err.problems == ["a", "b"]


def test_module_options_are_checked_with_the_rest_of_the_file(tmp_path: Path) -> None:
    """A bad module option is reported by the loader, with the core problems, not by
    the module host after the stores are open."""
    text = """\
        limts: {}
        modules:
          roster: {versionning: true}
          bogus: {}
        """
    assert problems(tmp_path, text) == [
        'x.yml:1: limts: unknown key "limts" (did you mean "limits"?)',
        'x.yml:3: modules.roster.versionning: unknown key "versionning"',
        "x.yml:4: modules.bogus: no such module",
    ]
    assert problems(tmp_path, "modules:\n  roster: {versionning: true}\n") == [
        'x.yml:2: modules.roster.versionning: unknown key "versionning"',
    ]


# --------------------------------------------------------------------------- unknown keys and types


def test_unknown_key_with_and_without_a_suggestion(tmp_path: Path) -> None:
    text = """\
        listeners:
          - type: starttls
            address: 127.0.0.1
            port: 5222
            backlg: 5
        flavour: blue
        """
    assert problems(tmp_path, text) == [
        'x.yml:5: listeners[0].backlg: unknown key "backlg" (did you mean "backlog"?)',
        'x.yml:6: flavour: unknown key "flavour"',
    ]


def test_unknown_key_inside_a_chosen_storage_backend(tmp_path: Path) -> None:
    text = """\
        storage:
          items:
            backend: dynamodb
            tabel: xmppd
        """
    assert problems(tmp_path, text) == [
        'x.yml:4: storage.items.tabel: unknown key "tabel" (did you mean "table"?)'
    ]


def test_unknown_storage_backend_points_at_the_backend_key(tmp_path: Path) -> None:
    text = "storage:\n  cache:\n    ttl: 5\n    backend: redis\n"
    assert problems(tmp_path, text) == [
        'x.yml:4: storage.cache.backend: expected one of "memory", "memcached", "none", got "redis"'
    ]


def test_storage_value_error(tmp_path: Path) -> None:
    text = "storage:\n  cache:\n    backend: memcached\n    servers: [localhost]\n"
    assert problems(tmp_path, text) == [
        "x.yml:4: storage.cache.servers: 'localhost': expected host:port, e.g. 127.0.0.1:11211"
    ]


def test_wrong_types(tmp_path: Path) -> None:
    text = """\
        hosts: example.org
        log_level: 3
        listeners: {type: starttls}
        tls: yes
        auth:
          allow_unencrypted: "no"
        limits:
          auth_timeout: soon
          max_connections_per_ip: 1.5
        modules:
          ping: 5
        """
    assert problems(tmp_path, text) == [
        'x.yml:1: hosts: expected a list, got "example.org" '
        '(write it as [example.org] or as lines starting with "- ")',
        'x.yml:2: log_level: expected "debug", "info", "warning" or "error", got 3',
        "x.yml:3: listeners: expected a list, got a mapping",
        "x.yml:4: tls: expected a mapping (key: value), got true",
        'x.yml:6: auth.allow_unencrypted: expected true or false, got "no"',
        'x.yml:8: limits.auth_timeout: expected a number, got "soon"',
        "x.yml:9: limits.max_connections_per_ip: expected an integer, got 1.5",
        "x.yml:11: modules.ping: expected a mapping (key: value), got 5",
    ]


def test_missing_required_key(tmp_path: Path) -> None:
    text = "listeners:\n  - type: starttls\n    address: 127.0.0.1\n"
    assert problems(tmp_path, text) == ['x.yml:2: listeners[0]: missing required key "port"']


# --------------------------------------------------------------------------- hosts


def test_hosts_are_lowercased_domains(tmp_path: Path) -> None:
    assert load(tmp_path, "hosts: [Example.ORG, chat.example.net]\n").hosts == [
        "example.org",
        "chat.example.net",
    ]


def test_bad_hosts(tmp_path: Path) -> None:
    text = 'hosts:\n  - example.org\n  - "bad host"\n  - user@example.org\n  - ""\n'
    got = problems(tmp_path, text)
    assert got[0].startswith('x.yml:3: hosts[1]: "bad host" is not a valid domain name')
    assert got[1:] == [
        'x.yml:4: hosts[2]: "user@example.org" is not a bare domain name (no user@ or /resource)',
        "x.yml:5: hosts[3]: a host name cannot be empty",
    ]


def test_duplicate_hosts_after_lowercasing(tmp_path: Path) -> None:
    assert problems(tmp_path, "hosts:\n  - example.org\n  - EXAMPLE.org\n") == [
        'x.yml:3: hosts[1]: "example.org" is listed twice (also hosts[0])'
    ]


def test_at_least_one_host(tmp_path: Path) -> None:
    assert problems(tmp_path, "hosts: []\n") == ["x.yml:1: hosts: must list at least 1 item, got 0"]


# --------------------------------------------------------------------------- paths


def test_relative_paths_are_relative_to_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "tls").mkdir()
    (etc / "tls" / "c.pem").write_text("cert")
    (etc / "tls" / "k.pem").write_text("key")
    monkeypatch.chdir(tmp_path)  # elsewhere than the file: must not matter
    cfg = load_config(
        write(etc, "data_dir: ../var/xmpp\ntls:\n  cert: tls/c.pem\n  key: tls/k.pem\n")
    )
    assert cfg.data_dir == etc / "../var/xmpp"
    assert cfg.data_dir.is_absolute()
    assert (cfg.tls.cert, cfg.tls.key) == (etc / "tls/c.pem", etc / "tls/k.pem")
    assert cfg.source.base_dir == etc


def test_absolute_data_dir_is_kept(tmp_path: Path) -> None:
    assert load(tmp_path, f"data_dir: {tmp_path}/elsewhere\n").data_dir == tmp_path / "elsewhere"


def test_tls_files_both_or_neither_and_existing(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("cert")
    assert problems(tmp_path, "tls:\n  cert: c.pem\n") == [
        "x.yml:2: tls.cert: cert is set but key is not: give both or neither"
    ]
    assert problems(tmp_path, "tls:\n  cert: c.pem\n  key: nokey.pem\n") == [
        f"x.yml:3: tls.key: no such file: {tmp_path}/nokey.pem"
    ]


def test_tls_min_version_unquoted(tmp_path: Path) -> None:
    assert load(tmp_path, "tls:\n  min_version: 1.3\n").tls.min_version == "1.3"
    assert problems(tmp_path, "tls:\n  min_version: 1.1\n") == [
        'x.yml:2: tls.min_version: expected "1.2" or "1.3", got "1.1"'
    ]


# --------------------------------------------------------------------------- listeners


def test_listener_addresses(tmp_path: Path) -> None:
    text = """\
        listeners:
          - {type: starttls, address: "::", port: 5222}
          - {type: starttls, address: LocalHost, port: 5222}
          - {type: direct_tls, address: 0:0:0:0:0:0:0:1, port: 5223}
        """
    cfg = load(tmp_path, text)
    assert [x.address for x in cfg.listeners] == ["::", "localhost", "::1"]
    assert problems(
        tmp_path, "listeners:\n  - {type: starttls, address: example.org, port: 1}\n"
    ) == [
        "x.yml:2: listeners[0].address: expected an IP address (like 127.0.0.1, ::1 or 0.0.0.0) "
        'or "localhost", got "example.org"'
    ]


def test_listener_type_and_port_range(tmp_path: Path) -> None:
    text = """\
        listeners:
          - type: websocket
            address: 127.0.0.1
            port: 70000
            backlog: 0
        """
    assert problems(tmp_path, text) == [
        'x.yml:2: listeners[0].type: expected "starttls" or "direct_tls", got "websocket"',
        "x.yml:4: listeners[0].port: must be at most 65535, got 70000",
        "x.yml:5: listeners[0].backlog: must be at least 1, got 0",
    ]


def test_proxy_protocol_needs_trusted_balancers(tmp_path: Path) -> None:
    text = """\
        listeners:
          - type: direct_tls
            address: 0.0.0.0
            port: 5223
            proxy_protocol: true
            trusted_proxies: []
          - type: starttls
            address: 0.0.0.0
            port: 5222
            proxy_protocol: true
            trusted_proxies: [10.0.0.0/24, balancer.example]
        """
    assert problems(tmp_path, text) == [
        "x.yml:6: listeners[0].trusted_proxies: proxy_protocol needs the balancers' "
        "addresses: nobody else may claim to speak for a client",
        "x.yml:11: listeners[1].trusted_proxies[1]: expected an address or network (like "
        '10.0.0.5 or 10.0.0.0/24), got "balancer.example"',
    ]
    listener = load(tmp_path, text.replace("[]", "[10.0.0.5]").replace(
        ", balancer.example", "")).listeners[0]
    assert [str(n) for n in listener.proxy_networks()] == ["10.0.0.5/32"]


def test_s2s_listeners_take_the_proxy_protocol_options_with_the_same_rule(
    tmp_path: Path,
) -> None:
    text = """\
        s2s:
          listeners:
            - address: 0.0.0.0
              port: 5269
              proxy_protocol: true
              trusted_proxies: []
            - address: 0.0.0.0
              port: 5270
              direct_tls: true
              proxy_protocol: true
              trusted_proxies: [10.0.0.0/24, balancer.example]
        """
    assert problems(tmp_path, text) == [
        "x.yml:6: s2s.listeners[0].trusted_proxies: proxy_protocol needs the balancers' "
        "addresses: nobody else may claim to speak for a client",
        "x.yml:11: s2s.listeners[1].trusted_proxies[1]: expected an address or network "
        '(like 10.0.0.5 or 10.0.0.0/24), got "balancer.example"',
    ]
    s2s = load(tmp_path, text.replace("[]", "[10.0.0.5]").replace(", balancer.example", "")).s2s
    assert s2s is not None
    assert [str(n) for n in s2s.listeners[0].proxy_networks()] == ["10.0.0.5/32"]
    assert s2s.listeners[1].proxy_protocol and s2s.listeners[1].direct_tls
    # Off unless asked for, like a client listener's.
    s2s = load(tmp_path, "s2s:\n  listeners: [{address: 0.0.0.0, port: 5269}]\n").s2s
    assert s2s is not None and not s2s.listeners[0].proxy_protocol


def test_sasl_before_tls_only_on_loopback(tmp_path: Path) -> None:
    text = """\
        listeners:
          - {type: starttls, address: 127.0.0.1, port: 5222}
          - {type: starttls, address: 0.0.0.0, port: 5223}
        auth:
          allow_unencrypted: true
        """
    assert problems(tmp_path, text) == [
        "x.yml:5: auth.allow_unencrypted: SASL before TLS is allowed only while every "
        "starttls listener is on a loopback address with no load balancer in front; "
        "listeners[1] is on 0.0.0.0"
    ]
    assert load(tmp_path, text.replace("0.0.0.0", "\"::1\"")).auth.allow_unencrypted
    # A balancer on the same machine can carry anyone's connection to a loopback port.
    proxied = text.replace("address: 0.0.0.0, port: 5223", "address: 127.0.0.1, port: 5223, "
                           "proxy_protocol: true")
    assert problems(tmp_path, proxied) == [
        "x.yml:5: auth.allow_unencrypted: SASL before TLS is allowed only while every "
        "starttls listener is on a loopback address with no load balancer in front; "
        "listeners[1] takes clients from a load balancer (proxy_protocol)"
    ]


def test_two_listeners_on_one_socket(tmp_path: Path) -> None:
    text = """\
        listeners:
          - {type: starttls, address: 127.0.0.1, port: 5222}
          - {type: direct_tls, address: 127.0.0.1, port: 5223}
          - {type: direct_tls, address: 127.0.0.1, port: 5222}
        """
    assert problems(tmp_path, text) == [
        "x.yml:4: listeners[2]: 127.0.0.1 port 5222 is already used by listeners[0]"
    ]


def test_port_zero_picks_a_free_port_each_time(tmp_path: Path) -> None:
    text = """\
        listeners:
          - {type: starttls, address: 127.0.0.1, port: 0}
          - {type: direct_tls, address: 127.0.0.1, port: 0}
        """
    assert [x.port for x in load(tmp_path, text).listeners] == [0, 0]


# --------------------------------------------------------------------------- limits and auth


def test_limit_bounds(tmp_path: Path) -> None:
    text = """\
        limits:
          max_stanza_bytes: 1000
          max_stanza_bytes_unauthenticated: 100
          max_xml_depth: 201
          auth_timeout: 0
          max_connections_per_ip: -1
          auth_failure_delay: -0.5
          auth_failures_before_ban: 0
          auth_ban_seconds: .nan
        """
    assert problems(tmp_path, text) == [
        "x.yml:2: limits.max_stanza_bytes: must be at least 1024, got 1000",
        "x.yml:3: limits.max_stanza_bytes_unauthenticated: must be at least 512, got 100",
        "x.yml:4: limits.max_xml_depth: must be at most 200, got 201",
        "x.yml:5: limits.auth_timeout: must be greater than 0, got 0",
        "x.yml:6: limits.max_connections_per_ip: must be at least 0, got -1",
        "x.yml:7: limits.auth_failure_delay: must be at least 0, got -0.5",
        "x.yml:8: limits.auth_failures_before_ban: must be at least 1, got 0",
        "x.yml:9: limits.auth_ban_seconds: expected a finite number, got nan",
    ]


def test_old_failed_login_keys_name_their_replacements(tmp_path: Path) -> None:
    text = """\
        limits:
          max_auth_failures_per_account: 5
          max_auth_failures_per_ip: 20
          auth_failure_window: 300.0
          auth_lockout: 600.0
          auth_ban_seconds: 0
        """
    assert problems(tmp_path, text) == [
        'x.yml:2: limits.max_auth_failures_per_account: unknown key "max_auth_failures_per_account"'
        ": accounts are no longer locked (anyone could lock their owner out); failing addresses "
        'are banned instead: use "limits.auth_failures_before_ban"',
        'x.yml:3: limits.max_auth_failures_per_ip: unknown key "max_auth_failures_per_ip": '
        'renamed: use "limits.auth_failures_before_ban"',
        'x.yml:4: limits.auth_failure_window: unknown key "auth_failure_window": failures are now '
        "remembered until limits.auth_ban_seconds pass without one: "
        'use "limits.auth_ban_seconds"',
        'x.yml:5: limits.auth_lockout: unknown key "auth_lockout": '
        'renamed: use "limits.auth_ban_seconds"',
        "x.yml:6: limits.auth_ban_seconds: must be greater than 0, got 0",
    ]


def test_unauthenticated_stanzas_not_larger_than_authenticated(tmp_path: Path) -> None:
    text = "limits:\n  max_stanza_bytes: 4096\n  max_stanza_bytes_unauthenticated: 8192\n"
    assert problems(tmp_path, text) == [
        "x.yml:3: limits.max_stanza_bytes_unauthenticated: must be at most max_stanza_bytes "
        "(4096), got 8192"
    ]
    assert load(tmp_path, "limits:\n  auth_timeout: 5\n").limits.auth_timeout == 5.0


def test_mechanisms(tmp_path: Path) -> None:
    assert load(tmp_path, "auth:\n  mechanisms: [scram-sha-256, PLAIN]\n").auth.mechanisms == [
        "SCRAM-SHA-256",
        "PLAIN",
    ]
    text = "auth:\n  mechanisms:\n    - PLAIN\n    - DIGEST-MD5\n"
    (problem,) = problems(tmp_path, text)
    assert problem.startswith('x.yml:4: auth.mechanisms[1]: expected "SCRAM-SHA-512-PLUS", ')
    assert problem.endswith(' or "PLAIN", got "DIGEST-MD5"')
    assert problems(tmp_path, "auth:\n  mechanisms:\n    - PLAIN\n    - plain\n") == [
        'x.yml:4: auth.mechanisms[1]: "PLAIN" is listed twice (also mechanisms[0])'
    ]
    assert problems(tmp_path, "auth:\n  mechanisms: []\n") == [
        "x.yml:2: auth.mechanisms: must list at least 1 item, got 0"
    ]


def test_scram_iterations_bounds(tmp_path: Path) -> None:
    assert problems(tmp_path, "auth:\n  scram_iterations: 10000001\n") == [
        "x.yml:2: auth.scram_iterations: must be at most 10000000, got 10000001"
    ]


def test_proxy_auth(tmp_path: Path) -> None:
    cfg = load(tmp_path, "hosts: [example.org]\nauth:\n  proxy_auth: [Gateway@Example.org]\n")
    assert cfg.auth.proxy_auth == ["gateway@example.org"]
    text = """\
        hosts: [example.org]
        auth:
          proxy_auth:
            - gateway@example.org/res
        """
    assert problems(tmp_path, text) == [
        'x.yml:4: auth.proxy_auth[0]: "gateway@example.org/res" is not a bare JID like '
        "user@example.org"
    ]
    text = "hosts: [example.org]\nauth:\n  proxy_auth:\n    - gw@example.org\n    - gw@other.org\n"
    assert problems(tmp_path, text) == [
        'x.yml:5: auth.proxy_auth[1]: "gw@other.org" is not on one of the hosts (example.org)'
    ]


def test_admins(tmp_path: Path) -> None:
    cfg = load(tmp_path, "hosts: [example.org, other.org]\nadmins: [Boss@Example.org]\n")
    assert cfg.admins == ["boss@example.org"]
    assert load(tmp_path, "hosts: [example.org]\n").admins == []
    text = "hosts: [example.org]\nadmins:\n  - boss@example.org\n  - boss@other.org\n"
    assert problems(tmp_path, text) == [
        'x.yml:4: admins[1]: "boss@other.org" is not on one of the hosts (example.org)'
    ]
    text = "hosts: [example.org]\nadmins:\n  - example.org\n  - boss@example.org/pc\n"
    assert problems(tmp_path, text) == [
        'x.yml:3: admins[0]: "example.org" is not a bare JID like user@example.org',
        'x.yml:4: admins[1]: "boss@example.org/pc" is not a bare JID like user@example.org',
    ]
    text = "hosts: [example.org]\nadmins: [boss@example.org, BOSS@example.org]\n"
    assert problems(tmp_path, text) == [
        'x.yml:2: admins[1]: "boss@example.org" is listed twice (also admins[0])'
    ]


def test_allow_unencrypted_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="xmppd.config"):
        cfg = load(tmp_path, "auth:\n  allow_unencrypted: true\n")
    assert cfg.auth.allow_unencrypted is True
    assert "xmppd.yml:2: auth.allow_unencrypted is on" in caplog.text


# --------------------------------------------------------------------------- modules


def test_module_options_are_kept_raw(tmp_path: Path) -> None:
    cfg = load(tmp_path, "modules:\n  ping:\n  version: {name: x, show_os: true}\n")
    assert cfg.modules == {"ping": None, "version": {"name": "x", "show_os": True}}


class VersionOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "xmppd"
    show_os: bool = True
    ttl: int = Field(default=10, ge=1)


def test_validate_section_points_into_the_file(tmp_path: Path) -> None:
    text = """\
        modules:
          ping: {}
          version:
            name: My server
            show_oss: false
            ttl: 0
        """
    path = write(tmp_path, text)
    fixed = write(tmp_path, text.replace("show_oss: false", "").replace("ttl: 0", ""), "ok.yml")
    cfg = load_config(fixed)
    with pytest.raises(ConfigError) as info:  # the loader checks the real module's options
        load_config(path)
    assert info.value.problems[0] == (
        f'{path}:5: modules.version.show_oss: unknown key "show_oss" (did you mean "show_os"?)'
    )
    with pytest.raises(ConfigError) as info:
        validate_section(VersionOptions, {"ttl": 0}, cfg.source, ("modules", "version"))
    assert info.value.problems == [f"{fixed}:3: modules.version.ttl: must be at least 1, got 0"]
    ok = validate_section(VersionOptions, {"name": "x"}, cfg.source, ("modules", "version"))
    assert ok == VersionOptions(name="x")


def test_validate_section_without_a_file() -> None:
    source = load_config(None).source
    with pytest.raises(ConfigError) as info:
        validate_section(VersionOptions, {"ttl": "x"}, source, ("modules", "version"))
    assert str(info.value) == (
        '<built-in defaults>: modules.version.ttl: expected an integer, got "x"'
    )


def test_config_source_falls_back_to_the_nearest_line() -> None:
    source = ConfigSource(Path("a.yml"), Path("/"), {("modules",): 3, ("modules", "x"): 4})
    assert source.where(("modules", "x", "deep", 2)) == "a.yml:4"
    assert source.where(("other",)) == "a.yml"
    assert source.problem((), "bad") == "a.yml: bad"


def test_models_built_in_code_are_validated_too() -> None:
    with pytest.raises(ValueError):
        ListenerConfig(type="starttls", address="nowhere", port=1)
    cfg = Config(hosts=["Example.org"], data_dir=Path("rel"))
    assert cfg.hosts == ["example.org"] and cfg.data_dir == Path("rel")


def test_yaml_anchors_and_merge_keys(tmp_path: Path) -> None:
    text = """\
        listeners:
          - &local
            type: starttls
            address: 127.0.0.1
            port: 5222
          - <<: *local
            type: direct_tls
            port: {port}
        """
    cfg = load(tmp_path, text.replace("{port}", "5223"))
    assert [(x.type, x.address, x.port) for x in cfg.listeners] == [
        ("starttls", "127.0.0.1", 5222),
        ("direct_tls", "127.0.0.1", 5223),
    ]
    assert problems(tmp_path, text.replace("{port}", "52x23")) == [
        'x.yml:8: listeners[1].port: expected an integer, got "52x23"'
    ]


def test_yaml_aliases_that_loop_are_refused_with_file_and_line(tmp_path: Path) -> None:
    assert problems(tmp_path, "hosts: [localhost]\nmodules: &m\n  roster: *m\n") == [
        "x.yml:3: modules.roster: an alias refers to a node that contains it"
    ]
    assert problems(tmp_path, "hosts: &h [*h]\n") == [
        "x.yml:1: hosts[0]: an alias refers to a node that contains it"
    ]
    # Through a merge key too (PyYAML would merge the mapping into itself).
    assert problems(tmp_path, "admin: &a\n  port: 1\n  tls: {<<: *a}\n") == [
        "x.yml:3: admin.tls: an alias refers to a node that contains it"
    ]


def test_yaml_aliases_that_multiply_are_refused_at_once(tmp_path: Path) -> None:
    """Six levels of nine aliases ("billion laughs") are 531441 values: refused when
    MAX_YAML_VALUES are walked, before pydantic would validate them all."""
    levels = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for name, alias in zip("bcdef", "abcde", strict=True):
        levels.append(f"{name}: &{name} [{', '.join([f'*{alias}'] * 9)}]")
    assert problems(tmp_path, "\n".join(levels) + "\n") == [
        f"x.yml:6: f: the aliases expand to more than {MAX_YAML_VALUES} values; "
        "write the values out instead"
    ]


def test_values_nested_too_deeply_are_refused(tmp_path: Path) -> None:
    assert problems(tmp_path, "hosts: " + "[" * 5000 + "]" * 5000 + "\n") == [
        "x.yml: values nested too deeply"
    ]


def test_admin_api_is_loopback_unless_remote_is_allowed(tmp_path: Path) -> None:
    cfg = load(tmp_path, "")
    assert (cfg.admin.address, cfg.admin.port, cfg.admin.allow_remote) == ("127.0.0.1", 5290, False)
    assert load(tmp_path, "admin: {address: '::1', port: 0}\n").admin.address == "::1"
    assert load(tmp_path, "admin: {address: localhost}\n").admin.address == "localhost"
    assert problems(tmp_path, "admin:\n  address: 0.0.0.0\n") == [
        "x.yml:2: admin.address: 0.0.0.0 is not a loopback address: the admin API can end "
        "sessions and must not be reachable from other machines; set admin.allow_remote: true "
        "if a firewall keeps it private"
    ]
    remote = load(tmp_path, "admin: {address: 10.0.0.5, allow_remote: true}\n")
    assert remote.admin.address == "10.0.0.5"
    assert problems(tmp_path, "admin: {port: 70000}\n") == [
        "x.yml:1: admin.port: must be at most 65535, got 70000"
    ]


def test_admin_api_off_loopback_serves_https_only(tmp_path: Path) -> None:
    """Its bearer token must not cross a network in clear: HTTPS is the default off
    loopback and cannot be turned off there; on loopback it may be turned on."""
    assert load(tmp_path, "").admin.https is False
    remote = load(tmp_path, "admin: {address: 10.0.0.5, allow_remote: true}\n").admin
    assert (remote.tls, remote.https) == (None, True)
    assert load(tmp_path, "admin: {tls: true}\n").admin.https is True
    assert problems(tmp_path, "admin: {address: 0.0.0.0, allow_remote: true, tls: false}\n") == [
        "x.yml:1: admin.tls: 0.0.0.0 is not a loopback address: the API's bearer token "
        "would cross the network in clear; a non-loopback admin API serves HTTPS only "
        "(leave tls out, or set it to true)"
    ]
    (tmp_path / "ca.pem").write_text("not read here")
    assert load(tmp_path, "admin: {tls: true, ca_file: ca.pem}\n").admin.ca_file == (
        tmp_path / "ca.pem"
    )
    assert problems(tmp_path, "admin: {ca_file: ca.pem}\n") == [
        "x.yml:1: admin.ca_file: the admin API serves plain HTTP here (a loopback address "
        "without tls: true), so no certificate is verified: remove ca_file or set tls: true"
    ]
    assert problems(tmp_path, "admin: {tls: true, ca_file: nowhere.pem}\n") == [
        f"x.yml:1: admin.ca_file: no such file: {tmp_path / 'nowhere.pem'}"
    ]


# --------------------------------------------------------------------------- cluster


def test_no_cluster_section_means_a_single_node(tmp_path: Path) -> None:
    assert load(tmp_path, "hosts: [localhost]\n").cluster is None
    assert load(tmp_path, "cluster:\n#  redis_url: redis://h\n").cluster is None


def test_cluster_section(tmp_path: Path) -> None:
    cfg = load(tmp_path, "cluster:\n  redis_url: redis://127.0.0.1:6379/2\n  node_name: a-1\n")
    assert cfg.cluster is not None
    assert (cfg.cluster.redis_url, cfg.cluster.node_name) == ("redis://127.0.0.1:6379/2", "a-1")


def test_cluster_node_names_default_to_distinct_values(tmp_path: Path) -> None:
    cfg = load(tmp_path, "cluster:\n  redis_url: redis://127.0.0.1/0\n")
    assert cfg.cluster is not None
    assert cfg.cluster.node_name.endswith(f"-{os.getpid()}")


def test_cluster_problems_name_their_line(tmp_path: Path) -> None:
    assert problems(tmp_path, "cluster:\n  node_name: a\n") == [
        'x.yml:1: cluster: missing required key "redis_url"'
    ]
    assert problems(tmp_path, "cluster:\n  redis_url: http://u:secret@h\n") == [
        'x.yml:2: cluster.redis_url: must be a redis://, rediss:// or unix:// URL, '
        'got "http://u:***@h"'
    ]
    assert problems(tmp_path, "cluster:\n  redis_url: redis://h\n  node_name: a b\n") == [
        "x.yml:3: cluster.node_name: must be 1-64 letters, digits, '.', '_' or '-', starting "
        'with a letter or digit (it names Redis keys), got "a b"'
    ]


def test_cluster_link_defaults_and_keys(tmp_path: Path) -> None:
    cfg = load(tmp_path, "cluster:\n  redis_url: redis://h\n")
    assert cfg.cluster is not None
    link = cfg.cluster.link
    assert (link.enabled, link.host, link.port) == (True, "127.0.0.1", 0)
    assert cfg.cluster.link_advertise is None and cfg.cluster.secret is None
    cfg = load(
        tmp_path,
        "cluster:\n  redis_url: redis://h\n  link: {host: 0.0.0.0, port: 7400}\n"
        "  link_advertise: 10.0.0.5\n  secret: sixteen-chars-or-more\n",
    )
    assert cfg.cluster is not None
    assert (cfg.cluster.link.host, cfg.cluster.link.port) == ("0.0.0.0", 7400)
    assert cfg.cluster.link_advertise == "10.0.0.5"
    assert split_advertised("10.0.0.5") == ("10.0.0.5", None)
    assert split_advertised("xmpp1.internal:7400") == ("xmpp1.internal", 7400)
    assert split_advertised("[fd00::5]:7400") == ("fd00::5", 7400)
    assert split_advertised("fd00::5") == ("fd00::5", None)


def test_cluster_link_problems_name_their_line(tmp_path: Path) -> None:
    assert problems(tmp_path, "cluster:\n  redis_url: redis://h\n  link:\n    port: 70000\n") == [
        "x.yml:4: cluster.link.port: must be at most 65535, got 70000"
    ]
    assert problems(tmp_path, "cluster:\n  redis_url: redis://h\n  link: {host: nowhere}\n")[
        0
    ].startswith("x.yml:3: cluster.link.host: expected an IP address")
    assert problems(tmp_path, "cluster:\n  redis_url: redis://h\n  link_advertise: h:99999\n") == [
        "x.yml:3: cluster.link_advertise: expected HOST or HOST:PORT (like 10.0.0.5 or "
        '10.0.0.5:7400; [IPv6]:PORT), got "h:99999"'
    ]


def test_cluster_secret_problems_never_show_the_secret(tmp_path: Path) -> None:
    """A config error is printed and, on a reload, logged: like a component's secret."""
    found = [
        problems(tmp_path, f"cluster:\n  redis_url: redis://h\n  secret: {secret}\n")
        for secret in ('"s3cr3t-short"', '" s3cr3t-with-a-space"', "12345678901234567890")
    ]
    assert found == [
        ["x.yml:3: cluster.secret: too short: at least 16 characters (e.g. the output of "
         "`openssl rand -hex 16`)"],
        ["x.yml:3: cluster.secret: has leading or trailing spaces (a copy-paste slip?)"],
        ["x.yml:3: cluster.secret: expected a string (quote it if it looks like a number)"],
    ]
    cfg = load(tmp_path, "cluster:\n  redis_url: redis://h\n  secret: sixteen-chars-or-more\n")
    assert cfg.cluster is not None and cfg.cluster.secret is not None
    assert cfg.cluster.secret.get_secret_value() == "sixteen-chars-or-more"
    assert "sixteen-chars-or-more" not in repr(cfg)  # never in a log line or a dump


def test_redact_url_hides_only_the_password() -> None:
    assert redact_url("redis://:pw@h:1/0") == "redis://***@h:1/0"
    assert redact_url("rediss://user:pw@h/0") == "rediss://user:***@h/0"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"


# --------------------------------------------------------------------------- components


def test_components_section(tmp_path: Path) -> None:
    assert load(tmp_path, "hosts: [example.org]\n").components is None
    cfg = load(
        tmp_path,
        """\
        hosts: [example.org]
        components:
          domains:
            gateway.example.org: {secret: "0123456789abcdef0123", name: IRC}
        """,
    )
    assert cfg.components is not None
    assert [(x.address, x.port) for x in cfg.components.listeners] == [("127.0.0.1", 5347)]
    entry = cfg.components.domains["gateway.example.org"]
    assert entry.secret.get_secret_value() == "0123456789abcdef0123"
    assert (entry.name, entry.disco) == ("IRC", True)
    assert "0123456789abcdef0123" not in repr(cfg)  # never in a log line or a dump


def test_component_problems_name_the_line_and_never_the_secret(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """\
        hosts: [example.org]
        components:
          listeners: [{address: 0.0.0.0, port: 5347}]
          domains:
            gateway.example.org: {secret: "tooshort"}
            example.org: {secret: "0123456789abcdef0123"}
            spaced.example.org: {secret: " 0123456789abcdef0123"}
            number.example.org: {secret: 12345678901234567890}
        """,
    )
    assert found == [
        "x.yml:5: components.domains.gateway.example.org.secret: too short: at least 16 "
        "characters (e.g. the output of `openssl rand -hex 16`)",
        "x.yml:7: components.domains.spaced.example.org.secret: has leading or trailing "
        "spaces (a copy-paste slip?)",
        "x.yml:8: components.domains.number.example.org.secret: expected a string (quote it "
        "if it looks like a number)",
    ]
    assert not any("tooshort" in p for p in found)
    assert problems(
        tmp_path,
        """\
        hosts: [example.org]
        components:
          listeners: [{address: 0.0.0.0, port: 5347}]
          domains:
            example.org: {secret: "0123456789abcdef0123"}
        """,
    ) == [
        "x.yml:3: components.listeners[0].address: 0.0.0.0 is not a loopback address: the "
        "component protocol (XEP-0114) is not encrypted; set components.allow_remote: true "
        "if a private network protects it",
    ]
    assert problems(
        tmp_path,
        """\
        hosts: [example.org]
        components:
          domains:
            example.org: {secret: "0123456789abcdef0123"}
        """,
    ) == [
        'x.yml:4: components.domains.example.org: "example.org" is one of the hosts: a '
        "component serves a domain of its own (like gateway.example.org)",
    ]
    assert problems(tmp_path, "components: {domains: {}}\n") == [
        "x.yml:1: components.domains: must list at least 1 item, got 0"
    ]
