"""spec.autoscaling: the decision as data, then the operator scaling real pooler pods from their clients."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from pgfleet.devtools.fleetlab import FLEET_ROLE, Crowd, LabPooler, Sample, Sampler
from pgfleet.devtools.tempdb import TempPostgres
from pgfleet.operator.autoscale import Bounds, Recommendation, budget_replicas, decide

from .conftest import condition_now, eventually, fleet_objects, lab_pgpool
from .crdcheck import admit
from .test_operator_lifecycle import DEPLOYMENTS, NS, PGPOOLS


class PodBackends(Sampler):
    """pg_stat_activity every 100 ms: the backends of the fleet's role that the pods hold (the
    operator's own probe and budget observer log in as that role too, under their own names)."""

    async def _run(self) -> None:
        while True:
            count = await self._conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND usename = $1"
                " AND application_name NOT IN ('pgfleet-operator', 'pgfleet-budget')",
                FLEET_ROLE,
            )
            self.samples.append(Sample(time.monotonic(), {FLEET_ROLE: int(count)}))
            await asyncio.sleep(self.interval)


BOUNDS = Bounds(min_replicas=1, max_replicas=8, target_clients_per_replica=20, stabilization_seconds=60)


def step(
    current: int, clients: int | None, *, history: tuple[Recommendation, ...] = (), now: float = 1000.0, **kw: Any
) -> Any:
    args: dict[str, Any] = {"complete": True, "bounds": BOUNDS, "budget_cap": None, **kw}
    return decide(current=current, clients=clients, history=history, now=now, **args)


# -- the decision, as data -----------------------------------------------------------------------------


def test_up_at_once_within_bounds() -> None:
    assert step(2, 100).replicas == 5
    assert step(2, 101).replicas == 6  # ceil
    crowd = step(2, 1000)
    assert (crowd.replicas, crowd.wanted, crowd.limited) == (8, 50, "TooManyReplicas")
    assert "maxReplicas is 8" in crowd.message and "up from 2 to 8" in crowd.message


def test_down_only_after_the_window() -> None:
    # A crowd at t=1000 recommended 5; at t=1030 it has gone: the window still remembers 5.
    history = (Recommendation(1000.0, 5),)
    quiet = step(5, 0, history=history, now=1030.0)
    assert quiet.replicas == 5 and quiet.recommendation == 1 and quiet.limited == "TooFewReplicas"
    assert "kept for the scale-down window" in quiet.message
    # At t=1061 the 5 is older than the window; the quiet recommendations since are all 1.
    later = step(5, 0, history=quiet.history, now=1061.0)
    assert later.replicas == 1 and "down from 5 to 1" in later.message
    # Down in steps: only as far as the highest recommendation still in the window.
    history = (Recommendation(1000.0, 6), Recommendation(1040.0, 3))
    assert step(6, 10, history=history, now=1070.0).replicas == 3


def test_no_history_means_no_scale_down_yet() -> None:
    # The operator just started (or autoscaling was just turned on): the window starts now.
    first = step(6, 0)
    assert first.replicas == 6
    assert [r.replicas for r in first.history] == [6, 1]
    assert step(6, 0, history=first.history, now=1000.0 + 61).replicas == 1


def test_budget_floor_caps_the_count_and_says_so() -> None:
    # 10 backends, 2 workers per pod (each needs one), maxSurge 1: 5 pods at once, so 4 replicas.
    cap = budget_replicas(10, workers=2, max_surge=1)
    assert cap == 4
    capped = step(2, 200, budget_cap=cap)
    assert (capped.replicas, capped.limited) == (4, "BudgetFloor")
    assert "at most 4 replicas" in capped.message
    # A budget that shrinks applies at once, window or not.
    assert step(6, 200, history=(Recommendation(990.0, 6),), budget_cap=cap).replicas == 4
    assert budget_replicas(None, workers=1, max_surge=1) is None


def test_a_partial_count_only_scales_up() -> None:
    # One pod did not answer: the clients counted are a floor, so nothing shrinks on them.
    assert step(5, 10, complete=False, history=(Recommendation(0.0, 5),)).replicas == 5
    assert step(2, 100, complete=False).replicas == 5


def test_nobody_told_holds_still() -> None:
    held = step(3, None)
    assert held.replicas == 3 and held.message == "no pod reported its clients yet"


def test_the_crd_checks_the_bounds() -> None:
    body = {
        "apiVersion": "pgfleet.io/v1alpha1",
        "kind": "PgPool",
        "metadata": {"name": "a", "namespace": "b"},
        "spec": {
            "database": {"host": "h", "dbname": "d", "credentialsSecret": "s"},
            "budget": {"maxBackends": 40},
            "autoscaling": {"minReplicas": 5, "maxReplicas": 3, "targetClientsPerReplica": 50},
        },
    }
    stored, errors = admit(body)
    assert errors == [".spec.autoscaling: autoscaling.minReplicas must not exceed autoscaling.maxReplicas"]
    body["spec"]["autoscaling"] = {"maxReplicas": 3, "targetClientsPerReplica": 50}
    stored, errors = admit(body)
    assert errors == []
    assert stored["spec"]["autoscaling"] == {
        "minReplicas": 1,
        "maxReplicas": 3,
        "targetClientsPerReplica": 50,
        "scaleDownStabilizationSeconds": 300,
    }
    body["spec"]["autoscaling"] = {"maxReplicas": 3}
    assert any("targetClientsPerReplica" in e for e in admit(body)[1])


