"""The budget loop inside the operator: a PgPool on the emulated API server, its pods real poolers.

Each Pod object points (status.podIP) at a pooler process on 127.0.0.2, .3, .4, all on
the control port the operator is told to use (PGFLEET_POD_HTTP_PORT). PostgreSQL has 47
usable backends; another application comes and goes; a sampler reads pg_stat_activity
every 100 ms.
"""

from __future__ import annotations

import asyncio
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

from pgfleet.devtools.fleetlab import FLEET_ROLE, Crowd, CrowdStats, Grabber, Sampler, start_fleet_pooler
from pgfleet.operator import render
from prometheus_client.parser import text_string_to_metric_families

from .conftest import eventually
from .test_operator_lifecycle import EVENTS, NS, PGPOOLS, SECRETS, condition

PODS = "/v1/pods"


def operator_metrics() -> dict[str, float]:
    """The running operator's /metrics for PgPool main: metric name -> value."""
    url = f"http://127.0.0.1:{os.environ['PGFLEET_OPERATOR_METRICS_PORT']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.labels.get("namespace") == NS and s.labels.get("pgpool") == "main"
    }


async def test_the_operator_follows_the_database_with_real_poolers(
    api: Any, operator: Any, labdb: Any, tmp_path: Path
) -> None:
    port = int(os.environ["PGFLEET_POD_HTTP_PORT"])
    await api.put_object(
        SECRETS,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "fleet-creds", "namespace": NS},
            "stringData": {"username": FLEET_ROLE, "password": "unused"},
        },
    )
    await api.put_object(
        PGPOOLS,
        {
            "apiVersion": "pgfleet.io/v1alpha1",
            "kind": "PgPool",
            "metadata": {"name": "main", "namespace": NS},
            "spec": {
                "database": {
                    "host": labdb.host,
                    "port": labdb.port,
                    "dbname": "app",
                    "credentialsSecret": "fleet-creds",
                },
                "replicas": 3,
                "rollout": {"maxSurge": 0},
                "budget": {"maxBackends": 40, "reserve": 2},
            },
        },
    )
    secret = await eventually(lambda: api.get(SECRETS, NS, "main-token"), what="the token Secret")
    (tmp_path / "token").write_text(secret["stringData"]["token"])
    poolers = [
        await asyncio.to_thread(
            start_fleet_pooler, labdb, tmp_path, f"pod{i}", http_addr=f"127.0.0.{i + 2}", http_port=port
        )
        for i in range(3)
    ]
    sampler = Sampler(labdb)
    stats = CrowdStats()
    crowds = [Crowd(p.port, stats=stats) for p in poolers]
    grabber = Grabber(labdb)
    totals: list[tuple[float, int]] = []

    def status() -> dict[str, Any]:
        return api.get(PGPOOLS, NS, "main") or {}

    async def record_budgets() -> None:
        # The operator runs in this process (a thread): read its loop's budget as it moves.
        from pgfleet.operator.handlers import runtime

        while True:
            loops = runtime.loops
            seen = loops.report(f"{NS}/main") if loops is not None else None
            if seen is not None and (not totals or totals[-1][1] != seen[1].budget.budget):
                totals.append((time.monotonic(), seen[1].budget.budget))
            await asyncio.sleep(0.02)

    recorder = asyncio.create_task(record_budgets())

    try:
        for i, pooler in enumerate(poolers):
            await api.put_object(
                PODS,
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": f"main-{i}", "namespace": NS, "labels": render.selector_labels("main")},
                    "spec": {"containers": [{"name": "pooler", "image": "pgfleet:test"}]},
                },
            )
            await api.patch_object(
                PODS, NS, f"main-{i}", {"status": {"phase": "Running", "podIP": pooler.http_addr}}, status=True
            )
        await sampler.start()
        for crowd in crowds:
            crowd.add_steady(4)
        # 47 usable - the sampler - the observer - reserve 2 leaves 43: the spec's 40 - 2 holds.
        obj = await eventually(
            lambda: (o := status())["status"]["budget"].get("perPodMin") == 12 and o,
            what="the loop's budget in status",
            timeout=60,
        )
        budget = obj["status"]["budget"]
        assert budget["total"] == 38 and budget["usable"] == 47 and budget["perPodMax"] == 13
        assert condition(obj, "BudgetEnforced")["status"] == "True"  # type: ignore[index]
        # The operator exports the same budget for the dashboard.
        seen = await eventually(
            lambda: (m := operator_metrics()).get("pgfleet_operator_pod_limit_min") == 12 and m,
            what="the budget in the operator's /metrics",
            timeout=30,
        )
        assert seen["pgfleet_operator_budget_backends"] == 38 and seen["pgfleet_operator_usable_backends"] == 47
        assert seen["pgfleet_operator_pod_limit_min"] == 12 and seen["pgfleet_operator_pod_limit_max"] == 13

        # Another application takes 30 backends: squeezed, with a Warning naming others' backends.
        assert await grabber.grab(30, time.monotonic() + 60) == 30  # generous: a loaded machine
        obj = await eventually(
            lambda: (o := status())["status"]["budget"]["total"] <= 47 - 31 - 1 - 2 and o,
            what="the squeeze",
            timeout=60,
        )
        for crowd in crowds:
            crowd.add_steady(8)
        squeezed = await eventually(
            lambda: (c := condition(status(), "BudgetEnforced")) and c["reason"] == "Squeezed" and c,
            what="BudgetEnforced=False Squeezed",
            timeout=60,
        )
        assert squeezed["status"] == "False" and "others hold 31 backends" in squeezed["message"]
        others = await eventually(
            lambda: (m := operator_metrics()).get("pgfleet_operator_others_backends", 0) >= 31 and m,
            what="others' backends in the operator's /metrics",
            timeout=30,
        )
        assert others["pgfleet_operator_budget_backends"] <= 47 - 31 - 1 - 2
        await eventually(
            lambda: [e for e in api.all(EVENTS, NS) if e.get("reason") == "Squeezed"], what="a Squeezed Event"
        )

        # "budget A -> B backends": one of them says the squeeze.
        def squeeze_told() -> bool:
            changed = [e["message"].split() for e in api.all(EVENTS, NS) if e.get("reason") == "BudgetChanged"]
            return any(int(words[-2]) <= 13 for words in changed)

        await eventually(squeeze_told, what="a BudgetChanged Event down to the squeeze")
        # The database is all but full, yet the loop's kept connection still sees it.
        reachable = condition(status(), "DatabaseReachable")
        assert reachable and reachable["status"] == "True" and "of others" in reachable["message"]

        # It lets go: the fleet grows back to its spec.
        await grabber.release()
        await eventually(lambda: status()["status"]["budget"]["total"] == 38, what="the budget back", timeout=60)
        await eventually(
            lambda: (c := condition(status(), "BudgetEnforced")) and c["status"] == "True",
            what="BudgetEnforced=True",
            timeout=60,
        )
    finally:
        for crowd in crowds:
            await crowd.stop()
        await grabber.release()
        await sampler.stop()
        recorder.cancel()
        for pooler in poolers:
            await asyncio.to_thread(pooler.stop)
    assert stats.errors == {}, stats.errors  # no 53300, no failed transaction
    assert stats.transactions > 100
    # Every sample against the loop's budget in force then (the larger of the one before
    # and the one after: a change takes a push to reach the pods).
    first = totals[0][0]
    for sample in sampler.since(first):
        before = [total for at, total in totals if at <= sample.at][-1:]
        after = [total for at, total in totals if at > sample.at][:1]
        assert sample.count(FLEET_ROLE) <= max(before + after), (sample, before, after)
