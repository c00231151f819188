"""Stateless nodes that share their sessions through Redis (docs/cluster.md)."""

from xmppd.cluster.directory import ClusterDirectory, RemoteTransport
from xmppd.cluster.node import Cluster, ClusterUnavailable

__all__ = ["Cluster", "ClusterDirectory", "ClusterUnavailable", "RemoteTransport"]
