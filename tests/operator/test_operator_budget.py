"""The budget loop inside the operator: a PgPool on the emulated API server, its pods real poolers.

Each Pod object points (status.podIP) at a pooler process on 127.0.0.2, .3, .4, all on
the control port the operator is told to use (PGFLEET_POD_HTTP_PORT). PostgreSQL has 47
usable backends; another application comes and goes; a sampler reads pg_stat_activity
every 100 ms.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pgfleet.devtools.fleetlab import (
    FLEET_ROLE,
    TOKEN,
    Crowd,
    CrowdStats,
    Grabber,
    LabPooler,
    Sample,
    Sampler,
    budget_in_force,
    start_fleet_pooler,
)
from pgfleet.devtools.tempdb import TempPostgres
from pgfleet.operator import render
from pgfleet.operator.control import BudgetLoop, FleetReport, PeriodReport
from prometheus_client.parser import text_string_to_metric_families

from .conftest import eventually
from .test_operator_lifecycle import DEPLOYMENTS, EVENTS, NS, PGPOOLS, SECRETS, condition

PODS = "/v1/pods"
POD_PORT = int(os.environ["PGFLEET_POD_HTTP_PORT"])
PERIOD = float(os.environ["PGFLEET_BUDGET_PERIOD"])


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
    trail = Trail(("main",))
    follower = asyncio.create_task(trail.follow())

    def status() -> dict[str, Any]:
        return api.get(PGPOOLS, NS, "main") or {}

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
        # The limits follow demand (busy servers, waiting clients) between periods; 38 over three
        # pods gives the smallest at most 12 and the largest at least 13.
        obj = await eventually(
            lambda: (
                (o := status())["status"]["budget"].get("total") == 38 and o["status"]["budget"].get("perPodMin") and o
            ),
            what="the loop's budget in status",
            timeout=60,
        )
        budget = obj["status"]["budget"]
        assert budget["usable"] == 47 and 1 <= budget["perPodMin"] <= 12 and budget["perPodMax"] >= 13
        assert condition(obj, "BudgetEnforced")["status"] == "True"  # type: ignore[index]
        # The operator exports the same budget for the dashboard.
        seen = await eventually(
            lambda: (m := operator_metrics()).get("pgfleet_operator_budget_backends") == 38 and m,
            what="the budget in the operator's /metrics",
            timeout=30,
        )
        assert seen["pgfleet_operator_usable_backends"] == 47
        assert 1 <= seen["pgfleet_operator_pod_limit_min"] <= 12 and seen["pgfleet_operator_pod_limit_max"] >= 13

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

        # "budget A -> B backends": one of them says the squeeze, to within the step that makes an
        # Event (a tenth, or 2): a last step from 14 to 13 is not announced.
        squeezed_total = int(obj["status"]["budget"]["total"])

        def squeeze_told() -> bool:
            changed = [e["message"].split() for e in api.all(EVENTS, NS) if e.get("reason") == "BudgetChanged"]
            return any(int(w[-2]) - squeezed_total < max(2, int(w[-2]) // 10) for w in changed)

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
        follower.cancel()
        for pooler in poolers:
            await asyncio.to_thread(pooler.stop)
    assert stats.errors == {}, stats.errors  # no 53300, no failed transaction
    assert stats.transactions > 100
    most, budget = check_samples(sampler, trail, ("main",))
    print(f"\nfollowing the database: fleet backends at most {most} against {budget}", file=sys.__stdout__)


# -- more of the invariants, through the operator ---------------------------------------------------

# Every period of every budget loop the operator runs (in a thread of this process), as it ends.
PERIODS: list[PeriodReport] = []


@pytest.fixture(autouse=True)
def record_periods(monkeypatch: pytest.MonkeyPatch) -> None:
    PERIODS.clear()
    step = BudgetLoop.step

    async def recorded(self: BudgetLoop) -> PeriodReport:
        report = await step(self)
        PERIODS.append(report)
        return report

    monkeypatch.setattr(BudgetLoop, "step", recorded)


@dataclass
class Trail:
    """Each PgPool's budget loop reports as they come (the operator runs in this process, a thread)."""

    names: tuple[str, ...]
    # Each PgPool's reports with the start of their period (PeriodReport.started, the loop's
    # clock), every period: when this task reads them, under load, can be much later.
    seen: dict[str, list[tuple[float, FleetReport]]] = field(default_factory=dict)
    servers: list[PeriodReport] = field(default_factory=list)  # every period of their server

    async def follow(self) -> None:
        read = 0
        while True:
            for period in PERIODS[read:]:
                read += 1
                mine = [name for name in self.names if f"{NS}/{name}" in period.fleets]
                for name in mine:
                    self.seen.setdefault(name, []).append((period.started, period.fleets[f"{NS}/{name}"]))
                if mine:
                    self.servers.append(period)
            await asyncio.sleep(0.02)

    def last(self, name: str) -> FleetReport | None:
        reports = self.seen.get(name)
        return reports[-1][1] if reports else None

    def count(self, name: str) -> int:
        return len(self.seen.get(name, ()))

    def budget_at(self, name: str, sample: Sample) -> int:
        """The PgPool's budget in force when `sample` counted, by the loop's own clock (budget_in_force)."""
        budget = budget_in_force([(t, r.budget.budget) for t, r in self.seen[name]], sample)
        assert budget is not None, "a sample before the first period"
        return budget

    async def until(self, name: str, what: Any, *, timeout: float = 60, why: str = "") -> float:
        """Wait for a report of `name` that satisfies `what`; seconds it took."""
        start = time.monotonic()
        await eventually(lambda: (r := self.last(name)) is not None and what(r), timeout=timeout, what=why or name)
        return time.monotonic() - start

    async def periods(self, name: str, count: int) -> None:
        """Wait until `count` more periods have been reported."""
        target = self.count(name) + count
        await eventually(lambda: self.count(name) >= target, timeout=60, what=f"{count} periods of {name}")


