"""spec.pooler.paused: the operator PAUSEs and RESUMEs real pooler pods, and says how many are paused.

Pods are real pooler processes whose control ports listen on 127.0.0.2 and 127.0.0.3 (the
Pod objects in the emulated API server carry those podIPs), one of them with two workers;
a pod created during a pause is a third one on 127.0.0.4, started from the ConfigMap's
pause state.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import kopf
import pytest
import yaml
from pgfleet.devtools.fleetlab import FLEET_ROLE, TOKEN, LabPooler, start_fleet_pooler
from pgfleet.devtools.tempdb import TempPostgres
from pgfleet.devtools.testing import run_cmd
from pgfleet.operator import reconcile, traffic
from pgfleet.operator.control import BudgetLoop, Fleet
from pgfleet.operator.observe import ServerObserver

from .conftest import (
    POD_IPS,
    condition_now,
    eventually,
    fleet_objects,
    lab_pgpool,
    pgpool_body,
    pod_object,
    running_operator,
)
from .test_operator_lifecycle import CONFIGMAPS, NS, PGPOOLS

POD_PORT = int(os.environ["PGFLEET_POD_HTTP_PORT"])
log = logging.getLogger(__name__)


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


def traffic_condition(api: Any, reason: str, message: str = "") -> Any:
    return condition_now(api, "TrafficPaused", reason, message)


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
        await api.put_object(PGPOOLS, lab_pgpool(pods_db, pooler={"paused": True}))
        pausing = await eventually(lambda: traffic_condition(api, "Pausing"), what="TrafficPaused=False, Pausing")
        assert pausing["status"] == "False" and pausing["message"].startswith("1/2 pods paused")
        assert "main-a (1 open)" in pausing["message"]
        assert (await pooler_status("127.0.0.2"))["paused"] is True
        await tx.commit()  # the transaction ends; its server closes

        paused = await eventually(lambda: traffic_condition(api, "Paused"), what="TrafficPaused=True")
        assert paused["status"] == "True" and paused["message"].startswith("2/2 pods paused")
        assert api.get(PGPOOLS, NS, "main")["status"]["pausedPods"] == 2
        for ip in ("127.0.0.2", "127.0.0.3"):
            status = await pooler_status(ip)
            assert status["paused"] is True and status["servers"] == 0

        await api.patch_object(PGPOOLS, NS, "main", {"spec": {"pooler": {"paused": False}}})
        serving = await eventually(lambda: traffic_condition(api, "Serving"), what="TrafficPaused=False, Serving")
        assert serving["message"] == "pooler.paused is false: 2 pods serve"
        assert api.get(PGPOOLS, NS, "main")["status"]["pausedPods"] == 0
        for ip in ("127.0.0.2", "127.0.0.3"):
            assert (await pooler_status(ip))["paused"] is False
        assert await client.fetchval("SELECT 7") == 7
    finally:
        await client.close()


async def test_a_pod_created_during_the_pause_serves_nobody_until_resume(
    api: Any, operator: Any, pods_db: TempPostgres, lab_pods: list[LabPooler], tmp_path: Path
) -> None:
    await fleet_objects(api)
    await api.put_object(PGPOOLS, lab_pgpool(pods_db, pooler={"paused": True}))
    await eventually(lambda: traffic_condition(api, "Paused", "2/2 pods paused"), what="the two pods paused")
    config_map = api.get(CONFIGMAPS, NS, "main-config")
    rendered = yaml.safe_load(config_map["data"]["pooler.yaml"])
    assert rendered["start_paused"] is True

    # A pod the Deployment starts now: a pooler from the ConfigMap's pause state, whose first
    # client arrives before its Pod object exists, so before the operator could push anything.
    new = start_fleet_pooler(
        pods_db,
        tmp_path,
        "pod2",
        http_addr="127.0.0.4",
        http_port=POD_PORT,
        floor=2,
        start_paused=rendered["start_paused"],
    )
    try:

        async def first_client() -> int:
            conn = await asyncpg.connect(host="127.0.0.1", port=new.port, user=FLEET_ROLE, database="app", timeout=60)
            try:
                return int(await conn.fetchval("SELECT 42"))
            finally:
                await conn.close()

        held = asyncio.ensure_future(first_client())

        async def arrived() -> bool:
            return bool((await pooler_status("127.0.0.4"))["clients"] == 1)

        await eventually_async(arrived, what="the first client at the new pod")
        state = await pooler_status("127.0.0.4")
        assert state["paused"] is True and state["servers"] == 0 and not held.done()

        await api.put_object("/v1/pods", pod_object("main-c", "127.0.0.4"))
        await eventually(lambda: traffic_condition(api, "Paused", "3/3 pods paused"), what="the new pod counted paused")
        assert not held.done()

        await api.patch_object(PGPOOLS, NS, "main", {"spec": {"pooler": {"paused": False}}})
        assert await asyncio.wait_for(held, 30) == 42  # RESUME serves it
        await eventually(lambda: traffic_condition(api, "Serving", "pooler.paused is false: 3 pods"), what="Serving")
        rendered = yaml.safe_load(api.get(CONFIGMAPS, NS, "main-config")["data"]["pooler.yaml"])
        assert "start_paused" not in rendered  # the default, false: new pods serve
    finally:
        new.stop()


async def eventually_async(check: Any, *, timeout: float = 15.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.05)


def status_between_reconciles(
    loop: BudgetLoop, *, paused: bool, generation: int, observed: int | None = None
) -> tuple[str, str, int] | None:
    """What the budget timer writes of TrafficPaused from the loop's last period (status,
    reason, pausedPods) for PgPool shop/main as given, or None when it writes none."""

    class Loops:
        def report(self, name: str) -> Any:
            assert loop.last is not None
            return loop.last, loop.last.fleets[name]

    body = pgpool_body(pooler={"paused": paused})
    body["metadata"]["generation"] = generation
    body["status"] = {"observedGeneration": generation if observed is None else observed}
    outcome = reconcile.budget_report(Loops(), body)  # type: ignore[arg-type]
    assert outcome is not None  # BudgetEnforced is new to this status in any case
    found = [c for c in outcome.status["conditions"] if c["type"] == traffic.TRAFFIC_PAUSED]
    if not found:
        assert "pausedPods" not in outcome.status
        return None
    return found[0]["status"], found[0]["reason"], outcome.status["pausedPods"]


async def test_the_budget_loop_pauses_a_pod_that_missed_the_pause_within_a_period(
    pods_db: TempPostgres, lab_pods: list[LabPooler]
) -> None:
    """A pod that came up serving during a pause (the kubelet had not updated its ConfigMap
    yet) is paused by the next budget period, with no reconcile; and resumed the same way."""
    loop = BudgetLoop(ServerObserver(pods_db.dsn(), timeout=2), period=3600)
    urls = {pooler.name: pooler.url for pooler in lab_pods}

    async def pods() -> dict[str, str]:
        return urls

    def fleet(paused: bool | None) -> Fleet:
        return Fleet(name="shop/main", token=TOKEN, pods=pods, role=FLEET_ROLE, database="app", paused=paused)

    try:
        loop.set_fleet(fleet(None))  # nothing declared (standalone): the pods' pause is theirs
        await loop.step()
        assert [(await pooler_status(ip))["paused"] for ip in ("127.0.0.2", "127.0.0.3")] == [False, False]
        loop.set_fleet(fleet(True))
        await loop.step()  # one period: both paused (the second with two workers)
        for ip in ("127.0.0.2", "127.0.0.3"):
            assert (await pooler_status(ip))["paused"] is True
        loop.set_fleet(fleet(False))
        resumed = (await loop.step()).fleets["shop/main"].pause
        for ip in ("127.0.0.2", "127.0.0.3"):
            assert (await pooler_status(ip))["paused"] is False
        # What the loop tells TrafficPaused: where the pods stand after its pushes.
        assert resumed is not None
        assert traffic.describe(resumed)[1:] == ("Serving", "pooler.paused is false: 2 pods serve")
        loop.set_fleet(fleet(True))
        paused = (await loop.step()).fleets["shop/main"].pause
        assert paused is not None and paused.wanted and set(paused.paused.values()) == {True}
        # The budget timer writes it, for the spec the reconcile has taken and the loop pushed.
        assert status_between_reconciles(loop, paused=True, generation=2) == ("True", "Paused", 2)
        # Not before the reconcile has taken a new generation, nor from a period that pushed
        # the previous spec (paused now false): a stale Paused never overwrites Serving.
        assert status_between_reconciles(loop, paused=True, generation=2, observed=1) is None
        assert status_between_reconciles(loop, paused=False, generation=2) is None
        # A pod that does not answer is not known to be paused; while serving is wanted it is
        # left out (one starting serves nobody yet; BudgetEnforced names it).
        lab_pods[1].stop()
        lost = (await loop.step()).fleets["shop/main"].pause
        assert lost is not None and traffic.describe(lost)[1] == "PauseNotPushed"
        loop.set_fleet(fleet(False))
        serving = (await loop.step()).fleets["shop/main"].pause
        assert serving is not None
        assert traffic.describe(serving)[1:] == ("Serving", "pooler.paused is false: 1 pods serve")
    finally:
        await loop.close()


# -- the condition between full reconciles -------------------------------------------------------------


@pytest.fixture
async def operator_without_refresh(api: Any, kubeconfig: Any) -> AsyncIterator[Any]:
    """The operator whose full reconcile runs only on a PgPool change (its `refresh` timer, every
    PGFLEET_RECONCILE_INTERVAL, and at first) pushed back by an hour: what the status says between changes
    comes from the budget loop's periods alone."""
    from pgfleet.operator import handlers

    registry = kopf.get_default_registry()._spawning._handlers
    index = next(i for i, h in enumerate(registry) if h.id == "refresh" and h.fn is handlers.refresh)
    original = registry[index]
    registry[index] = dataclasses.replace(original, interval=3600.0, initial_delay=3600.0)
    try:
        kubeconfig(str(api.url))
        async with running_operator(api) as runner:
            yield runner
    finally:
        registry[index] = original


