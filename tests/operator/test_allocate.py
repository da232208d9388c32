"""The dynamic allocator as data: shares, weights, connection limits, reserves, floors, pods."""

from __future__ import annotations

import random

import pytest
from pgfleet.operator.allocate import (
    FleetSpec,
    PodState,
    Reason,
    ServerFacts,
    allocate_server,
    split,
    water_fill,
)


def pods(*demands: int, limit: int | None = None) -> tuple[PodState, ...]:
    return tuple(PodState(f"p{i}", limit=limit, active=d) for i, d in enumerate(demands))


# -- water filling -------------------------------------------------------------------------------


def test_water_fill_shares_evenly_and_leaves_what_a_small_cap_does_not_need() -> None:
    assert water_fill(30, {"a": 100, "b": 100, "c": 100}) == {"a": 10, "b": 10, "c": 10}
    assert water_fill(30, {"a": 4, "b": 100, "c": 100}) == {"a": 4, "b": 13, "c": 13}
    assert water_fill(30, {"a": 4, "b": 5, "c": 6}) == {"a": 4, "b": 5, "c": 6}  # everyone capped
    assert water_fill(0, {"a": 4}) == {"a": 0}
    assert water_fill(-5, {"a": 4}) == {"a": 0}


def test_water_fill_weights_and_rounding() -> None:
    assert water_fill(40, {"a": 100, "b": 100}, {"a": 3, "b": 1}) == {"a": 30, "b": 10}
    # 10 over 3: one left over goes to the largest fraction, ties by name — always the same.
    assert water_fill(10, {"a": 100, "b": 100, "c": 100}) == {"a": 4, "b": 3, "c": 3}
    assert water_fill(11, {"a": 100, "b": 100}, {"a": 2, "b": 1}) == {"a": 7, "b": 4}


# -- budgets per fleet ----------------------------------------------------------------------------


def test_the_issue_case_others_hold_30_of_47_usable() -> None:
    """max_connections 50, 3 for superusers, another application holds 30: the fleet shrinks to fit."""
    server = ServerFacts(max_connections=50, superuser_reserved=3, others=30)
    fleet = FleetSpec("f", max_backends=40, pods=pods(0, 0, 0), surge=1)
    result = allocate_server(server, [fleet])
    assert (result.usable, result.headroom) == (47, 16)  # 47 - 30 - the observer
    got = result.fleets["f"]
    assert got.budget == 16 and got.wanted == 40
    assert got.reasons == (Reason.SQUEEZED,)
    assert got.committed <= 16 and all(limit >= 1 for limit in got.limits.values())
    # Nobody else on the server: the whole spec.
    alone = allocate_server(ServerFacts(max_connections=50, superuser_reserved=3), [fleet]).fleets["f"]
    assert alone.budget == 40 and alone.reasons == ()


def test_two_fleets_asking_80_percent_each_share_the_server() -> None:
    server = ServerFacts(max_connections=50, superuser_reserved=3)
    a = FleetSpec("a", max_backends_percent=80, pods=pods(0, 0))
    b = FleetSpec("b", max_backends_percent=80, pods=pods(0, 0))
    result = allocate_server(server, [a, b])
    budgets = [result.fleets[name].budget for name in "ab"]
    assert budgets == [23, 23]  # 46 headroom, caps of 37 each
    assert sum(budgets) <= result.usable - 0  # usable - others
    # One that asks little leaves the rest to the other.
    small = FleetSpec("a", max_backends=5, pods=pods(0))
    result = allocate_server(server, [small, b])
    assert (result.fleets["a"].budget, result.fleets["b"].budget) == (5, 37)


def test_weights_share_the_headroom() -> None:
    server = ServerFacts(max_connections=103, superuser_reserved=3, others=19)  # headroom 80
    heavy = FleetSpec("heavy", weight=3, pods=pods(0))
    light = FleetSpec("light", weight=1, pods=pods(0))
    result = allocate_server(server, [heavy, light])
    assert (result.fleets["heavy"].budget, result.fleets["light"].budget) == (60, 20)


def test_reserved_connections_and_reserve_come_off_the_top() -> None:
    # PostgreSQL 16's reserved_connections is not usable by the fleet's (non-superuser) role.
    server = ServerFacts(max_connections=100, superuser_reserved=3, reserved=7, others=10)
    result = allocate_server(server, [FleetSpec("a", reserve=5, pods=pods(0)), FleetSpec("b", reserve=2, pods=pods(0))])
    assert result.usable == 90
    assert result.headroom == 90 - 10 - 1 - 5  # the largest reserve any fleet asks
    assert sum(f.budget for f in result.fleets.values()) == result.headroom