async def fleet_secrets(api: Any, *pgpools: str) -> None:
    """The fleet role's credentials, and each PgPool's control-port token (the lab poolers' TOKEN)."""
    secret = {"apiVersion": "v1", "kind": "Secret"}
    await api.put_object(
        SECRETS,
        {
            **secret,
            "metadata": {"name": "fleet-creds", "namespace": NS},
            "stringData": {"username": FLEET_ROLE, "password": "unused"},
        },
    )
    for name in pgpools:
        await api.put_object(
            SECRETS, {**secret, "metadata": {"name": f"{name}-token", "namespace": NS}, "stringData": {"token": TOKEN}}
        )


async def put_pgpool(api: Any, db: TempPostgres, name: str, **spec: Any) -> None:
    database = {"host": db.host, "port": db.port, "dbname": "app", "credentialsSecret": "fleet-creds"}
    await api.put_object(
        PGPOOLS,
        {
            "apiVersion": "pgfleet.io/v1alpha1",
            "kind": "PgPool",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"database": database, **spec},
        },
    )


async def start_pod(api: Any, db: TempPostgres, tmp_path: Path, name: str, ip: str, pgpool: str = "main") -> LabPooler:
    """A real pooler on `ip` at the operator's pod port, and a Running Pod object for it.

    The Pod has a finalizer, so deleting it leaves it terminating (as a pod draining) until
    `remove_pod`.
    """
    pooler = await asyncio.to_thread(start_fleet_pooler, db, tmp_path, name, http_addr=ip, http_port=POD_PORT)
    await api.put_object(
        PODS,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": NS,
                "labels": render.selector_labels(pgpool),
                "finalizers": ["test.pgfleet.io/drain"],
            },
            "spec": {"containers": [{"name": "pooler", "image": "pgfleet:test"}]},
        },
    )
    await api.patch_object(PODS, NS, name, {"status": {"phase": "Running", "podIP": ip}}, status=True)
    return pooler


async def remove_pod(api: Any, name: str) -> None:
    """The pod's containers are gone: the object goes."""
    await api.patch_object(PODS, NS, name, {"metadata": {"finalizers": []}})
    await eventually(lambda: api.get(PODS, NS, name) is None, what=f"pod {name} gone")


async def long_transaction(port: int) -> tuple[asyncpg.Connection, Any]:
    """A client in a transaction through the pooler on `port` (holding a server) until it commits."""
    conn = await asyncpg.connect(host="127.0.0.1", port=port, user="app", database="app", statement_cache_size=0)
    tx = conn.transaction()
    await tx.start()
    await conn.fetchval("SELECT 1")
    return conn, tx


def check_samples(sampler: Sampler, trail: Trail, names: tuple[str, ...]) -> tuple[int, int]:
    """Every sample against the sum of the PgPools' budgets in force then; (most backends, budget then)."""
    first = max(trail.seen[name][0][0] for name in names)
    worst = (0, 0)
    for sample in sampler.since(first):
        budget = sum(trail.budget_at(name, sample) for name in names)
        held = sample.count(FLEET_ROLE)
        near = {
            n: [
                (round(t - sample.at, 2), r.budget.budget, r.limits) for t, r in trail.seen[n] if abs(t - sample.at) < 2
            ]
            for n in names
        }
        assert held <= budget, f"the fleet held {held} backends against a budget of {budget}; periods then {near}"
        if budget and (not worst[1] or held / budget > worst[0] / worst[1]):
            worst = (held, budget)
    return worst