async def test_traffic_paused_follows_the_pods_every_budget_period(
    api: Any, operator_without_refresh: Any, pods_db: TempPostgres, lab_pods: list[LabPooler], tmp_path: Path
) -> None:
    """TrafficPaused and status.pausedPods move with the budget loop's reading of the pods, not
    with the next full reconcile: a transaction in flight ending, a pod going away and a pod
    restarting (serving, from a ConfigMap the kubelet had not refreshed) all show within periods."""
    await fleet_objects(api)
    client = await asyncpg.connect(host="127.0.0.1", port=lab_pods[0].port, user=FLEET_ROLE, database="app")
    try:
        tx = client.transaction()
        await tx.start()
        await client.fetchval("SELECT 1")
        await api.put_object(PGPOOLS, lab_pgpool(pods_db, pooler={"paused": True}))
        await eventually(lambda: traffic_condition(api, "Pausing", "1/2 pods paused"), what="Pausing at the reconcile")
        await tx.commit()  # no PgPool change follows: only the budget loop sees the server close
    finally:
        await client.close()
    paused = await eventually(lambda: traffic_condition(api, "Paused", "2/2 pods paused"), what="Paused by the loop")
    assert paused["status"] == "True" and api.get(PGPOOLS, NS, "main")["status"]["pausedPods"] == 2

    # Pod b goes away: the fleet is no longer known to be paused.
    lab_pods[1].stop()
    gone = await eventually(lambda: traffic_condition(api, "PauseNotPushed", "1/2 pods paused"), what="pod b lost")
    assert gone["status"] == "False" and "main-b" in gone["message"]
    assert api.get(PGPOOLS, NS, "main")["status"]["pausedPods"] == 1

    # It comes back serving (a stale ConfigMap): the loop pauses it and the condition says so.
    again = start_fleet_pooler(
        pods_db, tmp_path, "pod1-again", workers=2, http_addr=POD_IPS[1], http_port=POD_PORT, floor=2
    )
    try:
        await eventually(lambda: traffic_condition(api, "Paused", "2/2 pods paused"), what="pod b paused again")
        assert api.get(PGPOOLS, NS, "main")["status"]["pausedPods"] == 2
        assert (await pooler_status(POD_IPS[1]))["paused"] is True
    finally:
        again.stop()