# -- the operator, real poolers as pods, a crowd that comes and goes -------------------------------------


async def test_a_crowd_grows_the_fleet_within_bounds_and_budget_then_it_shrinks_after_the_window(
    api: Any, operator: Any, pods_db: TempPostgres, lab_pods: list[LabPooler]
) -> None:
    await fleet_objects(api)
    window = 3
    budget = 5  # with maxSurge 1 and one worker per pod: at most 4 replicas get their floor
    spec = {
        "replicas": 1,
        "budget": {"maxBackends": budget},
        "autoscaling": {
            "minReplicas": 1,
            "maxReplicas": 6,
            "targetClientsPerReplica": 10,
            "scaleDownStabilizationSeconds": window,
        },
    }
    sampler = PodBackends(pods_db)
    await sampler.start()
    timeline: list[tuple[float, int, int]] = []  # (seconds since start, spec.replicas, Deployment replicas)
    started = time.monotonic()

    async def watch() -> None:
        while True:
            obj = api.get(PGPOOLS, NS, "main") or {}
            deployment = api.get(DEPLOYMENTS, NS, "main") or {}
            point = (int(obj.get("spec", {}).get("replicas", -1)), int(deployment.get("spec", {}).get("replicas", -1)))
            if not timeline or timeline[-1][1:] != point:
                timeline.append((round(time.monotonic() - started, 2), *point))
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    crowds = [Crowd(pod.port) for pod in lab_pods]
    try:
        await api.put_object(PGPOOLS, lab_pgpool(pods_db, **spec))

        def scaling(reason: str) -> Any:
            return condition_now(api, "ScalingLimited", reason)

        # No clients: minReplicas.
        await eventually(lambda: scaling("TooFewReplicas"), what="ScalingLimited=TooFewReplicas with no clients")
        assert api.get(PGPOOLS, NS, "main")["spec"]["replicas"] == 1

        # A crowd of 60 wants 6 pods; the budget gives a floor to 4 (+1 surge): 4, and it says so.
        for crowd in crowds:
            crowd.add_steady(30)
        arrived = time.monotonic()
        limited = await eventually(lambda: scaling("BudgetFloor"), timeout=30, what="ScalingLimited=BudgetFloor")
        assert limited["status"] == "True" and "at most 4 replicas" in limited["message"]
        await eventually(
            lambda: (api.get(DEPLOYMENTS, NS, "main") or {}).get("spec", {}).get("replicas") == 4,
            timeout=30,
            what="the Deployment at 4 replicas",
        )
        status = api.get(PGPOOLS, NS, "main")["status"]
        assert status["autoscaling"]["clients"] >= 40 and status["autoscaling"]["desiredReplicas"] == 4
        grown_in = time.monotonic() - arrived

        # The crowd leaves: the fleet stays for the window, then goes back to minReplicas.
        for crowd in crowds:
            await crowd.stop()
        left = time.monotonic()
        await eventually(
            lambda: api.get(PGPOOLS, NS, "main")["spec"]["replicas"] == 1, timeout=30, what="back to 1 replica"
        )
        shrunk_after = time.monotonic() - left
        assert shrunk_after >= window - 1  # not before the window (1 s for the timestamps' rounding)
        await eventually(
            lambda: (api.get(DEPLOYMENTS, NS, "main") or {}).get("spec", {}).get("replicas") == 1,
            timeout=30,
            what="the Deployment back at 1",
        )
        await eventually(lambda: timeline[-1][1:] == (1, 1), what="the timeline's last point")
    finally:
        watcher.cancel()
        for crowd in crowds:
            await crowd.stop()
        await sampler.stop()

    fleet = [sample.count(FLEET_ROLE) for sample in sampler.samples]
    assert max(fleet) <= budget, fleet  # more pods shared the same budget, never more backends
    assert sum(crowd.stats.transactions for crowd in crowds) > 0
    assert sum(crowd.stats.failed for crowd in crowds) == 0, [crowd.stats.errors for crowd in crowds]
    replicas = [point[1] for point in timeline]
    assert max(replicas) == 4 and replicas[-1] == 1
    # For -s runs (kopf's test runner holds sys.stdout meanwhile).
    out = sys.__stdout__
    assert out is not None
    out.write(f"\nreplica timeline (s, spec.replicas, Deployment): {timeline}\n")
    out.write(f"grew in {grown_in:.2f} s, shrank {shrunk_after:.2f} s after the crowd left (window {window} s)\n")
    out.write(f"most fleet backends: {max(fleet)} of a budget of {budget} ({len(fleet)} samples)\n")