async def test_a_rolling_update_with_surge_stays_in_budget(
    api: Any, operator: Any, labdb: TempPostgres, tmp_path: Path
) -> None:
    """maxSurge 1: a new pod starts beside the old ones, then an old one drains and goes; twice."""
    await fleet_secrets(api, "main")
    await put_pgpool(api, labdb, "main", replicas=2, rollout={"maxSurge": 1}, budget={"maxBackends": 20})
    sampler = Sampler(labdb)
    stats = CrowdStats()
    trail = Trail(("main",))
    follower = asyncio.create_task(trail.follow())
    poolers: dict[str, LabPooler] = {}
    crowds: dict[str, Crowd] = {}

    async def surge(name: str, ip: str) -> None:
        poolers[name] = await start_pod(api, labdb, tmp_path, name, ip)
        crowds[name] = Crowd(poolers[name].port, stats=stats)
        crowds[name].add_steady(12)  # more than a pod's share: clients queue in the poolers

    try:
        await sampler.start()
        await surge("main-a", "127.0.0.2")
        await surge("main-b", "127.0.0.3")
        # Room for one surge pod at the floor (1) is kept: 19 over the two pods.
        await trail.until("main", lambda r: sorted(r.limits.values()) == [9, 10], why="two pods at 9 and 10")
        rollout_start = time.monotonic()
        for old, (new, ip) in (("main-a", ("main-c", "127.0.0.4")), ("main-b", ("main-d", "127.0.0.5"))):
            await surge(new, ip)  # the new pod, at the ConfigMap's floor, beside the old ones
            await trail.until("main", lambda r, new=new: r.limits.get(new, 0) > 1, why=f"{new} raised")
            # The old pod is told to go while some of its clients are in the middle of long
            # transactions: it drains them (holding their servers), then exits.
            long = [await long_transaction(poolers[old].port) for _ in range(4)]
            await api.delete_object(PODS, NS, old)
            await crowds.pop(old).stop()
            await trail.periods("main", 2)
            for conn, tx in long:
                await tx.commit()
                await conn.close()
            await asyncio.to_thread(poolers[old].stop)
            await remove_pod(api, old)
        settle = await trail.until(
            "main",
            lambda r: set(r.limits) == {"main-c", "main-d"} and sum(r.limits.values()) == 19 and not r.unconfirmed,
            why="the new pods at the whole budget",
        )
        rollout = time.monotonic() - rollout_start
    finally:
        for crowd in crowds.values():
            await crowd.stop()
        await sampler.stop()
        follower.cancel()
        for pooler in poolers.values():
            await asyncio.to_thread(pooler.stop)
    most, budget = check_samples(sampler, trail, ("main",))
    assert stats.errors == {}, stats.errors  # no 53300, no failed transaction
    assert stats.transactions > 100
    print(
        f"\nrolling update (maxSurge 1, two pods replaced): fleet backends at most {most} against {budget}; "
        f"{stats.transactions} transactions, failed {stats.failed}; rollout {rollout:.1f} s, "
        f"settled {settle:.2f} s after the last old pod went",
        file=sys.__stdout__,  # the operator's runner holds sys.stdout
    )


