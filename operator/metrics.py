"""The operator's Prometheus metrics: each budget loop's last period, as the PgPool status says it.

The pods export what they hold and wait for; only the operator sees the server as a whole
(others' backends, what is usable, the headroom) and the budget it gives each fleet. A
collector reads the loops' last reports at scrape time (`families`, pure), so a PgPool
that leaves its loop leaves the metrics with it: no stale series to remove.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from .control import PeriodReport

FLEET_LABELS = ["namespace", "pgpool", "server"]
SERVER_LABELS = ["server"]

# name -> help, per PgPool
_FLEET = {
    "pgfleet_operator_budget_backends": "Backends the PgPool's pods may hold together now (its budget).",
    "pgfleet_operator_fleet_backends": "Backends PostgreSQL shows for the PgPool's pods (by PID).",
    "pgfleet_operator_others_backends": "Client backends on the PgPool's server that are no fleet's (others').",
    "pgfleet_operator_usable_backends": "Backends usable on the PgPool's server (max_connections less reserved ones).",
    "pgfleet_operator_headroom_backends": "Usable backends on the PgPool's server that no budget and no other holds.",
    "pgfleet_operator_waiting_clients": "Clients queued for a server connection over the PgPool's pods.",
    "pgfleet_operator_pod_limit_min": "The smallest pool limit in force among the PgPool's pods.",
    "pgfleet_operator_pod_limit_max": "The largest pool limit in force among the PgPool's pods.",
}
# name -> help, per server
_SERVER = {
    "pgfleet_operator_server_up": "1 if the budget loop observed the server in its last period, else 0.",
    "pgfleet_operator_server_max_connections": "The server's max_connections, as last observed.",
    "pgfleet_operator_server_others_backends": "Client backends on the server that are no fleet's (others').",
    "pgfleet_operator_server_usable_backends": "Backends usable on the server (max_connections less reserved ones).",
    "pgfleet_operator_server_headroom_backends": "Usable backends on the server that no budget and no other holds.",
    "pgfleet_operator_server_period_seconds": "How long the budget loop's last period took.",
}
METRIC_NAMES = frozenset(_FLEET) | frozenset(_SERVER)


def _split(fleet: str) -> tuple[str, str]:
    # The operator names fleets namespace/name; the standalone command by a bare name.
    namespace, _slash, name = fleet.rpartition("/")
    return namespace, name


def families(reports: Iterable[tuple[str, PeriodReport]]) -> list[GaugeMetricFamily]:
    """Gauges for each (server "host:port", its loop's last report); unknown values are left out."""
    fleet = {name: GaugeMetricFamily(name, doc, labels=FLEET_LABELS) for name, doc in _FLEET.items()}
    server = {name: GaugeMetricFamily(name, doc, labels=SERVER_LABELS) for name, doc in _SERVER.items()}

    def put(family: GaugeMetricFamily, labels: list[str], value: float | None) -> None:
        if value is not None:
            family.add_metric(labels, value)

    for where, period in reports:
        observed = period.observed
        put(server["pgfleet_operator_server_up"], [where], 1 if observed else 0)
        put(server["pgfleet_operator_server_max_connections"], [where], period.max_connections)
        put(server["pgfleet_operator_server_period_seconds"], [where], period.took)
        facts = {
            "others": period.server.others if observed else None,
            "usable": period.server.usable if observed else None,
            "headroom": period.server.headroom if observed else None,
        }
        for key, value in facts.items():
            put(server[f"pgfleet_operator_server_{key}_backends"], [where], value)
        for name, report in period.fleets.items():
            labels = [*_split(name), where]
            limits = list(report.limits.values())
            put(fleet["pgfleet_operator_budget_backends"], labels, report.budget.budget)
            put(fleet["pgfleet_operator_fleet_backends"], labels, report.fleet_backends)
            put(fleet["pgfleet_operator_waiting_clients"], labels, report.budget.waiting)
            put(fleet["pgfleet_operator_pod_limit_min"], labels, min(limits) if limits else None)
            put(fleet["pgfleet_operator_pod_limit_max"], labels, max(limits) if limits else None)
            for key, value in facts.items():
                put(fleet[f"pgfleet_operator_{key}_backends"], labels, value)
    return [*fleet.values(), *server.values()]


class BudgetCollector(Collector):
    """Collects `families` of whatever `source` yields when Prometheus scrapes."""

    def __init__(self, source: Callable[[], Iterable[tuple[str, PeriodReport]]]) -> None:
        self.source = source

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from families(self.source())


def make_registry(source: Callable[[], Iterable[tuple[str, PeriodReport]]]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BudgetCollector(source))
    return registry