def test_role_and_database_connection_limits() -> None:
    server = ServerFacts(
        max_connections=200,
        role_limits={"app": 12, "other": -1},
        others_by_role={"app": 2},
        database_limits={"shop": 9},
        others_by_database={"shop": 1},
    )
    a = FleetSpec("a", role="app", database="x", pods=pods(0))
    b = FleetSpec("b", role="app", database="y", pods=pods(0))
    c = FleetSpec("c", role="other", database="shop", pods=pods(0))
    d = FleetSpec("d", role="other", database="z", max_backends=30, pods=pods(0))
    result = allocate_server(server, [a, b, c, d])
    # a and b share what the role's limit leaves (12 - 2 of others'); c gets what shop's leaves.
    assert (result.fleets["a"].budget, result.fleets["b"].budget) == (5, 5)
    assert result.fleets["c"].budget == 8
    assert result.fleets["d"].budget == 30
    assert result.fleets["a"].reasons == ()  # limited by its own role's limit, not squeezed by others


# -- pods ----------------------------------------------------------------------------------------


def test_floors_one_per_worker_and_surge_room_at_the_floor() -> None:
    fleet = FleetSpec("f", workers=2, surge=1, pods=pods(0, 0, 0))
    limits, floor, surge = split(9, fleet)
    assert floor == 2 and surge == 2
    assert sorted(limits.values()) == [2, 2, 3]  # the one left over goes to a pod
    # Too small for the surge pod: the room goes to running pods, surge gets none.
    limits, floor, surge = split(7, fleet)
    assert surge == 0 and sum(limits.values()) == 7
    # Too small for every pod's floor: the busiest pods are served, the rest hold 0.
    busy = FleetSpec("f", workers=2, surge=1, pods=pods(0, 5, 1))
    limits, _, surge = split(5, busy)
    assert limits == {"p1": 3, "p2": 2, "p0": 0} and surge == 0  # the odd one to the busiest
    for budget in range(0, 30):
        limits, floor, surge = split(budget, busy)
        assert sum(limits.values()) + surge <= budget
        assert all(limit == 0 or limit >= 2 for limit in limits.values())


def test_demand_gets_the_larger_share() -> None:
    """200 clients waiting on one pod, two idle pods: the busy one gets what the idle ones do not need."""
    fleet = FleetSpec(
        "f",
        surge=1,
        pods=(
            PodState("busy", limit=10, held=10, active=10, waiting=190),
            PodState("idle1", limit=10, held=2),
            PodState("idle2", limit=10, held=1),
        ),
    )
    limits, floor, surge = split(40, fleet)
    assert surge == 1 and floor == 1
    assert limits["busy"] == 37 and limits["idle1"] == limits["idle2"] == 1
    # Demand spread again: back to even.
    even = FleetSpec("f", surge=1, pods=tuple(PodState(n, limit=13, active=13, waiting=5) for n in "abc"))
    assert sorted(split(40, even)[0].values()) == [13, 13, 13]


def test_hysteresis_keeps_limits_that_are_close_enough() -> None:
    fleet = FleetSpec("f", pods=(PodState("a", limit=10, active=6), PodState("b", limit=9, active=6)))
    limits, _, _ = split(19, fleet, hysteresis=1)
    assert limits == {"a": 10, "b": 9}  # would be 10/9 or 9/10 — no change either way
    limits, _, _ = split(19, fleet, hysteresis=0)
    assert sum(limits.values()) == 19
    # Never at the cost of the budget: a lower budget is taken even if within the band.
    limits, _, _ = split(18, fleet, hysteresis=1)
    assert sum(limits.values()) <= 18


def test_an_unreachable_pod_counts_at_its_last_confirmed_limit() -> None:
    fleet = FleetSpec(
        "f",
        pods=(PodState("gone", limit=12, reachable=False), PodState("a", limit=5), PodState("b", limit=5)),
    )
    limits, _, _ = split(20, fleet)
    assert limits["gone"] == 12 and limits["a"] + limits["b"] == 8
    # On a shared server its fleet keeps what it cannot give back; the other fleet gets the rest.
    server = ServerFacts(max_connections=43, superuser_reserved=2)  # headroom 40
    other = FleetSpec("other", pods=pods(0, 0))
    stuck = FleetSpec("stuck", pods=(PodState("gone", limit=30, reachable=False), PodState("a", limit=1)))
    result = allocate_server(server, [stuck, other])
    assert result.fleets["stuck"].budget == 30
    assert result.fleets["other"].budget == 10
    assert result.fleets["stuck"].limits["a"] == 0  # nothing left for its reachable pod


def test_an_unobserved_server_never_lets_limits_grow() -> None:
    fleet = FleetSpec(
        "f",
        budget=20,
        pods=(PodState("a", limit=4, active=4, waiting=50), PodState("b", limit=16, held=1)),
    )
    result = allocate_server(None, [fleet]).fleets["f"]
    assert result.budget == 20 and Reason.UNOBSERVED in result.reasons
    assert result.limits["a"] <= 4 and result.limits["b"] <= 16
    assert result.committed <= 20


def test_overcommitted_when_pods_hold_more_than_the_budget() -> None:
    server = ServerFacts(max_connections=23, superuser_reserved=2)  # headroom 20
    fleet = FleetSpec("f", pods=(PodState("a", limit=30, held=25),))
    result = allocate_server(server, [fleet]).fleets["f"]
    assert result.budget == 20 and result.limits["a"] == 20
    assert Reason.OVERCOMMITTED in result.reasons