async def test_two_pgpools_on_one_server_share_it_through_the_operator(
    api: Any, operator: Any, labdb: TempPostgres, tmp_path: Path
) -> None:
    """Both ask 80% of the server, with the same role: they share it max-min fair, each sees its own backends."""
    await fleet_secrets(api, "a", "b")
    for name, replicas in (("a", 2), ("b", 1)):
        await put_pgpool(
            api, labdb, name, replicas=replicas, rollout={"maxSurge": 0}, budget={"maxBackendsPercent": 80}
        )
    sampler = Sampler(labdb)
    stats = CrowdStats()
    trail = Trail(("a", "b"))
    follower = asyncio.create_task(trail.follow())
    poolers: list[LabPooler] = []
    crowds: list[Crowd] = []
    try:
        await sampler.start()
        for name, ip, pgpool in (("a-0", "127.0.0.2", "a"), ("a-1", "127.0.0.3", "a"), ("b-0", "127.0.0.4", "b")):
            poolers.append(await start_pod(api, labdb, tmp_path, name, ip, pgpool))
            crowds.append(Crowd(poolers[-1].port, stats=stats))
            crowds[-1].add_steady(25)  # more than either PgPool may serve at once
        # 47 usable - the sampler - the observer: 45 shared by two caps of 80% x 47 = 37 each.
        await trail.until("b", lambda r: r.budget.budget == 22 and r.budget.waiting > 0, why="b's share")
        await trail.until("a", lambda r: r.budget.budget == 23 and r.budget.waiting > 0, why="a's share")
        # Each PgPool's status counts its own backends (by PID), not the role's. A status written in the
        # period right after a squeeze may still show the backends its pods are closing (the samples
        # below hold every moment to the budget of the period before or after it).
        statuses = await eventually(
            lambda: (
                (s := {n: (api.get(PGPOOLS, NS, n) or {}).get("status", {}).get("budget", {}) for n in "ab"})
                and all(15 <= (s[n].get("fleetBackends") or 0) <= (s[n].get("total") or 0) for n in "ab")
                and s
            ),
            what="both PgPools' own backends in status, within their budgets",
            timeout=30,
        )
        assert statuses["a"]["total"] + statuses["b"]["total"] <= statuses["a"]["usable"] - statuses["a"]["others"]
        squeezed = condition(api.get(PGPOOLS, NS, "a"), "BudgetEnforced")
        assert squeezed is not None and squeezed["reason"] == "Squeezed", squeezed
    finally:
        for crowd in crowds:
            await crowd.stop()
        await sampler.stop()
        follower.cancel()
        for pooler in poolers:
            await asyncio.to_thread(pooler.stop)
    # Every period: the two budgets within what the server leaves them, in equal shares.
    for period in trail.servers:
        fleets = [period.fleets[f"{NS}/{n}"] for n in "ab" if f"{NS}/{n}" in period.fleets]
        assert period.server.usable is not None and period.server.others is not None
        assert sum(f.budget.budget for f in fleets) <= period.server.usable - period.server.others
        if len(fleets) == 2:
            assert 0 <= fleets[0].budget.budget - fleets[1].budget.budget <= 1
    most, budget = check_samples(sampler, trail, ("a", "b"))
    assert stats.errors == {}, stats.errors  # no 53300, no failed transaction
    print(
        f"\ntwo PgPools at 80% each: fleet backends at most {most} against {budget} (both budgets); "
        f"{stats.transactions} transactions, failed {stats.failed}",
        file=sys.__stdout__,
    )


async def test_the_deployment_does_not_grow_while_a_pod_has_not_confirmed_its_limit(
    api: Any, operator: Any, labdb: TempPostgres, tmp_path: Path
) -> None:
    await fleet_secrets(api, "main")
    await put_pgpool(api, labdb, "main", replicas=1, rollout={"maxSurge": 0}, budget={"maxBackends": 12})
    trail = Trail(("main",))
    follower = asyncio.create_task(trail.follow())
    pooler = await start_pod(api, labdb, tmp_path, "main-a", "127.0.0.2")
    try:
        await trail.until("main", lambda r: r.limits == {"main-a": 12}, why="the pod at the whole budget")
        await eventually(lambda: (api.get(DEPLOYMENTS, NS, "main") or {}).get("spec", {}).get("replicas") == 1)
        # The pod stops answering: it counts at the 12 it last confirmed, whatever it holds now.
        await asyncio.to_thread(pooler.stop)
        await eventually(
            lambda: (c := condition(api.get(PGPOOLS, NS, "main"), "BudgetEnforced")) and c["reason"] == "Unconfirmed",
            what="BudgetEnforced=False Unconfirmed",
        )
        # Scaled up meanwhile: the reconcile of the new generation holds the Deployment where it is.
        grown = await api.patch_object(PGPOOLS, NS, "main", {"spec": {"replicas": 3}})
        generation = grown["metadata"]["generation"]
        await eventually(
            lambda: (api.get(PGPOOLS, NS, "main") or {}).get("status", {}).get("observedGeneration") == generation,
            what="the scale-up reconciled",
        )
        await trail.periods("main", 2)
        observed = (api.get(PGPOOLS, NS, "main") or {})["status"]["observedGeneration"]
        assert observed == generation
        assert api.get(DEPLOYMENTS, NS, "main")["spec"]["replicas"] == 1
        # It answers again (a new process at the ConfigMap's floor): confirmed, the Deployment grows.
        pooler = await asyncio.to_thread(
            start_fleet_pooler, labdb, tmp_path, "main-a", http_addr="127.0.0.2", http_port=POD_PORT
        )
        started = time.monotonic()
        await eventually(
            lambda: (api.get(DEPLOYMENTS, NS, "main") or {}).get("spec", {}).get("replicas") == 3,
            what="the Deployment at 3 replicas",
            timeout=60,
        )
        grew = time.monotonic() - started
    finally:
        follower.cancel()
        await asyncio.to_thread(pooler.stop)
    print(f"\nthe Deployment grew {grew:.2f} s after the pod answered again", file=sys.__stdout__)
