"""The Grafana dashboard in docs/ against what a node really exports: a panel over a
metric no node has (a typo, a renamed metric) stays empty without a word."""

from __future__ import annotations

import json
import re
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from xmppd.adminapi import read_token
from xmppd.server import Server

DASHBOARD = Path(__file__).parents[2] / "docs" / "grafana-xmppd.json"

# PromQL words that are not metrics (functions are told by the "(" after them).
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
             "and", "or", "unless"}


def metrics_of(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)  # label matchers, range selectors
    expr = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # label lists
    names = re.findall(r"(?<![\w$.])([a-zA-Z_:][\w:]*)\b(?!\s*\()", expr)
    return set(names) - _KEYWORDS


def graphed() -> dict[str, set[str]]:
    """Each panel's title -> the metrics its queries read."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return {p["title"]: set().union(*(metrics_of(t["expr"]) for t in p["targets"])) for p in panels}


async def exported(server: Server) -> set[str]:
    """The metric names on the node's /metrics, a family with no sample yet included (a
    counter by reason before the first one)."""
    headers = {"Authorization": f"Bearer {read_token(server.config.data_dir)}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(f"{server.admin.url}/metrics") as response:
            assert response.status == 200
            text = await response.text()
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names


def not_exported(names: set[str], panels: dict[str, set[str]]) -> dict[str, set[str]]:
    """The panels that read a metric not in `names`, with those metrics."""
    return {title: used - names for title, used in panels.items() if used - names}
