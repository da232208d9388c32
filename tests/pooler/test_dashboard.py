"""deploy/grafana/pgfleet-dashboard.json is built on metric names the pooler really exports.

The budget panels' pgfleet_operator_* names are the operator's: tests/operator/test_operator_metrics.py.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import asyncpg
from pgfleet.devtools.testing import wait_until
from pgfleet.pooler.metrics import make_registry
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import StartPooler

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "pgfleet-dashboard.json"
METRIC = re.compile(r"\b(?:pgbouncer|pgfleet)_[a-z0-9_]+\b")


def dashboard_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    exprs += [str(var.get("query")) for var in dashboard["templating"]["list"]]
    return {name for expr in exprs for name in METRIC.findall(expr)}


async def test_every_metric_the_dashboard_uses_is_exported(start_pooler: StartPooler) -> None:
    pooler = await start_pooler(auth_type="trust", default_pool_size=1)
    registry = make_registry(pooler)  # as the HTTP port makes it at start: it observes waits from then on
    conn = await asyncpg.connect(host="127.0.0.1", port=pooler.port, user="postgres", database="app")
    other = await asyncpg.connect(host="127.0.0.1", port=pooler.port, user="postgres", database="app")
    try:
        assert await conn.fetchval("SELECT $1::int", 1) == 1  # a pool, a transaction, a prepared statement
        # A client that waits for the one server: the wait histogram has samples.
        tx = conn.transaction()
        await tx.start()
        await conn.fetchval("SELECT 1")
        waiting = asyncio.ensure_future(other.fetchval("SELECT 2"))
        await wait_until(lambda: pooler.pools[("app", "postgres")].waiting)
        await tx.commit()
        assert await waiting == 2
        exposition = generate_latest(registry).decode()
    finally:
        await conn.close()
        await other.close()
    exported = {sample.name for family in text_string_to_metric_families(exposition) for sample in family.samples}
    used = {name for name in dashboard_metrics() if not name.startswith("pgfleet_operator_")}
    assert len(used) >= 15, used  # the check sees the dashboard's queries
    assert used <= exported, sorted(used - exported)
    # The budget's side of it: backends held, the limit pushed, clients waiting.
    assert {"pgfleet_pool_backends", "pgfleet_pool_server_limit", "pgfleet_pool_clients_queued"} <= used
