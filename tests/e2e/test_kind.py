"""The whole user path on a real cluster: deploy, apply the example, connect, scale, delete.

The tests run in file order and build on each other, as a user's session would.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.kind, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
NS = "pgfleet-demo"


def pgpool(cluster: Any) -> dict[str, Any]:
    return dict(json.loads(cluster.kubectl("-n", NS, "get", "pgpool", "app-pool", "-o", "json")))


def wait_for(check: Any, *, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:  # the object may not exist yet
            last = exc
        else:
            if last:
                return last
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def test_example_becomes_ready(cluster: Any) -> None:
    cluster.kubectl("apply", "-k", str(REPO / "deploy" / "examples"))
    cluster.kubectl("-n", NS, "rollout", "status", "deployment/postgres", "--timeout=300s")
    cluster.kubectl("-n", NS, "wait", "pgpool/app-pool", "--for=condition=Ready", "--timeout=300s")
    status = pgpool(cluster)["status"]
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {"Ready": "True", "DatabaseReachable": "True", "BudgetEnforced": "True"}
    # min(50, 60 % of 97 usable backends) - 5 reserve: the budget loop's, split over the 2 pods
    # (room for 1 surge pod at the floor kept)
    budget = status["budget"]
    assert budget == {**budget, "total": 45, "usable": 97, "maxConnections": 100}
    assert 1 <= budget["perPodMin"] <= budget["perPodMax"] and budget["perPodMin"] + budget["perPodMax"] <= 44


def test_kubectl_get_pgpools_shows_the_columns(cluster: Any) -> None:
    table = cluster.kubectl("-n", NS, "get", "pgpools")
    assert table.split()[:8] == ["NAME", "MODE", "READY", "REPLICAS", "BUDGET", "BACKENDS", "CLIENTS", "AGE"]
    assert "app-pool" in cluster.kubectl("-n", NS, "get", "pgfleet")  # the category


def test_connect_through_the_service(cluster: Any) -> None:
    import asyncpg

    async def query(port: int) -> Any:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=port, user="shop", password="shop-demo-password", database="app", timeout=10
        )
        try:
            return await conn.fetchval("select current_user")
        finally:
            await conn.close()

    with cluster.port_forward("service/app-pool", 5432, "-n", NS) as port:
        # The pooler logs in to PostgreSQL as the credentials user, whoever the client is.
        assert asyncio.run(query(port)) == "app"
    # The example application reaches the database through the <name>-app Secret.
    wait_for(
        lambda: "app" in cluster.kubectl("-n", NS, "logs", "deployment/demo-app", "--tail=5"),
        timeout=180,
        what="the demo app to query through the pooler",
    )


def test_scale_pgpool(cluster: Any) -> None:
    cluster.kubectl("-n", NS, "scale", "pgpool/app-pool", "--replicas=3")
    wait_for(
        lambda: pgpool(cluster)["status"].get("readyReplicas") == 3,
        timeout=300,
        what="3 ready pooler pods",
    )
    # Scaling never moves the budget: the same 45 backends over more pods.
    wait_for(
        lambda: (b := pgpool(cluster)["status"]["budget"])["total"] == 45 and 3 * b["perPodMin"] <= 44,
        timeout=60,
        what="the budget split over 3 pods",
    )
    dep = json.loads(cluster.kubectl("-n", NS, "get", "deployment", "app-pool", "-o", "json"))
    assert dep["spec"]["replicas"] == 3


def test_delete_removes_the_children(cluster: Any) -> None:
    cluster.kubectl("-n", NS, "delete", "pgpool", "app-pool", "--wait=true", "--timeout=120s")
    for kind, name in [("deployment", "app-pool"), ("service", "app-pool"), ("configmap", "app-pool-config")]:
        wait_for(
            lambda kind=kind, name=name: (
                cluster.kubectl("-n", NS, "get", kind, name, "--ignore-not-found").strip() == ""
            ),
            timeout=120,
            what=f"{kind}/{name} to be garbage-collected",
        )
