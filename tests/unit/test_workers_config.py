"""config/cluster.yml, the worked example, loads; and what --workers asks of a config."""

from __future__ import annotations

from pathlib import Path

import pytest

from xmppd.cli.workers import worker_config, worker_problems
from xmppd.config import load_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER_FILE = REPO / "config" / "cluster.yml"


def test_the_cluster_example_loads_and_can_run_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(CLUSTER_FILE.parent)
    cfg = load_config(CLUSTER_FILE)
    assert cfg.cluster is not None
    assert cfg.cluster.redis_url == "redis://:change-me@10.0.0.5:6379/0"
    assert cfg.cluster.node_name == "xmpp1"
    assert cfg.storage.items.backend == "dynamodb"
    assert cfg.storage.blobs.backend == "s3"
    assert cfg.storage.cache.backend == "memcached"
    assert worker_problems(cfg, 2) == []
    second = worker_config(cfg, 2, "xmpp1-2")
    assert second.cluster is not None and second.cluster.node_name == "xmpp1-2"
    assert (second.admin.port, cfg.admin.port) == (5291, 5290)
    assert second.source is cfg.source


def test_workers_without_a_cluster_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x.yml"
    path.write_text("hosts: [localhost]\nlisteners:\n  - {type: starttls, address: 127.0.0.1, "
                    "port: 0}\nadmin: {port: 0}\n")
    cfg = load_config(path)
    assert worker_problems(cfg, 0) == [
        "xmppd: --workers must be 1 or more, got 0",
        f"{path}:1: cluster: --workers 0 needs a cluster section (at least cluster.redis_url): "
        "each worker is a node of the cluster, and the workers share their sessions through "
        "its Redis",
        f"{path}:3: listeners[0].port: must be a fixed port with --workers: every worker "
        "binds the same port",
    ]
    path.write_text(path.read_text() + "cluster: {redis_url: 'redis://127.0.0.1:1/0'}\n")
    # admin.port 0 (any free port) stays 0 for every worker
    assert worker_config(load_config(path), 3, "n-3").admin.port == 0
