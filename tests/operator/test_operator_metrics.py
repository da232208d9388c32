"""The operator's /metrics: each budget period's report as gauges per PgPool and per server."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

from pgfleet.devtools.procs import free_port
from pgfleet.operator import metrics
from pgfleet.operator.allocate import FleetSpec, PodState, ServerFacts, allocate_server
from pgfleet.operator.control import FleetReport, PeriodReport
from pgfleet.operator.fleet import PodReport, PushOutcome
from prometheus_client import start_http_server
from prometheus_client.parser import text_string_to_metric_families

SERVER = "db.example:5432"
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "pgfleet-dashboard.json"


def period(facts: ServerFacts | None) -> PeriodReport:
    """A period as the loop reports it: the allocator's real output, pods that confirmed 12 and 13."""
    pods = (PodState("main-0", limit=12, held=12, waiting=3), PodState("main-1", limit=13, held=5, waiting=1))
    spec = FleetSpec(name="shop/main", max_backends=40, reserve=2, pods=pods, budget=38)
    server = allocate_server(facts, [spec])
    confirmed = {
        p.name: PodReport(p.name, f"http://{p.name}", reachable=True, limit=p.limit, held=p.held, waiting=p.waiting)
        for p in pods
    }
    gone = PodReport("main-2", "http://main-2", reachable=False, error="timed out")
    report = FleetReport(
        name="shop/main",
        budget=server.fleets["shop/main"],
        pods={**confirmed, "main-2": gone},
        push=PushOutcome(reports={**confirmed, "main-2": gone}),
        fleet_backends=17,
    )
    return PeriodReport(
        at=0.0,
        started=0.0,
        took=0.01,
        error="" if facts else "connection refused",
        server=server,
        fleets={"shop/main": report},
        max_connections=facts.max_connections if facts else None,
    )


def scrape(reports: list[tuple[str, PeriodReport]]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Serve the registry as the operator does and read it back over HTTP."""
    port = free_port()
    server, thread = start_http_server(port, "127.0.0.1", metrics.make_registry(lambda: reports))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_period_becomes_gauges_per_pgpool_and_per_server() -> None:
    report = period(ServerFacts(max_connections=50, others=10))
    budget = report.fleets["shop/main"].budget.budget
    assert 0 < budget <= 40 - 2  # the allocator's own answer, within the spec
    got = scrape([(SERVER, report)])
    fleet = (("namespace", "shop"), ("pgpool", "main"), ("server", SERVER))
    assert got[("pgfleet_operator_budget_backends", fleet)] == budget
    assert got[("pgfleet_operator_fleet_backends", fleet)] == 17
    assert got[("pgfleet_operator_others_backends", fleet)] == 10
    assert got[("pgfleet_operator_usable_backends", fleet)] == 47  # 50 - 3 superuser_reserved
    assert got[("pgfleet_operator_headroom_backends", fleet)] == report.server.headroom
    assert got[("pgfleet_operator_waiting_clients", fleet)] == 4
    # Limits in force of the pods that answered; the unreachable one is not guessed at.
    assert got[("pgfleet_operator_pod_limit_min", fleet)] == 12
    assert got[("pgfleet_operator_pod_limit_max", fleet)] == 13
    server = (("server", SERVER),)
    assert got[("pgfleet_operator_server_up", server)] == 1
    assert got[("pgfleet_operator_server_max_connections", server)] == 50
    assert got[("pgfleet_operator_server_others_backends", server)] == 10
    assert got[("pgfleet_operator_server_usable_backends", server)] == 47
    assert {name for name, _labels in got} == metrics.METRIC_NAMES


def test_an_unobserved_server_says_so_and_leaves_its_facts_out() -> None:
    got = scrape([(SERVER, period(None))])
    fleet = (("namespace", "shop"), ("pgpool", "main"), ("server", SERVER))
    assert got[("pgfleet_operator_server_up", (("server", SERVER),))] == 0
    assert ("pgfleet_operator_budget_backends", fleet) in got  # the budget in force still holds
    for name in ("others", "usable", "headroom"):
        assert ("pgfleet_operator_" + name + "_backends", fleet) not in got
        assert ("pgfleet_operator_server_" + name + "_backends", (("server", SERVER),)) not in got


def test_no_loops_no_series() -> None:
    assert scrape([]) == {}


def test_every_operator_metric_the_dashboard_uses_is_exported() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    used = {name for expr in exprs for name in re.findall(r"\bpgfleet_operator_[a-z0-9_]+\b", expr)}
    exported = {name for name, _labels in scrape([(SERVER, period(ServerFacts(max_connections=50, others=10)))])}
    # The budget as the issue lists it: the fleet's backends, others', the limit per pod, waiting clients.
    assert {
        "pgfleet_operator_budget_backends",
        "pgfleet_operator_fleet_backends",
        "pgfleet_operator_others_backends",
        "pgfleet_operator_pod_limit_min",
        "pgfleet_operator_waiting_clients",
    } <= used
    assert used <= exported, sorted(used - exported)