async def test_switchover_drill_through_the_operator_fails_no_transaction(
    api: Any, operator_without_refresh: Any, pods_db: TempPostgres, lab_pods: list[LabPooler]
) -> None:
    """The drill as a user runs it: under pgbench on both pods (the second with two workers),
    spec.pooler.paused true, wait for TrafficPaused=True, restart PostgreSQL, false: pgbench
    fails no transaction. Between the two changes only the budget loop updates the condition."""
    code, _, err = await run_cmd(
        "pgbench", "-h", pods_db.host, "-p", str(pods_db.port), "-U", "postgres", "-i", "-q", "app"
    )
    assert code == 0, err
    pods_db.sql(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {FLEET_ROLE}", dbname="app")
    await fleet_objects(api)
    await api.put_object(PGPOOLS, lab_pgpool(pods_db))
    await eventually(lambda: traffic_condition(api, "Serving", "pooler.paused is false: 2 pods"), what="Serving")

    def bench(pod: LabPooler) -> asyncio.Future[tuple[int, str, str]]:
        argv = ("-h", "127.0.0.1", "-p", str(pod.port), "-U", FLEET_ROLE, "-c", "4", "-j", "1", "-T", "5", "app")
        return asyncio.ensure_future(run_cmd("pgbench", *argv, timeout=120))

    async def xacts() -> int:
        total = 0
        for ip in POD_IPS:
            pools = (await pooler_status(ip))["pools"]
            total += sum(p["totals"]["xact_count"] for p in pools if p["database"] == "app")
        return total

    async def at_least(count: int) -> bool:
        return await xacts() >= count

    benches = [bench(pod) for pod in lab_pods]
    try:
        await eventually_async(lambda: at_least(100), what="pgbench under way")
        await api.patch_object(PGPOOLS, NS, "main", {"spec": {"pooler": {"paused": True}}})
        await eventually(lambda: traffic_condition(api, "Paused", "2/2 pods paused"), what="TrafficPaused=True")
        paused_at = await xacts()
        await asyncio.to_thread(pods_db.stop, "fast")
        await asyncio.to_thread(pods_db.restart_server)
        assert await xacts() == paused_at  # nothing ran while paused
        await api.patch_object(PGPOOLS, NS, "main", {"spec": {"pooler": {"paused": False}}})
        results = await asyncio.wait_for(asyncio.gather(*benches), 120)
    finally:
        for task in benches:
            task.cancel()
        await asyncio.gather(*benches, return_exceptions=True)
    processed = failed = 0
    for code, out, err in results:
        assert code == 0, out + err
        done = re.search(r"number of transactions actually processed: (\d+)", out)
        lost = re.search(r"number of failed transactions: (\d+)", out)
        assert done and lost, out
        processed, failed = processed + int(done.group(1)), failed + int(lost.group(1))
    assert failed == 0 and await xacts() > paused_at  # traffic went on after RESUME, on the restarted server
    # The drill's figures (the operator's runner holds stdout: logged, shown with --log-cli-level=INFO).
    log.info("operator drill: %d transactions, %d failed; %d before the pause", processed, failed, paused_at)
