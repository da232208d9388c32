"""spec.pooler.paused: the operator PAUSEs and RESUMEs real pooler pods, and says how many are paused.

Pods are real pooler processes whose control ports listen on 127.0.0.2 and 127.0.0.3 (the
Pod objects in the emulated API server carry those podIPs), one of them with two workers.
"""

from __future__ import annotations

import os
from typing import Any

import aiohttp
import asyncpg
from pgfleet.devtools.fleetlab import FLEET_ROLE, LabPooler
from pgfleet.devtools.tempdb import TempPostgres
from pgfleet.operator import traffic

from .conftest import eventually, fleet_objects
from .test_operator_lifecycle import NS, PGPOOLS, condition

POD_PORT = int(os.environ["PGFLEET_POD_HTTP_PORT"])


# -- the condition, as data ----------------------------------------------------------------------------


def test_the_condition_counts_pods_without_servers() -> None:
    report = traffic.PauseReport(wanted=True, servers={"a": 0, "b": 2}, paused={"a": True, "b": True})
    assert traffic.describe(report) == (
        False,
        "Pausing",
        "1/2 pods paused; waiting for transactions in flight to end on b (2 open)",
    )
    done = traffic.PauseReport(wanted=True, servers={"a": 0, "b": 0}, paused={"a": True, "b": True})
    assert traffic.describe(done)[:2] == (True, "Paused") and "2/2 pods paused" in traffic.describe(done)[2]
    failed = traffic.PauseReport(wanted=True, servers={"a": 0}, paused={"a": True}, failed={"b": "HTTP 401: no"})
    assert traffic.describe(failed) == (
        False,
        "PauseNotPushed",
        "1/2 pods paused; pods that did not take the pause: b: HTTP 401: no",
    )
    serving = traffic.PauseReport(wanted=False, servers={"a": 3}, paused={"a": False})
    assert traffic.describe(serving) == (False, "Serving", "pooler.paused is false: 1 pods serve")
    by_hand = traffic.PauseReport(wanted=False, servers={"a": 0}, paused={"a": True})
    assert traffic.describe(by_hand)[1] == "Resuming"
    assert traffic.describe(traffic.PauseReport(wanted=True)) == (
        True,
        "Paused",
        "0/0 pods paused: new transactions wait in the queue, no server connection is open",
    )


# -- the operator against real poolers -----------------------------------------------------------------


async def pooler_status(ip: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"http://{ip}:{POD_PORT}/status") as response:
        return dict(await response.json())


async def test_pooler_paused_pauses_every_pod_and_false_resumes(
    api: Any, operator: Any, pods_db: TempPostgres, lab_pods: list[LabPooler]
) -> None:
    # The control-port token the operator keeps for this PgPool is the one the poolers were given.
    await fleet_objects(api)
    pods = lab_pods
    # A transaction in flight on pod a: the pause waits for it.
    client = await asyncpg.connect(host="127.0.0.1", port=pods[0].port, user=FLEET_ROLE, database="app")
    try:
        tx = client.transaction()
        await tx.start()
        await client.fetchval("SELECT 1")
        spec = {
            "database": {"host": pods_db.host, "port": pods_db.port, "dbname": "app", "credentialsSecret": "db-creds"},
            "replicas": 2,
            "budget": {"maxBackends": 20},
            "pooler": {"paused": True},
        }
        await api.put_object(
            PGPOOLS,
            {
                "apiVersion": "pgfleet.io/v1alpha1",
                "kind": "PgPool",
                "metadata": {"name": "main", "namespace": NS},
                "spec": spec,
            },
        )

        def traffic_condition(reason: str) -> Any:
            cond = condition(api.get(PGPOOLS, NS, "main"), "TrafficPaused")
            return cond if cond and cond["reason"] == reason else None

        pausing = await eventually(lambda: traffic_condition("Pausing"), what="TrafficPaused=False, Pausing")
        assert pausing["status"] == "False" and pausing["message"].startswith("1/2 pods paused")
        assert "main-a (1 open)" in pausing["message"]
        assert (await pooler_status("127.0.0.2"))["paused"] is True
        await tx.commit()  # the transaction ends; its server closes

        paused = await eventually(lambda: traffic_condition("Paused"), what="TrafficPaused=True")
        assert paused["status"] == "True" and paused["message"].startswith("2/2 pods paused")
        assert api.get(PGPOOLS, NS, "main")["status"]["pausedPods"] == 2
        for ip in ("127.0.0.2", "127.0.0.3"):
            status = await pooler_status(ip)
            assert status["paused"] is True and status["servers"] == 0

        await api.patch_object(PGPOOLS, NS, "main", {"spec": {"pooler": {"paused": False}}})
        serving = await eventually(lambda: traffic_condition("Serving"), what="TrafficPaused=False, Serving")
        assert serving["message"] == "pooler.paused is false: 2 pods serve"
        assert api.get(PGPOOLS, NS, "main")["status"]["pausedPods"] == 0
        for ip in ("127.0.0.2", "127.0.0.3"):
            assert (await pooler_status(ip))["paused"] is False
        assert await client.fetchval("SELECT 7") == 7
    finally:
        await client.close()
