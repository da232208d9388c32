"""Prometheus metrics: a custom collector that reads live pool state at scrape time.

Metric names and labels are pgbouncer_exporter's, so dashboards built for PgBouncer work
unchanged; `pgfleet_*` metrics add what PgBouncer lacks. Nothing here is counted per
message: the collector walks the pools when scraped, the wait-time histogram included
(each pool keeps its own: stats.WaitHistogram, a bisect per wait, compiled).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from . import views
from .admin import VERSION_STRING

if TYPE_CHECKING:
    from .pooler import Pooler

# SHOW POOLS column -> pgbouncer_exporter metric (pgbouncer_pools_<name>), all gauges.
_POOL_GAUGES = (
    ("cl_active", "client_active_connections", "Client connections linked to a server or idle"),
    ("cl_active_cancel_req", "client_active_cancel_connections", "Clients that forwarded a cancel request"),
    ("cl_waiting", "client_waiting_connections", "Client connections waiting for a server connection"),
    ("cl_waiting_cancel_req", "client_waiting_cancel_connections", "Clients with a cancel request not yet sent"),
    ("sv_active", "server_active_connections", "Server connections linked to a client"),
    ("sv_active_cancel", "server_active_cancel_connections", "Server connections forwarding a cancel request"),
    ("sv_being_canceled", "server_being_canceled_connections", "Servers waiting for cancel requests to finish"),
    ("sv_idle", "server_idle_connections", "Server connections idle and ready for a client"),
    ("sv_used", "server_used_connections", "Server connections idle past server_check_delay"),
    ("sv_tested", "server_testing_connections", "Server connections running a reset or check query"),
    ("sv_login", "server_login_connections", "Server connections logging in"),
)
# SHOW STATS_TOTALS column -> pgbouncer_exporter counter (pgbouncer_stats_totals_<name>), scale.
_STAT_COUNTERS = (
    ("query_count", "queries_pooled_total", 1.0, "Total number of SQL queries pooled"),
    ("query_time", "queries_duration_seconds_total", 1e-6, "Seconds spent on a server executing queries"),
    ("bytes_received", "received_bytes_total", 1.0, "Bytes received from clients"),
    ("bytes_sent", "sent_bytes_total", 1.0, "Bytes sent to clients"),
    ("wait_time", "client_wait_seconds_total", 1e-6, "Seconds clients spent waiting for a server"),
    ("xact_count", "sql_transactions_pooled_total", 1.0, "Total number of SQL transactions pooled"),
    ("xact_time", "server_in_transaction_seconds_total", 1e-6, "Seconds spent on a server in a transaction"),
    ("client_parse_count", "client_parses_total", 1.0, "Parse messages received from clients"),
    ("server_parse_count", "server_parses_total", 1.0, "Parse messages sent to servers"),
    ("bind_count", "binds_total", 1.0, "Bind messages forwarded for prepared statements"),
)
_DATABASE_LABELS = ["name", "host", "port", "database", "force_user", "pool_mode"]


class PoolerCollector(Collector):
    """Reads a Pooler at scrape time; also keeps the client wait-time histograms."""

    def __init__(self, pooler: Pooler) -> None:
        self.pooler = pooler

    def collect(self) -> Iterable[Metric]:
        yield from self._pgbouncer_metrics()
        yield from self._pgfleet_metrics()

    # -- pgbouncer_exporter's metrics ---------------------------------------------------------
    def _pgbouncer_metrics(self) -> Iterator[Metric]:
        pooler = self.pooler
        now = pooler.loop.time()
        up = GaugeMetricFamily("pgbouncer_up", "The pgbouncer scrape succeeded")
        up.add_metric([], 1.0)
        yield up
        version = GaugeMetricFamily("pgbouncer_version_info", "The pgbouncer version info", labels=["version"])
        version.add_metric([VERSION_STRING], 1.0)
        yield version

        pools = list(pooler.pools.values())
        counts = {pool: views.pool_counts(pool, now) for pool in pools}
        for column, name, doc in _POOL_GAUGES:
            family = GaugeMetricFamily(f"pgbouncer_pools_{name}", doc, labels=["database", "user"])
            for pool in pools:
                family.add_metric([pool.database, pool.user], float(getattr(counts[pool], column, 0)))
            yield family
        maxwait = GaugeMetricFamily(
            "pgbouncer_pools_client_maxwait_seconds", "Age of the oldest unserved client", labels=["database", "user"]
        )
        for pool in pools:
            maxwait.add_metric([pool.database, pool.user], counts[pool].maxwait)
        yield maxwait

        names = views.database_names(pooler)
        stats = {name: views.sum_stats(views.pools_of(pooler, name)) for name in names}
        for key, name, scale, doc in _STAT_COUNTERS:
            counter = CounterMetricFamily(f"pgbouncer_stats_totals_{name}", doc, labels=["database"])
            for database in names:
                counter.add_metric([database], stats[database].get(key, 0) * scale)
            yield counter

        database_gauges = {
            "pool_size": GaugeMetricFamily("pgbouncer_databases_pool_size", "Maximum number of server connections", labels=_DATABASE_LABELS),
            "reserve_pool": GaugeMetricFamily("pgbouncer_databases_reserve_pool", "Additional connections allowed for this database", labels=_DATABASE_LABELS),
            "max_connections": GaugeMetricFamily("pgbouncer_databases_max_connections", "Maximum server connections for this database", labels=_DATABASE_LABELS),
            "current_connections": GaugeMetricFamily("pgbouncer_databases_current_connections", "Current server connections for this database", labels=_DATABASE_LABELS),
            "paused": GaugeMetricFamily("pgbouncer_databases_paused", "1 if this database is paused, else 0", labels=_DATABASE_LABELS),
            "disabled": GaugeMetricFamily("pgbouncer_databases_disabled", "1 if this database is disabled, else 0", labels=_DATABASE_LABELS),
        }  # fmt: skip
        admin = pooler.admin
        for database in names:
            db = views.database_config(pooler, database)
            labels = [
                database, db.host, str(db.port), db.dbname or database, db.user or "",
                db.pool_mode.value if db.pool_mode is not None else "",
            ]  # fmt: skip
            limits = pooler.limits_for(database)
            values = {
                "pool_size": limits.pool_size,
                "reserve_pool": limits.reserve_pool_size,
                "max_connections": limits.max_db_connections,
                "current_connections": pooler.database_server_count(database),
                "paused": int(admin is not None and admin.is_paused(database)),
                "disabled": 0,
            }
            for key, family in database_gauges.items():
                family.add_metric(labels, float(values[key]))
        yield from database_gauges.values()

        lists = views.lists(pooler)  # what pgbouncer_exporter reads from SHOW LISTS
        for key, name, doc in _LISTS:
            yield GaugeMetricFamily(f"pgbouncer_{name}", doc, value=float(lists[key]))
        yield GaugeMetricFamily(
            "pgbouncer_config_max_client_connections",
            "Config maximum number of client connections",
            value=float(pooler.client_limit),
        )
        yield GaugeMetricFamily(
            "pgbouncer_config_max_user_connections",
            "Config maximum number of server connections per user",
            value=float(pooler.slot.portion(pooler.config.max_user_connections)),
        )

    # -- what pgfleet adds ------------------------------------------------------------------------
    def _pgfleet_metrics(self) -> Iterator[Metric]:
        pooler = self.pooler
        labels = ["database", "user"]
        wait = HistogramMetricFamily(
            "pgfleet_client_wait_seconds", "Time clients waited for a server connection", labels=labels
        )
        for (database, user), pool in sorted(pooler.pools.items()):
            if any(pool.waits.counts):  # a pool nobody has waited in yet has no histogram
                wait.add_metric([database, user], pool.waits.cumulative(), pool.waits.total)
        yield wait

        limit = GaugeMetricFamily(
            "pgfleet_pool_server_limit",
            "Server connections the pool may hold now (pool_size, plus reserve in use)",
            labels=labels,
        )
        size = GaugeMetricFamily("pgfleet_pool_size", "The pool_size limit in force", labels=labels)
        backends = GaugeMetricFamily(
            "pgfleet_pool_backends", "Server connections held (idle, active, logging in)", labels=labels
        )
        queued = GaugeMetricFamily(
            "pgfleet_pool_clients_queued", "Clients queued for a server connection", labels=labels
        )
        paused = GaugeMetricFamily(
            "pgfleet_pool_paused", "1 if the pool hands out no servers (PAUSE/KILL)", labels=labels
        )
        hits = CounterMetricFamily(
            "pgfleet_prepared_statements_cache_hits",
            "Prepared statements found already prepared on the server",
            labels=labels,
        )
        misses = CounterMetricFamily(
            "pgfleet_prepared_statements_cache_misses", "Prepared statements that had to be prepared on the server", labels=labels
        )  # fmt: skip
        now = pooler.loop.time()
        for pool in pooler.pools.values():
            key = [pool.database, pool.user]
            limit.add_metric(key, float(pool.limit))
            size.add_metric(key, float(pool.pool_size))
            backends.add_metric(key, float(pool.server_count))
            queued.add_metric(key, float(views.pool_counts(pool, now).cl_waiting))
            paused.add_metric(key, float(pool.paused))
            hits.add_metric(key, float(pool.stats.prepared_hits))
            misses.add_metric(key, float(pool.stats.prepared_misses))
        yield from (limit, size, backends, queued, paused, hits, misses)

        stats = pooler.tls_stats
        handshakes = CounterMetricFamily(
            "pgfleet_tls_handshakes", "TLS handshakes completed, by leg (client, server)", labels=["side"]
        )
        failures = CounterMetricFamily(
            "pgfleet_tls_handshake_failures", "TLS handshakes that failed, by leg (client, server)", labels=["side"]
        )
        handshakes.add_metric(["client"], float(stats.client_handshakes))
        handshakes.add_metric(["server"], float(stats.server_handshakes))
        failures.add_metric(["client"], float(stats.client_failures))
        failures.add_metric(["server"], float(stats.server_failures))
        yield from (handshakes, failures)

        draining = GaugeMetricFamily("pgfleet_draining", "1 once a drain (SIGTERM, POST /drain) has started")
        draining.add_metric([], float(pooler.draining))
        yield draining
        uptime = GaugeMetricFamily("pgfleet_uptime_seconds", "Seconds since the pooler started")
        uptime.add_metric([], now - pooler.started_at)
        yield uptime


# SHOW LISTS rows as pgbouncer_exporter names them.
_LISTS = (
    ("databases", "databases", "Count of databases"),
    ("users", "users", "Count of users"),
    ("pools", "pools", "Count of pools"),
    ("free_clients", "free_clients", "Count of free clients"),
    ("used_clients", "used_clients", "Count of used clients"),
    ("login_clients", "login_clients", "Count of clients in login state"),
    ("free_servers", "free_servers", "Count of free servers"),
    ("used_servers", "used_servers", "Count of used servers"),
    ("dns_names", "cached_dns_names", "Count of DNS names in the cache"),
    ("dns_zones", "cached_dns_zones", "Count of DNS zones in the cache"),
    ("dns_queries", "in_flight_dns_queries", "Count of in-flight DNS queries"),
)


def make_registry(pooler: Pooler) -> CollectorRegistry:
    """A registry of its own per pooler (tests run several in one process)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PoolerCollector(pooler))
    ProcessCollector(registry=registry)
    return registry
