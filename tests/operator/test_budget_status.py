"""What a budget period writes into a PgPool's status, as data: status.budget and BudgetEnforced."""

from __future__ import annotations

import functools
from typing import Any

from pgfleet.operator import conditions
from pgfleet.operator.allocate import FleetSpec, PodState, ServerFacts, allocate_server
from pgfleet.operator.control import FleetReport, PeriodReport
from pgfleet.operator.fleet import PodReport, PushOutcome
from pgfleet.operator.reconcile import _budget_status, _enforced

CONDITION = functools.partial(conditions.condition, generation=3, at="2026-01-01T00:00:00Z")


def period(
    facts: ServerFacts | None,
    pods: tuple[PodState, ...],
    *,
    fleet_backends: int | None,
    unreachable: tuple[str, ...] = (),
    budget: int = 38,
) -> tuple[PeriodReport, FleetReport]:
    spec = FleetSpec(name="shop/main", max_backends=40, reserve=2, pods=pods, budget=budget)
    server = allocate_server(facts, [spec])
    reports = {
        p.name: PodReport(
            p.name, f"http://{p.name}", reachable=p.name not in unreachable, limit=p.limit, held=p.held, waiting=p.waiting,
            clients=p.active + p.waiting, error="timed out" if p.name in unreachable else "",
        )
        for p in pods
    }  # fmt: skip
    fleet = FleetReport("shop/main", server.fleets["shop/main"], reports, PushOutcome(reports=reports), fleet_backends)
    at = 1767225600.0  # 2026-01-01T00:00:00Z
    report = PeriodReport(
        at=at, took=0.01, started=0.0, error="" if facts else "connection refused", server=server,
        fleets={"shop/main": fleet}, max_connections=facts.max_connections if facts else None,
    )  # fmt: skip
    return report, fleet


def enforced(report: PeriodReport, fleet: FleetReport) -> Any:
    return _enforced(CONDITION, report, fleet)


def test_the_budget_in_status_is_the_loops_with_its_facts() -> None:
    pods = (PodState("a", limit=19, held=12, active=10, waiting=3), PodState("b", limit=19, held=5, active=2))
    report, fleet = period(ServerFacts(max_connections=50, others=4), pods, fleet_backends=17)
    assert _budget_status(report, fleet) == {
        "total": 38,
        "fleetBackends": 17,  # PostgreSQL's count of its pods' PIDs, not the role's
        "waitingClients": 3,
        "perPodMin": 19,
        "perPodMax": 19,
        "clients": 15,
        "observedAt": "2026-01-01T00:00:00Z",
        "usable": 47,
        "others": 4,
        "headroom": 47 - 4 - 1 - 2,
    }
    cond = enforced(report, fleet)
    assert (cond["status"], cond["reason"]) == ("True", "Allocated")
    assert "17 backends held within a budget of 38" in cond["message"]


def test_budget_enforced_tells_the_truth() -> None:
    pods = (PodState("a", limit=19, held=19), PodState("b", limit=19, held=19))
    # Others hold 30: the budget is below the spec's, and the message says how many others hold.
    report, fleet = period(ServerFacts(max_connections=50, others=30), pods, fleet_backends=12)
    cond = enforced(report, fleet)
    assert (cond["status"], cond["reason"]) == ("False", "Squeezed") and "others hold 30 backends" in cond["message"]
    # PostgreSQL shows more of its backends than the budget: Overcommitted, whatever else.
    report, fleet = period(ServerFacts(max_connections=50, others=30), pods, fleet_backends=38)
    cond = enforced(report, fleet)
    assert (cond["status"], cond["reason"]) == ("False", "Overcommitted")
    assert "holds 38 backends against a budget of 14" in cond["message"]
    # A pod that does not answer: Unconfirmed, naming it.
    report, fleet = period(ServerFacts(max_connections=50), pods, fleet_backends=20, unreachable=("b",))
    cond = enforced(report, fleet)
    assert (cond["status"], cond["reason"]) == ("False", "Unconfirmed") and "b: timed out" in cond["message"]
    # The database cannot be observed: nothing may grow, and the status says why.
    report, fleet = period(None, pods, fleet_backends=None, budget=38)
    cond = enforced(report, fleet)
    assert (cond["status"], cond["reason"]) == ("False", "DatabaseUnobserved")
    assert "connection refused" in cond["message"]
    assert "usable" not in _budget_status(report, fleet)  # facts it did not observe are left out