@pytest.mark.parametrize("seed", range(40))
def test_invariants_hold_for_random_servers(seed: int) -> None:
    rng = random.Random(seed)
    max_connections = rng.randint(5, 400)
    server = ServerFacts(
        max_connections=max_connections,
        superuser_reserved=rng.randint(0, 5),
        reserved=rng.choice([0, 0, 3]),
        others=rng.randint(0, max_connections),
        role_limits={"r0": rng.choice([-1, 5, 50])},
        others_by_role={"r0": rng.randint(0, 3)},
    )
    fleets = []
    for i in range(rng.randint(1, 6)):
        fleets.append(
            FleetSpec(
                f"f{i}",
                role=f"r{rng.randint(0, 1)}",
                max_backends=rng.choice([None, rng.randint(1, 200)]),
                max_backends_percent=rng.choice([None, rng.randint(1, 100)]),
                reserve=rng.randint(0, 5),
                weight=rng.randint(1, 4),
                workers=rng.choice([1, 1, 2, 4]),
                surge=rng.randint(0, 2),
                pods=tuple(
                    PodState(
                        f"p{j}",
                        limit=rng.choice([None, rng.randint(0, 30)]),
                        active=rng.randint(0, 20),
                        waiting=rng.randint(0, 50),
                    )
                    for j in range(rng.randint(0, 8))
                ),
            )
        )
    result = allocate_server(server, fleets)
    assert sum(f.budget for f in result.fleets.values()) <= max(0, server.usable - server.others)
    for spec in fleets:
        got = result.fleets[spec.name]
        assert got.committed <= got.budget
        assert all(limit == 0 or limit >= spec.workers for limit in got.limits.values())
        assert set(got.limits) == {p.name for p in spec.pods}
    # The same fleets, the server unobserved: no pod's limit rises above what it had.
    previous = {spec.name: result.fleets[spec.name] for spec in fleets}
    confirmed = [
        FleetSpec(
            spec.name,
            workers=spec.workers,
            surge=spec.surge,
            budget=previous[spec.name].budget,
            pods=tuple(
                PodState(p.name, limit=previous[spec.name].limits[p.name], waiting=p.waiting) for p in spec.pods
            ),
        )
        for spec in fleets
    ]
    blind = allocate_server(None, confirmed)
    for spec in confirmed:
        for pod in spec.pods:
            assert blind.fleets[spec.name].limits[pod.name] <= (pod.limit or 0)


# -- hysteresis in the loop: each period's limits are the next period's limits in force ----------


def run_periods(budget: int, demands: list[list[int]], *, workers: int = 1, surge: int = 0) -> list[dict[str, int]]:
    """Each period's limits from `split`, fed back as the pods' confirmed limits, as the loop does.

    `demands[t][i]` is pod i's busy servers as period t's /status reads them.
    """
    limits: dict[str, int | None] = {f"p{i}": None for i in range(len(demands[0]))}
    out = []
    for demand in demands:
        fleet = FleetSpec(
            "f",
            workers=workers,
            surge=surge,
            pods=tuple(
                PodState(
                    name,
                    limit=limit,
                    held=limit or workers,
                    active=min(d, limit or workers),
                    waiting=max(0, d - (limit or workers)),
                )
                for (name, limit), d in zip(limits.items(), demand, strict=True)
            ),
        )
        got, _, surge_room = split(budget, fleet)
        assert sum(got.values()) + surge_room <= budget
        limits = dict(got)
        out.append(got)
    return out


@pytest.mark.parametrize(
    ("pods_", "budget", "demand"),
    [(3, 38, 4), (3, 38, 12), (3, 38, 20), (2, 19, 6), (4, 30, 3), (3, 10, 2), (5, 23, 30)],
)
def test_limits_do_not_flap_under_steady_equal_demand(pods_: int, budget: int, demand: int) -> None:
    """Equal, steady demand, a budget that does not divide evenly: after the first period no pod's
    limit changes, though each /status catches one pod a server busier than the others (a sample
    of a steady load is never exactly even), and the whole budget stays in use."""
    jitter = [[demand + (i == t % pods_) for i in range(pods_)] for t in range(3 * pods_ + 2)]
    for demands in ([[demand] * pods_] * len(jitter), jitter):
        periods = run_periods(budget, demands)
        assert all(p == periods[1] for p in periods[1:]), periods
        assert sum(periods[-1].values()) == budget, periods[-1]


def test_a_busy_pod_keeps_its_share_while_its_demand_swings_and_nobody_else_needs_it() -> None:
    """Serverless load on one pod, the others idle: each /status catches it anywhere from 13 to
    69 clients. Its limit stays where the load is; it does not drop to what one low reading asks."""
    readings = [69, 21, 40, 13, 55, 30, 69, 16]
    periods = run_periods(35, [[d, 0, 0] for d in readings], surge=0)
    assert periods[0] == {"p0": 33, "p1": 1, "p2": 1}
    assert all(p == periods[0] for p in periods), periods
    # Clients start to wait at another pod: it gets its share in the next period.
    after = run_periods(35, [[69, 0, 0], [69, 20, 0]])
    assert after[1]["p1"] > 1 and sum(after[1].values()) == 35, after
